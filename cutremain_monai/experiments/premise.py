"""Cut&Remain's premise test (issue 28): methods over several training seeds on one fixed split, each paired with
``none`` on the same test images, and the annotation-budget (gamma) curve.

:func:`~cutremain_monai.experiments.compare.compare` answers "which method, across the data" (folds, pooled AUC);
this answers "does the method help on this task whatever the seed": the split is the datalist's own
(``training`` / ``validation`` / ``test``, as the subtle-lesion phantoms of
:func:`~cutremain_monai.data.phantoms.generate_subtle_samples` give it), and what changes between repeats is the
training seed (initial weights, order, augmentation draws). Per seed: test AUC with DeLong's interval, and the
paired DeLong difference to ``none`` of that seed. Over the seeds: the mean AUC and the mean paired difference
with Student's t interval (:func:`~cutremain_monai.metrics.comparison.t_mean_ci`), and in how many seeds the
difference was positive. Every run is a bundle training plus its ``evaluate.yaml`` (:func:`train_and_test`); a
finished run leaves ``result.json`` and is not trained again (the study resumes).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import Compose
from sklearn.metrics import roc_auc_score

from cutremain_monai.engines.bundle import bundle_parser, load_network
from cutremain_monai.engines.methods import method_overrides
from cutremain_monai.experiments.cross_validation import train_and_test
from cutremain_monai.io.atomic import write_json_atomic
from cutremain_monai.io.datalist import load_datalist
from cutremain_monai.metrics.comparison import delong_ci, delong_paired, t_mean_ci
from cutremain_monai.transforms import CutRemaind

__all__ = ["premise", "premise_table_md", "run_dir", "copy_scores"]


def run_dir(output_dir: str, seed: int, method: str, gamma: float = 1.0) -> str:
    """Where one run of the study lives."""
    return os.path.join(output_dir, "runs", f"seed{seed}", method + ("" if gamma == 1.0 else f"@gamma{gamma:.2f}"))


def _run(bundle: str, datalist: str, task: str | None, out: str, method: str, seed: int, gamma: float,
         extra_configs: Sequence[str], overrides: dict) -> dict:
    done = os.path.join(out, "result.json")
    settings = {**overrides, **method_overrides(method), "seed": seed, "gamma": gamma}
    if os.path.exists(done):  # a finished run is taken only if it was trained as this one would be
        with open(done) as f:
            result = json.load(f)
        now = json.loads(json.dumps(settings, default=str))
        changed = sorted(k for k in set(now) | set(result["settings"]) if now.get(k) != result["settings"].get(k))
        if changed or result.get("configs", list(extra_configs)) != list(extra_configs):
            raise ValueError(f"{done}: this run was made with other settings ({', '.join(changed) or 'configs'}); "
                             "use a new output folder or delete the run")
        return result
    m = train_and_test(bundle, datalist, out, extra_configs=extra_configs, task=task, **settings)
    result = {"method": method, "seed": seed, "gamma": gamma, "test": m, "settings": settings, "configs": list(extra_configs)}
    write_json_atomic(done, result, indent=1, default=str)
    return result


def _probabilities(out: str) -> dict[str, float]:
    with open(os.path.join(out, "test_predictions.csv"), newline="") as f:
        return {r["file"]: float(r["probability"]) for r in csv.DictReader(f) if not r.get("error")}


def premise(bundle: str, datalist: str, output_dir: str, methods: Sequence[str] = ("none", "cut_remain"),
            seeds: Sequence[int] = (0, 1, 2, 3, 4), gammas: Sequence[float] = (), gamma_seed: int = 0,
            task: str | None = None, extra_configs: Sequence[str] = ("cpu.yaml",), **overrides) -> dict:
    """Run (or resume) the study; writes ``premise_summary.json`` and ``premise_table.md``; returns the summary.

    ``methods`` must include ``none`` (the reference of the paired differences). ``gammas``: Cut&Remain with
    boxes on that share of the training images, on ``gamma_seed`` (0 is the ``none`` run, 1 the ``cut_remain``
    run). ``overrides`` go to every run (``epochs``, ``image_size``, ...)."""
    methods = list(methods)
    if "none" not in methods:
        raise ValueError(f"the premise test pairs every method with 'none'; methods {methods} lack it")
    os.makedirs(output_dir, exist_ok=True)
    test = load_datalist(datalist, "test", task=task)
    labels = {str(it.get("image_id") or it["image"]): int(it["label"] not in (0, [0])) for it in test}
    probs: dict[tuple[str, int], dict[str, float]] = {}
    for seed in seeds:
        for m in methods:
            out = run_dir(output_dir, seed, m)
            _run(bundle, datalist, task, out, m, seed, 1.0, extra_configs, overrides)
            probs[(m, seed)] = _probabilities(out)
    names = sorted(set.intersection(*(set(p) for p in probs.values())) & set(labels))
    y = np.asarray([labels[n] for n in names])

    def scores(m, seed):
        return np.asarray([probs[(m, seed)][n] for n in names])

    rows = []
    for m in methods:
        per_seed = []
        for seed in seeds:
            auc, low, high = delong_ci(y, scores(m, seed))
            d = delong_paired(y, scores(m, seed), scores("none", seed)) if m != "none" else None
            per_seed.append({"seed": seed, "auc": auc, "auc_low": low, "auc_high": high,
                             **({"difference": d["difference"], "low": d["low"], "high": d["high"], "p": d["p"]}
                                if d else {})})
        mean, lo, hi = t_mean_ci([r["auc"] for r in per_seed])
        row = {"method": m, "auc_mean": mean, "auc_low": lo, "auc_high": hi, "seeds": per_seed}
        if m != "none":
            dm, dlo, dhi = t_mean_ci([r["difference"] for r in per_seed])
            row.update(difference=dm, difference_low=dlo, difference_high=dhi,
                       positive_seeds=int(sum(r["difference"] > 0 for r in per_seed)))
        rows.append(row)
    gamma_rows = []
    for g in sorted({float(v) for v in gammas}):
        method = "none" if g == 0.0 else "cut_remain"
        out = run_dir(output_dir, gamma_seed, method, 1.0 if g in (0.0, 1.0) else g)
        _run(bundle, datalist, task, out, method, gamma_seed, 1.0 if g == 0.0 else g, extra_configs, overrides)
        p = _probabilities(out)
        auc, low, high = delong_ci(y, np.asarray([p[n] for n in names]))
        gamma_rows.append({"gamma": g, "run": os.path.relpath(out, output_dir), "auc": auc, "low": low, "high": high})
    summary = {"methods": rows, "gamma": gamma_rows, "seeds": list(seeds), "test_images": len(names),
               "positives": int(y.sum()), "datalist": os.path.abspath(datalist), "task": task,
               "overrides": overrides, "configs": ["train.yaml", *extra_configs]}
    with open(os.path.join(output_dir, "premise_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    with open(os.path.join(output_dir, "premise_table.md"), "w") as f:
        f.write(premise_table_md(summary))
    return summary


def _f(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.3f}"


def _signed(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:+.3f}"


def premise_table_md(summary: dict) -> str:
    """The method table (mean AUC and mean paired difference to none over the seeds, t intervals; per-seed values)
    and the gamma curve, as Markdown."""
    seeds = summary["seeds"]
    lines = [f"| method | test AUC, mean over {len(seeds)} seeds [95% t-CI] | AUC per seed | difference to none, "
             f"mean [95% t-CI] | per seed (DeLong p) | seeds with a gain | test images (positive) |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["methods"]:
        per = ", ".join(_f(s["auc"]) for s in r["seeds"])
        if r["method"] == "none":
            diff = per_diff = gains = "-"
        else:
            diff = f"{_signed(r['difference'])} [{_signed(r['difference_low'])}, {_signed(r['difference_high'])}]"
            per_diff = ", ".join(f"{_signed(s['difference'])} ({s['p']:.2f})" for s in r["seeds"])
            gains = f"{r['positive_seeds']}/{len(seeds)}"
        lines.append(f"| {r['method']} | {_f(r['auc_mean'])} [{_f(r['auc_low'])}, {_f(r['auc_high'])}] | {per} | "
                     f"{diff} | {per_diff} | {gains} | {summary['test_images']} ({summary['positives']}) |")
    if summary["gamma"]:
        lines += ["", "| gamma | run | test AUC [95% CI, DeLong] |", "|---|---|---|"]
        lines += [f"| {g['gamma']:.2f} | {g['run']} | {_f(g['auc'])} [{_f(g['low'])}, {_f(g['high'])}] |"
                  for g in summary["gamma"]]
    return "\n".join(lines) + "\n"


def copy_scores(bundle: str, run: str, datalist: str, task: str | None = None, section: str = "test",
                extra_configs: Sequence[str] = ("cpu.yaml",), box_labels: Sequence[str] | None = None,
                **overrides) -> dict:
    """What a trained model says of Cut&Remain copies: the probability it gives to every copy (all aspect-ratio
    variants) of the boxed samples of ``section``, split by the sample's label.

    The premise's check: a model trained where only lesions are boxed has seen copies of positives only, so it may
    score any copy as positive, normal ones included; with relevant-area boxes on normal images, a normal copy
    should score as normal. ``box_labels``: only boxes of these labels are cut (e.g. the relevant area, which
    every phantom carries); the images go through the bundle's head (the validation one: no relevant-area boxes
    are drawn). Returns the mean probability of normal and of positive copies, of the originals, and the AUC of
    positive against normal copies."""
    parser = bundle_parser(bundle, ["train.yaml", *extra_configs], **overrides, output_dir=run, datalist=datalist,
                           datalist_task=task, device="cpu")
    net = load_network(parser, os.path.join(run, "checkpoints", "model.pt"))
    head = Compose(parser.get_parsed_content("head_transforms"))
    cutter = CutRemaind(keys="image", factors=parser["aspect_factors"], num_copies=None)
    wanted = None if box_labels is None else {str(v) for v in box_labels}
    groups: dict[str, list[float]] = {"normal_copies": [], "positive_copies": [], "normal_originals": [],
                                      "positive_originals": []}
    for it in load_datalist(datalist, section, task=task):
        samples = head(dict(it))
        for s in samples if isinstance(samples, list) else [samples]:
            keep = [i for i, lab in enumerate(s.get("box_labels") or []) if wanted is None or str(lab) in wanted]
            if not keep:
                continue
            s = dict(s, boxes=np.asarray(s["boxes"])[keep], box_labels=[s["box_labels"][i] for i in keep])
            out = cutter(s)
            x = torch.stack([torch.as_tensor(o["image"]).float() for o in out])
            with torch.no_grad():
                p = torch.sigmoid(net(x)).reshape(len(out), -1)[:, -1].tolist()
            kind = "positive" if int(np.asarray(s["label"]).reshape(-1)[-1]) else "normal"
            groups[f"{kind}_originals"].append(p[0])
            groups[f"{kind}_copies"] += p[1:]
    result = {k: (float(np.mean(v)) if v else float("nan")) for k, v in groups.items()}
    result.update({f"n_{k}": len(v) for k, v in groups.items()})
    if groups["normal_copies"] and groups["positive_copies"]:
        y = [0] * len(groups["normal_copies"]) + [1] * len(groups["positive_copies"])
        result["copies_auc"] = float(roc_auc_score(y, groups["normal_copies"] + groups["positive_copies"]))
    return result
