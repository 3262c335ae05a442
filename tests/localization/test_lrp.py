"""LRP-Flex maps (cutremain_monai.localization.lrp) against zennit, conservation, gradients, and the ResNet rebuild."""

from __future__ import annotations

import copy
import importlib.util
import sys
import types

import pytest
import torch
from monai.networks.nets import DenseNet121, ResNet
from torch import nn

from cutremain_monai.localization.lrp import lrp, make_lrp_ready
from cutremain_monai.networks.backbones import RESNET_LAYOUTS, LRPReadyResNetBlock, LRPReadyResNetBottleneck, resnet


def _import_zennit():
    """zennit, imported with a stand-in torchvision when the real one is missing or broken.

    zennit imports ``torchvision.models.resnet`` at import time only for its torchvision canonizers, which these
    tests don't use (MONAI blocks are canonized below). PyPI's torchvision does not import beside the CPU torch
    wheel, so the stand-in is put in ``sys.modules`` for zennit's import only and removed afterwards.
    """
    if importlib.util.find_spec("zennit") is None:
        pytest.skip("zennit is not installed (test extra)")
    try:
        import zennit  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "zennit")]:
            del sys.modules[name]
        tv, models, tv_resnet = (types.ModuleType(n) for n in ("torchvision", "torchvision.models", "torchvision.models.resnet"))
        tv_resnet.BasicBlock = type("BasicBlock", (nn.Module,), {})
        tv_resnet.Bottleneck = type("Bottleneck", (nn.Module,), {})
        tv.models, models.resnet = models, tv_resnet
        stand_in = {"torchvision": tv, "torchvision.models": models, "torchvision.models.resnet": tv_resnet}
        sys.modules.update(stand_in)
        try:
            import zennit  # noqa: F401
        finally:
            for name in stand_in:
                sys.modules.pop(name, None)
    import zennit.attribution
    import zennit.canonizers
    import zennit.composites
    import zennit.layer
    import zennit.rules

    return zennit


def _zennit_lrp(model, x, target, epsilon, low, high, stabilise):
    """zennit's LRP: ZBox first, Epsilon on convolutions / linear, Norm on sums and average pools, BN merged.

    ``stabilise="all"`` is zennit's plain epsilon composite (every conv and linear layer epsilon, sums and average
    pool with the same epsilon). ``"relu"`` reproduces LRP-Flex: epsilon only on layers a ReLU follows, LRP-0
    (epsilon 1e-12) on the convolutions before each residual sum, the downsample branch, the pool and the logits.
    """
    zennit = _import_zennit()
    from zennit.canonizers import AttributeCanonizer, CompositeCanonizer, SequentialMergeBatchNorm
    from zennit.composites import NameMapComposite
    from zennit.layer import Sum
    from zennit.rules import Epsilon, Norm, Pass, ZBox

    blocks = (LRPReadyResNetBlock, LRPReadyResNetBottleneck)

    class MergeBatchNormExact(SequentialMergeBatchNorm):
        """zennit's merge leaves each BN as ``x / sqrt(1 + eps)`` (running_var set to 1, eps kept): about 5e-6 per
        layer, 2e-4 relative on a ResNet-18 map. The merged BN is meant to be the identity, so zero its eps."""

        def register(self, linears, batch_norm):
            super().register(linears, batch_norm)
            self.batch_norm_eps = batch_norm.eps
            batch_norm.eps = 0.0

        def remove(self):
            super().remove()
            self.batch_norm.eps = self.batch_norm_eps

    class BlockSum(AttributeCanonizer):
        """zennit's ResNet block canonizer (residual sum as a ``Sum`` module), for the MONAI blocks of resnet()."""

        def __init__(self):
            super().__init__(self._attribute_map)

        @classmethod
        def _attribute_map(cls, name, module):
            if isinstance(module, blocks):
                return {"forward": cls.forward.__get__(module), "canonizer_sum": Sum()}
            return None

        @staticmethod
        def forward(self, x):
            identity = x
            out = self.act(self.bn1(self.conv1(x)))
            if isinstance(self, LRPReadyResNetBottleneck):
                out = self.bn3(self.conv3(self.act2(self.bn2(self.conv2(out)))))
            else:
                out = self.bn2(self.conv2(out))
            if self.downsample is not None:
                identity = self.downsample(x)
            return self.act_out(self.canonizer_sum(torch.stack([identity, out], dim=-1)))

    model = copy.deepcopy(model)
    tiny = 1e-12
    name_map = []
    for name, module in model.named_modules():
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        leaf = name.rsplit(".", 1)[-1]
        if name == "conv1":
            rule = ZBox(low=torch.full_like(x, low), high=torch.full_like(x, high), stabilizer=epsilon)
        elif isinstance(module, nn.Conv2d):
            before_relu = leaf == "conv1" or (leaf == "conv2" and isinstance(parent, LRPReadyResNetBottleneck))
            rule = Epsilon(epsilon=epsilon if before_relu or stabilise == "all" else tiny)
        elif isinstance(module, nn.Linear):
            rule = Epsilon(epsilon=epsilon if stabilise == "all" else tiny)
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            rule = Norm(stabilizer=epsilon if stabilise == "all" else tiny)
        elif isinstance(module, (nn.ReLU, nn.BatchNorm2d)):
            rule = Pass()
        else:
            if isinstance(module, blocks):
                name_map.append(([f"{name}.canonizer_sum"], Norm(stabilizer=epsilon)))
            continue
        name_map.append(([name], rule))
    canonizer = CompositeCanonizer((MergeBatchNormExact(), BlockSum()))
    composite = NameMapComposite(name_map=name_map, canonizers=[canonizer])
    with zennit.attribution.Gradient(model=model, composite=composite) as attributor:
        # relevance starts from the raw logit: R_out = one_hot * logit
        _, relevance = attributor(x, lambda out: nn.functional.one_hot(torch.full((x.shape[0],), target), out.shape[1]).to(out) * out)
    return relevance.sum(dim=1)


def _randomise_batch_norm(net: nn.Module) -> nn.Module:
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return net


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    net = _randomise_batch_norm(resnet(18, in_channels=1, num_classes=3))
    net.fc.bias.data.uniform_(-0.1, 0.1)
    return net.eval()


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(1)
    return torch.rand(2, 1, 64, 64) * 2.0 - 0.5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("stabilise", ["relu", "all"])
def test_agrees_with_zennit_on_resnet18(resnet18, image, stabilise):
    low, high = image.min().item(), image.max().item()
    ours = lrp(resnet18, image, None, epsilon=0.01, first_rule="zb", bounds=(low, high), stabilise=stabilise)
    assert ours.shape == (2, 3, 64, 64)
    for k in (0, 2):
        reference = _zennit_lrp(resnet18, image, k, 0.01, low, high, stabilise)
        assert _rel(ours[:, k], reference) < 1e-4, (stabilise, k, _rel(ours[:, k], reference))


def test_relu_and_all_differ_and_default_bounds(resnet18, image):
    """The two rule sets are different LRP variants; the default bounds are the batch's min and max."""
    flex = lrp(resnet18, image, 1)
    full = lrp(resnet18, image, 1, stabilise="all")
    assert _rel(flex, full) > 1e-3
    assert torch.allclose(flex, lrp(resnet18, image, 1, bounds=(image.min(), image.max())))


def _bias_free(net: nn.Module) -> nn.Module:
    """BatchNorm as the identity (mean 0, var 1, gamma 1, beta 0) and every bias 0: a bias-free network."""
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif getattr(module, "bias", None) is not None and isinstance(module.bias, nn.Parameter):
            module.bias.data.zero_()
    return net.eval()


@pytest.mark.parametrize("stabilise", ["relu", "all"])
def test_conservation_on_bias_free_resnet(image, stabilise):
    torch.manual_seed(2)
    net = _bias_free(resnet(18, num_classes=3)).double()
    x = image.double()
    maps = lrp(net, x, None, epsilon=1e-9, stabilise=stabilise)
    logits = net(x)
    assert torch.allclose(maps.sum(dim=(2, 3)), logits, rtol=1e-4, atol=0), (maps.sum(dim=(2, 3)), logits)


def test_conservation_on_bias_free_densenet():
    torch.manual_seed(3)
    net = make_lrp_ready(_bias_free(DenseNet121(spatial_dims=2, in_channels=1, out_channels=2))).double()
    x = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    maps = lrp(net, x, None, epsilon=1e-9)
    assert maps.shape == (2, 2, 64, 64)
    assert torch.allclose(maps.sum(dim=(2, 3)), net(x), rtol=1e-4, atol=0)


def test_lrp0_is_gradient_times_input_on_densenet():
    """epsilon = 0 and the epsilon rule at the first layer: LRP-Flex reduces to gradient x input, on DenseNet-121."""
    torch.manual_seed(4)
    net = make_lrp_ready(_randomise_batch_norm(DenseNet121(spatial_dims=2, in_channels=1, out_channels=2))).eval()
    x = torch.randn(1, 1, 64, 64, requires_grad=True)
    (grad,) = torch.autograd.grad(net(x)[0, 1], x)
    maps = lrp(net, x.detach(), 1, epsilon=0.0, first_rule="epsilon")
    assert _rel(maps[:, 0], (grad * x).sum(1)) < 1e-5


def test_map_is_differentiable_in_the_weights():
    """d(sum(map * mask))/dw through the rescaled backward and the z^B rule, against central differences."""
    torch.manual_seed(5)
    net = _randomise_batch_norm(resnet(10, num_classes=2)).eval().double()
    x = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    mask = (torch.rand(2, 1, 32, 32) > 0.5).double()

    def objective(create_graph):
        return (lrp(net, x, None, bounds=(0.0, 1.0), create_graph=create_graph) * mask).sum()

    weights = [net.conv1.weight, net.layer2[0].conv1.weight, net.fc.weight]  # z^B layer, hidden conv, logits
    grads = torch.autograd.grad(objective(True), weights)
    step = 1e-5
    for weight, grad in zip(weights, grads):
        assert grad.abs().sum() > 0
        index = tuple(int(i) for i in torch.unravel_index(grad.abs().argmax(), grad.shape))
        original, values = weight.data[index].item(), []
        for delta in (step, -step):
            weight.data[index] = original + delta
            values.append(objective(False).item())
        weight.data[index] = original
        assert (values[0] - values[1]) / (2 * step) == pytest.approx(grad[index].item(), rel=1e-4)


def test_logits_returned_train_with_plain_relu_gradients(resnet18, image):
    """Gradients of the returned logits are the network's own (the rescaled backward is only for the map)."""
    net = copy.deepcopy(resnet18)
    maps, logits = lrp(net, image, 0, create_graph=True, return_logits=True)
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
    got = torch.autograd.grad(loss, net.layer1[0].conv1.weight)[0]
    plain = nn.functional.cross_entropy(net(image), torch.tensor([0, 2]))
    expected = torch.autograd.grad(plain, net.layer1[0].conv1.weight)[0]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert maps.requires_grad


def test_target_shapes(resnet18, image):
    every = lrp(resnet18, image, None)
    assert every.shape == (2, 3, 64, 64)
    one = lrp(resnet18, image, 2)
    assert one.shape == (2, 1, 64, 64)
    assert torch.allclose(one[:, 0], every[:, 2], rtol=1e-5, atol=1e-7)
    per_image = lrp(resnet18, image, [1, 0])
    assert per_image.shape == (2, 1, 64, 64)
    assert torch.allclose(per_image[0, 0], every[0, 1], rtol=1e-5, atol=1e-7)
    assert torch.allclose(per_image[1, 0], every[1, 0], rtol=1e-5, atol=1e-7)
    assert torch.equal(lrp(resnet18, image, torch.tensor([1, 0])), per_image)
    with torch.no_grad():  # evaluation loops
        assert torch.allclose(lrp(resnet18, image, 2), one)
    three_channels = resnet(10, in_channels=3, num_classes=2).eval()
    assert lrp(three_channels, torch.rand(2, 3, 32, 32), None).shape == (2, 2, 32, 32)  # summed over channels
    with pytest.raises(ValueError, match="one class per image"):
        lrp(resnet18, image, [1])


def test_objective_explains_a_function_of_the_logits(resnet18, image):
    every = lrp(resnet18, image, None)
    # a linear objective's map is the same combination of the class maps (LRP-Flex is linear in the explained output)
    combo = lrp(resnet18, image, objective=lambda lg: 2 * lg[:, 0] - lg[:, 1])
    assert combo.shape == (2, 1, 64, 64)
    torch.testing.assert_close(combo[:, 0], 2 * every[:, 0] - every[:, 1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lrp(resnet18, image, objective=lambda lg: lg[:, 2]), lrp(resnet18, image, 2))
    with pytest.raises(ValueError, match="either target or objective"):
        lrp(resnet18, image, 1, objective=lambda lg: lg[:, 0])
    with pytest.raises(ValueError, match=r"one value per image \(2,\)"):
        lrp(resnet18, image, objective=lambda lg: lg)


def _plain_monai_resnet(depth: int, num_classes: int = 3) -> ResNet:
    block, layers = RESNET_LAYOUTS[depth]
    return ResNet(
        block=block, layers=layers, block_inplanes=[64, 128, 256, 512], spatial_dims=2, n_input_channels=1,
        conv1_t_size=7, conv1_t_stride=2, num_classes=num_classes,
    )


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_rebuild_keeps_keys_outputs_and_init(depth):
    torch.manual_seed(6)
    plain = _randomise_batch_norm(_plain_monai_resnet(depth)).eval()
    torch.manual_seed(6)
    ours = resnet(depth, num_classes=3)
    assert list(ours.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in ours.named_children()] == [
        "conv1", "bn1", "act", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    # same seed, same initial weights as before the rebuild (ReLU modules draw no random numbers)
    fresh_plain = (torch.manual_seed(7), _plain_monai_resnet(depth))[1]
    fresh_ours = (torch.manual_seed(7), resnet(depth, num_classes=3))[1]
    assert all(torch.equal(a, b) for a, b in zip(fresh_ours.state_dict().values(), fresh_plain.state_dict().values()))
    ours.load_state_dict(plain.state_dict(), strict=True)  # old checkpoints load
    ours.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), plain(x))
    relus = [m for m in ours.modules() if isinstance(m, nn.ReLU)]
    assert not any(m.inplace for m in relus)
    assert len({id(m) for m in relus}) == len(relus) == 1 + sum(RESNET_LAYOUTS[depth][1]) * (2 if depth < 50 else 3)


def test_plain_monai_resnet_is_rejected_then_converted(image):
    torch.manual_seed(8)
    plain = _randomise_batch_norm(_plain_monai_resnet(18)).eval()
    with pytest.raises(ValueError, match="in-place ReLU|used once"):
        lrp(plain, image, 0)
    plain.act.inplace = False
    for module in plain.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    with pytest.raises(ValueError, match="used once"):
        lrp(plain, image, 0)
    ready = make_lrp_ready(plain)
    assert isinstance(ready.layer1[0], LRPReadyResNetBlock) and not isinstance(plain.layer1[0], LRPReadyResNetBlock)
    rebuilt = resnet(18, num_classes=3).eval()
    rebuilt.load_state_dict(plain.state_dict())
    assert torch.allclose(lrp(ready, image, 0), lrp(rebuilt, image, 0), rtol=1e-6, atol=1e-8)


def test_first_rule_zb_needs_conv_bn_relu_first():
    net = nn.Sequential(nn.ReLU(), nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="Conv, \\[BatchNorm\\], ReLU"):
        lrp(net, x, 0)
    assert lrp(net, x, 0, first_rule="epsilon").shape == (1, 1, 8, 8)


class _TinyViT(nn.Module):
    """1x1 conv -> ReLU -> tokens -> MONAI TransformerBlock (attention, LayerNorm, GELU MLP) -> mean token -> logits."""

    def __init__(self, dim=8, classes=2):
        super().__init__()
        from monai.networks.blocks import TransformerBlock

        self.embed = nn.Conv2d(1, dim, 1, bias=False)
        self.relu = nn.ReLU()
        self.block = TransformerBlock(dim, 16, num_heads=2, dropout_rate=0.0)
        self.fc = nn.Linear(dim, classes, bias=False)

    def forward(self, x):
        tokens = self.relu(self.embed(x)).flatten(2).transpose(1, 2)
        return self.fc(self.block(tokens).mean(1))


def _held_by_hand(net, x):
    """The rules of lrp's transformer section written out: the same network with the attention weights, 1/std of
    each LayerNorm and Phi of the GELU detached; gradient x input of that (epsilon 0, first rule epsilon)."""
    import math

    blk = net.block
    x = x.clone().requires_grad_(True)
    tokens = net.relu(net.embed(x)).flatten(2).transpose(1, 2)

    def ln(m, t):
        c = t - t.mean(-1, keepdim=True)
        return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + m.eps).detach() * m.weight + m.bias

    h = ln(blk.norm1, tokens)
    att = blk.attn
    q, k, v = att.input_rearrange(att.qkv(h))
    weights = (torch.einsum("blxd,blyd->blxy", q, k) * att.scale).softmax(-1).detach()
    a = att.out_proj(att.out_rearrange(torch.einsum("bhxy,bhyd->bhxd", weights, v)))
    tokens = tokens + a
    z = blk.mlp.linear1(ln(blk.norm2, tokens))
    tokens = tokens + blk.mlp.linear2(z * (0.5 * (1 + torch.erf(z / math.sqrt(2)))).detach())
    out = net.fc(tokens.mean(1))
    (grad,) = torch.autograd.grad(out[:, 1].sum(), x)
    return (grad * x).sum(1), out


def test_transformer_rules_against_detached_network_and_conservation():
    torch.manual_seed(7)
    net = _TinyViT().double().eval()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    maps, logits = lrp(net, x, 1, epsilon=0.0, first_rule="epsilon", return_logits=True)
    expected, out = _held_by_hand(net, x)
    assert torch.allclose(logits, net(x), atol=1e-12) and torch.allclose(out, logits, atol=1e-12)  # forward unchanged
    assert torch.allclose(maps[:, 0], expected, rtol=1e-9, atol=1e-12)
    # plain gradient x input is not what the rules give (they change the map)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xg)[:, 1].sum(), xg)
    assert not torch.allclose((g * x).sum(1), maps[:, 0], rtol=1e-3)
    # conservation: with every bias zero the map sums to the logit
    for m in net.modules():
        if getattr(m, "bias", None) is not None:
            m.bias.data.zero_()
    maps = lrp(net, x, None, epsilon=0.0, first_rule="epsilon")
    assert torch.allclose(maps.sum(dim=(2, 3)), net(x), rtol=1e-9, atol=1e-12)


def test_transformer_map_is_differentiable_in_query_weights():
    """The held attention weights keep their graph: the map's gradient reaches the query/key weights."""
    torch.manual_seed(8)
    net = _TinyViT().double()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    mask = (torch.rand(2, 1, 4, 4) > 0.5).double()

    def objective(create_graph):
        return (lrp(net, x, 0, epsilon=0.0, first_rule="epsilon", create_graph=create_graph) * mask).sum()

    w = net.block.attn.qkv.weight
    (grad,) = torch.autograd.grad(objective(True), w)
    index = tuple(int(i) for i in torch.unravel_index(grad[: w.shape[0] // 3].abs().argmax(), grad.shape))  # a query weight
    original, values = w.data[index].item(), []
    for delta in (1e-6, -1e-6):
        w.data[index] = original + delta
        values.append(objective(False).item())
    w.data[index] = original
    assert grad[index] != 0 and (values[0] - values[1]) / 2e-6 == pytest.approx(grad[index].item(), rel=1e-4)


def test_flash_attention_is_rejected():
    net = _TinyViT()
    net.block.attn.use_flash_attention = True
    with pytest.raises(ValueError, match="flash attention"):
        lrp(net, torch.rand(1, 1, 4, 4), 0)


def test_outside_share_by_hand():
    from cutremain_monai.localization.lrp import outside_share

    heat = torch.tensor([[[[1.0, -3.0], [2.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]], [[[1.0, 1.0], [0.0, 0.0]]]])
    assert outside_share(heat, mask).tolist() == pytest.approx([7 / 10, 0.0])  # |-3| + |4| of 10; empty map: 0
