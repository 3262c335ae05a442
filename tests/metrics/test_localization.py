"""Hand-computed cases for cutremain_monai.metrics.localization (arithmetic in the comments).

Conventions under test: boxes xyxy in pixels, origin at the top-left corner of the top-left pixel; pixel (r, c) is
inside a box when x0 <= c + 0.5 <= x1 and y0 <= r + 0.5 <= y1; predicted boxes are pixel-edge tight boxes
(columns c0..c1 -> x0 = c0, x1 = c1 + 1) and areas are continuous (x1 - x0) * (y1 - y0)."""

import math

import numpy as np
import pytest
import torch

from cutremain_monai.metrics.localization import (
    LOC_ACC_THRESHOLDS,
    boxes_mask,
    choose_tau,
    energy_in_box,
    energy_in_mask,
    iou_accuracy,
    largest_component_box,
    loc_acc,
    loc_acc_at,
    max_box_acc,
    pointing_game,
    score_maps,
    localization_table_md,
)

NO_BOX = np.zeros((0, 4))


def hot(shape, *pixels, value=1.0, base=0.0):
    m = np.full(shape, base, dtype=np.float64)
    for r, c in pixels:
        m[r, c] = value
    return m


# ------------------------------------------------------------------------------------------------ geometry helpers
def test_boxes_mask_pixel_centre_rule():
    # box (1, 0, 3, 2): centres c + 0.5 in [1, 3] -> columns 1, 2; r + 0.5 in [0, 2] -> rows 0, 1
    m = boxes_mask(np.array([[1, 0, 3, 2]]), (3, 4))
    assert m.tolist() == [[False, True, True, False], [False, True, True, False], [False, False, False, False]]
    # edges inclusive: box (0.5, 0.5, 0.5, 0.5) touches only the centre (0.5, 0.5) of pixel (0, 0)
    assert boxes_mask(np.array([[0.5, 0.5, 0.5, 0.5]]), (2, 2)).sum() == 1
    # border box x1 == W = 4, y1 == H = 3: column 3 (centre 3.5 <= 4) and all rows are inside -> 3 pixels
    assert boxes_mask(np.array([[3, 0, 4, 3]]), (3, 4))[:, 3].all()


def test_largest_component_box_edges_ties_and_connectivity():
    b = np.zeros((5, 6), dtype=bool)
    b[1:3, 2:5] = True  # rows 1..2, columns 2..4 -> x0 = 2, y0 = 1, x1 = 4 + 1 = 5, y1 = 2 + 1 = 3
    assert largest_component_box(b).tolist() == [2, 1, 5, 3]
    assert largest_component_box(np.zeros((3, 3), bool)) is None
    # two 2-pixel components: (0, 4)-(0, 5) is met first in raster order, (3, 0)-(3, 1) later -> the first wins
    t = np.zeros((4, 6), dtype=bool)
    t[3, 0:2] = True
    t[0, 4:6] = True
    assert largest_component_box(t).tolist() == [4, 0, 6, 1]
    # 8-connectivity: diagonal pixels (0, 0) and (1, 1) are one component -> box (0, 0, 2, 2)
    d = np.eye(2, dtype=bool)
    assert largest_component_box(d).tolist() == [0, 0, 2, 2]


# ---------------------------------------------------------------------------------------------------- energy
def test_energy_single_map_negatives_clipped():
    m = hot((4, 4), (1, 1), value=3.0)
    m[3, 3] = 1.0
    m[0, 3] = -2.0  # clipped to 0; without clipping the total would be 3 + 1 - 2 = 2 and the share 3 / 2 = 1.5
    r = energy_in_box(m, np.array([[0, 0, 2, 2]]))  # box covers rows 0..1, cols 0..1 -> holds the 3
    assert r["per_image"].tolist() == [0.75]  # 3 / (3 + 1) = 0.75
    assert r["mean"] == 0.75 and r["n_scored"] == 1


def test_energy_several_boxes_union_counted_once_and_border():
    ones = np.ones((4, 4))
    # (0,0,2,2): 2 x 2 = 4 px; (1,1,4,4): 3 x 3 = 9 px; shared pixel (1, 1) -> union 4 + 9 - 1 = 12 of 16 = 0.75
    assert energy_in_box(ones, np.array([[0, 0, 2, 2], [1, 1, 4, 4]]))["per_image"][0] == 0.75
    edge = np.zeros((4, 4))
    edge[:, 3] = 1.0  # all energy in the last column; box x1 == W = 4 takes it all: 4 / 4 = 1
    assert energy_in_box(edge, np.array([[3, 0, 4, 4]]))["per_image"][0] == 1.0


def test_energy_batch_zero_negative_no_boxes_and_mean():
    a = hot((4, 4), (1, 1), value=3.0)
    a[3, 3] = 1.0  # share 3 / 4 = 0.75 in (0, 0, 2, 2)
    maps = np.stack([a, np.zeros((4, 4)), -np.ones((4, 4)), np.ones((4, 4)), np.ones((4, 4))])
    box = np.array([[0, 0, 2, 2]])
    r = energy_in_box(maps, [box, box, box, NO_BOX, box])
    # image 4: ones, box holds 4 of 16 px -> 0.25; images 1 (all zero) and 2 (all negative -> zero) are NaN;
    # image 3 has no boxes -> NaN. mean = (0.75 + 0.25) / 2 = 0.5
    assert r["per_image"][0] == 0.75 and r["per_image"][4] == 0.25
    assert all(math.isnan(v) for v in r["per_image"][1:4])
    assert r["mean"] == 0.5
    assert (r["n_scored"], r["n_no_boxes"], r["n_zero_maps"]) == (2, 1, 2)
    # torch tensors give the same numbers
    rt = energy_in_box(torch.from_numpy(maps), [torch.from_numpy(b) for b in [box, box, box, NO_BOX, box]])
    assert rt["mean"] == 0.5


def test_energy_image_size_scales_boxes_and_out_of_frame_raises():
    m = np.array([[1.0, 0.0], [0.0, 3.0]])  # 2 x 2 map of a 4 x 4 image
    # image box (0, 0, 2, 2) -> map box (0, 0, 1, 1) (factor 2 / 4) -> pixel (0, 0): 1 / (1 + 3) = 0.25
    assert energy_in_box(m, np.array([[0, 0, 2, 2]]), image_size=(4, 4))["per_image"][0] == 0.25
    with pytest.raises(ValueError, match=r"\(2, 2\)"):  # (0,0,4,4) is outside a 2 x 2 map when no image_size
        energy_in_box(m, np.array([[0, 0, 4, 4]]))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):  # x1 = 5 > W_img = 4
        energy_in_box(m, np.array([[0, 0, 5, 4]]), image_size=(4, 4))
    with pytest.raises(ValueError, match="not xyxy"):
        energy_in_box(m, np.array([[1, 0, 0, 1]]))


# ------------------------------------------------------------------------------------------------ pointing game
def test_pointing_hot_pixel_inside_outside_and_edge():
    box = np.array([[3, 2, 4, 3]])
    # hot (r=2, c=3): centre (x, y) = (3.5, 2.5): 3 <= 3.5 <= 4 and 2 <= 2.5 <= 3 -> hit
    assert pointing_game(hot((5, 5), (2, 3)), box)["hits"].tolist() == [1.0]
    # hot (2, 4): x centre 4.5 > 4 -> miss
    assert pointing_game(hot((5, 5), (2, 4)), box)["hits"].tolist() == [0.0]
    # centre exactly on the box edge (2.5, 2.5) counts as inside; a box starting at 2.6 misses it
    assert pointing_game(hot((5, 5), (2, 2)), np.array([[2.5, 2.5, 3.5, 3.5]]))["hit_rate"] == 1.0
    assert pointing_game(hot((5, 5), (2, 2)), np.array([[2.6, 2.5, 3.5, 3.5]]))["hit_rate"] == 0.0
    # border box x1 == W = 5 with the hot pixel in the last column (centre 4.5 <= 5)
    assert pointing_game(hot((5, 5), (0, 4)), np.array([[4, 0, 5, 5]]))["hit_rate"] == 1.0


def test_pointing_ties_constant_and_negative_maps():
    # two tied maxima (0, 0) and (4, 4); only (4, 4) is in the box (4, 4, 5, 5) -> hit (any tied maximum counts)
    r = pointing_game(hot((5, 5), (0, 0), (4, 4)), np.array([[4, 4, 5, 5]]))
    assert r["hits"].tolist() == [1.0] and r["n_ties"] == 1
    # constant map: all 25 pixels tied -> hit as soon as the box covers a pixel centre
    r = pointing_game(np.full((5, 5), 0.3), np.array([[1, 1, 2, 2]]))
    assert r["hit_rate"] == 1.0 and r["n_ties"] == 1
    # all negative: max is -0.5 at (1, 1), centre (1.5, 1.5) in (1, 1, 2, 2) -> hit; (3, 3, 5, 5) -> miss
    neg = hot((5, 5), (1, 1), value=-0.5, base=-1.0)
    assert pointing_game(neg, np.array([[1, 1, 2, 2]]))["hit_rate"] == 1.0
    assert pointing_game(neg, np.array([[3, 3, 5, 5]]))["hit_rate"] == 0.0


def test_pointing_several_boxes_no_boxes_and_per_class():
    maps = np.stack([hot((5, 5), (0, 0)), hot((5, 5), (4, 4)), hot((5, 5), (2, 2)), hot((5, 5), (1, 3)), hot((5, 5), (0, 0))])
    two = np.array([[0, 0, 1, 1], [4, 4, 5, 5]])  # both corners
    boxes = [two, two, np.array([[0, 0, 1, 1]]), np.array([[3, 1, 4, 2]]), NO_BOX]
    # hits: (0,0) in two -> 1; (4,4) in two -> 1; (2,2) not in (0,0,1,1) -> 0; (1,3): centre (3.5,1.5) in (3,1,4,2) -> 1;
    # image 4 has no boxes -> NaN
    labels = ["a", "a", "a", "b", "b"]
    r = pointing_game(maps, boxes, labels=labels)
    assert r["hits"][:4].tolist() == [1.0, 1.0, 0.0, 1.0] and math.isnan(r["hits"][4])
    assert r["hit_rate"] == 0.75  # 3 hits / 4 scored
    # class a: 2 / 3; class b: 1 / 1 (its no-box image left out); mean over classes (2/3 + 1) / 2 = 5/6
    assert r["per_class"] == {"a": pytest.approx(2 / 3), "b": 1.0}
    assert r["n_per_class"] == {"a": 3, "b": 1}
    assert r["mean_over_classes"] == pytest.approx(5 / 6)
    # without labels: no classes, NaN mean over classes; torch labels work the same
    assert pointing_game(maps, boxes)["per_class"] == {} and math.isnan(pointing_game(maps, boxes)["mean_over_classes"])
    rt = pointing_game(torch.from_numpy(maps), boxes, labels=torch.tensor([0, 0, 0, 1, 1]))
    assert rt["per_class"] == {0: pytest.approx(2 / 3), 1: 1.0}


def test_pointing_image_size():
    # 2 x 2 map of a 4 x 4 image; image box (2, 2, 4, 4) -> map box (1, 1, 2, 2) -> pixel (1, 1)
    assert pointing_game(hot((2, 2), (1, 1)), np.array([[2, 2, 4, 4]]), image_size=(4, 4))["hit_rate"] == 1.0
    assert pointing_game(hot((2, 2), (0, 1)), np.array([[2, 2, 4, 4]]), image_size=(4, 4))["hit_rate"] == 0.0


# --------------------------------------------------------------------------------------------- IoU / IoBB accuracy
def two_components():
    m = np.zeros((8, 8))
    m[1:3, 1:4] = 1.0  # 6 px, rows 1..2, cols 1..3 -> box (1, 1, 4, 3), area 3 * 2 = 6
    m[6, 6] = 1.0  # 1 px -> box (6, 6, 7, 7)
    return m


def test_iou_largest_component_chosen():
    r = iou_accuracy(two_components(), np.array([[1, 1, 4, 3]]), thresholds=(0.5,))
    assert r["pred_boxes"][0, 0].tolist() == [1, 1, 4, 3] and r["overlaps"][0, 0] == 1.0
    # a ground truth on the small component only: largest box (1,1,4,3) vs (6,6,7,7) do not overlap -> IoU 0, miss
    r = iou_accuracy(two_components(), np.array([[6, 6, 7, 7]]), thresholds=(0.5,))
    assert r["overlaps"][0, 0] == 0.0 and r["accuracy"].tolist() == [0.0]
    # several ground-truth boxes: the best-matching one counts -> max(0, 1) = 1
    r = iou_accuracy(two_components(), np.array([[6, 6, 7, 7], [1, 1, 4, 3]]), thresholds=(0.5,))
    assert r["accuracy"].tolist() == [1.0]


def test_iou_versus_iobb_exact_numbers():
    m = two_components()  # predicted box (1, 1, 4, 3), area 6
    big = np.array([[0, 0, 4, 4]])  # area 16, contains the prediction: inter 6
    # IoU = 6 / (6 + 16 - 6) = 6 / 16 = 0.375 (< 0.5 miss); IoBB = 6 / 6 = 1 (hit)
    ri = iou_accuracy(m, big, thresholds=(0.5,), mode="iou")
    rb = iou_accuracy(m, big, thresholds=(0.5,), mode="iobb")
    assert ri["overlaps"][0, 0] == 0.375 and ri["accuracy"][0] == 0.0
    assert rb["overlaps"][0, 0] == 1.0 and rb["accuracy"][0] == 1.0
    part = np.array([[2, 1, 6, 3]])  # area 4 * 2 = 8; inter x: min(4,6) - max(1,2) = 2, y: min(3,3) - max(1,1) = 2 -> 4
    # IoU = 4 / (6 + 8 - 4) = 4 / 10 = 0.4; IoBB = 4 / 6 = 2/3
    assert iou_accuracy(m, part, thresholds=(0.5,))["overlaps"][0, 0] == pytest.approx(0.4)
    assert iou_accuracy(m, part, thresholds=(0.5,), mode="iobb")["overlaps"][0, 0] == pytest.approx(2 / 3)
    # both ground truths at once: the best match counts, max(1, 2/3) = 1 for IoBB and max(0.375, 0.4) = 0.4 for IoU
    both = np.concatenate([big, part])
    assert iou_accuracy(m, both, thresholds=(0.5,), mode="iobb")["overlaps"][0, 0] == 1.0
    assert iou_accuracy(m, both, thresholds=(0.5,))["overlaps"][0, 0] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="mode"):
        iou_accuracy(m, part, mode="dice")


def test_iou_thresholds_at_exact_equality_and_minmax():
    # values 2 (background), 3, 4 -> min-max (v - 2) / 2 = 0, 0.5, 1
    m = np.full((4, 4), 2.0)
    m[0, 0], m[0, 1] = 4.0, 3.0
    gt = np.array([[0, 0, 2, 1]])  # both bright pixels, area 2
    r = iou_accuracy(m, gt, thresholds=(0.0, 0.5, 0.75, 1.0), iou=0.5)
    # T = 0: all 16 px -> box (0,0,4,4), IoU 2 / 16 = 0.125; T = 0.5: 0.5 >= 0.5 keeps (0,1) -> box (0,0,2,1), IoU 1;
    # T = 0.75 and T = 1: only (0, 0) -> box (0,0,1,1), IoU 1 / 2 = 0.5, which is >= 0.5 -> correct
    assert r["pred_boxes"][0].tolist() == [[0, 0, 4, 4], [0, 0, 2, 1], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert r["overlaps"][0].tolist() == [0.125, 1.0, 0.5, 0.5]
    assert r["accuracy"].tolist() == [0.0, 1.0, 1.0, 1.0]


def test_iou_constant_map_border_component_and_batch():
    const = np.full((8, 8), 0.7)  # min == max: no prediction at any threshold -> overlap 0, a miss
    border = np.zeros((8, 8))
    border[0:2, 6:8] = 1.0  # touches the top and right borders: cols 6..7 -> x1 = 8 = W, rows 0..1 -> y1 = 2
    maps = np.stack([const, border, border])
    boxes = [np.array([[0, 0, 8, 8]]), np.array([[6, 0, 8, 2]]), NO_BOX]
    r = iou_accuracy(maps, boxes, thresholds=(0.25, 0.5))
    assert np.isnan(r["pred_boxes"][0]).all() and r["overlaps"][0].tolist() == [0.0, 0.0]
    assert r["pred_boxes"][1, 0].tolist() == [6, 0, 8, 2] and r["overlaps"][1].tolist() == [1.0, 1.0]
    assert np.isnan(r["overlaps"][2]).all() and np.isnan(r["correct"][2]).all()  # no boxes: left out
    assert r["n_scored"] == 2 and r["accuracy"].tolist() == [0.5, 0.5]  # (0 + 1) / 2 at each threshold


def test_iou_matches_monai_box_iou_convention():
    from monai.data.box_utils import box_iou

    rng = np.random.default_rng(0)
    maps = rng.random((6, 16, 16))
    gts = [np.array([[2, 3, 9, 12.5], [10, 1, 16, 7]]) for _ in range(6)]
    r = iou_accuracy(maps, gts, thresholds=(0.6,))
    for i in range(6):
        ref = box_iou(r["pred_boxes"][i, :1], gts[i]).max()  # same continuous convention, float32 inside
        assert r["overlaps"][i, 0] == pytest.approx(float(ref), abs=1e-5)


# ------------------------------------------------------------------------------------------------- MaxBoxAcc
def max_box_case():
    a = np.zeros((4, 4))
    a[0, 0], a[0, 1] = 1.0, 0.5
    b = np.zeros((4, 4))
    b[3, 3], b[3, 2] = 1.0, 0.5
    return np.stack([a, b]), [np.array([[0, 0, 1, 1]]), np.array([[1, 3, 4, 4]])]


def test_max_box_acc_default_grid():
    maps, boxes = max_box_case()
    r = max_box_acc(maps, boxes)
    assert len(r["thresholds"]) == 100 and r["thresholds"][50] == 0.5 and r["thresholds"][99] == 0.99
    # image a, GT (0,0,1,1): T = 0 -> whole map, IoU 1/16; T in 0.01..0.50 -> (0,0,2,1), IoU 1/2 (hit at 0.5);
    #   T in 0.51..0.99 -> (0,0,1,1), IoU 1.
    # image b, GT (1,3,4,4) area 3: T = 0 -> IoU 3/16; T <= 0.50 -> (2,3,4,4) area 2, IoU 2/3; T > 0.5 -> (3,3,4,4), IoU 1/3.
    # accuracy: T = 0: 0/2; 0.01..0.50: 2/2; 0.51..0.99: 1/2
    assert r["accuracy"][0] == 0.0 and (r["accuracy"][1:51] == 1.0).all() and (r["accuracy"][51:] == 0.5).all()
    assert r["max_box_acc"] == 1.0 and r["best_threshold"] == 0.01  # lowest threshold of the tie
    # at IoU 0.7: a hits only for T > 0.5 (IoU 1), b never (2/3, 1/3 < 0.7) -> max 1/2 first at T = 0.51
    r7 = max_box_acc(maps, boxes, iou=0.7)
    assert r7["max_box_acc"] == 0.5 and r7["best_threshold"] == 0.51
    # no scored image -> NaN
    assert math.isnan(max_box_acc(maps, [NO_BOX, NO_BOX])["max_box_acc"])


# --------------------------------------------------------------------------------------- Loc. Acc. and tau choice
def val_case():
    a = np.zeros((4, 4))
    a[0, 0], a[0, 1] = 1.0, 0.5
    b = np.zeros((4, 4))
    b[3, 3], b[3, 2] = 1.0, 0.5
    c = np.zeros((4, 4))
    c[0, 0], c[0, 1], c[0, 2] = 1.0, 0.5, 0.2
    return np.stack([a, b, c]), [np.array([[0, 0, 1, 1]]), np.array([[1, 3, 4, 4]]), np.array([[0, 0, 1, 1]])]


def test_loc_acc_per_tau_and_choose_tau_on_validation():
    assert LOC_ACC_THRESHOLDS == (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)
    maps, boxes = val_case()
    r = loc_acc(maps, boxes)  # IoU >= 0.4
    # a: tau <= 0.45 -> (0,0,2,1) IoU 1/2 hit; tau >= 0.55 -> IoU 1 hit
    # b: tau <= 0.45 -> (2,3,4,4) IoU 2/3 hit; tau >= 0.55 -> (3,3,4,4) IoU 1/3 miss
    # c: tau <= 0.15 -> (0,0,3,1) IoU 1/3 miss; 0.25..0.45 -> (0,0,2,1) IoU 1/2 hit; >= 0.55 -> IoU 1 hit
    # accuracy: 0.05, 0.15: 2/3; 0.25, 0.35, 0.45: 3/3; 0.55..0.95: 2/3
    np.testing.assert_allclose(r["accuracy"], [2 / 3] * 2 + [1.0] * 3 + [2 / 3] * 5)
    assert r["max_over_tau"] == 1.0 and r["best_tau"] == 0.25
    assert choose_tau(r) == 0.25  # lowest of the tied best taus 0.25, 0.35, 0.45


def test_loc_acc_at_applies_validation_tau_to_test():
    tau = choose_tau(loc_acc(*val_case()))  # 0.25, from validation only
    t = np.zeros((4, 4))
    t[0, 0], t[0, 1], t[0, 2] = 1.0, 0.2, 0.2
    test_maps = np.stack([t, np.ones((4, 4))])
    test_boxes = [np.array([[0, 0, 3, 1]]), NO_BOX]  # second: a background (normal) image, left out
    # test image: tau 0.05, 0.15 -> (0,0,3,1) IoU 1 hit; tau 0.25 -> only (0,0): (0,0,1,1) IoU 1/3 < 0.4 miss
    on_test = loc_acc(test_maps, test_boxes)
    assert on_test["max_over_tau"] == 1.0 and on_test["best_tau"] == 0.05  # what choosing on test would report
    r = loc_acc_at(test_maps, test_boxes, tau)
    assert r["tau"] == 0.25 and r["accuracy"] == 0.0 and r["n_scored"] == 1
    assert r["overlaps"][0] == pytest.approx(1 / 3) and r["pred_boxes"][0].tolist() == [0, 0, 1, 1]
    assert math.isnan(r["correct"][1])
    with pytest.raises(ValueError, match="no scored images"):
        choose_tau(loc_acc(test_maps, [NO_BOX, NO_BOX]))


# ------------------------------------------------------------------------------------------------------ inputs
def test_input_shapes_and_errors():
    m = hot((4, 4), (1, 1))
    box = np.array([[1, 1, 2, 2]])
    # (B, 1, H, W) and a (B, N, 4) tensor of boxes are accepted
    assert pointing_game(m[None, None], torch.tensor([[[1.0, 1, 2, 2]]]))["hit_rate"] == 1.0
    # one map with a single 4-vector box or a list holding one (N, 4) array
    assert pointing_game(m, [1, 1, 2, 2])["hit_rate"] == 1.0 and pointing_game(m, [box])["hit_rate"] == 1.0
    with pytest.raises(ValueError, match="2 box arrays for 1 maps"):
        pointing_game(m[None], [box, box])
    with pytest.raises(ValueError, match="shape"):
        pointing_game(np.zeros((2, 3, 4, 4)), [box, box])
    with pytest.raises(ValueError, match="NaN"):
        pointing_game(np.full((4, 4), np.nan), box)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        pointing_game(m[None], [np.zeros((1, 3))])


def test_largest_component_box_agrees_with_regionprops():
    from skimage.measure import label, regionprops

    rng = np.random.default_rng(1)
    for _ in range(20):
        b = rng.random((12, 15)) > 0.55
        props = regionprops(label(b, connectivity=2))
        best = max(props, key=lambda p: p.area)  # first of the largest, in label order
        r0, c0, r1, c1 = best.bbox
        assert largest_component_box(b).tolist() == [c0, r0, c1, r1]


def test_energy_in_mask_is_energy_in_box_on_the_drawn_mask():
    """One rule: the mask form (the bundles' box_mask) gives what the box form gives on the same pixels, negatives
    clipped to 0, NaN for a map with no positive energy."""
    rng = np.random.default_rng(3)
    m = rng.normal(size=(12, 10))
    box = np.array([[2.0, 3.0, 7.0, 9.0]])
    mask = boxes_mask(box, m.shape)
    assert energy_in_mask(m, mask) == pytest.approx(float(energy_in_box(m, box)["per_image"][0]), abs=1e-12)
    s = np.clip(m, 0, None)
    assert energy_in_mask(torch.as_tensor(m), torch.as_tensor(mask)) == pytest.approx(s[mask].sum() / s.sum())
    assert np.isnan(energy_in_mask(-np.abs(m), mask))
    with pytest.raises(ValueError, match="map shape"):
        energy_in_mask(m, mask[:, :5])


def test_score_maps_applies_the_validation_tau_as_it_is():
    """With a threshold from validation, each image's Loc. Acc. hit is loc_acc_at's at that tau (not the nearest
    grid point's), and the table's Loc. Acc. is their mean; without one, the best tau on these images, marked."""
    yy, xx = np.mgrid[:32, :32]
    maps, results = [], []
    for i, (cy, cx) in enumerate([(8, 8), (20, 12), (16, 24)]):
        m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)
        box = np.array([[cx - 5.0, cy - 5.0, cx + 5.0, cy + 5.0]])
        results.append((f"img{i}", m, box, 0, {"cam": m, "flat": np.zeros_like(m)}))
        maps.append(m)
    rows, table, taus = score_maps(results, ["cam", "flat"], {"cam": 0.3})
    expected = [int(loc_acc_at(r[4]["cam"], [r[2]], 0.3)["correct"][0]) for r in results]
    assert [r["loc_hit"] for r in rows if r["method"] == "cam"] == expected
    assert table["cam"]["loc_acc"] == pytest.approx(np.mean(expected)) and "tau 0.30 from validation" in table["cam"]["loc_acc_tau"]
    assert table["flat"]["loc_acc_tau"] == "max over tau on this set"
    assert [r["flat"] for r in rows if r["method"] == "flat"] == [1, 1, 1]
    assert [r["flat"] for r in rows if r["method"] == "cam"] == [0, 0, 0]
    assert set(taus) == {"cam", "flat"}
    md = localization_table_md(table)
    assert md.splitlines()[2].startswith("| cam | ") and "(tau 0.30 from validation) | 3 |" in md
