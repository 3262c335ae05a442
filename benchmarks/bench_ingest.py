"""Ingest at scale (issue 16): ``cutremain ingest`` over a generated PACS-like export of small DX files (named
after synthetic patients, 5% damaged copies, 2% text notes), with 1 and 2 worker processes, in the same run.

Each ingest runs in its own process (as a user runs it), so its peak RSS is its own: the main process's and the
largest worker's ``ru_maxrss``. Times start after the imports (printed apart; with 2 workers the workers' own
start is inside the time). The reference in the same run is a plain loop over the same files
(``pydicom.dcmread`` + ``pixel_array``, no validation, no journal, no datalist): ``vs_plain_loop`` is the one-worker
ingest's time over that loop's. Memory independent of the file count: the same ingest over a tenth of the files,
``rss_ratio`` = peak RSS (all files) / peak RSS (a tenth).

    python benchmarks/bench_ingest.py [--files 20000] [--keep DIR]

A second export is decode-bound (``--big-files`` JPEG-LS images of ``--big-size`` pixels, as CR / DX files are):
there the work per file is the decoding, which the workers share. ``--big-files 0`` measures the small files only
(the decode-bound keys are then null).

Last line: one JSON object with files_per_second (1 worker), workers_2_vs_1 (files per second, 2 workers over
1), peak_rss_mib (main process, all files), rss_ratio, vs_plain_loop, decode_bound_workers_2_vs_1.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _descendant_peak_rss(stop, out: list) -> None:
    """Poll /proc for this process's descendants (the forkserver and its workers are grandchildren, which
    RUSAGE_CHILDREN does not see while they live) and keep the largest VmHWM (peak RSS), in MiB."""
    me = os.getpid()
    while not stop.wait(0.1):
        parents = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/status") as f:
                        fields = dict(line.split(":", 1) for line in f if ":" in line)
                    parents[int(pid)] = (int(fields["PPid"]), int(fields.get("VmHWM", "0 kB").split()[0]) / 1024)
                except (OSError, KeyError, ValueError):
                    continue
        for pid, (ppid, hwm) in parents.items():
            p = ppid
            while p > 1 and p != me:
                p = parents.get(p, (0, 0))[0]
            if p == me:
                out[0] = max(out[0], hwm)


def _child(args) -> None:
    """One measured run in this process: ``ingest`` or the plain loop; prints one JSON line."""
    os.environ.setdefault("CUTREMAIN_PSEUDONYM_KEY", "be" * 32)  # a throwaway key: never the site's
    t = time.perf_counter()
    if args.child == "loop":
        import warnings

        import pydicom

        t = time.perf_counter()
        n = 0
        for d, _, files in os.walk(args.root):
            for f in files:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        pydicom.dcmread(os.path.join(d, f)).pixel_array
                    n += 1
                except Exception:
                    pass
        seen = n
    else:
        from cutremain_monai.io.ingest import ingest

        import threading

        startup = time.perf_counter() - t  # (the imports: pydicom, numpy, highdicom; no torch, no MONAI)
        stop, peak = threading.Event(), [0.0]
        watcher = threading.Thread(target=_descendant_peak_rss, args=(stop, peak), daemon=True)
        watcher.start()
        t = time.perf_counter()
        report = ingest(args.root, args.output, progress=False, workers=args.workers, split=(0.7, 0.15, 0.15))
        seen = report.files_seen
        stop.set()
        watcher.join()
    wall = time.perf_counter() - t
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, locals().get("peak", [0.0])[0])
    print(json.dumps({"files": seen, "seconds": wall, "rss_mib": own, "worker_rss_mib": workers,
                      "startup_seconds": locals().get("startup", 0.0)}))


def _measure(*argv) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--files", type=int, default=20000)
    p.add_argument("--keep", help="generate the exports here (kept) instead of a temporary folder")
    p.add_argument("--big-files", type=int, default=300, help="files of the decode-bound export")
    p.add_argument("--big-size", type=int, default=2048, help="image size of the decode-bound export (pixels)")
    p.add_argument("--child", choices=["ingest", "loop"], help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)

    from cutremain_monai.data.phantoms import generate_export_tree

    base = args.keep or tempfile.mkdtemp(prefix="bench_ingest_")
    n_images = int(round(args.files / 1.07))
    exports = {}
    for name, n in (("all", n_images), ("tenth", n_images // 10)):
        root = os.path.join(base, f"export_{name}")
        if not os.path.isdir(root):
            t = time.perf_counter()
            generate_export_tree(root, n, images_per_patient=4, damaged=0.05, not_dicom=0.02, size=64, seed=1)
            print(f"generated {name}: {n} images (+7% damaged / not DICOM) in {time.perf_counter() - t:.0f} s",
                  flush=True)
        exports[name] = root
    big = os.path.join(base, "export_decode_bound")
    if args.big_files and not os.path.isdir(big):  # X-ray sized, JPEG-LS: decoding, not bookkeeping, is the cost
        t = time.perf_counter()
        generate_export_tree(big, args.big_files, images_per_patient=4, size=args.big_size, seed=2,
                             compression="jpegls")
        print(f"generated decode-bound: {args.big_files} JPEG-LS images of {args.big_size} px in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    runs = {}
    plan = [("tenth_1", exports["tenth"], 1), ("all_1", exports["all"], 1), ("all_2", exports["all"], 2)]
    if args.big_files:
        plan += [("big_1", big, 1), ("big_2", big, 2)]
    for label, root, workers in plan:
        out = os.path.join(base, f"out_{label}", "datalist.json")
        runs[label] = _measure("--child", "ingest", "--root", root, "--output", out, "--workers", str(workers))
        r = runs[label]
        print(f"ingest {label}: {r['files']} files in {r['seconds']:.1f} s ({r['files'] / r['seconds']:.0f} files/s; "
              f"{r['startup_seconds']:.1f} s of imports before), "
              f"peak RSS {r['rss_mib']:.0f} MiB (largest worker {r['worker_rss_mib']:.0f} MiB)", flush=True)
    loop = _measure("--child", "loop", "--root", exports["all"])
    print(f"plain pydicom loop: {loop['files']} readable files in {loop['seconds']:.1f} s", flush=True)
    fps1 = runs["all_1"]["files"] / runs["all_1"]["seconds"]
    fps2 = runs["all_2"]["files"] / runs["all_2"]["seconds"]
    result = {"files": runs["all_1"]["files"], "files_per_second": round(fps1, 1),
              "files_per_second_2_workers": round(fps2, 1), "workers_2_vs_1": round(fps2 / fps1, 3),
              "peak_rss_mib": round(runs["all_1"]["rss_mib"], 1),
              "peak_rss_mib_tenth": round(runs["tenth_1"]["rss_mib"], 1),
              "rss_ratio": round(runs["all_1"]["rss_mib"] / runs["tenth_1"]["rss_mib"], 3),
              "peak_rss_mib_2_workers": round(runs["all_2"]["rss_mib"], 1),
              "worker_rss_mib": round(runs["all_2"]["worker_rss_mib"], 1),
              "vs_plain_loop": round(runs["all_1"]["seconds"] / loop["seconds"], 3),
              "decode_bound_files_per_second":
                  round(runs["big_1"]["files"] / runs["big_1"]["seconds"], 2) if args.big_files else None,
              "decode_bound_workers_2_vs_1":
                  round(runs["big_1"]["seconds"] / runs["big_2"]["seconds"], 3) if args.big_files else None,
              "cpus": os.cpu_count()}
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
