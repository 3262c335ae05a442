"""CAM, Grad-CAM and Grad-CAM++: hand computations, known answers, MONAI equivalence, shapes, batching, hygiene."""

import copy
import glob
import os

import pytest
import torch
import torch.nn.functional as F
import yaml
from monai.data import MetaTensor
from monai.visualize import CAM, GradCAM, GradCAMpp
from monai.visualize.class_activation_maps import ModelWithHooks

from cutremain_monai.localization import cam, cam_grid, grad_cam, grad_cam_pp
from cutremain_monai.localization.grad_cam import DEFAULT_LAYER
from cutremain_monai.networks import resnet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def identity(t):
    return t


def up(maps, size):
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def minmax(maps):
    flat = maps.flatten(2)
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    return ((flat - lo) / (hi - lo)).reshape(maps.shape)


@pytest.fixture(scope="module")
def net3():
    torch.manual_seed(0)
    return resnet(10, num_classes=3).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(3, 1, 64, 80)


def layer_output(model, name, x):
    store = {}
    h = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: store.update(out=o.detach().clone()))
    with torch.no_grad():
        logits = model(x)
    h.remove()
    return store["out"], logits


class ChannelMean(torch.nn.Module):
    """Logit k = spatial mean of channel k of ``features`` (a stride-2 conv): d logit_k / dA = 1/HW on channel k."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.features = torch.nn.Conv2d(1, 3, 3, stride=2, padding=1)

    def forward(self, x):
        return self.features(x).mean((2, 3))


# ------------------------------------------------------------------------------------------------------------ CAM
def test_cam_equals_features_times_fc_weight(net3, images):
    feats, logits = layer_output(net3, "layer4", images)
    grid = torch.einsum("bchw,kc->bkhw", feats, net3.fc.weight.detach())  # Zhou et al.: no ReLU, no bias
    assert torch.allclose(grid.mean((2, 3)), logits - net3.fc.bias.detach(), atol=1e-5)  # mean of the raw map
    expected = up(grid, (64, 80))
    assert torch.allclose(cam(net3, images, normalise=False), expected, atol=1e-5)
    assert torch.allclose(cam(net3, images), minmax(expected), atol=1e-5)
    assert torch.allclose(cam(net3, images, target=2, normalise=False), expected[:, 2:3], atol=1e-5)
    picked = torch.stack([expected[i, c] for i, c in enumerate([0, 2, 1])])[:, None]
    assert torch.allclose(cam(net3, images, target=[0, 2, 1], normalise=False), picked, atol=1e-5)
    # MONAI's CAM evaluates fc (bias included) cell by cell: the same map shifted by the bias
    monai_raw = CAM(copy.deepcopy(net3), "layer4", "fc", postprocessing=identity)(images, class_idx=[0, 2, 1])
    assert torch.allclose(monai_raw, picked + net3.fc.bias.detach()[[0, 2, 1]].reshape(3, 1, 1, 1), atol=1e-5)


def test_cam_needs_global_average_pooling_then_linear():
    class MaxPooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.avgpool = torch.nn.AdaptiveMaxPool2d(1)  # named like GAP, but it is not
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.avgpool(self.conv(x)).flatten(1))

    with pytest.raises(ValueError, match="global average pooling"):
        cam(MaxPooled(), torch.rand(2, 1, 16, 16))


# ------------------------------------------------------------------------------------------------------- Grad-CAM
def test_grad_cam_known_answer():
    net = ChannelMean()
    x = torch.rand(2, 1, 20, 24)
    acti, _ = layer_output(net, "features", x)  # (2, 3, 10, 12)
    expected = up(F.relu(acti) / acti[0, 0].numel(), (20, 24))
    assert torch.allclose(grad_cam(net, x, layer="features", normalise=False), expected, atol=1e-6)
    assert torch.allclose(grad_cam(net, x, target=1, layer="features"), minmax(expected[:, 1:2]), atol=1e-5)
    # Grad-CAM++ (eq. 19): w_k = sum_ij g / (2 + g sum A) with g = 1/HW -> 1 / (2 + mean A_k)
    mean = acti.flatten(2).mean(-1)
    assert bool((2 + mean > 0).all())
    expected_pp = up(F.relu(acti / (2 + mean)[..., None, None]), (20, 24))
    assert torch.allclose(grad_cam_pp(net, x, layer="features", normalise=False), expected_pp, atol=1e-6)


def test_grad_cam_matches_monai(net3, images):
    raw = grad_cam(net3, images, target=1, layer="layer3", normalise=False)
    assert float(raw.amax()) > 0
    monai_raw = GradCAM(copy.deepcopy(net3), "layer3", postprocessing=identity)(images, class_idx=1)
    assert torch.allclose(raw, monai_raw, rtol=1e-4, atol=1e-7)
    # MONAI's default post-processing flips the map (max -> 0): ours is 1 - MONAI's
    monai_default = GradCAM(copy.deepcopy(net3), "layer3")(images, class_idx=1)
    assert torch.allclose(grad_cam(net3, images, target=1), 1 - monai_default, atol=1e-4)


def test_grad_cam_pp_matches_monai_before_pooling_and_eq19_elsewhere(net3, images):
    net = copy.deepcopy(net3)
    with torch.no_grad():
        net.fc.weight.mul_(20)  # gradients well above MONAI's 1e-7 denominator guard
    targets = [0, 2, 1]
    ours_raw = grad_cam_pp(net, images, target=targets, layer="layer4", normalise=False)
    ours = grad_cam_pp(net, images, target=targets, layer="layer4")
    with torch.no_grad():
        scores = net(images)[range(3), targets]
    for i, c in enumerate(targets):  # MONAI's GradCAMpp handles one image per call
        monai_raw = GradCAMpp(copy.deepcopy(net), "layer4", postprocessing=identity)(images[i:i + 1], class_idx=c)
        assert float(monai_raw.detach().amax()) > 0
        assert torch.allclose(ours[i:i + 1], minmax(monai_raw), atol=1e-3)
        assert torch.allclose(ours_raw[i:i + 1] * scores[i].exp(), monai_raw, rtol=1e-3, atol=1e-6)
    # at layer3 the gradient varies in space: the paper's eq. 19 by hand, with MONAI's hooks for A and dy/dA
    hooked = ModelWithHooks(copy.deepcopy(net3), "layer3", register_forward=True, register_backward=True)
    ours3 = grad_cam_pp(net3, images, target=2, layer="layer3", normalise=False)
    for i in range(3):
        _, (a,), (g,) = hooked(images[i:i + 1], class_idx=2)
        a, g = a.detach(), g.detach()
        denom = 2 * g**2 + g**3 * a.sum((2, 3), keepdim=True)
        alpha = g**2 / torch.where(denom != 0, denom, torch.ones_like(denom))
        w = (alpha * F.relu(g)).sum((2, 3), keepdim=True)
        expected = up(F.relu((w * a).sum(1, keepdim=True)), (64, 80))
        assert float(expected.amax()) > 0
        assert torch.allclose(ours3[i:i + 1], expected, rtol=1e-4, atol=1e-4 * float(expected.amax()))


# ---------------------------------------------------------------------------------------------- shapes, batching
@pytest.mark.parametrize("method", [cam, grad_cam, grad_cam_pp])
def test_shapes_and_range(method, net3, images):
    assert method(net3, images).shape == (3, 3, 64, 80)
    assert method(net3, images, target=1).shape == (3, 1, 64, 80)
    assert method(net3, images, target=[2, 0, 1]).shape == (3, 1, 64, 80)
    assert method(net3, images, target=torch.tensor([2, 0, 1])).shape == (3, 1, 64, 80)
    binary = resnet(10).eval()
    assert method(binary, images).shape == (3, 1, 64, 80)
    maps = method(net3, MetaTensor(images))
    assert type(maps) is torch.Tensor and not maps.requires_grad
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    flat = maps.flatten(2)
    assert bool(((flat.amax(-1) == 1) | (flat.amax(-1) == 0)).all())
    with pytest.raises(ValueError, match="out of range"):
        method(net3, images, target=3)
    with pytest.raises(ValueError, match="entries"):
        method(net3, images, target=[0, 1])


@pytest.mark.parametrize("method", [cam, grad_cam, grad_cam_pp])
def test_batch_equals_one_by_one(method, images):
    torch.manual_seed(3)
    net = resnet(10, num_classes=3).train()  # batch norm in training mode would couple the images
    targets = [0, 2, 1]
    batch = method(net, images, target=targets, normalise=False)
    single = torch.cat([method(net, images[i:i + 1], target=c, normalise=False) for i, c in enumerate(targets)])
    assert torch.allclose(batch, single, rtol=1e-4, atol=1e-6)
    every = method(net, images, normalise=False)
    assert torch.allclose(every, torch.cat([method(net, images, target=k, normalise=False) for k in range(3)], 1), rtol=1e-4, atol=1e-6)


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(getattr(m, "_backward_pre_hooks", {}))
               for m in model.modules())


def test_no_hooks_left_modes_restored_grads_untouched(images):
    net = resnet(10, num_classes=3).train()
    net.layer1.eval()  # mixed modes survive
    modes = [m.training for m in net.modules()]
    calls = [lambda: cam(net, images), lambda: grad_cam(net, images), lambda: grad_cam_pp(net, images, layer="layer2"),
             lambda: cam_grid(net, "layer3", 64), lambda: grad_cam(net, images, target=7), lambda: grad_cam(net, images, layer="nope")]
    for call in calls:
        try:
            call()
        except ValueError:
            pass
        assert hooks(net) == 0
        assert [m.training for m in net.modules()] == modes
        assert all(p.grad is None for p in net.parameters())
    net.requires_grad_(False)  # a frozen model still gives Grad-CAM (the layer output is made a leaf)
    assert float(grad_cam(net, images, target=0).amax()) >= 0
    assert all(not p.requires_grad for p in net.parameters())


def test_unknown_layer_names_the_layers(net3, images):
    with pytest.raises(ValueError, match="layer3"):
        grad_cam(net3, images, layer="layer9")


# ------------------------------------------------------------------------------------------------------ the grid
def test_default_layer_grid_at_the_bundles_sizes():
    assert DEFAULT_LAYER == "layer3"
    assert cam_grid(resnet(18), "layer3", 224) == (14, 14)
    assert cam_grid(resnet(18), "layer4", 224) == (7, 7)
    assert cam_grid(resnet(10), "layer3", (224, 160)) == (14, 10)
    sizes = set()
    for cfg in glob.glob(os.path.join(ROOT, "bundles", "*", "configs", "*.yaml")):
        if os.sep + "lesion_segmentation" + os.sep in cfg:  # its maps are the segmentation output, not Grad-CAM's
            continue
        with open(cfg) as f:
            c = yaml.safe_load(f) or {}
        if "network_depth" in c and "image_size" in c:  # the ResNet bundles: cpu.yaml (224) and train.yaml (448)
            sizes.add((int(c["network_depth"]), tuple(c["image_size"])))
    assert {s[1] for s in sizes} >= {(224, 224), (448, 448)}
    for depth, size in sorted(sizes):
        h, w = cam_grid(resnet(depth), DEFAULT_LAYER, size)
        assert h >= 14 and w >= 14, (depth, size, (h, w))
