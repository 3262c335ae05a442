import csv
import re
import json
import os

import numpy as np
import pydicom
import pytest

from cutremain_monai.cli import main as cli_main
from cutremain_monai.io.datalist import load_datalist
from cutremain_monai.io.dx_writer import write_dx
from cutremain_monai.io.gsps import write_box_gsps


def _bad_files(root, rng, good_template):
    """100 damaged or odd files, each with the reason the ingest must give. Returns {path: reason fragment}."""
    bad = {}
    data = open(good_template, "rb").read()
    ds0 = pydicom.dcmread(good_template)
    for i in range(20):
        p = os.path.join(root, "broken", f"trunc_{i}.dcm")
        open(p, "wb").write(data[: len(data) - 10 - 15 * i])  # cut inside the 384 bytes of pixel data
        bad[p] = "truncated"
    for i in range(20):
        ds = pydicom.dcmread(good_template)
        del ds.PixelData
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        p = os.path.join(root, "broken", f"nopix_{i}.dcm")
        ds.save_as(p)
        bad[p] = "no PixelData"
    for i in range(15):
        ds = pydicom.dcmread(good_template)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
        ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        p = os.path.join(root, "odd", f"mpeg_{i}")  # no suffix, as PACS exports often are
        ds.save_as(p)
        bad[p] = "has no available decoder"
    for i in range(15):
        ds = pydicom.dcmread(good_template)
        ds.PhotometricInterpretation = "RGB"
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.PixelData = bytes(ds.Rows * ds.Columns * 3)
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        p = os.path.join(root, "odd", f"rgb_{i}.dcm")
        ds.save_as(p)
        bad[p] = "unsupported photometric interpretation 'RGB'"
    for i in range(10):
        ds = pydicom.dcmread(good_template)
        ds.NumberOfFrames = 2
        ds.PixelData = ds0.PixelData * 2
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        p = os.path.join(root, "odd", f"multi_{i}.dcm")
        ds.save_as(p)
        bad[p] = "multi-frame"
    for i in range(20):
        p = os.path.join(root, "misc", f"readme_{i}.txt" if i % 2 else f"DICOMDIR_{i}")
        open(p, "wb").write(rng.bytes(200))
        bad[p] = "not a DICOM file"
    return bad


@pytest.mark.slow
def test_batch_of_1000_with_100_bad(tmp_path):
    root = tmp_path / "export"
    for sub in ("a/b/c", "d", "broken", "odd", "misc"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = []
    for i in range(900):
        sub = ("a/b/c", "d")[i % 2]
        p = str(root / sub / f"IM{i:05d}")  # any names
        px = rng.integers(0, 4096, (16, 12), dtype=np.uint16)
        write_dx(p, px, uid_seed=f"ingest-{i}", photometric=("MONOCHROME1", "MONOCHROME2")[i % 2])
        good.append(p)
    bad = _bad_files(str(root), rng, good[0])
    assert len(good) + len(bad) == 1000
    # boxes for 30 images, 10 of them reaching outside the 12x16 image
    box_csv = tmp_path / "boxes.csv"
    with open(box_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "x0", "y0", "x1", "y1", "box_label"])
        for i in range(30):
            rel = os.path.relpath(good[i], tmp_path)
            w.writerow([rel, 1, 2, 3, 20 if i < 10 else 8, 9, "fracture"])
    out = tmp_path / "datalist.json"
    rc = cli_main(["ingest", str(root), "--boxes", str(box_csv), "-o", str(out), "--no-progress"])
    assert rc == 0
    items = load_datalist(str(out))
    assert sorted(it["image"] for it in items) == sorted(os.path.abspath(p) for p in good)
    by_path = {it["image"]: it for it in items}
    assert by_path[os.path.abspath(good[0])]["boxes"] == [[2, 3, 12, 9]]  # clipped to the 12 px width
    assert by_path[os.path.abspath(good[15])]["boxes"] == [[2, 3, 8, 9]]
    assert by_path[os.path.abspath(good[15])]["label"] == 1 and by_path[os.path.abspath(good[100])]["label"] == 0
    with open(tmp_path / "datalist_quarantine.csv") as f:
        rows = list(csv.DictReader(f))
    quarantined = {r["file"]: r["reason"] for r in rows if r["status"] == "quarantined"}
    rel = {p: os.path.relpath(p, root).replace(os.sep, "/") for p in list(bad) + good}  # named relative to the root
    assert set(quarantined) == {rel[p] for p in bad}
    for p, fragment in bad.items():
        assert fragment in quarantined[rel[p]], (p, quarantined[rel[p]])
    warned = {r["file"] for r in rows if r["status"] == "box warning"}
    assert warned == {rel[p] for p in good[:10]}
    data = json.load(open(out))
    assert data["root"] == str(root) and data["ingest"]["path_mode"] == "relative"
    assert {it["image"] for it in data["training"]} == {rel[p] for p in good}
    text = json.dumps(json.load(open(out)))
    assert "SYN" not in text and "PatientID" not in text


def test_gsps_pairing_and_split(tmp_path):
    root = tmp_path / "pacs"
    root.mkdir()
    rng = np.random.default_rng(3)
    for i in range(6):
        p = str(root / f"img{i}.dcm")
        write_dx(p, rng.integers(0, 4096, (40, 30), dtype=np.uint16), uid_seed=f"g{i}", patient_id=f"PAT{i // 2}",
                 patient_name="SYNTHETIC^PHANTOM")
        if i % 2 == 0:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            pr = write_box_gsps(ds, [[3, 4, 10, 12], [25, 30, 30, 40]], ["nodule", "mass"])
            # a vendor that draws past the image edge: the second box reaches to (35, 45) on a 30x40 image
            pr.GraphicAnnotationSequence[1].GraphicObjectSequence[0].GraphicData = [25, 30, 35, 30, 35, 45, 25, 45, 25, 30]
            pr.save_as(str(root / f"pr{i}.dcm"), enforce_file_format=True)
    orphan = pydicom.dcmread(str(root / "pr0.dcm"))
    orphan.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    orphan.SOPInstanceUID = pydicom.uid.generate_uid()
    orphan.save_as(str(root / "orphan_pr.dcm"))
    out = tmp_path / "dl.json"
    cli_main(["ingest", str(root), "--gsps", "-o", str(out), "--split", "0.5,0.25,0.25", "--no-progress"])
    data = json.load(open(out))
    items = [it for s in ("training", "validation", "test") for it in data[s]]
    assert len(items) == 6
    with_boxes = [it for it in items if it["boxes"]]
    assert len(with_boxes) == 3 and all(it["label"] == 1 for it in with_boxes)
    for it in with_boxes:  # the second box is clipped to the 30x40 image
        assert it["boxes"] == [[3, 4, 10, 12], [25, 30, 30, 40]] and it["box_labels"] == ["nodule", "mass"]
    for section in ("training", "validation", "test"):  # patients never span two sections
        groups = {it["group"] for it in data[section]}
        others = {it["group"] for s in ("training", "validation", "test") if s != section for it in data[s]}
        assert not groups & others
    assert "PAT" not in json.dumps(data)
    rows = list(csv.DictReader(open(tmp_path / "dl_quarantine.csv")))
    assert [r["reason"] for r in rows if r["file"].endswith("orphan_pr.dcm")] == [
        "presentation state references no usable image in the batch"
    ]


def test_near_duplicates_across_patient_ids(tmp_path):
    """The same radiograph exported under two PatientIDs (and re-windowed: other stored values) ends up in one
    split group with --near-duplicates; without it the two patients can land in different sections."""
    from scipy.ndimage import gaussian_filter

    root = tmp_path / "pacs"
    root.mkdir()
    rng = np.random.default_rng(5)
    for i in range(8):
        img = gaussian_filter(rng.normal(size=(64, 48)), 3)
        px = ((img - img.min()) / (img.max() - img.min()) * 4000).astype(np.uint16)
        write_dx(str(root / f"img{i}.dcm"), px, uid_seed=f"nd{i}", patient_id=f"PAT{i}")
        if i == 0:  # the copy: another patient id, stored values halved plus an offset
            write_dx(str(root / "copy.dcm"), (px // 2 + 100).astype(np.uint16), uid_seed="nd-copy", patient_id="OTHER")
    out = tmp_path / "dl.json"
    assert cli_main(["ingest", str(root), "-o", str(out), "--split", "0.5,0.25,0.25", "--no-progress",
                     "--near-duplicates", "0.85"]) == 0
    data = json.load(open(out))
    where = {os.path.basename(it["image"]): (s, it["group"]) for s in ("training", "validation", "test")
             for it in data[s]}
    assert len(where) == 9 and where["img0.dcm"] == where["copy.dcm"]
    assert len({g for _, g in where.values()}) == 8
    assert data["ingest"]["near_duplicate_pairs"] == 1 and data["ingest"]["groups"] == "9 -> 8"
    with open(tmp_path / "dl.near_duplicates.csv") as f:
        rows = list(csv.DictReader(f))
    assert {rows[0]["image_a"], rows[0]["image_b"]} == {"img0.dcm", "copy.dcm"} and float(rows[0]["r"]) > 0.99
    text = open(out).read() + open(tmp_path / "dl.near_duplicates.csv").read()
    assert "PAT0" not in text and "OTHER" not in text  # group keys stay pseudonyms


def test_corrupt_patient_id_or_presentation_state_is_quarantined_not_fatal(tmp_path):
    """Found in review after fuzzing: a corrupt PatientID element in an otherwise readable image, and a corrupt
    presentation state, used to stop the whole ingest."""
    from cutremain_monai.io.ingest import ingest
    from tests.conftest import SAMPLES

    src = os.path.join(SAMPLES, "clavicle")
    tree = tmp_path / "export"
    tree.mkdir()
    good = open(os.path.join(src, "clavicle_000.dcm"), "rb").read()
    (tree / "good.dcm").write_bytes(good)
    other = open(os.path.join(src, "clavicle_001.dcm"), "rb").read()
    i = other.index(b"\x10\x00\x20\x00")  # (0010,0020) PatientID: its explicit VR replaced by an unknown one
    (tree / "bad_pid.dcm").write_bytes(other[: i + 4] + b"U\xf4" + other[i + 6 :])
    state = open(os.path.join(src, "clavicle_000_gsps.dcm"), "rb").read()
    j = state.index(b"\x08\x00\x40\x11")  # (0008,1140) Referenced Image Sequence: its VR broken
    (tree / "bad_gsps.dcm").write_bytes(state[: j + 4] + b"Q\xf4" + state[j + 6 :])
    report = ingest(str(tree), str(tmp_path / "dl.json"), gsps=True, progress=False)
    reasons = dict(report.quarantined)
    assert [os.path.basename(it["image"]) for it in load_datalist(str(tmp_path / "dl.json"))] == ["good.dcm"]
    assert "bad_pid.dcm" in reasons and "NotImplementedError" in reasons["bad_pid.dcm"]
    assert "bad_gsps.dcm" in reasons


def _export(tmp_path, n=60, **kw):
    from cutremain_monai.data.phantoms import generate_export_tree

    root = tmp_path / "export"
    return str(root), generate_export_tree(str(root), n, damaged=0.1, not_dicom=0.05, **kw)


def test_patient_named_export_is_named_by_uid(tmp_path):
    """Folders named after the patient (as some PACS export them): ``auto`` names every file by SOP Instance UID
    through the link folder, and nothing we write holds the name, ID or birth date."""
    from cutremain_monai.io.ingest import ingest

    root, tree = _export(tmp_path)
    p0 = tree["patients"][0]
    broken = os.path.join(root, f"{p0['name']} {p0['id']}", f"{p0['name']}_{p0['birth_date']}.dcm")
    os.symlink(os.path.join(root, "gone", p0["name"]), broken)  # open() quotes the path of a broken link
    out = tmp_path / "work" / "dl.json"
    report = ingest(root, str(out), split=(0.5, 0.25, 0.25), progress=False)
    assert report.path_mode == "uid" and report.images == 60
    assert len(report.quarantined) == len(tree["damaged"]) + len(tree["not_dicom"]) + 1 == 10
    assert sum("FileNotFoundError" in r for _, r in report.quarantined) == 1
    data = json.load(open(out))
    assert data["root"] == "dl_files" and data["ingest"]["path_mode"] == "uid"
    items = [it for s in ("training", "validation", "test") for it in load_datalist(str(out), s)]
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in tree["images"]}
    assert {os.path.basename(it["image"]) for it in items} == {u + ".dcm" for u in uids}
    for it in items:  # each name resolves, through its link, to the file with that UID
        assert os.path.samefile(it["image"], uids[os.path.basename(it["image"])[:-4]])
        assert it["image_id"] == os.path.basename(it["image"])
    rows = list(csv.DictReader(open(tmp_path / "work" / "dl_quarantine.csv")))
    assert all(r["file"].startswith("quarantined/f") for r in rows)
    bad = {os.path.realpath(os.path.join(tmp_path, "work", "dl_files", r["file"])) for r in rows
           if "FileNotFoundError" not in r["reason"]}
    assert bad == {os.path.realpath(p) for p in tree["damaged"] + tree["not_dicom"]}  # the user can still open them
    written = b"".join(open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(tmp_path / "work") for f in fs
                       if not os.path.islink(os.path.join(d, f)))
    names = " ".join(" ".join(ds + fs) for _, ds, fs in os.walk(tmp_path / "work"))
    for p in tree["patients"]:
        for value in (p["name"], p["name"].split("^")[0], p["id"], p["birth_date"],
                      f"{p['birth_date'][:4]}-{p['birth_date'][4:6]}-{p['birth_date'][6:]}"):
            assert value.encode() not in written and value not in names, value
    assert not os.path.exists(tmp_path / "work" / "dl.ingest-journal.jsonl")  # removed once done
    # --path-mode relative is still there for exports whose names are known to be safe (a user's choice)
    rel = ingest(root, str(tmp_path / "rel.json"), path_mode="relative", progress=False)
    assert rel.path_mode == "relative" and json.load(open(tmp_path / "rel.json"))["root"] == root


def test_workers_give_the_same_datalist(tmp_path):
    from cutremain_monai.io.ingest import ingest

    root, _ = _export(tmp_path, n=40)
    one = ingest(root, str(tmp_path / "a" / "dl.json"), split=(0.5, 0.25, 0.25), progress=False)
    two = ingest(root, str(tmp_path / "b" / "dl.json"), split=(0.5, 0.25, 0.25), progress=False, workers=2)
    assert json.load(open(tmp_path / "a" / "dl.json")) == json.load(open(tmp_path / "b" / "dl.json"))
    assert open(tmp_path / "a" / "dl_quarantine.csv").read() == open(tmp_path / "b" / "dl_quarantine.csv").read()
    assert one.quarantined == two.quarantined and two.decoded == one.files_seen


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    """A real SIGKILL part-way: ``--resume`` reads only the files the killed run had not finished, and ends with
    the datalist and report of an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    root, tree = _export(tmp_path, n=1500, size=64)
    n_files = len(tree["images"]) + len(tree["damaged"]) + len(tree["not_dicom"])
    out = tmp_path / "killed" / "dl.json"
    journal = tmp_path / "killed" / "dl.ingest-journal.jsonl"
    cmd = [sys.executable, "-m", "cutremain_monai.cli", "ingest", root, "-o", str(out), "--no-progress",
           "--split", "0.7,0.15,0.15"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    lines = 0
    while time.time() < deadline and proc.poll() is None:
        lines = sum(1 for _ in open(journal)) if journal.exists() else 0
        if lines > 600:  # (a "started" line and a record per file)
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the ingest finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and journal.exists()
    done = sum(1 for line in open(journal) if '"t": "started"' not in line) - 1  # (the header line)
    assert 300 <= done < n_files
    res = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    first = res.stdout.splitlines()[0]
    resumed, read_now = (int(v) for v in re.search(r"\((\d+) from the journal, (\d+) read now\)", first).groups())
    assert resumed >= done - 1 and resumed + read_now == n_files  # (a torn last line is read again)
    ref = tmp_path / "whole" / "dl.json"
    assert subprocess.run(cmd[:6] + [str(ref)] + cmd[7:], cwd=ROOT, capture_output=True).returncode == 0
    a, b = json.load(open(out)), json.load(open(ref))
    assert a.pop("root") == "dl_files" and b.pop("root") == "dl_files"
    assert a == b
    assert open(out.with_name("dl_quarantine.csv")).read() == open(ref.with_name("dl_quarantine.csv")).read()
    assert sorted(os.listdir(out.with_name("dl_files"))) == sorted(os.listdir(ref.with_name("dl_files")))


def _journal_run(tmp_path, root, name, **kw):
    """An ingest whose journal is kept (the unlink at the end skipped): returns the journal's lines."""
    from unittest import mock

    from cutremain_monai.io import ingest as I

    out = tmp_path / name / "dl.json"
    with mock.patch.object(I.os, "unlink"):
        I.ingest(root, str(out), progress=False, path_mode="relative", **kw)
    return open(I.journal_path(str(out))).read().splitlines(), out


def test_resume_after_a_torn_line_and_a_second_interruption(tmp_path):
    """The kill came mid-write (a torn last line), then the resumed run was interrupted too: the third run reads
    only what neither finished, and ends with the uninterrupted run's datalist and report."""
    from cutremain_monai.io import ingest as I

    root, tree = _export(tmp_path, n=40)
    lines, ref = _journal_run(tmp_path, root, "ref")
    records = [ln for ln in lines[1:] if '"started"' not in ln]
    n_files = len(records)
    out = tmp_path / "resumed" / "dl.json"
    out.parent.mkdir()
    with open(I.journal_path(str(out)), "w") as f:  # header, 10 records, half of the 11th
        f.write("\n".join([lines[0]] + records[:10]) + "\n" + records[10][: len(records[10]) // 2])
    calls = []

    def interrupted(task):
        calls.append(task[0])
        if len(calls) > 7:
            raise KeyboardInterrupt  # the second interruption, after 7 more files
        return I._examine(task)

    with pytest.raises(KeyboardInterrupt):
        I.ingest(root, str(out), progress=False, path_mode="relative", resume=True, _examine_fn=interrupted)
    report = I.ingest(root, str(out), progress=False, path_mode="relative", resume=True)
    assert report.resumed == 17 and report.decoded == n_files - 17  # nothing finished was read again
    assert json.load(open(out)) == json.load(open(ref))
    assert open(out.with_name("dl_quarantine.csv")).read() == open(ref.with_name("dl_quarantine.csv")).read()


def test_a_file_two_runs_died_on_is_reported_and_changed_files_are_read_again(tmp_path):
    from cutremain_monai.io import ingest as I
    from cutremain_monai.io.paths import file_token

    root, tree = _export(tmp_path, n=20)
    lines, _ = _journal_run(tmp_path, root, "ref")
    records = [json.loads(ln) for ln in lines[1:] if '"started"' not in ln]
    out = tmp_path / "resumed" / "dl.json"
    out.parent.mkdir()
    victim = os.path.relpath(tree["images"][3], root).replace(os.sep, "/")
    token = file_token(victim)
    kept = [r for r in records if r["k"] != token]
    started = json.dumps({"k": token, "t": "started"})
    with open(I.journal_path(str(out)), "w") as f:  # two runs started the victim and never finished it
        f.write("\n".join([lines[0]] + [json.dumps(r) for r in kept] + [started, started]) + "\n")
    changed = tree["images"][5]
    os.utime(changed, ns=(1, 1))  # touched since: its record is stale
    report = I.ingest(root, str(out), progress=False, path_mode="relative", resume=True)
    assert dict(report.quarantined)[victim] == "the reader crashed on this file (the ingest died twice while reading it)"
    assert report.decoded == 1 and report.resumed + report.decoded == report.files_seen  # only the changed file read


def test_a_worker_that_dies_is_found_and_the_batch_goes_on(tmp_path):
    from cutremain_monai.io.ingest import ingest
    from tests.io.ingest_helpers import crash_on_notes

    root, tree = _export(tmp_path, n=30)
    ref = ingest(root, str(tmp_path / "a" / "dl.json"), progress=False)
    got = ingest(root, str(tmp_path / "b" / "dl.json"), progress=False, workers=2, _examine_fn=crash_on_notes)
    assert json.load(open(tmp_path / "a" / "dl.json"))["training"] == json.load(open(tmp_path / "b" / "dl.json"))["training"]
    a, b = dict(ref.quarantined), dict(got.quarantined)
    assert a.keys() == b.keys()
    crashed = [k for k in b if b[k] != a[k]]
    assert len(crashed) == 1 and b[crashed[0]] == "the reader crashed on this file (its process died while decoding it)"


def test_outputs_inside_the_export_are_not_ingested(tmp_path):
    from cutremain_monai.io.ingest import ingest

    root, tree = _export(tmp_path, n=10)
    out = os.path.join(root, "dl.json")
    first = ingest(root, out, progress=False, quarantine_dir=os.path.join(root, "bad"))
    again = ingest(root, out, progress=False, quarantine_dir=os.path.join(root, "bad"))
    assert first.files_seen == again.files_seen == 10 + len(tree["damaged"]) + len(tree["not_dicom"])
    assert first.quarantined == again.quarantined and again.images == 10


def test_presentation_state_text_that_names_the_patient_is_not_a_label(tmp_path):
    """GSPS text objects are free text from the PACS: a label holding the patient's name is replaced and warned."""
    from cutremain_monai.io.ingest import ingest

    root = tmp_path / "pacs"
    root.mkdir()
    p = str(root / "img.dcm")
    write_dx(p, np.zeros((40, 30), dtype=np.uint16), uid_seed="lab", patient_id="MRN5550123",
             patient_name="WINTERBOTTOM^ESMERALDA")
    ds = pydicom.dcmread(p, stop_before_pixels=True)
    write_box_gsps(ds, [[3, 4, 10, 12], [5, 5, 9, 9]], ["nodule", "Winterbottom E. old film"]).save_as(
        str(root / "pr.dcm"), enforce_file_format=True)
    report = ingest(str(root), str(tmp_path / "dl.json"), gsps=True, progress=False)
    item = load_datalist(str(tmp_path / "dl.json"))[0]
    assert item["box_labels"] == ["nodule", "unlabelled"]
    assert any("box label held the patient's name" in m for _, m in report.box_warnings)
    assert "interbottom" not in open(tmp_path / "dl.json").read().lower()
