"""``SetAsideDataset``: a MONAI ``CacheDataset`` that sets unreadable items aside instead of dying on them.

MONAI's ``CacheDataset`` runs the deterministic head of the transform chain (loading, resizing, ...) for every
cached item when it is built, and an exception there (a truncated JPEG, a missing file, a DICOM without pixel
data such as a presentation state listed as an image, a lung mask without two lungs) ends the whole run. This
subclass runs that head once per item inside a ``try``: an item that fails is left out of the dataset, logged with
its file and reason, listed in ``set_aside`` and written to a CSV report (``set_aside.csv`` in the bundle's output
folder, one row per item with its section); the rest train, validate or infer as usual. Items past the cache share
(``cache_rate < 1``) are screened the same way and their result discarded (they are decoded again when drawn: the
price of not holding them in memory). A section where every item fails raises, naming the report.

Only failures of the deterministic head are caught: an error in a random transform after it is a bug, not a bad
file, and is raised as usual.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from monai.data import CacheDataset
from monai.transforms import Compose

__all__ = ["SetAsideDataset", "SetAsideError", "REPORT_FIELDS", "read_set_aside", "scrub_paths", "error_reason",
           "item_name", "write_set_aside", "rank_and_world", "SetAsideStream", "SET_ASIDE_KEY"]

logger = logging.getLogger(__name__)
REPORT_FIELDS = ("section", "file", "reason")


SET_ASIDE_KEY = "set_aside_reason"  # on every sample of a SetAsideStream: "" or why the file was set aside


class SetAsideError(RuntimeError):
    """Every item of a section was set aside."""


def rank_and_world() -> tuple[int, int]:
    """This process's torch.distributed rank and the world size; ``(0, 1)`` outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def error_reason(e: BaseException) -> str:
    """The original error behind MONAI's ``RuntimeError("applying transform ...")`` wrappers, as one line."""
    while isinstance(e, RuntimeError) and e.__cause__ is not None and str(e).startswith("applying transform"):
        e = e.__cause__
    return f"{type(e).__name__}: {e}".replace("\n", " ")


def scrub_paths(reason: str, item, name: str) -> str:
    """``reason`` with the item's file paths replaced by ``name`` (or ``<key> of <name>``)."""
    if not isinstance(item, dict):
        return reason
    paths = sorted(((k, os.fspath(v)) for k, v in item.items() if isinstance(v, (str, os.PathLike))
                    and os.path.isabs(os.fspath(v))), key=lambda kv: -len(kv[1]))
    for k, p in paths:
        reason = reason.replace(p, name if k in ("image", "image_path") else f"{k} of {name}")
    return reason


def item_name(item, file_key: str | None = None) -> str:
    """The name of ``item`` in reports: ``file_key``'s value, else ``image_id``, else ``image``, else the first
    string value."""
    if isinstance(item, dict):
        keys = (file_key,) if file_key else ("image_id", "image")
        value = next((item[k] for k in keys if item.get(k) is not None), None)
        if value is None:
            value = next((v for v in item.values() if isinstance(v, (str, os.PathLike))), None)
        return os.fspath(value) if value is not None else "<item without a file>"
    return str(item)


def write_set_aside(report: str | None, section: str, rows: list[dict]) -> None:
    """Replace ``section``'s rows of the ``report`` CSV by ``rows`` (other sections' rows are kept)."""
    if not report:
        return
    kept = [r for r in read_set_aside(report) if r.get("section") != section] + list(rows)
    os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
    tmp = f"{report}.{os.getpid()}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=REPORT_FIELDS)
        w.writeheader()
        w.writerows(kept)
    os.replace(tmp, report)


def read_set_aside(path: str) -> list[dict]:
    """Rows of a ``set_aside.csv`` report (empty when it does not exist)."""
    if not path or not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class SetAsideDataset(CacheDataset):
    """Args:
        data / transform / cache_rate / num_workers / progress / copy_cache / as_contiguous: as ``CacheDataset``
            (``transform`` must be a ``Compose``; ``hash_as_key`` and ``runtime_cache`` are not supported).
        section: name of the datalist section in the report (``training``, ``validation``, ``test``, ``inference``).
        report: CSV path of the set-aside report; rows of other sections already in it are kept. ``None``: no file.
        file_key: the item key named in the report; default: ``image_id`` (the name a rooted datalist or a folder
            datalist gives, :mod:`cutremain_monai.io.paths`), else ``image``, else the first string value. Paths of
            the item quoted in an error message are replaced by that name, so the report and the log never hold
            a full path (which may carry the patient's name).
        allow_empty: when every item fails, return an empty dataset instead of raising.
    """

    def __init__(self, data: Sequence, transform: Compose | Callable, cache_rate: float = 1.0, num_workers: int | None = 0,
                 progress: bool = False, copy_cache: bool = True, as_contiguous: bool = True, section: str = "training",
                 report: str | None = None, file_key: str | None = None, allow_empty: bool = False):
        self.section = section
        self.report = report
        self.file_key = file_key
        self.allow_empty = allow_empty
        self.set_aside: list[dict] = []
        if not isinstance(transform, Compose):
            transform = Compose(transform)
        super().__init__(data=data, transform=transform, cache_rate=cache_rate, num_workers=num_workers,
                         progress=progress, copy_cache=copy_cache, as_contiguous=as_contiguous)

    def _name(self, item) -> str:
        return item_name(item, self.file_key)

    def set_data(self, data: Sequence) -> None:
        data = list(data)
        cache_target = min(int(self.set_num), int(len(data) * self.set_rate), len(data))
        kept, cache, self.set_aside = [], [], []
        self.data = data  # CacheDataset's own _load_cache_item runs the deterministic head of item i
        for i, item in enumerate(data):
            try:
                out = self._load_cache_item(i)
            except Exception as e:  # one bad file never ends the run: it is set aside with its reason
                reason = scrub_paths(error_reason(e), item, self._name(item))
                self.set_aside.append({"section": self.section, "file": self._name(item), "reason": reason})
                logger.warning("%s: set aside %s (%s)", self.section, self._name(item), reason)
                continue
            kept.append(item)
            if len(cache) < cache_target:
                cache.append(out)
        self.data = kept
        self.cache_num = len(cache)
        self._cache = cache
        self._write_report()
        if data and not kept and not self.allow_empty:
            raise SetAsideError(f"{self.section}: all {len(data)} items were set aside"
                                + (f" (reasons in {self.report})" if self.report else f": first {self.set_aside[0]}"))
        if self.set_aside:
            logger.warning("%s: %d of %d items set aside%s", self.section, len(self.set_aside), len(data),
                           f", listed in {self.report}" if self.report else "")

    def _write_report(self) -> None:
        if rank_and_world()[0] == 0:
            write_set_aside(self.report, self.section, self.set_aside)


class SetAsideStream(torch.utils.data.Dataset):
    """Items through ``transform`` at every draw, a failing item answered by a placeholder sample: for archives.

    :class:`SetAsideDataset` screens every item in the parent process before the first batch (decoding a 20,000-file
    archive twice, serially). Here an item is decoded once, in the DataLoader worker that draws it; when its
    transform fails the worker returns a placeholder (``placeholder_shape`` zeros as ``image``, the item's name
    keys, ``set_aside_reason`` with the reason, file paths replaced by the item's name) so the batch still stacks,
    and every sample carries ``set_aside_reason`` (``""`` when it was read). A prediction writer turns placeholders
    into rows with their error (:class:`~cutremain_monai.handlers.ClassificationPredictions`), so nothing is dropped
    and nothing is scored twice.

    Args:
        data / transform: the items and the whole chain (a list of samples per item is fine: split halves).
        placeholder_shape: the ``image`` shape of the model input, e.g. ``(1, 448, 448)``.
        file_key: the item key that names it (see :func:`item_name`); keys: item keys copied to a placeholder.
        placeholder_keys: other inputs of the model given to a placeholder as zeros of these shapes, e.g.
            ``{"lung_mask": (1, 256, 256), "zones": (1, 256, 256)}``, so that a batch of placeholders only (every
            file of it unreadable) still goes through the network.
    """

    def __init__(self, data: Sequence, transform: Callable, placeholder_shape: Sequence[int],
                 file_key: str | None = "image_id", keys: Sequence[str] = ("image_id", "image_path"),
                 placeholder_keys: Mapping[str, Sequence[int]] | None = None):
        self.data = list(data)
        self.transform = transform if isinstance(transform, Compose) or not isinstance(transform, (list, tuple)) \
            else Compose(list(transform))
        self.placeholder_shape = tuple(int(v) for v in placeholder_shape)
        self.placeholder_keys = {str(k): tuple(int(v) for v in shape) for k, shape in (placeholder_keys or {}).items()}
        self.file_key, self.keys = file_key, tuple(keys)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        item = self.data[index]
        try:
            out = self.transform(dict(item))
        except Exception as e:  # one bad file never ends the scoring: a placeholder carries its reason
            name = item_name(item, self.file_key)
            reason = scrub_paths(error_reason(e), item, name)
            logger.warning("set aside %s (%s)", name, reason)
            d = {k: item[k] for k in self.keys if k in item}
            d.setdefault("image_path", item.get("image"))
            d.update({k: torch.zeros(shape) for k, shape in self.placeholder_keys.items()})
            d.update(image=torch.zeros(self.placeholder_shape), **{SET_ASIDE_KEY: reason})
            return d
        for s in out if isinstance(out, list) else [out]:
            s[SET_ASIDE_KEY] = ""
        return out
