"""``cutremain``: the command line of cutremain_monai.

Data in (``ingest``, ``import``, ``samples``), results out and the DICOM node (``infer``, ``listen``, ``send``,
``deidentify``), where a model looks (``localize``), and the studies (``experiment <kind>``, each kind its own
subcommand with its own flags). ``cutremain <command> --help`` is the manual of each.

One module per command group (:mod:`.data`, :mod:`.pacs`, :mod:`.localize`, :mod:`.experiment`); each command
imports what it runs only when it runs, so ``cutremain --help`` answers without loading torch.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cutremain_monai.cli import data, experiment, localize, pacs

__all__ = ["main", "build_parser"]

EPILOG = """examples:
  cutremain ingest /data/export --gsps --split 0.7,0.15,0.15 -o work/datalist.json
  cutremain import fracatlas manifest.csv --images images --region hip -o work/hip.json
  cutremain experiment compare --bundle bundles/clavicle_fracture --datalist work/hip.json --folds 5
  cutremain infer --bundle bundles/clavicle_fracture --input /data/new --dicom-out work/dicom
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``cutremain`` parser with every command group registered."""
    parser = argparse.ArgumentParser(prog="cutremain", description="Teach X-ray classifiers to look at the small region "
                                     "that matters: DICOM in, box-supervised training and weak localisation through "
                                     "MONAI bundles, results back to the PACS. `cutremain <command> --help` for each.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for group in (data, pacs, localize, experiment):
        group.register(sub)
    return parser


def main(argv=None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the command; returns its exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
