"""Hide-and-Seek (Singh & Lee, ICCV 2017): hide random grid patches so the network must find every relevant part.

The image is divided into ``s x s`` patches, ``s`` drawn per image from ``grid_sizes`` (0 = no hiding that time),
and each patch is hidden with probability ``p``. Hidden pixels take the dataset mean, not zero: at test time no
patch is hidden, and a network trained on zeros would see activation statistics at test time that it never saw
in training (the mean keeps the expected first-layer response of a hidden patch equal to that of a visible one,
as the Hide-and-Seek slides explain). MONAI has ``CoarseDropout`` (random holes, fixed fill), not the grid scheme
with a per-image grid size and mean fill.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform

from cutremain_monai.constants import IMAGE
from cutremain_monai.io.loader import load_xray

__all__ = ["HideAndSeek", "HideAndSeekd", "HideAndSeekD", "HideAndSeekDict", "dataset_mean"]

DEFAULT_GRID_SIZES = (0, 16, 32, 44, 56)


def _load_image(path: str):
    """The training loader (:func:`cutremain_monai.io.loader.load_xray`): DICOM through the display pipeline,
    PNG / JPEG / ... scaled by their bit depth, NIfTI / MHA / NRRD by the loader's rule; all ``(1, H, W)`` in
    [0, 1], the scale the network is trained on (PNG / JPEG used to come in unscaled, 0-255)."""
    return load_xray(path)


def dataset_mean(items: Iterable, image_key: str = IMAGE, loader=None) -> float:
    """Mean pixel value over a datalist (items with image paths, or loaded arrays), weighted by pixel count.

    Compute it over the training images after the same intensity preprocessing as training, so the fill of
    hidden patches matches what the network sees. Paths are read with ``loader`` (default: the training loader
    :func:`~cutremain_monai.io.loader.load_xray`, [0, 1] for DICOM and raster files alike).
    """
    load = loader or _load_image
    total, count = 0.0, 0
    for it in items:
        img = it[image_key] if isinstance(it, Mapping) else it
        if isinstance(img, (str, os.PathLike)):
            img = load(img)
        arr = torch.as_tensor(np.asarray(img), dtype=torch.float64)
        total += float(arr.sum())
        count += arr.numel()
    if count == 0:
        raise ValueError("dataset_mean: no pixels (empty datalist)")
    return total / count


class HideAndSeek(Randomizable, Transform):
    """Array Hide-and-Seek on ``(C, H, W)``.

    Args:
        mean: the fill value (the dataset mean; compute it with :func:`dataset_mean`), a float or one per channel.
        grid_sizes: patch side lengths in pixels to draw from per image (0 = no hiding).
        prob: probability of hiding each patch (0.5 in the paper).
    """
    def __init__(self, mean: float | Sequence[float], grid_sizes: Sequence[int] = DEFAULT_GRID_SIZES, prob: float = 0.5):
        if not grid_sizes or any(int(g) < 0 for g in grid_sizes):
            raise ValueError(f"grid_sizes must be non-negative ints, got {grid_sizes}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.mean = mean
        self.grid_sizes = tuple(int(g) for g in grid_sizes)
        self.prob = prob
        self._grid = 0
        self._hidden = np.zeros((0, 0), dtype=bool)

    def randomize(self, spatial_size: Sequence[int]) -> None:
        self._grid = int(self.grid_sizes[self.R.randint(len(self.grid_sizes))])
        if self._grid == 0:
            self._hidden = np.zeros((0, 0), dtype=bool)
            return
        gh = -(-int(spatial_size[0]) // self._grid)
        gw = -(-int(spatial_size[1]) // self._grid)
        self._hidden = self.R.random((gh, gw)) < self.prob

    def hidden_mask(self, spatial_size: Sequence[int]) -> np.ndarray:
        """The current draw as a pixel mask ``(H, W)`` (True = hidden)."""
        h, w = int(spatial_size[0]), int(spatial_size[1])
        if self._grid == 0:
            return np.zeros((h, w), dtype=bool)
        return np.kron(self._hidden, np.ones((self._grid, self._grid), dtype=bool))[:h, :w]

    def __call__(self, img, randomize: bool = True):
        if img.ndim != 3:
            raise ValueError(f"image must be (C, H, W), got shape {tuple(img.shape)}")
        if randomize:
            self.randomize(img.shape[-2:])
        if self._grid == 0 or not self._hidden.any():
            return img
        mask = self.hidden_mask(img.shape[-2:])
        is_tensor = isinstance(img, torch.Tensor)
        out = img.clone() if is_tensor else img.copy()
        mean = np.broadcast_to(np.asarray(self.mean, dtype=np.float64).reshape(-1), (img.shape[0],))
        for c in range(img.shape[0]):
            if is_tensor:
                out[c][torch.from_numpy(mask).to(img.device)] = float(mean[c])
            else:
                out[c][mask] = mean[c]
        return out


class HideAndSeekd(Randomizable, MapTransform):
    """Dictionary wrapper of :class:`HideAndSeek` (one draw per sample, applied to every key)."""
    def __init__(
        self,
        keys: KeysCollection = IMAGE,
        mean: float | Sequence[float] = 0.5,
        grid_sizes: Sequence[int] = DEFAULT_GRID_SIZES,
        prob: float = 0.5,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.hider = HideAndSeek(mean, grid_sizes, prob)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.hider.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self.hider.randomize(data)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        self.randomize(d[keys[0]].shape[-2:])
        for key in keys:
            d[key] = self.hider(d[key], randomize=False)
        return d


HideAndSeekD = HideAndSeekDict = HideAndSeekd
