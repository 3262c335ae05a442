"""``cutremain experiment <kind>``: the studies, each kind its own subcommand with its own flags.

cv, gamma and compare compare training recipes on a binary or multi-label bundle, premise over training seeds on
one split; shortcut tests guided training against a burned-in tag; erase and psl mine lesion regions from image
labels; background trains background learning against CAM; severity-baselines, severity-cv, severity-guidance and self-train study COVID severity.
Each writes its tables under ``-o`` (default ``<bundle>/outputs/<kind>``) and prints the main one.
"""

from __future__ import annotations

import json
import os

from cutremain_monai.cli.common import add_bundle_arguments, comma_list, overrides_and_output, print_file, readable_items
from cutremain_monai.engines.methods import AUGMENTATIONS, method_names

__all__ = ["register"]

COMPARE_METHODS = "none,cut_remain,sup_cutout,sup_mixup,sup_cutmix,hide_and_seek,gain,isnet"
SHORTCUT_METHODS = "none,cut_remain,sup_cutout,gain,isnet"
PREMISE_METHODS = "none,cut_remain,sup_cutout,sup_cutmix,hide_and_seek"
METHOD_HELP = (f"comma-separated method names: {', '.join(method_names())}; an augmentation and a guidance join "
               "with + (cut_remain+isnet)")


def cv_command(args) -> int:
    from cutremain_monai.experiments.cross_validation import cross_validate  # lazy: `cutremain --help` starts without torch

    items = readable_items(args.datalist, args.task)
    overrides, output = overrides_and_output(args, "cv")
    cross_validate(args.bundle, items, output, comma_list(args.augmentations), folds=args.folds, seed=args.seed, **overrides)
    print_file(os.path.join(output, "cv_table.md"))
    if os.path.exists(os.path.join(output, "cv_per_class.md")):
        print_file(os.path.join(output, "cv_per_class.md"))
    print(f"results: {output}/cv_table.md, cv_table.csv, cv_results.csv")
    return 0


def compare_command(args) -> int:
    from cutremain_monai.experiments.compare import compare  # lazy: `cutremain --help` starts without torch

    items = readable_items(args.datalist, args.task)
    overrides, output = overrides_and_output(args, "compare")
    gammas = [float(v) for v in comma_list(args.gammas)]
    compare(os.path.abspath(args.bundle), items, output, comma_list(args.methods, COMPARE_METHODS), folds=args.folds,
            seed=args.seed, gammas=gammas, gamma_folds=args.gamma_folds, fold_limit=args.fold_limit,
            threshold_rule=args.threshold_rule, target_sensitivity=args.target_sensitivity,
            localization_method=args.localization_method, heatmap_images=args.heatmap_images, shrink=args.shrink,
            extra_configs=comma_list(args.configs), **overrides)
    print_file(os.path.join(output, "compare_table.md"))
    print(f"report: {output}/report.html; tables: {output}/compare_table.md, compare_summary.json")
    return 0


def premise_command(args) -> int:
    from cutremain_monai.experiments.premise import premise  # lazy: `cutremain --help` starts without torch

    overrides, output = overrides_and_output(args, "premise")
    premise(os.path.abspath(args.bundle), args.datalist, output, comma_list(args.methods, PREMISE_METHODS),
            seeds=[int(v) for v in comma_list(args.seeds, "0,1,2,3,4")],
            gammas=[float(v) for v in comma_list(args.gammas)], gamma_seed=args.gamma_seed, task=args.task,
            extra_configs=comma_list(args.configs), **overrides)
    print_file(os.path.join(output, "premise_table.md"))
    print(f"results: {output}/premise_table.md, premise_summary.json")
    return 0


def gamma_command(args) -> int:
    from cutremain_monai.experiments.cross_validation import gamma_curve  # lazy: `cutremain --help` starts without torch
    from cutremain_monai.io.datalist import load_datalist  # lazy: as above
    from cutremain_monai.io.loader import split_readable  # lazy: as above

    gammas = [float(v) for v in comma_list(args.gammas, "0,0.2,0.4,0.6,0.8,1.0")]
    overrides, output = overrides_and_output(args, "gamma")
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
    print_file(os.path.join(output, "gamma_table.md"))
    print(f"results: {output}/gamma_table.md, gamma_results.csv, gamma_curve.png")
    return 0


def shortcut_command(args) -> int:
    from cutremain_monai.experiments.shortcut import shortcut_experiment  # lazy: `cutremain --help` starts without torch

    overrides, output = overrides_and_output(args, "shortcut")
    shortcut_experiment(os.path.abspath(args.bundle), output, methods=comma_list(args.methods, SHORTCUT_METHODS),
                        n=args.images, size=args.size, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                        seeds=[int(v) for v in comma_list(args.seeds, "0")],
                        strengths=[float(v) for v in comma_list(args.strengths, "1.0")], clean=not args.no_clean,
                        data_seed=args.seed, region_boxes=not args.lesion_boxes, train=not args.table_only, **overrides)
    print_file(os.path.join(output, "shortcut_table.md"))
    print(f"results: {output}/shortcut_table.md, shortcut_results.csv")
    return 0


def erase_command(args) -> int:
    from cutremain_monai.experiments.erasing import adversarial_erasing  # lazy: `cutremain --help` starts without torch

    overrides, output = overrides_and_output(args, "erasing")
    adversarial_erasing(os.path.abspath(args.bundle), os.path.abspath(args.datalist), output, rounds=args.rounds, q=args.q,
                        delta=args.delta, max_auc_drop=args.max_auc_drop, task=args.task, max_boxes=args.max_boxes,
                        **overrides)
    print_file(os.path.join(output, "erasing_rounds.md"))
    print(f"results: {output}/mined_datalist.json (mined boxes), masks/, erasing_rounds.csv")
    return 0


def psl_command(args) -> int:
    from cutremain_monai.experiments.psl import psl_experiment  # lazy: `cutremain --help` starts without torch
    from cutremain_monai.metrics.localization import localization_table_md  # lazy: as above

    overrides, output = overrides_and_output(args, "psl")
    seg = json.loads(args.seg_overrides) if args.seg_overrides else {}
    seg_bundle = os.path.abspath(args.seg_bundle or os.path.join(os.path.dirname(os.path.abspath(args.bundle)),
                                                                 "lesion_segmentation"))
    table = psl_experiment(os.path.abspath(args.bundle), seg_bundle, os.path.abspath(args.datalist), output,
                           rounds=args.rounds, q=args.q, delta=args.delta, bg_threshold=args.bg_threshold,
                           cls_overrides=overrides, seg_overrides=seg, task=args.task)
    print(localization_table_md(table))
    print(f"results: {output}/psl_localization_table.md, pseudo_masks/pseudo_masks.csv, erasing/erasing_rounds.md")
    return 0


def background_command(args) -> int:
    from cutremain_monai.experiments.background_learning import background_experiment  # lazy: `cutremain --help` starts without torch

    overrides, output = overrides_and_output(args, "background")
    background_experiment(os.path.abspath(args.bundle), args.datalist, output,
                          ratios=[float(r) for r in comma_list(args.ratios, "1,2,4")], cam=not args.no_cam,
                          task=args.task, seed=args.seed, **overrides)
    print_file(os.path.join(output, "background_table.md"))
    print(f"results: {output}/background_table.md, background_results.csv")
    return 0


def severity_baselines_command(args) -> int:
    from cutremain_monai.engines.bundle import bundle_parser  # lazy: `cutremain --help` starts without torch
    from cutremain_monai.io.datalist import load_datalist  # lazy: as above
    from cutremain_monai.metrics.severity import rater_agreement, severity_table  # lazy: as above
    from cutremain_monai.metrics.severity_baselines import severity_baselines  # lazy: as above

    overrides, output = overrides_and_output(args, "severity_baselines")
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


def severity_cv_command(args) -> int:
    from cutremain_monai.experiments.severity_cv import DEFAULT_SETTINGS, severity_cv  # lazy: `cutremain --help` starts without torch

    overrides, output = overrides_and_output(args, "severity_cv")
    settings = json.loads(args.settings) if args.settings else DEFAULT_SETTINGS
    result = severity_cv(os.path.abspath(args.bundle), os.path.abspath(args.datalist), output, settings, folds=args.folds,
                         seed=args.seed, task=args.task, fold_limit=args.fold_limit, **overrides)
    print_file(os.path.join(output, "severity_cv.md"))
    print_file(os.path.join(output, "severity_cv_test.md"))
    print(f"chosen on CV: {result['chosen']}; results: {output}/severity_cv.md, severity_cv_test.md, severity_cv.json")
    return 0


def severity_guidance_command(args) -> int:
    from cutremain_monai.experiments.severity_guidance import severity_guidance_experiment  # lazy: `cutremain --help` starts without torch

    overrides, output = overrides_and_output(args, "severity_guidance")
    severity_guidance_experiment(os.path.abspath(args.bundle), args.datalist, output,
                                 methods=comma_list(args.methods, "none,isnet"), task=args.task, seed=args.seed,
                                 **overrides)
    print_file(os.path.join(output, "severity_guidance.md"))
    print(f"results: {output}/severity_guidance.md, severity_guidance.csv")
    return 0


def self_train_command(args) -> int:
    from cutremain_monai.experiments.self_training import progressive_self_training, read_schedule  # lazy: `cutremain --help` starts without torch

    cfg = read_schedule(args.bundle)
    schedule = [float(v) for v in comma_list(args.schedule)] or cfg["schedule"]
    unl_path = args.unlabelled or cfg.get("unlabelled_datalist")
    if not unl_path:
        raise SystemExit("self-train: give --unlabelled (a datalist of images with lung masks)")
    unlabelled = readable_items(unl_path, cfg.get("unlabelled_task"))
    overrides, output = overrides_and_output(args, "self_training")
    progressive_self_training(args.bundle, os.path.abspath(args.datalist), unlabelled, output, schedule=schedule,
                              pseudo_threshold=float(cfg.get("pseudo_threshold", 0.5)), seed=args.seed,
                              round_overrides={**(cfg.get("round_overrides") or {}), **json.loads(args.round_overrides or "{}")},
                              near_duplicate_threshold=(args.near_duplicates if args.near_duplicates is not None
                                                        else float(cfg.get("near_duplicate_threshold", 0.85))),
                              **overrides)
    print_file(os.path.join(output, "self_training.md"))
    return 0


def _kind(sub, name: str, help_text: str, func, description: str | None = None, **bundle_args):
    p = sub.add_parser(name, help=help_text, description=description or help_text)
    add_bundle_arguments(p, output_name=name, **bundle_args)
    p.set_defaults(func=func)
    return p


def _folds(p, default: int = 5) -> None:
    p.add_argument("--folds", type=int, default=default, help="folds, grouped by patient (default %(default)s)")


def _erasing_flags(p) -> None:
    p.add_argument("--rounds", type=int, default=3, help="erasing rounds (default %(default)s)")
    p.add_argument("--q", type=float, default=0.2, help="share of the CAM's top pixels mined per round (default %(default)s)")
    p.add_argument("--delta", type=float, default=None, help="mine the min-max CAM at or above this instead of top-q")


def register(sub) -> None:
    """Add ``experiment`` and its kinds to the ``cutremain`` subparsers."""
    top = sub.add_parser("experiment", help="the studies: cv, compare, premise, gamma, shortcut, erase, psl, background, "
                         "severity-baselines, severity-cv, severity-guidance, self-train",
                         description=__doc__.split("\n\n")[1])
    kinds = top.add_subparsers(dest="kind", required=True, metavar="<kind>")

    p = _kind(kinds, "cv", "k-fold cross-validation of augmentations on the same grouped folds (the paper's Tables 2-3)", cv_command)
    _folds(p)
    p.add_argument("--augmentations", default="none,cut_remain,sup_cutout,sup_mixup,sup_cutmix",
                   help=f"comma-separated, of {', '.join(AUGMENTATIONS)} (default %(default)s)")

    p = _kind(kinds, "compare", "every method on the same grouped folds: pooled AUC with DeLong intervals, paired "
              "differences, thresholds chosen on validation, calibration, localisation, report.html", compare_command)
    _folds(p)
    p.add_argument("--methods", default=COMPARE_METHODS, help=METHOD_HELP + " (default %(default)s)")
    p.add_argument("--configs", default="cpu.yaml", help="override files of the bundle after train.yaml (cpu.yaml: the "
                   "CPU setting; gpu.yaml: ResNet-50, 448 px, AMP, channels_last)")
    p.add_argument("--gammas", default=None, help="also the annotation-budget curve at these gammas (e.g. 0,0.2,...,1.0)")
    p.add_argument("--gamma-folds", type=int, default=None, help="the gamma curve on the first N folds (default: all run)")
    p.add_argument("--fold-limit", type=int, default=None, help="run only the first N folds (a subsampled setting)")
    p.add_argument("--threshold-rule", default="youden", choices=["youden", "sensitivity", "f1"],
                   help="how each fold's validation share chooses the operating threshold (default %(default)s)")
    p.add_argument("--target-sensitivity", type=float, default=0.9, help="--threshold-rule sensitivity's target")
    p.add_argument("--localization-method", default="gradcam", help="the map scored and shown (cam, gradcam, lrp)")
    p.add_argument("--shrink", type=int, default=None, metavar="N",
                   help="train on copies of the images with long side N px, made once (a CPU setting)")
    p.add_argument("--heatmap-images", type=int, default=6, help="test images in the report's heatmap grid")

    p = _kind(kinds, "premise", "Cut&Remain's premise test: methods over training seeds on the datalist's own split, "
              "each paired with none (DeLong per seed, t interval over seeds), and the gamma curve", premise_command,
              seed=False)
    p.add_argument("--methods", default=PREMISE_METHODS, help=METHOD_HELP + " (default %(default)s)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="training seeds (default %(default)s)")
    p.add_argument("--gammas", default=None, help="also Cut&Remain's gamma curve at these shares (e.g. 0,0.2,...,1.0)")
    p.add_argument("--gamma-seed", type=int, default=0, help="the seed of the gamma curve's runs (default 0)")
    p.add_argument("--configs", default="cpu.yaml", help="override files of the bundle after train.yaml")

    p = _kind(kinds, "gamma", "the annotation-budget curve: Cut&Remain with boxes on a growing share of training "
              "images (the paper's Figure 7)", gamma_command)
    p.add_argument("--gammas", default=None, help="fractions of training images whose boxes are used (default 0,0.2,...,1.0)")
    p.add_argument("--metric", default="auc", help="the test metric on the curve (auc, f1, accuracy, map, of1)")

    p = _kind(kinds, "shortcut", "the shortcut test of guided training: a burned-in tag on every positive in training, "
              "independent of the label in test", shortcut_command, datalist=False, task=False)
    p.add_argument("--methods", default=SHORTCUT_METHODS, help=METHOD_HELP + " (default %(default)s)")
    p.add_argument("--images", type=int, default=300, help="phantoms to generate (120 training, 40 validation, the rest test)")
    p.add_argument("--size", type=int, default=128, help="phantom size in pixels")
    p.add_argument("--epochs", type=int, default=25, help="training epochs per method (warm-up included)")
    p.add_argument("--seeds", default="0", help="training seeds (default %(default)s)")
    p.add_argument("--strengths", default="1.0", help="shares of training / validation positives with the tag (default %(default)s)")
    p.add_argument("--no-clean", action="store_true", help="leave out the clean reference (none trained without any tag)")
    p.add_argument("--lesion-boxes", action="store_true", help="sets without the relevant-area box around the clavicles "
                   "(the guidance mask is then the lesion or normal-region box alone, as in the protocol study)")
    p.add_argument("--warmup-epochs", type=int, default=5, help="plain epochs before the guidance losses")
    p.add_argument("--table-only", action="store_true", help="the tables from the runs already finished, nothing trained "
                   "(a study in progress or stopped part-way; the table's seeds column says how many each row has)")

    p = _kind(kinds, "erase", "adversarial-erasing region mining: rounds of train / CAM top-q / erase; the mined "
              "boxes as a datalist", erase_command, seed=False)
    _erasing_flags(p)
    p.add_argument("--max-auc-drop", type=float, default=0.05, help="stop when validation AUC falls by more than this")
    p.add_argument("--max-boxes", type=int, default=1, help="mined boxes per image (largest components)")

    p = _kind(kinds, "psl", "AE-PSL lesion segmentation from image labels: erasing, pseudo-masks, PSL and PSL + SEC "
              "in one localisation table", psl_command, seed=False)
    _erasing_flags(p)
    p.add_argument("--seg-bundle", default=None, help="the lesion-segmentation bundle (default: lesion_segmentation beside --bundle)")
    p.add_argument("--seg-overrides", default=None, help="JSON of overrides for the lesion-segmentation bundle")
    p.add_argument("--bg-threshold", type=float, default=0.2, help="normalised CAM below which a pixel is background")

    p = _kind(kinds, "background", "background learning (random patches, sliding-window targetness) against CAM",
              background_command)
    p.add_argument("--ratios", default="1,2,4", help="background ratios to train (default %(default)s)")
    p.add_argument("--no-cam", action="store_true", help="skip the whole-image CAM baseline")

    p = _kind(kinds, "severity-baselines", "COVID severity baselines (training-mean constant, per-zone intensity "
              "logistic regressions) on a section", severity_baselines_command, seed=False)
    p.add_argument("--section", default="test", help="the section scored (test, validation)")

    p = _kind(kinds, "severity-cv", "COVID severity settings chosen by CV on the dev data; fold ensembles on the test "
              "section once", severity_cv_command)
    _folds(p, 3)
    p.add_argument("--fold-limit", type=int, default=None, help="run only the first N folds (a subsampled setting)")
    p.add_argument("--settings", default=None, help="JSON {name: bundle overrides} of the settings to compare "
                   "(default: today, small_head, frozen_features, augment)")

    p = _kind(kinds, "severity-guidance", "ISNet on COVID severity: relevance outside the lungs with and without the "
              "heatmap loss", severity_guidance_command)
    p.add_argument("--methods", default="none,isnet", help="none, isnet, isnet_free (default %(default)s)")

    p = _kind(kinds, "self-train", "progressive self-training (teacher -> student on labelled + a growing share of "
              "pseudo-labelled images)", self_train_command, task=False)
    p.add_argument("--unlabelled", help="datalist of unlabelled images with lung masks")
    p.add_argument("--schedule", help="shares of the unlabelled images per round, e.g. 0.3,0.6,1.0 (default: the "
                   "bundle's self_training.yaml)")
    p.add_argument("--round-overrides", help="JSON of overrides for the student rounds only, e.g. '{\"epochs\": 6}'")
    p.add_argument("--near-duplicates", type=float, default=None, metavar="R",
                   help="leave out unlabelled images that near-duplicate a validation/test image (|r| >= R; 0: off; "
                        "default: the bundle's self_training.yaml, else 0.85)")
