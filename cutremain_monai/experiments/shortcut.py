"""The shortcut test (issues 13, 30): does a method make the classifier read the lesion rather than a burned-in tag?

:func:`~cutremain_monai.data.phantoms.generate_shortcut_samples` writes clavicle phantoms whose letter tag marks a
share (the tag strength: 100%, 90%) of the positive images of the training and validation sections and no
negative one, and is independent of the label in the test section; the clean reference set has the same images
without any tag. :func:`shortcut_experiment` trains the clavicle bundle per strength, training seed and method
(whole images, no halves), plus ``none`` on the clean set per seed (the upper bound a guided method should
approach), then scores three checkpoints: the best validation AUC (the validation set carries the tag, so it
rewards reading it), the lowest validation loss (the training objective, with the guidance term on the
validation masks: what the bundle keeps as ``model.pt`` for guided runs) and the last epoch. Scores: validation
and test AUC (with a bootstrap 95% interval on test), the AUC of the test predictions against the TAG's presence
(1.0: the network reads the tag; 0.5: it ignores it), and the share of the map's non-negative energy on the tag
(test images that carry it) and in the lesion box (positive test images), for Grad-CAM and LRP. The table gives
the means over the seeds with Student's t intervals (:func:`shortcut_summary`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from cutremain_monai.data.phantoms import generate_shortcut_samples
from cutremain_monai.engines.bundle import bundle_parser, load_network, with_study_store
from cutremain_monai.engines.methods import method_overrides
from cutremain_monai.experiments.compare_summary import ci_cell
from cutremain_monai.experiments.cross_validation import train_and_test
from cutremain_monai.handlers.reproducibility import latest_checkpoint
from cutremain_monai.io.atomic import write_json_atomic
from cutremain_monai.io.datalist import load_datalist
from cutremain_monai.localization.report import compute_map
from cutremain_monai.metrics.classification import auc_ci, mean_auc
from cutremain_monai.metrics.comparison import t_mean_ci
from cutremain_monai.metrics.localization import energy_in_box

__all__ = ["shortcut_experiment", "score_shortcut", "shortcut_summary", "shortcut_table", "CHECKPOINTS"]

logger = logging.getLogger(__name__)


def score_shortcut(bundle: str, datalist: str, checkpoints: dict, **overrides) -> dict:
    """Scores of each trained model (``{name: checkpoint path}``) on the shortcut datalist (see the module
    docstring): ``{name: scores}``. The bundle is parsed and the images preprocessed once for all of them."""
    parser = bundle_parser(bundle, ["train.yaml", "cpu.yaml"], datalist=datalist, **overrides)
    chain = parser.get_parsed_content("preprocessing")
    loader = next(t for t in chain.transforms if type(t).__name__ == "LoadXrayd")
    layer = parser.get_parsed_content("cam_layer")
    data = {}
    for section in ("validation", "test"):
        items = load_datalist(datalist, section, task="shortcut")
        x = torch.stack([torch.as_tensor(chain(dict(it))["image"]).float() for it in items])
        data[section] = (items, x, np.asarray([int(it["label"]) for it in items]))
    items, x, y = data["test"]
    stored = tuple(np.asarray(loader(dict(items[0]))["image"]).shape[-2:])
    if stored != tuple(x.shape[-2:]):  # boxes are in stored pixels: the experiment keeps the stored size
        raise ValueError(f"the shortcut test scores maps at the stored size {stored}; image_size is {tuple(x.shape[-2:])}")
    marked = np.asarray([bool(it["marker"]) for it in items])
    pos = y == 1
    tag_boxes = [[it["marker_box"]] for it, m in zip(items, marked) if m]
    lesion_boxes = [[b for b, lab in zip(it["boxes"], it["box_labels"]) if lab == "fracture"] for it, p in zip(items, pos) if p]
    results = {}
    for name, checkpoint in checkpoints.items():
        model = load_network(parser, checkpoint)
        with torch.no_grad():
            prob = {s: torch.sigmoid(model(xs)).reshape(-1).numpy() for s, (_, xs, _) in data.items()}
        auc, low, high = auc_ci(y, prob["test"])
        out = {"validation_auc": mean_auc(data["validation"][2], prob["validation"]), "test_auc": auc,
               "test_auc_low": low, "test_auc_high": high,
               "tag_auc": mean_auc(marked, prob["test"])}  # how well the prediction tells the tag's presence
        for method in ("gradcam", "lrp"):
            maps = torch.cat([compute_map(method, model, x[i : i + 8], target=0, layer=layer, bounds=(0.0, 1.0)).detach()
                              for i in range(0, len(x), 8)])
            out[f"{method}_tag_energy"] = energy_in_box(maps[marked], tag_boxes)["mean"]
            out[f"{method}_lesion_energy"] = energy_in_box(maps[pos], lesion_boxes)["mean"]
        results[name] = out
    return results


CHECKPOINTS = ("val_auc", "val_loss", "val_auc_swap", "last")


def _checkpoints(ckpt_dir: str) -> dict[str, str]:
    """A run's checkpoints: best validation AUC, lowest validation loss (the training objective with its guidance
    term), best validation AUC with the background swapped (when the run kept it: ``background_swap_auc``) and the
    last epoch; ``model.pt`` is whichever the bundle's ``best_model_metric`` keeps (``val_auc_swap``'s when the run
    kept both other rules' files beside it)."""
    path = {k: os.path.join(ckpt_dir, f"model_{k}.pt") for k in ("val_auc", "val_loss", "val_auc_swap")}
    model = os.path.join(ckpt_dir, "model.pt")
    out = {k: path[k] if os.path.exists(path[k]) else model for k in ("val_auc", "val_loss")}
    if os.path.exists(path["val_auc_swap"]):
        out["val_auc_swap"] = path["val_auc_swap"]
    elif os.path.exists(path["val_auc"]) and os.path.exists(path["val_loss"]):
        out["val_auc_swap"] = model
    return {**out, "last": latest_checkpoint(ckpt_dir)}


def _tag_name(strength: float | None) -> str:
    return "clean" if strength is None else f"tag{strength:.2f}"


def _region_boxes(datalist: str) -> bool:
    with open(datalist) as f:
        return bool(json.load(f).get("region_boxes", False))  # (sets written before the option: lesion boxes only)


def shortcut_experiment(bundle: str, output_dir: str, methods: Sequence[str] = ("none", "cut_remain", "sup_cutout", "gain", "isnet"),
                        n: int = 300, split: tuple[float, float] = (0.4, 0.4 / 3), size: int = 128, epochs: int = 25,
                        warmup_epochs: int = 5, seeds: Sequence[int] = (0,), strengths: Sequence[float] = (1.0,),
                        clean: bool = True, data_seed: int = 0, data_dir: str | None = None, region_boxes: bool = True,
                        train: bool = True, **overrides) -> list[dict]:
    """Generate the shortcut sets (once per strength, under ``data_dir`` or ``output_dir/data``), train and score
    every method at every tag strength (the share of training and validation positives that carry the tag) and
    training seed, plus the clean reference (``none`` trained on the same images without any tag) per seed. A
    finished run leaves ``scores.json`` and is not trained again (the study resumes). Writes
    ``shortcut_results.csv`` (one row per strength, seed, method and checkpoint), ``shortcut_table.md`` (means over
    the seeds with Student's t intervals) and ``shortcut_settings.json`` under ``output_dir``; returns the rows.
    ``region_boxes``: every image carries a ``relevant_area`` box around both clavicles, so the guidance mask is the
    anatomy (False: the lesion or normal-region box alone, the protocol study's sets). ``train=False``: the tables
    from the runs already finished (of the methods, seeds and strengths asked for), nothing trained: a study in
    progress, or one stopped part-way (the table's ``seeds`` column says how many each row has)."""
    for m in methods:
        method_overrides(m)
    data_dir = os.path.abspath(data_dir or os.path.join(output_dir, "data"))
    sets = [*(float(v) for v in strengths), *([None] if clean else [])]
    datalists = {}
    for strength in sets:
        folder = os.path.join(data_dir, _tag_name(strength) + ("" if region_boxes else "_lesion_boxes"))
        datalists[strength] = os.path.join(folder, "datalist.json")
        if train and (not os.path.exists(datalists[strength]) or _region_boxes(datalists[strength]) != bool(region_boxes)):
            generate_shortcut_samples(folder, n=n, seed=data_seed, size=size, split=split,
                                      tag_rate=0.0 if strength is None else strength, region_boxes=region_boxes)
    defaults = dict(split_halves=False, image_size=[size, size], epochs=epochs, guidance_warmup_epochs=warmup_epochs,
                    num_copies=2, register_model=False, cam_images=0, localization_report=False,
                    experiment_name="shortcut")
    settings = with_study_store(output_dir, {**defaults, **overrides})
    fixed = json.loads(json.dumps({"n": n, "split": list(split), "size": size, "data_seed": data_seed,
                                   "region_boxes": bool(region_boxes), **settings}, default=str))
    settings_file = os.path.join(output_dir, "shortcut_settings.json")
    if os.path.exists(settings_file):  # a resumed study: its finished runs must have been trained like the new ones
        with open(settings_file) as f:
            before = {k: v for k, v in json.load(f).items() if k not in ("methods", "seeds", "strengths", "clean")}
        changed = sorted(k for k in set(before) | set(fixed) if before.get(k) != fixed.get(k))
        if changed:
            raise ValueError(f"{output_dir} holds a shortcut study with other settings ({', '.join(changed)}: "
                             f"{[before.get(k) for k in changed]} there, {[fixed.get(k) for k in changed]} now); "
                             "use another output folder")
    if train:  # written before the first run: a study stopped part-way is resumed only with its own settings
        os.makedirs(output_dir, exist_ok=True)
        write_json_atomic(settings_file, {**fixed, "methods": list(methods), "seeds": list(seeds),
                                          "strengths": list(strengths), "clean": clean}, indent=1)
    score_keys = ("split_halves", "image_size", "network_depth", "cam_layer")
    rows = []
    for strength in sets:
        for seed in seeds:
            for m in (methods if strength is not None else ["none"]):
                out = os.path.abspath(os.path.join(output_dir, "runs", _tag_name(strength), f"seed{seed}", m.replace("+", "_")))
                done = os.path.join(out, "scores.json")
                if not os.path.exists(done) and not train:
                    logger.info("shortcut test: %s (%s, seed %d) not finished: left out of the table", m, _tag_name(strength), seed)
                    continue
                if not os.path.exists(done):
                    logger.info("shortcut test: training %s (%s, seed %d)", m, _tag_name(strength), seed)
                    train_and_test(bundle, datalists[strength], out, task="shortcut", run_name=f"shortcut_{m}",
                                   **{**settings, **method_overrides(m), "seed": seed})
                    scores = score_shortcut(bundle, datalists[strength], _checkpoints(os.path.join(out, "checkpoints")),
                                            **{k: v for k, v in settings.items() if k in score_keys},
                                            datalist_task="shortcut", output_dir=out)
                    write_json_atomic(done, scores, indent=1)
                with open(done) as f:
                    scores = json.load(f)
                rows.extend({"strength": _tag_name(strength), "seed": seed, "method": "clean" if strength is None else m,
                             "checkpoint": which, **values} for which, values in scores.items())
    if not rows:
        raise ValueError(f"{output_dir}: no finished run of the methods, seeds and strengths asked for")
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "shortcut_results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(output_dir, "shortcut_table.md"), "w") as f:
        f.write(shortcut_table(rows))
    return rows


def shortcut_summary(rows: list[dict], max_gap: float = 0.05, max_tag_auc: float = 0.65) -> list[dict]:
    """Per strength, method and checkpoint: the mean over seeds of every score with Student's t interval (clipped
    to [0, 1]) for test AUC and AUC against the tag, and ``target``: in how many seeds the test AUC is within ``max_gap`` of the
    clean reference of the same seed (its ``val_auc`` checkpoint: no tag in its validation) and the AUC against the
    tag below ``max_tag_auc``."""
    clean = {r["seed"]: float(r["test_auc"]) for r in rows if r["strength"] == "clean" and r["checkpoint"] == "val_auc"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["strength"], r["method"], r["checkpoint"]), []).append(r)
    out = []
    for (strength, method, checkpoint), rs in groups.items():
        s = {"strength": strength, "method": method, "checkpoint": checkpoint, "seeds": len(rs)}
        for key in ("test_auc", "tag_auc"):  # the t interval of 3 seeds can pass an AUC's range: clipped to [0, 1]
            mean, low, high = t_mean_ci([float(r[key]) for r in rs])
            s[key], s[f"{key}_low"], s[f"{key}_high"] = mean, max(low, 0.0), min(high, 1.0)
        for key in ("validation_auc", "gradcam_tag_energy", "lrp_tag_energy", "gradcam_lesion_energy", "lrp_lesion_energy"):
            s[key] = float(np.mean([float(r[key]) for r in rs]))
        met = [r["seed"] in clean and float(r["test_auc"]) >= clean[r["seed"]] - max_gap and float(r["tag_auc"]) < max_tag_auc
               for r in rs]
        s["target"] = f"{sum(met)}/{len(rs)}" if strength != "clean" else ""
        out.append(s)
    return out


def _ci(s: dict, key: str) -> str:
    return ci_cell(s[key], s[f"{key}_low"], s[f"{key}_high"])


def shortcut_table(rows: list[dict]) -> str:
    """The summary (:func:`shortcut_summary`) as markdown: one row per strength, method and checkpoint."""
    lines = ["| tag on | method | checkpoint | seeds | val AUC | test AUC (95% t CI) | AUC vs tag (95% t CI) | Grad-CAM on tag "
             "| LRP on tag | Grad-CAM in lesion box | LRP in lesion box | target met |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in shortcut_summary(rows):
        strength = "none (clean)" if s["strength"] == "clean" else f"{float(s['strength'][3:]):.0%} of positives"
        lines.append(f"| {strength} | {s['method']} | {s['checkpoint']} | {s['seeds']} | {s['validation_auc']:.3f} "
                     f"| {_ci(s, 'test_auc')} | {_ci(s, 'tag_auc')} | {s['gradcam_tag_energy']:.3f} | {s['lrp_tag_energy']:.3f} "
                     f"| {s['gradcam_lesion_energy']:.3f} | {s['lrp_lesion_energy']:.3f} | {s['target']} |")
    return "\n".join(lines) + "\n"
