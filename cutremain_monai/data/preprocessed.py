"""A persistent, shared cache of the deterministic head of a bundle's chain, and the dataset that trains from it.

The head (read, window, MONOCHROME1, halves, resize to the training size, boxes scaled, box masks) is the same for
every run, fold and method that shares its settings, and it is where nearly all the time goes (decoding a 1024 px
PNG and resizing it: ~30 ms; a 3,000 px DICOM: ~200 ms). :class:`PreprocessedDataset` computes it once per item and
keeps the result on disk, one file per item, so that a training step reads an image at memory speed and the memory
of the process does not grow with the number of images.

What it adds over MONAI's caches (measured by ``benchmarks/bench_input_pipeline.py``):

* ``CacheDataset`` holds every item in RAM as float32, built serially before the first step, again in every run.
* ``PersistentDataset`` keeps the head on disk, but as ``torch.save`` pickles of float32 MetaTensors (twice the
  bytes of uint16, a pickle load per read, loading a pickle from a shared folder runs its code), keyed by a hash
  of the item only: it is not invalidated when the file changes, or when the transforms change (MONAI's docs ask
  the user to clear the folder), and it is built lazily by whichever DataLoader worker first meets an item, so the
  first epoch of a large data set is decode-bound and unreadable files fail mid-epoch.
* ``LMDBDataset`` adds a single-writer database on top of the same pickles.

Here:

* **Keyed by content.** An item's key hashes the head's fingerprint (:func:`head_fingerprint`: every transform's
  class and settings, so changing ``image_size`` or the window makes a new cache), the item itself (its boxes and
  labels go through the head) and, for every file it names, the file's size and modification time (a replaced
  file is read again). Paths are never written into the cache: a string of the item is stored as a reference to
  its key and filled in from the item when read, and file names are hashes.
* **A record format without pickle.** A small JSON header (the samples' keys, labels, boxes, metadata) followed by
  the arrays; images in [0, 1] are stored as uint16 (step 1/65535, as the 16-bit PNG copies of
  :mod:`~cutremain_monai.data.resized_copies`), 0/1 masks as uint8, anything else as it is. One ``read`` per item.
* **Built before the first step, in parallel, resumable, shared.** Missing items are built by a pool of DataLoader
  worker processes; each record is written to a temporary file and renamed, so a killed build leaves only whole
  records and the next run builds what is missing; two processes building the same item at once both write the
  same bytes. Under ``torch.distributed`` each rank builds its share first, then whatever is still missing (a
  cache on a shared filesystem is built once across the nodes; on node-local disks each node completes its own).
* **Bad files set aside** with their reason, in the same ``set_aside.csv`` as
  :class:`~cutremain_monai.data.set_aside.SetAsideDataset`; nothing dies for one bad file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from cutremain_monai.data.set_aside import (SetAsideError, error_reason, item_name, rank_and_world, scrub_paths,
                                           write_set_aside)

__all__ = ["head_fingerprint", "encode_record", "decode_record", "PreprocessedCache", "PreprocessedDataset",
           "CachedTransform", "FORMAT_VERSION"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MAGIC = b"CRPC1\n"
_ALIGN = 64
_SMALL = 64  # arrays of at most this many elements (boxes, sizes, labels) are kept exactly in the header


# ---- fingerprint of the head ------------------------------------------------------------------------------------

def _describe(obj, depth: int = 0, seen: set | None = None):
    """A JSON-able description of a transform's settings (class and primitive attributes, recursively)."""
    seen = set() if seen is None else seen
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        a = obj.detach().cpu().numpy() if isinstance(obj, torch.Tensor) else obj
        return {"array": a.tolist()} if a.size <= _SMALL else {"array_sha1": hashlib.sha1(a.tobytes()).hexdigest()}
    if isinstance(obj, (list, tuple)):
        return [_describe(v, depth + 1, seen) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): _describe(v, depth + 1, seen) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, np.random.RandomState) or depth > 6 or id(obj) in seen:
        return None
    if callable(obj) and not hasattr(obj, "__dict__"):
        return getattr(obj, "__qualname__", type(obj).__name__)
    seen.add(id(obj))
    cls = type(obj)
    out = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    for k, v in sorted(getattr(obj, "__dict__", {}).items()):
        if k.startswith("_") or k in ("R", "lazy", "_lazy"):
            continue
        out[k] = _describe(v, depth + 1, seen)
    return out


def head_fingerprint(head, extra: Mapping | None = None) -> str:
    """Hash of the head's transforms and settings (and ``extra``), the cache's invalidation key (16 hex digits)."""
    transforms = head.transforms if isinstance(head, Compose) else head
    desc = {"format": FORMAT_VERSION, "transforms": _describe(list(transforms) if isinstance(transforms, (list, tuple))
                                                               else transforms), "extra": _describe(extra or {})}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- the record format --------------------------------------------------------------------------------------------

def _item_refs(item: Mapping) -> dict[str, str]:
    return {v: k for k, v in item.items() if isinstance(v, str)} if isinstance(item, Mapping) else {}


def _array_code(a: np.ndarray) -> tuple[np.ndarray, str]:
    """(stored array, how to restore it): 0/1 floats as uint8, [0, 1] floats as uint16 of x * 65535."""
    if a.dtype.kind == "f" and a.size:
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            if np.array_equal(a, a.astype(bool)):
                return a.astype(np.uint8), f"mask:{a.dtype.str}"
            return np.round(a * 65535.0).astype(np.uint16), f"unit:{a.dtype.str}"
    return np.ascontiguousarray(a), "raw"


class _Encoder:
    def __init__(self, item: Mapping):
        self.refs = _item_refs(item)
        self.blobs: list[np.ndarray] = []
        self.arrays: list[dict] = []

    def value(self, v):
        if isinstance(v, MetaTensor):
            meta = {k: self.value(m) for k, m in v.meta.items() if self._keep_meta(m)}
            return {"__t__": "meta", "a": self.array(v.detach().cpu().numpy(), v.dtype), "meta": meta}
        if isinstance(v, torch.Tensor):
            return {"__t__": "tensor", "a": self.array(v.detach().cpu().numpy(), v.dtype)}
        if isinstance(v, np.ndarray):
            return {"__t__": "ndarray", "a": self.array(v, None)}
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, str):
            return {"__t__": "ref", "k": self.refs[v]} if v in self.refs and (os.sep in v or "." in v) else v
        if isinstance(v, os.PathLike):
            return self.value(os.fspath(v))
        if isinstance(v, Mapping):
            return {"__t__": "dict", "v": {str(k): self.value(x) for k, x in v.items()}}
        if isinstance(v, (list, tuple)):
            return [self.value(x) for x in v]
        if v is None or isinstance(v, (bool, int, float)):
            return v
        raise TypeError(f"cannot store a {type(v).__name__} in the preprocessed cache")

    @staticmethod
    def _keep_meta(m) -> bool:
        return m is None or isinstance(m, (bool, int, float, str, np.generic, np.ndarray, torch.Tensor, list, tuple, dict))

    def array(self, a: np.ndarray, torch_dtype) -> dict:
        entry = {"shape": list(a.shape), "torch": str(torch_dtype).replace("torch.", "") if torch_dtype is not None else None}
        if a.size <= _SMALL:
            entry.update(dtype=a.dtype.str, data=a.reshape(-1).tolist())
            return entry
        stored, code = _array_code(a)
        entry.update(dtype=stored.dtype.str, code=code, blob=len(self.blobs))
        self.blobs.append(stored)
        return entry


def encode_record(samples, item: Mapping) -> bytes:
    """The bytes of one record: ``samples`` (the head's output, a dict or a list of dicts) of ``item``."""
    enc = _Encoder(item)
    body = enc.value(samples)
    offsets, pos = [], 0
    for b in enc.blobs:
        pos = (pos + _ALIGN - 1) // _ALIGN * _ALIGN
        offsets.append(pos)
        pos += b.nbytes
    header = json.dumps({"body": body, "offsets": offsets}, separators=(",", ":")).encode()
    start = (len(_MAGIC) + 8 + len(header) + _ALIGN - 1) // _ALIGN * _ALIGN
    out = bytearray(start + pos)
    out[:len(_MAGIC)] = _MAGIC
    out[len(_MAGIC):len(_MAGIC) + 8] = len(header).to_bytes(8, "little")
    out[len(_MAGIC) + 8:len(_MAGIC) + 8 + len(header)] = header
    for off, b in zip(offsets, enc.blobs):
        out[start + off:start + off + b.nbytes] = b.tobytes()
    return bytes(out)


def _decode_array(entry: dict, buf: bytes, start: int, offsets: list[int]) -> np.ndarray:
    dtype = np.dtype(entry["dtype"])
    shape = tuple(entry["shape"])
    if "data" in entry:
        return np.asarray(entry["data"], dtype=dtype).reshape(shape)
    count = int(np.prod(shape)) if shape else 1
    a = np.frombuffer(buf, dtype=dtype, count=count, offset=start + offsets[entry["blob"]]).reshape(shape)
    code = entry.get("code", "raw")
    if code.startswith("unit:"):
        return np.multiply(a, np.float32(1.0 / 65535.0), dtype=np.dtype(code[5:]))  # one pass, no temporary
    if code.startswith("mask:"):
        return a.astype(np.dtype(code[5:]))
    return a.copy()


def decode_record(buf: bytes, item: Mapping):
    """The samples of a record written by :func:`encode_record` (strings of ``item`` filled back in)."""
    if buf[:len(_MAGIC)] != _MAGIC:
        raise ValueError("not a preprocessed-cache record (bad magic)")
    n = int.from_bytes(buf[len(_MAGIC):len(_MAGIC) + 8], "little")
    head = json.loads(buf[len(_MAGIC) + 8:len(_MAGIC) + 8 + n])
    start = (len(_MAGIC) + 8 + n + _ALIGN - 1) // _ALIGN * _ALIGN
    offsets = head["offsets"]

    def value(v):
        if isinstance(v, list):
            return [value(x) for x in v]
        if not isinstance(v, dict):
            return v
        kind = v["__t__"]
        if kind == "ref":
            return item[v["k"]]
        if kind == "dict":
            return {k: value(x) for k, x in v["v"].items()}
        a = _decode_array(v["a"], buf, start, offsets)
        if kind == "ndarray":
            return a
        t = torch.from_numpy(np.ascontiguousarray(a))
        if kind == "tensor":
            return t
        return MetaTensor(t, meta={k: value(m) for k, m in v["meta"].items()})

    return value(head["body"])


# ---- the cache ------------------------------------------------------------------------------------------------------

def _file_stamp(v: str) -> list | None:
    try:
        st = os.stat(v)
    except (OSError, ValueError):
        return None
    return [st.st_size, st.st_mtime_ns] if os.path.isfile(v) else None


class PreprocessedCache:
    """The records of one head under ``root/<fingerprint>/``: keys, paths, reading, writing.

    Args:
        root: the cache folder (shared by runs; several heads live side by side, one subfolder each).
        head: the deterministic transforms (a ``Compose`` or a list).
        fingerprint: the head's key; default :func:`head_fingerprint` of ``head``.
    """

    def __init__(self, root: str, head, fingerprint: str | None = None):
        self.head = head if isinstance(head, Compose) else Compose(list(head))
        self.fingerprint = fingerprint or head_fingerprint(self.head)
        self.folder = os.path.join(os.path.abspath(root), self.fingerprint)

    def key(self, item: Mapping) -> str:
        stamps = {k: _file_stamp(v) for k, v in item.items() if isinstance(v, str) and os.path.isabs(v)}
        text = json.dumps({"item": item, "files": stamps}, sort_keys=True, default=str)
        return hashlib.sha256((self.fingerprint + text).encode()).hexdigest()[:32]

    def path(self, key: str) -> str:
        return os.path.join(self.folder, key[:2], key + ".rec")

    def read(self, key: str, item: Mapping):
        with open(self.path(key), "rb") as f:
            return decode_record(f.read(), item)

    def compute(self, item: Mapping):
        """Run the head on ``item`` (a fresh copy; the item is not changed)."""
        return self.head(dict(item))

    def write(self, key: str, item: Mapping, samples) -> None:
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        with open(tmp, "wb") as f:
            f.write(encode_record(samples, item))
        os.replace(tmp, path)  # atomic: readers see the old record, the new one, or none; never half of one


class CachedTransform:
    """``transform(item)`` through the cache: read when its record exists, else computed and stored.

    For passes that transform items one by one outside a dataset (the localisation reports load the boxed test
    images at their native size for every method and fold of a comparison: with this, each is decoded once).
    ``cache_dir`` None: the transform itself, uncached.
    """

    def __init__(self, transform, cache_dir: str | None):
        self.cache = PreprocessedCache(cache_dir, transform) if cache_dir else None
        self.transform = transform if isinstance(transform, Compose) else Compose(list(transform))

    def __call__(self, item: Mapping):
        if self.cache is None:
            return self.transform(dict(item))
        key = self.cache.key(item)
        try:
            return self.cache.read(key, item)
        except FileNotFoundError:
            out = self.cache.compute(item)
            self.cache.write(key, item, out)
            return self.cache.read(key, item)  # what a later read returns (uint16 images), so every pass sees the same


class _Build(torch.utils.data.Dataset):
    """Builds the records of ``todo`` (indices into ``items``) in DataLoader workers: (index, reason or "")."""

    def __init__(self, cache: PreprocessedCache, items: Sequence[Mapping], keys: Sequence[str], todo: Sequence[int]):
        self.cache, self.items, self.keys, self.todo = cache, items, keys, list(todo)

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, j: int):
        i = self.todo[j]
        if os.path.exists(self.cache.path(self.keys[i])):  # another rank or process built it meanwhile
            return i, ""
        try:
            self.cache.write(self.keys[i], self.items[i], self.cache.compute(self.items[i]))
        except Exception as e:  # one bad file never ends the build: its reason goes back to the parent
            return i, error_reason(e) or type(e).__name__
        return i, ""


def _first(x):
    return x


class PreprocessedDataset(torch.utils.data.Dataset):
    """Items through ``head`` once (cached on disk under ``cache_dir``), then ``tail`` at every draw.

    Args:
        data: the datalist items.
        head: the deterministic transforms up to the training size (cached).
        tail: the transforms run per draw (random augmentation, flattening, typing); ``None``: none.
        cache_dir: the shared cache folder (see :class:`PreprocessedCache`).
        num_workers: processes that build missing records (0: in this process).
        section / report / file_key / allow_empty: as :class:`~cutremain_monai.data.set_aside.SetAsideDataset`
            (items whose head fails are left out, logged and listed in the ``set_aside.csv`` report).
        progress: show a progress bar while building.

    ``cache_stats`` tells how many records were built and how many were already there.
    """

    def __init__(self, data: Sequence[Mapping], head, tail: Callable | Sequence | None, cache_dir: str,
                 num_workers: int = 0, section: str = "training", report: str | None = None,
                 file_key: str | None = None, allow_empty: bool = False, progress: bool = False):
        self.cache = PreprocessedCache(cache_dir, head)
        self.tail = tail if tail is None or isinstance(tail, Compose) or callable(tail) else Compose(list(tail))
        self.section, self.report, self.file_key, self.allow_empty = section, report, file_key, allow_empty
        self.num_workers, self.progress = int(num_workers or 0), progress
        self.set_aside: list[dict] = []
        self.cache_stats: dict = {}
        self.data: list[Mapping] = []
        self.keys: list[str] = []
        self.set_data(data)

    # -- building --
    def _build(self, items: list, keys: list, todo: list[int]) -> dict[int, str]:
        """Build ``todo``; returns {index: reason} of the items whose head failed."""
        failed: dict[int, str] = {}
        if not todo:
            return failed
        ds = _Build(self.cache, items, keys, todo)
        workers = min(self.num_workers, len(todo), os.cpu_count() or 1)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                             collate_fn=_first, persistent_workers=False)
        it = loader
        if self.progress:
            from tqdm import tqdm  # optional progress bar of the build; tqdm comes with MONAI

            it = tqdm(loader, total=len(todo), desc=f"preprocessing {self.section}")
        for i, reason in it:
            if reason:
                failed[int(i)] = reason
        return failed

    def set_data(self, data: Sequence[Mapping]) -> None:
        items = [dict(d) for d in data]
        t0 = time.perf_counter()
        keys = [self.cache.key(d) for d in items]
        missing = [i for i, k in enumerate(keys) if not os.path.exists(self.cache.path(k))]
        rank, world = rank_and_world()
        mine = [i for n, i in enumerate(missing) if n % world == rank]
        failed = self._build(items, keys, mine)
        done = set(mine)
        rest = [i for i in missing if i not in done and not os.path.exists(self.cache.path(keys[i]))]
        failed.update(self._build(items, keys, rest))  # others' share still missing: node-local disk, or a crash
        self.set_aside = []
        kept, kept_keys = [], []
        for i, (item, key) in enumerate(zip(items, keys)):
            if i in failed:
                name = item_name(item, self.file_key)
                reason = scrub_paths(failed[i], item, name)
                self.set_aside.append({"section": self.section, "file": name, "reason": reason})
                logger.warning("%s: set aside %s (%s)", self.section, name, reason)
            else:
                kept.append(item)
                kept_keys.append(key)
        self.data, self.keys = kept, kept_keys
        self.cache_stats = {"items": len(items), "built": len(missing) - len(failed), "reused": len(items) - len(missing),
                            "set_aside": len(failed), "seconds": round(time.perf_counter() - t0, 3),
                            "folder": self.cache.folder}
        logger.info("%s: %d items, %d records built, %d reused, %d set aside in %.1f s (%s)", self.section, len(items),
                    self.cache_stats["built"], self.cache_stats["reused"], len(failed), self.cache_stats["seconds"],
                    self.cache.folder)
        if rank == 0:
            write_set_aside(self.report, self.section, self.set_aside)
        if items and not kept and not self.allow_empty:
            raise SetAsideError(f"{self.section}: all {len(items)} items were set aside"
                                + (f" (reasons in {self.report})" if self.report else f": first {self.set_aside[0]}"))

    # -- reading --
    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        item, key = self.data[index], self.keys[index]
        try:
            out = self.cache.read(key, item)
        except FileNotFoundError:  # the record was removed after the build (a cleared cache): build it again
            out = self.cache.compute(item)
            self.cache.write(key, item, out)
        return self.tail(out) if self.tail is not None else out
