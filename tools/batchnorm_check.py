"""Does a checkpoint's eval mode match its weights? AUC and mean prediction per datalist section with the BatchNorm
running statistics as saved, and again after recomputing them from all the training section's images, without
augmentation, in batches of ``--batch-size`` (``cutremain_monai.handlers.recompute_batchnorm_statistics``, what the
bundle's ``precise_bn_batches`` does with its training batches). Binary classifiers (one logit).

``python tools/batchnorm_check.py bundles/clavicle_fracture DATALIST CHECKPOINT --task shortcut --image-size 128``

A large difference (mean prediction near 0 or 1 as saved) is a running average that lags the weights (issue 30:
ISNet's checkpoints before precise BatchNorm). Reads the bundle's ``train.yaml`` + ``cpu.yaml`` with
``split_halves`` off; prints one line per state."""

import argparse
import sys

import numpy as np
import torch

from cutremain_monai.engines.bundle import bundle_parser, load_network
from cutremain_monai.handlers import recompute_batchnorm_statistics
from cutremain_monai.io.datalist import load_datalist
from cutremain_monai.metrics.classification import mean_auc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("datalist")
    ap.add_argument("checkpoint")
    ap.add_argument("--task", default=None, help="the datalist's task (the section key), e.g. shortcut")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    size = [args.image_size, args.image_size]
    parser = bundle_parser(args.bundle, ["train.yaml", "cpu.yaml"], datalist=args.datalist, split_halves=False, image_size=size)
    chain = parser.get_parsed_content("preprocessing")
    data = {}
    for section in ("training", "validation", "test"):
        items = load_datalist(args.datalist, section, task=args.task)
        if items:
            data[section] = (torch.stack([torch.as_tensor(chain(dict(it))["image"]).float() for it in items]),
                             np.asarray([int(it["label"]) for it in items]))
    if "training" not in data:
        print(f"{args.datalist}: no training section to recompute the statistics from", file=sys.stderr)
        return 1

    def report(model, state):
        with torch.no_grad():
            parts = []
            for section, (x, y) in data.items():
                p = torch.cat([torch.sigmoid(model(x[i : i + 64])).reshape(-1) for i in range(0, len(x), 64)]).numpy()
                parts.append(f"{section} AUC {mean_auc(y, p):.3f} mean prediction {p.mean():.2f}")
        print(f"{state}: " + " | ".join(parts))

    model = load_network(parser, args.checkpoint)
    report(model, "as saved")
    x = data["training"][0]
    n = recompute_batchnorm_statistics(model, (x[i : i + args.batch_size] for i in range(0, len(x), args.batch_size)))
    report(model.eval(), f"recomputed ({n} batches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
