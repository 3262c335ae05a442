"""``cutremain localize``: where a trained bundle model looks, scored against the boxes of a datalist section."""

from __future__ import annotations

import os

from cutremain_monai.cli.common import comma_list, overrides_and_output

__all__ = ["register"]


def localize_command(args) -> int:
    from cutremain_monai.experiments.localize import localize  # lazy: `cutremain --help` starts without torch
    from cutremain_monai.metrics.localization import localization_table_md  # lazy: as above

    overrides, output = overrides_and_output(args, "localization")
    table = localize(os.path.abspath(args.bundle), args.checkpoint, os.path.abspath(args.datalist), output,
                     section=args.section, methods=comma_list(args.methods), task=args.task,
                     tau_section=None if args.tau_section in ("", "none") else args.tau_section,
                     tracking_uri=args.tracking_uri, overlays=args.overlays, **overrides)
    print(localization_table_md(table))
    print(f"results: {output}/{args.section}_localization.csv, {args.section}_localization_table.md, "
          f"{args.section}_localization_overlays/")
    return 0


def register(sub) -> None:
    """Add ``localize`` to the ``cutremain`` subparsers."""
    p = sub.add_parser("localize", help="maps (CAM, Grad-CAM, Grad-CAM++, LRP) of a trained bundle model on a datalist "
                       "section, scored against the boxes: per-image CSV, table, overlays, MLflow")
    p.add_argument("--bundle", required=True)
    p.add_argument("--checkpoint", required=True, help="the model's weights (e.g. outputs/<run>/checkpoints/model.pt)")
    p.add_argument("--datalist", required=True)
    p.add_argument("--task", default=None)
    p.add_argument("--section", default="test")
    p.add_argument("--tau-section", default="validation", help="section that chooses Loc. Acc.'s threshold (none: max over tau)")
    p.add_argument("--methods", default="cam,gradcam,lrp", help="comma-separated: cam, gradcam, gradcam_pp, lrp")
    p.add_argument("--overlays", type=int, default=16, help="cases drawn (methods side by side)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI to log the table and overlays to")
    p.add_argument("--overrides", help='JSON of bundle overrides (the training settings: image_size, network_depth, ...)')
    p.add_argument("-o", "--output")
    p.set_defaults(func=localize_command)
