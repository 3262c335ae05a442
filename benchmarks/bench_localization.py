"""Seconds per image of each localisation map against the model's plain forward, measured in the same run.

ResNet-18 (``cutremain_monai.networks.resnet(18)``: stride-2 stem, one channel, one logit), random weights, eval
mode, a batch of 16 images at 224x224. Timed per round, interleaved so every method sees the same state of a
shared machine, medians over the rounds:

* forward: ``model(x)`` under ``torch.no_grad()`` (the reference);
* Grad-CAM at the default layer (``layer3``, 14x14) and Grad-CAM++ (``cutremain_monai.localization.grad_cam``);
* CAM (``cutremain_monai.localization.cam``, features entering ``avgpool`` times the ``fc`` weights);
* LRP (``cutremain_monai.localization.lrp.lrp``) when that module imports; on a model it rejects, on
  ``make_lrp_ready(model)`` (same weights and outputs). ``null`` when it is not there.

Every map is for the one logit (``target=0``), at the input size. CUDA is used when available; on CPU torch runs
on 2 threads. Last line: one JSON object with gradcam_vs_forward, gradcam_pp_vs_forward, cam_vs_forward and
lrp_vs_forward. Targets: gradcam_vs_forward at most 3, lrp_vs_forward at most 4.
"""

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cutremain_monai.localization.cam import cam  # noqa: E402
from cutremain_monai.localization.grad_cam import DEFAULT_LAYER, grad_cam  # noqa: E402
from cutremain_monai.networks import resnet  # noqa: E402

BATCH, SIZE, ROUNDS = 16, 224, 7


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _lrp_method(model, x):
    """``(callable, note)`` for LRP, or ``(None, reason)`` when the module is not available."""
    try:
        from cutremain_monai.localization import lrp as lrp_module
    except Exception as e:  # not written yet, or broken: report null
        return None, f"cutremain_monai.localization.lrp unavailable ({type(e).__name__}: {e})"
    try:
        lrp_module.lrp(model, x[:1], 0)
        net, note = model, "lrp on resnet(18)"
    except Exception as first:
        if not hasattr(lrp_module, "make_lrp_ready"):
            return None, f"lrp rejected resnet(18): {type(first).__name__}: {first}"
        net, note = lrp_module.make_lrp_ready(model), "lrp on make_lrp_ready(resnet(18))"
    return (lambda: lrp_module.lrp(net, x, 0)), note


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(2)
    torch.manual_seed(0)
    model = resnet(18).to(device).eval()
    x = torch.rand(BATCH, 1, SIZE, SIZE, device=device)

    def forward():
        with torch.no_grad():
            return model(x)

    methods = {
        "forward": forward,
        "gradcam": lambda: grad_cam(model, x, 0),
        "gradcam_pp": lambda: grad_cam(model, x, 0, plus_plus=True),
        "cam": lambda: cam(model, x, 0),
    }
    lrp_call, lrp_note = _lrp_method(model, x)
    if lrp_call is not None:
        methods["lrp"] = lrp_call
    for fn in methods.values():  # warm-up (allocator, kernels)
        fn()
    _sync(device)
    times = {name: [] for name in methods}
    for _ in range(ROUNDS):
        for name, fn in methods.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t) / BATCH)
    per_image = {name: statistics.median(v) for name, v in times.items()}
    ref = per_image["forward"]

    def ratio(name):
        return round(per_image[name] / ref, 3) if name in per_image else None

    print(json.dumps({"s_per_image": {k: round(v, 5) for k, v in per_image.items()}, "lrp": lrp_note}))
    print(json.dumps({
        "setup": f"ResNet-18 (stride-2 stem), 1x{SIZE}x{SIZE}, batch {BATCH}, {device.type}"
                 + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
                 + f", Grad-CAM layer {DEFAULT_LAYER}, medians of {ROUNDS} interleaved rounds",
        "forward_s_per_image": round(ref, 5),
        "gradcam_vs_forward": ratio("gradcam"),
        "gradcam_pp_vs_forward": ratio("gradcam_pp"),
        "cam_vs_forward": ratio("cam"),
        "lrp_vs_forward": ratio("lrp"),
    }))


if __name__ == "__main__":
    main()
