"""De-identified copy of a DICOM export for research: ``cutremain deidentify IN OUT``.

The identifying attributes are replaced through dicognito (``Anonymizer``), chosen over deid because it needs no
recipe for names, IDs, birth dates, addresses and institutions, and it maps every UID consistently (so a
presentation state's Referenced SOP Instance UIDs still name the de-identified images and the boxes still pair).
Its replacements are plausible dummy values, which keeps the files valid for the IODs that require those
attributes (``dciodvfy`` clean). What this adds:

* one dicognito ``Anonymizer`` per patient, seeded with an HMAC of the site's pseudonym key and the PatientID
  (:mod:`cutremain_monai.io.pseudonyms`): the same site maps the same patient, UIDs and dates to the same values
  on every run (new exports of a patient join the old ones), each patient gets his own date shift (dicognito has
  one per anonymizer: with one for a whole site, one known real date would undo every patient's), and nobody
  without the key can recompute the mapping;
* free-text and device attributes dicognito keeps are removed (:data:`REMOVED`: descriptions, comments, history,
  protocol names, device serials, AE titles, age, size and weight), and so are private attributes (the Basic
  Profile's defaults); box labels of presentation states (their text objects) are kept;
* ``DeidentificationMethod`` names the tool and what was done; ``PatientIdentityRemoved`` is dicognito's (YES only
  when ``BurnedInAnnotation`` is NO);
* output files are named by their new SOP Instance UID (never by the input path, which can carry a name);
* images whose pixels may carry text are flagged (``BurnedInAnnotation`` YES, or not stated): the pixels are not
  altered, a person must check them;
* a report (``deidentify_report.csv``) of what was changed per output file, as attribute keywords, never values;
  files that are not DICOM are counted and numbered in walk order, not named.

Pixel data, photometric interpretation, spacing, LUTs and windows are kept (training needs them).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import logging
import os
from dataclasses import dataclass, field

from cutremain_monai.io.dicom import dcmread_unnamed
from cutremain_monai.io.pseudonyms import site_key

__all__ = ["DeidentifyReport", "deidentify", "REMOVED"]

logger = logging.getLogger(__name__)

# free text, devices and demographics dicognito leaves (checked on its 0.19 output); all Type 3 in the DX, CR,
# SC and GSPS IODs, so removing them keeps the files valid
REMOVED = ("ImageComments", "StudyDescription", "SeriesDescription", "PatientComments", "AdditionalPatientHistory",
           "ProtocolName", "DerivationDescription", "AcquisitionDeviceProcessingDescription", "DeviceSerialNumber",
           "RetrieveAETitle", "PatientAge", "PatientSize", "PatientWeight", "Occupation", "MedicalAlerts", "Allergies",
           "PerformedProcedureStepDescription", "RequestedProcedureDescription", "AdmittingDiagnosesDescription",
           "StationName", "InstitutionalDepartmentName", "ReasonForStudy", "RequestAttributesSequence",
           "ContentCreatorName", "OperatorsName", "PerformingPhysicianName", "PhysiciansOfRecord",
           "NameOfPhysiciansReadingStudy", "PatientAddress", "PatientTelephoneNumbers",
           "EthnicGroup", "PatientReligiousPreference", "MilitaryRank", "BranchOfService", "CountryOfResidence",
           "RegionOfResidence", "PatientMotherBirthName", "OtherPatientNames", "PatientBirthName")
BLANKED = ("ReferringPhysicianName",)  # Type 2 (General Study): kept, empty
METHOD = ["dicognito 0.19 (cutremain deidentify)", "keyed per patient", "free text and private removed"]


def _strip(ds) -> None:
    """Remove :data:`REMOVED` everywhere in ``ds`` (sequences included)."""
    for d in [ds] + [item for el in ds.iterall() if el.VR == "SQ" for item in el.value]:
        for kw in REMOVED:
            if kw in d:
                delattr(d, kw)
        for kw in BLANKED:
            if kw in d:
                setattr(d, kw, "")

@dataclass
class DeidentifyReport:
    written: list = field(default_factory=list)  # rows: output file, SOP class, changed keywords, flags
    not_dicom: int = 0
    failed: int = 0


def _values(ds) -> dict:
    """``{tag path: value}`` over the dataset and its sequences (tag paths, not positions)."""
    out = {}

    def walk(d, prefix):
        for el in d:
            key = prefix + (el.tag,)
            if el.VR == "SQ":
                for item in el.value:
                    walk(item, key)
            elif el.tag != 0x7FE00010:
                out[key] = str(el.value)

    walk(ds, ())
    return out


def _keyword(path) -> str:
    import pydicom

    return ">".join(pydicom.datadict.keyword_for_tag(t) or f"({t.group:04X},{t.element:04X})" for t in path)


def deidentify(in_dir: str, out_dir: str, key: bytes | None = None, report_path: str | None = None) -> DeidentifyReport:
    """De-identify every DICOM file under ``in_dir`` into ``out_dir`` (see the module docstring)."""
    import dicognito
    from dicognito.anonymizer import Anonymizer



    key = site_key() if key is None else key
    anonymizers: dict[str, Anonymizer] = {}

    def anonymizer_for(patient_id: str) -> Anonymizer:
        if patient_id not in anonymizers:
            seed = hmac.new(key, f"cutremain-deidentify-v1:{patient_id}".encode(), hashlib.sha256).hexdigest()
            anonymizers[patient_id] = Anonymizer(seed=seed)
        return anonymizers[patient_id]

    del dicognito  # (imported to fail early when it is missing)
    os.makedirs(out_dir, exist_ok=True)
    report = DeidentifyReport()
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(in_dir) for f in files)
    for k, path in enumerate(paths):
        try:
            ds = dcmread_unnamed(path)  # (pydicom's warnings would quote the path)
        except Exception:  # not DICOM (or unreadable): counted, never named (its path can carry a name)
            report.not_dicom += 1
            logger.info("deidentify: input #%d is not a readable DICOM file (skipped)", k)
            continue
        try:
            before = _values(ds)
            burned = str(ds.get("BurnedInAnnotation", "") or "")
            ds.remove_private_tags()
            _strip(ds)
            if "SourceApplicationEntityTitle" in getattr(ds, "file_meta", {}):
                del ds.file_meta.SourceApplicationEntityTitle
            anonymizer_for(str(ds.get("PatientID", "") or ds.get("StudyInstanceUID", "") or k)).anonymize(ds)
            ds.DeidentificationMethod = METHOD
            after = _values(ds)
            changed = sorted({_keyword(p) for p in before if p not in after or after[p] != before[p]})
            flags = []
            if "PixelData" in ds:
                if burned.upper() == "YES":
                    flags.append("burned-in annotation: YES (pixels carry text; not altered)")
                elif burned.upper() != "NO":
                    flags.append("burned-in annotation not stated: the pixels may carry text")
            name = f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(os.path.join(out_dir, name), enforce_file_format=True)
            report.written.append({"file": name, "sop_class": str(ds.SOPClassUID.name), "changed": ";".join(changed),
                                   "flags": ";".join(flags)})
        except Exception as e:  # one bad file never stops the export
            report.failed += 1
            logger.warning("deidentify: input #%d could not be de-identified (%s)", k, type(e).__name__)
    report_path = report_path or os.path.join(out_dir, "deidentify_report.csv")
    with open(report_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "sop_class", "changed", "flags"])
        w.writeheader()
        w.writerows(report.written)
    logger.info("deidentify: %d written, %d not DICOM, %d failed -> %s", len(report.written), report.not_dicom,
                report.failed, out_dir)
    return report
