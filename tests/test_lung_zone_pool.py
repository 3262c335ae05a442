import logging

import pytest
import torch

from cutremain_monai.networks.lung_zone_pool import LungZoneMaxPool, lung_zone_max_pool


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
    out[0].sum().backward()
    g = prob.grad[0, 0]
    assert g[0, 1] == 1 and g[1, 1] == 1 and g[2, 3] == 1 and g[0, 0] == 0 and g[3].sum() == 0
    pooled, empty = lung_zone_max_pool(prob.detach(), zones, return_empty=True)
    assert empty.tolist() == [[False] * 6, [False] * 5 + [True]]


def test_module_reports_empty_and_errors(caplog):
    m = LungZoneMaxPool()
    with caplog.at_level(logging.WARNING):
        out = m(torch.rand(3, 1, 8, 8), torch.zeros(3, 1, 8, 8, dtype=torch.long))
    assert out.shape == (3, 6) and (out == 0).all() and m.last_empty.all()
    assert "18 empty zone(s)" in caplog.text
    with pytest.raises(ValueError, match=r"prob must be \(B, 1, H, W\)"):
        m(torch.rand(3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="zones must hold integers"):
        m(torch.rand(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
