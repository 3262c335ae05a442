"""What relevant-area boxes remove (issue 28; clavicle docs, "Cut&Remain's premise"): Cut&Remain trained on the
subtle-lesion phantoms with lesion boxes only (as FracAtlas boxes only fractures), without and with
``--relevant_area_boxes``, over training seeds; then :func:`~cutremain_monai.experiments.premise.copy_scores` on
the test images' relevant areas (the generator's boxes, which these runs never saw): the mean probability the model
gives to Cut&Remain copies of normal and of positive test images, and the test AUC.

    python tools/relevant_area_check.py OUTPUT_DIR [--seeds 0,1,2] [--images 300] [--contrast 0.15]

Resumable (a trained run is not trained again). Writes ``copy_scores.json`` and ``relevant_area_table.md`` under
``OUTPUT_DIR``; the last line printed is the table's rows as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(split_halves=False, image_size=[128, 128], network_depth=18, epochs=15, batch_size=16, num_copies=2,
                cam_images=0, lesion_box_labels=["lesion"], register_model=False, threshold_rule="youden",
                localization_report=False, augmentation="cut_remain")


def table_md(out: dict) -> str:
    lines = ["| seed | relevant-area boxes | normal copies | positive copies | normal originals | positive originals | copies AUC | test AUC |",
             "|---|---|---|---|---|---|---|---|"]
    for c in out.values():
        lines.append(f"| {c['seed']} | {'yes' if c['relevant_area'] else 'no'} | {c['normal_copies']:.3f} | {c['positive_copies']:.3f} "
                     f"| {c['normal_originals']:.3f} | {c['positive_originals']:.3f} | {c['copies_auc']:.3f} | {c['test_auc']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from cutremain_monai.data.phantoms import generate_subtle_samples
    from cutremain_monai.experiments.cross_validation import train_and_test
    from cutremain_monai.experiments.premise import copy_scores

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--contrast", type=float, default=0.15)
    args = p.parse_args(argv)
    root = os.path.abspath(args.output_dir)
    for name, boxes in (("lesion_only", False), ("full", True)):
        if not os.path.exists(os.path.join(root, name, "datalist.json")):
            generate_subtle_samples(os.path.join(root, name), args.images, contrast=args.contrast, relevant_boxes=boxes)
    bundle = os.path.join(ROOT, "bundles", "clavicle_fracture")
    out = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for ra in (False, True):
            run = os.path.join(root, "runs", f"seed{seed}", f"relevant_area_{ra}")
            if not os.path.exists(os.path.join(run, "test_metrics.json")):
                train_and_test(bundle, os.path.join(root, "lesion_only", "datalist.json"), run, task="subtle", seed=seed,
                               relevant_area_boxes=ra, **SETTINGS)
            c = copy_scores(bundle, run, os.path.join(root, "full", "datalist.json"), task="subtle",
                            box_labels=["relevant_area"], **SETTINGS)
            with open(os.path.join(run, "test_metrics.json")) as f:
                c["test_auc"] = json.load(f)["auc"]
            out[f"seed{seed}_relevant_area_{ra}"] = {"seed": seed, "relevant_area": ra, **c}
            print(json.dumps(out[f"seed{seed}_relevant_area_{ra}"]), flush=True)
    with open(os.path.join(root, "copy_scores.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(root, "relevant_area_table.md"), "w") as f:
        f.write(table_md(out))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
