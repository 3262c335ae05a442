import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from cutremain_monai.transforms import GaussianBlur3x3, GaussianBlur3x3d, LungMask, LungMaskd


def test_blur_is_the_3x3_binomial_kernel():
    img = torch.zeros(1, 7, 7)
    img[0, 3, 3] = 16.0  # an impulse: the output is the kernel itself
    out = GaussianBlur3x3()(img)
    expected = np.outer([1, 2, 1], [1, 2, 1])
    np.testing.assert_allclose(out[0, 2:5, 2:5].numpy(), expected, atol=1e-6)
    assert float(out.sum()) == pytest.approx(16.0)  # mass kept away from the border
    # OpenCV's getGaussianKernel(3, 0) is [0.25, 0.5, 0.25]; a constant image stays constant (replicated edges)
    flat = GaussianBlur3x3()(torch.full((2, 5, 6), 0.3))
    np.testing.assert_allclose(flat.numpy(), 0.3, atol=1e-6)
    # border: replicate padding -> first row = (3 * v0 + v1) / 4 along a column ramp
    ramp = torch.arange(5.0).reshape(1, 5, 1).expand(1, 5, 4).contiguous()
    assert float(GaussianBlur3x3()(ramp)[0, 0, 0]) == pytest.approx((3 * 0 + 1) / 4)


def test_blur_keeps_metadata_and_checks_shape():
    m = MetaTensor(torch.rand(1, 8, 8), meta={"filename_or_obj": "x.dcm"})
    out = GaussianBlur3x3d("image")({"image": m})["image"]
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "x.dcm"
    with pytest.raises(ValueError, match="expects \\(C, H, W\\)"):
        GaussianBlur3x3()(torch.rand(8, 8))


def test_lung_mask_excludes_v7_markup():
    raw = torch.tensor([[[0, 127, 255, 255]]], dtype=torch.float32) / 255.0  # V7: 127 = markup, 255 = lung
    np.testing.assert_array_equal(LungMask()(raw).numpy(), [[[0, 0, 1, 1]]])
    d = LungMaskd("lung_mask")({"lung_mask": raw})
    assert d["lung_mask"].dtype == torch.float32
    with pytest.raises(ValueError, match="scaled to \\[0, 1\\]"):
        LungMask()(torch.tensor([[[0.0, 255.0]]]))
