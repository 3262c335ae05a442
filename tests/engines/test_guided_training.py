"""The guided training step (GAIN_ext, ISNet) inside MONAI's SupervisedTrainer, on a small ResNet."""

import contextlib
import math

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from cutremain_monai.engines.guided_training import (GuidedTraining, frozen_batchnorm, labelled_class, selective_objective,
                                                     stochastic_targets)
from cutremain_monai.engines.prepare_batch import BoxBatchPrepare
from cutremain_monai.networks import resnet


def _batches(n=4, b=4, size=32, seed=0, nan=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = torch.rand(b, 1, size, size, generator=g)
        if nan:
            img[0, 0, 0, 0] = float("nan")
        mask = torch.zeros(b, 1, size, size)
        mask[:, :, 8:20, 8:20] = 1
        mask[-1] = 0  # one image per batch without a mask
        out.append({"image": img, "label": torch.tensor([1, 0, 1, 0][:b]), "box_mask": mask})
    return out


def _trainer(step, epochs=2, data=None, label_mode="binary", classes=1, seed=0):
    torch.manual_seed(seed)
    net = resnet(18, num_classes=classes)
    loss = torch.nn.CrossEntropyLoss() if label_mode == "multiclass" else torch.nn.BCEWithLogitsLoss()
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=epochs, train_data_loader=data or _batches(),
                                network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9),
                                loss_function=loss, prepare_batch=BoxBatchPrepare(label_mode=label_mode),
                                iteration_update=step, train_handlers=[step] if step else [])
    return trainer, net


def test_selective_objective_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    p = torch.softmax(logits, 1)[0, 2]  # lowest logit: class 2
    eta = math.log(float(p) + 0.01) - math.log(1 - float(p) + 0.01)
    assert float(selective_objective(0.01)(logits)[0]) == pytest.approx(eta, rel=1e-6)
    one = torch.tensor([[0.7], [-2.0]])
    assert torch.equal(selective_objective()(one), one[:, 0])  # one logit: its log-odds


def test_stochastic_targets_half_top_rest_uniform():
    rng = np.random.default_rng(0)
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]]).repeat(4000, 1)
    t = np.array(stochastic_targets(logits, rng))
    share = np.bincount(t, minlength=4) / len(t)
    assert share[1] == pytest.approx(0.5, abs=0.03)
    assert share[[0, 2, 3]] == pytest.approx([1 / 6] * 3, abs=0.03)
    assert stochastic_targets(torch.zeros(3, 1), rng) == [0, 0, 0]


def test_labelled_class_rules():
    logits = torch.tensor([[0.1, 3.0, 2.0], [1.0, 0.0, 0.5]])
    c, pos = labelled_class(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), logits, "multilabel")
    assert c.tolist() == [2, 0] and pos.tolist() == [True, False]  # positive class; top logit when none
    c, pos = labelled_class(torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]), logits, "multilabel")
    assert c.tolist() == [1, 0]  # the positive class with the highest logit (row 2: 1.0 > 0.5)
    c, pos = labelled_class(torch.tensor([2, 0]), logits, "multiclass")
    assert c.tolist() == [2, 0] and pos.tolist() == [True, False]
    c, pos = labelled_class(torch.tensor([[1.0], [0.0]]), logits[:, :1], "binary")
    assert c.tolist() == [0, 0] and pos.tolist() == [True, False]


def test_frozen_batchnorm_keeps_running_stats_and_modes():
    net = resnet(18)
    net.train()
    before = net.bn1.running_mean.clone()
    with frozen_batchnorm(net):
        assert not net.bn1.training and net.layer1.training
        net(torch.rand(2, 1, 32, 32))
    assert torch.equal(net.bn1.running_mean, before) and net.bn1.training
    net(torch.rand(2, 1, 32, 32))
    assert not torch.equal(net.bn1.running_mean, before)


def test_isnet_calibrates_band_then_trains_with_heatmap_loss():
    step = GuidedTraining("isnet", warmup_epochs=1, log_interval=1)
    trainer, _ = _trainer(step, epochs=2)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append((e.state.epoch, dict(e.state.output[0]))))  # decollated per image
    trainer.run()
    c1, c2 = step.band
    assert 0 < c1 <= c2 <= 25 * c1
    assert "loss_heatmap" not in seen[0][1]  # epoch 1: plain warm-up (MONAI's step)
    active = [o for ep, o in seen if ep == 2]
    assert all(o["loss_heatmap"] >= 0 and o["loss_cl"] > 0 for o in active)
    for o in active:  # L = (1 - P) L_cl + P L_H
        assert float(o["loss"]) == pytest.approx(0.3 * o["loss_cl"] + 0.7 * o["loss_heatmap"], rel=1e-5)
    assert trainer.state.metrics["guidance_loss_heatmap"] == pytest.approx(np.mean([o["loss_heatmap"] for o in active]))
    assert step.history[-1][2] == trainer.state.iteration and step.history[-1][0].startswith("train_loss_")
    assert step.state_dict()["band"] == [c1, c2] and step.state_dict()["rng"]
    other = GuidedTraining("isnet", warmup_epochs=1)
    other.load_state_dict(step.state_dict())
    assert other.band == (c1, c2)


def _isnet_grad(p: float, band=(1.0, 25.0), batchnorm="detached"):
    step = GuidedTraining("isnet", warmup_epochs=0, isnet_band=band, isnet_p=p, clip_grad_norm=None, batchnorm=batchnorm)
    trainer, net = _trainer(step, epochs=1, data=_batches(n=1))
    trainer.state.epoch, trainer.state.iteration = 1, 1  # one step by hand: the weights stay those of the seed
    step(trainer, _batches(n=1)[0])
    return net.conv1.weight.grad.clone()


def test_isnet_gradient_reaches_weights_and_depends_on_p():
    from cutremain_monai.engines.guided_training import detached_batch_statistics

    g0, g5, g9 = _isnet_grad(0.0), _isnet_grad(0.5), _isnet_grad(0.9)
    assert g5.abs().sum() > 0 and not torch.allclose(g5, g9) and not torch.allclose(g0, g5)
    # P = 0: the plain classification gradient (same weights, same batch, one forward), BatchNorm statistics
    # detached by default, in the graph with batchnorm="batch"
    for batchnorm in ("detached", "batch"):
        torch.manual_seed(0)
        net = resnet(18)
        batch = _batches(n=1)[0]
        with detached_batch_statistics(net) if batchnorm == "detached" else contextlib.nullcontext():
            torch.nn.BCEWithLogitsLoss()(net(batch["image"]), batch["label"].float().view(-1, 1)).backward()
        g = g0 if batchnorm == "detached" else _isnet_grad(0.0, batchnorm="batch")
        assert torch.allclose(g, net.conv1.weight.grad, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(g0, _isnet_grad(0.0, batchnorm="batch"), rtol=1e-4, atol=1e-7)


def test_gain_step_terms_and_total():
    step = GuidedTraining("gain", warmup_epochs=0, log_interval=1)
    trainer, _ = _trainer(step, epochs=1)
    outs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outs.append(dict(e.state.output[0])))
    trainer.run()
    for o in outs:
        assert 0 <= o["loss_am"] <= 1 and o["loss_e"] >= 0
        assert float(o["loss"]) == pytest.approx(o["loss_cl"] + o["loss_am"] + 10 * o["loss_e"], rel=1e-5)
    assert set(k for k in trainer.state.metrics if k.startswith("guidance_")) == {"guidance_loss_cl", "guidance_loss_am", "guidance_loss_e"}


def test_gain_multiclass_and_isnet_stochastic_multiclass_run():
    data = [{**b, "label": torch.tensor([2, 0, 1, 0])} for b in _batches(n=2)]
    for step in (GuidedTraining("gain", label_mode="multiclass", warmup_epochs=0),
                 GuidedTraining("isnet", label_mode="multiclass", warmup_epochs=0, isnet_band=(1.0, 25.0), isnet_variant="stochastic")):
        trainer, _ = _trainer(step, epochs=1, data=data, label_mode="multiclass", classes=3)
        trainer.run()
        assert np.isfinite(trainer.state.metrics["guidance_loss_cl"])


def test_non_finite_loss_stops_with_clear_error():
    step = GuidedTraining("isnet", warmup_epochs=0, isnet_band=(1.0, 25.0))
    trainer, _ = _trainer(step, epochs=1, data=_batches(n=1, nan=True))
    with pytest.raises(FloatingPointError, match=r"isnet loss is not finite at epoch 1, iteration 1 \(loss_cl"):
        trainer.run()


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="warmup_epochs >= 1 or give isnet_band"):
        GuidedTraining("isnet", warmup_epochs=0)
    with pytest.raises(ValueError, match="guidance must be one of none, gain, isnet"):
        GuidedTraining("gradcam")
    with pytest.raises(ValueError, match="isnet_variant"):
        GuidedTraining("isnet", isnet_variant="all")


def test_none_is_monai_step():
    step = GuidedTraining("none")
    t1, n1 = _trainer(step, epochs=1)
    t1.run()
    t2, n2 = _trainer(None, epochs=1)
    t2.run()
    for a, b in zip(n1.parameters(), n2.parameters()):
        assert torch.equal(a, b)


def test_best_model_is_chosen_among_guided_epochs():
    class Saver:
        resets = []

        class _Ckpt:
            def reset(self):
                Saver.resets.append(True)

        _key_metric_checkpoint = _Ckpt()

    class Evaluator:
        class state:
            best_metric, best_metric_epoch = 1.0, 1  # a warm-up epoch's (shortcut-fed) best

    step = GuidedTraining("gain", warmup_epochs=1, evaluator=Evaluator, key_metric_saver=Saver())
    trainer, _ = _trainer(step, epochs=2)
    starts = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: starts.append((e.state.epoch, len(Saver.resets))))
    trainer.run()
    assert starts == [(1, 0), (2, 1)] and len(Saver.resets) == 1  # forgotten once, when the guided epochs start
    assert Evaluator.state.best_metric == -1 and Evaluator.state.best_metric_epoch == -1


def test_images_without_a_mask_get_only_the_classification_loss():
    data = [{**b, "box_mask": torch.zeros_like(b["box_mask"])} for b in _batches(n=1)]
    for guidance in ("gain", "isnet"):
        step = GuidedTraining(guidance, warmup_epochs=0, isnet_band=(1.0, 25.0))
        trainer, _ = _trainer(step, epochs=1, data=data)
        outs = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outs.append(dict(e.state.output[0])))
        trainer.run()
        o = outs[0]
        if guidance == "gain":
            assert o["loss_am"] == 0 and o["loss_e"] == 0 and float(o["loss"]) == pytest.approx(o["loss_cl"], rel=1e-6)
        else:
            assert o["loss_heatmap"] == 0 and float(o["loss"]) == pytest.approx(0.3 * o["loss_cl"], rel=1e-6)


def test_calibration_without_masked_images_says_so():
    data = [{**b, "box_mask": torch.zeros_like(b["box_mask"])} for b in _batches(n=1)]
    step = GuidedTraining("isnet", warmup_epochs=1)
    trainer, _ = _trainer(step, epochs=1, data=data)
    with pytest.raises(ValueError, match="saw 0 image\\(s\\) with a 'box_mask'; the band needs at least 2"):
        trainer.run()


def _severity_step(p: float, band=(1.0, 1e4)):
    """One ISNet step of a small SeverityViT (three inputs, probabilities out) with its lung masks."""
    from cutremain_monai.engines.severity import SeverityPrepareBatch, ZoneBCELoss
    from cutremain_monai.networks.severity_vit import SMALL, SeverityViT
    from cutremain_monai.transforms.lung_zones import split_lung_zones

    torch.manual_seed(0)
    net = SeverityViT(img_size=32, return_map=False, **SMALL)
    lungs = torch.zeros(2, 1, 32, 32)
    lungs[..., 4:28, 4:14] = 1
    lungs[..., 4:28, 18:28] = 1
    zones = torch.from_numpy(split_lung_zones(lungs[0, 0].numpy()))[None, None].repeat(2, 1, 1, 1).to(torch.uint8)
    batch = {"image": torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)), "lung_mask": lungs,
             "zones": zones, "zone_scores": torch.tensor([[0, 1, 2, 0, 0, 3], [1, 1, 0, 0, 2, 0]])}
    step = GuidedTraining("isnet", warmup_epochs=0, isnet_band=band, isnet_p=p, mask_key="lung_mask", isnet_variant="sum",
                          isnet_bounds=None, explain_kwargs={"logits": True}, pred_from_logits="sigmoid", clip_grad_norm=None)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch], network=net,
                                optimizer=torch.optim.SGD(net.parameters(), lr=0.0), loss_function=ZoneBCELoss(),
                                prepare_batch=SeverityPrepareBatch(), iteration_update=step)
    trainer.state.epoch, trainer.state.iteration = 1, 1
    out = step(trainer, batch)  # (decollated: one dict per image)
    return out[0], torch.stack([o["pred"] for o in out]), net, batch


def test_isnet_on_the_severity_model_with_lung_masks():
    out0, _, net0, batch = _severity_step(0.0)
    out7, _, net7, _ = _severity_step(0.7)
    assert out7["loss_heatmap"] > 0 and float(out7["loss"]) == pytest.approx(0.3 * out7["loss_cl"] + 0.7 * out7["loss_heatmap"], rel=1e-5)
    for name in ("features.conv0.weight", "blocks.0.attn.qkv.weight", "head.0.1.weight"):
        g0, g7 = net0.get_parameter(name).grad, net7.get_parameter(name).grad
        assert g7.abs().sum() > 0 and not torch.allclose(g0, g7), name
    # P = 0: the plain zone-BCE gradient of the model's own (probability) forward
    from cutremain_monai.engines.severity import SeverityPrepareBatch, ZoneBCELoss

    from cutremain_monai.engines.guided_training import detached_batch_statistics

    x, y, (mask, zones), _ = SeverityPrepareBatch()(batch)
    net0.zero_grad()
    with detached_batch_statistics(net0):  # (the guided step's BatchNorm)
        ZoneBCELoss()(net0(x, mask, zones), y).backward()
    g = net0.features.conv0.weight.grad.clone()
    _, pred, net0b, _ = _severity_step(0.0)
    assert torch.allclose(net0b.features.conv0.weight.grad, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))  # (float32 order)
    assert torch.allclose(pred, net0b(x, mask, zones), atol=1e-6)  # the output is probabilities


@pytest.mark.parametrize("guidance", ["isnet", "gain"])
def test_validation_loss_is_the_training_objective_in_eval_mode(guidance):
    """GuidedValidationLoss: in guided epochs the evaluator's val_loss is the training objective (L_cl plus the
    guidance term on the validation masks) of the network in eval mode, averaged over images; before them, L_cl."""
    from monai.engines import SupervisedEvaluator

    from cutremain_monai.engines.guidance import gain_erase, isnet_heatmap_loss
    from cutremain_monai.engines.guided_training import GuidedValidationLoss
    from cutremain_monai.localization.grad_cam import differentiable_grad_cam
    from cutremain_monai.localization.lrp import lrp, make_lrp_ready

    step = GuidedTraining(guidance, warmup_epochs=1, isnet_band=(0.5, 5.0))
    trainer, net = _trainer(step, epochs=1)
    trainer.run()  # one plain epoch: BatchNorm has running statistics
    loss = torch.nn.BCEWithLogitsLoss()
    val = _batches(n=2, b=4, seed=3)
    handler = GuidedValidationLoss(step, loss)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=val, network=net,
                                    prepare_batch=BoxBatchPrepare(), val_handlers=[handler])
    assert step.evaluator is evaluator  # the guided epochs forget this evaluator's best
    evaluator.run(1)  # the warm-up epoch: classification loss only
    net.eval()
    with torch.no_grad():
        plain = np.mean([float(loss(net(b["image"]), b["label"].float().view(-1, 1))) for b in val])
    assert evaluator.state.metrics["val_loss"] == pytest.approx(plain, rel=1e-5)
    evaluator.run(2)  # a guided epoch
    expected, terms = [], []
    for b in val:
        x, y, m = b["image"], b["label"].float().view(-1, 1), b["box_mask"]
        has = m.flatten(1).amax(1) > 0
        net.eval()
        if guidance == "isnet":
            make_lrp_ready(net, inplace=True)
            heat, logits = lrp(net, x, objective=selective_objective(), bounds=(0.0, 1.0), return_logits=True)
            l_h = float(isnet_heatmap_loss(heat.detach(), m, 0.5, 5.0, has_mask=has))
            expected.append(0.3 * float(loss(logits, y)) + 0.7 * l_h)
            terms.append(l_h)
        else:
            maps, logits = differentiable_grad_cam(net, x, target=0, layer="layer3")
            erased = torch.sigmoid(net(gain_erase(x, maps, 0.5, 10.0)))[:, 0]
            l_am = float(erased[(y[:, 0] > 0.5) & has].mean())
            l_e = float(((maps[has] - m[has]) ** 2).mean())
            expected.append(float(loss(logits, y)) + l_am + 10.0 * l_e)
            terms.append(l_e)
    assert evaluator.state.metrics["val_loss"] == pytest.approx(np.mean(expected), rel=1e-4)
    term = "val_loss_heatmap" if guidance == "isnet" else "val_loss_e"
    assert evaluator.state.metrics[term] == pytest.approx(np.mean(terms), rel=1e-4)



def test_restart_calibrates_on_the_warmup_then_trains_from_the_initial_weights():
    """restart=True (the ISNet references' throw-away calibration network): the warm-up epoch calibrates the band
    and trains, then the guided epochs start again from the initial weights and optimizer state; the snapshot is
    in the checkpoint state until used, so a run resumed during the warm-up restarts the same way."""
    step = GuidedTraining("isnet", warmup_epochs=1, restart=True)
    trainer, net = _trainer(step, epochs=2)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    seen = {}

    def at_epoch(engine):
        seen[engine.state.epoch] = ({k: v.clone() for k, v in engine.network.state_dict().items()}, dict(engine.optimizer.state),
                                    step.state_dict()["initial"])

    trainer.add_event_handler(Events.EPOCH_STARTED, at_epoch)  # after the step's own EPOCH_STARTED handler
    lr_at_guided_start = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.optimizer.param_groups[0].update(lr=0.001))
    trainer.add_event_handler(Events.EPOCH_STARTED(once=2), lambda e: lr_at_guided_start.append(e.optimizer.param_groups[0]["lr"]))
    trainer.run()
    assert lr_at_guided_start == [0.001]  # a schedule's drop during the warm-up stays (momentum does not)
    weights1, _, snap1 = seen[1]
    weights2, momentum2, snap2 = seen[2]
    assert step.band is not None and snap1 is not None and snap2 is None  # calibrated; snapshot used and dropped
    assert all(torch.equal(weights2[k], initial[k]) for k in initial if "running" not in k and "num_batches" not in k)
    assert not momentum2  # no momentum carried over from the warm-up
    assert not all(torch.equal(net.state_dict()[k], initial[k]) for k in initial)  # the guided epoch trained
    # resumed from a warm-up checkpoint: the snapshot comes back with the state and is used
    other = GuidedTraining("isnet", warmup_epochs=1, restart=True)
    other.load_state_dict({"band": [1.0, 2.0], "rng": None, "initial": snap1})
    trainer2, net2 = _trainer(other, epochs=2)
    trainer2.state.epoch = 1  # as CheckpointLoader leaves it after epoch 1
    trainer2.state.max_epochs = 2
    trainer2.state.epoch_length = 4
    trainer2.state.iteration = 4
    seen.clear()
    trainer2.add_event_handler(Events.EPOCH_STARTED, at_epoch)
    trainer2.run()
    assert list(seen) == [2]
    assert all(torch.equal(seen[2][0][k], snap1["network"][k]) for k in snap1["network"] if "running" not in k and "num_batches" not in k)
    with pytest.raises(RuntimeError, match="initial weights were not kept"):
        late = GuidedTraining("isnet", warmup_epochs=1, restart=True, isnet_band=(1.0, 2.0))
        t3, _ = _trainer(late, epochs=2)
        t3.state.epoch, t3.state.max_epochs, t3.state.epoch_length, t3.state.iteration = 1, 2, 4, 4
        t3.run()


def test_detached_batch_statistics_is_batchnorm_without_the_cross_image_gradient():
    """Same outputs and running statistics as nn.BatchNorm2d in train mode, but an image's output has no gradient
    with respect to the other images of the batch (with autograd through the statistics it has)."""
    from cutremain_monai.engines.guided_training import detached_batch_statistics

    torch.manual_seed(0)
    bn, ref = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    ref.load_state_dict(bn.state_dict())
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    model = torch.nn.Sequential(bn)
    with detached_batch_statistics(model):
        y = model(x)
        (g,) = torch.autograd.grad(y[0].sum(), x)
    y_ref = ref(x)
    (g_ref,) = torch.autograd.grad(y_ref[0].sum(), x)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(bn.running_mean, ref.running_mean) and torch.allclose(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 1
    assert g[1:].abs().max() == 0 and g_ref[1:].abs().max() > 1e-3  # no gradient through the other images
    assert "forward" not in vars(bn)  # restored
    bn.eval()
    with detached_batch_statistics(model):
        assert torch.allclose(model(x), ref.eval()(x), atol=1e-5)  # eval mode: running statistics, as before
    bn.train()
    # the gradients (and their own gradients, the ISNet step's double backward) with respect to the image and the
    # affine parameters are those of torch's batch_norm with the batch statistics passed in as constants
    var, mean = torch.var_mean(x.detach(), (0, 2, 3), correction=0)
    w2 = torch.nn.Parameter(bn.weight.detach().clone())
    b2 = torch.nn.Parameter(bn.bias.detach().clone())
    with detached_batch_statistics(model):
        grads = torch.autograd.grad((model(x) ** 3).sum(), (x, bn.weight, bn.bias), create_graph=True)
    second = torch.autograd.grad(sum((g_ ** 2).sum() for g_ in grads), (x, bn.weight))
    y_const = torch.nn.functional.batch_norm(x, mean, var, w2, b2, training=False, eps=bn.eps)
    grads_ref = torch.autograd.grad((y_const ** 3).sum(), (x, w2, b2), create_graph=True)
    second_ref = torch.autograd.grad(sum((g_ ** 2).sum() for g_ in grads_ref), (x, w2))
    for a, b in zip((*grads, *second), (*grads_ref, *second_ref)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    # a float16 input (GAIN's forward under AMP): the bias gradient sums 2 x 8 x 64 x 64 = 65536 per channel, more
    # than float16 holds; it must come out finite and exact
    x16 = torch.randn(8, 3, 64, 64).half().requires_grad_(True)
    with detached_batch_statistics(model):
        y16 = model(x16)
    (g_bias,) = torch.autograd.grad((2 * y16.float()).sum(), bn.bias)
    assert torch.isfinite(g_bias).all() and torch.equal(g_bias, torch.full((3,), 65536.0))


def _all_grads(step, batch=None):
    trainer, net = _trainer(step, epochs=1, data=_batches(n=1))
    trainer.state.epoch, trainer.state.iteration = 1, 1  # one step by hand from the seed's weights
    step(trainer, batch or _batches(n=1)[0])
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()]), trainer


@pytest.mark.parametrize("guidance", ["isnet", "gain"])
def test_balanced_step_scales_the_guidance_gradient_to_k_times_the_classification_one(guidance):
    # the two gradients taken apart by steps that weigh one term only (same seed, same batch, same weights)
    kw = dict(isnet_band=(1.0, 25.0), clip_grad_norm=None, warmup_epochs=0)
    if guidance == "isnet":
        p = 0.7
        g_cl = (1 - p) * _all_grads(GuidedTraining("isnet", isnet_p=0.0, **kw))[0]
        g_guide = p * _all_grads(GuidedTraining("isnet", isnet_p=1.0, **kw))[0]
        make = lambda k: GuidedTraining("isnet", isnet_p=p, balance=k, **kw)  # noqa: E731
    else:
        g_cl = _all_grads(GuidedTraining("gain", gain_alpha=0.0, gain_omega_e=0.0, **kw))[0]
        g_guide = _all_grads(GuidedTraining("gain", **kw))[0] - g_cl
        make = lambda k: GuidedTraining("gain", balance=k, **kw)  # noqa: E731
    n_cl, n_guide = float(g_cl.norm()), float(g_guide.norm())
    if guidance == "isnet":  # the case the balance is for: the heatmap gradient dominates
        assert n_guide > 2 * max(n_cl, 1.0)
    scales = []
    for k in (0.0, 0.5, 1e9):
        got, trainer = _all_grads(make(k))
        s = min(1.0, max(k * n_cl, 1.0) / n_guide)
        scales.append(s)
        assert trainer.state.output[0]["guide_scale"] == pytest.approx(s, rel=1e-4)
        assert torch.allclose(got, g_cl + s * g_guide, rtol=1e-3, atol=1e-6 * float(g_guide.abs().max()))
    assert scales[0] < scales[1] < 1 == scales[2]  # each case taken: scaled to norm 1, to k |g_cl|, not scaled
    assert float(got.norm()) == pytest.approx(float((g_cl + g_guide).norm()), rel=1e-4)  # k huge: the plain total
    with pytest.raises(ValueError, match="balance must be None or >= 0"):
        GuidedTraining("isnet", balance=-1.0, isnet_band=(1.0, 25.0))


def _balanced_ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks, different batches
        net = torch.nn.parallel.DistributedDataParallel(resnet(18))
        step = GuidedTraining("isnet", warmup_epochs=0, isnet_band=(1.0, 25.0), clip_grad_norm=None, balance=1.0)
        trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=_batches(n=2, seed=rank),
                                    network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9),
                                    loss_function=torch.nn.BCEWithLogitsLoss(), prepare_batch=BoxBatchPrepare(),
                                    iteration_update=step, train_handlers=[step])
        trainer.run()
        torch.save(torch.cat([p.detach().reshape(-1) for p in net.module.parameters()]), os.path.join(out, f"{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_balanced_step_under_ddp_keeps_the_ranks_identical(tmp_path):
    """The balanced step takes its two gradients outside DDP's reducer and averages them by hand: after four steps
    on different batches, both ranks hold the same weights, and they moved."""
    from tests.conftest import free_port

    torch.multiprocessing.spawn(_balanced_ddp_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    w0, w1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    torch.manual_seed(0)
    start = torch.cat([p.detach().reshape(-1) for p in resnet(18).parameters()])
    assert torch.equal(w0, w1) and not torch.allclose(w0, start)
