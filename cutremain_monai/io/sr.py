"""Findings out and boxes in as DICOM Comprehensive SR: the TID 1500 measurement report.

What this adds to highdicom (which builds and validates the content tree): the shape of a classifier's answer
for an X-ray, made once, so every bundle answers the same way:

* the observer is the model as a *device*: the bundle's name and version, the model's name and its registry
  version (TID 1004), and the algorithm identification (TID 4019) on every group;
* the procedure reported is plain radiography of the source image, which the report references;
* one measurement group per finding (TID 1501) with its probability (DCM 122157 "Probability", UCUM ``%``);
  a finding that is localised is a planar ROI group (TID 1410) whose region is the predicted box, a closed
  POLYLINE on the source image, carrying the same probability;
* patient and study modules come from the source image (highdicom copies them from the evidence), and nothing
  else of it: the PACS files the report with the study.

Reading (:func:`read_sr_findings`, :func:`read_sr_boxes`) walks any SR's content tree, not only ours: every
SCOORD POLYLINE / POLYGON region that references an image becomes a box (its bounding rectangle) labelled with
its group's finding, as :func:`cutremain_monai.io.gsps.read_gsps_boxes` does for presentation states, so
``cutremain ingest --sr`` pairs SR boxes with their images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cutremain_monai.io.boxes import validate_boxes
from cutremain_monai.io.dicom import DicomReadError, drop_source_equipment, read_dataset

__all__ = ["Finding", "ModelDevice", "write_findings_sr", "read_sr_findings", "read_sr_boxes", "read_sr_file",
           "is_sr", "SR_SOP_CLASS_UIDS", "finding_code", "evidence_references", "is_model_output"]

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SR_SOP_CLASS_UIDS = frozenset([
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    COMPREHENSIVE_SR,
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
])
PRIVATE_SCHEME = "99CUTREMAIN"  # our own codes (PS3.16 8.2: private coding schemes start with 99)
# findings with a SNOMED CT code; others get a code of the private scheme
_KNOWN = {
    "fracture": ("125605004", "SCT", "Fracture of bone"),
    "lesion": ("52988006", "SCT", "Lesion"),
    "pneumothorax": ("36118008", "SCT", "Pneumothorax"),
    "effusion": ("60046008", "SCT", "Pleural effusion"),
    "cardiomegaly": ("8186001", "SCT", "Cardiomegaly"),
    "nodule": ("27925004", "SCT", "Nodule"),
    "mass": ("4147007", "SCT", "Mass"),
    "pneumonia": ("233604007", "SCT", "Pneumonia"),
}


@dataclass
class Finding:
    """One answer of the model for an image: ``name`` (a class name), ``probability`` in [0, 1], and ``box``
    (xyxy, stored-image pixels) when the finding is localised; or, with ``score`` (and ``probability`` None), a
    score such as COVID severity's global Brixia score (unit ``{score}``)."""
    name: str
    probability: float | None
    box: Sequence[float] | None = None
    score: float | None = None


@dataclass
class ModelDevice:
    """The model as the SR's observer: bundle name and version, model name, registry version (when registered)."""
    bundle: str
    version: str
    model_name: str
    registry_version: str | None = None
    manufacturer: str = "cutremain_monai"

    @property
    def label(self) -> str:
        reg = f" (registry v{self.registry_version})" if self.registry_version else ""
        return f"{self.bundle} {self.version}, model {self.model_name}{reg}"


def finding_code(name: str):
    """The coded concept of a finding: SNOMED CT where we know one, else ``99CUTREMAIN`` with the name."""
    import highdicom as hd

    value, scheme, meaning = _KNOWN.get(name.strip().lower(), (None, None, None))
    if value is None:
        value = "".join(c for c in name.upper() if c.isalnum() or c == "_")[:16] or "FINDING"
        scheme, meaning = PRIVATE_SCHEME, name[:64] or "finding"
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _device_uid(device: ModelDevice) -> str:
    import pydicom

    return pydicom.uid.generate_uid(entropy_srcs=[device.bundle, device.version, device.model_name,
                                                  str(device.registry_version)])


def write_findings_sr(
    image_ds,
    findings: Sequence[Finding],
    device: ModelDevice,
    path: str | os.PathLike | None = None,
    series_number: int = 901,
    series_description: str = "cutremain findings",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    other_evidence: Sequence = (),
):
    """A Comprehensive SR (TID 1500) with ``findings`` for ``image_ds`` (the source image's header is enough);
    returned, and saved to ``path`` when given. ``other_evidence``: the results the report belongs with (our
    Secondary Capture, presentation state, Segmentation of the same image: datasets, or ``(SOP Class UID, SOP
    Instance UID, Series Instance UID)``), listed in its Pertinent Other Evidence Sequence (PS3.3 C.17.2, the
    hierarchical SOP instance reference macro), so a viewer finds them from the report."""
    import highdicom as hd
    from pydicom.sr.codedict import codes


    if not findings:
        raise ValueError("an SR needs at least one finding")
    rows, cols = int(image_ds.Rows), int(image_ds.Columns)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_device_uid(device), name=f"{device.bundle} {device.version}"[:64],
            manufacturer_name=device.manufacturer, model_name=device.model_name[:64],
            serial_number=str(device.registry_version or "unregistered")))
    algorithm = hd.sr.AlgorithmIdentification(name=device.model_name[:64], version=str(device.registry_version or device.version),
                                              manufacturer=device.manufacturer)
    groups = []
    for i, f in enumerate(findings):
        if f.score is not None:
            if not np.isfinite(float(f.score)):
                raise ValueError(f"finding {f.name!r}: score must be a number, got {f.score}")
            measurement = hd.sr.Measurement(
                name=hd.sr.CodedConcept(value="SCORE", scheme_designator=PRIVATE_SCHEME, meaning="Severity score"),
                value=round(float(f.score), 4), algorithm_id=algorithm,
                unit=hd.sr.CodedConcept(value="{score}", scheme_designator="UCUM", meaning="score"))
        else:
            p = float("nan") if f.probability is None else float(f.probability)
            if not np.isfinite(p) or not 0.0 <= p <= 1.0:
                raise ValueError(f"finding {f.name!r}: probability must be in [0, 1], got {f.probability}")
            measurement = hd.sr.Measurement(name=codes.DCM.Probability, value=round(100.0 * p, 4),
                                            unit=codes.UCUM.Percent, algorithm_id=algorithm)
        tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{f.name} {i + 1}")
        common = dict(tracking_identifier=tracking, finding_type=finding_code(f.name), algorithm_id=algorithm,
                      measurements=[measurement])
        if f.box is not None:
            kept, _, _ = validate_boxes(np.asarray([f.box], dtype=np.float64), (rows, cols), np.arange(1),
                                        source=str(image_ds.get("SOPInstanceUID", "image")))
            if len(kept):
                x0, y0, x1, y1 = (float(v) for v in kept[0])
                region = hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=np.asarray([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64),
                    source_image=hd.sr.SourceImageForRegion.from_source_image(image_ds))
                groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common))
                continue
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(image_ds)], **common))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept(value="168537006", scheme_designator="SCT",
                                              meaning="Plain radiography"),
        imaging_measurements=groups)
    sr = hd.sr.ComprehensiveSR(
        evidence=[image_ds], content=report[0], series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number, sop_instance_uid=sop_instance_uid or hd.UID(), instance_number=instance_number,
        manufacturer=device.manufacturer, is_complete=True, is_final=False, is_verified=False,
        series_description=series_description[:64])
    drop_source_equipment(sr)  # (highdicom records the source's acquisition equipment in the SR)
    sr.ManufacturerModelName = device.model_name[:64]
    sr.SoftwareVersions = str(device.version)[:64]
    if any(s == PRIVATE_SCHEME for s in _schemes(sr)):
        from pydicom.dataset import Dataset

        item = Dataset()
        item.CodingSchemeDesignator = PRIVATE_SCHEME
        item.CodingSchemeName = "cutremain_monai finding codes"
        item.CodingSchemeResponsibleOrganization = "cutremain_monai"
        sr.CodingSchemeIdentificationSequence = [item]
    if other_evidence:
        sr.PertinentOtherEvidenceSequence = evidence_references(str(sr.StudyInstanceUID), other_evidence)
    if path is not None:
        sr.save_as(os.fspath(path), enforce_file_format=True)
    return sr


def evidence_references(study_uid: str, objects: Sequence):
    """The hierarchical SOP instance reference of ``objects`` (datasets or ``(class, instance, series)`` UIDs) in
    study ``study_uid``: one study item, one item per series, one per instance."""
    from pydicom.dataset import Dataset

    series: dict[str, list[tuple[str, str]]] = {}
    for obj in objects:
        if isinstance(obj, (tuple, list)):
            sop_class, sop_uid, series_uid = (str(v) for v in obj)
        else:
            sop_class, sop_uid, series_uid = str(obj.SOPClassUID), str(obj.SOPInstanceUID), str(obj.SeriesInstanceUID)
        series.setdefault(series_uid, []).append((sop_class, sop_uid))
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.ReferencedSeriesSequence = []
    for series_uid, sops in series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedSOPSequence = []
        for sop_class, sop_uid in sops:
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = sop_uid
            item.ReferencedSOPSequence.append(ref)
        study.ReferencedSeriesSequence.append(item)
    return [study]


def is_model_output(ds, manufacturer: str = "cutremain_monai") -> bool:
    """Whether ``ds`` (an SR or a presentation state) is a model's answer written by this project, not a person's
    annotation: a presentation state whose content label is ``AI_FINDINGS`` (the boxes of ``--dicom-out``; the
    annotation states of the synthetic samples are labelled ``BOXES``), or an SR whose Manufacturer or device
    observer's manufacturer is ours."""
    if str(ds.get("ContentLabel", "")) == "AI_FINDINGS":
        return True
    if not is_sr(ds):
        return False
    if str(ds.get("Manufacturer", "")) == manufacturer:
        return True
    for item in _walk(ds.get("ContentSequence", [])):
        if str(item.get("ValueType", "")) == "TEXT" and str(item.get("TextValue", "")) == manufacturer and \
                _meaning(item, "ConceptNameCodeSequence").lower().startswith("device observer manufacturer"):
            return True
    return False


def _schemes(ds):
    for item in _walk(ds.get("ContentSequence", [])):
        for key in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            for code in item.get(key, []):
                yield str(code.get("CodingSchemeDesignator", ""))


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def is_sr(ds) -> bool:
    return str(ds.get("SOPClassUID", "")) in SR_SOP_CLASS_UIDS


def _meaning(item, key: str) -> str:
    seq = item.get(key, [])
    return str(seq[0].get("CodeMeaning", "")) if seq else ""


def _value(item, key: str) -> str:
    seq = item.get(key, [])
    return str(seq[0].get("CodeValue", "")) if seq else ""


_NAME_OF = {(v, s): name for name, (v, s, _) in _KNOWN.items()}


def _group_finding(group) -> str:
    """The finding of a measurement group: its "Finding" (DCM 121071) code, as our class name where we wrote it
    (the table above, or the private scheme's meaning), else the code's meaning, else the tracking id."""
    tracking = ""
    for item in group.get("ContentSequence", []):
        name = _value(item, "ConceptNameCodeSequence")
        if name == "121071":  # Finding
            seq = item.get("ConceptCodeSequence", [])
            key = (str(seq[0].get("CodeValue", "")), str(seq[0].get("CodingSchemeDesignator", ""))) if seq else None
            return _NAME_OF.get(key) or _meaning(item, "ConceptCodeSequence")
        if name == "112039" and not tracking:  # Tracking Identifier
            tracking = str(item.get("TextValue", ""))
    return tracking


def _group_num(group, code: str) -> tuple[float, str] | None:
    """(value, UCUM unit) of the group's first NUM item named ``code``."""
    for item in _walk(group.get("ContentSequence", [])):
        if item.get("ValueType") == "NUM" and _value(item, "ConceptNameCodeSequence") == code:
            mv = item.get("MeasuredValueSequence", [])
            if mv:
                return float(mv[0].NumericValue), _value(mv[0], "MeasurementUnitsCodeSequence")
    return None


def _group_score(group) -> float | None:
    found = _group_num(group, "SCORE")
    return None if found is None else found[0]


def _group_probability(group) -> float | None:
    found = _group_num(group, "122157")  # DCM Probability
    if found is None:
        return None
    value, unit = found
    return value / 100.0 if unit == "%" else value


def _regions(group):
    """(referenced SOP Instance UID, points (N, 2) column/row) of the group's SCOORD regions."""
    for item in _walk(group.get("ContentSequence", [])):
        if item.get("ValueType") != "SCOORD" or str(item.get("GraphicType", "")).upper() not in ("POLYLINE", "POLYGON"):
            continue
        data = [float(v) for v in item.get("GraphicData", [])]
        if len(data) < 6 or len(data) % 2:
            continue
        for ref in item.get("ContentSequence", []):
            for sop in ref.get("ReferencedSOPSequence", []):
                yield str(sop.ReferencedSOPInstanceUID), np.asarray(data, dtype=np.float64).reshape(-1, 2)


def read_sr_findings(ds) -> list[dict]:
    """Every measurement group of an SR: ``{"finding", "probability" (0-1 or None), "image" (SOP Instance UID of
    its region's image, or None), "box" (xyxy or None)}``, in document order."""
    out = []
    for item in _walk(ds.get("ContentSequence", [])):
        if item.get("ValueType") != "CONTAINER" or _value(item, "ConceptNameCodeSequence") != "125007":  # Measurement Group
            continue
        regions = list(_regions(item))
        row = {"finding": _group_finding(item), "probability": _group_probability(item), "image": None, "box": None}
        score = _group_score(item)
        if score is not None:
            row["score"] = score
        if regions:
            uid, pts = regions[0]
            row["image"] = uid
            row["box"] = [float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())]
        out.append(row)
    return out


def read_sr_boxes(ds) -> dict[str, list[tuple[np.ndarray, str]]]:
    """Boxes per referenced image, ``{sop_instance_uid: [(xyxy, label), ...]}`` (the shape of
    :func:`cutremain_monai.io.gsps.read_gsps_boxes`): the bounding rectangle of each POLYLINE / POLYGON region."""
    out: dict[str, list[tuple[np.ndarray, str]]] = {}
    for item in _walk(ds.get("ContentSequence", [])):
        if item.get("ValueType") != "CONTAINER" or _value(item, "ConceptNameCodeSequence") != "125007":
            continue
        label = _group_finding(item)
        for uid, pts in _regions(item):
            box = np.asarray([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()], dtype=np.float64)
            out.setdefault(uid, []).append((box, label))
    return out


def sr_referenced_sop_uids(ds) -> list[str]:
    """SOP Instance UIDs of the images the SR's regions reference."""
    return sorted({uid for item in _walk(ds.get("ContentSequence", [])) for uid, _ in _regions_of_item(item)})


def _regions_of_item(item):
    if item.get("ValueType") == "CONTAINER" and _value(item, "ConceptNameCodeSequence") == "125007":
        yield from _regions(item)


def read_sr_file(path, dataset=None) -> dict[str, list[tuple[np.ndarray, str]]]:
    """:func:`read_sr_boxes` of the file ``path``; anything unreadable is a
    :class:`~cutremain_monai.io.dicom.DicomReadError` naming the file and the reason."""
    ds = read_dataset(path) if dataset is None else dataset
    try:
        sr = is_sr(ds)  # (a corrupt SOP Class UID element fails here: found by fuzzing)
    except Exception as e:
        raise DicomReadError(path, f"structured report unreadable ({type(e).__name__})") from None
    if not sr:
        raise DicomReadError(path, "not a structured report")
    try:
        return read_sr_boxes(ds)
    except Exception as e:
        raise DicomReadError(path, f"structured report unreadable ({type(e).__name__})") from None
