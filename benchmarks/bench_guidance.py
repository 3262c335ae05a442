"""Seconds per training step of guided training against the plain step, measured in the same run (issue 13).

ResNet-18 (``cutremain_monai.networks.resnet``: stride-2 stem, one channel), random weights, a batch of 16 images
at 224x224 with a box mask on each, SGD (momentum 0.9). A step is what the bundle's trainer runs per iteration:
forward, losses, backward, gradient clipping where the method has it, optimiser step. Timed per round, interleaved
so every variant sees the same state of a shared machine, medians over the rounds:

* plain: MONAI's ``SupervisedTrainer`` step (``GuidedTraining("none")``), 1 logit (BCE);
* gain: GAIN_ext (differentiable Grad-CAM at ``layer4``, attention-mining forward with BatchNorm frozen, L_e);
* isnet: ISNet, selective single map (LRP with ``create_graph``, heatmap loss), 1 logit (binary, BCE);
* isnet_2 / isnet_14: the same with 2 and with 14 classes (multi-label BCE): the selective map is one map whatever
  the number of classes, so the ratio should stay near 1;
* inference forward (``torch.no_grad()``) of a model after an ISNet step and of the plain model: ISNet changes
  the weights only, so inference costs the same.

Every guided variant runs the clavicle bundle's default guided settings (read from its ``configs/train.yaml``:
GWRP decay, P, clipping, BatchNorm handling, GAIN's sigma / omega / weights), so the ratio is the one a user of
the bundle pays. CUDA (with AMP for plain and GAIN; ISNet runs float32 by design) when available; on CPU torch runs on 2 threads.
Last line: one JSON object with gain_vs_plain, isnet_vs_plain, isnet_14_vs_2_classes, isnet_inference_vs_plain.
Targets: isnet_vs_plain <= 3.0, isnet_14_vs_2_classes <= 1.2, isnet_inference_vs_plain <= 1.02, gain_vs_plain <= 3.0.
"""

import json
import os
import statistics
import sys
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from monai.engines import SupervisedTrainer  # noqa: E402

from cutremain_monai.engines.guided_training import GuidedTraining  # noqa: E402
from cutremain_monai.engines.prepare_batch import BoxBatchPrepare  # noqa: E402
from cutremain_monai.networks import resnet  # noqa: E402

BATCH, SIZE, ROUNDS = 16, 224, int(os.environ.get("BENCH_ROUNDS", 5))
BUNDLE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles", "clavicle_fracture", "configs", "train.yaml")


def bundle_step_settings(path: str = BUNDLE_CONFIG) -> dict:
    """The guided step's settings of the bundle's defaults (GuidedTraining keyword -> value)."""
    with open(path) as f:
        cfg = yaml.safe_load(f)
    names = {"gain_sigma": "gain_sigma", "gain_omega": "gain_omega", "gain_alpha": "gain_alpha", "gain_omega_e": "gain_omega_e",
             "isnet_p": "isnet_p", "isnet_variant": "isnet_variant", "isnet_decay": "isnet_decay", "isnet_e": "isnet_e",
             "guidance_batchnorm": "batchnorm", "guidance_balance": "balance", "clip_grad_norm": "clip_grad_norm"}
    return {kw: cfg[key] for key, kw in names.items()}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(guidance: str, classes: int, device, settings: dict):
    torch.manual_seed(0)
    net = resnet(18, num_classes=classes).to(device)
    mode = "binary" if classes == 1 else "multilabel"
    step = GuidedTraining(guidance, label_mode=mode, warmup_epochs=0, isnet_band=(1.0, 25.0), layer="layer4",
                          **settings)
    trainer = SupervisedTrainer(device=device, max_epochs=1, train_data_loader=[None], network=net,
                                optimizer=torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9),
                                loss_function=torch.nn.BCEWithLogitsLoss(), prepare_batch=BoxBatchPrepare(label_mode=mode),
                                amp=device.type == "cuda" and guidance != "isnet")
    trainer.state.epoch, trainer.state.iteration = 1, 1
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(BATCH, 1, SIZE, SIZE)
    mask[:, :, 60:140, 50:150] = 1
    label = (torch.rand(BATCH, classes, generator=g) > 0.5).float()
    batch = {"image": torch.rand(BATCH, 1, SIZE, SIZE, generator=g), "label": label[:, 0] if classes == 1 else label, "box_mask": mask}
    return (lambda: step(trainer, batch)), net


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(2)
    variants = {"plain": ("none", 1), "gain": ("gain", 1), "isnet": ("isnet", 1), "isnet_2": ("isnet", 2), "isnet_14": ("isnet", 14)}
    settings = bundle_step_settings()
    steps, nets = {}, {}
    for name, (guidance, classes) in variants.items():
        steps[name], nets[name] = _setup(guidance, classes, device, settings)
    x = torch.rand(BATCH, 1, SIZE, SIZE, device=device)
    plain_net, isnet_net = nets["plain"].eval(), nets["isnet"]
    steps["isnet"]()  # the ISNet model has taken a guided step before its inference is timed
    isnet_net.eval()

    def infer(net):
        def run():
            net.eval()
            with torch.no_grad():
                for _ in range(3):
                    out = net(x)
            return out
        return run

    calls = {**steps, "infer_plain": infer(plain_net), "infer_isnet": infer(isnet_net)}
    for fn in calls.values():  # warm-up
        fn()
    _sync(device)
    times = {name: [] for name in calls}
    for _ in range(ROUNDS):
        for name, fn in calls.items():
            if name in steps:
                nets[name].train()
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:<12} {v * 1000:9.1f} ms per step of {BATCH} at {SIZE}px ({device.type})")
    result = {
        "gain_vs_plain": round(med["gain"] / med["plain"], 3),
        "isnet_vs_plain": round(med["isnet"] / med["plain"], 3),
        "isnet_14_vs_2_classes": round(med["isnet_14"] / med["isnet_2"], 3),
        "isnet_inference_vs_plain": round(med["infer_isnet"] / med["infer_plain"], 3),
        "plain_step_s": round(med["plain"], 4),
        "device": device.type,
        "rounds": ROUNDS,
        "settings": {k: v for k, v in settings.items() if k in ("isnet_decay", "batchnorm", "clip_grad_norm", "balance")},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
