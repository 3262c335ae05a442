import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from cutremain_monai.constants import CXR14_LABELS
from cutremain_monai.io import importers
from cutremain_monai.io.datalist import kfold_by_group, load_datalist, save_datalist, split_by_group
from tests.conftest import shared_data


@pytest.fixture
def pngs(tmp_path):
    for name, (w, h) in {"a.png": (100, 80), "b.png": (50, 60), "c.png": (64, 64)}.items():
        Image.fromarray(np.zeros((h, w), np.uint8)).save(tmp_path / name)
    return tmp_path


def test_plain_csv(pngs):
    p = pngs / "boxes.csv"
    p.write_text("path,label,x0,y0,x1,y1,box_label\na.png,1,10,10,20,30,fracture\na.png,1,90,70,120,90,fracture\n"
                 "b.png,0,,,,,\nc.png,1,5,5,5,9,lesion\n")
    items = {os.path.basename(i["image"]): i for i in importers.import_csv(str(p))}
    assert items["a.png"]["boxes"] == [[10, 10, 20, 30], [90, 70, 100, 80]]  # second clipped to 100x80
    assert items["b.png"]["boxes"] == [] and items["b.png"]["label"] == 0
    assert items["c.png"]["boxes"] == []  # no area: dropped
    p.write_text("a.png,1,10,10,20\n")
    with pytest.raises(ValueError, match=r"boxes.csv:1: expected path,label"):
        importers.import_csv(str(p))
    p.write_text("a.png,1,10,10,20,30,x\na.png,1,1,x,2,3,x\n")
    with pytest.raises(ValueError, match=r"boxes.csv:2: box coordinates .* are not numbers"):
        importers.import_csv(str(p))
    p.write_text("a.png,yes,10,10,20,30,x\n")
    with pytest.raises(ValueError, match=r"boxes.csv:1: label 'yes' is not an integer"):
        importers.import_csv(str(p))


def test_coco_and_yolo(pngs):
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80}, {"id": 2, "file_name": "b.png", "width": 50, "height": 60}],
        "categories": [{"id": 3, "name": "fractured"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40]}],
    }
    (pngs / "coco.json").write_text(json.dumps(coco))
    items = importers.import_coco(str(pngs / "coco.json"), str(pngs))
    assert [i["label"] for i in items] == [1, 0]
    assert items[0]["boxes"] == [[10, 20, 40, 60]] and items[0]["box_labels"] == ["fractured"]
    coco["annotations"][0]["category_id"] = 9
    (pngs / "coco.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"annotations\[0\] has unknown category_id 9"):
        importers.import_coco(str(pngs / "coco.json"), str(pngs))

    labels = pngs / "labels"
    labels.mkdir()
    (labels / "a.txt").write_text("1 0.5 0.5 0.2 0.25\n")
    items = {os.path.basename(i["image"]): i for i in importers.import_yolo(str(pngs), str(labels), ["angle", "fracture"], [1])}
    np.testing.assert_allclose(items["a.png"]["boxes"], [[40, 30, 60, 50]])
    assert items["a.png"]["label"] == 1 and items["b.png"]["label"] == 0 and items["a.png"]["box_labels"] == ["fracture"]
    (labels / "b.txt").write_text("1 0.5 0.5\n")
    with pytest.raises(ValueError, match=r"b.txt:1: expected 'class cx cy w h'"):
        importers.import_yolo(str(pngs), str(labels))


def test_datalist_round_trip_and_group_splits(tmp_path):
    items = [{"image": str(tmp_path / f"{i}.png"), "label": i % 2, "boxes": [[0, 0, 1, 1]] if i % 3 == 0 else [],
              "box_labels": ["x"] if i % 3 == 0 else [], "group": f"p{i // 3}"} for i in range(30)]
    dl = split_by_group(items, (0.6, 0.2, 0.2), seed=1)
    for s, others in (("training", ("validation", "test")), ("validation", ("training", "test"))):
        assert not {i["group"] for i in dl[s]} & {i["group"] for o in others for i in dl[o]}
    assert sum(len(v) for v in dl.values()) == 30
    save_datalist(dl, str(tmp_path / "dl.json"))
    raw = json.load(open(tmp_path / "dl.json"))
    assert not os.path.isabs(raw["training"][0]["image"])  # stored relative to the datalist
    back = load_datalist(str(tmp_path / "dl.json"), "training")
    assert [b["image"] for b in back] == [i["image"] for i in dl["training"]]
    folds = kfold_by_group(items, 5, seed=0)
    held = [i["image"] for _, test in folds for i in test]
    assert sorted(held) == sorted(i["image"] for i in items)
    for train, test in folds:
        assert not {i["group"] for i in train} & {i["group"] for i in test}
    raw["training"][0]["boxes"] = [[1, 2, 3]]
    json.dump(raw, open(tmp_path / "bad.json", "w"))
    with pytest.raises(ValueError, match=r"bad.json: training\[0\]: field 'boxes' must be \(N, 4\)"):
        load_datalist(str(tmp_path / "bad.json"))


@pytest.mark.real_data
def test_nih_cxr14_real():
    root = shared_data("nih_cxr14")
    items = importers.import_nih_cxr14(os.path.join(root, "Data_Entry_2017_v2020_subset.csv"), os.path.join(root, "images"),
                                       os.path.join(root, "BBox_List_2017.csv.gz"))
    manifest = {r["Image Index"]: r for r in csv.DictReader(open(os.path.join(root, "manifest.csv")))}
    assert len(items) == len(manifest) == 71
    n_boxes = 0
    for it in items:
        row = manifest[os.path.basename(it["image"])]
        assert it["label"] == [int(row[c]) for c in CXR14_LABELS]
        expected = json.loads(row["bboxes_label_xywh"] or "[]")
        assert len(it["boxes"]) == len(expected)
        for (name, x, y, w, h), box, lab in zip(expected, it["boxes"], it["box_labels"]):
            np.testing.assert_allclose(box, [x, y, min(x + w, 1024), min(y + h, 1024)], atol=0.01)
            assert lab == ("Infiltration" if name == "Infiltrate" else name)
        n_boxes += len(it["boxes"])
        assert row["Patient ID"] not in it["group"]
    assert n_boxes == 12


@pytest.mark.real_data
def test_brixia_real_binarisation():
    root = shared_data("covid")
    items = importers.import_brixia(os.path.join(root, "manifest.csv"), root, rater="S")
    rows = {r["filename"]: r for r in csv.DictReader(open(os.path.join(root, "manifest.csv")))}
    assert len(items) == sum(1 for r in rows.values() if r["v7_lung_mask"])
    for it in items:
        r = rows[os.path.basename(it["image"])]
        assert it["zone_scores"] == [int(r[f"S_{z}_bin"]) for z in "ABCDEF"]  # the manifest's own binarisation
        assert it["label"] == int(r["S_global_bin_0_6"])
        assert os.path.exists(it["lung_mask"]) and os.path.exists(it["image"])
        assert it["zone_scores_other"] == [int(r[f"J_{z}_bin"]) for z in "ABCDEF"]  # rater J for the comparison
    j = importers.import_brixia(os.path.join(root, "manifest.csv"), root, rater="J")
    assert [i["zone_scores_raw"] for i in j] == [[int(rows[os.path.basename(i["image"])][f"J_{z}"]) for z in "ABCDEF"] for i in j]


@pytest.mark.real_data
def test_fracatlas_and_roboflow_real():
    root = shared_data("fracture")
    hip = importers.import_fracatlas_manifest(os.path.join(root, "manifest.csv"), os.path.join(root, "images"), "hip")
    assert hip and all(os.path.exists(i["image"]) for i in hip)
    assert all((len(i["boxes"]) > 0) <= (i["label"] == 1) for i in hip)
    yolo = importers.import_yolo(os.path.join(root, "roboflow_sr2022", "test", "images"),
                                 os.path.join(root, "roboflow_sr2022", "test", "labels"),
                                 ["angle", "fracture", "line", "messed_up_angle"], [1])
    assert len(yolo) == 44
    for it in yolo:
        w, h = Image.open(it["image"]).size
        for b in it["boxes"]:
            assert 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h


def test_split_readable_sets_aside_truncated(pngs):
    from cutremain_monai.io.loader import split_readable

    data = open(pngs / "a.png", "rb").read()
    (pngs / "t.png").write_bytes(data[: len(data) // 2])
    ok, bad = split_readable([{"image": str(pngs / "a.png")}, {"image": str(pngs / "t.png")}])
    assert [i["image"] for i in ok] == [str(pngs / "a.png")]
    assert bad[0][0] == str(pngs / "t.png") and bad[0][1]


def _truncated_jpeg(path, size=(48, 40)):
    """A JPEG whose header is intact (PIL opens it, reports its size) but whose scan data is cut."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)).save(path, quality=90)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * 0.7)])
    with Image.open(path) as im:  # the header check alone does not catch it
        assert im.size == size
    return str(path)


def _good_jpeg(path, size=(48, 40)):
    Image.fromarray(np.full((size[1], size[0]), 128, np.uint8)).save(path)
    return str(path)


def _assert_flagged(items, bad_path, n_kept):
    assert isinstance(items, importers.ImportedItems)
    assert len(items) == n_kept and bad_path not in [i["image"] for i in items]
    assert [q[0] for q in items.quarantined] == [os.path.abspath(bad_path)]
    assert "truncated" in items.quarantined[0][1]


def test_fracatlas_and_csv_flag_truncated_jpeg(tmp_path, caplog):
    _good_jpeg(tmp_path / "IMG0000001.jpg")
    bad = _truncated_jpeg(tmp_path / "IMG0000002.jpg")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text('image_id,region,fractured,fracture_bboxes_xywh\nIMG0000001.jpg,hip,1,"[[1, 2, 100, 10]]"\n'
                        "IMG0000002.jpg,hip,0,[]\n")
    with caplog.at_level("WARNING", logger="cutremain_monai.io.importers"):
        items = importers.import_fracatlas_manifest(str(manifest), str(tmp_path))
    _assert_flagged(items, bad, 1)
    assert items[0]["boxes"] == [[1, 2, 48, 12]]  # size from the decoded image: the box is clipped to 48 px
    assert "IMG0000002.jpg" in caplog.text and "1 file(s) left out" in caplog.text
    assert len(importers.import_fracatlas_manifest(str(manifest), str(tmp_path), check_images=False)) == 2

    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,label,x0,y0,x1,y1,box_label\nIMG0000001.jpg,1,1,2,10,12,fracture\nIMG0000002.jpg,0,,,,,\n")
    _assert_flagged(importers.import_csv(str(boxes)), bad, 1)
    assert len(importers.import_csv(str(boxes), check_sizes=False)) == 2  # as ingest reads a boxes file


def test_cli_import_writes_quarantine_csv(tmp_path, capsys):
    from cutremain_monai.cli import main

    _good_jpeg(tmp_path / "IMG0000001.jpg")
    _good_jpeg(tmp_path / "IMG0000003.jpg", size=(40, 48))
    bad = _truncated_jpeg(tmp_path / "IMG0000002.jpg")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image_id,region,fractured,fracture_bboxes_xywh\nIMG0000001.jpg,hip,0,[]\n"
                        "IMG0000002.jpg,hip,0,[]\nIMG0000003.jpg,hip,0,[]\n")
    out = tmp_path / "work" / "hip.json"
    assert main(["import", "fracatlas", str(manifest), "--images", str(tmp_path), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["items"] == 2 and summary["quarantined"] == 1
    report = tmp_path / "work" / "hip_quarantine.csv"  # the name cutremain ingest gives its report
    assert summary["quarantine_report"] == str(report)
    rows = list(csv.DictReader(open(report)))
    assert list(rows[0]) == ["file", "status", "reason"]
    assert [(r["file"], r["status"]) for r in rows] == [(bad, "quarantined")] and "truncated" in rows[0]["reason"]
    assert f"quarantined (cannot decode): {bad}" in text
    datalist = json.load(open(out))
    listed = [os.path.basename(i["image"]) for s in ("training", "validation", "test") for i in datalist[s]]
    assert sorted(listed) == ["IMG0000001.jpg", "IMG0000003.jpg"]
    # the csv importer through the cli, and an empty report when nothing is wrong
    (tmp_path / "ok.csv").write_text("IMG0000001.jpg,0\nIMG0000003.jpg,1\n")
    assert main(["import", "csv", str(tmp_path / "ok.csv"), "-o", str(tmp_path / "ok.json")]) == 0
    assert list(csv.reader(open(tmp_path / "ok_quarantine.csv"))) == [["file", "status", "reason"]]
    (tmp_path / "bad.csv").write_text("IMG0000001.jpg,0\nIMG0000002.jpg,1\n")
    assert main(["import", "csv", str(tmp_path / "bad.csv"), "-o", str(tmp_path / "bad.json")]) == 0
    assert [r["file"] for r in csv.DictReader(open(tmp_path / "bad_quarantine.csv"))] == [bad]


def test_other_importers_flag_undecodable_files(tmp_path):
    _good_jpeg(tmp_path / "a.jpg")
    bad = _truncated_jpeg(tmp_path / "b.jpg")
    # YOLO: the truncated image has labels; it is flagged, not an error about its size
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (labels / "b.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    items = importers.import_yolo(str(tmp_path), str(labels))
    _assert_flagged(items, bad, 1)
    np.testing.assert_allclose(items[0]["boxes"], [[12, 10, 36, 30]])
    # COCO
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}], "categories": [], "annotations": []}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    _assert_flagged(importers.import_coco(str(tmp_path / "coco.json"), str(tmp_path)), bad, 1)
    # NIH
    (tmp_path / "de.csv").write_text("Image Index,Finding Labels,Patient ID\na.jpg,No Finding,1\nb.jpg,Mass,2\n")
    _assert_flagged(importers.import_nih_cxr14(str(tmp_path / "de.csv"), str(tmp_path)), bad, 1)
    # lung masks: a truncated mask flags its row, named as the mask of its image
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for n in ("x", "y", "z"):
        _good_jpeg(root / "images" / f"{n}.jpg")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(root / "masks" / "x.png")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(root / "masks" / "z.png")
    bad_mask = _truncated_jpeg(root / "masks" / "y.jpg")
    _truncated_jpeg(root / "images" / "z.jpg")
    (root / "manifest.csv").write_text("filename,mask,patientid\nx.jpg,masks/x.png,p1\ny.jpg,masks/y.jpg,p2\n"
                                       "z.jpg,masks/z.png,p3\n")
    items = importers.import_lung_masks(str(root / "manifest.csv"))
    assert [os.path.basename(i["image"]) for i in items] == ["x.jpg"]
    assert [q[0] for q in items.quarantined] == [bad_mask, str(root / "images" / "z.jpg")]
    assert items.quarantined[0][1].startswith(f"lung mask of {root / 'images' / 'y.jpg'}: OSError")
    # Brixia: the same rule for its image and lung mask
    zones = ",".join(f"S_{z}" for z in "ABCDEF")
    (root / "brixia.csv").write_text(f"filename,v7_lung_mask,{zones}\n" + "".join(
        f"{n}.jpg,masks/{m},0,1,2,3,0,1\n" for n, m in (("x", "x.png"), ("y", "y.jpg"), ("z", "z.png"))))
    items = importers.import_brixia(str(root / "brixia.csv"), str(root))
    assert [os.path.basename(i["image"]) for i in items] == ["x.jpg"]
    assert [q[0] for q in items.quarantined] == [bad_mask, str(root / "images" / "z.jpg")]


@pytest.mark.real_data
@pytest.mark.parametrize("folder", ["fracture", "fracatlas"])
def test_fracatlas_real_truncated_file_is_flagged(folder, tmp_path):
    """FracAtlas' IMG0004098.jpg (a shoulder image) is truncated in its public source: it must be set aside."""
    root = shared_data(folder)
    bad = os.path.join(root, "images", "IMG0004098.jpg")
    assert os.path.exists(bad)
    items = importers.import_fracatlas_manifest(os.path.join(root, "manifest.csv"), os.path.join(root, "images"),
                                                "shoulder")
    assert [q[0] for q in items.quarantined] == [os.path.abspath(bad)]
    assert "image file is truncated" in items.quarantined[0][1]
    assert items and bad not in [i["image"] for i in items]
    with open(os.path.join(root, "manifest.csv"), newline="") as f:
        shoulder = [r for r in csv.DictReader(f) if "shoulder" in r["region"].split("|")]
    assert len(items) == len(shoulder) - 1  # nothing else dropped


def test_fracatlas_blocks_of_image_numbers(tmp_path):
    """--blocks 25: IMG0000024 and IMG0000001 share a split group, IMG0000025 starts the next block."""
    import csv as _csv

    from PIL import Image

    from cutremain_monai.io.importers import import_fracatlas_manifest

    names = ["IMG0000001.jpg", "IMG0000024.jpg", "IMG0000025.jpg"]
    for n in names:
        Image.new("L", (8, 8), 128).save(tmp_path / n)
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = _csv.writer(f)
        w.writerow(["image_id", "region", "fractured", "fracture_bboxes_xywh"])
        for n in names:
            w.writerow([n, "hand", 0, "[]"])
    items = import_fracatlas_manifest(str(tmp_path / "m.csv"), str(tmp_path), block_size=25)
    groups = [it["group"] for it in items]
    assert groups[0] == groups[1] != groups[2]
    assert len({it["group"] for it in import_fracatlas_manifest(str(tmp_path / "m.csv"), str(tmp_path))}) == 3
