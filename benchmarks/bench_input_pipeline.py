"""Images per second that a bundle's training DataLoader delivers from the persistent preprocessed cache (issue 27).

The cxr14 bundle's own training dataset and loader settings (``train#dataset`` over a synthetic archive of
1024 px 8-bit PNGs, the size of the NIH images; ``image_size`` 448, ``augmentation`` cut_remain, batch 16,
``box_list_data_collate``), for 1 and 2 loader workers, against two references measured in the same run:

* **memmap**: the same cache records read by a bare ``numpy.memmap`` loop (each record mapped and its bytes summed;
  the page cache is warm for both), the physical limit of reading the data on this machine;
* **decode**: today's path without the cache, a MONAI ``Dataset`` running the whole chain (decode, resize,
  augmentation) at every draw, with the same workers.

Also: the time to build the cache (fresh, with the workers) and, with the cache built, the time from creating
the dataset to the first batch, and the peak RSS of this process and of its worker processes.

Counting: ``samples`` are datalist items drawn; ``images`` are network inputs delivered (Cut&Remain turns an
annotated sample into 1 + 9 images). Ratios are of samples per second.

    python benchmarks/bench_input_pipeline.py                       # 400 generated images, a few minutes
    python benchmarks/bench_input_pipeline.py --data DIR --n 20000  # an existing scale set (data.scale_data)

Last line: one JSON object with ``images_per_second``, ``samples_per_second``, ``loader_vs_memmap``,
``loader_vs_decode``, ``images_per_second_8_workers`` (extrapolated linearly from the per-worker rate),
``cache_build_seconds``, ``first_batch_seconds``, ``peak_rss_mib``, ``workers_peak_rss_mib``. Targets:
``loader_vs_memmap >= 0.5`` and ``images_per_second_8_workers >= 1500``.
"""

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from monai.data import Dataset  # noqa: E402

from cutremain_monai.data.collate import box_list_data_collate  # noqa: E402
from cutremain_monai.data.scale_data import generate_scale_set  # noqa: E402
from cutremain_monai.engines.bundle import bundle_parser  # noqa: E402

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles", "cxr14")


def _parser(datalist: str, cache_dir: str, workers: int, augmentation: str, size: int):
    return bundle_parser(BUNDLE, ["train.yaml"], datalist=datalist, datalist_task=None, cache_dir=cache_dir,
                         num_workers=workers, augmentation=augmentation, image_size=[size, size], label_mode="binary",
                         class_names=["normal", "lesion"], output_dir=os.path.join(cache_dir, "..", "out"))


def _loader(dataset, workers: int, batch: int):
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                       collate_fn=box_list_data_collate, persistent_workers=False,
                                       generator=torch.Generator().manual_seed(0))


def _rate(loader, samples_per_batch_max: int, limit: int) -> tuple[float, float, float]:
    """(samples/s, images/s, seconds to the first batch) over at most ``limit`` samples (after the first batch)."""
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t_first = time.perf_counter() - t0
    samples = images = 0
    t1 = time.perf_counter()
    for batch in it:
        images += int(batch["image"].shape[0])
        samples += int(len(set(batch["image_path"]))) if "image_path" in batch else samples_per_batch_max
        if samples >= limit:
            break
    dt = time.perf_counter() - t1
    del first
    return samples / dt, images / dt, t_first


def _memmap_rate(folder: str, limit: int) -> float:
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.endswith(".rec"))[:limit]
    for f in files:  # warm the page cache as the loader found it
        np.memmap(f, dtype=np.uint8, mode="r").sum()
    t = time.perf_counter()
    total = 0
    for f in files:
        total += int(np.memmap(f, dtype=np.uint8, mode="r").sum(dtype=np.uint64))
    return len(files) / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a scale set (datalist.json + images/); default: generate --n images")
    ap.add_argument("--n", type=int, default=400, help="images used (default %(default)s)")
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--source-size", type=int, default=1024, help="generated images' size")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--measure", type=int, default=320, help="samples timed per measurement (default %(default)s)")
    ap.add_argument("--work", help="folder for the cache (default: a temporary folder, removed at the end)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    work = args.work or tempfile.mkdtemp(prefix="bench_input_")
    os.makedirs(work, exist_ok=True)
    data = args.data or os.path.join(work, "data")
    if not args.data:
        generate_scale_set(data, args.n, size=args.source_size, seed=0, validation_share=0)
    with open(os.path.join(data, "datalist.json")) as f:
        datalist = json.load(f)
    items = (datalist["training"] + datalist.get("validation", []))[:args.n]
    sub = os.path.join(work, "datalist.json")
    with open(sub, "w") as f:
        json.dump({"training": [dict(it, image=os.path.join(data, it["image"])) for it in items], "validation": []}, f)
    cache = os.path.join(work, "cache")
    workers = [int(w) for w in args.workers.split(",")]
    out: dict = {"n": len(items), "size": args.size, "augmentation": "cut_remain", "batch": args.batch,
                 "threads_per_process": 1}

    t = time.perf_counter()
    parser = _parser(sub, cache, max(workers), "cut_remain", args.size)
    ds = parser.get_parsed_content("train#dataset")
    out["cache_build_seconds"] = round(time.perf_counter() - t, 2)
    out["cache_build_workers"] = max(workers)
    out["cache_stats"] = {k: v for k, v in ds.cache_stats.items() if k != "folder"}
    print(f"cache: {out['cache_stats']} in {out['cache_build_seconds']} s", flush=True)

    t = time.perf_counter()  # the cache exists: a new run's time to its first batch (what a user waits for)
    parser = _parser(sub, cache, workers[0], "cut_remain", args.size)
    ds = parser.get_parsed_content("train#dataset")
    next(iter(_loader(ds, workers[0], args.batch)))
    out["first_batch_seconds"] = round(time.perf_counter() - t, 2)
    print(f"first batch with the cache built: {out['first_batch_seconds']} s", flush=True)

    memmap = _memmap_rate(ds.cache.folder, args.measure)
    out["memmap_samples_per_second"] = round(memmap, 1)
    print(f"memmap: {memmap:.0f} samples/s", flush=True)
    plain_items = [dict(it) for it in ds.data]
    decode_ds = Dataset(plain_items, parser.get_parsed_content("train#preprocessing"))
    for w in workers:
        s, i, _ = _rate(_loader(ds, w, args.batch), args.batch, args.measure)
        d, _, _ = _rate(_loader(decode_ds, w, args.batch), args.batch, max(args.batch * 4, args.measure // 4))
        out[f"workers_{w}"] = {"samples_per_second": round(s, 1), "images_per_second": round(i, 1),
                               "decode_samples_per_second": round(d, 1)}
        print(f"{w} worker(s): cache {s:.1f} samples/s ({i:.1f} images/s); decode every time {d:.1f} samples/s",
              flush=True)
    none_ds = _parser(sub, cache, workers[0], "none", args.size).get_parsed_content("train#dataset")
    s_none, _, _ = _rate(_loader(none_ds, max(workers), args.batch), args.batch, args.measure)
    out["no_augmentation_samples_per_second"] = round(s_none, 1)
    best = out[f"workers_{max(workers)}"]
    out.update(
        samples_per_second=best["samples_per_second"], images_per_second=best["images_per_second"],
        loader_vs_memmap=round(best["samples_per_second"] / memmap, 4),
        no_augmentation_vs_memmap=round(s_none / memmap, 4),
        loader_vs_decode=round(best["samples_per_second"] / best["decode_samples_per_second"], 2),
        images_per_second_8_workers=round(out[f"workers_{workers[0]}"]["images_per_second"] / workers[0] * 8, 1),
        workers_scaling=round(best["samples_per_second"] / out[f"workers_{workers[0]}"]["samples_per_second"], 2),
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        workers_peak_rss_mib=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        cpu_count=os.cpu_count(),
    )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
