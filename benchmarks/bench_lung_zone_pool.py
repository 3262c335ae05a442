"""LungZoneMaxPool on a batch of 16 probability maps at 256x256 against a bare ``amax`` over the whole map, in one
run (forward only, 2 threads, calls interleaved, medians).

Zone maps are what the pipeline feeds the pool: ``split_lung_zones`` (LungZonesd) on the phantoms' two-lung masks
(``phantom_lung_zone_maps``), uint8 as the transform and ``SeverityPrepareBatch`` give them. Also printed, for context:
the ``scatter_reduce`` path (CUDA / no compiled kernel) on the same maps, and the kernel on random zone maps
(runs of one pixel, the kernel's worst case; not a map LungZonesd can make).
Last line: one JSON object with ``zone_pool_vs_amax`` (target: at most 1.5).
"""

import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cutremain_monai.networks.lung_zone_pool import LungZoneMaxPool, fused_kernel_available  # noqa: E402
from cutremain_monai.data.phantoms import phantom_lung_zone_maps  # noqa: E402


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per call, the functions called in turn in every round so that all see the same machine
    state (the machine is shared; a reference timed minutes apart is not a reference)."""
    for f in fns.values():
        for _ in range(5):
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    prob = torch.rand(16, 1, 256, 256)
    zones = torch.as_tensor(phantom_lung_zone_maps(16, 256))[:, None]
    random_zones = torch.randint(0, 7, (16, 1, 256, 256), dtype=torch.uint8)
    pool = LungZoneMaxPool(warn_empty=False)
    scatter = LungZoneMaxPool(warn_empty=False, use_kernel=False)
    zones_long = zones.long()
    t = interleaved({"amax": lambda: prob.amax(dim=(2, 3)), "pool": lambda: pool(prob, zones)}, repeats=500)
    t_ref, t_ours = t["amax"], t["pool"]
    t_ctx = interleaved({"amax": lambda: prob.amax(dim=(2, 3)), "scatter": lambda: scatter(prob, zones_long),
                         "random": lambda: pool(prob, random_zones)}, repeats=40)
    t_scatter, t_random = t_ctx["scatter"] * t_ref / t_ctx["amax"], t_ctx["random"] * t_ref / t_ctx["amax"]
    print(f"fused kernel built: {fused_kernel_available()}; lung pixels {float((zones > 0).float().mean()):.1%}")
    print(json.dumps({"amax_ms": round(t_ref * 1e3, 4), "zone_pool_ms": round(t_ours * 1e3, 4),
                      "fused_kernel": fused_kernel_available(),
                      "scatter_reduce_vs_amax": round(t_scatter / t_ref, 2),
                      "random_zone_maps_vs_amax": round(t_random / t_ref, 2),
                      "zone_pool_vs_amax": round(t_ours / t_ref, 3)}))


if __name__ == "__main__":
    main()
