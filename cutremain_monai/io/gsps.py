"""Boxes stored in DICOM Grayscale Softcopy Presentation State (GSPS) objects, the way many PACS export them.

Reading (pydicom): every closed POLYLINE / INTERPOLATED graphic object (first point equals last, or four or more
corner points), and the non-standard ``RECTANGLE`` type some viewers write, becomes the bounding box of its points
in the stored-image pixel frame. The box label is the text of a text object in the same Graphic Annotation item
when there is exactly one, otherwise the Graphic Layer name. ``DISPLAY`` units (0..1 of the displayed area) are
scaled to pixels with the image's Columns/Rows.

Writing (highdicom ``GrayscaleSoftcopyPresentationState``): one closed 5-point POLYLINE (the standard way to draw
a rectangle; PS3.3 C.10.5 has no RECTANGLE type) and one text object per box, in PIXEL units whose origin is the
top-left corner of the top-left pixel, the same frame as our ``xyxy`` boxes, so no half-pixel shift is needed.
Patient and study attributes are copied from the referenced image by highdicom, as the IOD requires.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cutremain_monai.io.boxes import validate_boxes
from cutremain_monai.io.dicom import element_value, DicomReadError, read_dataset
from cutremain_monai.io.paths import PathLike

__all__ = ["GSPS_SOP_CLASS_UID", "is_gsps", "gsps_referenced_sop_uids", "read_gsps_boxes", "read_gsps_file", "write_box_gsps"]

GSPS_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.11.1"
_LAYER = "BOXES"


def is_gsps(ds) -> bool:
    return str(ds.get("SOPClassUID", "")) == GSPS_SOP_CLASS_UID


def gsps_referenced_sop_uids(ds) -> list[str]:
    """SOP Instance UIDs of the images a presentation state applies to (Presentation State Relationship module)."""
    uids = []
    for series in ds.get("ReferencedSeriesSequence", []):
        for item in series.get("ReferencedImageSequence", []):
            uids.append(str(item.ReferencedSOPInstanceUID))
    return uids


def _closed_polygon_box(points: np.ndarray, graphic_type: str) -> np.ndarray | None:
    if graphic_type == "RECTANGLE" and len(points) >= 2:
        pass
    elif graphic_type in ("POLYLINE", "INTERPOLATED"):
        closed = len(points) >= 3 and np.allclose(points[0], points[-1])
        if not closed and len(points) < 4:
            return None  # an open line (a measurement, an arrow) is not a region
    else:
        return None
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    return np.asarray([x0, y0, x1, y1], dtype=np.float32)


def read_gsps_file(path: PathLike, image_size: dict[str, tuple[int, int]] | None = None, dataset=None) -> dict[str, list[tuple[np.ndarray, str]]]:
    """:func:`read_gsps_boxes` of the file ``path``; anything unreadable in it (not DICOM, truncated, a corrupt
    element, a malformed graphic) is a :class:`~cutremain_monai.io.dicom.DicomReadError` naming the file and the
    reason."""
    ds = read_dataset(path) if dataset is None else dataset
    try:
        return read_gsps_boxes(ds, image_size)
    except Exception as e:
        raise DicomReadError(path, f"presentation state unreadable ({type(e).__name__}: {e})") from e


def read_gsps_boxes(ds, image_size: dict[str, tuple[int, int]] | None = None) -> dict[str, list[tuple[np.ndarray, str]]]:
    """Boxes per referenced image: ``{sop_instance_uid: [(xyxy, label), ...]}``.

    An annotation item without its own Referenced Image Sequence applies to every image the presentation state
    references. ``image_size`` maps SOP Instance UID to ``(rows, columns)`` and is needed only for DISPLAY units.
    """
    all_refs = gsps_referenced_sop_uids(ds)
    out: dict[str, list[tuple[np.ndarray, str]]] = {uid: [] for uid in all_refs}
    for ann in ds.get("GraphicAnnotationSequence", []):
        refs = [str(r.ReferencedSOPInstanceUID) for r in ann.get("ReferencedImageSequence", [])] or all_refs
        texts = [str(t.get("UnformattedTextValue", "")) for t in ann.get("TextObjectSequence", [])]
        label = texts[0] if len(texts) == 1 else str(ann.get("GraphicLayer", ""))
        for obj in ann.get("GraphicObjectSequence", []):
            data = obj.get("GraphicData")
            if data is None or len(data) < 4:
                continue
            points = np.asarray([float(v) for v in data], dtype=np.float64).reshape(-1, 2)
            box = _closed_polygon_box(points, str(obj.get("GraphicType", "")).upper())
            if box is None:
                continue
            for uid in refs:
                b = box.copy()
                if str(obj.get("GraphicAnnotationUnits", "PIXEL")).upper() == "DISPLAY":
                    if not image_size or uid not in image_size:
                        continue
                    rows, cols = image_size[uid]
                    b = b * np.asarray([cols, rows, cols, rows], dtype=np.float32)
                out.setdefault(uid, []).append((b, label))
    return out


def write_box_gsps(
    image_ds,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str],
    path: PathLike | None = None,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
    content_label: str = "BOXES",
    sop_instance_uid: str | None = None,
    texts: Sequence[str] | None = None,
    layer_name: str = _LAYER,
    content_description: str = "Region annotations (boxes)",
    series_number: int = 900,
    series_description: str | None = None,
    manufacturer: str = "cutremain_monai",
    model_name: str = "cutremain_monai",
    software_version: str = "0.1.0",
):
    """A GSPS that draws ``boxes`` (xyxy, stored-image pixels) with their ``labels`` on ``image_ds``; ``texts``
    (default: the labels) are the text objects shown at each box's corner, on the graphic layer ``layer_name``.

    Returns the ``highdicom`` dataset, also saved to ``path`` when given. The window of the image (if any) is
    carried over as the softcopy VOI LUT so a viewer shows the image as the annotator saw it.
    """
    import highdicom as hd  # here, not at module load: readers of presentation states (every ingest worker) do not need it
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(labels) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    texts = list(labels if texts is None else texts)
    if len(texts) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(texts)} texts")
    # GSPS graphic data must lie inside the image: clip (or drop) with a warning naming the image
    kept, idx, _ = validate_boxes(boxes, (int(image_ds.Rows), int(image_ds.Columns)), np.arange(len(boxes)),
                                  source=str(image_ds.get("SOPInstanceUID", "image")))
    boxes, texts = kept.astype(np.float64), [texts[int(i)] for i in idx]
    layer = hd.pr.GraphicLayer(layer_name=layer_name, order=1, description="region annotations")
    annotations = []
    for (x0, y0, x1, y1), label in zip(boxes, texts):
        corners = np.asarray([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)
        graphic = hd.pr.GraphicObject(graphic_type="POLYLINE", graphic_data=corners, units="PIXEL")
        text = hd.pr.TextObject(
            text_value=str(label), units="PIXEL", anchor_point=(float(x0), float(y0)), anchor_point_visible=False
        )
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[image_ds], graphic_layer=layer, graphic_objects=[graphic], text_objects=[text]
            )
        )
    voi = None
    if "WindowCenter" in image_ds and "WindowWidth" in image_ds:
        wc, ww = element_value(image_ds.WindowCenter), element_value(image_ds.WindowWidth)
        voi = [hd.pr.SoftcopyVOILUTTransformation(window_center=wc, window_width=ww)]
    # MONOCHROME1 (most CR): the presentation LUT inverts, or a conforming viewer shows the image negative
    inverse = str(image_ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"
    presentation = hd.PresentationLUTTransformation(presentation_lut_shape="INVERSE") if inverse else None
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[image_ds],
        presentation_lut_transformation=presentation,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=model_name[:64],
        software_versions=str(software_version)[:64],
        device_serial_number="0",
        content_label=content_label,
        content_description=content_description[:64],
        graphic_annotations=annotations,
        graphic_layers=[layer],
        voi_lut_transformations=voi,
    )
    # highdicom stamps "now"; take the image's date and time instead so a regenerated set is byte-identical
    date, time_ = str(image_ds.get("ContentDate", "") or ""), str(image_ds.get("ContentTime", "") or "")
    if date and time_:
        for kw in ("ContentDate", "PresentationCreationDate", "InstanceCreationDate", "SeriesDate"):
            if kw in gsps:
                setattr(gsps, kw, date)
        for kw in ("ContentTime", "PresentationCreationTime", "InstanceCreationTime", "SeriesTime"):
            if kw in gsps:
                setattr(gsps, kw, time_)
        for item in gsps.get("ContributingEquipmentSequence", []):
            if "ContributionDateTime" in item:
                item.ContributionDateTime = date + time_
    if series_description:
        gsps.SeriesDescription = series_description[:64]
    if "Laterality" not in gsps:
        gsps.Laterality = None  # General Series type 2C: present and empty when the image has no R/L laterality
    if path is not None:
        gsps.save_as(str(path), enforce_file_format=True)
    return gsps
