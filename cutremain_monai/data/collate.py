"""Collation for samples that carry boxes.

MONAI's ``list_data_collate`` flattens the lists returned by per-sample expansions (``CutRemaind``,
``SplitHalvesd``) but stacks every key, and boxes have a different count per sample. This keeps the
variable-length keys as plain per-sample lists and collates the rest with ``list_data_collate``.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.data import list_data_collate

from cutremain_monai.constants import BOX_LABELS, BOXES

__all__ = ["box_list_data_collate", "VARIABLE_LENGTH_KEYS"]

VARIABLE_LENGTH_KEYS = (BOXES, BOX_LABELS, "gsps", "zone_scores_raw")


def _flatten(batch):
    for item in batch:
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        else:
            yield item


def box_list_data_collate(batch: Sequence, list_keys: Sequence[str] = VARIABLE_LENGTH_KEYS) -> dict:
    """``list_data_collate`` with ``list_keys`` returned as lists (one entry per flattened sample)."""
    flat = list(_flatten(batch))
    lists = {k: [s.get(k) for s in flat] for k in list_keys if any(k in s for s in flat)}
    rest = [{k: v for k, v in s.items() if k not in lists} for s in flat]
    out = list_data_collate(rest)
    out.update(lists)
    return out
