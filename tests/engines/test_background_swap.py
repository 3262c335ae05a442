"""Validation AUC with the background swapped (val_auc_swap): composites by hand, the choice of partners, and the
metric in MONAI's evaluator for a network that reads a tag outside the mask and one that reads the mask's inside."""

import numpy as np
import pytest
import torch
from monai.engines import SupervisedEvaluator
from sklearn.metrics import roc_auc_score

from cutremain_monai.engines.background_swap import BackgroundSwapAUC, swap_background
from cutremain_monai.engines.guided_training import GuidedTraining
from cutremain_monai.engines.prepare_batch import BoxBatchPrepare


def test_swap_background_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    partner = -torch.ones(1, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 0:2, 0:2] = 1
    pmask = torch.zeros(1, 1, 4, 4)
    pmask[..., 3, 3] = 1  # the partner's own foreground area stays x's: its lesion never enters
    out = swap_background(x, mask, partner, pmask)
    expected = -torch.ones(4, 4)
    expected[0:2, 0:2] = torch.tensor([[0.0, 1.0], [4.0, 5.0]])
    expected[3, 3] = 15.0
    assert torch.equal(out[0, 0], expected)


def _rows(labels):
    return torch.tensor(labels, dtype=torch.float32).view(-1, 1)


def test_partners_other_label_in_batch_then_bank_then_same_label():
    h = BackgroundSwapAUC(GuidedTraining("none"), bank_size=2)
    x = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2).clone()
    mask = torch.ones(3, 1, 2, 2)
    px, _, chosen, other = h.partners(x, mask, _rows([1, 0, 0]))
    # 0 -> the next with another label (1); 1 -> cyclically 2 (same), 0 (other): 0; 2 -> 0
    assert px[:, 0, 0, 0].tolist() == [1.0, 0.0, 0.0] and chosen.all() and other.all()
    # a batch of one label, empty bank: the next image of the batch, flagged as same-label
    px, _, chosen, other = h.partners(x, mask, _rows([1, 1, 1]))
    assert px[:, 0, 0, 0].tolist() == [1.0, 2.0, 0.0] and chosen.all() and not other.any()
    # with a bank: its newest image with another label
    h._bank = [(torch.full((1, 2, 2), 7.0), mask[0], torch.tensor([0.0])),
               (torch.full((1, 2, 2), 8.0), mask[0], torch.tensor([1.0]))]
    px, _, chosen, other = h.partners(x[:1], mask[:1], _rows([1]))
    assert px[0, 0, 0, 0] == 7.0 and other.all()
    # one image, empty bank: no partner
    h._bank = []
    _, _, chosen, _ = h.partners(x[:1], mask[:1], _rows([1]))
    assert not chosen.any()


class _Reader(torch.nn.Module):
    """A 'network' whose logit is the mean of a fixed pixel region (the tag corner, or the lesion in the mask)."""

    def __init__(self, where):
        super().__init__()
        self.where = where
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        r = x[..., 0:3, 0:3] if self.where == "tag" else x[..., 10:14, 10:14]
        return self.scale * r.mean(dim=(1, 2, 3)).view(-1, 1)


def _sorted_validation(size=24, n=12, b=4, seed=0):
    """Sorted by label (negatives first), as validation sections often are; positives carry a bright tag in the
    corner (outside the mask) and a fainter 'lesion' in the mask, negatives neither; noise everywhere."""
    g = torch.Generator().manual_seed(seed)
    labels = [0] * (n // 2) + [1] * (n - n // 2)
    batches = []
    for start in range(0, n, b):
        lab = torch.tensor(labels[start:start + b])
        img = 0.3 * torch.rand(len(lab), 1, size, size, generator=g)
        img[lab == 1, :, 0:3, 0:3] += 1.0
        img[lab == 1, :, 10:14, 10:14] += 0.5 + 0.2 * torch.rand(int((lab == 1).sum()), 1, 1, 1, generator=g)
        mask = torch.zeros(len(lab), 1, size, size)
        mask[:, :, 8:16, 8:16] = 1
        batches.append({"image": img, "label": lab, "box_mask": mask})
    return batches


@pytest.mark.parametrize("where", ["tag", "lesion"])
def test_val_auc_swap_falls_for_a_tag_reader_only(where):
    val = _sorted_validation()
    net = _Reader(where)
    handler = BackgroundSwapAUC(GuidedTraining("none"))
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=val, network=net,
                                    prepare_batch=BoxBatchPrepare(), val_handlers=[handler])
    # by hand: each image with the pixels outside both masks of its partner (sorted sections: the first negative
    # batch has no positive yet and pairs within itself; later, the newest bank image of another label)
    bank = []

    def by_hand():
        scores, labels = [], []
        for b in val:
            x, y = b["image"], b["label"]
            for i in range(len(y)):
                j = next((k for k in [(i + d) % len(y) for d in range(1, len(y))] if y[k] != y[i]), None)
                if j is not None:
                    partner = x[j]
                else:
                    partner = next((bx for bx, by in reversed(bank) if by != y[i]), x[(i + 1) % len(y)])
                comp = torch.where(b["box_mask"][i] > 0.5, x[i], partner)
                scores.append(float(net(comp[None]).detach()))
                labels.append(int(y[i]))
            bank[:] = (bank + [(x[i], int(y[i])) for i in range(len(y))])[-16:]
        return roc_auc_score(labels, scores)

    evaluator.run(1)
    assert evaluator.state.metrics["val_auc_swap"] == pytest.approx(by_hand())
    assert handler.paired_same == 4 and handler.paired_other == 8  # the first (all-negative) batch pairs within itself
    evaluator.run(2)  # the bank carries over: the first batch now pairs with the last epoch's positives
    assert evaluator.state.metrics["val_auc_swap"] == pytest.approx(by_hand())
    assert handler.paired_same == 0 and handler.paired_other == 12
    if where == "tag":
        assert evaluator.state.metrics["val_auc_swap"] < 0.1  # it follows the partner's label
    else:
        assert evaluator.state.metrics["val_auc_swap"] == 1.0
    # the plain AUC of both readers is 1: only the swapped one tells them apart
    plain = [float(v) for b in val for v in net(b["image"]).detach().view(-1)]
    assert roc_auc_score([int(v) for b in val for v in b["label"]], plain) == 1.0


def test_val_auc_swap_is_computed_in_eval_mode_and_leaves_the_mode():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(2, 1))
    val = _sorted_validation()
    handler = BackgroundSwapAUC(GuidedTraining("none"))
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=val, network=net,
                                    prepare_batch=BoxBatchPrepare(), val_handlers=[handler])
    stats = net[1].running_mean.clone()
    net.train()
    evaluator.run(1)
    assert torch.equal(net[1].running_mean, stats)  # eval mode: running statistics untouched by the composites
    assert np.isfinite(evaluator.state.metrics["val_auc_swap"])


def test_disabled_attaches_nothing():
    handler = BackgroundSwapAUC(GuidedTraining("none"), enabled=False)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=_sorted_validation(),
                                    network=_Reader("tag"), prepare_batch=BoxBatchPrepare(), val_handlers=[handler])
    evaluator.run(1)
    assert "val_auc_swap" not in evaluator.state.metrics
