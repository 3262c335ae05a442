"""Sliding-window targetness map of one image: batched windows (``unfold`` + batched forwards + ``fold``) against a
Python loop over the windows, in the same run (issue 14).

The background-learning patch classifier (ResNet-18, one channel, random weights, eval mode) over a 256x256 image
with 48x48 windows at stride 8 (27 x 27 = 729 windows): the batched path is
:func:`~cutremain_monai.localization.targetness.targetness_map` (1024 windows per forward); the loop crops each
window, scores it alone and adds its score to the pixels it covers, then divides by the coverage (the same map, checked).
CUDA when available; on CPU torch runs on 2 threads. Medians over rounds.
Last line: one JSON object with batched_vs_loop (time ratio; target at most 0.2) and maps_per_second (batched).
"""

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cutremain_monai.localization.targetness import targetness_map  # noqa: E402
from cutremain_monai.networks import patch_classifier  # noqa: E402

SIZE, WINDOW, STRIDE, ROUNDS = 256, 48, 8, int(os.environ.get("BENCH_ROUNDS", 3))


def loop_map(model, x):
    h, w = x.shape[-2:]
    total = torch.zeros(h, w, device=x.device)
    cover = torch.zeros(h, w, device=x.device)
    with torch.no_grad():
        for y in range(0, h - WINDOW + 1, STRIDE):
            for c in range(0, w - WINDOW + 1, STRIDE):
                p = torch.sigmoid(model(x[:, :, y : y + WINDOW, c : c + WINDOW]))[0, 0]
                total[y : y + WINDOW, c : c + WINDOW] += p
                cover[y : y + WINDOW, c : c + WINDOW] += 1
    m = total / cover
    return ((m - m.min()) / (m.max() - m.min()))[None, None]


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(2)
    torch.manual_seed(0)
    model = patch_classifier("resnet18").to(device).eval()
    x = torch.rand(1, 1, SIZE, SIZE, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    batched = targetness_map(model, x, WINDOW, STRIDE)
    looped = loop_map(model, x)
    assert torch.allclose(batched, looped, atol=1e-4), float((batched - looped).abs().max())
    times = {"batched": [], "loop": []}
    for _ in range(ROUNDS):
        for name, fn in (("batched", lambda: targetness_map(model, x, WINDOW, STRIDE)), ("loop", lambda: loop_map(model, x))):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    windows = ((SIZE - WINDOW) // STRIDE + 1) ** 2
    print(f"batched {med['batched']:.3f} s, loop {med['loop']:.3f} s per {SIZE}px map ({windows} windows, {device.type})")
    print(json.dumps({"batched_vs_loop": round(med["batched"] / med["loop"], 3), "maps_per_second": round(1 / med["batched"], 3),
                      "windows": windows, "device": device.type, "rounds": ROUNDS}))


if __name__ == "__main__":
    main()
