"""Lung-zone max pooling (forward + backward) as a share of a SeverityViT training step, both measured in one run
on the same batch.

The step is what the covid_severity bundle's trainer does per iteration: ``SeverityViT`` forward (DenseNet-121
features, transformer, map head, lung mask, ``LungZoneMaxPool``), ``ZoneBCELoss``, backward, ``AdamW`` step
(autocast + gradient scaling on CUDA, as ``amp`` does in train.yaml). The pooling call is ``LungZoneMaxPool`` on a
``(B, 1, H, W)`` float32 lesion map with ``requires_grad`` and the uint8 zone map ``SeverityPrepareBatch`` gives,
then backward from the six zone values. Zone maps are what the pipeline feeds the pool: ``split_lung_zones``
(LungZonesd) on the phantoms' two-lung masks (``phantom_lung_zone_maps``). Timings are interleaved (every round
times one training step, then the pooling several times, so both see the same state of a shared machine) and
reported as medians.

Configurations: by default the SMALL transformer sizes at 128 px, batch 8 (seconds on a CPU); ``--paper`` (or
``BENCH_ZONE_POOL_PAPER=1``) the paper's ViT-B/16 sizes (``VIT_B16``) at 256 px, batch 16 (about 20 s a step on
2 CPU threads). CUDA is used when available; on CPU torch runs on 2 threads.

Last line: one JSON object with ``zone_pool_share_of_step``. Target: at most 0.01 (pooling is at most 1% of a
training step; 0.0004 on 2 CPU threads with the paper's sizes when the fused C kernel was removed).
"""

import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cutremain_monai.data.phantoms import phantom_lung_zone_maps  # noqa: E402
from cutremain_monai.engines.severity import ZoneBCELoss  # noqa: E402
from cutremain_monai.networks import SMALL, VIT_B16, LungZoneMaxPool, SeverityViT  # noqa: E402

CONFIGS = {
    "small": {"vit": "SMALL", "image_size": 128, "batch_size": 8},
    "paper": {"vit": "VIT_B16", "image_size": 256, "batch_size": 16},
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    paper = "--paper" in argv or os.environ.get("BENCH_ZONE_POOL_PAPER", "") not in ("", "0")
    cfg = CONFIGS["paper" if paper else "small"]
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(2)
    amp = device.type == "cuda"
    rounds = (4 if paper else 10) if device.type == "cpu" else 30
    pool_repeats = 20
    size, batch = cfg["image_size"], cfg["batch_size"]
    vit = {"SMALL": SMALL, "VIT_B16": VIT_B16}[cfg["vit"]]

    torch.manual_seed(0)
    net = SeverityViT(in_channels=1, img_size=size, **vit, return_map=False).to(device)
    net.pool.warn_empty = False
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    loss_fn = ZoneBCELoss()
    zones = torch.as_tensor(phantom_lung_zone_maps(batch, size))[:, None].to(device)  # uint8
    mask = (zones > 0).float()
    image = torch.randn(batch, 1, size, size, device=device)
    label = (torch.rand(batch, 6, device=device) > 0.5).float()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, enabled=amp):
            loss = loss_fn(net(image, mask, zones), label)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        _sync(device)

    pool = LungZoneMaxPool(warn_empty=False)
    lesion = (torch.rand(batch, 1, size, size, device=device) * mask).requires_grad_(True)
    grad_out = torch.rand(batch, 6, device=device)

    def pool_fwd_bwd():
        lesion.grad = None
        pool(lesion, zones).backward(grad_out)
        _sync(device)

    for _ in range(2):
        step()
    for _ in range(5):
        pool_fwd_bwd()
    step_times, pool_times = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - t)
        for _ in range(pool_repeats):
            t = time.perf_counter()
            pool_fwd_bwd()
            pool_times.append(time.perf_counter() - t)
    step_s, pool_s = float(np.median(step_times)), float(np.median(pool_times))
    threads = torch.get_num_threads() if device.type == "cpu" else None
    config = (f"SeverityViT {cfg['vit']}, {size} px, batch {batch}, {device.type}"
              + (f", {threads} threads" if threads else ", amp"))
    lung = float((zones > 0).float().mean())
    print(f"{config}: training step {step_s * 1e3:.1f} ms (median of {rounds}), zone pooling forward+backward "
          f"{pool_s * 1e3:.3f} ms (median of {rounds * pool_repeats}); lung pixels {lung:.1%}")
    print(json.dumps({"zone_pool_share_of_step": round(pool_s / step_s, 6), "pool_ms": round(pool_s * 1e3, 4),
                      "step_ms": round(step_s * 1e3, 2), "config": config, "rounds": rounds}))


if __name__ == "__main__":
    main()
