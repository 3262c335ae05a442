"""PSLNet and PSL's class-probability weighting: the weighting against a hand computation, shapes, TorchScript."""

import numpy as np
import pytest
import torch

from cutremain_monai.networks.psl import PSLNet, class_weighted_log_probs, class_weighted_probs


def test_weighting_is_softmax_times_class_probability_renormalised():
    seg = torch.tensor([[[[0.0]], [[1.0]], [[2.0]]]])      # (1, 3, 1, 1): background, class 0, class 1
    cls = torch.tensor([[0.0, -2.0]])                       # p = 0.5, 0.1192
    f = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    w = np.array([1.0, 0.5, 1 / (1 + np.exp(2.0))])
    expected = f * w / (f * w).sum()
    got = class_weighted_probs(seg, cls)[0, :, 0, 0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(class_weighted_log_probs(seg, cls)[0, :, 0, 0].numpy(), np.log(expected), rtol=1e-6)


def test_a_rejected_class_cannot_take_pixels():
    seg = torch.zeros(1, 2, 4, 4)
    seg[:, 1] = 5.0                                          # the lesion channel wins every pixel on its own
    assert (class_weighted_probs(seg, torch.tensor([[10.0]])).argmax(1) == 1).all()
    assert (class_weighted_probs(seg, torch.tensor([[-20.0]])).argmax(1) == 0).all()
    with pytest.raises(ValueError, match="one channel more"):
        class_weighted_log_probs(seg, torch.zeros(1, 2))


@pytest.mark.parametrize("depth", [10, 50])
def test_pslnet_shapes_parts_and_trace(depth):
    torch.manual_seed(0)
    net = PSLNet(depth, num_classes=2, decoder_channels=16).eval()
    x = torch.rand(2, 1, 64, 96)
    seg, cls = net(x, return_parts=True)
    assert seg.shape == (2, 3, 64, 96) and cls.shape == (2, 2)
    probs = net(x)
    torch.testing.assert_close(probs, class_weighted_probs(seg, cls))
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 64, 96))
    traced = torch.jit.trace(net, x, check_trace=False)
    torch.testing.assert_close(traced(x), probs)
    # the encoder keeps the classification ResNet's names, so its checkpoints' conv1 .. layer4 keys load
    assert {"encoder.conv1.weight", "encoder.layer4.0.conv1.weight", "encoder.fc.weight"} <= set(net.state_dict())
