"""Differentiable Grad-CAM (GAIN groundwork): same maps as grad_cam, gradients through the channel weights."""

import pytest
import torch

from cutremain_monai.localization.grad_cam import differentiable_grad_cam, grad_cam
from cutremain_monai.networks import resnet


def _net():
    torch.manual_seed(0)
    return resnet(10, num_classes=3)


def test_same_maps_as_grad_cam_in_eval_mode():
    net = _net().eval()
    x = torch.rand(2, 1, 64, 64)
    maps, logits = differentiable_grad_cam(net, x, target=[2, 0], layer="layer3", normalise=False)
    ref = grad_cam(net, x, target=[2, 0], layer="layer3", normalise=False)
    torch.testing.assert_close(maps.detach(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.detach(), net(x))


def test_gradient_reaches_the_channel_weights_and_matches_finite_differences():
    net = _net().double().train()
    for m in net.modules():  # BatchNorm on fixed statistics so the finite difference sees the same function
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    x = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    mask = torch.zeros(2, 1, 64, 64, dtype=torch.float64)
    mask[..., 10:30, 20:40] = 1

    def loss():
        maps, _ = differentiable_grad_cam(net, x, target=1, layer="layer3", normalise=False)
        return (maps * mask).sum()

    value = loss()
    (g,) = torch.autograd.grad(value, net.fc.weight)
    # the fc weights enter the map only through w_k = mean dy/dA_k: a hook-based (constant) w would give 0 here
    assert float(g.abs().sum()) > 0
    i, j, h = 1, 5, 1e-6
    with torch.no_grad():
        net.fc.weight[i, j] += h
    up = loss()
    with torch.no_grad():
        net.fc.weight[i, j] -= 2 * h
    down = loss()
    with torch.no_grad():
        net.fc.weight[i, j] += h
    assert float(g[i, j]) == pytest.approx(float((up - down).detach() / (2 * h)), rel=1e-4, abs=1e-9)


def test_normalised_and_mode_kept():
    net = _net().train()
    x = torch.rand(3, 1, 64, 64)
    maps, logits = differentiable_grad_cam(net, x, target=0, layer="layer3")
    assert net.training and maps.shape == (3, 1, 64, 64) and logits.shape == (3, 3)
    assert float(maps.amax()) <= 1 + 1e-6 and float(maps.amin()) >= 0 and maps.requires_grad


def test_maps_in_float32_under_autocast():
    net = _net().train()
    x = torch.rand(2, 1, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps, logits = differentiable_grad_cam(net, x, target=1, layer="layer3")
    assert logits.dtype == torch.bfloat16 and maps.dtype == torch.float32  # eps = 1e-8 survives the division
    assert torch.isfinite(maps).all() and float(maps.amax()) == pytest.approx(1.0, abs=1e-6)
