"""The epoch metrics of a bundle training log as a markdown table: a learning curve where no MLflow store was kept.

``python tools/epoch_metrics.py run.log --every 50 --keys val_auc,val_loss_cl,val_loss_heatmap,guidance_loss_cl``

Reads the ``Epoch[N] Metrics -- key: value ...`` lines that the bundles' ``StatsHandler`` writes (validation and
trainer metrics of one epoch come on separate lines and are merged; a resumed run's repeated epoch keeps its last
line) and prints every ``--every``-th epoch and the last one. Several runs in one log (a study's ``run.log``):
``--run k`` picks the k-th (0-based; default the last)."""

import argparse
import re
import sys

LINE = re.compile(r"Epoch\[(\d+)\] Metrics -- (.*)$")
START = re.compile(r"SupervisedTrainer - INFO - Engine run resuming from iteration 0, epoch 0 ")
RESTORED = re.compile(r"SupervisedTrainer - INFO - Restored all variables from ")


def epoch_metrics(lines) -> list[dict[int, dict[str, float]]]:
    """One ``{epoch: {key: value}}`` per run in the log, in the order the runs were written. A run starts at ignite's
    ``SupervisedTrainer ... Engine run resuming from iteration 0, epoch 0`` unless the trainer then logs ``Restored
    all variables`` (the bundles' resume loads its checkpoint after that line: the run goes on, a repeated epoch
    keeps its last values); in a log without those lines, where the epoch falls below the previous one."""
    runs: list[dict[int, dict[str, float]]] = []
    last_epoch, marked, starting, restored = None, False, False, False
    for line in lines:
        if START.search(line):
            marked, starting, restored = True, True, False
            continue
        if starting and RESTORED.search(line):
            restored = True
            continue
        m = LINE.search(line)
        if not m:
            continue
        epoch = int(m.group(1))
        if starting:
            if not runs or not restored:
                runs.append({})
            starting = False
        elif not runs or (not marked and last_epoch is not None and epoch < last_epoch):
            runs.append({})
        pairs = re.findall(r"(\w+): (-?[\d.]+(?:e-?\d+)?|-?nan|-?inf)", m.group(2))
        runs[-1].setdefault(epoch, {}).update({k: float(v) for k, v in pairs})
        last_epoch = epoch
    return runs


def table(run: dict[int, dict[str, float]], keys: list[str], every: int) -> str:
    epochs = sorted(run)
    shown = [e for e in epochs if e % every == 0 or e == epochs[0]]
    if epochs and epochs[-1] not in shown:
        shown.append(epochs[-1])
    out = ["| epoch | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for e in shown:
        out.append(f"| {e} | " + " | ".join(f"{run[e][k]:.3f}" if k in run[e] else "" for k in keys) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--keys", default="val_auc,val_loss,val_loss_cl,val_loss_heatmap")
    ap.add_argument("--every", type=int, default=25, help="every k-th epoch (k >= 1)")
    ap.add_argument("--run", type=int, default=-1)
    args = ap.parse_args(argv)
    if args.every < 1:
        ap.error(f"--every must be 1 or more, got {args.every}")
    with open(args.log, errors="replace") as f:
        runs = epoch_metrics(f.read().replace("\r", "\n").splitlines())
    if not runs:
        print(f"{args.log}: no 'Epoch[N] Metrics --' lines", file=sys.stderr)
        return 1
    print(table(runs[args.run], args.keys.split(","), args.every))
    return 0


if __name__ == "__main__":
    sys.exit(main())
