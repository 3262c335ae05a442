"""Progressive self-training for the COVID severity bundle (the seed paper's Figure 2).

teacher <- train(labelled); for each share s in the schedule: pseudo-label the first ``s`` of the (shuffled,
leakage-filtered) unlabelled images with the teacher's checkpoint ensemble, student <- copy of the teacher trained
on labelled + pseudo-labelled, teacher <- student. Each round is trained and evaluated through the bundle's own
configs (``train.yaml`` / ``evaluate.yaml`` with ``init_checkpoint``), so tracking, resume and the ensemble are
the bundle's. Writes ``self_training.csv`` / ``.md`` (one row per round) under the output folder.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections.abc import Sequence

import torch

from cutremain_monai.engines.bundle import bundle_parser, run_bundle
from cutremain_monai.io.datalist import load_datalist
from cutremain_monai.io.near_duplicates import drop_near_duplicates_of

__all__ = ["pseudo_label", "progressive_self_training", "read_schedule"]

logger = logging.getLogger(__name__)


def read_schedule(bundle: str) -> dict:
    """The ``self_training`` section of the bundle's ``configs/self_training.yaml``."""
    from monai.bundle import ConfigParser

    return dict(ConfigParser.load_config_file(os.path.join(bundle, "configs", "self_training.yaml"))["self_training"])


def pseudo_label(bundle: str, items: list[dict], ckpt_dir: str, configs: Sequence[str] = ("train.yaml",),
                 threshold: float = 0.5, **overrides) -> tuple[list[dict], list[tuple[str, str]]]:
    """Zone pseudo-labels for ``items`` (need ``image`` and ``lung_mask``) from the ensemble of the last
    ``ensemble_last`` checkpoints in ``ckpt_dir``; returns (labelled copies, [(image, reason)] set aside)."""
    parser = bundle_parser(bundle, configs, **{**overrides, "zone_errors": "flag", "ckpt_dir": ckpt_dir})
    preprocess = parser.get_parsed_content("preprocessing")  # the bundle's one chain
    model = parser.get_parsed_content("eval_network").eval()  # the ensemble evaluate.yaml and inference.yaml use
    device = next(model.parameters()).device
    out, bad = [], []
    for it in items:
        try:
            s = preprocess(dict(it))
        except Exception as e:  # an unreadable image is set aside with its reason, never silently dropped
            bad.append((it["image"], f"{type(e).__name__}: {e}"))
            continue
        if not s.get("zones_ok", True):
            bad.append((it["image"], "lung mask does not hold two lungs"))
            continue
        with torch.no_grad():
            zones = torch.as_tensor(s["zones"])[None].to(device=device, dtype=torch.uint8)
            p = model(s["image"][None].float().to(device), s["lung_mask"][None].float().to(device), zones)[0].cpu()
        labels = [int(v >= threshold) for v in p.tolist()]
        out.append({**it, "zone_scores": labels, "label": sum(labels), "pseudo": True,
                    "pseudo_probabilities": [round(float(v), 4) for v in p.tolist()]})
    return out, bad


def _evaluate(bundle, configs, datalist, out, overrides) -> dict:
    run_bundle(bundle, [*configs, "evaluate.yaml"], datalist=datalist, datalist_task=None, output_dir=out, **overrides)
    with open(os.path.join(out, "test_metrics.json")) as f:
        return json.load(f)


def progressive_self_training(bundle: str, datalist: str, unlabelled: list[dict], output_dir: str,
                              schedule: Sequence[float] = (0.3, 0.6, 1.0), pseudo_threshold: float = 0.5,
                              configs: Sequence[str] = ("train.yaml", "cpu.yaml"), seed: int = 0,
                              round_overrides: dict | None = None, near_duplicate_threshold: float | None = 0.85,
                              **overrides) -> list[dict]:
    """Run the rounds; ``datalist`` has training / validation / test sections of labelled items.

    Leakage filter on the unlabelled pool: an image whose patient group is in the validation or test section is
    left out, and so is an image that near-duplicates a validation / test image (thumbnail ``|r| >=
    near_duplicate_threshold``; ``None`` or 0 turns that check off) - public collections hold the same radiograph
    under other patient ids. Each left-out image is logged with its reason."""
    os.makedirs(output_dir, exist_ok=True)
    sections = {s: load_datalist(datalist, s) for s in ("training", "validation", "test")}
    held = {it.get("group") for s in ("validation", "test") for it in sections[s]}
    pool = [it for it in unlabelled if it.get("group") not in held]
    left_out = [(it["image"], "patient group in validation/test") for it in unlabelled if it.get("group") in held]
    if left_out:
        logger.warning("unlabelled: %d left out (patient in validation/test)", len(left_out))
    if near_duplicate_threshold:
        pool, copies = drop_near_duplicates_of(pool, sections["validation"] + sections["test"],
                                               near_duplicate_threshold)
        for path, reason in copies:
            logger.warning("unlabelled: left out %s: %s", path, reason)
        left_out += copies
    logger.info("unlabelled: %d usable of %d", len(pool), len(unlabelled))
    with open(os.path.join(output_dir, "unlabelled_left_out.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "reason"])
        w.writerows(left_out)
    random.Random(seed).shuffle(pool)
    common = {"register_model": False, "seed": seed, **overrides}
    rows = []
    teacher = os.path.join(output_dir, "round0")
    run_bundle(bundle, configs, datalist=datalist, datalist_task=None, output_dir=teacher, **common)
    m = _evaluate(bundle, configs, datalist, teacher, common)
    rows.append({"round": 0, "unlabelled_used": 0, "set_aside": 0, **{k: m[k] for k in ("mse", "mae", "pearson", "r2", "mean_zone_auc")}})
    for r, share in enumerate(schedule, start=1):
        if not 0 < float(share) <= 1:
            raise ValueError(f"schedule shares must be in (0, 1], got {share}")
        chosen = pool[: int(round(float(share) * len(pool)))]
        pseudo, bad = pseudo_label(bundle, chosen, os.path.join(teacher, "checkpoints"), configs, pseudo_threshold,
                                   **{k: v for k, v in common.items() if k not in ("register_model",)})
        for path, reason in bad:
            logger.warning("self-training round %d: set aside %s: %s", r, path, reason)
        student = os.path.join(output_dir, f"round{r}")
        os.makedirs(student, exist_ok=True)
        dl = os.path.join(student, "datalist.json")
        with open(dl, "w") as f:
            json.dump({"training": sections["training"] + pseudo, "validation": sections["validation"], "test": sections["test"]}, f)
        init = os.path.join(teacher, "checkpoints", "model.pt")
        run_bundle(bundle, configs, datalist=dl, datalist_task=None, output_dir=student, init_checkpoint=init,
                   **{**common, **(round_overrides or {})})
        m = _evaluate(bundle, configs, dl, student, {**common, **(round_overrides or {})})
        rows.append({"round": r, "unlabelled_used": len(pseudo), "set_aside": len(bad),
                     **{k: m[k] for k in ("mse", "mae", "pearson", "r2", "mean_zone_auc")}})
        teacher = student
        _write(output_dir, rows)
    _write(output_dir, rows)
    return rows


def _write(output_dir: str, rows: list[dict]) -> None:
    with open(os.path.join(output_dir, "self_training.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| round | unlabelled used | set aside | MSE | MAE | Pearson | R² | mean zone AUC |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['unlabelled_used']} | {r['set_aside']} | {r['mse']:.3f} | {r['mae']:.3f} | "
                     f"{r['pearson']:.3f} | {r['r2']:.3f} | {r['mean_zone_auc']:.3f} |")
    with open(os.path.join(output_dir, "self_training.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
