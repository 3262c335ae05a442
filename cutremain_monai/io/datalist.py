"""The one datalist format: MONAI-style JSON ``{"training": [...], "validation": [...], "test": [...]}``.

Each item holds ``image`` (path, relative to the datalist's folder or absolute), ``label`` (int, or a list for
multi-label), ``boxes`` (``(N, 4)`` xyxy pixels of the stored image), ``box_labels`` (``(N,)``), and optionally
``lung_mask``, ``seg_label`` (a label-map path), ``zone_scores`` (6 ints) and ``group`` (a pseudonymous key for group-wise splits). A top-level
``root`` (absolute, or relative to the datalist's folder) is the folder relative paths are resolved against
instead of the datalist's own folder: ``cutremain ingest`` writes the export root there, or its link folder of
files named by SOP Instance UID (:mod:`cutremain_monai.io.paths`), so no path under the root is written out in
full. This module adds to ``monai.data.load_decathlon_datalist`` (which resolves relative paths against one
base folder) item validation with errors naming the item, the ``root`` field, writing, and patient-wise
(group-wise) splitting.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from cutremain_monai.constants import BOX_LABELS, BOXES, DATALIST_SECTIONS, GROUP, IMAGE, LABEL, SEG_LABEL
from cutremain_monai.io.paths import PathLike

__all__ = ["DatalistError", "DatalistSectionError", "DatalistTaskError", "load_datalist", "save_datalist", "datalist_root", "validate_item", "split_by_group", "kfold_by_group", "datalist_hash", "group_keys"]


class DatalistError(ValueError):
    """A datalist that cannot be used, with the file and the reason (``.path``, ``.reason``)."""

    def __init__(self, path: PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(self.path, reason)  # (args as __init__ takes them: the error pickles across processes)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class DatalistSectionError(DatalistError, KeyError):
    """The datalist has no such section (also a ``KeyError``: callers that try every section catch it)."""


class DatalistTaskError(DatalistError):
    """The datalist has no such task (a mistyped ``datalist_task``: never taken for an empty section)."""


def validate_item(item: dict, where: str = "item") -> dict:
    """Check one datalist item; ``ValueError`` naming ``where`` and the field. Returns a normalised copy."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
    if IMAGE not in item or not isinstance(item[IMAGE], str) or not item[IMAGE]:
        raise ValueError(f"{where}: field 'image' is missing or not a path")
    out = dict(item)
    try:
        boxes = np.asarray(item.get(BOXES, []), dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{where}: field 'boxes' is not a list of [x0, y0, x1, y1] numbers ({type(e).__name__})") from e
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: field 'boxes' must be (N, 4) xyxy, got shape {boxes.shape}")
    labels = item.get(BOX_LABELS, [0] * len(boxes))
    if not isinstance(labels, list):
        raise ValueError(f"{where}: field 'box_labels' must be a list, got {type(labels).__name__}")
    if len(labels) != len(boxes):
        raise ValueError(f"{where}: field 'box_labels' has {len(labels)} entries for {len(boxes)} boxes")
    out[BOXES] = boxes.tolist()
    out[BOX_LABELS] = list(labels)
    if "zone_scores" in item:
        z = item["zone_scores"]
        if not isinstance(z, list) or len(z) != 6:
            raise ValueError(f"{where}: field 'zone_scores' must hold 6 values (zones A-F), got "
                             f"{len(z) if isinstance(z, list) else type(z).__name__}")
    for key in ("lung_mask", "gsps", SEG_LABEL):
        if key in item and item[key] is not None and not isinstance(item[key], str):
            raise ValueError(f"{where}: field '{key}' must be a path, got {type(item[key]).__name__}")
    return out


def load_datalist(path: PathLike, section: str = "training", task: str | None = None) -> list[dict]:
    """Items of ``section`` with absolute paths; ``task`` picks a sub-datalist (e.g. ``dicom_samples``' tasks)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise DatalistError(path, f"not a JSON datalist ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(data, dict):
        raise DatalistError(path, f"expected a JSON object of sections, got {type(data).__name__}")
    if isinstance(task, str) and task.strip().lower() in ("", "none", "null"):
        task = None  # `--datalist_task None` on the monai.bundle command line arrives as text (or is dropped)
    if task is not None:
        if task not in data:
            raise DatalistTaskError(path, f"no task '{task}' (have "
                                    f"{sorted(k for k, v in data.items() if isinstance(v, dict))})")
        top_root = data.get("root")
        data = data[task]
        if not isinstance(data, dict):
            raise DatalistError(path, f"task '{task}' is not an object of sections")
        if "root" not in data and top_root is not None:  # a top-level root serves every task
            data = {**data, "root": top_root}
    if section not in data:
        raise DatalistSectionError(path, f"no section '{section}'")
    if not isinstance(data[section], list):
        raise DatalistError(path, f"section '{section}' must be a list of items, got {type(data[section]).__name__}")
    base = datalist_root(path, data)
    rooted = isinstance(data.get("root"), str)
    items = []
    for i, item in enumerate(data[section]):
        try:
            item = validate_item(item, f"{section}[{i}]")
        except ValueError as e:
            raise DatalistError(path, str(e)) from e
        if rooted and "image_id" not in item:  # outputs name the file as the datalist does, not by its full path
            item["image_id"] = item[IMAGE]
        for key in (IMAGE, "lung_mask", "gsps", SEG_LABEL):
            if isinstance(item.get(key), str) and item[key] and not os.path.isabs(item[key]):
                item[key] = os.path.normpath(os.path.join(base, item[key]))
        items.append(item)
    return items


def datalist_root(path: PathLike, data: dict | None = None) -> str:
    """The folder that relative paths of the datalist at ``path`` resolve against (its ``root``, else its folder)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if data is None:
        with open(path) as f:
            data = json.load(f)
    root = data.get("root") if isinstance(data, dict) else None
    if root is None:
        return folder
    if not isinstance(root, str) or not root or "\x00" in root:
        raise DatalistError(path, f"field 'root' must be a folder path, got {type(root).__name__}")
    return os.path.normpath(os.path.join(folder, root))


def save_datalist(datalist: dict, path: PathLike, relative_to: PathLike | None = None) -> None:
    """Write ``datalist`` as JSON; absolute image paths are made relative to the file's folder when possible
    (with a ``root`` in ``datalist``, relative paths are taken as relative to it and left as they are)."""
    path = os.fspath(path)
    base = os.path.dirname(os.path.abspath(relative_to or path))
    if isinstance(datalist.get("root"), str):
        base = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), datalist["root"]))
    out = {}
    for key, value in datalist.items():
        if key in DATALIST_SECTIONS:
            items = []
            for i, item in enumerate(value):
                item = validate_item(item, f"{key}[{i}]")
                for k in (IMAGE, "lung_mask", "gsps", SEG_LABEL):
                    if isinstance(item.get(k), str) and os.path.isabs(item[k]):
                        rel = os.path.relpath(item[k], base)
                        item[k] = rel if not rel.startswith("..") else item[k]
                items.append(item)
            out[key] = items
        else:
            out[key] = value
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def group_keys(items: Sequence[dict]) -> list[str]:
    """The split group of each item: its ``group`` (a patient pseudonym), else its image path."""
    return [str(it.get(GROUP) or it[IMAGE]) for it in items]


def split_by_group(
    items: Sequence[dict], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, list[dict]]:
    """Split items into training/validation/test so that no ``group`` (patient) spans two sections."""
    if not np.isclose(sum(fractions), 1.0) or len(fractions) != 3:
        raise ValueError(f"fractions must be three numbers summing to 1, got {fractions}")
    groups = sorted(set(group_keys(items)))
    rng = np.random.default_rng(seed)
    rng.shuffle(groups)
    n = len(groups)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    assign = {g: 0 for g in groups[:n_train]}
    assign.update({g: 1 for g in groups[n_train : n_train + n_val]})
    assign.update({g: 2 for g in groups[n_train + n_val :]})
    out: dict[str, list[dict]] = {s: [] for s in DATALIST_SECTIONS}
    for it, g in zip(items, group_keys(items)):
        out[DATALIST_SECTIONS[assign[g]]].append(it)
    return out


def kfold_by_group(items: Sequence[dict], folds: int = 5, seed: int = 0) -> list[tuple[list[dict], list[dict]]]:
    """``folds`` (train, held-out) pairs; every group is held out exactly once, never split across the two."""
    groups = sorted(set(group_keys(items)))
    if folds < 2 or folds > len(groups):
        raise ValueError(f"folds must be in 2..{len(groups)} (number of groups), got {folds}")
    rng = np.random.default_rng(seed)
    rng.shuffle(groups)
    fold_of = {g: i % folds for i, g in enumerate(groups)}
    gs = group_keys(items)
    return [
        ([it for it, g in zip(items, gs) if fold_of[g] != k], [it for it, g in zip(items, gs) if fold_of[g] == k])
        for k in range(folds)
    ]


def datalist_hash(items: Iterable[dict]) -> str:
    """A short SHA-256 of the items' image paths, labels and boxes (logged to MLflow to identify the data)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([os.path.basename(it[IMAGE]), it.get(LABEL), it.get(BOXES)], sort_keys=True).encode())
    return h.hexdigest()[:16]
