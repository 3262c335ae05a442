"""ISNet heatmap loss and GAIN's soft mask against hand computations (../shared/METHODS.md 1.5 and 2)."""

import math

import pytest
import torch

from cutremain_monai.engines.guidance import (choose_band, gain_erase, gain_soft_mask, gwrp, isnet_background_loss,
                                              isnet_foreground_loss, isnet_heatmap_loss)


def test_gwrp_max_mean_and_decay():
    v = torch.tensor([3.0, 1.0, 2.0])
    assert float(gwrp(v, 0)) == 3.0 and float(gwrp(v, 1)) == pytest.approx(2.0)
    assert float(gwrp(v, 0.5)) == pytest.approx((3 + 0.5 * 2 + 0.25 * 1) / 1.75)  # sorted 3, 2, 1
    with pytest.raises(ValueError, match="decay"):
        gwrp(v, 1.5)


def test_background_loss_by_hand():
    heat = torch.tensor([[[[2.0, 0.0], [0.0, -1.0]]]])  # (B=1, K=1, H=2, W=2)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # |H| / foreground mean (2 / 1) -> background pixels 0, 0, 0.5; d = 0: g = 0.5; E = 1: -log(1 - 0.5 / 1.5)
    assert float(isnet_background_loss(heat, mask, decay=0)[0]) == pytest.approx(-math.log(2 / 3), rel=1e-6)
    # d = 1: g = mean over all 4 pixels of A (1 - M) = 0.5 / 4
    g = 0.125
    assert float(isnet_background_loss(heat, mask, decay=1)[0]) == pytest.approx(-math.log(1 - g / (g + 1)), rel=1e-6)
    with pytest.raises(ValueError, match="binary"):
        isnet_background_loss(heat, mask * 0.5)
    with pytest.raises(ValueError, match="differ in size"):
        isnet_background_loss(heat, torch.ones(1, 3, 3))


def test_foreground_band_l2_and_hybrid():
    mask = torch.ones(1, 1, 1)

    def f(total, mode="hybrid"):
        return float(isnet_foreground_loss(torch.tensor([[[[total]]]]), mask, 1.0, 25.0, mode)[0])

    assert f(2.0) == 0.0  # inside [1, 25]
    assert f(0.5) == pytest.approx(0.25)  # (0.5 / 1 - 1)^2
    assert f(26.0) == pytest.approx(1.0) and f(26.0, "l2") == pytest.approx(1.0)  # ((26 - 25) / 1)^2 at C1 + C2
    assert f(30.0) == pytest.approx(5.0)  # hybrid: (30 - 26) + 1, linear
    assert f(30.0, "l2") == pytest.approx(25.0)  # ((30 - 25) / 1)^2
    with pytest.raises(ValueError, match="C1"):
        isnet_foreground_loss(torch.ones(1, 1, 1, 1), mask, 5.0, 1.0)


def test_heatmap_loss_images_without_mask_contribute_nothing():
    torch.manual_seed(0)
    heat = torch.randn(3, 2, 8, 8, requires_grad=True)
    mask = torch.zeros(3, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    has = torch.tensor([True, False, True])
    loss = isnet_heatmap_loss(heat, mask, c1=1.0, c2=25.0, decay=0.9, has_mask=has)
    both = isnet_heatmap_loss(heat[[0, 2]], mask[[0, 2]], c1=1.0, c2=25.0, decay=0.9)
    assert float(loss.detach()) == pytest.approx(float(both.detach()), rel=1e-6)
    (g,) = torch.autograd.grad(loss, heat)
    assert float(g[1].abs().sum()) == 0 and float(g[0].abs().sum()) > 0  # the unmasked image gets no gradient
    assert float(isnet_heatmap_loss(heat, mask, has_mask=torch.zeros(3, dtype=torch.bool))) == 0.0


def test_choose_band_by_hand():
    c1, c2 = choose_band([1.0, 2.0, 3.0, 4.0])  # m 2.5, s sqrt(1.25): m - 3s < m / 5 = 0.5
    assert c1 == pytest.approx(0.5) and c2 == pytest.approx(2.5 + 3 * math.sqrt(1.25))
    c1, c2 = choose_band([10.0, 10.0, 10.0])  # s = 0: C1 = max(2, 10) = 10, C2 = min(250, 10) = 10
    assert (c1, c2) == (10.0, 10.0)


def test_gain_soft_mask_and_erase():
    a = torch.tensor([1.0, 0.5, 0.0])
    t = gain_soft_mask(a)
    assert t.tolist() == pytest.approx([1 / (1 + math.exp(-5)), 0.5, 1 / (1 + math.exp(5))])
    img = torch.full((3,), 0.8)
    assert gain_erase(img, a).tolist() == pytest.approx((0.8 * (1 - t)).tolist(), rel=1e-5)  # float32
    assert gain_erase(img, a, fill=0.5).tolist() == pytest.approx((0.8 - t * 0.3).tolist(), rel=1e-5)


def test_training_through_lrp_lowers_background_relevance():
    """The ISNet loss on differentiable LRP maps trains: a few SGD steps lower the background loss."""
    from cutremain_monai.localization.lrp import lrp
    from cutremain_monai.networks import resnet

    torch.manual_seed(0)
    net = resnet(10, num_classes=2).train()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()  # fixed statistics: the maps are LRP of the fused network
    x = torch.rand(4, 1, 32, 32)
    mask = torch.zeros(4, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    losses = []
    for _ in range(8):
        heat = lrp(net, x, target=None, bounds=(0.0, 1.0), create_graph=True)
        loss = isnet_background_loss(heat, mask, decay=0).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses
