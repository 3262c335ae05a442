"""Layer-wise relevance propagation (LRP-epsilon, z^B first layer) computed the LRP-Flex way (Faster ISNet).

:func:`lrp` returns one relevance map per explained class, started from the raw logit. It follows LRP-Flex
(../shared/METHODS.md section 1.3): during the explanation's backward pass every ``nn.ReLU`` rescales its gradient
by ``a / (a + epsilon)`` (``a`` its output), ``torch.autograd.grad`` gives ``G`` at the output ``a0`` of the first
ReLU, ``R(a0) = G * a0``, and the z^B rule takes that relevance through the first convolution to the input. Nothing
is detached, so with ``create_graph=True`` the map is differentiable with respect to the weights (the ISNet loss
trains through it).

What this computes, rule by rule (gradient times input through a linear map is LRP-0 of that map):

* **BatchNorm fused into the preceding convolution**: in eval mode the gradient through ``bn(conv(.))`` is the
  fused convolution's transpose, and the ReLU that follows sees the fused pre-activation ``z = bn(conv(a))``, so
  ``a / (a + eps)`` is the epsilon rule of the fused layer, ``z / (z + eps sgn z)``, with the stabiliser on the fused
  value. Checked against zennit with BatchNorm merged by its canonizer (tests/localization/test_lrp.py). In train
  mode the gradient also runs through the batch statistics, which a fused layer does not have: the map is then not
  LRP of a fused network (the LRP-Flex reference behaves the same way).
* ``stabilise="relu"`` (default, the LRP-Flex reference): epsilon only where a ReLU follows. That covers every
  convolution followed by BN and ReLU, and each residual sum of a ResNet (its ReLU stabilises ``y = x1 + x2``, the
  epsilon-sum rule). Layers with no ReLU after them get LRP-0: the convolution (+BN) before each residual sum, the
  downsample branch, the average pool and the final linear layer. Max pooling is winner-takes-all.
* ``stabilise="all"``: also the epsilon rule at the outputs of the BatchNorm, linear and average-pool modules that no
  ReLU consumes directly (before the residual sums, the downsample branch, the pooled features, the logits). With
  BN merged this is zennit's rule set of Epsilon on every convolution and linear layer, Norm with the same epsilon
  on sums and average pools, ZBox first. Convolution outputs are never stabilised themselves: a convolution is
  taken to be followed by BatchNorm or a ReLU, or (DenseNet) to feed a concatenation that later BN + ReLU
  consume, each with its own fused stabiliser.
* **First layer** (``first_rule="zb"``): the first module the input meets must be a convolution, optionally followed
  by BatchNorm, then a ReLU. z^B with ``W`` the BN-fused weight and ``low``/``high`` the input bounds:
  ``z = W x - W+ low - W- high`` (the bias is not in ``z``, as in zennit's ZBox and standard DTD; ISNet's LRP-Block
  keeps part of it), ``s = R(a0) / (z + eps sgn z)``, ``R(x) = x (W^T s) - low (W+^T s) - high (W-^T s)``.
  The borders are zero-padded for the bound terms as well (as zennit does). ``first_rule="epsilon"`` uses the
  epsilon rule there too, i.e. ``x * dq/dx``.

Maps are summed over the input channels and have the input's spatial size: ``(B, K, *spatial)``, ``K`` the number
of classes (``target=None``) or 1. Relevance is conserved up to the biases and the epsilon terms: on a bias-free
network with a tiny epsilon the map sums to the logit.

**Transformers** (the ViT of :class:`~cutremain_monai.networks.SeverityViT`): gradient x input through a softmax,
a LayerNorm or a GELU is not conservative. During the explanation's backward pass (only then) three values are
held constant, the rules of Ali et al. 2022 ("XAI for Transformers: better explanations through conservative
propagation", ICML) and of AttnLRP (Achtibat et al. 2024): the attention weights of each MONAI ``SABlock``
(AH-rule: relevance flows through the values only), the ``1 / std`` of each ``nn.LayerNorm`` (LN-rule: the
centring is linear and is kept) and the gate ``Phi(z)`` of each ``nn.GELU`` written as ``z Phi(z)`` (identity
rule). The forward values are unchanged and the held values keep their graph, so the maps stay differentiable
with respect to every weight (the query and key weights included) and the classification loss sees exact
gradients. Relevance through a bias-free transformer block is then conserved (tested). ``SABlock`` must not use
flash attention (its weights are not exposed).

The network must use ``nn.ReLU`` modules (no functional ReLU), none in place, each called once per forward:
``resnet()`` builds such ResNets, and :func:`make_lrp_ready` converts a MONAI ResNet or DenseNet (copy). ISNet's
DenseNet-121 also adds a ReLU after each transition convolution; that changes the network, so it is not done here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from cutremain_monai.networks.backbones import make_resnet_lrp_ready

__all__ = ["lrp", "make_lrp_ready", "WithInputs", "severity_relevance", "outside_share"]

_BN = nn.modules.batchnorm._BatchNorm
_CONV = nn.modules.conv._ConvNd
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


class _State:
    """Per-call switch: the modified backward applies only while :func:`lrp` takes its own gradients."""

    def __init__(self, epsilon: float) -> None:
        self.epsilon = epsilon
        self.active = False


class _Gate:
    def __init__(self, state: _State) -> None:
        self.state = state
        self.enabled = True


def _stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


class _FlexReLU(torch.autograd.Function):
    """ReLU whose backward is ``g * a / (a + eps)`` while the state is active and the plain ReLU gradient otherwise.

    The backward is written in differentiable operations on the saved input, so a graph built with
    ``create_graph=True`` has exact derivatives; gradients taken later (the classification loss) see a plain ReLU.
    """

    @staticmethod
    def forward(ctx, z, state):
        ctx.state = state
        ctx.save_for_backward(z)
        return z.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        if ctx.state.active and ctx.state.epsilon > 0:
            return _FlexRescale.apply(grad, z, ctx.state.epsilon), None
        return grad * (z > 0).to(grad.dtype), None


class _FlexRescale(torch.autograd.Function):
    """``g * a / (a + eps)`` with ``a = max(z, 0)``, as one node with its derivatives written out (``d/dg = a / (a +
    eps)``, ``d/dz = g eps / (a + eps)^2`` where ``z > 0``): the same values and gradients as the chain of
    elementwise operations, with one saved pair instead of four intermediate tensors (the training step's double
    backward runs through one of these per ReLU)."""

    @staticmethod
    def forward(ctx, grad, z, eps):
        a = z.clamp_min(0)
        denom = a + eps
        ctx.save_for_backward(grad, z)
        ctx.eps = eps
        return grad * a / denom

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gg):
        grad, z = ctx.saved_tensors
        a = z.clamp_min(0)
        denom = a + ctx.eps
        d_grad = gg * a / denom if ctx.needs_input_grad[0] else None
        d_z = gg * grad * (ctx.eps / (denom * denom)) * (z > 0) if ctx.needs_input_grad[1] else None
        return d_grad, d_z, None


class _FlexGate(torch.autograd.Function):
    """Identity whose backward is the epsilon rule's ``g * z / (z + eps sgn z)`` while active and enabled."""

    @staticmethod
    def forward(ctx, z, gate):
        ctx.gate = gate
        ctx.save_for_backward(z)
        return z.clone()

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        gate = ctx.gate
        if gate.state.active and gate.enabled and gate.state.epsilon > 0:
            return grad * (z / _stabilise(z, gate.state.epsilon)), None
        return grad, None


class _HeldInLRP(torch.autograd.Function):
    """Identity whose backward passes no gradient while the explanation's backward runs (a value the rule holds
    constant), and the plain gradient otherwise."""

    @staticmethod
    def forward(ctx, t, state):
        ctx.state = state
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        if ctx.state.active:
            return torch.zeros_like(grad), None
        return grad, None


def _layer_norm_rule(module: nn.LayerNorm, x: torch.Tensor, state: _State) -> torch.Tensor:
    """``module(x)`` recomputed with ``1 / std`` held constant in the explanation (LN-rule)."""
    dims = tuple(range(-len(module.normalized_shape), 0))
    centred = x - x.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(centred.pow(2).mean(dim=dims, keepdim=True) + module.eps)
    y = centred * _HeldInLRP.apply(inv_std, state)
    if module.weight is not None:
        y = y * module.weight
    if module.bias is not None:
        y = y + module.bias
    return y


def _gelu_rule(module: nn.GELU, z: torch.Tensor, state: _State) -> torch.Tensor:
    """``gelu(z) = z Phi(z)`` with the gate ``Phi(z)`` held constant in the explanation (identity rule)."""
    if module.approximate == "tanh":
        gate = 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z.pow(3))))
    else:
        gate = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
    return z * _HeldInLRP.apply(gate, state)


def _attention_blocks(model: nn.Module) -> list[nn.Module]:
    """MONAI ``SABlock`` modules of ``model`` (their ``drop_weights`` dropout receives the attention weights)."""
    from monai.networks.blocks.selfattention import SABlock

    blocks = [m for m in model.modules() if isinstance(m, SABlock)]
    for block in blocks:
        if getattr(block, "use_flash_attention", False):
            raise ValueError("lrp: an SABlock uses flash attention, which does not expose the attention weights the "
                             "AH-rule holds constant; build it with use_flash_attention=False")
    return blocks


def make_lrp_ready(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``inplace=True``: the model itself) that :func:`lrp` accepts.

    ReLUs become non-in-place; MONAI ResNet blocks, which reuse one ReLU, get one per use (no parameter changes, so
    weights and outputs stay the same). MONAI's DenseNet already has one ReLU module per use and only needs the
    first step. Other networks that call a ReLU module twice are rejected by :func:`lrp`.
    """
    if getattr(model, "feature_input_range", None) is not None:
        # the rescaling before the first convolution is not a layer LRP's z^B rule can start from
        raise ValueError("LRP (ISNet, relevance overlays) does not take a SeverityViT with feature_input_range: "
                         "scale the image in the preprocessing instead (e.g. ScaleIntensityRanged) and set the LRP bounds")
    if not inplace:
        model = copy.deepcopy(model)
    return make_resnet_lrp_ready(model)


def _as_bound(value, x: torch.Tensor) -> torch.Tensor:
    """A bound as a tensor broadcastable to ``x``: a scalar, or one value per channel."""
    bound = torch.as_tensor(value, dtype=x.dtype, device=x.device).detach()
    if bound.ndim == 1 and bound.numel() == x.shape[1] and bound.numel() > 1:
        bound = bound.view(1, -1, *([1] * (x.ndim - 2)))
    return bound


def _bn_scale(bn: nn.Module | None, conv_out: torch.Tensor) -> torch.Tensor | None:
    """Per-output-channel factor ``gamma / sigma`` of ``bn`` (running statistics in eval mode, detached batch ones
    in train mode), or None without BatchNorm."""
    if bn is None:
        return None
    if bn.training or bn.running_var is None:
        dims = [0] + list(range(2, conv_out.ndim))
        var = conv_out.detach().var(dim=dims, unbiased=False)
    else:
        var = bn.running_var
    scale = torch.rsqrt(var + bn.eps)
    return bn.weight * scale if bn.weight is not None else scale


def _is_zero(bound: torch.Tensor) -> bool:
    return not bool(torch.count_nonzero(bound))


def _zb_input_relevance(conv, bn, conv_out, x, r0, low, high, epsilon, create_graph):
    """The z^B rule through the (BN-fused) first convolution: relevance at its output ``r0`` -> input relevance.

    ``W x`` of the fused weight is the forward's own convolution output times the BN scale (no second convolution
    of the image when the convolution has no bias). The bound terms ``W+ low`` and ``W- high`` do not depend on
    the image (the bounds are scalars or per channel): each is one batch-1 convolution broadcast over the batch,
    and a bound that is 0 (images in [0, 1]: ``low = 0``) drops its terms. The transposed convolutions ``W^T s``,
    ``W+^T s``, ``W-^T s`` that remain run as one, with the weights stacked along the input channels (2-D
    convolutions with zero padding; other layers take the vector-Jacobian route). Both keep the graph for
    ``create_graph``."""
    scale = _bn_scale(bn, conv_out)
    weight = conv.weight if scale is None else conv.weight * scale.view(-1, *([1] * (conv.weight.ndim - 1)))
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    one = (1, *x.shape[1:])
    if conv.bias is None and conv_out.shape[0] == x.shape[0]:
        z = conv_out if scale is None else conv_out * scale.view(1, -1, *([1] * (conv_out.ndim - 2)))
    else:
        z = conv._conv_forward(x, weight, None)
    parts = [(weight, x)]
    if not _is_zero(low):
        z = z - conv._conv_forward(torch.broadcast_to(low, one), w_pos, None)
        parts.append((w_pos, -low))
    if not _is_zero(high):
        z = z - conv._conv_forward(torch.broadcast_to(high, one), w_neg, None)
        parts.append((w_neg, -high))
    s = r0 / _stabilise(z, epsilon)
    c_in = x.shape[1]
    weights = [w for w, _ in parts]
    if isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        stacked = torch.cat(weights, dim=1)
        c_all = torch.nn.grad.conv2d_input((x.shape[0], len(weights) * c_in, *x.shape[2:]), stacked, s, stride=conv.stride,
                                           padding=conv.padding, dilation=conv.dilation, groups=1)
        cs = [c_all[:, i * c_in : (i + 1) * c_in] for i in range(len(weights))]
    else:  # transposed convolutions as vector-Jacobian products of the (linear) convolution
        probes = [torch.zeros_like(x, requires_grad=True) for _ in weights]
        out = sum((conv._conv_forward(p, w, None) * s).sum() for p, w in zip(probes, weights))
        cs = torch.autograd.grad(out, probes, create_graph=create_graph)
    return sum(factor * c for (_, factor), c in zip(parts, cs))


def _targets(target, batch: int, classes: int) -> list[list[int]]:
    """Index lists, one per backward pass, each with one class per image."""
    if target is None:
        return [[k] * batch for k in range(classes)]
    if isinstance(target, torch.Tensor):
        target = target.tolist()
    if isinstance(target, int):
        target = [target] * batch
    target = [int(t) for t in target]
    if len(target) != batch:
        raise ValueError(f"target: one class per image expected ({batch}), got {len(target)}")
    if any(t < 0 or t >= classes for t in target):
        raise ValueError(f"target: classes must lie in [0, {classes}), got {target}")
    return [target]


def lrp(
    model: nn.Module,
    x: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    epsilon: float = 0.01,
    first_rule: Literal["zb", "epsilon"] = "zb",
    bounds: tuple | None = None,
    create_graph: bool = False,
    stabilise: Literal["relu", "all"] = "relu",
    return_logits: bool = False,
    objective=None,
):
    """LRP-epsilon relevance maps of ``model``'s raw logits at the input, LRP-Flex style (see the module docstring).

    Args:
        model: a ReLU network of ``nn.ReLU`` modules (non-in-place, each called once), with logits ``(B, K)``; put it
            in eval mode for LRP with BatchNorm fused on running statistics.
        x: input ``(B, C, *spatial)``, float32 or float64.
        target: ``None`` explains every class (one backward pass each), an int the same class for every image, a list
            (or tensor) one class per image.
        epsilon: the epsilon of LRP-epsilon (also the z^B stabiliser). ``0`` gives LRP-0 (gradient x input).
        first_rule: ``"zb"`` (z^B at the first convolution) or ``"epsilon"``.
        bounds: ``(low, high)``, the real lowest and highest input values (scalars, or one value per channel), for
            z^B. Default: ``(x.min(), x.max())`` of this batch, which makes the maps depend on the batch; pass the
            bounds of the input space (e.g. those of the normalisation) for batch-independent maps.
        create_graph: keep the graph of the explanation, so the maps can be differentiated w.r.t. the weights.
        stabilise: ``"relu"`` (LRP-Flex: epsilon where a ReLU follows) or ``"all"`` (also at BN / linear / average
            pool outputs that no ReLU consumes: zennit's Epsilon composite).
        return_logits: also return the logits of the same forward pass (differentiable, for a classification loss).
        objective: instead of ``target``, a callable ``logits (B, K) -> (B,)`` whose value is explained (one map per
            image, one backward pass): ISNet's "selective" map explains ``log(p_c + e) - log(1 - p_c + e)``, which
            involves every logit.

    Returns:
        maps ``(B, K, *spatial)`` (``K`` classes for ``target=None``, else 1), summed over the input channels; with
        ``return_logits`` a tuple ``(maps, logits)``.
    """
    if first_rule not in ("zb", "epsilon"):
        raise ValueError(f"first_rule must be 'zb' or 'epsilon', got {first_rule!r}")
    if stabilise not in ("relu", "all"):
        raise ValueError(f"stabilise must be 'relu' or 'all', got {stabilise!r}")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"lrp needs float32 or float64 input (the gradients are rescaled), got {x.dtype}")
    if x.ndim < 3:
        raise ValueError(f"x must be (B, C, *spatial), got shape {tuple(x.shape)}")

    state = _State(float(epsilon))
    x_in = x if x.requires_grad else x.detach().requires_grad_(True)  # so a0 has a graph even with frozen weights
    names = {module: name for name, module in model.named_modules()}
    relu_calls: dict[nn.Module, int] = {}
    gates: dict[int, tuple[torch.Tensor, _Gate]] = {}
    leaf_calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # first leaf calls: (module, input, output)
    first_relu_out: list[torch.Tensor] = []

    def consume(tensor):
        """A ReLU consumes ``tensor``: its stabiliser replaces the gate of the module that produced it."""
        entry = gates.get(id(tensor))
        if entry is not None and entry[0] is tensor:
            entry[1].enabled = False

    def relu_pre(module, args):
        if module.inplace:
            raise ValueError(f"in-place ReLU at {names.get(module, module)!r}: use make_lrp_ready(model) first")
        relu_calls[module] = relu_calls.get(module, 0) + 1
        consume(args[0])

    def relu_post(module, args, output):
        out = _FlexReLU.apply(args[0], state)
        if not first_relu_out:
            first_relu_out.append(out)
        return out

    def gate_post(module, args, output):
        if not isinstance(output, torch.Tensor):
            return None
        gate = _Gate(state)
        out = _FlexGate.apply(output, gate)
        gates[id(out)] = (out, gate)
        return out

    def layer_norm_post(module, args, output):
        return _layer_norm_rule(module, args[0], state)

    def gelu_post(module, args, output):
        return _gelu_rule(module, args[0], state)

    attention_calls: dict[nn.Module, list[int]] = {}

    def attention_pre(module, args):
        attention_calls.setdefault(module, [0, 0])[0] += 1

    def attention_weights_post(block):
        def hook(module, args, output):
            attention_calls.setdefault(block, [0, 0])[1] += 1
            return _HeldInLRP.apply(output, state)

        return hook

    def record(module, args, output):
        if len(leaf_calls) < 3 and args and isinstance(args[0], torch.Tensor):
            leaf_calls.append((module, args[0], output))

    handles = []
    try:
        for module in model.modules():
            if isinstance(module, nn.ReLU):
                handles.append(module.register_forward_pre_hook(relu_pre))
                handles.append(module.register_forward_hook(relu_post))
            elif stabilise == "all" and isinstance(module, (_BN, nn.Linear, *_AVGPOOL)):
                handles.append(module.register_forward_hook(gate_post))
            if isinstance(module, nn.LayerNorm):
                handles.append(module.register_forward_hook(layer_norm_post))
            elif isinstance(module, nn.GELU):
                handles.append(module.register_forward_hook(gelu_post))
        for block in _attention_blocks(model):
            handles.append(block.register_forward_pre_hook(attention_pre))
            handles.append(block.drop_weights.register_forward_hook(attention_weights_post(block)))
        for module in model.modules():  # after the hooks above, so the recorded outputs are the ones passed on
            if next(module.children(), None) is None:
                handles.append(module.register_forward_hook(record))
        with torch.enable_grad():
            logits = model(x_in)
    finally:
        for handle in handles:
            handle.remove()
    gates.clear()

    reused = [f"{names.get(m, m)} ({n}x)" for m, n in relu_calls.items() if n > 1]
    if reused:
        raise ValueError(
            "LRP-Flex needs each ReLU module used once per forward; reused: " + ", ".join(reused)
            + " (use make_lrp_ready(model), or cutremain_monai.networks.resnet)"
        )
    skipped = [names.get(m, m) for m, (calls, held) in attention_calls.items() if calls != held]
    if skipped:
        raise ValueError(f"lrp: the attention weights of {', '.join(map(str, skipped))} did not pass through its "
                         "drop_weights module (a MONAI SABlock version this code does not know)")
    if not relu_calls:
        raise ValueError("no nn.ReLU module was called: lrp needs a network of nn.ReLU modules")
    if logits.ndim != 2:
        raise ValueError(f"model must return logits (B, K), got shape {tuple(logits.shape)}")

    if first_rule == "zb":
        chain = [m for m, _, _ in leaf_calls]
        conv, bn = (chain[0], None) if chain else (None, None)
        ok = bool(chain) and isinstance(conv, _CONV) and leaf_calls[0][1] is x_in
        relu_index = 1
        if ok and len(chain) > 1 and isinstance(chain[1], _BN):
            bn, relu_index = chain[1], 2
            ok = leaf_calls[1][1] is leaf_calls[0][2]
        ok = ok and len(chain) > relu_index and isinstance(chain[relu_index], nn.ReLU)
        ok = ok and first_relu_out and leaf_calls[relu_index][1] is leaf_calls[relu_index - 1][2]
        if not ok:
            kinds = [type(m).__name__ for m in chain]
            raise ValueError(f"first_rule='zb' needs the input to go through Conv, [BatchNorm], ReLU first; got {kinds}")
        a0 = first_relu_out[0]
        conv_out = leaf_calls[0][2]
        if bounds is None:
            bounds = (x.detach().min(), x.detach().max())
        low, high = _as_bound(bounds[0], x), _as_bound(bounds[1], x)
        wrt = a0
    else:
        wrt = x_in

    if objective is not None and target is not None:
        raise ValueError("give either target or objective, not both")
    passes = [None] if objective is not None else _targets(target, logits.shape[0], logits.shape[1])
    rows = torch.arange(logits.shape[0], device=logits.device)
    maps = []
    with torch.enable_grad():  # usable under torch.no_grad() (evaluation loops)
        for i, classes in enumerate(passes):
            if classes is None:
                q = objective(logits)
                if q.shape != (logits.shape[0],):
                    raise ValueError(f"objective must return one value per image ({logits.shape[0]},), got {tuple(q.shape)}")
                q = q.sum()
            else:
                q = logits[rows, torch.as_tensor(classes, device=logits.device)].sum()
            keep = create_graph or return_logits or i < len(passes) - 1
            state.active = True
            try:
                (grad,) = torch.autograd.grad(q, wrt, retain_graph=keep, create_graph=create_graph)
            finally:
                state.active = False
            if first_rule == "zb":
                relevance = _zb_input_relevance(conv, bn, conv_out, x.detach(), grad * a0, low, high, state.epsilon, create_graph)
            else:
                relevance = grad * x_in
            maps.append(relevance.sum(dim=1))
        heat = torch.stack(maps, dim=1)
    return (heat, logits) if return_logits else heat


class WithInputs(nn.Module):
    """``network(x, *args, **kwargs)`` as a one-input module, what :func:`lrp` explains (a network that also takes
    a lung mask and a zone map). The network stays a submodule, so its ReLUs are hooked and a DDP wrapper's forward
    (gradient synchronisation) runs."""

    def __init__(self, network: nn.Module, args: tuple = (), kwargs: dict | None = None):
        super().__init__()
        self.network = network
        self.args, self.kwargs = tuple(args), dict(kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x, *self.args, **self.kwargs)


def severity_relevance(model: nn.Module, x: torch.Tensor, lung_mask: torch.Tensor, zones: torch.Tensor, **kwargs) -> torch.Tensor:
    """LRP map ``(B, 1, H, W)`` of the sum of the six zone logits of a
    :class:`~cutremain_monai.networks.SeverityViT` (what its ISNet training explains); ``model`` must be LRP-ready
    (:func:`make_lrp_ready`) and is used in its current mode. ``kwargs`` go to :func:`lrp` (default bounds: the
    batch's)."""
    return lrp(WithInputs(model, (lung_mask, zones), {"logits": True}), x, objective=lambda lg: lg.sum(1), **kwargs)


def outside_share(heat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image, ``sum |R| outside the mask / sum |R|`` of maps ``(B, 1, H, W)`` and binary masks of the same shape
    (what ISNet's loss pushes down; the covid report's overlays and the severity-guidance table use it)."""
    heat = heat.detach().abs()
    return (heat * (mask <= 0.5)).flatten(1).sum(1) / heat.flatten(1).sum(1).clamp_min(1e-12)
