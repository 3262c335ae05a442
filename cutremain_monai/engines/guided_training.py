"""Guided training step for MONAI's ``SupervisedTrainer``: GAIN_ext ("AGN") and ISNet (Faster-ISNet form).

:class:`GuidedTraining` is the trainer's ``iteration_update`` (and a handler, for its warm-up, band calibration
and loss logging). MONAI's trainer has one loss of one forward; guidance needs a second backward inside the step
(Grad-CAM or LRP with ``create_graph``), a second forward with BatchNorm frozen (GAIN's attention mining), masks
from the batch, gradient clipping and a warm-up, which is what this adds. ``guidance="none"`` runs MONAI's own
step unchanged. The losses are :mod:`cutremain_monai.engines.guidance`; the maps are
:func:`~cutremain_monai.localization.grad_cam.differentiable_grad_cam` (gradients through the activations and the
channel weights) and :func:`~cutremain_monai.localization.lrp.lrp` (LRP-Flex with ``create_graph=True``).

* **GAIN_ext** (../shared/METHODS.md section 2): ``L = L_cl + alpha L_am + omega_e L_e``. The Grad-CAM ``A`` of the
  labelled class (scaled by its maximum) gives ``I* = I - T(A) I``, ``T(A) = sigmoid(omega (A - sigma))``;
  ``I*`` goes through the same network with every BatchNorm in eval mode (running statistics neither used from
  the batch nor updated); ``L_am`` is the mean score (sigmoid, or softmax for multi-class) of the labelled class
  on ``I*`` over images with a positive class (binary: label 1; multi-class: class != 0; multi-label: its
  positive class of highest logit); ``L_e`` is the mean squared error between ``A`` and the mask over images that
  have one.
* **ISNet** (section 1): one LRP map per image, so the cost does not grow with the number of classes:
  ``"selective"`` explains ``eta_c = log(p_c + e_s) - log(1 - p_c + e_s)`` (softmax ``p``, ``c`` the lowest logit,
  as the Faster-ISNet code does; with a single logit ``eta`` is the logit itself, the sigmoid's log-odds);
  ``"stochastic"`` explains the top logit with probability 0.5, otherwise a uniformly drawn other class;
  ``"sum"`` explains the sum of the logits (multi-label outputs such as the six Brixia zones, where a softmax
  over the outputs means nothing).
  ``L = (1 - P) L_cl + P L_H``; ``L_H`` (GWRP background score, hybrid foreground band) over images with a mask.
  The band ``[C1, C2]`` is calibrated from the map totals ``sum |R|`` of the last warm-up epoch (Faster ISNet's
  ``returnCut``) unless given. The ISNet step runs in float32 with autocast off; gradients are clipped (norm 1 by
  default). At inference an ISNet-trained model is the plain network.

Networks with more inputs than the image (COVID severity: ``network(image, lung_mask, zones)``, from a 4-tuple
``prepare_batch``) get them in every forward; ``explain_kwargs`` (``{"logits": True}``) makes the LRP forward return
logits where the network's own output is a probability, and ``pred_from_logits="sigmoid"`` turns them back into
what the loss takes. The ISNet network is made LRP-ready in place on its first guided step (ReLUs non-in-place,
one per use; no weights change).

Images without a mask contribute only their classification loss. A loss that is not finite stops the run with a
``FloatingPointError`` naming the epoch, the iteration and the terms. The loss terms of every iteration are in
``engine.state.output`` (``loss_cl``, ``loss_am``, ``loss_e``, ``loss_heatmap``), logged every ``log_interval``
iterations, averaged over the epoch so far in ``engine.state.metrics`` (``guidance_*``: the epoch means when
MONAI's ``MLFlowHandler`` logs the epoch), and kept per iteration in :attr:`GuidedTraining.history` for
:class:`~cutremain_monai.handlers.MLflowRegistry` to log with their steps.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from cutremain_monai.constants import BOX_MASK
from cutremain_monai.engines.guidance import choose_band, gain_erase, isnet_heatmap_loss
from cutremain_monai.engines.methods import GUIDANCES, check_guidance
from cutremain_monai.handlers.utils import key_metric_trackers
from cutremain_monai.localization.grad_cam import differentiable_grad_cam
from cutremain_monai.localization.lrp import WithInputs, lrp, make_lrp_ready

__all__ = ["GuidedTraining", "GuidedValidationLoss", "frozen_batchnorm", "detached_batch_statistics", "selective_objective", "stochastic_targets", "labelled_class"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def frozen_batchnorm(model: torch.nn.Module):
    """Every BatchNorm in eval mode inside (running statistics used, not updated); modes restored after."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in bns]
    for m in bns:
        m.eval()
    try:
        yield model
    finally:
        for m, flag in zip(bns, modes):
            m.train(flag)


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


def _detached_forward(bn: torch.nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm in train mode normalising with the batch's statistics taken as constants (running statistics updated
    as ``nn.BatchNorm`` does): per image an affine map, so one image's output has no gradient through the others'.
    Written as one ``x * a + c`` (``a = gamma / sigma``, ``c = beta - mean a``; statistics in one pass): the same
    values and gradients as ``(x - mean) / sigma * gamma + beta`` with three fewer full-size operations in the
    forward and in both backward passes of the ISNet step (A/B on a quiet 2-core machine, ResNet-18, batch 16,
    224 px: 3.18 s against 3.23 s per step, 1.5%)."""
    dims = [0, *range(2, x.ndim)]
    var, mean = torch.var_mean(x.detach().float(), dims, correction=0)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            n = x.numel() / x.shape[1]
            bn.running_mean.mul_(1 - momentum).add_(momentum * mean)
            bn.running_var.mul_(1 - momentum).add_(momentum * var * n / max(n - 1, 1))
    shape = [1, -1] + [1] * (x.ndim - 2)
    scale = torch.rsqrt(var + bn.eps)
    if bn.affine:
        a = bn.weight * scale
        c = bn.bias - mean * a
    else:
        a, c = scale, -mean * scale
    # a and c stay float32, so with a float16 / bfloat16 x (GAIN under AMP) the output is float32, as the
    # multiplication by the float32 weight made it before, and the per-channel sums of the weight and bias
    # gradients over the batch are float32 sums (in float16 they overflow at 65504)
    return torch.addcmul(c.view(shape), x, a.view(shape))


@contextlib.contextmanager
def detached_batch_statistics(model: torch.nn.Module):
    """Inside, every BatchNorm in train mode normalises with its batch's mean and variance detached from the graph
    (what ISNet's LRP-Block does when it fuses BatchNorm in training). Why: with the statistics in the graph, an
    image's LRP map (a gradient) also flows through the other images of the batch, and a guided network learns
    to satisfy the heatmap loss through the batch statistics, which eval mode does not have: measured on the
    shortcut test, training heatmap loss 1.4 against 3.0 on validation in eval mode. Eval-mode modules are left
    as they are; forwards restored on exit."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.forward = (lambda x, _m=m: _detached_forward(_m, x) if _m.training else type(_m).forward(_m, x))
    try:
        yield model
    finally:
        for m in bns:
            del m.forward


def selective_objective(eps: float = 0.01):
    """ISNet's selective map: ``logits (B, K) -> eta_c (B,)`` with ``c`` the lowest logit of each image; for
    ``K = 1`` the logit itself (the log-odds of the sigmoid)."""

    def objective(logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == 1:
            return logits[:, 0]
        p = torch.softmax(logits, dim=1)
        c = logits.detach().argmin(dim=1, keepdim=True)
        pc = p.gather(1, c)[:, 0]
        return torch.log(pc + eps) - torch.log(1 - pc + eps)

    return objective


def stochastic_targets(logits: torch.Tensor, rng: np.random.Generator) -> list[int]:
    """One class per image: the top logit with probability 0.5, else a uniformly drawn other class."""
    b, k = logits.shape
    top = logits.detach().argmax(dim=1).tolist()
    if k == 1:
        return [0] * b
    out = []
    for t in top:
        if rng.random() < 0.5:
            out.append(int(t))
        else:
            other = int(rng.integers(k - 1))
            out.append(other + (other >= t))
    return out


def labelled_class(label: torch.Tensor, logits: torch.Tensor, label_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(class per image (B,), positive (B,) bool)``: the class whose Grad-CAM GAIN trains, and whether the image
    has a positive (non-normal) class. Binary: the logit, positive when the label is > 0.5; multi-class: the
    labelled class (argmax of a soft label), positive when != 0; multi-label: the positive class with the highest
    logit (the top logit when none is positive)."""
    b = logits.shape[0]
    if label_mode == "binary":
        return torch.zeros(b, dtype=torch.long, device=logits.device), label.reshape(b, -1)[:, 0] > 0.5
    if label_mode == "multiclass":
        c = label.argmax(dim=1) if label.is_floating_point() and label.ndim == 2 else label.reshape(-1).long()
        return c, c != 0
    pos = label.reshape(b, -1) > 0.5
    scored = torch.where(pos, logits.detach(), torch.full_like(logits, -math.inf))
    has = pos.any(dim=1)
    c = torch.where(has, scored.argmax(dim=1), logits.detach().argmax(dim=1))
    return c, has


def _score(logits: torch.Tensor, classes: torch.Tensor, label_mode: str) -> torch.Tensor:
    probs = torch.softmax(logits.float(), 1) if label_mode == "multiclass" else torch.sigmoid(logits.float())
    return probs.gather(1, classes.view(-1, 1))[:, 0]


class GuidedTraining:
    """Args:
        guidance: ``"none"`` (MONAI's step), ``"gain"`` or ``"isnet"``.
        label_mode: ``"binary"`` | ``"multiclass"`` | ``"multilabel"`` (which score GAIN mines).
        warmup_epochs: plain epochs before the guidance losses start (ISNet calibrates its band in the last one).
        mask_key: batch key of the binary masks ``(B, 1, H, W)`` (``box_mask``, or ``lung_mask``).
        layer: GAIN's Grad-CAM layer.
        gain_sigma, gain_omega, gain_alpha, gain_omega_e: GAIN's soft-mask threshold and sharpness, and the weights
            of ``L_am`` and ``L_e``.
        isnet_p: ``P`` of ``(1 - P) L_cl + P L_H``. isnet_variant: ``"selective"`` | ``"stochastic"`` | ``"sum"``.
        isnet_band: ``(C1, C2)``; ``None`` calibrates it (needs ``warmup_epochs >= 1``).
        isnet_epsilon: LRP epsilon. isnet_decay, isnet_e, isnet_w1, isnet_w2, isnet_foreground: the heatmap loss
            (GWRP decay ``d``, ``E``, background / foreground weights, ``"hybrid"`` or ``"l2"``).
        isnet_bounds: ``(low, high)`` of the input for the z^B rule (images in [0, 1] here).
        clip_grad_norm: gradient clipping of guided steps (None: off).
        balance: ``None`` (one gradient of the total loss, as the references step) or ``k >= 0``: the guidance
            term's gradient and the classification term's are taken apart, and the guidance one is scaled down to a
            norm of at most ``max(k ||g_cl||, 1)`` before they are added (:meth:`_balanced_backward`). Why: ISNet's
            heatmap-loss gradient is ~50 times the classification loss's here, so a step clipped at norm 1 (the
            references') gives the classifier ~2% of its length, and an unclipped one is the heatmap term's alone.
        log_interval: iterations between log lines of the loss terms.
        seed: the stochastic variant's draws.
        explain_kwargs: keyword arguments of the network's forward in the LRP pass (``{"logits": True}`` for
            :class:`~cutremain_monai.networks.SeverityViT`, whose plain output is probabilities).
        pred_from_logits: ``None`` (the loss takes the logits) or ``"sigmoid"`` (it takes their sigmoid).
        restart: after the warm-up, go back to the weights and optimizer state of epoch 1 (the ISNet references
            calibrate C1, C2 on a throw-away network and train the guided one from scratch with the heatmap loss
            from its first step: a network that has converged on a shortcut in plain epochs starts the guidance
            having to unlearn it). The warm-up then only calibrates; the optimizer's momentum goes back to its start,
            its learning rates stay where the schedule has them.
        batchnorm: ``"detached"`` (BatchNorm in the guided forward normalises with the batch statistics as
            constants: :func:`detached_batch_statistics`) or ``"batch"`` (autograd through them).
        supported: the guidance values the bundle offers (a bundle whose network GAIN cannot take says so at once).
        evaluator, key_metric_saver: the validation evaluator and its best-model ``CheckpointSaver`` (or a list of
            them: ``model.pt`` and the other rule's best): when the guided
            epochs start, their best score is forgotten, so the "best" model is a guided one and never a warm-up
            (plain) epoch's, which a validation set with the same shortcut as training would otherwise prefer.
    """

    def __init__(self, guidance: str = "none", label_mode: str = "binary", warmup_epochs: int = 5,
                 mask_key: str = BOX_MASK, layer: str = "layer3", gain_sigma: float = 0.5, gain_omega: float = 10.0,
                 gain_alpha: float = 1.0, gain_omega_e: float = 10.0, isnet_p: float = 0.7,
                 isnet_variant: str = "selective", isnet_band=None, isnet_epsilon: float = 0.01,
                 isnet_decay: float = 0.0, isnet_e: float = 1.0, isnet_w1: float = 1.0, isnet_w2: float = 1.0,
                 isnet_foreground: str = "hybrid", isnet_bounds=(0.0, 1.0), clip_grad_norm: float | None = 1.0,
                 log_interval: int = 10, seed: int = 0, evaluator=None, key_metric_saver=None,
                 explain_kwargs: dict | None = None, pred_from_logits: str | None = None, supported=GUIDANCES,
                 restart: bool = False, batchnorm: str = "detached", balance: float | None = None):
        check_guidance(guidance, tuple(supported))
        if label_mode not in ("binary", "multiclass", "multilabel"):
            raise ValueError(f"label_mode must be binary, multiclass or multilabel, got {label_mode!r}")
        if isnet_variant not in ("selective", "stochastic", "sum"):
            raise ValueError(f"isnet_variant must be 'selective', 'stochastic' or 'sum', got {isnet_variant!r}")
        if pred_from_logits not in (None, "sigmoid"):
            raise ValueError(f"pred_from_logits must be None or 'sigmoid', got {pred_from_logits!r}")
        if not 0 <= isnet_p <= 1:
            raise ValueError(f"isnet_p must be in [0, 1], got {isnet_p}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if guidance == "isnet" and isnet_band is None and warmup_epochs < 1:
            raise ValueError("guidance 'isnet' calibrates C1, C2 in the last warm-up epoch: set warmup_epochs >= 1 or give isnet_band [C1, C2]")
        self.guidance = guidance
        self.label_mode = label_mode
        self.warmup_epochs = int(warmup_epochs)
        self.mask_key = mask_key
        self.layer = layer
        self.gain = dict(sigma=gain_sigma, omega=gain_omega, alpha=gain_alpha, omega_e=gain_omega_e)
        self.isnet_p = float(isnet_p)
        self.isnet_variant = isnet_variant
        self.band: tuple[float, float] | None = None if isnet_band is None else (float(isnet_band[0]), float(isnet_band[1]))
        self.isnet_epsilon = isnet_epsilon
        self.loss_kwargs = dict(decay=isnet_decay, e=isnet_e, w1=isnet_w1, w2=isnet_w2, mode=isnet_foreground)
        self.bounds = None if isnet_bounds is None else tuple(isnet_bounds)
        self.clip_grad_norm = clip_grad_norm
        self.log_interval = max(1, int(log_interval))
        self._rng = np.random.default_rng(seed)
        self._totals: list[float] = []
        self._epoch_terms: dict[str, list[float]] = {}  # term -> [sum, count] over the epoch so far
        self.history: list[tuple[str, float, int]] = []  # (metric, value, iteration)
        self.evaluator = evaluator
        self.key_metric_saver = key_metric_saver
        self.explain_kwargs = dict(explain_kwargs or {})
        self.pred_from_logits = pred_from_logits
        self._lrp_ready: set[int] = set()
        self.restart = bool(restart)
        self._seed = seed
        self.reset_validation_draws()
        if batchnorm not in ("detached", "batch"):
            raise ValueError(f"batchnorm must be 'detached' or 'batch', got {batchnorm!r}")
        self.batchnorm = batchnorm
        self._initial: dict | None = None
        if balance is not None and not balance >= 0:
            raise ValueError(f"balance must be None or >= 0, got {balance}")
        self.balance = None if balance is None else float(balance)
        self._parts: tuple | None = None  # (weighted classification term, weighted guidance term) of the last loss

    # ---- state (saved with the checkpoint, so a resumed run keeps its band) ----
    def state_dict(self) -> dict:
        return {"band": None if self.band is None else list(self.band), "rng": self._rng.bit_generator.state,
                "initial": self._initial}

    def load_state_dict(self, state: dict) -> None:
        self._initial = state.get("initial")
        band = state.get("band")
        if band is not None:
            self.band = (float(band[0]), float(band[1]))
        if state.get("rng"):
            self._rng.bit_generator.state = state["rng"]

    # ---- handler part ----
    def attach(self, engine: Engine) -> None:
        if self.guidance == "none" or engine.has_event_handler(self._epoch_completed, Events.EPOCH_COMPLETED):
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_started(self, engine: Engine) -> None:
        self._epoch_terms = {}
        if self.restart and self.warmup_epochs and engine.state.epoch == 1:
            # the weights and optimizer state the guided epochs start from (kept in state_dict until used)
            self._initial = {"network": {k: v.detach().cpu().clone() for k, v in _unwrap(engine.network).state_dict().items()},
                             "optimizer": copy.deepcopy(engine.optimizer.state_dict())}
        if self.warmup_epochs and engine.state.epoch == self.warmup_epochs + 1:
            if self.restart:
                self._restart(engine)
            self._forget_best()
        if self._calibrating(engine):
            self._totals = []

    def _epoch_completed(self, engine: Engine) -> None:
        if self._calibrating(engine):
            totals = self._gather(self._totals)
            if len(totals) < 2:
                raise ValueError(f"ISNet calibration: epoch {engine.state.epoch} saw {len(totals)} image(s) with a "
                                 f"'{self.mask_key}'; the band needs at least 2 (give isnet_band [C1, C2] instead)")
            self.band = choose_band(totals)
            logger.info("ISNet band from %d heatmap totals of epoch %d: C1 = %.4g, C2 = %.4g", len(totals),
                        engine.state.epoch, *self.band)
            engine.state.metrics["isnet_c1"], engine.state.metrics["isnet_c2"] = self.band

    def _restart(self, engine: Engine) -> None:
        if self._initial is None:
            raise RuntimeError(f"guidance restart at epoch {engine.state.epoch}: the initial weights were not kept (a run "
                               "resumed from a checkpoint written before this version); set guidance_restart false")
        _unwrap(engine.network).load_state_dict(self._initial["network"])
        rates = [g["lr"] for g in engine.optimizer.param_groups]  # the schedule's present rates stay
        engine.optimizer.load_state_dict(self._initial["optimizer"])
        for g, lr in zip(engine.optimizer.param_groups, rates):
            g["lr"] = lr
        self._initial = None
        logger.info("guided epochs start from the initial weights: the %d warm-up epoch(s) only calibrated the band",
                    self.warmup_epochs)

    def _forget_best(self) -> None:
        if self.evaluator is not None:
            self.evaluator.state.best_metric = -1
            self.evaluator.state.best_metric_epoch = -1
        ckpts = key_metric_trackers(self.key_metric_saver)
        for ckpt in ckpts:
            ckpt.reset()
        if ckpts:
            logger.info("guided epochs start: the best model is chosen among them (warm-up checkpoints no longer compete)")

    @staticmethod
    def _gather(values: list) -> list:
        """All ranks' values, concatenated (DDP): the band's totals, the validation loss's sums."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            out: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(out, list(values))
            return [v for part in out for v in part]
        return list(values)

    def active(self, engine: Engine) -> bool:
        return self.guidance != "none" and engine.state.epoch > self.warmup_epochs

    def _calibrating(self, engine: Engine) -> bool:
        return self.guidance == "isnet" and self.band is None and engine.state.epoch == self.warmup_epochs

    # ---- the step ----
    def _prepare(self, engine: Engine, batchdata):
        """``(image, label, mask or None, extra network args, extra network kwargs)``."""
        prep = engine.prepare_batch
        if hasattr(prep, "prepare"):
            d = prep.prepare(batchdata, engine.state.device, engine.non_blocking, mask_key=self.mask_key, **engine.to_kwargs)
            return d[prep.image_key], d[prep.label_key], d.get("mask"), (), {}
        batch = prep(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        x, y = batch[:2]
        args, kwargs = (tuple(batch[2]), dict(batch[3])) if len(batch) == 4 else ((), {})
        mask = batchdata.get(self.mask_key) if isinstance(batchdata, dict) else None
        return x, y, None if mask is None else torch.as_tensor(mask).to(x.device), args, kwargs

    def _masks(self, x, mask):
        """``(x, binary mask (B, 1, H, W), has_mask (B,) bool)``; zeros where the batch has no mask."""
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        b = x.shape[0]
        if mask is None:
            return x, torch.zeros((b, 1, *x.shape[2:]), device=x.device), torch.zeros(b, dtype=torch.bool, device=x.device)
        mask = mask.as_tensor() if hasattr(mask, "as_tensor") else mask  # (on x's device: _prepare moved it)
        mask = (mask.float() > 0.5).float()
        if mask.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"'{self.mask_key}' is {tuple(mask.shape[-2:])} but the images are {tuple(x.shape[-2:])}: resize the masks with the images")
        return x, mask, mask.flatten(1).amax(1) > 0

    def batch_with_masks(self, engine: Engine, batchdata):
        """``(image, label, binary mask (B, 1, H, W), has_mask (B,), extra network args, extra kwargs)`` of a batch,
        prepared as the guided step prepares it (for validation metrics that use the guidance's masks)."""
        x, y, mask, args, kwargs = self._prepare(engine, batchdata)
        x, mask, has_mask = self._masks(x, mask)
        return x, y, mask, has_mask, args, kwargs

    def guided_at(self, epoch: int) -> bool:
        """Whether the guidance term is in the loss of ``epoch`` (after the warm-up, and for ISNet once it has a band)."""
        return self.guidance != "none" and epoch > self.warmup_epochs and (self.guidance != "isnet" or self.band is not None)

    def validation_terms(self, engine: Engine, batchdata, loss_function) -> dict[str, float]:
        """The training objective of ``epoch`` on a validation batch, network as it is (the evaluator's eval mode:
        BatchNorm on running statistics): ``{"loss": total, "loss_cl": ..., guidance terms...}`` as floats. The
        classification loss alone before the guided epochs; no graph is kept."""
        if not self.guided_at(engine.state.epoch):  # the evaluator's own forward (its output before post-processing)
            out = engine.state.output
            with torch.no_grad():
                loss = loss_function(out[Keys.PRED].float(), out[Keys.LABEL]).mean()
            return {"loss": float(loss), "loss_cl": float(loss)}
        # the module itself under DDP: a forward of the wrapper with gradients on would add a buffer broadcast to
        # the evaluator's next forward, on the ranks that have one more batch than the others
        network = _unwrap(engine.network)
        was_training = network.training
        network.eval()  # (MONAI's evaluator fires its iteration events outside its eval-mode context)
        try:
            return self._validation_terms(engine, network, batchdata, loss_function)
        finally:
            network.train(was_training)

    def reset_validation_draws(self) -> None:
        """The stochastic maps' draws of validation start again (the same every validation, apart from training's)."""
        self._val_rng = np.random.default_rng([self._seed, 1])

    def _validation_terms(self, engine: Engine, network, batchdata, loss_function) -> dict[str, float]:
        x, y, mask, has_mask, args, kwargs = self.batch_with_masks(engine, batchdata)
        terms: dict = {}
        rng, self._rng = self._rng, self._val_rng  # stochastic maps: validation draws do not move training's
        try:
            with torch.enable_grad():
                if self.guidance == "gain":
                    loss, _ = self._gain_loss(loss_function, network, x, y, mask, has_mask, terms)
                else:
                    loss, _ = self._isnet_loss(loss_function, network, x, y, mask, has_mask, terms, False, args, kwargs,
                                               epoch=engine.state.epoch, create_graph=False)
        finally:
            self._val_rng, self._rng = self._rng, rng
            self._parts = None  # (no validation graph kept)
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}

    def __call__(self, engine: Engine, batchdata) -> dict:
        calibrate = self._calibrating(engine)
        if self.guidance == "none" or not (self.active(engine) or calibrate):
            return engine._iteration(engine, batchdata)
        x, y, mask, has_mask, args, kwargs = self.batch_with_masks(engine, batchdata)
        engine.state.output = {Keys.IMAGE: x, Keys.LABEL: y}
        network = engine.network
        network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_amp = bool(engine.amp and engine.scaler is not None)
        clip = None if calibrate else self.clip_grad_norm  # the calibration epoch is a plain epoch
        terms: dict[str, torch.Tensor] = {}
        balanced = self.balance is not None and not calibrate
        ddp = isinstance(network, torch.nn.parallel.DistributedDataParallel)
        # balanced: two gradients of one forward, averaged over the ranks by hand (DDP's reducer expects one backward)
        sync = network.no_sync() if balanced and ddp else contextlib.nullcontext()
        with sync:
            loss, logits = self._loss(engine, network, x, y, mask, has_mask, terms, calibrate, args, kwargs, use_amp)
            engine.state.output[Keys.PRED] = logits
            engine.state.output[Keys.LOSS] = loss
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)  # MONAI's iteration events, as its own step fires them
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            if balanced:
                # GAIN's losses under AMP are half precision: differentiated at the scaler's scale, then unscaled
                loss_scale = float(engine.scaler.get_scale()) if use_amp else 1.0
                finite = self._balanced_backward(network, terms, ddp, loss_scale)
                if clip:
                    torch.nn.utils.clip_grad_norm_(network.parameters(), clip)
                engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
                if finite:
                    engine.optimizer.step()
                if use_amp:  # a scale that overflowed is halved and the step skipped, as GradScaler does
                    engine.scaler.update(loss_scale if finite else loss_scale / 2)
            elif use_amp:
                engine.scaler.scale(loss).backward()
                if clip:
                    engine.scaler.unscale_(engine.optimizer)
                    torch.nn.utils.clip_grad_norm_(network.parameters(), clip)
                engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
            else:
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(network.parameters(), clip)
                engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
                engine.optimizer.step()
        self._parts = None  # (the graph of this step goes with it)
        self._record(engine, loss, terms)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # (MONAI decollates the output on this event)
        return engine.state.output

    def _loss(self, engine, network, x, y, mask, has_mask, terms, calibrate, args, kwargs, use_amp):
        """``(total loss, logits)`` of the guided objective; a non-finite total raises with the terms."""
        try:
            if self.guidance == "gain":
                if args or kwargs:
                    raise ValueError("guidance 'gain' takes a network of the image alone (its Grad-CAM and erased "
                                     "forward); this network also takes " + f"{len(args) + len(kwargs)} more input(s)")
                with torch.autocast("cuda", **engine.amp_kwargs) if use_amp else contextlib.nullcontext():
                    loss, logits = self._gain_loss(engine.loss_function, network, x, y, mask, has_mask, terms)
            else:
                loss, logits = self._isnet_loss(engine.loss_function, network, x, y, mask, has_mask, terms, calibrate,
                                                args, kwargs, epoch=engine.state.epoch)
            if not torch.isfinite(loss):
                raise FloatingPointError("the total is not finite")
        except FloatingPointError as err:
            values = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in terms.items())
            raise FloatingPointError(f"{self.guidance} loss is not finite at epoch {engine.state.epoch}, iteration "
                                     f"{engine.state.iteration} ({values}): {err}; check the images, lower the learning "
                                     "rate or raise isnet_decay") from err
        return loss, logits

    def _balanced_backward(self, network, terms: dict, ddp: bool, loss_scale: float = 1.0) -> bool:
        """``p.grad = g_cl + s g_guide`` with ``s = min(1, max(k ||g_cl||, 1) / ||g_guide||)``: the gradients of the
        weighted classification term and of the weighted guidance term, from one forward (two backward passes; the
        first keeps the graph), averaged over the DDP ranks before the norms are taken. The scale is logged as
        ``guide_scale``. What it adds to plain clipping: the classifier's share of a step no longer depends on how
        large the guidance gradient happens to be, and the guidance term still moves the weights at least as far
        as a step clipped at norm 1 would. ``loss_scale``: the terms are differentiated multiplied by it (AMP) and
        the gradients divided by it; returns whether they are finite (if not, every gradient is left at zero)."""
        cl, guide = self._parts
        params = [p for p in network.parameters() if p.requires_grad]
        flat = []
        for i, term in enumerate((cl, guide)):
            grads = torch.autograd.grad(term.float() * loss_scale, params, retain_graph=i == 0, allow_unused=True)
            flat.append(torch.cat([(g.float() if g is not None else torch.zeros_like(p, dtype=torch.float32)).reshape(-1)
                                   for g, p in zip(grads, params)]))
        both = torch.stack(flat) / loss_scale
        if ddp and torch.distributed.is_initialized():
            torch.distributed.all_reduce(both)
            both /= torch.distributed.get_world_size()
        if not bool(torch.isfinite(both).all()):
            for p in params:
                p.grad = torch.zeros_like(p)
            return False
        g_cl, g_guide = both[0], both[1]
        n_cl, n_guide = g_cl.norm(), g_guide.norm()
        scale = torch.clamp(torch.clamp(self.balance * n_cl, min=1.0) / (n_guide + 1e-12), max=1.0)
        total = g_cl + scale * g_guide
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = total[offset:offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        terms["guide_scale"] = scale.detach()
        return True

    def _record(self, engine: Engine, loss: torch.Tensor, terms: dict) -> None:
        it = engine.state.iteration
        values = {k: float(v.detach()) for k, v in terms.items()}
        engine.state.output[Keys.LOSS] = loss.detach()
        for k, v in values.items():
            engine.state.output[k] = v
            acc = self._epoch_terms.setdefault(k, [0.0, 0])
            acc[0] += v
            acc[1] += 1
            self.history.append((f"train_{k}", v, it))
            # the epoch's running mean: complete when EPOCH_COMPLETED fires, whatever the handlers' order
            engine.state.metrics[f"guidance_{k}"] = acc[0] / acc[1]
        if self.guidance == "isnet" and self.band is not None:
            engine.state.metrics["isnet_c1"], engine.state.metrics["isnet_c2"] = self.band
        if values and (it % self.log_interval == 0 or it == 1):
            logger.info("epoch %d iteration %d %s loss %.4f (%s)", engine.state.epoch, it, self.guidance, float(loss.detach()),
                        ", ".join(f"{k} {v:.4f}" for k, v in values.items()))

    @staticmethod
    def _layer_name(network: torch.nn.Module, layer: str) -> str:
        return f"module.{layer}" if isinstance(network, torch.nn.parallel.DistributedDataParallel) else layer

    def _gain_loss(self, loss_function, network, x, y, mask, has_mask, terms):
        g = self.gain
        with self._batchnorm(network):
            maps, logits = differentiable_grad_cam(network, x, target=lambda lg: labelled_class(y, lg, self.label_mode)[0],
                                                   layer=self._layer_name(network, self.layer))
        classes, positive = labelled_class(y, logits, self.label_mode)
        l_cl = loss_function(logits, y).mean()
        erased = gain_erase(x, maps, g["sigma"], g["omega"])
        with frozen_batchnorm(network):
            logits_e = network(erased)
        zero = logits_e.sum() * 0.0
        mined = positive & has_mask  # images without a mask: classification loss only
        l_am = _score(logits_e, classes, self.label_mode)[mined].mean() if mined.any() else zero
        l_e = ((maps[has_mask].float() - mask[has_mask]) ** 2).mean() if has_mask.any() else zero
        terms.update(loss_cl=l_cl, loss_am=l_am, loss_e=l_e)
        self._parts = (l_cl, g["alpha"] * l_am + g["omega_e"] * l_e)
        return self._parts[0] + self._parts[1], logits

    def _isnet_objective(self):
        if self.isnet_variant == "selective":
            return selective_objective()
        if self.isnet_variant == "sum":
            return lambda logits: logits.sum(dim=1)

        def stochastic(logits: torch.Tensor) -> torch.Tensor:
            t = torch.as_tensor(stochastic_targets(logits, self._rng), device=logits.device)
            return logits.gather(1, t.view(-1, 1))[:, 0]

        return stochastic

    def _batchnorm(self, network):
        return detached_batch_statistics(network) if self.batchnorm == "detached" else contextlib.nullcontext()

    def _make_lrp_ready(self, network) -> None:
        if id(network) not in self._lrp_ready:
            make_lrp_ready(network, inplace=True)
            self._lrp_ready.add(id(network))

    def _isnet_loss(self, loss_function, network, x, y, mask, has_mask, terms, calibrate, args=(), kwargs=None,
                    epoch: int = 0, create_graph: bool = True):
        self._make_lrp_ready(network)
        kwargs = {**(kwargs or {}), **self.explain_kwargs}
        explained = WithInputs(network, args, kwargs) if (args or kwargs) else network
        with torch.autocast(device_type=x.device.type, enabled=False), self._batchnorm(network):
            heat, logits = lrp(explained, x.float(), objective=self._isnet_objective(), epsilon=self.isnet_epsilon,
                               bounds=self.bounds, create_graph=create_graph and not calibrate, return_logits=True)
            if self.pred_from_logits == "sigmoid":
                logits = torch.sigmoid(logits)  # what the loss and the output take (the severity model's probabilities)
            l_cl = loss_function(logits, y).mean()
            terms["loss_cl"] = l_cl
            if calibrate:  # the last plain epoch: collect the maps' totals for the band, train on L_cl alone
                self._totals.extend(heat.detach().abs().flatten(1).sum(1)[has_mask].tolist())  # maps the loss will see
                return l_cl, logits
            if self.band is None:
                raise ValueError(f"ISNet has no band [C1, C2] at epoch {epoch}: it is calibrated in epoch "
                                 f"{self.warmup_epochs} (the last warm-up epoch); give isnet_band, or resume from a checkpoint saved after it")
            l_h = isnet_heatmap_loss(heat, mask, *self.band, has_mask=has_mask, **self.loss_kwargs)
            terms["loss_heatmap"] = l_h
            self._parts = ((1 - self.isnet_p) * l_cl, self.isnet_p * l_h)
            return self._parts[0] + self._parts[1], logits


class GuidedValidationLoss:
    """The validation metric a guided run's best model is chosen by: the training objective on the validation
    section (classification loss plus the guidance term on the validation masks, with the same weights), averaged
    over the images, in ``engine.state.metrics[name]`` at the evaluator's ``EPOCH_COMPLETED``; attach it before
    the ``CheckpointSaver`` that reads it. Guided epochs only count the guidance term; before them (and without
    guidance) it is the classification loss. Why: a validation section that carries the training set's shortcut
    rewards reading it (AUC 1.0 from the tag alone); the guided objective does not (the ISNet references select by
    a validation loss that includes the heatmap loss). What it adds to MONAI: evaluators run without gradients,
    and Grad-CAM and LRP need them; the term is computed in the evaluator's eval mode with gradients on.
    """

    def __init__(self, guided: GuidedTraining, loss_function, name: str = "val_loss"):
        self.guided = guided
        self.loss_function = loss_function
        self.name = name
        self._sums: dict[str, float] = {}
        self._count = 0

    def attach(self, engine: Engine) -> None:
        if self.guided.evaluator is None:  # the evaluator whose best score the guided epochs forget
            self.guided.evaluator = engine
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        # the collated batch, before MONAI decollates it (on MODEL_COMPLETED)
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _reset(self, engine: Engine) -> None:
        self._sums, self._count = {}, 0
        self.guided.reset_validation_draws()

    def _iteration(self, engine: Engine) -> None:
        batch = engine.state.batch
        terms = self.guided.validation_terms(engine, batch, self.loss_function)
        b = len(batch[Keys.IMAGE]) if isinstance(batch, dict) else len(batch[0])
        for k, v in terms.items():
            self._sums[k] = self._sums.get(k, 0.0) + v * b
        self._count += b

    def _completed(self, engine: Engine) -> None:
        parts = GuidedTraining._gather([(self._count, dict(self._sums))])  # every rank's (a rank may have no batch)
        count = sum(c for c, _ in parts)
        sums: dict[str, float] = {}
        for _, part in parts:
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v
        engine.state.metrics[self.name] = sums.get("loss", 0.0) / count if count else float("nan")
        for k, v in sums.items():
            if k != "loss":
                engine.state.metrics[f"val_{k}"] = v / count
