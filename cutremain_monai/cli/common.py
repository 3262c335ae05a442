"""Pieces the command groups share: comma lists, JSON overrides, the output folder of a bundle runner, and the
datalist items that can be read (the others named, never silently dropped)."""

from __future__ import annotations

import argparse
import json
import os

__all__ = ["comma_list", "overrides_and_output", "readable_items", "add_bundle_arguments", "print_file"]


def comma_list(text: str | None, default: str = "") -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (``default`` when ``text`` is empty or None)."""
    return [v.strip() for v in (text or default).split(",") if v.strip()]


def overrides_and_output(args, name: str) -> tuple[dict, str]:
    """The ``--overrides`` JSON of a bundle runner (``{}`` when absent) and its output folder (``-o``, else
    ``<bundle>/outputs/<name>``)."""
    try:
        overrides = json.loads(args.overrides) if args.overrides else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"--overrides is not JSON: {e}") from e
    return overrides, (args.output or os.path.join(args.bundle, "outputs", name))


def readable_items(datalist: str, task: str | None) -> list[dict]:
    """Every section's items, with the files that cannot be read set aside and named (never silently dropped)."""
    from cutremain_monai.io.datalist import load_datalist  # lazy: `cutremain --help` starts without torch
    from cutremain_monai.io.loader import split_readable  # lazy: as above

    items = []
    for section in ("training", "validation", "test"):
        try:
            items += load_datalist(datalist, section, task=task)
        except KeyError:
            pass
    items, bad = split_readable(items)
    for path, reason in bad:
        print(f"set aside (unreadable): {path}: {reason}")
    return items


def add_bundle_arguments(p: argparse.ArgumentParser, datalist: bool = True, task: bool = True, seed: bool = True,
                         output_name: str = "") -> None:
    """``--bundle`` (required), ``--datalist``, ``--task``, ``--seed``, ``--overrides`` and ``-o``: the flags every
    bundle runner takes."""
    p.add_argument("--bundle", required=True, help="the bundle folder (e.g. bundles/clavicle_fracture)")
    if datalist:
        p.add_argument("--datalist", default="dicom_samples/datalist.json", help="datalist JSON (default: %(default)s)")
    if task:
        p.add_argument("--task", default=None, help="section of a multi-task datalist (e.g. clavicle)")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="seed of the splits and the training runs (default 0)")
    p.add_argument("--overrides", help='JSON of bundle settings, e.g. \'{"epochs": 10, "image_size": [128, 128]}\'')
    p.add_argument("-o", "--output", help=f"output folder (default: <bundle>/outputs/{output_name or '<kind>'})")


def print_file(path: str) -> None:
    """Print a text file written by a runner (its table)."""
    with open(path) as f:
        print(f.read())
