"""``make docs-results``: the result tables of the bundles' docs, regenerated from the runs that produce them.

Each table in a ``docs/README.md`` that comes from a command sits between two markers::

    <!-- results: NAME -->
    ... (generated: do not edit by hand) ...
    <!-- /results -->

and is rewritten from that command's output folder, with the date and the command in the generated text. The demo
(``python -m cutremain_monai.demo``, about 3 minutes) is run first unless ``--no-run``; the long studies (hours on a
CPU) are not run here: their blocks are rewritten when their output folder is found under ``--runs`` (default
``outputs/``, the folder their documented commands write to) and kept as they are otherwise, with a line saying so.

    python tools/docs_results.py [--no-run] [--runs outputs] [--check]

``--check`` rewrites nothing and exits 1 when a block differs from what its run gives (or a marker is missing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLAVICLE_DOCS = os.path.join(ROOT, "bundles", "clavicle_fracture", "docs", "README.md")
MARKER = re.compile(r"(<!-- results: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)
METHOD_NAMES = {"cam": "CAM", "gradcam": "Grad-CAM", "gradcam_pp": "Grad-CAM++", "lrp": "LRP-epsilon"}


def _stamp(command: str, source: str, extra: str = "") -> str:
    today = datetime.date.today().isoformat()
    return (f"*Generated {today} by `make docs-results` from `{command}` ({os.path.relpath(source, ROOT)}){extra}.*\n\n")


def demo_metrics(demo_dir: str) -> str:
    """The demo's test metrics and Grad-CAM energy per augmentation (``demo_results.json``)."""
    with open(os.path.join(demo_dir, "demo_results.json")) as f:
        results = json.load(f)
    minutes = sum(float(r.get("minutes", 0.0)) for r in results.values())
    lines = ["| augmentation | test AUC | F1 | accuracy | Grad-CAM energy in box (`layer3`) |", "|---|---|---|---|---|"]
    for aug, r in results.items():
        lines.append(f"| {aug} | {r['auc']:.3f} | {r['f1']:.3f} | {r['accuracy']:.3f} | {r.get('cam_energy_in_box', float('nan')):.3f} |")
    n = next(iter(results.values()))
    note = (f"\n({n.get('n', '?')} test halves, {n.get('positives', '?')} positive; threshold chosen on validation; the "
            "energy is `cam_report.json`'s, on the validation halves with boxes.)\n")
    threads = n.get("threads", "?")
    return (_stamp("python -m cutremain_monai.demo", demo_dir, f", {threads} CPU threads; training and evaluation "
                   f"{minutes:.1f} minutes on this machine") + "\n".join(lines) + "\n" + note)


def demo_localization(demo_dir: str) -> str:
    """Each demo model's localisation table (``<augmentation>/test_localization.json``)."""
    with open(os.path.join(demo_dir, "demo_results.json")) as f:
        augs = list(json.load(f))
    lines = ["| model | method | energy in box | pointing game | IoU acc @0.5 | MaxBoxAcc | Loc. Acc. (IoU >= 0.4) | images |",
             "|---|---|---|---|---|---|---|---|"]
    for aug in augs:
        with open(os.path.join(demo_dir, aug, "test_localization.json")) as f:
            table = json.load(f)["methods"]
        for method, t in table.items():
            if not t:
                continue
            lines.append(f"| {aug} | {METHOD_NAMES.get(method, method)} | {t['energy_in_box']:.3f} | {t['pointing_game']:.3f} | "
                         f"{t['iou_acc@0.5']:.3f} | {t['max_box_acc']:.3f} | {t['loc_acc']:.3f} | {t['n']} |")
    return _stamp("python -m cutremain_monai.demo", demo_dir, ", `<augmentation>/test_localization.json`") + "\n".join(lines) + "\n"


def demo_features(demo_dir: str) -> str:
    """Feature distances between validation halves and their augmented copies (``demo_results.json``)."""
    with open(os.path.join(demo_dir, "demo_results.json")) as f:
        results = json.load(f)
    lines = ["| model trained with | copy made by | Euclidean | cosine distance | pairs |", "|---|---|---|---|---|"]
    for aug, r in results.items():
        for key, d in r.items():
            if key.startswith("features_"):
                lines.append(f"| {aug} | {key[len('features_'):]} | {d['euclidean']:.2f} | {d['cosine']:.3f} | {d['pairs']} |")
    return _stamp("python -m cutremain_monai.demo", demo_dir) + "\n".join(lines) + "\n"


def markdown_file(name: str, command: str):
    """A block that is a table file written by a long run, inserted as it is."""
    def render(run_dir: str) -> str:
        with open(os.path.join(run_dir, name)) as f:
            return _stamp(command, run_dir, f", `{name}`") + f.read().rstrip("\n") + "\n"
    return render


# block name -> (docs file, output folders relative to --runs, first found wins (None: the demo's), renderer)
BLOCKS = {
    "demo-metrics": (CLAVICLE_DOCS, None, demo_metrics),
    "demo-localization": (CLAVICLE_DOCS, None, demo_localization),
    "demo-features": (CLAVICLE_DOCS, None, demo_features),
    "shoulder-cv": (CLAVICLE_DOCS, ["real/shoulder_cv"],
                    markdown_file("cv_table.md", "cutremain experiment cv ... -o outputs/real/shoulder_cv (command above)")),
    # the run's folder when it is here, else the copy of its table kept beside the docs (docs/fracatlas_compare/)
    "fracatlas-compare": (CLAVICLE_DOCS, ["real/fracatlas_compare",
                                          os.path.join(os.path.dirname(CLAVICLE_DOCS), "fracatlas_compare")],
                          markdown_file("compare_table.md", "cutremain experiment compare ... -o outputs/real/fracatlas_compare "
                                        "(command above)")),
    # fold 0 again for none and cut_remain once the head ended at the training size (issue 27)
    "fracatlas-head": (CLAVICLE_DOCS, ["real/fracatlas_head",
                                       os.path.join(os.path.dirname(CLAVICLE_DOCS), "fracatlas_head")],
                       markdown_file("compare_table.md", "cutremain experiment compare ... --methods none,cut_remain "
                                     "-o outputs/real/fracatlas_head (command above)")),
    # issues 28 and 30: fold 0 with the present code: Cut&Remain with relevant-area boxes, the guided rows with the
    # defaults after issue 30 and with the body mask, supervised Mixup (its flat Grad-CAM maps). Only the copy kept
    # beside the docs: the five-fold command rewrites compare_table.md in the same output folder
    "fracatlas-fold0": (CLAVICLE_DOCS, [os.path.join(os.path.dirname(CLAVICLE_DOCS), "fracatlas_fold0")],
                        markdown_file("compare_table.md", "cutremain experiment compare ... --fold-limit 1 "
                                      "-o outputs/real/fracatlas_5fold (command above)")),
    # issue 28: the five folds (none, cut_remain, cut_remain_ra, sup_cutmix, isnet_body) and the gamma curve on fold 0.
    # Only the docs copy: the Mixup command after it rewrites compare_table.md in the same output folder
    "fracatlas-5fold": (CLAVICLE_DOCS, [os.path.join(os.path.dirname(CLAVICLE_DOCS), "fracatlas_5fold")],
                        markdown_file("compare_table.md", "cutremain experiment compare ... --fold-limit 5 "
                                      "-o outputs/real/fracatlas_5fold (command above)")),
    # issue 28: supervised Mixup mixing half of the boxed samples, with and without relevant-area boxes (fold 0)
    "fracatlas-mixup": (CLAVICLE_DOCS, [os.path.join(os.path.dirname(CLAVICLE_DOCS), "fracatlas_mixup")],
                        markdown_file("compare_table.md", "cutremain experiment compare ... --fold-limit 1 --methods "
                                      "none,sup_mixup,sup_mixup_p50,sup_mixup_ra_p50 -o outputs/real/fracatlas_5fold "
                                      "(command above)")),
    # issue 28: Cut&Remain's premise on the subtle-lesion phantoms, 5 training seeds (run folder or docs/premise/)
    "premise": (CLAVICLE_DOCS, ["subtle/premise", os.path.join(os.path.dirname(CLAVICLE_DOCS), "premise")],
                markdown_file("premise_table.md", "cutremain experiment premise ... -o outputs/subtle/premise (command above)")),
    # issue 28: what relevant-area boxes remove (tools/relevant_area_check.py)
    "relevant-area": (CLAVICLE_DOCS, ["subtle/relevant_area", os.path.join(os.path.dirname(CLAVICLE_DOCS), "relevant_area")],
                      markdown_file("relevant_area_table.md", "python tools/relevant_area_check.py outputs/subtle/relevant_area")),
    # issue 30: the guided-training protocol variants on the shortcut set (seed 0, every positive tagged)
    "shortcut-protocol": (CLAVICLE_DOCS, ["shortcut_protocol", os.path.join(os.path.dirname(CLAVICLE_DOCS), "shortcut_protocol")],
                          markdown_file("shortcut_table.md", "cutremain experiment shortcut ... -o outputs/shortcut_protocol "
                                        "(command above)")),
    # issue 30: the shortcut test over tag strengths and training seeds with the clean reference
    "shortcut": (CLAVICLE_DOCS, ["shortcut", os.path.join(os.path.dirname(CLAVICLE_DOCS), "shortcut")],
                 markdown_file("shortcut_table.md", "cutremain experiment shortcut ... -o outputs/shortcut (command above)")),
    # issue 30: ISNet trained 405 epochs (3,200 guided steps), seed 0, every positive tagged
    "shortcut-long": (CLAVICLE_DOCS, ["shortcut_long", os.path.join(os.path.dirname(CLAVICLE_DOCS), "shortcut_long")],
                      markdown_file("shortcut_table.md", "cutremain experiment shortcut ... -o outputs/shortcut_long (command above)")),
    # issue 30: ISNet with precise BatchNorm at 205 epochs over seeds and strengths, with the clean reference
    "shortcut-isnet": (CLAVICLE_DOCS, ["shortcut_isnet", os.path.join(os.path.dirname(CLAVICLE_DOCS), "shortcut_isnet")],
                       markdown_file("shortcut_table.md", "cutremain experiment shortcut ... -o outputs/shortcut_isnet (command above)")),
    # issue 30: the background-swap validation AUC (val_auc_swap) as a fourth checkpoint, 25 epochs, seed 0
    "shortcut-swap": (CLAVICLE_DOCS, ["shortcut_swap", os.path.join(os.path.dirname(CLAVICLE_DOCS), "shortcut_swap")],
                      markdown_file("shortcut_table.md", "cutremain experiment shortcut ... -o outputs/shortcut_swap (command above)")),
}


def run_demo() -> float:
    t = time.time()
    subprocess.run([sys.executable, "-m", "cutremain_monai.demo"], cwd=ROOT, check=True)
    return (time.time() - t) / 60


def regenerate(runs: str, demo_dir: str, check: bool) -> int:
    changed, missing = [], []
    docs = sorted({path for path, _, _ in BLOCKS.values()})
    for path in docs:
        with open(path) as f:
            text = f.read()
        found = {m.group("name") for m in MARKER.finditer(text)}
        for name, (p, _, _) in BLOCKS.items():
            if p == path and name not in found:
                missing.append(f"{os.path.relpath(path, ROOT)}: no marker for block {name!r}")

        def replace(m):
            name = m.group("name")
            if name not in BLOCKS:
                missing.append(f"{os.path.relpath(path, ROOT)}: unknown block {name!r}")
                return m.group(0)
            _, folders, render = BLOCKS[name]
            candidates = [demo_dir] if folders is None else [os.path.join(runs, f) for f in folders]
            source = next((c for c in candidates if os.path.isdir(c)), candidates[0])
            try:
                body = render(source)
            except FileNotFoundError as e:
                print(f"kept {name}: its run is not here ({e.filename}); run its command to regenerate it")
                return m.group(0)
            if _strip_date(body) != _strip_date(m.group("body")):
                changed.append(name)
            print(f"regenerated {name} from {os.path.relpath(source, ROOT)}")
            return m.group(1) + body + m.group(4)

        new = MARKER.sub(replace, text)
        if not check and new != text:
            with open(path, "w") as f:
                f.write(new)
    for line in missing:
        print(line)
    if check and (changed or missing):
        print(f"docs differ from the runs: {', '.join(changed) or 'markers'}")
        return 1
    return 0


def _strip_date(text: str) -> str:
    return re.sub(r"\*Generated \d{4}-\d{2}-\d{2} .*?\*\n", "", re.sub(r"[\d.]+ minutes on this machine", "", text))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-run", action="store_true", help="do not run the demo first (use outputs/demo as it is)")
    p.add_argument("--runs", default=os.path.join(ROOT, "outputs"), help="where the long studies wrote their folders")
    p.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 when a block differs from its run")
    args = p.parse_args(argv)
    if not args.no_run:
        print(f"demo: {run_demo():.1f} minutes")
    return regenerate(os.path.abspath(args.runs), os.path.join(ROOT, "outputs", "demo"), args.check)


if __name__ == "__main__":
    sys.exit(main())
