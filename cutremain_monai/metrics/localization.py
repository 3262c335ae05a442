"""Localisation metrics of saliency maps (CAM, Grad-CAM, LRP, Nakamura's patch maps) against ground-truth boxes.

Pure functions: maps and boxes in (numpy, or torch tensors, converted), numbers / arrays / dicts out. They
implement the box metrics of METHODS.md sections 4 and 5: the energy share inside the boxes (Score-CAM's
energy-based pointing game), the pointing game (CheXlocalize's hit rate, per class), box accuracy by IoU or IoBB
at map thresholds (ChestX-ray8), wsolevaluation's MaxBoxAcc (v1) and the Loc. Acc. of the background-learning
seed (Nakamura et al. 2023), with a validation-only choice of the map threshold.

What this adds to the libraries: ``monai.metrics`` scores segmentation masks, classifiers and detections (Dice,
MeanIoU of masks, ROC AUC, FROC, ...) and ``monai.visualize`` computes CAMs, but MONAI has nothing that turns a
saliency map into a box or scores a map against boxes; wsolevaluation (Choe et al. CVPR 2020) is not a package and
is tied to OpenCV and its dataset loaders. Connected components come from scikit-image
(``skimage.measure.label``). ``monai.data.box_utils.box_iou`` uses the same continuous box
convention but computes in float32 and adds an epsilon to the union, so an IoU of exactly 0.5 falls just below
0.5; overlaps here are computed in float64 so that thresholds at exact equality behave as written.

Conventions (README "Conventions"):

* maps are ``(H, W)``, ``(B, H, W)`` or ``(B, 1, H, W)``, row 0 at the top; they must be finite.
* boxes are given per image: a sequence of ``B`` arrays of shape ``(N_i, 4)`` (``N_i`` may be 0), ``xyxy`` in
  pixels, origin at the top-left corner of the top-left pixel, so pixel ``(r, c)`` covers
  ``[c, c + 1] x [r, r + 1]``; for a single ``(H, W)`` map one ``(N, 4)`` array is accepted.
* a pixel ``(r, c)`` is *inside* a box when its centre is: ``x0 <= c + 0.5 <= x1`` and ``y0 <= r + 0.5 <= y1``
  (edges inclusive). The integer box ``(0, 0, W, H)`` covers the whole map.
* box areas are continuous, ``(x1 - x0) * (y1 - y0)`` (no "+1" as in wsolevaluation's inclusive-pixel code).
* maps and boxes at different sizes: pass ``image_size=(H_img, W_img)`` of the image the boxes refer to; boxes
  are checked against that size and then scaled to the map grid (x by ``W / W_img``, y by ``H / H_img``); no map
  is resampled. IoU and IoBB do not change under this scaling; the pointing game and the energy share are then
  scored at map resolution. To follow CheXlocalize (map upsampled bilinearly to the image first), upsample the
  maps yourself (e.g. ``monai.transforms.Resize``) and leave ``image_size`` as None. With ``image_size=None``
  boxes must lie inside the map; a box outside the frame (``x0 < 0``, ``y0 < 0``, ``x1 > W`` or ``y1 > H``) or
  with ``x1 < x0`` / ``y1 < y0`` raises ``ValueError`` naming the shapes.
* images without boxes are not scored: their per-image values are NaN and they are left out of every mean and
  accuracy (so normal / background images of a test set simply drop out).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cutremain_monai.localization.normalise import as_array, is_flat, normalise_map

__all__ = [
    "IOU_ACCURACY_THRESHOLDS",
    "LOC_ACC_THRESHOLDS",
    "boxes_mask",
    "choose_tau",
    "energy_in_box",
    "energy_in_mask",
    "iou_accuracy",
    "largest_component_box",
    "loc_acc",
    "loc_acc_at",
    "max_box_acc",
    "pointing_game",
    "score_maps",
    "localization_table_md",
]

IOU_ACCURACY_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
LOC_ACC_THRESHOLDS = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)


# ----------------------------------------------------------------------------------------------------------- input
def _nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def _one_image_boxes(b, i: int) -> np.ndarray:
    a = as_array(b) if b is not None else np.zeros((0, 4))
    if a.size == 0:
        return np.zeros((0, 4))
    if a.ndim == 1 and a.shape[0] == 4:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"boxes of image {i} must be (N, 4) xyxy; got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"boxes of image {i} contain NaN or inf")
    return a


def _box_list(boxes, n: int, single: bool) -> list[np.ndarray]:
    if boxes is None:
        return [np.zeros((0, 4)) for _ in range(n)]
    if single:
        try:  # one (N, 4) array (or list of 4-lists) for the one map
            a = as_array(boxes)
            if a.ndim <= 2:
                return [_one_image_boxes(a, 0)]
        except ValueError:  # ragged: a list of per-image arrays
            pass
    if isinstance(boxes, (torch.Tensor, np.ndarray)) and boxes.ndim == 3:
        boxes = list(boxes)
    if not isinstance(boxes, Sequence) or isinstance(boxes, str):
        raise ValueError(f"boxes must be a sequence of {n} (N_i, 4) arrays, one per image; got {type(boxes).__name__}")
    if len(boxes) != n:
        raise ValueError(f"got {len(boxes)} box arrays for {n} maps; pass one (N_i, 4) array per image (N_i may be 0)")
    return [_one_image_boxes(b, i) for i, b in enumerate(boxes)]


def _prepare(maps, boxes, image_size=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Maps as (B, H, W) float64 and the boxes per image as (N_i, 4) float64 in map pixels (checked, scaled)."""
    m = as_array(maps)
    shape = tuple(m.shape)
    single = m.ndim == 2
    if single:
        m = m[None]
    elif m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3 or m.shape[1] == 0 or m.shape[2] == 0:
        raise ValueError(f"maps must be (H, W), (B, H, W) or (B, 1, H, W) with H, W > 0; got shape {shape}")
    if not np.isfinite(m).all():
        raise ValueError("maps contain NaN or inf")
    n, h, w = m.shape
    if image_size is None:
        ih, iw, frame = h, w, "the map"
    else:
        size = tuple(float(s) for s in image_size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"image_size must be (H, W) > 0; got {image_size}")
        ih, iw = size
        frame = "image_size"
    out = []
    for i, a in enumerate(_box_list(boxes, n, single)):
        for box in a:
            x0, y0, x1, y1 = box
            if x1 < x0 or y1 < y0:
                raise ValueError(f"image {i}: box {box.tolist()} is not xyxy (x1 < x0 or y1 < y0)")
            if x0 < 0 or y0 < 0 or x1 > iw or y1 > ih:
                raise ValueError(
                    f"image {i}: box {box.tolist()} (xyxy) falls outside {frame} of (H, W) = ({ih:g}, {iw:g}); maps have shape {shape}. "
                    "Boxes must be in map pixels, or pass image_size=(H, W) of the image they refer to."
                )
        if image_size is not None and len(a):
            a = a * np.array([w / iw, h / ih, w / iw, h / ih])
        out.append(a)
    return m, out


# ---------------------------------------------------------------------------------------------------- geometry
def boxes_mask(boxes, shape: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) union mask of ``boxes`` ((N, 4) xyxy in pixels of this grid) by the pixel-centre rule:
    pixel (r, c) is inside a box when ``x0 <= c + 0.5 <= x1`` and ``y0 <= r + 0.5 <= y1``."""
    h, w = shape
    mask = np.zeros((h, w), dtype=bool)
    cols, rows = np.arange(w) + 0.5, np.arange(h) + 0.5
    for x0, y0, x1, y1 in as_array(boxes).reshape(-1, 4):
        mask |= np.outer((y0 <= rows) & (rows <= y1), (x0 <= cols) & (cols <= x1))
    return mask


def largest_component_box(binary) -> np.ndarray | None:
    """Tight xyxy box (pixel-edge convention: columns c0..c1 give x0 = c0, x1 = c1 + 1) of the largest
    8-connected component of a boolean (H, W) mask, or None when the mask is empty. Components come from
    ``skimage.measure.label(connectivity=2)``; their pixel counts (``regionprops``' ``area``) are taken with
    ``np.bincount``, which is much faster than building ``regionprops`` for the thousands of components of a
    noisy map at a low threshold; ties in pixel count go to the lowest label, i.e. the component met first in raster order (row by row, top to bottom).
    (wsolevaluation ranks OpenCV contours by ``cv2.contourArea``, the polygon area of the traced outline, which is 0
    for a one-pixel or one-pixel-wide component; pixel counts are used here.)"""
    from skimage.measure import label

    lab = label(np.asarray(binary, dtype=bool), connectivity=2)
    counts = np.bincount(lab.ravel())  # pixel count per label (what regionprops' area is), far faster on noisy maps
    if counts.size < 2:
        return None
    k = int(np.argmax(counts[1:])) + 1  # argmax keeps the first (lowest label) of equal counts
    rows, cols = np.nonzero(np.any(lab == k, axis=1))[0], np.nonzero(np.any(lab == k, axis=0))[0]
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


def _overlap(pred: np.ndarray, gts: np.ndarray, mode: str) -> float:
    """Best overlap of one predicted box with any ground-truth box: IoU, or IoBB = intersection / area(pred)."""
    iw = np.clip(np.minimum(pred[2], gts[:, 2]) - np.maximum(pred[0], gts[:, 0]), 0, None)
    ih = np.clip(np.minimum(pred[3], gts[:, 3]) - np.maximum(pred[1], gts[:, 1]), 0, None)
    inter = iw * ih
    area_p = (pred[2] - pred[0]) * (pred[3] - pred[1])  # >= 1: a component has at least one pixel
    if mode == "iobb":
        return float((inter / area_p).max())
    area_g = (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1])
    return float((inter / (area_p + area_g - inter)).max())


# ----------------------------------------------------------------------------------------------------- metrics
def energy_in_mask(map_, mask) -> float:
    """Share of one map's non-negative energy inside a binary ``mask`` of the same shape: ``sum(S[mask]) / sum(S)``
    with ``S = max(map, 0)``, the rule of :func:`energy_in_box` for a mask already drawn (the bundles' ``box_mask``
    at the network's size); NaN for a map that is all zero after clipping."""
    m = as_array(map_)
    inside = as_array(mask) > 0
    if m.shape != inside.shape:
        raise ValueError(f"map shape {m.shape} and mask shape {inside.shape} differ")
    s = np.clip(m, 0.0, None)
    total = s.sum()
    return float(s[inside].sum() / total) if total > 0 else float("nan")


def energy_in_box(maps, boxes, image_size=None) -> dict:
    """Share of each map's non-negative energy that lies inside the union of its boxes (Score-CAM's
    "energy-based pointing game"): ``sum(S[inside]) / sum(S)`` with ``S = max(map, 0)`` (negative values are
    clipped to 0, not min-max shifted), "inside" by the pixel-centre rule of :func:`boxes_mask`; overlapping
    boxes count each pixel once.

    Batched and box-based; :func:`energy_in_mask` is the same rule for one map and a mask already drawn.

    Returns a dict: ``per_image`` (B,) float, NaN for an image without boxes and for a map that is all zero after
    clipping; ``mean`` over the finite per-image values (both kinds of NaN left out); ``n_scored``;
    ``n_no_boxes``; ``n_zero_maps`` (images with boxes whose clipped map is all zero, hence left out).
    """
    m, bl = _prepare(maps, boxes, image_size)
    per = np.full(len(m), np.nan)
    n_zero = 0
    for i, (mi, b) in enumerate(zip(m, bl)):
        if not len(b):
            continue
        s = np.clip(mi, 0.0, None)
        total = s.sum()
        if total <= 0:
            n_zero += 1
            continue
        per[i] = s[boxes_mask(b, mi.shape)].sum() / total
    return {
        "per_image": per,
        "mean": _nanmean(per),
        "n_scored": int(np.isfinite(per).sum()),
        "n_no_boxes": int(sum(not len(b) for b in bl)),
        "n_zero_maps": n_zero,
    }


def pointing_game(maps, boxes, labels=None, image_size=None) -> dict:
    """Pointing game (hit rate, as in CheXlocalize's ``eval_ptgame.py``, without tolerance): an image is a hit
    when the map's arg-max pixel lies inside one of its boxes, by the pixel-centre rule
    (``x0 <= c + 0.5 <= x1`` and ``y0 <= r + 0.5 <= y1``, edges inclusive). Ties at the maximum (exact float
    equality) are a hit if ANY of the tied pixels is inside a box; so a constant (e.g. all-zero) map is a hit
    whenever a box covers a pixel centre: ``n_ties`` counts such images so that this is visible. No 15-pixel
    tolerance (Zhang et al.'s original) is applied. Images without boxes are left out.

    ``labels``: optional class label per image (length B; one label per image, so a multi-label image enters
    once per (class map, class boxes) pair). Then ``per_class`` holds each class's hits / scored images and
    ``mean_over_classes`` the mean of those rates over classes that have scored images (CheXlocalize's summary).

    Returns a dict: ``hits`` (B,) float 1.0 / 0.0, NaN without boxes; ``hit_rate`` over scored images;
    ``n_scored``; ``n_ties`` (scored images whose maximum is attained by more than one pixel); ``per_class``
    {label: rate} and ``n_per_class`` {label: scored images}, both empty, and ``mean_over_classes`` NaN, when
    ``labels`` is None.
    """
    m, bl = _prepare(maps, boxes, image_size)
    hits = np.full(len(m), np.nan)
    n_ties = 0
    for i, (mi, b) in enumerate(zip(m, bl)):
        if not len(b):
            continue
        top = mi == mi.max()
        n_ties += int(top.sum() > 1)
        hits[i] = float((top & boxes_mask(b, mi.shape)).any())
    per_class, n_per_class = {}, {}
    if labels is not None:
        labels = labels.tolist() if isinstance(labels, (torch.Tensor, np.ndarray)) else list(labels)
        if len(labels) != len(m):
            raise ValueError(f"got {len(labels)} labels for {len(m)} maps")
        labels = [x.item() if isinstance(x, np.generic) else x for x in labels]
        for c in dict.fromkeys(labels):  # classes in order of first appearance
            h = hits[[x == c for x in labels]]
            per_class[c] = _nanmean(h)
            n_per_class[c] = int(np.isfinite(h).sum())
    rates = [r for r in per_class.values() if np.isfinite(r)]
    return {
        "hits": hits,
        "hit_rate": _nanmean(hits),
        "n_scored": int(np.isfinite(hits).sum()),
        "n_ties": n_ties,
        "per_class": per_class,
        "n_per_class": n_per_class,
        "mean_over_classes": float(np.mean(rates)) if rates else float("nan"),
    }


def iou_accuracy(maps, boxes, thresholds=IOU_ACCURACY_THRESHOLDS, iou: float = 0.5, mode: str = "iou", image_size=None) -> dict:
    """Box accuracy at map thresholds. Each map is min-max normalised to [0, 1] (a constant map gives no
    prediction at any threshold and counts as a miss), binarised at each threshold T (``>= T``, relative to the
    map's range), and the tight box of the largest 8-connected component (:func:`largest_component_box`) is
    compared with the best-matching ground-truth box of the image by

    * ``mode="iou"``: intersection / union, or
    * ``mode="iobb"``: intersection / area of the PREDICTED box (ChestX-ray8's IoBB: a small box inside a big
      ground truth scores 1).

    accuracy[T] = share of the images with boxes whose best overlap at T is ``>= iou``. A threshold that leaves
    no pixel gives no prediction (overlap 0, a miss). ChestX-ray8 counts IoBB ``> T_IoBB`` for
    T_IoBB in {0.1, 0.25, 0.5, 0.75, 0.9} at one fixed map threshold; to tabulate that, call with
    ``thresholds=(t_map,)`` and cut ``overlaps[:, 0]`` yourself. ``thresholds`` here are MAP thresholds.

    Returns a dict: ``thresholds`` (T,); ``accuracy`` (T,) (NaN when no image has boxes); ``correct`` (B, T) float
    1/0 (NaN rows for images without boxes); ``overlaps`` (B, T) best IoU / IoBB (0 without a prediction, NaN
    without boxes); ``pred_boxes`` (B, T, 4) xyxy in map pixels (NaN without a prediction); ``n_scored``;
    ``mode``; ``iou``.
    """
    if mode not in ("iou", "iobb"):
        raise ValueError(f"mode must be 'iou' or 'iobb'; got {mode!r}")
    th = as_array(thresholds).reshape(-1)
    if th.size == 0:
        raise ValueError("thresholds is empty")
    m, bl = _prepare(maps, boxes, image_size)
    n = len(m)
    ov = np.full((n, th.size), np.nan)
    pb = np.full((n, th.size, 4), np.nan)
    for i, (mi, b) in enumerate(zip(m, bl)):
        if not len(b):
            continue
        ov[i] = 0.0
        if float(mi.max()) <= float(mi.min()):  # a constant map has no region
            continue
        norm = normalise_map(mi)
        last_count, last_box = -1, None
        for k, t in enumerate(th):
            binary = norm >= t
            count = int(binary.sum())
            if count != last_count:  # masks at two thresholds nest, so an equal count means the same mask
                last_count, last_box = count, largest_component_box(binary)
            if last_box is not None:
                pb[i, k] = last_box
                ov[i, k] = _overlap(last_box, b, mode)
    scored = np.array([len(b) > 0 for b in bl], dtype=bool)
    correct = np.where(scored[:, None], (np.nan_to_num(ov, nan=-1.0) >= iou).astype(np.float64), np.nan)
    acc = correct[scored].mean(axis=0) if scored.any() else np.full(th.size, np.nan)
    return {
        "thresholds": th,
        "accuracy": acc,
        "correct": correct,
        "overlaps": ov,
        "pred_boxes": pb,
        "n_scored": int(scored.sum()),
        "mode": mode,
        "iou": float(iou),
    }


def max_box_acc(maps, boxes, iou: float = 0.5, thresholds=None, image_size=None) -> dict:
    """wsolevaluation's MaxBoxAcc, version 1 (Choe et al. CVPR 2020, ``evaluation.py`` without
    ``multi_contour_eval``): for every threshold of a fine grid (default 0, 0.01, ..., 0.99, i.e.
    ``np.arange(0, 1, 0.01)`` written as ``arange(100) / 100`` so the values are exact decimals) take the box of
    the LARGEST connected component of the min-max-normalised map, count an image correct when its IoU with any
    ground-truth box is ``>= iou`` (0.5), and report the best accuracy over thresholds. This is
    :func:`iou_accuracy` with ``mode="iou"`` on that grid.

    Not implemented: MaxBoxAccV2 (the paper's revised version), which keeps the boxes of ALL components per
    threshold (best match over them) and averages the max-over-thresholds accuracy over IoU cuts {0.3, 0.5, 0.7}.
    Differences from wsolevaluation's code, which can move numbers slightly: it quantises the map to uint8 and
    keeps pixels ``> int(T * max)`` (here ``>= T`` on the float map), ranks components by contour polygon area
    (here pixel count), and uses the inclusive-pixel box with "+1" areas and x1 clipped to W - 1 (here pixel
    edges, continuous areas). At T = 0 every pixel passes here, so the box is the whole map.

    The best threshold is chosen on the data scored, by design of the metric (an oracle-threshold summary); for an
    operating point to apply to a test split, choose the threshold on validation (:func:`choose_tau`).

    Returns :func:`iou_accuracy`'s dict plus ``max_box_acc`` (float) and ``best_threshold`` (the lowest threshold
    attaining it); both NaN when no image has boxes.
    """
    th = np.arange(100) / 100 if thresholds is None else thresholds
    r = iou_accuracy(maps, boxes, thresholds=th, iou=iou, mode="iou", image_size=image_size)
    best = _best(r["thresholds"], r["accuracy"])
    r["max_box_acc"], r["best_threshold"] = best if best else (float("nan"), float("nan"))
    return r


def _best(th: np.ndarray, acc: np.ndarray) -> tuple[float, float] | None:
    """(best accuracy, lowest threshold attaining it), or None when every accuracy is NaN."""
    acc = np.asarray(acc, dtype=np.float64)
    if not np.isfinite(acc).any():
        return None
    top = np.nanmax(acc)
    return float(top), float(np.min(np.asarray(th, dtype=np.float64)[acc == top]))


def loc_acc(maps, boxes, thresholds=LOC_ACC_THRESHOLDS, iou: float = 0.4, image_size=None) -> dict:
    """Loc. Acc. of the background-learning seed (Nakamura et al., IW-FCV 2023; METHODS.md section 4):
    Loc.Acc(tau) = share of TARGET images (those with boxes; background / normal images, given with no boxes, are
    left out) whose map binarised at tau (``>= tau`` after min-max normalisation, which leaves Nakamura's already
    min-max-normalised maps unchanged) has IoU ``>= 0.4`` with a ground-truth box, for
    tau in {0.05, 0.15, ..., 0.95}.

    The paper does not state how the binarised map becomes a region; following METHODS.md ("default to the
    largest-contour box as in wsolevaluation") the predicted region is the tight box of the LARGEST 8-connected
    component, compared by IoU with the best-matching ground-truth box (the same rule as :func:`iou_accuracy`),
    not the binarised mask against the union of the boxes.

    The paper reports max over tau, which picks tau on the split being scored; ``max_over_tau`` is returned only
    to compare with that number. For a test estimate, run this on the VALIDATION split, pick tau with
    :func:`choose_tau`, and apply it to test with :func:`loc_acc_at`, so the test split is never used to choose
    tau.

    Returns :func:`iou_accuracy`'s dict plus ``max_over_tau`` and ``best_tau`` (lowest tau attaining it).
    """
    r = iou_accuracy(maps, boxes, thresholds=thresholds, iou=iou, mode="iou", image_size=image_size)
    best = _best(r["thresholds"], r["accuracy"])
    r["max_over_tau"], r["best_tau"] = best if best else (float("nan"), float("nan"))
    return r


def choose_tau(val_result: dict) -> float:
    """The map threshold with the highest accuracy in a VALIDATION result of :func:`loc_acc` (also works on
    :func:`iou_accuracy` / :func:`max_box_acc` results: it reads ``thresholds`` and ``accuracy``); ties go to the
    lowest threshold. Apply it to the test split with :func:`loc_acc_at`; never pass a test result here.
    Raises ValueError when no validation image had boxes (all accuracies NaN)."""
    best = _best(val_result["thresholds"], val_result["accuracy"])
    if best is None:
        raise ValueError("validation result has no scored images (all accuracies are NaN); cannot choose tau")
    return best[1]


def loc_acc_at(maps, boxes, tau: float, iou: float = 0.4, image_size=None) -> dict:
    """Loc. Acc. at one map threshold ``tau`` fixed beforehand (by :func:`choose_tau` on validation), for the
    test split: the rule of :func:`loc_acc` at that single tau, so the test split is never used to choose it.

    Returns a dict: ``tau``, ``accuracy`` (float, NaN when no image has boxes), ``correct`` (B,), ``overlaps``
    (B,), ``pred_boxes`` (B, 4), ``n_scored``, ``iou``.
    """
    r = iou_accuracy(maps, boxes, thresholds=(float(tau),), iou=iou, mode="iou", image_size=image_size)
    return {
        "tau": float(tau),
        "accuracy": float(r["accuracy"][0]),
        "correct": r["correct"][:, 0],
        "overlaps": r["overlaps"][:, 0],
        "pred_boxes": r["pred_boxes"][:, 0],
        "n_scored": r["n_scored"],
        "iou": float(iou),
    }


def score_maps(results, methods, tau_from: dict | None) -> tuple[list[dict], dict, dict]:
    """``results``: ``(name, native image, boxes (N, 4), class, {method: map at the image's size})`` per image
    (:func:`cutremain_monai.localization.report.case_maps`). Per-image scores, the table, and the Loc. Acc.
    threshold each method would choose on these images. Images are scored one by one (their native sizes differ) and the per-threshold hits averaged, which is what the metrics'
    batch forms compute for same-size maps."""
    rows, table, taus = [], {}, {}
    for method in methods:
        if not results:
            table[method] = {}
            continue
        energy, hits, iou05, hit05, mba, loc = [], [], [], [], [], []
        first_row = len(rows)
        for name, _, boxes, target, maps in results:
            m, b = maps[method], [boxes]
            e = float(energy_in_box(m, b)["per_image"][0])
            h = int(pointing_game(m, b)["hits"][0])
            r = iou_accuracy(m, b, thresholds=(0.5,), iou=0.5)
            mb = max_box_acc(m, b, iou=0.5)
            la = loc_acc(m, b, iou=0.4)
            energy.append(e)
            hits.append(h)
            iou05.append(float(r["overlaps"][0, 0]))
            hit05.append(float(r["correct"][0, 0]))
            mba.append(np.asarray(mb["correct"][0], dtype=float))
            loc.append(np.asarray(la["correct"][0], dtype=float))
            rows.append({"image": name, "method": method, "class": target, "energy_in_box": round(e, 5),
                         "pointing_hit": h, "iou@0.5": round(iou05[-1], 5),
                         "flat": int(is_flat(m))})
        loc_thresholds = np.asarray(la["thresholds"], dtype=float)
        loc_curve = np.mean(loc, axis=0)
        own_tau = choose_tau({"thresholds": loc_thresholds, "accuracy": loc_curve})
        taus[method] = own_tau
        if tau_from and method in tau_from:  # the validation threshold, applied as it is
            tau = float(tau_from[method])
            tau_hits = [int(loc_acc_at(mp[method], [bx], tau)["correct"][0]) for _, _, bx, _, mp in results]
            loc_value, loc_note = float(np.mean(tau_hits)), f"tau {tau:.2f} from validation"
        else:
            k = int(np.argmax(loc_curve))
            tau_hits = [int(hit[k]) for hit in loc]
            loc_value, loc_note = float(loc_curve.max()), "max over tau on this set"
        for row, hit in zip(rows[first_row:], tau_hits):  # the image's Loc. Acc. hit at the tau the table uses
            row["loc_hit"] = hit
        table[method] = {"energy_in_box": float(np.nanmean(energy)) if np.isfinite(energy).any() else float("nan"),
                         "pointing_game": float(np.mean(hits)), "iou_acc@0.5": float(np.mean(hit05)),
                         "max_box_acc": float(np.mean(mba, axis=0).max()), "loc_acc": loc_value,
                         "loc_acc_tau": loc_note, "n": len(results),
                         "loc_acc_by_tau": {f"{t:.2f}": float(a) for t, a in zip(loc_thresholds, loc_curve)}}
    return rows, table, taus


def localization_table_md(table: dict) -> str:
    """The method x metric table of :func:`score_maps` as markdown."""
    lines = ["| method | energy in box | pointing game | IoU acc @0.5 | MaxBoxAcc | Loc. Acc. (IoU >= 0.4) | images |",
             "|---|---|---|---|---|---|---|"]
    for method, t in table.items():
        if not t:
            lines.append(f"| {method} | - | - | - | - | - | 0 |")
            continue
        lines.append(f"| {method} | {t['energy_in_box']:.3f} | {t['pointing_game']:.3f} | {t['iou_acc@0.5']:.3f} | "
                     f"{t['max_box_acc']:.3f} | {t['loc_acc']:.3f} ({t['loc_acc_tau']}) | {t['n']} |")
    return "\n".join(lines) + "\n"
