"""PreciseBatchNorm: BatchNorm statistics recomputed from training batches with the weights fixed, against a hand
computation and torch's update_bn; off with 0 batches; modes and momenta restored; in a MONAI trainer before
validation."""

import copy

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from cutremain_monai.handlers import PreciseBatchNorm, recompute_batchnorm_statistics


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 1))


def _batches(n=3, b=5):
    g = torch.Generator().manual_seed(1)
    return [torch.rand(b, 1, 8, 8, generator=g) * (i + 1) + i for i in range(n)]  # each batch its own level


def test_statistics_by_hand_and_as_update_bn():
    net, batches = _net().eval(), _batches()
    net[1].running_mean.fill_(7.0)  # stale statistics
    net[1].running_var.fill_(0.01)
    with torch.no_grad():
        outs = [net[0](x) for x in batches]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)  # nn.BatchNorm keeps the unbiased one
    reference = copy.deepcopy(net)
    assert recompute_batchnorm_statistics(net, iter(batches)) == 3
    torch.testing.assert_close(net[1].running_mean, mean)
    torch.testing.assert_close(net[1].running_var, var)
    assert not net.training and not net[1].training and net[1].momentum == 0.1  # modes and momentum restored
    torch.optim.swa_utils.update_bn(batches, reference)
    torch.testing.assert_close(net[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(net[1].running_var, reference[1].running_var)
    # the eval-mode output now normalises the conv output with these statistics
    x = batches[0]
    with torch.no_grad():
        expected = (net[0](x) - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + net[1].eps)
        torch.testing.assert_close(net[1](net[0](x)), expected * net[1].weight.view(1, -1, 1, 1) + net[1].bias.view(1, -1, 1, 1))


def test_modules_keep_their_own_modes():
    net = _net().train()
    net[1].eval()  # one module in eval mode inside a training network comes back in eval mode
    recompute_batchnorm_statistics(net, iter(_batches()))
    assert net.training and net[0].training and not net[1].training


def test_no_batches_or_no_batchnorm_changes_nothing():
    net = _net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert recompute_batchnorm_statistics(net, iter([])) == 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()) and net.training
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    assert recompute_batchnorm_statistics(plain, iter(_batches())) == 0
    with pytest.raises(ValueError, match="num_batches must be 0 \\(off\\) or more, got -1"):
        PreciseBatchNorm(-1)


def test_in_a_trainer_before_validation():
    """The handler runs at EPOCH_COMPLETED, before a handler attached after it, on the first num_batches batches the
    trainer's prepare_batch gives; with lr 0 the weights are those of the batches' forward."""
    net = _net()
    images = torch.cat(_batches(4, 4))
    data = [{"image": images[i : i + 4], "label": torch.zeros(4, 1)} for i in range(0, 16, 4)]
    seen = {}
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                                optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
                                loss_function=torch.nn.BCEWithLogitsLoss(),
                                train_handlers=[PreciseBatchNorm(num_batches=2)])
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.update(mean=net[1].running_mean.clone()))
    trainer.run()
    with torch.no_grad():
        mean = torch.stack([net[0](d["image"]).mean((0, 2, 3)) for d in data[:2]]).mean(0)
    torch.testing.assert_close(seen["mean"], mean)
    torch.testing.assert_close(net[1].running_mean, mean)


def _rank(rank, init, out):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        net, batches = _net(), _batches(3)
        mine = batches[:1] if rank == 0 else batches[1:]  # unequal shares: 1 and 2 batches
        n = recompute_batchnorm_statistics(net, iter(mine))
        torch.save({"n": n, "mean": net[1].running_mean, "var": net[1].running_var}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_average_weighted_by_batches(tmp_path):
    """Two gloo ranks with 1 and 2 batches: both end with the average over all 3 batches, as one process would."""
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    single = _net()
    recompute_batchnorm_statistics(single, iter(_batches(3)))
    assert [r["n"] for r in ranks] == [1, 2]
    for r in ranks:
        torch.testing.assert_close(r["mean"], single[1].running_mean)
        torch.testing.assert_close(r["var"], single[1].running_var)
