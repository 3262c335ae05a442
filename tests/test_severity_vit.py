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
