"""The background-learning comparison (issue 14): BG x1 / x2 / x4 against CAM, on one datalist, one command.

:func:`background_experiment` trains the ``background_learning`` bundle's whole-image classifier once
(``train_cam.yaml``) and its patch classifier once per background ratio, evaluates each with the bundle's own
``evaluate.yaml`` (Loc. Acc. at the threshold chosen on validation and the maximum over thresholds, the image-level
AUC, the P / F / N histogram), and writes ``background_table.md`` / ``background_results.csv`` with the run times.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Sequence

from cutremain_monai.engines.bundle import run_bundle

__all__ = ["background_experiment", "background_table"]

logger = logging.getLogger(__name__)


def _read(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    table = next(iter(data["methods"].values()))
    if not table:
        raise ValueError(f"{path}: no test image was scored: none has a box labelled as a target (set the bundle's "
                         "target_box_labels to the datalist's box label)")
    return table


def background_experiment(bundle: str, datalist: str, output_dir: str, ratios: Sequence[float] = (1, 2, 4),
                          cam: bool = True, task: str | None = None, configs: Sequence[str] = ("train.yaml", "cpu.yaml"),
                          **overrides) -> list[dict]:
    """Train and evaluate CAM and each BG ratio (module docstring); returns the table's rows."""
    output_dir = os.path.abspath(output_dir)
    settings = {"datalist": os.path.abspath(datalist), "datalist_task": task, "register_model": False,
                "cam_output_dir": os.path.join(output_dir, "cam"), **overrides}
    rows = []
    if cam:
        t = time.perf_counter()
        run_bundle(bundle, [*configs, "train_cam.yaml"], **settings)
        cam_s = time.perf_counter() - t
    for r in ratios:
        out = os.path.join(output_dir, f"bg_x{r:g}")
        t = time.perf_counter()
        run_bundle(bundle, list(configs), bg_ratio=r, output_dir=out, run_name=f"bg_x{r:g}", **settings)
        train_s = time.perf_counter() - t
        wf = run_bundle(bundle, [*configs, "evaluate.yaml"], bg_ratio=r, output_dir=out, **settings)
        metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
        with open(os.path.join(out, "test_pfn_histogram.json")) as f:
            pfn = json.load(f)
        t_map = _read(os.path.join(out, "test_targetness_localization.json"))
        rows.append({"maps": f"targetness BG x{r:g}", "loc_acc": t_map["loc_acc"], "loc_acc_tau": t_map["loc_acc_tau"],
                     "loc_acc_max_over_tau": max(t_map["loc_acc_by_tau"].values()), "n": t_map["n"],
                     "image_auc": float(metrics.get("test_auc", float("nan"))), "train_s": round(train_s, 1),
                     **{f"backgroundness_{k}": pfn[k]["mean_backgroundness"] for k in "PFN"}})
        if cam and r == ratios[0]:
            c_map = _read(os.path.join(out, "test_cam_localization.json"))
            rows.insert(0, {"maps": "CAM (whole-image classifier)", "loc_acc": c_map["loc_acc"], "loc_acc_tau": c_map["loc_acc_tau"],
                            "loc_acc_max_over_tau": max(c_map["loc_acc_by_tau"].values()), "n": c_map["n"],
                            "image_auc": float("nan"), "train_s": round(cam_s, 1)})
    os.makedirs(output_dir, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(os.path.join(output_dir, "background_results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(output_dir, "background_table.md"), "w") as f:
        f.write(background_table(rows))
    return rows


def background_table(rows: list[dict]) -> str:
    def fmt(v):
        return "-" if v is None or (isinstance(v, float) and v != v) else f"{v:.3f}"

    lines = ["| maps | Loc. Acc. (tau from validation) | Loc. Acc. max over tau | test images | image AUC | "
             "backgroundness P / F / N | training s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        pfn = " / ".join(fmt(r.get(f"backgroundness_{k}")) for k in "PFN") if "backgroundness_P" in r else "-"
        lines.append(f"| {r['maps']} | {fmt(r['loc_acc'])} ({r['loc_acc_tau']}) | {fmt(r['loc_acc_max_over_tau'])} | {r['n']} | "
                     f"{fmt(r['image_auc'])} | {pfn} | {r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"
