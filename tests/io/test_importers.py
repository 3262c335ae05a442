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
