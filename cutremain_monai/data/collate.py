"""Collation for samples that carry boxes.

MONAI's ``list_data_collate`` flattens the lists returned by per-sample expansions (``CutRemaind``,
``SplitHalvesd``) but stacks every key, and boxes have a different count per sample. This keeps the
variable-length keys as plain per-sample lists and collates the rest with ``list_data_collate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import list_data_collate

from cutremain_monai.constants import BOX_LABELS, BOXES
from cutremain_monai.data.set_aside import SET_ASIDE_KEY

__all__ = ["box_list_data_collate", "VARIABLE_LENGTH_KEYS"]

VARIABLE_LENGTH_KEYS = (BOXES, BOX_LABELS, "gsps", "zone_scores_raw")


def _flatten(batch):
    for item in batch:
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        else:
            yield item


def _fill_placeholders(flat: list) -> list:
    """Placeholders of files set aside (``set_aside_reason`` not empty) get the keys the read samples of the batch
    have (tensors as zeros, other values as ``None``), so the batch stacks."""
    read = [s for s in flat if isinstance(s, dict) and not s.get(SET_ASIDE_KEY)]
    if not read or len(read) == len(flat):
        return flat
    template = read[0]
    out = []
    for s in flat:
        if isinstance(s, dict) and s.get(SET_ASIDE_KEY):
            s = dict(s)
            for k, v in template.items():
                if k not in s:
                    s[k] = torch.zeros_like(torch.as_tensor(v)) if isinstance(v, (torch.Tensor, np.ndarray)) else \
                        type(v)() if isinstance(v, (int, float, str)) else v
        out.append(s)
    return out


def box_list_data_collate(batch: Sequence, list_keys: Sequence[str] = VARIABLE_LENGTH_KEYS) -> dict:
    """``list_data_collate`` with ``list_keys`` returned as lists (one entry per flattened sample); placeholders of
    files set aside (:class:`~cutremain_monai.data.set_aside.SetAsideStream`) stack with the read samples."""
    flat = _fill_placeholders(list(_flatten(batch)))
    lists = {k: [s.get(k) for s in flat] for k in list_keys if any(k in s for s in flat)}
    rest = [{k: v for k, v in s.items() if k not in lists} for s in flat]
    out = list_data_collate(rest)
    out.update(lists)
    return out
