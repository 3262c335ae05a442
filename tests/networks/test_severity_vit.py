import torch

from cutremain_monai.networks.severity_vit import SMALL, SeverityViT
from cutremain_monai.transforms.lung_zones import split_lung_zones


def _lungs(n=256):
    m = torch.zeros(1, 1, n, n)
    m[..., n // 8: 7 * n // 8, n // 8: 3 * n // 8] = 1
    m[..., n // 8: 7 * n // 8, 5 * n // 8: 7 * n // 8] = 1
    return m


def test_paper_sizes_shapes():
    torch.manual_seed(0)
    net = SeverityViT().eval()  # ViT-B/16 sizes at 256x256
    assert net.features(torch.zeros(1, 1, 256, 256)).shape == (1, 1024, 16, 16)
    lungs = _lungs()
    zones = torch.from_numpy(split_lung_zones(lungs[0, 0].numpy()))[None, None].long()
    with torch.no_grad():
        scores, prob = net(torch.rand(1, 1, 256, 256), lungs, zones)
    assert scores.shape == (1, 6) and prob.shape == (1, 1, 256, 256)
    assert (prob[lungs == 0] == 0).all() and ((scores > 0) & (scores < 1)).all()


def test_small_config_trains_and_freezes(tmp_path):
    torch.manual_seed(0)
    net = SeverityViT(img_size=64, **SMALL)
    lungs = _lungs(64)
    zones = torch.from_numpy(split_lung_zones(lungs[0, 0].numpy()))[None, None].long().repeat(2, 1, 1, 1)
    scores, _ = net(torch.rand(2, 1, 64, 64), lungs.repeat(2, 1, 1, 1), zones)
    loss = torch.nn.functional.binary_cross_entropy(scores, torch.tensor([[1.0, 0, 1, 0, 0, 1]] * 2))
    loss.backward()
    assert net.embed.weight.grad is not None and net.features.conv0.weight.grad is not None
    torch.save(net.features.state_dict(), tmp_path / "f.pt")
    frozen = SeverityViT(img_size=64, feature_weights=str(tmp_path / "f.pt"), freeze_features=True, **SMALL)
    torch.testing.assert_close(frozen.features.conv0.weight, net.features.conv0.weight)
    assert not any(p.requires_grad for p in frozen.features.parameters())
    full = {f"features.{k}": v for k, v in net.features.state_dict().items()}  # a whole-DenseNet checkpoint
    torch.save(full, tmp_path / "d.pt")
    torch.testing.assert_close(SeverityViT(img_size=64, feature_weights=str(tmp_path / "d.pt"), **SMALL).features.conv0.weight,
                               net.features.conv0.weight)
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    import pytest

    with pytest.raises(ValueError, match=r"bad.pt: not DenseNet-121 feature weights \(missing conv0.weight"):
        SeverityViT(img_size=64, feature_weights=str(tmp_path / "bad.pt"), **SMALL)


def test_zone_logits_are_the_pooled_probabilities_logits():
    """sigmoid(zone logits) is the zone probability of the forward; an empty zone is ~0 in both."""
    torch.manual_seed(1)
    net = SeverityViT(img_size=64, **SMALL).eval()
    lungs = _lungs(64).repeat(2, 1, 1, 1)
    zones = torch.from_numpy(split_lung_zones(lungs[0, 0].numpy()))[None, None].repeat(2, 1, 1, 1).to(torch.uint8)
    zones[1][zones[1] == 6] = 0  # image 2: zone F empty
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        prob, _ = net(x, lungs, zones)
        logits = net(x, lungs, zones, logits=True)
        head = net.lesion_logits(x)
    assert torch.allclose(torch.sigmoid(logits), prob, atol=1e-6)
    assert logits[0, 2] == head[0, 0][zones[0, 0] == 3].max()  # zone C's logit: the head's maximum over its pixels
    assert prob[1, 5] == 0 and logits[1, 5] == -20.0


def _xrv_densenet_class(monkeypatch):
    """torchxrayvision's own ``DenseNet`` class. PyPI's torchvision does not import beside the CPU torch wheel, and
    torchxrayvision imports it at the top of its package but never for this model: the test gives it an empty
    placeholder module (torchxrayvision is installed without dependencies, as zennit is; nothing is downloaded)."""
    import sys
    import types

    import pytest

    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except Exception:
            tv = types.ModuleType("torchvision")
            tv.models, tv.transforms = types.ModuleType("torchvision.models"), types.ModuleType("torchvision.transforms")
            for name, mod in (("torchvision", tv), ("torchvision.models", tv.models), ("torchvision.transforms", tv.transforms)):
                monkeypatch.setitem(sys.modules, name, mod)  # removed again after the test
    xrv = pytest.importorskip("torchxrayvision")
    return xrv.models.DenseNet


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def test_torchxrayvision_densenet_weights_map_onto_the_features(tmp_path, monkeypatch):
    """The state dict of torchxrayvision's DenseNet-121 (random weights) loads into SeverityViT's extractor, and
    the features before transition 3 are equal on the same input; so do its torchvision-layout variants."""
    import pytest

    torch.manual_seed(0)
    xrv_densenet = _xrv_densenet_class(monkeypatch)
    ref = xrv_densenet(weights=None).eval()
    _randomise_bn(ref)
    torch.save(ref.state_dict(), tmp_path / "xrv.pt")
    net = SeverityViT(img_size=64, feature_weights=str(tmp_path / "xrv.pt"), **SMALL).eval()
    upto_dense3 = torch.nn.Sequential(*list(ref.features.children())[:9])  # conv0 .. denseblock3
    assert [n for n, _ in list(ref.features.named_children())[:9]][-1] == "denseblock3"
    x = torch.randn(2, 1, 64, 64) * 300
    with torch.no_grad():
        torch.testing.assert_close(net.features(x), upto_dense3(x), rtol=1e-4, atol=1e-4)
    # torchvision's layout: ImageNet's 3-channel first convolution (summed for the grey image), DataParallel's
    # prefix, the oldest checkpoints' "norm.1" spelling, and a {"state_dict": ...} wrapper
    tv = {}
    for k, v in ref.state_dict().items():
        if k == "features.conv0.weight":
            v = torch.cat([v / 2, v / 4, v / 4], dim=1)  # (exact in floating point: their sum is v)
        k = k.replace("denselayer1.norm1.", "denselayer1.norm.1.").replace("denselayer2.conv2.", "denselayer2.conv.2.")
        tv["module." + k] = v
    torch.save({"state_dict": tv}, tmp_path / "tv.pt")
    net_tv = SeverityViT(img_size=64, feature_weights=str(tmp_path / "tv.pt"), **SMALL).eval()
    with torch.no_grad():
        torch.testing.assert_close(net_tv.features(x), upto_dense3(x), rtol=1e-4, atol=1e-4)
        # the grey image repeated in three channels through the 3-channel convolution: the same first layer
        three = torch.nn.functional.conv2d(x.repeat(1, 3, 1, 1), tv["module.features.conv0.weight"], stride=2, padding=3)
        torch.testing.assert_close(net_tv.features.conv0(x), three, rtol=1e-4, atol=1e-3)
    # the input range of torchxrayvision's training ([-1024, 1024]) from our [0, 1] images (not with LRP)
    scaled = SeverityViT(img_size=64, feature_weights=str(tmp_path / "xrv.pt"), feature_input_range=[-1024, 1024], **SMALL).eval()
    u = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scaled.features(scaled._scaled(u)), upto_dense3(u * 2048 - 1024), rtol=1e-4, atol=1e-3)
    from cutremain_monai.localization.lrp import make_lrp_ready

    with pytest.raises(ValueError, match="does not take a SeverityViT with feature_input_range"):
        make_lrp_ready(scaled)
    # a pickled model (what torchxrayvision downloads) is refused with the way out
    torch.save(ref, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"pickled.pt: not a plain state dict .*torch.save\(model.state_dict\(\)"):
        SeverityViT(img_size=64, feature_weights=str(tmp_path / "pickled.pt"), **SMALL)
    # another DenseNet (169's block sizes) is named, not half-loaded
    other = xrv_densenet(block_config=(6, 12, 32, 32), weights=None)
    torch.save(other.state_dict(), tmp_path / "d169.pt")
    with pytest.raises(ValueError, match="d169.pt: denseblock3.denselayer25.* another DenseNet"):
        SeverityViT(img_size=64, feature_weights=str(tmp_path / "d169.pt"), **SMALL)


def test_monai_densenet_weights_map_onto_the_features(tmp_path):
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    ref = DenseNet121(spatial_dims=2, in_channels=1, out_channels=3).eval()
    _randomise_bn(ref, seed=2)
    torch.save(ref.state_dict(), tmp_path / "monai.pt")
    net = SeverityViT(img_size=64, feature_weights=str(tmp_path / "monai.pt"), **SMALL).eval()
    names = ["conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2", "transition2", "denseblock3"]
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.features(x), torch.nn.Sequential(*[getattr(ref.features, n) for n in names])(x))
