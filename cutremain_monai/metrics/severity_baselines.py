"""Simple baselines a COVID severity model must beat, fitted on the training section and scored like the model:

- ``constant``: every zone's probability is its share of affected zones in the training section (the training
  mean); its global score is the training mean global score for every image.
- ``zone_intensity``: per zone, intensity statistics of the image after the bundle's own preprocessing (the paper's
  resize, 3x3 blur, histogram equalisation, normalisation) inside that zone of the lung mask (mean, standard
  deviation, 10th / 50th / 90th percentile, the zone's share of the lung area), and one logistic regression per
  zone (scikit-learn, standardised features, L2, C=1). Opacities raise the intensity inside the lung, so this is
  the "a radiologist's first glance" model. A zone with one class only in training falls back to the constant.

The model's table gains these rows (``SeverityReport(baselines=...)``), so "does the network earn its place" is
answered in the same report, on the same test images, with the same metrics
(:func:`cutremain_monai.metrics.severity.severity_metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from cutremain_monai.metrics.severity import severity_metrics

__all__ = ["FEATURES", "zone_intensity_features", "fit_baselines", "predict_baselines", "severity_baselines"]

logger = logging.getLogger(__name__)
FEATURES = ("mean", "std", "p10", "p50", "p90", "area_share")


def zone_intensity_features(image, lung_mask, zones) -> np.ndarray:
    """``image``, ``lung_mask``, ``zones``: ``(1, H, W)`` or ``(H, W)`` (zones 1..6, 0 outside) -> ``(6, 6)``: per
    zone the :data:`FEATURES`; an empty zone gets zeros."""
    x = np.asarray(image, dtype=np.float64).reshape(np.shape(image)[-2:])
    z = np.asarray(zones).reshape(x.shape).astype(int)
    lung = np.asarray(lung_mask).reshape(x.shape) > 0
    total = max(int(lung.sum()), 1)
    out = np.zeros((6, len(FEATURES)))
    for k in range(6):
        v = x[(z == k + 1) & lung]
        if v.size:
            p10, p50, p90 = np.percentile(v, [10, 50, 90])
            out[k] = [v.mean(), v.std(), p10, p50, p90, v.size / total]
    return out


def _binary(zone_scores) -> np.ndarray:
    return (np.asarray(zone_scores, dtype=np.float64).reshape(-1, 6) > 0).astype(int)


def fit_baselines(features: np.ndarray, zone_scores) -> dict:
    """``features``: ``(N, 6, F)``; ``zone_scores``: ``(N, 6)`` (0-3, binarised here) -> the fitted baselines."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = _binary(zone_scores)
    f = np.asarray(features, dtype=np.float64)
    if f.shape[:2] != y.shape:
        raise ValueError(f"features {f.shape} and zone scores {y.shape} differ")
    prior = y.mean(0)
    models = []
    for k in range(6):
        if 0 < y[:, k].sum() < len(y):
            models.append(make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(f[:, k], y[:, k]))
        else:
            models.append(None)
    return {"prior": prior, "zone_models": models, "n_train": int(len(y))}


def predict_baselines(fitted: dict, features: np.ndarray) -> dict:
    """``(N, 6)`` zone probabilities of each baseline: ``{"constant": ..., "zone_intensity": ...}``."""
    f = np.asarray(features, dtype=np.float64)
    const = np.repeat(fitted["prior"][None], len(f), axis=0)
    zi = const.copy()
    for k, m in enumerate(fitted["zone_models"]):
        if m is not None:
            zi[:, k] = m.predict_proba(f[:, k])[:, 1]
    return {"constant": const, "zone_intensity": zi}


def _features(items: Sequence[dict], transform: Callable) -> tuple[np.ndarray, np.ndarray, list[str]]:
    feats, scores, names = [], [], []
    for it in items:
        if it.get("zone_scores") is None:
            continue
        try:
            s = transform(dict(it))
        except Exception as e:  # set aside with its reason, as the datasets do
            logger.warning("severity baselines: %s set aside (%s: %s)", it.get("image_id") or it.get("image"), type(e).__name__, e)
            continue
        feats.append(zone_intensity_features(s["image"], s["lung_mask"], s["zones"]))
        scores.append(np.asarray(it["zone_scores"], dtype=np.float64).reshape(6))
        names.append(str(it.get("image_id") or it.get("image")))
    return np.asarray(feats).reshape(-1, 6, len(FEATURES)), np.asarray(scores).reshape(-1, 6), names


def severity_baselines(train_items: Sequence[dict], test_items: Sequence[dict], transform: Callable) -> dict:
    """Fit on ``train_items`` and score on ``test_items`` (both through ``transform``, the bundle's preprocessing):
    ``{"constant": metrics, "zone_intensity": metrics, "n_train": N}`` (:func:`severity_metrics`)."""
    f_train, y_train, _ = _features(train_items, transform)
    if len(f_train) < 2:
        raise ValueError(f"severity baselines need at least 2 scored training images, got {len(f_train)}")
    fitted = fit_baselines(f_train, y_train)
    f_test, y_test, _ = _features(test_items, transform)
    if len(f_test) == 0:
        raise ValueError("severity baselines: no scored test image")
    preds = predict_baselines(fitted, f_test)
    return {**{k: severity_metrics(y_test, p) for k, p in preds.items()}, "n_train": fitted["n_train"]}
