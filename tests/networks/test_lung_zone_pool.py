import logging

import pytest
import torch

from cutremain_monai.networks.lung_zone_pool import NUM_ZONES, LungZoneMaxPool, lung_zone_max_pool
from cutremain_monai.data.phantoms import phantom_lung_zone_maps


def _lung_zone_maps(batch, size, seed):
    return torch.as_tensor(phantom_lung_zone_maps(batch, size, seed))[:, None]


def _by_hand(prob, zones):
    """Per-sample, per-zone loop: ``torch.amax`` over the zone's pixels (0 and flagged empty where there are none)."""
    b = prob.shape[0]
    out = torch.zeros(b, NUM_ZONES, dtype=prob.dtype)
    empty = torch.zeros(b, NUM_ZONES, dtype=torch.bool)
    for i in range(b):
        for z in range(1, NUM_ZONES + 1):
            sel = zones[i, 0] == z
            if sel.any():
                out[i, z - 1] = torch.amax(prob[i, 0][sel])
            else:
                empty[i, z - 1] = True
    return out, empty


def _grad_by_hand(prob, zones, w):
    """Gradient of ``sum(w * pooled)`` through the same loop: ``torch.amax``'s gradient (shared among ties)."""
    p = prob.detach().clone().requires_grad_(True)
    total = p.new_zeros(())
    for i in range(p.shape[0]):
        for z in range(1, NUM_ZONES + 1):
            sel = zones[i, 0] == z
            if sel.any():
                total = total + w[i, z - 1] * torch.amax(p[i, 0][sel])
    total.backward()
    return p.grad


def test_values_and_gradients_hand_built():
    prob = torch.zeros(2, 1, 4, 4)
    zones = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    zones[0, 0, 0, :2], zones[0, 0, 0, 2:] = 1, 4
    zones[0, 0, 1, :2], zones[0, 0, 1, 2:] = 2, 5
    zones[0, 0, 2, :2], zones[0, 0, 2, 2:] = 3, 6
    prob[0, 0] = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 16
    prob[0, 0, 3, :] = 0.99  # outside the lungs: must not count
    zones[1] = zones[0]
    zones[1, 0, 2, 2:] = 0  # sample 1 has no zone F
    prob[1, 0] = 0.5
    prob.requires_grad_(True)
    out = lung_zone_max_pool(prob, zones)
    expected0 = torch.tensor([1, 5, 9, 3, 7, 11], dtype=torch.float32) / 16
    torch.testing.assert_close(out[0], expected0)
    torch.testing.assert_close(out[1], torch.tensor([0.5] * 5 + [0.0]))
    (out[0].sum() + 2 * out[1, 0]).backward()
    g = prob.grad[0, 0]
    assert g[0, 1] == 1 and g[1, 1] == 1 and g[2, 3] == 1 and g[0, 0] == 0 and g[3].sum() == 0
    # sample 1, zone A: two pixels tie at 0.5 and share the gradient 2 -> 1 each, as torch.amax does
    assert prob.grad[1, 0, 0, :2].tolist() == [1.0, 1.0] and prob.grad[1, 0, 1:].sum() == 0
    pooled, empty = lung_zone_max_pool(prob.detach(), zones, return_empty=True)
    assert empty.tolist() == [[False] * 6, [False] * 5 + [True]]


@pytest.mark.parametrize("case", ["lungs", "random", "ties", "float64_int64", "missing_zones"])
def test_matches_a_per_zone_loop(case):
    """Values, empty flags and gradients against a per-zone loop with torch.amax over the masked pixels: lung-shaped
    maps (what LungZonesd makes), random maps, quantised maps full of ties, other dtypes, and maps that lack zones."""
    g = torch.Generator().manual_seed(7)
    if case == "random":
        zones = torch.randint(0, 7, (4, 1, 37, 53), generator=g).to(torch.uint8)
    elif case == "missing_zones":
        zones = _lung_zone_maps(3, 48, 2)
        zones[0][zones[0] == 2] = 0
        zones[2][(zones[2] == 4) | (zones[2] == 6)] = 0
    else:
        zones = _lung_zone_maps(3, 64, 1)
    prob = torch.rand(zones.shape, generator=g)
    if case == "ties":
        prob = (prob * 4).floor() / 4
    if case == "float64_int64":
        prob, zones = prob.double(), zones.long()
    w = torch.rand(zones.shape[0], NUM_ZONES, generator=g, dtype=prob.dtype)
    p = prob.clone().requires_grad_(True)
    out, empty = lung_zone_max_pool(p, zones, return_empty=True)
    ref, ref_empty = _by_hand(prob, zones)
    assert out.dtype == prob.dtype and torch.equal(out.detach(), ref) and torch.equal(empty, ref_empty)
    if case == "missing_zones":
        assert empty[0, 1] and empty[2, 3] and empty[2, 5] and int(empty.sum()) == 3
    (out * w).sum().backward()
    torch.testing.assert_close(p.grad, _grad_by_hand(prob, zones, w))
    if case == "ties":  # ties share: each zone's gradient sums to its weight
        for i in range(zones.shape[0]):
            for z in range(1, NUM_ZONES + 1):
                torch.testing.assert_close(p.grad[i, 0][zones[i, 0] == z].sum(), w[i, z - 1])


def test_nan_and_layouts():
    zones = _lung_zone_maps(2, 64, 3)
    prob = torch.rand(2, 1, 64, 64)
    ys, xs = torch.nonzero(zones[1, 0] == 5, as_tuple=True)
    prob[1, 0, ys[len(ys) // 2], xs[len(xs) // 2]] = float("nan")
    out = lung_zone_max_pool(prob, zones)
    assert torch.isnan(out[1, 4]) and not torch.isnan(out[0]).any() and not torch.isnan(out[1, :4]).any()
    assert torch.isnan(torch.amax(prob[1, 0][zones[1, 0] == 5]))  # the same as torch.amax
    prob[0, 0][zones[0, 0] == 0] = float("nan")  # NaN outside the lungs does not count
    assert not torch.isnan(lung_zone_max_pool(prob, zones)[0]).any()
    # a transposed (non-contiguous) map pools like its contiguous copy
    t, zt = prob.transpose(2, 3), zones.transpose(2, 3)
    torch.testing.assert_close(lung_zone_max_pool(t, zt), lung_zone_max_pool(t.contiguous(), zt.contiguous()),
                               equal_nan=True)


def test_module_reports_empty_and_errors(caplog):
    m = LungZoneMaxPool()
    with caplog.at_level(logging.WARNING):
        out = m(torch.rand(3, 1, 8, 8), torch.zeros(3, 1, 8, 8, dtype=torch.long))
    assert out.shape == (3, 6) and (out == 0).all() and m.last_empty.all()
    assert "18 empty zone(s)" in caplog.text
    caplog.clear()
    quiet = LungZoneMaxPool(warn_empty=False)
    with caplog.at_level(logging.WARNING):
        quiet(torch.rand(1, 1, 8, 8), torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    assert quiet.last_empty.all() and "empty zone" not in caplog.text
    with pytest.raises(ValueError, match=r"prob must be \(B, 1, H, W\)"):
        m(torch.rand(3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"prob must be \(B, 1, H, W\)"):
        m(torch.rand(3, 2, 8, 8), torch.zeros(3, 2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="zones must have the shape of prob"):
        m(torch.rand(1, 1, 8, 8), torch.zeros(1, 1, 8, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="zones must hold integers"):
        m(torch.rand(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("value, dtype", [(7, torch.uint8), (9, torch.long), (-1, torch.long), (-3, torch.int32)])
def test_out_of_range_zones(value, dtype):
    zones = _lung_zone_maps(2, 32, 0).to(dtype)
    zones[1, 0, 5, 5] = value
    with pytest.raises(ValueError, match=r"zones must hold integers 0..6; found a value outside"):
        lung_zone_max_pool(torch.rand(2, 1, 32, 32), zones)
