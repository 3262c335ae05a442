import logging
import shutil

import pytest
import torch

from cutremain_monai.networks.lung_zone_pool import LungZoneMaxPool, fused_kernel_available, lung_zone_max_pool
from cutremain_monai.data.phantoms import phantom_lung_zone_maps

PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(not fused_kernel_available(), reason="no C kernel"))]
needs_kernel = pytest.mark.skipif(not fused_kernel_available(), reason="the C kernel was not built (no compiler)")


def test_kernel_is_built_where_a_compiler_is():
    # setup.py builds the kernel when a C compiler is present (CI has one): its absence there is a build bug
    if shutil.which("cc") or shutil.which("gcc"):
        assert fused_kernel_available()


@pytest.mark.parametrize("use_kernel", PATHS)
def test_values_and_gradients_hand_built(use_kernel):
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
    out = lung_zone_max_pool(prob, zones, use_kernel=use_kernel)
    expected0 = torch.tensor([1, 5, 9, 3, 7, 11], dtype=torch.float32) / 16
    torch.testing.assert_close(out[0], expected0)
    torch.testing.assert_close(out[1], torch.tensor([0.5] * 5 + [0.0]))
    (out[0].sum() + 2 * out[1, 0]).backward()
    g = prob.grad[0, 0]
    assert g[0, 1] == 1 and g[1, 1] == 1 and g[2, 3] == 1 and g[0, 0] == 0 and g[3].sum() == 0
    # sample 1, zone A: two pixels tie at 0.5 and share the gradient 2 -> 1 each, as torch.amax does
    assert prob.grad[1, 0, 0, :2].tolist() == [1.0, 1.0] and prob.grad[1, 0, 1:].sum() == 0
    pooled, empty = lung_zone_max_pool(prob.detach(), zones, return_empty=True, use_kernel=use_kernel)
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


def _lung_zone_maps(batch, size, seed):
    return torch.as_tensor(phantom_lung_zone_maps(batch, size, seed))[:, None]


@needs_kernel
@pytest.mark.parametrize("case", ["lungs", "random", "thin", "ties"])
def test_kernel_matches_scatter_reduce(case):
    """The C kernel and scatter_reduce agree on values, empty flags and gradients: lung-shaped maps (long runs),
    random maps (runs of one pixel), widths below one vector, and quantised maps full of ties."""
    g = torch.Generator().manual_seed(7)
    if case == "lungs":
        zones = _lung_zone_maps(5, 96, 0)
    elif case == "random":
        zones = torch.randint(0, 7, (4, 1, 37, 53), generator=g).to(torch.uint8)
    elif case == "thin":
        zones = torch.randint(0, 7, (3, 1, 50, 5), generator=g).to(torch.uint8)
        zones[:, :, :, 1:] = zones[:, :, :, :1]  # runs of 5 and of 5+... across rows
    else:
        zones = _lung_zone_maps(3, 64, 1)
    shape = zones.shape
    prob = torch.rand(shape, generator=g)
    if case == "ties":
        prob = (prob * 4).floor() / 4
    prob_a, prob_b = prob.clone().requires_grad_(True), prob.clone().requires_grad_(True)
    out_a, empty_a = lung_zone_max_pool(prob_a, zones, return_empty=True, use_kernel=True)
    out_b, empty_b = lung_zone_max_pool(prob_b, zones.long(), return_empty=True, use_kernel=False)
    assert torch.equal(out_a, out_b) and torch.equal(empty_a, empty_b)
    w = torch.rand(out_a.shape, generator=g)
    (out_a * w).sum().backward()
    (out_b * w).sum().backward()
    torch.testing.assert_close(prob_a.grad, prob_b.grad)
    # by hand for one sample/zone: the maximum over the zone's pixels
    z = zones[0, 0] == 2
    assert out_a[0, 1] == (prob[0, 0][z].max() if z.any() else 0)


@needs_kernel
def test_kernel_nan_out_of_range_and_layouts():
    zones = _lung_zone_maps(2, 64, 3)
    prob = torch.rand(2, 1, 64, 64)
    ys, xs = torch.nonzero(zones[1, 0] == 5, as_tuple=True)
    prob[1, 0, ys[len(ys) // 2], xs[len(xs) // 2]] = float("nan")
    out = lung_zone_max_pool(prob, zones, use_kernel=True)
    assert torch.isnan(out[1, 4]) and not torch.isnan(out[0]).any() and not torch.isnan(out[1, :4]).any()
    ref = lung_zone_max_pool(prob, zones.long(), use_kernel=False)
    assert torch.isnan(ref[1, 4])  # the same as scatter_reduce / amax
    # a transposed (non-contiguous) map pools like its contiguous copy
    t = prob.transpose(2, 3)
    torch.testing.assert_close(lung_zone_max_pool(t, zones.transpose(2, 3), use_kernel=True),
                               lung_zone_max_pool(t.contiguous(), zones.transpose(2, 3).contiguous(), use_kernel=False),
                               equal_nan=True)
    bad = zones.clone()
    bad[0, 0, 0, 0] = 9
    for use_kernel in (True, False):
        with pytest.raises(ValueError, match=r"zones must hold integers 0..6; found a value outside"):
            lung_zone_max_pool(prob, bad if use_kernel else bad.long(), use_kernel=use_kernel)
    with pytest.raises(RuntimeError, match="needs float32 maps and uint8 zones"):
        lung_zone_max_pool(prob.double(), zones, use_kernel=True)


@needs_kernel
def test_scalar_and_simd_paths_agree():
    """The per-pixel loop (CPUs without AVX2) against the AVX2 run path, called on the raw kernel."""
    from cutremain_monai.networks import _zone_pool

    g = torch.Generator().manual_seed(3)
    zones = torch.cat([_lung_zone_maps(3, 80, 5), torch.randint(0, 7, (2, 1, 80, 80), generator=g).to(torch.uint8)])
    prob = torch.rand(zones.shape, generator=g)
    prob[0, 0, 40, 20] = float("nan")
    results = []
    for simd in (True, False):
        out, empty = torch.empty(5, 6), torch.empty(5, 6, dtype=torch.bool)
        bad = _zone_pool.zone_max_u8(prob.data_ptr(), zones.data_ptr(), 5, 80 * 80, 6, out.data_ptr(),
                                     empty.data_ptr(), 2, simd)
        assert bad == 0
        results.append((out, empty))
    torch.testing.assert_close(results[0][0], results[1][0], equal_nan=True)
    assert torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[1][0], lung_zone_max_pool(prob, zones.long(), use_kernel=False), equal_nan=True)
