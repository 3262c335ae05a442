"""Sliding-window targetness maps against a loop written out by hand."""

import numpy as np
import pytest
import torch
from torch import nn

from cutremain_monai.localization.targetness import accumulate_windows, targetness_map, window_scores


class _MeanLogit(nn.Module):
    """logit = 4 * (mean of the window - 0.5): a patch classifier whose scores are known."""

    def forward(self, x):
        return 4 * (x.mean(dim=(1, 2, 3)) - 0.5)[:, None]


def _by_hand(img, window, stride, normalise, accumulate="target"):
    h, w = img.shape
    total, cover = np.zeros((h, w)), np.zeros((h, w))
    for y in range(0, h - window + 1, stride):
        for x in range(0, w - window + 1, stride):
            p = 1 / (1 + np.exp(-4 * (img[y : y + window, x : x + window].mean() - 0.5)))
            total[y : y + window, x : x + window] += p if accumulate == "target" else 1 - p
            cover[y : y + window, x : x + window] += 1
    c = np.where(cover > 0, total / np.maximum(cover, 1), 0) if normalise == "coverage" else total
    lo, hi = c[cover > 0].min(), c[cover > 0].max()
    m = (c - lo) / (hi - lo) if accumulate == "target" else (hi - c) / (hi - lo)
    return np.where(cover > 0, m, 0), cover, c


@pytest.mark.parametrize("normalise", ["coverage", "sum"])
@pytest.mark.parametrize("accumulate", ["target", "background"])
def test_map_matches_the_loop(normalise, accumulate):
    rng = np.random.default_rng(0)
    img = rng.random((2, 1, 21, 18))  # (21 - 6) % 3 == 0, (18 - 6) % 3 == 0; window 6, stride 3
    got = targetness_map(_MeanLogit(), torch.from_numpy(img).float(), window=6, stride=3, batch_size=7,
                         normalise=normalise, accumulate=accumulate)
    raw = targetness_map(_MeanLogit(), torch.from_numpy(img).float(), window=6, stride=3, normalise=normalise,
                         accumulate="target", minmax=False)
    for i in range(2):
        want, cover, c = _by_hand(img[i, 0], 6, 3, normalise, accumulate)
        assert cover.min() == 1 and cover.max() == 4  # corners 1 window, inside (6 / 3)^2
        np.testing.assert_allclose(got[i, 0].numpy(), want, atol=1e-5)
        if accumulate == "target":  # before normalisation: the mean (or sum) of the covering windows' P(target)
            np.testing.assert_allclose(raw[i, 0].numpy(), c, atol=1e-5)


def test_background_form_equals_target_form_only_with_coverage():
    img = torch.from_numpy(np.random.default_rng(1).random((1, 1, 20, 20))).float()
    t, b = (targetness_map(_MeanLogit(), img, 8, 4, normalise="coverage", accumulate=a) for a in ("target", "background"))
    assert torch.allclose(t, b, atol=1e-6)
    t, b = (targetness_map(_MeanLogit(), img, 8, 4, normalise="sum", accumulate=a) for a in ("target", "background"))
    assert not torch.allclose(t, b, atol=1e-2)


def test_uncovered_pixels_and_constant_maps():
    img = torch.rand(1, 1, 10, 10)
    m = targetness_map(_MeanLogit(), img, window=4, stride=4)  # windows at 0 and 4: rows / columns 8, 9 uncovered
    assert m.shape == (1, 1, 10, 10) and (m[0, 0, 8:] == 0).all() and (m[0, 0, :, 8:] == 0).all()
    assert m.max() == pytest.approx(1.0) and m[0, 0, :8, :8].min() == 0
    assert (targetness_map(_MeanLogit(), torch.full((1, 1, 8, 8), 0.3), 4, 2) == 0).all()


def test_window_scores_grid_order_and_errors():
    img = torch.zeros(1, 1, 8, 12)
    img[..., 4:, 8:] = 1  # bottom-right window of a 2 x 3 grid (window 4, stride 4)
    s = window_scores(_MeanLogit(), img, window=4, stride=4)
    assert s.shape == (1, 2, 3) and s.argmax() == 5
    with pytest.raises(ValueError, match="smaller than the window"):
        window_scores(_MeanLogit(), torch.zeros(1, 1, 8, 8), window=16)
    with pytest.raises(ValueError, match="one logit per window"):
        window_scores(nn.Flatten(), img, window=4, stride=4)
    with pytest.raises(ValueError, match="do not fit"):
        accumulate_windows(s, (12, 12), window=4, stride=4)
