"""Near-duplicate radiographs: find them, and keep them on one side of every split.

Public X-ray collections (the Cohen COVID collection behind ``../shared/data/covid`` among them) hold some
radiographs twice, under other file names and sometimes other patient ids, resized, recompressed or re-windowed.
A patient-wise split then still leaks: the same image can sit in training and in test. This module adds what
MONAI and scikit-image lack for that: a fingerprint per image (a 32x32 area-averaged thumbnail, z-normalised, so
resizing, recompression and linear changes of brightness / contrast barely move it), all pairs whose thumbnail
correlation reaches a threshold (an inverted copy counts: ``|r|``), and a union-find that merges the split
``group`` of items that are near-duplicates, so that ``split_by_group`` / ``kfold_by_group`` keep them together.

The fingerprint is a 32x32 area-averaged thumbnail minus its 3x3 local mean (a high-pass: the silhouette that all
chest or pelvis films share cancels, the anatomy that tells two patients apart stays), z-normalised; at 32 px a
copy shifted by a few pixels still matches. Measured with it on the real X-rays in ``../shared/data``:

- covid (98 Brixia-scored + 253 lung-mask images, 61,425 pairs): six pairs are the same radiograph, ``r >= 0.907``
  (five at ``r >= 0.999`` join patient ids 97/178 and 78/201); the next pair, two films of one patient, ``0.707``;
- FracAtlas (145 readable): three pairs are the same radiograph re-exported (``1.0``, ``0.897``, ``0.895``; all in
  the hip set), the next, one patient's two different films, ``0.525``;
- NIH (71 patients): highest ``0.666``.
- FracAtlas, all 1,899 readable films (1.8 million pairs): 11 pairs at ``r >= 0.99`` (re-exports), then a thin tail
  (7 pairs in 0.92-0.99) and 824 pairs in 0.85-0.92 that are *different* patients' hand / forearm / leg films
  sharing the detector's dark background and stripe pattern (looked at). At 0.85 they chain 50 of the 81 blocks into
  one group of 1,116 images; the importer's FracAtlas default is therefore 0.97.

The default threshold 0.85 sits in that gap (a plain 32x32 thumbnail put different NIH patients at 0.947 and
missed shifted copies). Synthetic phantoms built from one template (``dicom_samples`` pelvis) are near-duplicates
by this measure, as they are. Crops and flips are not detected.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from cutremain_monai.io.datalist import group_keys
from cutremain_monai.io.decode import decode_xray

__all__ = ["THUMB", "DEFAULT_THRESHOLD", "thumbnail", "fingerprints", "near_duplicate_pairs",
           "merge_near_duplicate_groups", "drop_near_duplicates_of", "group_near_duplicates_for_split"]

logger = logging.getLogger(__name__)
THUMB = 32
DEFAULT_THRESHOLD = 0.85
_BLOCK = 4096


def _bins(n: int, out: int) -> list[tuple[int, int]]:
    """The ``out`` input ranges of adaptive average pooling over ``n`` (torch's ``adaptive_avg_pool2d``: bin ``i``
    spans ``floor(i n / out)`` to ``ceil((i + 1) n / out)``; bins overlap, or repeat pixels, when ``out`` does not
    divide ``n``)."""
    return [(i * n // out, -(-(i + 1) * n // out)) for i in range(out)]


def _local_mean_3x3(a: np.ndarray) -> np.ndarray:
    """Mean of each 3x3 neighbourhood, the pixels outside the image not counted (``avg_pool2d(a, 3, 1, 1,
    count_include_pad=False)``)."""
    h, w = a.shape
    padded, ones = np.pad(a, 1), np.pad(np.ones_like(a), 1)
    total, count = np.zeros_like(a), np.zeros_like(a)
    for dy in range(3):
        for dx in range(3):
            total += padded[dy : dy + h, dx : dx + w]
            count += ones[dy : dy + h, dx : dx + w]
    return total / count


def thumbnail(image) -> np.ndarray:
    """``(H, W)`` or ``(1, H, W)`` image -> ``(THUMB*THUMB,)`` float32: area-averaged to 32x32 (as torch's
    ``adaptive_avg_pool2d``), minus its 3x3 local mean, z-normalised (a constant image gives zeros, which matches
    nothing). In numpy (float64), so ingest and the importers run without torch."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"thumbnail needs a 2D image, got shape {tuple(a.shape)}")
    rows = np.stack([a[s:e].mean(axis=0, dtype=np.float64) for s, e in _bins(a.shape[0], THUMB)])  # (THUMB, W)
    small = np.stack([rows[:, s:e].mean(axis=1) for s, e in _bins(a.shape[1], THUMB)], axis=1)  # (THUMB, THUMB)
    small = (small - _local_mean_3x3(small)).reshape(-1)
    small = small - small.mean()
    norm = float(np.linalg.norm(small))
    return (small / norm if norm > 1e-12 else small).astype(np.float32)


def fingerprints(items: Sequence[dict], key: str = "image") -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Thumbnails of the items' images: ``(n_read, THUMB*THUMB)``, the indices of the items read, and the
    ``(path, reason)`` of those that could not be read (set aside by the caller, never silently dropped)."""
    rows, read, bad = [], [], []
    for i, it in enumerate(items):
        path = it[key]
        try:
            rows.append(thumbnail(decode_xray(os.fspath(path))[0]))
            read.append(i)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported with its reason
            bad.append((str(path), f"{type(e).__name__}: {e}"))
    thumbs = np.stack(rows) if rows else np.zeros((0, THUMB * THUMB), np.float32)
    return thumbs, read, bad


def near_duplicate_pairs(a: np.ndarray, b: np.ndarray | None = None,
                         threshold: float = DEFAULT_THRESHOLD) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, r)`` with ``|r| >= threshold`` between the rows of ``a`` and of ``b`` (``b=None``: within
    ``a``, ``i < j``). Rows are unit vectors from :func:`thumbnail`, so ``r`` is a dot product; blocks of 4096
    rows keep the memory bounded whatever the number of images."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    same = b is None
    b = a if same else b
    out = []
    for s in range(0, len(a), _BLOCK):
        r = a[s : s + _BLOCK] @ b.T
        ii, jj = np.nonzero(np.abs(r) >= threshold)
        for i, j in zip(ii.tolist(), jj.tolist()):
            if not same or s + i < j:
                out.append((s + i, j, float(r[i, j])))
    return out


def _find(parent: dict, x):
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def merge_near_duplicate_groups(items: Sequence[dict], threshold: float = DEFAULT_THRESHOLD
                                ) -> tuple[list[dict], list[dict], list[tuple[str, str]]]:
    """Items with the ``group`` of near-duplicates merged (the smallest group key of a merged set wins, an item's
    own group key before an image path, so keys stay pseudonymous and stable), the pairs found (file names and
    ``r``; no patient ids), and the unreadable files (their items keep their own group). Items without a group
    count as their own group (their path), as in ``split_by_group``."""
    key, group_key = "image", "group"
    items = [dict(it) for it in items]
    groups = group_keys(items)
    explicit = {str(it[group_key]) for it in items if it.get(group_key)}
    rank = {g: (g not in explicit, g) for g in groups}  # a real group key wins over an image path
    thumbs, read, bad = fingerprints(items, key)
    parent = {g: g for g in groups}
    pairs = []
    for i, j, r in near_duplicate_pairs(thumbs, threshold=threshold):
        a, b = read[i], read[j]
        pairs.append({"image_a": os.path.basename(str(items[a][key])), "image_b": os.path.basename(str(items[b][key])),
                      "r": round(r, 5), "same_group_before": groups[a] == groups[b]})
        ra, rb = _find(parent, groups[a]), _find(parent, groups[b])
        if ra != rb:
            keep, drop = sorted((ra, rb), key=rank.__getitem__)
            parent[drop] = keep
    for it, g in zip(items, groups):
        it[group_key] = _find(parent, g)
    merged = sum(1 for p in pairs if not p["same_group_before"])
    logger.info("near-duplicates: %d pairs (r >= %.3f), %d across groups, %d groups -> %d", len(pairs), threshold,
                merged, len(set(groups)), len({it[group_key] for it in items}))
    return items, pairs, bad


def drop_near_duplicates_of(pool: Sequence[dict], held: Sequence[dict], threshold: float = DEFAULT_THRESHOLD,
                            key: str = "image") -> tuple[list[dict], list[tuple[str, str]]]:
    """``pool`` without the items that near-duplicate an item of ``held`` (for example unlabelled images that
    are copies of validation / test images), and ``(path, reason)`` for each item left out. Unreadable pool items
    are kept here (whoever reads them next sets them aside with the reader's error)."""
    if not pool or not held:
        return list(pool), []
    tp, read_p, _ = fingerprints(pool, key)
    th, read_h, _ = fingerprints(held, key)
    hits: dict[int, tuple[int, float]] = {}
    for i, j, r in near_duplicate_pairs(tp, th, threshold=threshold):
        hits.setdefault(read_p[i], (read_h[j], r))
    kept = [it for n, it in enumerate(pool) if n not in hits]
    left_out = [(str(pool[n][key]), f"near-duplicate of held-out image {os.path.basename(str(held[h][key]))} "
                 f"(r={r:.4f})") for n, (h, r) in sorted(hits.items())]
    return kept, left_out


def group_near_duplicates_for_split(items: Sequence[dict], threshold: float, datalist_path: str
                                    ) -> tuple[list[dict], dict, list[tuple[str, str]]]:
    """:func:`merge_near_duplicate_groups` for a datalist about to be split: also writes the pairs found to
    ``<datalist stem>.near_duplicates.csv`` and returns a summary (pairs, threshold, groups before -> after,
    report path) for the datalist's log, plus the unreadable files."""
    import csv


    merged, pairs, bad = merge_near_duplicate_groups(items, threshold)
    report = os.path.splitext(datalist_path)[0] + ".near_duplicates.csv"
    os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
    with open(report, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image_a", "image_b", "r", "same_group_before"])
        w.writeheader()
        w.writerows(pairs)
    summary = {"near_duplicate_pairs": len(pairs), "near_duplicate_threshold": threshold,
               "groups": f"{len(set(group_keys(items)))} -> {len(set(group_keys(merged)))}",
               "near_duplicate_report": report}
    return merged, summary, bad
