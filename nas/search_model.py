"""The DARTS supernet: every edge of a cell is a softmax(α)-weighted mixture of all candidate operations.

α lives on the network but apart from the weights: ``weights()`` and ``alphas()`` are disjoint parameter groups,
so the weight optimizer never sees α and the α optimizer never sees the weights.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nas import kernels
from nas.batched import (
    RunningStats,
    batchable,
    batched,
    batched_after_relu,
    batched_layers,
    one_norm,
    stacked_norm_arguments,
    weightless,
)
from nas.config import SearchConfig, SpeedConfig
from nas.genotypes import Genotype, derive_genotype
from nas.ops import (
    PRIMITIVES,
    DepthwiseConv2d,
    FactorizedReduce,
    NormArguments,
    ReLUConvBN,
    build_op,
    forward_after_relu,
    forward_layer,
    global_average_pool,
    is_channels_last,
    norm_arguments,
    norm_relu_separable,
    norm_relu_separable_layers,
    pool2d,
    separable,
    starts_with_relu,
    train_norm,
    train_norm_backward,
)

PLAIN = SpeedConfig(**dict.fromkeys(SpeedConfig.model_fields, False))  # every speed switch off


def num_edges(nodes: int) -> int:
    """Edges of a cell: intermediate node i has 2 + i incoming edges."""
    return sum(2 + i for i in range(nodes))


def reduction_layers(layers: int) -> tuple[int, ...]:
    """Reduction cells sit at 1/3 and 2/3 of the depth, as in the paper."""
    return tuple(sorted({layers // 3, 2 * layers // 3}))


class _CompiledOrEager:
    """``torch.compile(fn)``, falling back to ``fn`` itself (with one warning) if compiling or running it fails."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn
        self.compiled: Callable[..., torch.Tensor] | None = None
        try:
            self.compiled = torch.compile(fn, dynamic=False)
        except Exception as err:  # noqa: BLE001 - any failure means: run eagerly
            warnings.warn(f"torch.compile unavailable, running eagerly: {err}", stacklevel=2)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as err:  # noqa: BLE001
                warnings.warn(f"torch.compile failed, running eagerly: {err}", stacklevel=2)
                self.compiled = None
        return self.fn(*args)


def node_softmax(beta: torch.Tensor, nodes: int) -> torch.Tensor:
    """PC-DARTS edge normalization: softmax(β) over each intermediate node's incoming edges (node i has 2 + i)."""
    return torch.cat(list(map(lambda part: F.softmax(part, dim=0), beta.split([2 + i for i in range(nodes)]))))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave ``groups`` channel groups (ShuffleNet): channel g·(C/groups) + i moves to i·groups + g. A
    channels_last input is shuffled as (N, H, W, C), so that the result (and its gradient) stay channels_last."""
    n, c, h, w = x.shape
    if is_channels_last(x):
        pixels = x.permute(0, 2, 3, 1)
        return pixels.reshape(n, h, w, groups, c // groups).transpose(3, 4).reshape(n, h, w, c).permute(0, 3, 1, 2)
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def partial_split(
    x: torch.Tensor, partial: int, stride: int, native_pool: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """PC-DARTS's split of an edge input: its first C/K channels (for the candidates, a view) and the rest (passed
    by, max-pooled at stride 2; ``native_pool``: ``search.speed.native_pool``)."""
    k = x.shape[1] // partial
    through, bypass = x.split([k, x.shape[1] - k], dim=1)  # split: a gradient in x's layout (a slice's is not)
    if stride == 2:
        bypass = pool2d(bypass, 2, 2, 0, True, is_max=True, native=native_pool)
    return through, bypass


def shuffled_node(mixed: Sequence[torch.Tensor], passed: Sequence[torch.Tensor], partial: int) -> torch.Tensor:
    """A PC-DARTS node from its edges' mixtures and passed-by channels: shuffle(cat[Σ mixtures, Σ passed by]).
    Concatenation and shuffle are linear, so this is the sum of each edge's own shuffle(cat[mixture, passed by])
    with one concatenation and one shuffle per node instead of one per edge."""
    sums = [functools.reduce(torch.add, mixed), functools.reduce(torch.add, passed)]
    return channel_shuffle(torch.cat(sums, dim=1), partial)


def index_on(
    cache: dict[tuple[object, torch.device], torch.Tensor], key: object, values: Sequence[int], device: torch.device
) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``, made once per key and device: an index built per call would be a
    host-to-device copy on every forward."""
    index = cache.get((key, device))
    if index is None:
        index = cache[(key, device)] = torch.tensor(list(values), device=device)
    return index


def weighted_sum(weights: torch.Tensor, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_k weights[k] · outputs[k], the cheaper way for the device: on CPU in place into one tensor
    (:class:`_WeightedSum`: no copy of the outputs, and gradients in each output's layout); elsewhere as one product
    over the stacked outputs (:func:`stacked_weighted_sum`: fewer operators to launch, which is what a GPU step
    costs)."""
    if outputs[0].device.type == "cpu":
        return _WeightedSum.apply(weights.to(outputs[0].dtype), *outputs)
    return stacked_weighted_sum(weights, outputs)


def stacked_weighted_sum(weights: torch.Tensor, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_k weights[k] · outputs[k] as a matrix-vector product over the stacked outputs: a few operators forward and
    backward. Outputs in channels_last are stacked as (N, H, W, C) views, so that the sum (and the gradients flowing
    back into every candidate) keep that layout: a stack of 4-d channels_last tensors is laid out channels-first."""
    if outputs[0].dim() == 4 and is_channels_last(outputs[0]):
        stacked = torch.stack([y.permute(0, 2, 3, 1) for y in outputs])
        return torch.tensordot(weights.to(stacked.dtype), stacked, dims=1).permute(0, 3, 1, 2)
    stacked = torch.stack(list(outputs))
    return torch.tensordot(weights.to(stacked.dtype), stacked, dims=1)


class _WeightedSum(torch.autograd.Function):
    """Eq. 1's sum as one multiply and a fused multiply-add per candidate, with a hand-written gradient: outputs[k]
    gets weights[k] · grad and weights[k] gets ⟨grad, outputs[k]⟩, a dot product over the tensors' memory. On CPU
    that is several times faster than :func:`stacked_weighted_sum` on the 32x32 cells (4.5 against 1.1 ms forward
    and backward, 7 candidates of 16 x 16 x 32 x 32): the stack copies every output, and autograd's gradient of the
    stacked product is an outer product with an inner size of 1, which CPU matrix kernels run at a few GB/s. The
    backward is made of differentiable operators, so a double backward (the exact Hessian) goes through it."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, *outputs: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        total = outputs[0] * weights[0]
        for k in range(1, len(outputs)):
            total.addcmul_(outputs[k], weights[k])
        ctx.save_for_backward(weights, *outputs)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        weights, *outputs = ctx.saved_tensors
        grad = dense_as(grad, outputs[0])
        d_weights = None
        if ctx.needs_input_grad[0]:
            d_weights = torch.stack([torch.dot(flat_like(grad, y), flat_like(y, y)) for y in outputs])
        d_outputs = [grad * weights[k] if ctx.needs_input_grad[1 + k] else None for k in range(len(outputs))]
        return (d_weights, *d_outputs)


def closing_norm_forward(
    x: torch.Tensor, norm: NormArguments | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``x`` through an affine-free training batch norm given by ``norm`` (:func:`nas.ops.norm_arguments`; None: no
    norm), with the per-channel mean and 1/σ its backward takes."""
    if norm is None:
        return x, None, None
    return train_norm(x, None, None, norm)


class _EdgeWeightedSum(torch.autograd.Function):
    """:class:`_NormalizedWeightedSum` for m edges stacked along the channels (nas/batched.py), on CPU in
    channels_last: ``weights`` (candidates, m), candidate k of edge e weighted by weights[k, e] over the edge's block
    of channels, after its closing batch norm over all m·C channels where ``norms[k]`` gives one (m batch norms of
    C channels each: every channel is normalized by its own statistics). Each (N, m·C, H, W) tensor is worked on as
    its (N, H, W, m, C) pixels, a view of the same memory, so the sum and every gradient stay channels_last (a
    stack of 4-d channels_last tensors is laid out channels-first, and its gradient with it).

    The m edges leave ``sources`` states, m / sources edges each, edge-major by state. A candidate marked in
    ``once`` was computed once per state (``search.speed.weightless_once``): its input has sources·C channels, and
    each state's block is added to every edge leaving that state; its gradient is the weighted sum of theirs."""

    @staticmethod
    def forward(
        ctx,  # noqa: ANN001
        weights: torch.Tensor,
        norms: tuple,
        once: tuple,
        sources: int,
        native: bool,
        *inputs: torch.Tensor,
    ) -> torch.Tensor:
        if native and native_sum_applies(inputs):
            total, means, invstds = native_edge_sum(weights, norms, once, sources, inputs)
        else:
            total, means, invstds = _edge_sum(weights, norms, once, sources, inputs)
        ctx.eps = [None if norm is None else norm.eps for norm in norms]
        ctx.native = [norm is not None and norm.native for norm in norms]
        ctx.layout = (once, sources)
        ctx.save_for_backward(weights, *inputs, *means, *invstds)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        weights, *rest = ctx.saved_tensors
        (once, sources), n, m = ctx.layout, len(ctx.eps), weights.shape[1]
        inputs, means, invstds = rest[:n], rest[n : 2 * n], rest[2 * n :]
        grad = dense_as(grad, inputs[0])
        blocks = edge_blocks(grad, m)
        want_weights = ctx.needs_input_grad[0]
        d_weights, d_inputs = [], []
        for k, (x, mean, invstd, eps, native) in enumerate(zip(inputs, means, invstds, ctx.eps, ctx.native)):
            want_x = ctx.needs_input_grad[5 + k]
            if once[k]:
                norm = (eps, native)
                wants = (want_weights, want_x)
                d_weight, d_x = _once_gradients(blocks, weights[k], x, mean, invstd, norm, sources, *wants)
                d_weights.append(d_weight)
                d_inputs.append(d_x)
                continue
            if eps is None:
                d_weights.append((blocks * edge_blocks(x, m)).sum((0, 1, 2, 4)) if want_weights else None)
                d_x = (blocks * weights[k].view(m, 1)).flatten(-2).permute(0, 3, 1, 2) if want_x else None
                d_inputs.append(d_x)
                continue
            # The batch norm's backward is linear in its incoming gradient, so each edge's weight enters as the
            # (affine-free) norm's scale over its block; the scale's gradient, Σ grad · x̂ per channel, summed over
            # a block is that weight's.
            scale = weights[k].repeat_interleave(x.shape[1] // m)
            wants = (want_x, want_weights, False)
            d_x, d_scale, _ = train_norm_backward(grad, x, scale, mean, invstd, eps, wants, native)
            d_weights.append(d_scale.view(m, -1).sum(1) if want_weights else None)
            d_inputs.append(d_x)
        return (torch.stack(d_weights) if want_weights else None, None, None, None, None, *d_inputs)


def _edge_sum(
    weights: torch.Tensor, norms: tuple, once: tuple, sources: int, inputs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """:class:`_EdgeWeightedSum`'s forward in PyTorch's operators: each candidate through its closing norm (where it
    has one in the sum), weighed edge by edge and added in place; the sum and each norm's batch mean and 1/σ."""
    m = weights.shape[1]
    total, means, invstds = None, [], []
    for k, (x, norm, shared) in enumerate(zip(inputs, norms, once)):
        y, mean, invstd = closing_norm_forward(x, norm)
        blocks = edge_blocks(y, sources).unsqueeze(-2) if shared else edge_blocks(y, m).unflatten(3, (sources, -1))
        w = weights[k].view(sources, -1, 1)
        total = blocks * w if total is None else total.addcmul_(blocks, w)
        means.append(mean)
        invstds.append(invstd)
    return total.flatten(-3).permute(0, 3, 1, 2), means, invstds


def native_sum_applies(inputs: Sequence[torch.Tensor]) -> bool:
    """Whether the native kernel computes the batched sum's forward (``search.speed.native_sum``): float32 CPU inputs
    outside autocast and compiled graphs (a graph cannot trace a C call), the kernel built here."""
    return (
        all(x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 for x in inputs)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and kernels.native_available()
    )


def native_edge_sum(
    weights: torch.Tensor, norms: tuple, once: tuple, sources: int, inputs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """:func:`_edge_sum` by the native kernels (``search.speed.native_sum``): each closing norm's statistics alone
    (its running ones moved), then one pass that normalizes, weighs and adds every candidate
    (:func:`nas.kernels.edge_sum_forward`): no normalized output written and read again."""
    means: list[torch.Tensor | None] = []
    invstds: list[torch.Tensor | None] = []
    for x, norm in zip(inputs, norms):
        if norm is None:
            means.append(None)
            invstds.append(None)
            continue
        running = (norm.running_mean, norm.running_var)
        _, mean, invstd = kernels.norm_forward(x, None, None, *running, norm.momentum, norm.eps, output=False)
        means.append(mean)
        invstds.append(invstd)
    return kernels.edge_sum_forward(inputs, means, invstds, once, weights, sources), means, invstds


def _once_gradients(
    blocks: torch.Tensor,
    weights: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor | None,
    invstd: torch.Tensor | None,
    norm: tuple[float | None, bool],
    sources: int,
    want_weights: bool,
    want_x: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:class:`_EdgeWeightedSum`'s gradients for a candidate computed once per state: each edge's weight gets
    Σ grad_e · x̂ over its block (x̂ the normalized input, or the input where there is no norm); the input gets the
    norm's backward of Σ_e weights[e] · grad_e over the edges leaving its state. Both in one pass by a native kernel
    where it is built (:func:`nas.kernels.once_per_state_gradients`), else in PyTorch's operators; those also where
    the gradient is to be differentiated again (the exact Hessian). ``norm``: the norm's ε (None: no norm) and
    whether the native kernel may compute its backward (``search.speed.native_norm``)."""
    eps, native = norm
    if not torch.is_grad_enabled() and x.dtype == torch.float32 and kernels.native_available():
        d_weights, combined = kernels.once_per_state_gradients(
            blocks.flatten(-2).permute(0, 3, 1, 2), x, mean, invstd, weights.view(sources, -1), want_weights, want_x
        )
    else:
        per_state = blocks.unflatten(3, (sources, -1))  # (N, H, W, states, edges of each, C)
        d_weights = combined = None
        if want_weights:
            # x̂ as a function of x, its batch statistics included: the exact Hessian differentiates this again
            normalized = x if eps is None else F.batch_norm(x, None, None, None, None, True, 0.0, eps)
            d_weights = (per_state * edge_blocks(normalized, sources).unsqueeze(-2)).sum((0, 1, 2, 5)).flatten()
        if want_x:
            combined = (per_state * weights.view(sources, -1, 1)).sum(4).flatten(-2).permute(0, 3, 1, 2)
    if combined is None or eps is None:
        return d_weights, combined
    d_x = train_norm_backward(combined, x, torch.ones_like(mean), mean, invstd, eps, (True, False, False), native)[0]
    return d_weights, d_x


def stacks_channels_last(inputs: Sequence[torch.Tensor]) -> bool:
    """Whether ``torch.cat(inputs, dim=1)`` would be :func:`nas.ops.is_channels_last` (cat lays its result out as its
    inputs suggest), without making it."""
    x = inputs[0]
    if x.dim() != 4 or x.shape[2] * x.shape[3] == 1 or x.shape[1] * len(inputs) == 1:
        return False  # a 1x1 image or a single channel: plainly contiguous either way
    return x.stride(1) == 1 and x.stride(3) >= x.shape[1]  # channels innermost, a dense or sliced channels_last


def edge_blocks(x: torch.Tensor, m: int) -> torch.Tensor:
    """A channels_last (N, m·C, H, W) tensor as its (N, H, W, m, C) pixels: a view."""
    return x.permute(0, 2, 3, 1).unflatten(-1, (m, -1))


def dense_as(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad`` dense in ``like``'s memory layout: one copy where it is not. The gradient reaching an edge's sum is
    often a channel slice of the cell output's (the backward of the nodes' concatenation), and every candidate's
    gradient operators would otherwise read that strided view on a slow path, or copy it once each."""
    layout = torch.channels_last if like.dim() == 4 and is_channels_last(like) else torch.contiguous_format
    return grad.contiguous(memory_format=layout)


def flat_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` as one dimension in the memory order of ``like`` (a view when ``x`` is laid out as ``like``), so that a
    dot product of two tensors of the same layout reads both in order."""
    if like.dim() == 4 and is_channels_last(like):
        return x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1)
    return x.contiguous().reshape(-1)


def closing_norm(op: nn.Module, after_relu: bool) -> tuple[list[nn.Module], nn.BatchNorm2d] | None:
    """``op`` as the modules it runs before its closing batch norm, and that norm, where ``op`` is nested plain
    ``nn.Sequential`` (SepConv, DilConv, a pooling with its norm) ending in an affine-free ``nn.BatchNorm2d`` in
    training; None otherwise (skip_connect, FactorizedReduce, a cross-rank norm). ``after_relu``: its leading ReLU
    is left out (computed once for the edge)."""
    leaves: list[nn.Module] = []

    def flatten(module: nn.Module) -> None:
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            for child in module:
                flatten(child)
        else:
            leaves.append(module)

    flatten(op)
    if not leaves or type(leaves[-1]) is not nn.BatchNorm2d or leaves[-1].affine or not leaves[-1].training:
        return None
    return leaves[1 if after_relu else 0 : -1], leaves[-1]


def run_leaves(modules: Sequence[nn.Module], x: torch.Tensor, recompute_depthwise: bool) -> torch.Tensor:
    """``x`` through ``modules`` in turn, each depthwise convolution and the pointwise one after it as one
    :func:`separable` convolution; with ``recompute_depthwise`` a training batch norm and ReLU before one as
    :func:`nas.ops.norm_relu_separable`, and a max pooling's argmax recomputed (:func:`nas.ops.forward_layer`)."""
    i = 0
    while i < len(modules):
        if recompute_depthwise and norm_relu_separable_layers(modules[i : i + 4]):
            norm, depthwise, pointwise = modules[i], modules[i + 2], modules[i + 3]
            x = norm_relu_separable(
                x, norm.weight, norm.bias, norm_arguments(norm), depthwise.weight, pointwise.weight, depthwise, 1
            )
            i += 4
            continue
        if isinstance(modules[i], DepthwiseConv2d) and i + 1 < len(modules) and type(modules[i + 1]) is nn.Conv2d:
            x = separable(modules[i], modules[i + 1], x, recompute_depthwise)
            i += 2
        else:
            x = forward_layer(modules[i], x, recompute_depthwise)
            i += 1
    return x


class _NormalizedWeightedSum(torch.autograd.Function):
    """Σ_k weights[k] · BN_k(inputs[k]) (eq. 1 with each candidate's closing batch norm inside the sum; a candidate
    without one, ``norms[k]`` None, adds ``inputs[k]`` as it is). Each normalized output is added to the sum and
    dropped, and only the batch norm's input and its per-channel mean and 1/σ are kept for the backward: one saved
    activation less per candidate than the batch norm followed by :class:`_WeightedSum`. The backward is the batch
    norm's own (``native_batch_norm_backward``, linear in the incoming gradient), whose per-channel Σ grad · x̂ is
    also weights[k]'s gradient summed; it is made of differentiable operators, so the exact Hessian goes through."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, norms: tuple, *inputs: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        total, means, invstds = None, [], []
        for k, (x, norm) in enumerate(zip(inputs, norms)):
            y, mean, invstd = closing_norm_forward(x, norm)
            total = y * weights[k] if total is None else total.addcmul_(y, weights[k])
            means.append(mean)
            invstds.append(invstd)
        ctx.eps = [None if norm is None else norm.eps for norm in norms]
        ctx.native = [norm is not None and norm.native for norm in norms]
        ctx.save_for_backward(weights, *inputs, *means, *invstds)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        weights, *rest = ctx.saved_tensors
        n = len(ctx.eps)
        inputs, means, invstds = rest[:n], rest[n : 2 * n], rest[2 * n :]
        grad = dense_as(grad, inputs[0])
        want_weights = ctx.needs_input_grad[0]
        d_weights, d_inputs = [], []
        for k, (x, mean, invstd, eps, native) in enumerate(zip(inputs, means, invstds, ctx.eps, ctx.native)):
            want_x = ctx.needs_input_grad[2 + k]
            if eps is None:
                d_weights.append(torch.dot(flat_like(grad, x), flat_like(x, x)) if want_weights else None)
                d_inputs.append(grad * weights[k] if want_x else None)
                continue
            unit = torch.ones_like(mean)  # a scale of 1 (the norm is affine-free): its gradient is Σ grad · x̂
            wants = (want_x, want_weights, False)
            d_x, d_scale, _ = train_norm_backward(grad, x, unit, mean, invstd, eps, wants, native)
            d_weights.append(d_scale.sum() if want_weights else None)
            d_inputs.append(d_x * weights[k] if want_x else None)
        return (torch.stack(d_weights) if want_weights else None, None, *d_inputs)


class MixedOp(nn.Module):
    """Eq. 1 of the paper: the softmax-weighted sum of all candidate operations on one edge.

    ``speed`` (default: the plain path) switches on optimizations that keep the result: ``skip_none`` leaves out
    the 'none' term (it is w·0; its weight stays in the softmax, so every gradient is the same), ``shared_relu``
    computes ReLU(x) once for every candidate that begins with it.
    """

    def __init__(
        self, channels: int, stride: int, primitives: Sequence[str], speed: SpeedConfig = PLAIN, partial: int = 1
    ):
        super().__init__()
        self.partial = partial
        self.stride = stride
        channels //= partial  # PC-DARTS: only the first 1/K of the channels go through the candidates
        ops = []
        for name in primitives:
            op = build_op(name, channels, stride, affine=False)
            if "pool" in name:  # pooling has no batch norm of its own; match the scale of the other ops
                op = nn.Sequential(op, nn.BatchNorm2d(channels, affine=False))
            ops.append(op)
        self.ops = nn.ModuleList(ops)
        for module in self.ops.modules():
            if isinstance(module, DepthwiseConv2d):
                module.dense = speed.dense_dilation
                module.native_grad = speed.native_depthwise_grad
                module.flipped = speed.flipped_input_grad
            if type(module) is nn.BatchNorm2d:
                module.native_norm = speed.native_norm
            if type(module) is nn.Conv2d:
                module.native_pointwise = speed.native_pointwise
            if type(module) in (nn.MaxPool2d, nn.AvgPool2d):
                module.native_pool = speed.native_pool
        self.active = tuple(i for i, name in enumerate(primitives) if not (speed.skip_none and name == "none"))
        self.after_relu = tuple(speed.shared_relu and starts_with_relu(op) for op in self.ops)
        self.stacked = speed.stacked_mixture
        self.norm_in_sum = speed.norm_in_sum
        self.recompute_depthwise = speed.recompute_depthwise
        self.native_sum = speed.native_sum
        self.native_pool = speed.native_pool
        self.fast = speed.skip_none or speed.shared_relu or speed.stacked_mixture or speed.norm_in_sum
        self._index: dict[tuple[object, torch.device], torch.Tensor] = {}  # for a non-contiguous set of candidates

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Eq. 1; with PC-DARTS partial channels (K > 1), eq. 1 on the first C/K channels, the rest passed by
        (max-pooled at stride 2), then a channel shuffle of K groups."""
        if self.partial == 1:
            return self.mixture(x, weights)
        through, bypass = partial_split(x, self.partial, self.stride, self.native_pool)
        return shuffled_node([self.mixture(through, weights)], [bypass], self.partial)

    def mixture(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_o w_o · o(x) over the candidates (eq. 1)."""
        if not self.fast:
            return sum(w * op(x) for w, op in zip(weights, self.ops))
        relu_x = F.relu(x) if any(self.after_relu) else x
        if self.norm_in_sum and x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_grad_enabled():
            return self.normalized_mixture(x, relu_x, weights)
        ys = [self.candidate(i, x, relu_x) for i in self.active]
        if self.stacked:
            return weighted_sum(self.active_weights(weights), ys)
        out = None
        for i, y in zip(self.active, ys):
            out = weights[i] * y if out is None else out + weights[i] * y
        return out

    def candidate(self, i: int, x: torch.Tensor, relu_x: torch.Tensor) -> torch.Tensor:
        """Candidate ``i`` on the edge's input, from the shared ReLU(x) where it begins with one."""
        return forward_after_relu(self.ops[i], relu_x) if self.after_relu[i] else self.ops[i](x)

    def normalized_mixture(self, x: torch.Tensor, relu_x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Eq. 1 with each candidate's closing batch norm computed inside the sum (``search.speed.norm_in_sum``)."""
        inputs, norms = [], []
        for i in self.active:
            split = closing_norm(self.ops[i], self.after_relu[i])
            if split is None:
                inputs.append(self.candidate(i, x, relu_x))
                norms.append(None)
                continue
            inputs.append(run_leaves(split[0], relu_x if self.after_relu[i] else x, self.recompute_depthwise))
            norms.append(norm_arguments(split[1]))
        return _NormalizedWeightedSum.apply(self.active_weights(weights), tuple(norms), *inputs)

    def active_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """The softmax weights of the candidates computed: a view when they are a contiguous run (the usual case,
        'none' first or last), else one gather with an index tensor kept per device (no copy to the device per
        call)."""
        first, last = self.active[0], self.active[-1]
        if last - first + 1 == len(self.active):
            return weights[first : last + 1]
        return weights.index_select(0, index_on(self._index, None, self.active, weights.device))


class SearchCell(nn.Module):
    """Two input nodes, ``nodes`` intermediate nodes, output = concatenation of the intermediate nodes."""

    def __init__(
        self,
        nodes: int,
        c_prev_prev: int,
        c_prev: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
        primitives: Sequence[str],
        speed: SpeedConfig = PLAIN,
        partial: int = 1,
    ):
        super().__init__()
        self.reduction = reduction
        self.nodes = nodes
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, channels, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, channels, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList(
            MixedOp(channels, 2 if reduction and j < 2 else 1, primitives, speed, partial)
            for i in range(nodes)
            for j in range(2 + i)
        )
        self.batch_edges = speed.batched_edges
        self.partial = partial
        self.node_shuffle = speed.node_shuffle and partial > 1
        self.groups = edge_groups(nodes)
        self.weightless_once = speed.weightless_once
        self._weightless: dict[tuple[int, int], str] = {}
        self._index: dict[tuple[object, torch.device], torch.Tensor] = {}
        self._batchable: tuple[int, bool] | None = None
        self._candidates: dict[tuple[int, int], Candidates] = {}
        self._lookups_key: tuple[int, bool] | None = None

    def forward(
        self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor, edge_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``weights``: softmax(α), a row per edge; ``edge_weights``: PC-DARTS edge normalization, a weight per edge
        (softmax(β) within each node), or None."""
        if self.batch_edges and self.can_batch():
            return self.forward_batched(s0, s1, weights, edge_weights)
        if self.node_shuffle:
            return self.forward_partial(s0, s1, weights, edge_weights)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.nodes):
            terms = [self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states)]
            if edge_weights is not None:
                terms = [edge_weights[offset + j] * t for j, t in enumerate(terms)]
            states.append(sum(terms))
            offset += len(states) - 1
        return torch.cat(states[2:], dim=1)

    def forward_partial(
        self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor, edge_weights: torch.Tensor | None
    ) -> torch.Tensor:
        """PC-DARTS (``search.speed.node_shuffle``): edge e's output is β_e · shuffle(cat[eq. 1 on the first C/K
        channels of its input, the other channels passed by]). Concatenation and shuffle are linear, so a node
        sums its edges' mixtures and their passed-by channels apart and shuffles once: one concatenation and one
        shuffle per node, not per edge, and each state split once (its passed-by part pooled once at stride 2)."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # by state: every edge leaving a state has one stride
        offset = 0
        for _ in range(self.nodes):
            mixed, passed = [], []
            for j, h in enumerate(states):
                edge = self.edges[offset + j]
                if j == len(parts):
                    through, bypass = partial_split(h, self.partial, edge.stride, edge.native_pool)
                    layout = torch.channels_last if is_channels_last(h) else torch.contiguous_format
                    parts.append((through.contiguous(memory_format=layout), bypass))  # dense once, not per candidate
                through, bypass = parts[j]
                m = edge.mixture(through, weights[offset + j])
                if edge_weights is not None:
                    m, bypass = edge_weights[offset + j] * m, edge_weights[offset + j] * bypass
                mixed.append(m)
                passed.append(bypass)
            states.append(shuffled_node(mixed, passed, self.partial))
            offset += len(states) - 1
        return torch.cat(states[2:], dim=1)

    def can_batch(self) -> bool:
        """Whether every batch norm is a plain one (``ray.sync_bn`` swaps in cross-rank ones, which run edge by
        edge); looked at again only when the modules were swapped."""
        key = id(self.preprocess1[-1])
        if self._batchable is None or self._batchable[0] != key:
            self._batchable = (key, all(batchable(edge) for edge in self.edges))
        return self._batchable[1]

    def forward_batched(
        self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor, edge_weights: torch.Tensor | None
    ) -> torch.Tensor:
        """:meth:`forward` with the edges leaving each state computed together (nas/batched.py): the cell inputs'
        edges first, then node by node the edges leaving it, each node summed once its last edge is in."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        stats = RunningStats()
        incoming: list[list[torch.Tensor]] = [[] for _ in range(self.nodes)]
        passed: list[list[torch.Tensor]] = [[] for _ in range(self.nodes)]  # PC-DARTS: the channels passed by
        for g, group in enumerate(self.groups):
            stride = self.edges[group[0][1]].stride  # one stride per group: a reduction's cell-input edges, or 1
            if self.partial > 1:
                native = self.edges[0].native_pool
                parts = {source: partial_split(states[source], self.partial, stride, native) for source, _ in group}
                inputs = [parts[source][0] for source, _ in group]
            else:
                inputs = [states[source] for source, _ in group]
            for (source, edge), output in zip(group, self.mixture(g, inputs, weights, edge_weights, stats)):
                incoming[self.target[edge]].append(output)
                if self.partial > 1:
                    bypass = parts[source][1]
                    passed[self.target[edge]].append(bypass if edge_weights is None else edge_weights[edge] * bypass)
            if self.partial > 1:
                states.append(shuffled_node(incoming[g], passed[g], self.partial))
            else:
                states.append(functools.reduce(torch.add, incoming[g]))
        stats.apply()
        return torch.cat(states[2:], dim=1)

    @functools.cached_property
    def target(self) -> tuple[int, ...]:
        """The node each edge enters, by edge index."""
        return tuple(i for i in range(self.nodes) for _ in range(2 + i))

    def mixture(
        self,
        g: int,
        inputs: Sequence[torch.Tensor],
        weights: torch.Tensor,
        edge_weights: torch.Tensor | None,
        stats: RunningStats,
    ) -> Sequence[torch.Tensor]:
        """Eq. 1 for the m edges of group ``g`` at once, given each edge's input: the m edges' outputs. Each candidate
        runs on the inputs stacked edge by edge along the channels. On CPU in channels_last as one in-place sum
        (:class:`_EdgeWeightedSum`, with each candidate's closing batch norm inside it under
        ``search.speed.norm_in_sum`` as :meth:`MixedOp.normalized_mixture` does; a candidate without weights once per
        state under ``search.speed.weightless_once``), else as one product over the stacked candidates (fewer
        operators to launch on a GPU)."""
        group = self.groups[g]
        first = self.edges[group[0][1]]
        m = len(group)
        in_place = inputs[0].device.type == "cpu" and stacks_channels_last(inputs)
        normalize = in_place and first.norm_in_sum and inputs[0].dtype == torch.float32 and torch.is_grad_enabled()
        sources = self.sources[g]
        once = tuple(
            in_place and self.weightless_once and sources < m and self.once_per_state(g, k, normalize)
            for k in first.active
        )
        distinct = inputs[:: m // sources]  # the edges leave their states edge-major by state (edge_groups)
        stack = relu_stack = None
        if not all(once):
            if any(once):  # search.speed.weightless_once: what the other candidates need, each ReLU once per state
                if not all(first.after_relu[k] for k, shared in zip(first.active, once) if not shared):
                    stack = torch.cat(list(inputs), dim=1)
                if any(first.after_relu):
                    relus = [F.relu(x) for x in distinct]
                    relu_stack = torch.cat([r for r in relus for _ in range(m // sources)], dim=1)
            else:
                stack = torch.cat(list(inputs), dim=1)
                relu_stack = F.relu(stack) if any(first.after_relu) else stack  # search.speed.shared_relu: one ReLU
        outputs, norms, states = [], [], None
        for k, shared in zip(first.active, once):
            candidates, split_candidates = self.candidates(g, k)
            if shared:
                if states is None:  # one stack of the states for every such candidate (what the poolings keep)
                    states = distinct[0] if len(distinct) == 1 else torch.cat(list(distinct), dim=1)
                output, norm = self.run_once_per_state(candidates, split_candidates, states, len(distinct), stats)
                outputs.append(output)
                norms.append(norm)
                continue
            splits = split_candidates if normalize else [None]
            norm = None
            if all(split is not None for split in splits):
                norm = stacked_norm_arguments([split[1] for split in splits], stats)
            if norm is not None:
                inputs_k = relu_stack if first.after_relu[k] else stack
                leaves = [split[0] for split in splits]
                outputs.append(batched_layers(leaves, inputs_k, stats, first.recompute_depthwise))
            elif first.after_relu[k]:
                outputs.append(batched_after_relu(candidates, relu_stack, stats))
            else:
                outputs.append(batched(candidates, stack, stats))
            norms.append(norm)
        w = first.active_weights(self.gather(weights, group).t())  # (candidates, m)
        if edge_weights is not None:  # PC-DARTS: β_e · Σ_k w_ke · o_k, with β_e folded into the weights
            w = w * self.gather(edge_weights, group)
        w = w.to(outputs[0].dtype)
        k, m = w.shape
        if in_place:  # the norms inside the sum (if any) are computed there
            shared = sources if any(once) else 1
            total = _EdgeWeightedSum.apply(w, tuple(norms), once, shared, first.native_sum, *outputs)
            return total.split(total.shape[1] // m, dim=1)
        stacked = torch.stack([o.unflatten(1, (m, -1)) for o in outputs])
        return (stacked * w.view(k, 1, m, 1, 1, 1)).sum(0).unbind(1)  # unbind: one backward operator, not m

    @functools.cached_property
    def sources(self) -> tuple[int, ...]:
        """For each group, how many states its edges leave where each state has as many (edge_groups lists them
        state by state), else the number of edges (no state is shared evenly)."""
        counts = []
        for group in self.groups:
            by_state = [source for source, _ in group]
            states = list(dict.fromkeys(by_state))
            even = by_state == [s for s in states for _ in range(len(group) // len(states))]
            counts.append(len(states) if even else len(group))
        return tuple(counts)

    def once_per_state(self, g: int, k: int, normalize: bool) -> bool:
        """Whether candidate ``k`` of group ``g``'s edges can be computed once per state: it acts channel by channel
        without weights, alike on every edge (:func:`nas.batched.weightless`, looked at once), and takes no shared
        ReLU; with a batch norm, only inside the sum in training (batch statistics, the same for every edge)."""
        candidates = self.candidates(g, k)[0]  # the lookups made current
        kind = self._weightless.get((g, k))
        if kind is None:
            normalized = any(isinstance(m, nn.BatchNorm2d) for m in candidates[0].modules())
            kind = "normalized" if normalized else "plain"
            if self.edges[self.groups[g][0][1]].after_relu[k] or not weightless(candidates):
                kind = "no"
            self._weightless[(g, k)] = kind
        return kind == "plain" or (kind == "normalized" and normalize and self.training)

    def _current_lookups(self) -> None:
        """Forget what :meth:`candidates` and :meth:`once_per_state` found once the cell was switched between
        ``train()`` and ``eval()`` or its modules were swapped (the key :meth:`can_batch` watches)."""
        key = (id(self.preprocess1[-1]), self.training)
        if self._lookups_key != key:
            self._candidates, self._weightless, self._lookups_key = {}, {}, key

    def candidates(self, g: int, k: int) -> Candidates:
        """Candidate ``k`` on each edge of group ``g``, and each one's :func:`closing_norm` (after the edge's shared
        ReLU, if it takes one): what every forward of the group reads, found once (walking the modules is a
        tenth of a PC-DARTS step's Python) and again only after ``train()``/``eval()`` or a swap of the modules
        (the key :meth:`can_batch` watches; a cell whose norms were swapped for cross-rank ones runs edge by edge,
        without this)."""
        self._current_lookups()
        found = self._candidates.get((g, k))
        if found is None:
            group = self.groups[g]
            after_relu = self.edges[group[0][1]].after_relu[k]
            candidates = [self.edges[edge].ops[k] for _, edge in group]
            found = self._candidates[(g, k)] = (candidates, [closing_norm(op, after_relu) for op in candidates])
        return found

    def run_once_per_state(
        self,
        candidates: Sequence[nn.Module],
        splits: Sequence[tuple[list[nn.Module], nn.BatchNorm2d] | None],
        x: torch.Tensor,
        sources: int,
        stats: RunningStats,
    ) -> tuple[torch.Tensor, tuple | None]:
        """A candidate without weights on ``x``, the group's ``sources`` states stacked (one block per state, not per
        edge), and its closing batch norm's arguments for the sum (None: no norm in the sum), the statistics of the
        first edge leaving each state updated by it and the other edges' following (:meth:`RunningStats.follow`).
        ``splits``: each candidate's :func:`closing_norm` (such a candidate takes no shared ReLU)."""
        split = splits[0]
        if split is None:  # no batch norm (once_per_state)
            return candidates[0](x), None
        per_state = len(candidates) // sources
        norms = [each[1] for each in splits]
        if not one_norm(norms):
            raise RuntimeError("weightless candidates of one group must have alike batch norms")
        leaders = norms[::per_state]
        norm = stacked_norm_arguments(leaders, stats)
        if norm is not None and norm[0] is not None:
            followers = [(n, leaders[i // per_state]) for i, n in enumerate(norms) if i % per_state]
            stats.follow([n for n, _ in followers], [lead for _, lead in followers])
        for layer in split[0]:
            x = forward_layer(layer, x, self.edges[0].recompute_depthwise)
        return x, norm

    def gather(self, rows: torch.Tensor, group: EdgeGroup) -> torch.Tensor:
        """``rows[[edge for each edge of group]]``, with the index tensor kept per device."""
        return rows.index_select(0, index_on(self._index, group, [edge for _, edge in group], rows.device))


EdgeGroup = tuple[tuple[int, int], ...]  # (source state, edge index) per edge, in stacking order
# one candidate on each edge of a group, and each one's closing_norm
Candidates = tuple[list[nn.Module], list[tuple[list[nn.Module], nn.BatchNorm2d] | None]]


def edge_groups(nodes: int) -> tuple[EdgeGroup, ...]:
    """The edges of a cell grouped by when their input is ready: first every edge leaving the two cell inputs, then
    for each intermediate node but the last the edges leaving it. Group g completes node g."""
    offsets = [sum(2 + k for k in range(i)) for i in range(nodes)]
    first = tuple((source, offsets[i] + source) for source in (0, 1) for i in range(nodes))
    rest = tuple(tuple((2 + j, offsets[i] + 2 + j) for i in range(j + 1, nodes)) for j in range(nodes - 1))
    return (first, *rest)


def _all_buffers(module: nn.Module) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Every buffer slot by name, None ones included (``named_buffers`` leaves those out)."""
    for prefix, child in module.named_modules():
        for name, tensor in child._buffers.items():
            yield f"{prefix}.{name}" if prefix else name, tensor


def checkpointed_cell(
    cell: SearchCell, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor, edge_weights: torch.Tensor | None
) -> torch.Tensor:
    """``cell(s0, s1, weights, edge_weights)`` with activation checkpointing: activations recomputed in the backward.

    The cell's parameters are passed as inputs (``functional_call`` in the recomputation), so the recomputation
    uses the tensors the forward used even when the architect ran it with other weights standing in for its own;
    the recomputation updates copies of the batch-norm running statistics, so the real ones are updated once, as
    without checkpointing (in training the output uses batch statistics, never the running ones).
    """
    names = [n for n, _ in cell.named_parameters()]
    # Buffers the forward runs without (the architect's side computations pass None batch-norm statistics): the
    # recomputation must run without them too, or it records different tensors than the forward did.
    absent = {n for n, t in _all_buffers(cell) if t is None}
    recomputing = [False]

    def run(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, e: torch.Tensor | None, *params: torch.Tensor):  # noqa: ANN202
        if not recomputing[0]:
            recomputing[0] = True
            return cell(a, b, w, e)
        throwaway = {n: None if n in absent else t.clone() for n, t in cell.named_buffers()}
        return torch.func.functional_call(cell, {**dict(zip(names, params)), **throwaway}, (a, b, w, e))

    params = [p for _, p in cell.named_parameters()]
    return torch.utils.checkpoint.checkpoint(run, s0, s1, weights, edge_weights, *params, use_reentrant=False)


class SearchNetwork(nn.Module):
    """Stem, ``layers`` search cells (reductions at 1/3 and 2/3, channels doubled there), pooling, classifier."""

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 16,
        num_classes: int = 10,
        layers: int = 8,
        nodes: int = 4,
        primitives: Sequence[str] = PRIMITIVES,
        stem_multiplier: int = 3,
        speed: SpeedConfig = PLAIN,
        partial_channels: int = 1,
        edge_normalization: bool = False,
    ):
        super().__init__()
        self.speed = speed
        if layers < 1 or nodes < 1 or channels < 1:
            raise ValueError(f"layers, nodes and channels must be positive, got {layers}, {nodes}, {channels}")
        if len(set(primitives)) != len(primitives) or not primitives:
            raise ValueError(f"primitives must be a non-empty list without repeats, got {list(primitives)}")
        self.primitives = tuple(primitives)
        self.nodes = nodes
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_curr),
        )
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        reductions = reduction_layers(layers)
        cells = []
        reduction_prev = False
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
            cells.append(
                SearchCell(
                    nodes,
                    c_prev_prev,
                    c_prev,
                    c_curr,
                    reduction,
                    reduction_prev,
                    self.primitives,
                    speed,
                    partial_channels,
                )
            )
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, nodes * c_curr
        self.cells = nn.ModuleList(cells)
        self.classifier = nn.Linear(c_prev, num_classes)
        k, n_ops = num_edges(nodes), len(self.primitives)
        # Small random α (as in the paper) so the first softmax is near uniform but not tied.
        # α in a submodule of its own, so it is addressable by name ("alpha.normal", "alpha.reduce") everywhere,
        # DDP's ignore list included (which cannot name parameters of the root module).
        self.alpha = nn.ParameterDict(
            {"normal": nn.Parameter(1e-3 * torch.randn(k, n_ops)), "reduce": nn.Parameter(1e-3 * torch.randn(k, n_ops))}
        )
        self.edge_normalization = edge_normalization
        if edge_normalization:  # PC-DARTS: a β per edge, softmax over each node's incoming edges
            self.alpha["beta_normal"] = nn.Parameter(1e-3 * torch.randn(k))
            self.alpha["beta_reduce"] = nn.Parameter(1e-3 * torch.randn(k))
        if speed.channels_last:
            self.to(memory_format=torch.channels_last)
        self._compiled: _CompiledOrEager | None = None

    @classmethod
    def from_config(cls, config: SearchConfig, in_channels: int, num_classes: int) -> SearchNetwork:
        """The supernet a search with ``config`` trains (freshly initialised: it draws from torch's RNG)."""
        return cls(
            in_channels=in_channels,
            channels=config.channels,
            num_classes=num_classes,
            layers=config.layers,
            nodes=config.nodes,
            primitives=config.primitives,
            stem_multiplier=config.stem_multiplier,
            speed=config.speed,
            partial_channels=config.partial_channels,
            edge_normalization=config.edge_normalization,
        )

    @property
    def alpha_normal(self) -> nn.Parameter:
        return self.alpha["normal"]

    @property
    def alpha_reduce(self) -> nn.Parameter:
        return self.alpha["reduce"]

    def __getstate__(self) -> dict[str, Any]:  # a compiled forward is rebuilt, never copied or pickled
        return {**super().__getstate__(), "_compiled": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.speed.compile:
            if self._compiled is None:
                self._compiled = _CompiledOrEager(self.supernet)
            return self._compiled(x)
        return self.supernet(x)

    def supernet(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, cells (each edge eq. 1 with softmax(α)), pooling, classifier."""
        w_normal = F.softmax(self.alpha_normal, dim=-1)
        w_reduce = F.softmax(self.alpha_reduce, dim=-1)
        if self.speed.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        s0 = s1 = self.stem(x)
        e_normal = e_reduce = None
        if self.edge_normalization:
            e_normal = node_softmax(self.alpha["beta_normal"], self.nodes)
            e_reduce = node_softmax(self.alpha["beta_reduce"], self.nodes)
        checkpointed = self.speed.checkpoint_cells and self.training and torch.is_grad_enabled()
        for cell in self.cells:
            w, e = (w_reduce, e_reduce) if cell.reduction else (w_normal, e_normal)
            s0, s1 = s1, checkpointed_cell(cell, s0, s1, w, e) if checkpointed else cell(s0, s1, w, e)
        return self.classifier(global_average_pool(s1))

    def alpha_names(self) -> tuple[str, ...]:
        return tuple(f"alpha.{name}" for name in self.alpha)

    def alphas(self) -> Iterator[nn.Parameter]:
        """The architecture parameters: α (normal cell, reduction cell), then PC-DARTS's β (same order) if any."""
        yield from self.alpha.values()

    def named_weights(self) -> Iterator[tuple[str, nn.Parameter]]:
        alpha_names = set(self.alpha_names())
        return ((n, p) for n, p in self.named_parameters() if n not in alpha_names)

    def weights(self) -> Iterator[nn.Parameter]:
        """The operation weights w: every parameter except α."""
        return (p for _, p in self.named_weights())

    def genotype(self) -> Genotype:
        """The discrete cell pair derived from the current α (top-2 edges per node by softmax weight)."""
        betas = (self.alpha["beta_normal"], self.alpha["beta_reduce"]) if self.edge_normalization else (None, None)
        return derive_genotype(self.alpha_normal, self.alpha_reduce, self.primitives, self.nodes, *betas)
