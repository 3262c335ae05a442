"""Cut&Remain: keep the annotated region, remove the rest ("Look at here", Eq. 1 and Figure 2).

``x~ = M * x`` (plus ``fill * (1 - M)``), ``y~ = y``, where ``M`` is 1 inside the annotated box and 0 outside: the
lesion keeps its position and scale (no crop, no resize). Each annotation is varied in aspect ratio by applying
the factors {1.0, 1.5, 2.0} to its width and height (9 boxes, same centre, clipped to the image); several boxes on
one image give one mask from their union per variant. The dictionary transform returns ``[original, copy_1, ...,
copy_k]``, which MONAI's ``list_data_collate`` flattens into the minibatch beside the originals.

What this adds to MONAI: MONAI's ``CutOut``/``CutMix`` remove or paste random regions; none keeps an annotated
region and removes the rest, varies it in aspect ratio, or selects the annotated fraction gamma of the data.
The copy is made by filling and pasting the box rectangles (no mask multiply), which is what keeps the cost per
output image at or below a bare ``img * mask`` (``benchmarks/bench_transforms.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform

from cutremain_monai.constants import BOXES, IMAGE
from cutremain_monai.transforms.boxes import ASPECT_FACTORS, box_pixel_extent, check_boxes, clip_boxes

__all__ = [
    "CutRemain",
    "CutRemaind",
    "CutRemainD",
    "CutRemainDict",
    "gamma_selected",
    "sample_id",
]


def _check_image(img, key: Hashable = IMAGE):
    """``ValueError`` naming ``key`` unless ``img`` is a numeric channel-first ``(C, H, W)`` array."""
    if not isinstance(img, (torch.Tensor, np.ndarray)) or img.ndim != 3:
        shape = tuple(getattr(img, "shape", ()))
        raise ValueError(f"'{key}' must be a channel-first (C, H, W) array, got shape {shape}")
    numeric = np.issubdtype(img.dtype, np.number) if isinstance(img, np.ndarray) else not (img.dtype == torch.bool or img.is_complex())
    if not numeric:
        raise ValueError(f"'{key}' must be numeric, got dtype {img.dtype}")


def _plain(img):
    """The plain tensor under a MetaTensor: MONAI's ``__torch_function__`` costs more than the maths here."""
    return img.as_tensor() if isinstance(img, MetaTensor) else img


def _like(out, template):
    """``out`` as a MetaTensor with a copy of ``template``'s metadata (when the template is one)."""
    if not isinstance(template, MetaTensor):
        return out
    out = out.as_subclass(MetaTensor)
    out.meta = dict(template.meta)
    out.applied_operations = list(template.applied_operations)
    return out


def remain(img, boxes, fill: float = 0.0, src=None):
    """``img`` with everything outside the union of ``boxes`` set to ``fill``: one fill, one paste per box.

    ``src`` may give the plain tensor of a MetaTensor ``img`` already unwrapped by the caller.
    """
    src = _plain(img) if src is None else src
    h, w = src.shape[-2:]
    out = torch.full_like(src, fill) if isinstance(src, torch.Tensor) else np.full_like(src, fill)
    for box in boxes:
        r0, r1, c0, c1 = box_pixel_extent(box, h, w)
        out[..., r0:r1, c0:c1] = src[..., r0:r1, c0:c1]
    return _like(out, img)


def _inside(boxes: list, h: int, w: int) -> bool:
    """True when every box has area and lies inside the image (then no clipping or warning is needed)."""
    return all(0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h for x0, y0, x1, y1 in boxes)


class CutRemain(Randomizable, Transform):
    """Array transform: image ``(C, H, W)`` and boxes ``(N, 4)`` xyxy -> list of ``k`` Cut&Remain copies.

    Args:
        factors: aspect-ratio factors applied to width and height (``len(factors) ** 2`` variants).
        num_copies: how many of the variants to produce per call: ``None`` = all of them in order, ``k`` = ``k``
            distinct variants drawn with ``self.R``.
        fill_value: value outside the kept region (0, as in the paper).
    """

    def __init__(self, factors: Sequence[float] = ASPECT_FACTORS, num_copies: int | None = None, fill_value: float = 0.0):
        self.factors = tuple(float(f) for f in factors)
        n = len(self.factors) ** 2
        if num_copies is not None and not 1 <= num_copies <= n:
            raise ValueError(f"num_copies must be in 1..{n} (or None for all), got {num_copies}")
        self.num_copies = num_copies
        self.fill_value = fill_value
        self._variants: list[int] = list(range(n))

    def randomize(self, data=None) -> None:
        n = len(self.factors) ** 2
        if self.num_copies is None:
            self._variants = list(range(n))
        else:
            self._variants = [int(self.R.randint(n))] if self.num_copies == 1 else sorted(self.R.permutation(n)[: self.num_copies].tolist())

    def variant_boxes(self, boxes, image_size) -> list[list[tuple[float, float, float, float]]]:
        """For each selected variant, the boxes (one per annotation) whose union is kept.

        Same boxes as :func:`aspect_ratio_boxes` (variant ``v`` = factors ``(v // n, v % n)``), computed only for
        the selected variants, in plain Python (a few boxes: faster than numpy).
        """
        h, w = float(image_size[0]), float(image_size[1])
        n = len(self.factors)
        out = []
        for v in self._variants:
            fw, fh = self.factors[int(v) // n], self.factors[int(v) % n]
            group = []
            for x0, y0, x1, y1 in boxes:
                cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, fw * (x1 - x0) / 2, fh * (y1 - y0) / 2
                group.append((min(max(cx - hw, 0.0), w), min(max(cy - hh, 0.0), h), min(max(cx + hw, 0.0), w), min(max(cy + hh, 0.0), h)))
            out.append(group)
        return out

    def __call__(self, img, boxes, randomize: bool = True) -> list:
        _check_image(_plain(img))
        boxes = check_boxes(boxes).tolist()
        if randomize:
            self.randomize()
        if len(boxes) == 0:
            return []
        size = tuple(_plain(img).shape[-2:])
        return [remain(img, vb, self.fill_value) for vb in self.variant_boxes(boxes, size)]


def sample_id(d: Mapping, image_key: Hashable = IMAGE, id_key: Hashable | None = None) -> str:
    """A stable identifier of a sample: ``d[id_key]``, else the image's source file name, else its path."""
    if id_key is not None:
        return str(d[id_key])
    img = d.get(image_key)
    meta = getattr(img, "meta", None)
    if meta and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    if isinstance(img, str):
        return img
    raise KeyError(f"cannot identify the sample for gamma selection: give id_key (keys: {sorted(map(str, d))})")


def gamma_selected(identifier: str, gamma: float, seed: int = 0) -> bool:
    """Whether a sample's annotations are used at annotation fraction ``gamma`` (deterministic per id and seed).

    A hash of (seed, id) mapped to [0, 1) is compared with ``gamma``: the same samples are chosen every epoch, in
    every worker and on every DDP rank, and the set at a smaller gamma is a subset of the set at a larger one.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    h = hashlib.sha256(f"{seed}:{identifier}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < gamma


class CutRemaind(Randomizable, MapTransform):
    """Dictionary Cut&Remain: returns ``[original, copy_1, ..., copy_k]`` for an annotated sample.

    Samples without boxes, and samples outside the annotated fraction ``gamma``, pass through as ``[original]``.
    The copies share every other key (label unchanged: y~ = y). ``flag_key`` marks originals (0) and copies (1),
    so a trainer or a feature-similarity study can tell them apart after collation.

    Args:
        keys: image keys to cut (all get the same boxes and variant draw).
        box_key: the boxes ``(N, 4)`` xyxy in pixels of the image.
        factors / num_copies / fill_value: see :class:`CutRemain`.
        gamma: fraction of samples whose annotations are used (paper Section 4.5.3), chosen per sample by
            :func:`gamma_selected` from ``id_key`` (default: the image's source file name).
        seed: seed of the gamma selection (not of the variant draw, which uses ``set_random_state``).
    """

    def __init__(
        self,
        keys: KeysCollection = IMAGE,
        box_key: str = BOXES,
        factors: Sequence[float] = ASPECT_FACTORS,
        num_copies: int | None = None,
        fill_value: float = 0.0,
        gamma: float = 1.0,
        seed: int = 0,
        id_key: str | None = None,
        flag_key: str | None = "augmented",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        self.box_key = box_key
        self.cutter = CutRemain(factors, num_copies, fill_value)
        self.gamma = gamma
        self.seed = seed
        self.id_key = id_key
        self.flag_key = flag_key

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.cutter.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self.cutter.randomize()

    def __call__(self, data: Mapping[Hashable, object]) -> list[dict]:
        d = dict(data)
        if self.flag_key:
            d[self.flag_key] = 0
        if self.box_key not in d:
            if self.allow_missing_keys:
                return [d]
            raise KeyError(f"CutRemaind: missing box key '{self.box_key}'")
        keys = list(self.key_iterator(d))
        if not keys:
            return [d]
        first = keys[0]
        plain = _plain(d[first])
        _check_image(plain, first)
        h, w = plain.shape[-2:]
        boxes = check_boxes(d[self.box_key], self.box_key).tolist()
        if boxes and not _inside(boxes, h, w):
            boxes = clip_boxes(np.asarray(boxes), h, w, source=sample_id_or_key(d, first, self.id_key)).tolist()
        if not boxes or (self.gamma < 1.0 and not gamma_selected(sample_id(d, first, self.id_key), self.gamma, self.seed)):
            return [d]
        self.randomize()
        variants = self.cutter.variant_boxes(boxes, (h, w))
        copies: list[dict] = [dict(d) for _ in variants]
        for key in keys:
            if key != first:
                plain = _plain(d[key])
                _check_image(plain, key)
                if tuple(plain.shape[-2:]) != (h, w):
                    raise ValueError(f"'{key}' has spatial shape {tuple(plain.shape[-2:])}, expected {(h, w)} like '{first}'")
            for c, vb in zip(copies, variants):
                c[key] = remain(d[key], vb, self.cutter.fill_value, src=plain)
        if self.flag_key:
            for c in copies:
                c[self.flag_key] = 1
        return [d] + copies


def sample_id_or_key(d: Mapping, image_key: Hashable, id_key: Hashable | None) -> str:
    try:
        return sample_id(d, image_key, id_key)
    except KeyError:
        return str(image_key)


CutRemainD = CutRemainDict = CutRemaind
