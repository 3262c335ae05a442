"""``cutremain`` command line: ingest a PACS export, import annotation formats, generate samples, run the demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

__all__ = ["main"]


def _ingest(args) -> int:
    from cutremain_monai.io.ingest import ingest

    split = tuple(float(v) for v in args.split.split(",")) if args.split else None
    report = ingest(
        args.dir,
        args.output,
        boxes=args.boxes,
        gsps=args.gsps,
        sr=args.sr,
        split=split,
        quarantine_dir=args.quarantine_dir,
        progress=not args.no_progress,
        near_duplicates=args.near_duplicates or None,
        path_mode=args.path_mode,
        workers=args.workers,
        resume=args.resume,
    )
    print(report.summary())
    print(f"datalist: {args.output}")
    return 0


def _infer(args) -> int:
    from monai.bundle import ConfigWorkflow

    from cutremain_monai.engines.experiment import bundle_configs, bundle_files

    bundle = os.path.abspath(args.bundle)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()] + ["inference.yaml"]
    settings = {"bundle_root": bundle, "datalist_task": None, **(json.loads(args.overrides) if args.overrides else {}),
                "input_dir": os.path.abspath(args.input)}
    if args.output_dir:
        settings["output_dir"] = os.path.abspath(args.output_dir)
    if args.dicom_out:
        settings.update(dicom_out=True, dicom_out_dir=os.path.abspath(args.dicom_out))
    if args.registry_version:
        settings["registry_version"] = args.registry_version
    wf = ConfigWorkflow(config_file=bundle_configs(bundle, configs), workflow_type="infer", **bundle_files(bundle),
                        **settings)
    wf.initialize()
    wf.run()
    wf.finalize()
    inference_dir = wf.parser.get_parsed_content("inference_dir")
    print(f"predictions: {inference_dir}/predictions.csv" + (f"; DICOM results: {args.dicom_out}/manifest.csv"
                                                             if args.dicom_out else ""))
    return 0


def _listen(args) -> int:
    import time

    from cutremain_monai.pacs.node import Listener, parse_destination

    node = Listener(args.bundle, args.work, parse_destination(args.forward), ae_title=args.ae_title, port=args.port,
                    host=args.host, configs=[c.strip() for c in args.configs.split(",") if c.strip()],
                    overrides=json.loads(args.overrides) if args.overrides else {}, quiet_seconds=args.quiet)
    node.start()
    print(f"listening as {args.ae_title} on {args.host}:{args.port}; results to {args.forward}; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
        print(json.dumps(node.report(), indent=1))
    return 0


def _send(args) -> int:
    from cutremain_monai.pacs.node import parse_destination, send_folder

    failed = send_folder(args.folder, parse_destination(args.to), calling_ae=args.ae_title)
    for path, reason in sorted(failed.items()):
        print(f"not sent: {path}: {reason}")
    print(json.dumps({"not_sent": len(failed)}))
    return 1 if failed else 0


def _deidentify(args) -> int:
    from cutremain_monai.pacs.deidentify import deidentify

    report = deidentify(args.input, args.output)
    flagged = sum(1 for r in report.written if r["flags"])
    print(json.dumps({"written": len(report.written), "not_dicom": report.not_dicom, "failed": report.failed,
                      "flagged_pixels_may_carry_text": flagged, "report": os.path.join(args.output, "deidentify_report.csv")}))
    return 0 if not report.failed else 1


# collections known to hold the same radiograph twice (under other patient ids, or with no patient ids at all);
# FracAtlas at 0.97: over its 1,899 films, limb views of different patients on the same dark detector background reach
# 0.85-0.95 and chained 50 blocks into one group of 1,116 images at 0.85 (cutremain_monai.data.near_duplicates)
NEAR_DUPLICATE_DEFAULTS = {"brixia": 0.85, "lungmasks": 0.85, "fracatlas": 0.97}


def _import(args) -> int:
    from cutremain_monai.io import importers
    from cutremain_monai.io.datalist import save_datalist, split_by_group

    fmt = args.format
    if fmt == "csv":
        items = importers.import_csv(args.source)
    elif fmt == "nih":
        items = importers.import_nih_cxr14(args.source, args.images, args.bbox)
    elif fmt == "coco":
        items = importers.import_coco(args.source, args.images)
    elif fmt == "fracatlas":
        items = importers.import_fracatlas_manifest(args.source, args.images, args.region, block_size=args.blocks)
    elif fmt == "yolo":
        items = importers.import_yolo(args.images, args.source)
    elif fmt == "brixia":
        items = importers.import_brixia(args.source, args.images, rater=args.rater)
    elif fmt == "lungmasks":
        items = importers.import_lung_masks(args.source, args.images)
    else:  # argparse restricts choices
        raise ValueError(fmt)
    # images (and masks) that do not decode were left out by the importer: report them, never drop them silently
    quarantined = list(getattr(items, "quarantined", []))
    report = importers.write_quarantine(importers.quarantine_path(args.output), quarantined)
    for path, reason in quarantined:
        print(f"quarantined (cannot decode): {path}: {reason}")
    items = list(items)
    threshold = args.near_duplicates
    if threshold is None:
        threshold = NEAR_DUPLICATE_DEFAULTS.get(fmt, 0.0)
    summary = {}
    if threshold > 0:
        from cutremain_monai.data.near_duplicates import group_near_duplicates_for_split

        items, summary, bad = group_near_duplicates_for_split(items, threshold, args.output)
        for path, reason in bad:
            print(f"near-duplicate check skipped (unreadable): {path}: {reason}")
    split = tuple(float(v) for v in args.split.split(","))
    save_datalist(split_by_group(items, split, args.seed), args.output)
    print(json.dumps({"items": len(items), "boxes": sum(len(i["boxes"]) for i in items), "output": args.output,
                      "quarantined": len(quarantined), "quarantine_report": report, **summary}))
    return 0


def _samples(args) -> int:
    from cutremain_monai.data.phantoms import generate_samples

    generate_samples(args.output, args.seed)
    print(f"wrote synthetic samples to {args.output}")
    return 0


def _readable_items(datalist: str, task: str | None) -> list[dict]:
    """Every section's items, with the files that cannot be read set aside and named (never silently dropped)."""
    from cutremain_monai.io.datalist import load_datalist
    from cutremain_monai.io.loader import split_readable

    items = []
    for section in ("training", "validation", "test"):
        try:
            items += load_datalist(datalist, section, task=task)
        except KeyError:
            pass
    items, bad = split_readable(items)
    for path, reason in bad:
        print(f"set aside (unreadable): {path}: {reason}")
    return items


def _overrides_and_output(args, name: str) -> tuple[dict, str]:
    """The ``--overrides`` JSON of a bundle runner (``{}`` when absent) and its output folder (``-o``, else
    ``<bundle>/outputs/<name>``)."""
    return (json.loads(args.overrides) if args.overrides else {}), (args.output or os.path.join(args.bundle, "outputs", name))


def _experiment(args) -> int:
    from cutremain_monai.engines.experiment import cross_validate

    items = _readable_items(args.datalist, args.task)
    overrides, output = _overrides_and_output(args, "cv")
    augs = [a.strip() for a in args.augmentations.split(",") if a.strip()]
    if args.kind == "cv":
        cross_validate(args.bundle, items, output, augs, folds=args.folds, seed=args.seed, **overrides)
        print(open(os.path.join(output, "cv_table.md")).read())
        if os.path.exists(os.path.join(output, "cv_per_class.md")):
            print(open(os.path.join(output, "cv_per_class.md")).read())
        print(f"results: {output}/cv_table.md, cv_table.csv, cv_results.csv")
    return 0


def _compare(args) -> int:
    from cutremain_monai.engines.compare import compare

    items = _readable_items(args.datalist, args.task)
    overrides, output = _overrides_and_output(args, "compare")
    methods = [m.strip() for m in (args.methods or "none,cut_remain,sup_cutout,sup_mixup,sup_cutmix,hide_and_seek,gain,isnet").split(",")
               if m.strip()]
    gammas = [float(v) for v in args.gammas.split(",") if v.strip()] if args.gammas else []
    compare(os.path.abspath(args.bundle), items, output, methods, folds=args.folds, seed=args.seed, gammas=gammas,
            gamma_folds=args.gamma_folds, fold_limit=args.fold_limit, threshold_rule=args.threshold_rule,
            target_sensitivity=args.target_sensitivity, localization_method=args.localization_method,
            heatmap_images=args.heatmap_images, shrink=args.shrink,
            extra_configs=[c.strip() for c in args.configs.split(",") if c.strip()], **overrides)
    print(open(os.path.join(output, "compare_table.md")).read())
    print(f"report: {output}/report.html; tables: {output}/compare_table.md, compare_summary.json")
    return 0


def _severity_baselines(args) -> int:
    from cutremain_monai.engines.experiment import bundle_parser
    from cutremain_monai.engines.severity_baselines import severity_baselines
    from cutremain_monai.io.datalist import load_datalist
    from cutremain_monai.metrics.severity import rater_agreement, severity_table

    overrides, output = _overrides_and_output(args, "severity_baselines")
    parser = bundle_parser(os.path.abspath(args.bundle), ["train.yaml", "cpu.yaml"], **overrides)
    transform = parser.get_parsed_content("preprocessing")
    train = load_datalist(args.datalist, "training", task=args.task)
    test = load_datalist(args.datalist, args.section, task=args.task)
    out = severity_baselines(train, test, transform)
    table = severity_table(None, rater_agreement(test), baselines={k: out[k] for k in ("constant", "zone_intensity")})
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, f"{args.section}_baselines.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(output, f"{args.section}_baselines.md"), "w") as f:
        f.write(table)
    print(f"fitted on {out['n_train']} training images, scored on the {args.section} section:")
    print(table)
    return 0


def _gamma(args) -> int:
    from cutremain_monai.engines.experiment import gamma_curve

    gammas = [float(v) for v in (args.gammas or "0,0.2,0.4,0.6,0.8,1.0").split(",") if v.strip()]
    overrides, output = _overrides_and_output(args, "gamma")
    from cutremain_monai.io.datalist import load_datalist
    from cutremain_monai.io.loader import split_readable

    clean = {}
    for section in ("training", "validation", "test"):
        clean[section], bad = split_readable(load_datalist(args.datalist, section, task=args.task))
        for path, reason in bad:
            print(f"set aside (unreadable): {path}: {reason}")
    os.makedirs(output, exist_ok=True)
    datalist = os.path.abspath(os.path.join(output, "datalist.json"))
    with open(datalist, "w") as f:
        json.dump(clean, f)
    gamma_curve(args.bundle, datalist, output, gammas, task=None, metric=args.metric, seed=args.seed, **overrides)
    print(open(os.path.join(output, "gamma_table.md")).read())
    print(f"results: {output}/gamma_table.md, gamma_results.csv, gamma_curve.png")
    return 0


def _self_train(args) -> int:
    from cutremain_monai.engines.self_training import progressive_self_training, read_schedule

    cfg = read_schedule(args.bundle)
    schedule = [float(v) for v in args.schedule.split(",")] if args.schedule else cfg["schedule"]
    unl_path = args.unlabelled or cfg.get("unlabelled_datalist")
    if not unl_path:
        raise SystemExit("self-train: give --unlabelled (a datalist of images with lung masks)")
    unlabelled = _readable_items(unl_path, cfg.get("unlabelled_task"))
    overrides, output = _overrides_and_output(args, "self_training")
    progressive_self_training(args.bundle, os.path.abspath(args.datalist), unlabelled, output, schedule=schedule,
                              pseudo_threshold=float(cfg.get("pseudo_threshold", 0.5)), seed=args.seed,
                              round_overrides={**(cfg.get("round_overrides") or {}), **json.loads(args.round_overrides or "{}")},
                              near_duplicate_threshold=(args.near_duplicates if args.near_duplicates is not None
                                                        else float(cfg.get("near_duplicate_threshold", 0.85))),
                              **overrides)
    print(open(os.path.join(output, "self_training.md")).read())
    return 0


def _erase(args) -> int:
    from cutremain_monai.engines.erasing import adversarial_erasing

    overrides, output = _overrides_and_output(args, "erasing")
    adversarial_erasing(os.path.abspath(args.bundle), os.path.abspath(args.datalist), output, rounds=args.rounds, q=args.q,
                        delta=args.delta, max_auc_drop=args.max_auc_drop, task=args.task, max_boxes=args.max_boxes, **overrides)
    print(open(os.path.join(output, "erasing_rounds.md")).read())
    print(f"results: {output}/mined_datalist.json (mined boxes), masks/, erasing_rounds.csv")
    return 0


def _severity_cv(args) -> int:
    from cutremain_monai.engines.severity_cv import DEFAULT_SETTINGS, severity_cv

    overrides, output = _overrides_and_output(args, "severity_cv")
    settings = json.loads(args.settings) if args.settings else DEFAULT_SETTINGS
    result = severity_cv(os.path.abspath(args.bundle), os.path.abspath(args.datalist), output, settings, folds=args.folds,
                         seed=args.seed, task=args.task, fold_limit=args.fold_limit, **overrides)
    print(open(os.path.join(output, "severity_cv.md")).read())
    print(open(os.path.join(output, "severity_cv_test.md")).read())
    print(f"chosen on CV: {result['chosen']}; results: {output}/severity_cv.md, severity_cv_test.md, severity_cv.json")
    return 0


def _psl(args) -> int:
    from cutremain_monai.engines.lesion_segmentation import psl_experiment
    from cutremain_monai.engines.localize import _table_md

    overrides, output = _overrides_and_output(args, "psl")
    seg = json.loads(args.seg_overrides) if args.seg_overrides else {}
    seg_bundle = os.path.abspath(args.seg_bundle or os.path.join(os.path.dirname(os.path.abspath(args.bundle)), "lesion_segmentation"))
    table = psl_experiment(os.path.abspath(args.bundle), seg_bundle, os.path.abspath(args.datalist), output,
                           rounds=args.rounds, q=args.q, delta=args.delta, bg_threshold=args.bg_threshold,
                           cls_overrides=overrides, seg_overrides=seg, task=args.task)
    print(_table_md(table))
    print(f"results: {output}/psl_localization_table.md, pseudo_masks/pseudo_masks.csv, erasing/erasing_rounds.md")
    return 0


def _severity_guidance(args) -> int:
    from cutremain_monai.engines.severity_guidance import severity_guidance_experiment

    overrides, output = _overrides_and_output(args, "severity_guidance")
    methods = [m.strip() for m in (args.methods or "none,isnet").split(",") if m.strip()]
    severity_guidance_experiment(os.path.abspath(args.bundle), args.datalist, output, methods=methods, task=args.task,
                                 seed=args.seed, **overrides)
    print(open(os.path.join(output, "severity_guidance.md")).read())
    print(f"results: {output}/severity_guidance.md, severity_guidance.csv")
    return 0


def _background(args) -> int:
    from cutremain_monai.engines.background_learning import background_experiment

    overrides, output = _overrides_and_output(args, "background")
    ratios = [float(r) for r in (args.ratios or "1,2,4").split(",") if r.strip()]
    background_experiment(os.path.abspath(args.bundle), args.datalist, output, ratios=ratios, cam=not args.no_cam,
                          task=args.task, seed=args.seed, **overrides)
    print(open(os.path.join(output, "background_table.md")).read())
    print(f"results: {output}/background_table.md, background_results.csv")
    return 0


def _shortcut(args) -> int:
    from cutremain_monai.engines.shortcut import shortcut_experiment

    overrides, output = _overrides_and_output(args, "shortcut")
    methods = [m.strip() for m in (args.methods or "none,cut_remain,sup_cutout,gain,isnet").split(",") if m.strip()]
    shortcut_experiment(os.path.abspath(args.bundle), output, methods=methods, n=args.images, size=args.size,
                        epochs=args.epochs, warmup_epochs=args.warmup_epochs, seed=args.seed, **overrides)
    print(open(os.path.join(output, "shortcut_table.md")).read())
    print(f"results: {output}/shortcut_table.md, shortcut_results.csv")
    return 0


def _localize(args) -> int:
    from cutremain_monai.engines.localize import _table_md, localize

    overrides, output = _overrides_and_output(args, "localization")
    table = localize(os.path.abspath(args.bundle), args.checkpoint, os.path.abspath(args.datalist), output,
                     section=args.section, methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                     task=args.task, tau_section=None if args.tau_section in ("", "none") else args.tau_section,
                     tracking_uri=args.tracking_uri, overlays=args.overlays, **overrides)
    print(_table_md(table))
    print(f"results: {output}/{args.section}_localization.csv, {args.section}_localization_table.md, "
          f"{args.section}_localization_overlays/")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cutremain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="walk a PACS export, write a datalist and a quarantine report")
    p.add_argument("dir")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--boxes", help="CSV (path,label,x0,y0,x1,y1,box_label) or datalist JSON with boxes")
    g.add_argument("--gsps", action="store_true", help="read boxes from presentation states in the tree")
    p.add_argument("--sr", action="store_true", help="read boxes from the image regions of structured reports (TID "
                   "1500) in the tree (with --gsps: both)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--split", help="train,val,test fractions for a patient-wise split, e.g. 0.7,0.15,0.15")
    p.add_argument("--quarantine-dir", help="copy files that could not be used there")
    p.add_argument("--near-duplicates", type=float, default=None, metavar="R",
                   help="with --split: also keep images whose thumbnails correlate at |r| >= R (0.85 suits X-rays) "
                        "in one group, whatever their PatientID; pairs go to <output>.near_duplicates.csv")
    p.add_argument("--path-mode", choices=["auto", "relative", "uid"], default="auto",
                   help="how files are named in the datalist and the report: relative to DIR, or by SOP Instance UID "
                        "through a link folder (<output stem>_files/); auto: uid when a folder or file name holds "
                        "the patient's name, ID or birth date from its header")
    p.add_argument("--workers", type=int, default=1, help="processes that decode files")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted ingest of DIR into the same output (its journal is beside it)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_ingest)

    p = sub.add_parser("deidentify", help="de-identified copy of a DICOM export for research (dicognito, keyed; "
                       "boxes in presentation states still pair)")
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(func=_deidentify)

    p = sub.add_parser("infer", help="score every X-ray of a folder with a trained bundle (its inference.yaml): "
                       "predictions.csv, overlays, and with --dicom-out the SR / Secondary Capture / presentation state")
    p.add_argument("--bundle", required=True)
    p.add_argument("--input", required=True, help="the folder of images (a PACS export: any names, any nesting)")
    p.add_argument("--output-dir", help="the training run's output folder (its checkpoint and threshold)")
    p.add_argument("--dicom-out", help="write the DICOM results here (SR/, SC/, PR/, manifest.csv)")
    p.add_argument("--registry-version", help="the MLflow model version to name in the DICOM results")
    p.add_argument("--configs", default="train.yaml", help="the bundle's configs before inference.yaml")
    p.add_argument("--overrides", help="JSON of bundle settings")
    p.set_defaults(func=_infer)

    p = sub.add_parser("listen", help="a DICOM node: receive X-rays (C-STORE), score each study with a bundle once it "
                       "is quiet, send the SR / Secondary Capture / presentation state back")
    p.add_argument("--bundle", required=True, help="the bundle folder (its inference.yaml runs with dicom_out)")
    p.add_argument("--ae-title", default="CUTREMAIN")
    p.add_argument("--port", type=int, default=11112)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--forward", required=True, metavar="HOST:PORT:AET", help="where the results go (the PACS)")
    p.add_argument("--work", default="cutremain_node", help="incoming/, results/, retry/, set_aside/")
    p.add_argument("--quiet", type=float, default=10.0, help="seconds without a new image before a study is scored")
    p.add_argument("--configs", default="train.yaml", help="the bundle's configs before inference.yaml (e.g. "
                   "train.yaml,cpu.yaml)")
    p.add_argument("--overrides", help='JSON of bundle settings, e.g. \'{"output_dir": "outputs/run1"}\' (the model)')
    p.set_defaults(func=_listen)

    p = sub.add_parser("send", help="send every DICOM file of a folder to a DICOM node (C-STORE)")
    p.add_argument("folder")
    p.add_argument("--to", required=True, metavar="HOST:PORT:AET")
    p.add_argument("--ae-title", default="CUTREMAIN", help="our (calling) AE title")
    p.set_defaults(func=_send)

    p = sub.add_parser("import", help="convert an annotation format to a datalist")
    p.add_argument("format", choices=["csv", "nih", "coco", "fracatlas", "yolo", "brixia", "lungmasks"])
    p.add_argument("source", help="CSV / JSON file (for yolo: the labels folder)")
    p.add_argument("--images", help="image folder (brixia: the dataset root; lungmasks: the manifest's folder by default)")
    p.add_argument("--bbox", help="nih: BBox_List_2017.csv[.gz]")
    p.add_argument("--region", help="fracatlas: keep this region (hip, shoulder)")
    p.add_argument("--blocks", type=int, default=None, metavar="N",
                   help="fracatlas: split by blocks of N consecutive image numbers (no patient ids; 25 suits FracAtlas)")
    p.add_argument("--rater", default="S", help="brixia: rater prefix (S or J)")
    p.add_argument("--split", default="0.7,0.15,0.15")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--near-duplicates", type=float, default=None, metavar="R",
                   help="merge the split groups of images whose thumbnails correlate at |r| >= R (0: off; default "
                        "0.85 for brixia, lungmasks and fracatlas, off for the others); pairs go to <output>.near_duplicates.csv")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=_import)

    p = sub.add_parser("localize", help="maps (CAM, Grad-CAM, Grad-CAM++, LRP) of a trained bundle model on a datalist "
                       "section, scored against the boxes: per-image CSV, table, overlays, MLflow")
    p.add_argument("--bundle", required=True)
    p.add_argument("--checkpoint", required=True, help="the model's weights (e.g. outputs/<run>/checkpoints/model.pt)")
    p.add_argument("--datalist", required=True)
    p.add_argument("--task", default=None)
    p.add_argument("--section", default="test")
    p.add_argument("--tau-section", default="validation", help="section that chooses Loc. Acc.'s threshold (none: max over tau)")
    p.add_argument("--methods", default="cam,gradcam,lrp", help="comma-separated: cam, gradcam, gradcam_pp, lrp")
    p.add_argument("--overlays", type=int, default=16, help="cases drawn (methods side by side)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI to log the table and overlays to")
    p.add_argument("--overrides", help='JSON of bundle overrides (the training settings: image_size, network_depth, ...)')
    p.add_argument("-o", "--output")
    p.set_defaults(func=_localize)

    p = sub.add_parser("samples", help="generate the synthetic DICOM phantoms")
    p.add_argument("-o", "--output", default="dicom_samples")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_samples)

    p = sub.add_parser("experiment", help="k-fold cross-validation of augmentations (cv), the annotation-budget curve "
                       "(gamma), progressive self-training (self-train), adversarial-erasing region mining (erase) or "
                       "the shortcut test of guided training (shortcut), ISNet on COVID severity (severity-guidance), background "
                            "learning against CAM (background), AE-PSL lesion segmentation from erasing (psl), COVID severity "
                            "settings chosen by CV on the dev data (severity-cv)")
    p.add_argument("kind", choices=["cv", "compare", "severity-baselines", "gamma", "self-train", "erase", "shortcut", "severity-guidance", "background", "psl", "severity-cv"])
    p.add_argument("--bundle", required=True)
    p.add_argument("--datalist", help="datalist JSON (default: dicom_samples/datalist.json)", default="dicom_samples/datalist.json")
    p.add_argument("--task", default=None, help="section of a multi-task datalist (e.g. clavicle)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--augmentations", default="none,cut_remain,sup_cutout,sup_mixup,sup_cutmix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gammas", default=None, help="gamma: fractions of training images whose boxes are used (default "
                   "0,0.2,...,1.0); compare: the annotation-budget curve at these (default: none)")
    p.add_argument("--gamma-folds", type=int, default=None, help="compare: the gamma curve on the first N folds (default: all run)")
    p.add_argument("--fold-limit", type=int, default=None, help="compare, severity-cv: run only the first N of the folds (a subsampled setting)")
    p.add_argument("--threshold-rule", default="youden", choices=["youden", "sensitivity", "f1"],
                   help="compare: how each fold's validation share chooses the operating threshold (default youden)")
    p.add_argument("--target-sensitivity", type=float, default=0.9, help="compare: --threshold-rule sensitivity target")
    p.add_argument("--localization-method", default="gradcam", help="compare: the map scored and shown (cam, gradcam, lrp)")
    p.add_argument("--configs", default="cpu.yaml", help="compare: override files of the bundle after train.yaml "
                   "(cpu.yaml: the CPU setting; gpu.yaml: ResNet-50, 448 px, AMP, channels_last)")
    p.add_argument("--shrink", type=int, default=None, metavar="N",
                   help="compare: train on copies of the images with long side N px, made once (a CPU setting)")
    p.add_argument("--heatmap-images", type=int, default=6, help="compare: test images in the report's heatmap grid")
    p.add_argument("--unlabelled", help="self-train: datalist of unlabelled images with lung masks")
    p.add_argument("--schedule", help="self-train: shares of the unlabelled images per round, e.g. 0.3,0.6,1.0 (default: the bundle's self_training.yaml)")
    p.add_argument("--round-overrides", help="self-train: JSON of overrides for the student rounds only, e.g. '{\"epochs\": 6}'")
    p.add_argument("--near-duplicates", type=float, default=None, metavar="R",
                   help="self-train: leave out unlabelled images that near-duplicate a validation/test image (|r| >= R; "
                        "0: off; default: the bundle's self_training.yaml, else 0.85)")
    p.add_argument("--rounds", type=int, default=3, help="erase: erasing rounds")
    p.add_argument("--q", type=float, default=0.2, help="erase: share of the CAM's top pixels mined per round")
    p.add_argument("--delta", type=float, default=None, help="erase: mine the min-max CAM at or above this instead of top-q")
    p.add_argument("--max-auc-drop", type=float, default=0.05, help="erase: stop when validation AUC falls by more than this")
    p.add_argument("--max-boxes", type=int, default=1, help="erase: mined boxes per image (largest components)")
    p.add_argument("--settings", default=None, help="severity-cv: JSON {name: bundle overrides} of the settings to "
                   "compare (default: today, small_head, frozen_features, augment)")
    p.add_argument("--seg-bundle", default=None, help="psl: the lesion-segmentation bundle (default: lesion_segmentation beside --bundle)")
    p.add_argument("--seg-overrides", default=None, help="psl: JSON of overrides for the lesion-segmentation bundle")
    p.add_argument("--bg-threshold", type=float, default=0.2, help="psl: normalised CAM below which a pixel is background")
    p.add_argument("--methods", help="compare: augmentations and guidances (default none,cut_remain,sup_cutout,sup_mixup,"
                                     "sup_cutmix,hide_and_seek,gain,isnet; a+b combines); shortcut: methods to train (default none,cut_remain,sup_cutout,gain,isnet; also cut_remain+isnet); "
                                     "severity-guidance: none,isnet (also isnet_free)")
    p.add_argument("--images", type=int, default=200, help="shortcut: phantoms to generate (60/20/20 split)")
    p.add_argument("--size", type=int, default=128, help="shortcut: phantom size in pixels")
    p.add_argument("--epochs", type=int, default=20, help="shortcut: training epochs per method")
    p.add_argument("--warmup-epochs", type=int, default=5, help="shortcut: plain epochs before the guidance losses")
    p.add_argument("--metric", default="auc", help="gamma: the test metric on the curve (auc, f1, accuracy, map, of1)")
    p.add_argument("--ratios", help="background: background ratios to train (default 1,2,4)")
    p.add_argument("--no-cam", action="store_true", help="background: skip the whole-image CAM baseline")
    p.add_argument("--overrides", help='JSON of bundle overrides, e.g. \'{"epochs": 10, "image_size": [128, 128]}\'')
    p.add_argument("-o", "--output")
    p.add_argument("--section", default="test", help="severity-baselines: the section scored (test, validation)")
    p.set_defaults(func=lambda a: {"compare": _compare, "severity-baselines": _severity_baselines, "gamma": _gamma, "self-train": _self_train, "erase": _erase, "shortcut": _shortcut,
                                     "severity-guidance": _severity_guidance, "background": _background, "psl": _psl,
                                     "severity-cv": _severity_cv}.get(a.kind, _experiment)(a))

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
