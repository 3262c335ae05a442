"""``cutremain experiment compare`` end to end at a tiny setting (2 methods, 2 folds, the gamma curve on one fold,
phantoms): folds shared by the methods, pooled and paired statistics from the runs' own prediction files, resume,
a refused re-use of the folder for other data, and ``report.html`` rendered in headless Chromium."""

import collections
import csv
import json
import os
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cutremain_monai.cli import main as cli_main
from cutremain_monai.metrics.comparison import delong_paired
from tests.bundles.conftest import BUNDLES, TINY, tiny_datalist

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_compare_refuses_a_non_binary_bundle(tmp_path):
    from cutremain_monai.experiments.compare import compare

    with pytest.raises(ValueError, match="compare handles binary bundles.*'multiclass'"):
        compare(os.path.join(BUNDLES, "femur_fracture"), [], str(tmp_path), ["none"])


def _predictions(run_dir):
    with open(os.path.join(run_dir, "test_predictions.csv")) as f:
        return {r["file"]: float(r["probability"]) for r in csv.DictReader(f)}


def render(html_path, png_path):
    """Open the page in headless Chromium (playwright driving the system browser); returns (console errors,
    page errors, the natural widths of its images, the screenshot as an array)."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    console, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto("file://" + os.path.abspath(html_path))
        page.wait_for_load_state("load")
        widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        page.screenshot(path=png_path, full_page=True)
        browser.close()
    return console, errors, widths, np.asarray(Image.open(png_path).convert("L"), dtype=np.float32)


@pytest.mark.slow
def test_compare_end_to_end(tmp_path, monkeypatch):
    from cutremain_monai.data.preprocessed import PreprocessedCache

    computed = collections.Counter()  # (head, item) -> times its head ran: every decode of the study
    compute = PreprocessedCache.compute

    def counting(self, item):
        computed[(self.fingerprint, self.key(item))] += 1
        return compute(self, item)

    monkeypatch.setattr(PreprocessedCache, "compute", counting)
    out = tmp_path / "cmp"
    overrides = {**TINY, "cam_images": 1, "num_copies": 1}
    data = tiny_datalist(tmp_path, n=(8, 4, 4))
    args = ["experiment", "compare", "--bundle", os.path.join(BUNDLES, "clavicle_fracture"), "--datalist", data,
            "--task", "clavicle", "--folds", "2", "--methods", "none,cut_remain", "--gammas", "0,0.5,1",
            "--gamma-folds", "1", "--heatmap-images", "2", "--overrides", json.dumps(overrides), "-o", str(out)]
    assert cli_main(args) == 0
    # 2 methods x 2 folds + a gamma run decode each image once: the training head (all 16 images) and the native
    # load of the boxed test and validation images for the localisation reports, shared by every run
    assert max(computed.values()) == 1
    heads = collections.Counter(fp for fp, _ in computed)
    assert len(heads) == 2 and sorted(heads.values())[-1] == 16
    summary = json.load(open(out / "compare_summary.json"))
    folds = [json.load(open(out / f"fold{k}_datalist.json")) for k in range(2)]
    tested = [it["image_id"] for f in folds for it in f["test"]]
    assert len(tested) == len(set(tested)) == 16  # every image held out exactly once
    for f in folds:  # never a group on both sides
        assert not {i["group"] for i in f["test"]} & {i["group"] for s in ("training", "validation") for i in f[s]}
    # the pooled AUC and the paired difference from the runs' own prediction files
    label = {it["image_id"]: int(it["label"] not in (0, [0])) for f in folds for it in f["test"]}
    probs = {m: {} for m in ("none", "cut_remain")}
    for k in range(2):
        for m in probs:
            probs[m].update(_predictions(out / "runs" / f"fold{k}" / m))
    names = sorted(label)
    y = [label[n] for n in names]
    rows = {r["method"]: r for r in summary["table"]}
    for m in probs:
        assert rows[m]["pooled_auc"] == pytest.approx(roc_auc_score(y, [probs[m][n] for n in names]))
        assert rows[m]["n"] == 16 and rows[m]["positives"] == sum(y)
        assert rows[m]["pooled_auc_low"] <= rows[m]["pooled_auc"] <= rows[m]["pooled_auc_high"]
    d = delong_paired(y, [probs["cut_remain"][n] for n in names], [probs["none"][n] for n in names])
    (p,) = summary["paired"]
    assert p["method"] == "cut_remain" and p["reference"] == "none"
    assert p["difference"] == pytest.approx(d["difference"]) and p["p"] == pytest.approx(d["p"])
    # thresholds chosen on each fold's validation share by Youden's J, recorded by the bundle
    for k in range(2):
        t = json.load(open(out / "runs" / f"fold{k}" / "none" / "threshold.json"))
        assert t["rule"] == "youden" and t["chosen_on"] == "val"
        assert rows["none"]["thresholds"][k] == pytest.approx(t["threshold"])
    # gamma 0 is the none run, gamma 1 the cut_remain run, gamma 0.5 its own run on the first fold only
    assert [(g["gamma"], g["run"], g["folds"]) for g in summary["gamma"]] == [
        (0.0, "none", 1), (0.5, "cut_remain@gamma0.50", 1), (1.0, "cut_remain", 1)]
    assert not (out / "runs" / "fold1" / "cut_remain_gamma0.50").exists()
    table = open(out / "compare_table.md").read()
    assert "| cut_remain | none |" in table and "pooled AUC [95% CI, DeLong]" in table

    # resume: nothing is trained again
    stamps = {p: os.path.getmtime(p) for p in out.glob("runs/*/*/result.json")}
    assert len(stamps) == 5
    assert cli_main(args) == 0
    assert {p: os.path.getmtime(p) for p in out.glob("runs/*/*/result.json")} == stamps
    # nor with other settings for the same runs
    changed = [*args[:-3], json.dumps({**overrides, "epochs": 2}), "-o", str(out)]
    with pytest.raises(ValueError, match="made with other settings"):
        cli_main(changed)
    # the folder of one comparison is not reused for other data
    (tmp_path / "other").mkdir()
    other = tiny_datalist(tmp_path / "other", n=(6, 4, 4))
    with pytest.raises(ValueError, match="holds a comparison of other data"):
        cli_main([*args[:5], other, *args[6:]])

    # the report: one self-contained page with its figures
    html = open(out / "report.html", encoding="utf-8").read()
    assert html.count("data:image/png;base64,") == 4 and "src=\"http" not in html and "<script" not in html
    assert "Paired differences to none" in html and "cut_remain@gamma0.50" in html
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (.ci/run installs it): the page was not rendered")
    console, errors, widths, shot = render(out / "report.html", tmp_path / "report.png")
    assert console == [] and errors == []
    assert len(widths) == 4 and min(widths) > 100  # every figure decoded
    assert shot.shape[0] > 1500 and shot.std() > 20 and (shot < 128).mean() > 0.02  # not blank
