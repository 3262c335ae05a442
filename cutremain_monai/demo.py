"""``make demo``: baseline against Cut&Remain on the synthetic clavicle phantoms in ``dicom_samples/``.

Both runs use the clavicle bundle with the CPU override set at the halves' native 128x64 px (ResNet-18, stride-2 stem), the same seed,
the same epochs; Cut&Remain adds 2 of the 9 aspect-ratio copies per annotated half per step. Printed: test AUC,
F1 and accuracy (threshold chosen on validation), Grad-CAM energy inside the ground-truth boxes, and where the
MLflow store, the checkpoints and the overlays are. The ingest report of the samples is printed first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

import torch

from cutremain_monai.experiments.cross_validation import train_and_test
from cutremain_monai.experiments.feature_similarity import augmentation_pairs
from cutremain_monai.io.datalist import load_datalist
from cutremain_monai.io.ingest import ingest
from cutremain_monai.metrics.feature_similarity import feature_distances
from cutremain_monai.networks import resnet


def main(argv=None) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(prog="python -m cutremain_monai.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", default=os.path.join(root, "outputs", "demo"), help="output folder (default %(default)s)")
    p.add_argument("--epochs", type=int, default=int(os.environ.get("DEMO_EPOCHS", 30)),
                   help="training epochs (default 30, or DEMO_EPOCHS)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch's CPU threads (default 2): the numbers depend on it, since float sums are split among "
                        "the threads; the docs' tables were made with 2, whatever OMP_NUM_THREADS says")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    samples = os.path.join(root, "dicom_samples")
    bundle = os.path.join(root, "bundles", "clavicle_fracture")
    out_dir = os.path.abspath(args.output)
    os.makedirs(out_dir, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    logging.getLogger("cutremain_monai.io.ingest").setLevel(logging.ERROR)  # the report below lists them

    print(f"(torch CPU threads: {torch.get_num_threads()}; the numbers below are the docs' at 2)")
    print("== 1. ingest of dicom_samples/ as a PACS export (boxes from the presentation states)")
    report = ingest(samples, os.path.join(out_dir, "ingest_datalist.json"), gsps=True, split=(0.6, 0.2, 0.2), progress=False)
    print(report.summary())

    settings = dict(epochs=args.epochs, image_size=[128, 64], network_depth=18, batch_size=16,
                    cam_images=8, seed=0, experiment_name="demo_clavicle",
                    cache_dir=os.path.join(out_dir, ".preprocessed"),  # not beside the committed samples' datalist
                    tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.join(out_dir, "mlruns.db"))
    results = {}
    for aug, extra in (("none", {}), ("cut_remain", {"num_copies": 2})):
        print(f"\n== 2. training clavicle_fracture with augmentation={aug} ({settings['epochs']} epochs, CPU settings)")
        t = time.time()
        # a fresh run each time: the bundle resumes from the newest checkpoint in its folder, which would make a second
        # demo (or one with other epochs) continue the first instead of training again
        shutil.rmtree(os.path.join(out_dir, aug), ignore_errors=True)
        m = train_and_test(bundle, os.path.join(samples, "datalist.json"), os.path.join(out_dir, aug), task="clavicle",
                           augmentation=aug, run_name=f"demo_{aug}", **settings, **extra)
        m["minutes"] = round((time.time() - t) / 60, 2)
        results[aug] = {**m, "threads": args.threads}
    print("\n== 3. results on the synthetic clavicle test split (halves; threshold chosen on validation)")
    print(f"{'augmentation':<12} {'AUC':>6} {'F1':>6} {'acc':>6} {'CAM in box':>11} {'minutes':>8}")
    for aug, m in results.items():
        print(f"{aug:<12} {m['auc']:6.3f} {m['f1']:6.3f} {m['accuracy']:6.3f} {m.get('cam_energy_in_box', float('nan')):11.3f} {m['minutes']:8.2f}")
    print("\n== 4. feature similarity (paper Table 6): last-conv features of validation halves vs their augmented copy")
    val_items = load_datalist(os.path.join(samples, "datalist.json"), "validation", task="clavicle")
    print(f"{'model':<12} {'augmentation':<14} {'euclidean':>10} {'cosine':>8} {'pairs':>6}")
    for model_aug in results:
        net = resnet(settings["network_depth"])
        net.load_state_dict(torch.load(os.path.join(out_dir, model_aug, "checkpoints", "model.pt"), map_location="cpu", weights_only=True))
        for aug in ("cut_remain", "sup_cutout", "hide_and_seek"):
            d = feature_distances(net, augmentation_pairs(bundle, val_items, aug, settings["image_size"]))
            results[model_aug][f"features_{aug}"] = d
            print(f"{model_aug:<12} {aug:<14} {d['euclidean']:10.3f} {d['cosine']:8.4f} {d['pairs']:6d}")
    with open(os.path.join(out_dir, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nMLflow store:      {settings['tracking_uri']} (experiment demo_clavicle, registered model clavicle_fracture)")
    print(f"Grad-CAM overlays: {os.path.join(out_dir, '<augmentation>', 'cam_overlays')}")
    print(f"results:           {os.path.join(out_dir, 'demo_results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
