"""LungZoneMaxPool on a batch of 16 probability maps at 256x256 against a bare ``amax`` over the whole map, in one
run (forward only, zone maps as int64 as LungZonesd + EnsureType give them). Last line: one JSON object with
zone_pool_vs_amax. Target: at most 1.5."""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cutremain_monai.networks.lung_zone_pool import LungZoneMaxPool  # noqa: E402


def best(fn, repeats=40):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    prob = torch.rand(16, 1, 256, 256)
    zones = torch.randint(0, 7, (16, 1, 256, 256), dtype=torch.int64)
    pool = LungZoneMaxPool(warn_empty=False)
    t_ref = best(lambda: prob.amax(dim=(2, 3)))
    t_ours = best(lambda: pool(prob, zones))
    print(json.dumps({"amax_ms": round(t_ref * 1e3, 3), "zone_pool_ms": round(t_ours * 1e3, 3),
                      "zone_pool_vs_amax": round(t_ours / t_ref, 3)}))


if __name__ == "__main__":
    main()
