"""PSL / SEC losses against hand computations and naive reference loops."""

import math

import numpy as np
import pytest
import torch

from cutremain_monai.engines.psl_losses import (IGNORE, PSLLoss, constrain_loss, expand_loss, global_weighted_rank_pool,
                                                guided_filter, seed_loss)


def _log_probs(p):
    return torch.log(torch.as_tensor(p, dtype=torch.float64))


def test_seed_loss_is_mean_neg_log_prob_over_labelled_pixels():
    # one image, 2 channels, 1x3 pixels
    p = np.array([[[[0.9, 0.2, 0.6]], [[0.1, 0.8, 0.4]]]])
    labels = torch.tensor([[[0, 1, IGNORE]]])
    expected = -(math.log(0.9) + math.log(0.8)) / 2
    assert float(seed_loss(_log_probs(p), labels)) == pytest.approx(expected)
    assert float(seed_loss(_log_probs(p), torch.full((1, 1, 3), IGNORE))) == 0.0
    with pytest.raises(ValueError, match="outside 0..1"):
        seed_loss(_log_probs(p), torch.tensor([[[0, 2, 0]]]))
    with pytest.raises(ValueError, match="labels must be"):
        seed_loss(_log_probs(p), torch.tensor([[0, 1, 0]]))


def test_global_weighted_rank_pooling_by_hand():
    f = torch.tensor([[[[0.2, 0.9], [0.5, 0.1]]]])          # sorted: 0.9, 0.5, 0.2, 0.1
    d = 0.5
    w = np.array([1, d, d * d, d ** 3])
    expected = (np.array([0.9, 0.5, 0.2, 0.1]) * w).sum() / w.sum()
    assert float(global_weighted_rank_pool(f, d)) == pytest.approx(expected)
    assert float(global_weighted_rank_pool(f, 0.0)) == pytest.approx(0.9)   # max pooling
    assert float(global_weighted_rank_pool(f, 1.0)) == pytest.approx(0.425)  # mean
    with pytest.raises(ValueError, match="decay"):
        global_weighted_rank_pool(f, 1.5)


def test_expand_loss_by_hand():
    # two images, background + 1 class, 1x2 pixels; image 0 has the class, image 1 does not
    p = np.array([[[[0.3, 0.8]], [[0.7, 0.2]]],
                  [[[0.6, 0.9]], [[0.4, 0.1]]]])
    y = torch.tensor([[1.0], [0.0]])
    d_pos, d_neg, d_bg = 0.5, 0.0, 1.0

    def gwrp(v, d):
        v = sorted(v, reverse=True)
        w = [d ** j if d > 0 else float(j == 0) for j in range(len(v))]
        return sum(a * b for a, b in zip(v, w)) / sum(w)

    img0 = -math.log(gwrp([0.7, 0.2], d_pos)) - math.log(gwrp([0.3, 0.8], d_bg))
    img1 = -math.log(1 - gwrp([0.4, 0.1], d_neg)) - math.log(gwrp([0.6, 0.9], d_bg))
    got = expand_loss(_log_probs(p), y, d_pos, d_neg, d_bg)
    assert float(got) == pytest.approx((img0 + img1) / 2, rel=1e-6)


def _guided_filter_loop(guide, p, r, eps):
    """He et al.'s algorithm 1 written per pixel with explicit windows (cut at the border)."""
    I = guide  # noqa: E741 (the paper's name)
    H, W = I.shape

    def mean(a, i, j):
        return a[max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].mean()

    a = np.zeros_like(I)
    b = np.zeros_like(I)
    for i in range(H):
        for j in range(W):
            mi, mp = mean(I, i, j), mean(p, i, j)
            cov = mean(I * p, i, j) - mi * mp
            var = mean(I * I, i, j) - mi * mi
            a[i, j] = cov / (var + eps)
            b[i, j] = mp - a[i, j] * mi
    return np.array([[mean(a, i, j) * I[i, j] + mean(b, i, j) for j in range(W)] for i in range(H)])


def test_guided_filter_matches_the_per_pixel_definition_and_keeps_an_edge():
    rng = np.random.default_rng(0)
    guide = rng.random((9, 11))
    p = rng.random((9, 11))
    got = guided_filter(torch.tensor(guide)[None, None], torch.tensor(p)[None, None], radius=2, eps=0.01)[0, 0].double().numpy()
    np.testing.assert_allclose(got, _guided_filter_loop(guide, p, 2, 0.01), atol=1e-5)
    # a step edge in the guide: the filtered step stays sharper than a plain box blur of the same radius
    step = np.zeros((8, 16))
    step[:, 8:] = 1.0
    out = guided_filter(torch.tensor(step)[None, None], torch.tensor(step)[None, None], radius=3, eps=1e-4)[0, 0].numpy()
    assert abs(out[4, 7] - 0.0) < 0.05 and abs(out[4, 8] - 1.0) < 0.05


def test_constrain_loss_is_zero_for_a_prediction_the_filter_keeps_and_positive_otherwise():
    image = torch.rand(1, 1, 12, 12)
    flat = torch.full((1, 2, 12, 12), 0.5)                    # a constant prediction passes the filter unchanged
    assert float(constrain_loss(flat.log(), image)) == pytest.approx(0.0, abs=1e-6)
    noisy = torch.softmax(torch.randn(1, 2, 12, 12) * 3, 1)
    assert float(constrain_loss(noisy.log(), image)) > 0.01
    lp = noisy.log().requires_grad_(True)
    constrain_loss(lp, image).backward()                       # Q is constant: the gradient is -Q / n
    assert lp.grad is not None and float(lp.grad.sum()) == pytest.approx(-1.0, rel=1e-4)


def test_psl_loss_sums_its_terms():
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(2, 2, 8, 8), 1)
    logits = torch.randn(2, 1)
    labels = torch.randint(0, 2, (2, 8, 8))
    labels[0, :4] = IGNORE
    y = torch.tensor([[1.0], [0.0]])
    image = torch.rand(2, 1, 8, 8)
    total, terms = PSLLoss(cls_weight=0.5)(lp, logits, labels, y, image)
    assert set(terms) == {"seed", "cls"}
    assert float(total) == pytest.approx(float(terms["seed"] + 0.5 * terms["cls"]))
    total, terms = PSLLoss(sec=True, expand_weight=2.0, constrain_weight=3.0)(lp, logits, labels, y, image)
    assert float(terms["expand"]) == pytest.approx(float(expand_loss(lp, y)))
    assert float(total) == pytest.approx(float(terms["seed"] + terms["cls"] + 2 * terms["expand"] + 3 * terms["constrain"]))
