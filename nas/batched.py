"""The same operation of several edges as one grouped operation (``search.speed.batched_edges``).

A supernet cell runs every candidate on each of its 14 edges: thousands of small operators per step, and on a GPU
the host's launches, not the arithmetic, set the step's time (bench/README.md). The edges that leave the same
state can all run at once: their inputs are stacked along the channels, edge after edge (an edge-major tensor of
m × C channels), and each candidate runs on that stack as one operator, its m edges' weights concatenated:

- a convolution with groups g becomes one convolution with groups m·g over the concatenated weights;
- batch norm normalizes each channel by its own batch statistics, so one batch norm over m·C channels is m of them;
  the running statistics are updated for all of them together at the end of the cell (:class:`RunningStats`);
- ReLU, pooling, identity and 'none' act per channel and run on the stack as they are.

The parameters stay where they are, one module per edge and candidate, so a checkpoint or a genotype is the same
with or without batching. A module of another kind runs edge by edge on its block of channels (correct, just not
batched).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nas.ops import (
    DepthwiseConv2d,
    FactorizedReduce,
    NormArguments,
    SepConv,
    Zero,
    batch_norm,
    forward_layer,
    grouped_pointwise,
    is_channels_last,
    norm_relu_separable,
    norm_relu_separable_layers,
    offset_grids,
    plain_pointwise,
    separable_recomputed,
)

CHANNEL_WISE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Identity, Zero)


class RunningStats:
    """Batch-norm running statistics of a cell's batched norms, written back to each edge's module at the end of the
    cell as two multi-tensor copies (``torch._foreach_copy_``) and one count, not one update per module. Each batched
    norm updates a concatenation of its modules' running statistics with PyTorch's own batch norm (the kernel each
    module would run: an exponential average with the module's momentum, unbiased variance)."""

    def __init__(self) -> None:
        self.means: list[torch.Tensor] = []
        self.variances: list[torch.Tensor] = []
        self.new_means: list[torch.Tensor] = []
        self.new_variances: list[torch.Tensor] = []
        self.counters: list[torch.Tensor] = []
        self.followers: list[tuple[nn.BatchNorm2d, int]] = []  # (norm, index of its leader's entry in self.means)

    def add(self, norms: Sequence[nn.BatchNorm2d], mean: torch.Tensor, variance: torch.Tensor) -> None:
        """``mean``, ``variance``: the updated running statistics of all of ``norms``' channels, in order."""
        width = norms[0].num_features
        for norm, m, v in zip(norms, mean.split(width), variance.split(width)):
            self.means.append(norm.running_mean)
            self.variances.append(norm.running_var)
            self.new_means.append(m)
            self.new_variances.append(v)
            self.counters.append(norm.num_batches_tracked)

    def follow(self, norms: Sequence[nn.BatchNorm2d], leaders: Sequence[nn.BatchNorm2d]) -> None:
        """``norms`` normalized the same batch as ``leaders`` (already added), each as its leader: a candidate without
        weights computed once for the edges leaving one state (``search.speed.weightless_once``). Each takes its
        leader's update, new = leader's new + (1 − momentum)·(own − leader's old): the exponential average of the
        same batch statistics, and bit for bit the leader's where the two had the same statistics."""
        index = {id(m): i for i, m in enumerate(self.means)}
        for norm, leader in zip(norms, leaders):
            self.followers.append((norm, index[id(leader.running_mean)]))

    def apply(self) -> None:
        if not self.means:
            return
        with torch.no_grad():
            if self.followers:  # from the leaders' old statistics, before they are overwritten below
                norms, leads = [n for n, _ in self.followers], [i for _, i in self.followers]
                keep = [1.0 - n.momentum for n in norms]
                for own, old, new in (
                    ("running_mean", self.means, self.new_means),
                    ("running_var", self.variances, self.new_variances),
                ):
                    moved = torch._foreach_sub([getattr(n, own) for n in norms], [old[i] for i in leads])
                    torch._foreach_mul_(moved, keep)
                    torch._foreach_add_(moved, [new[i] for i in leads])
                    torch._foreach_copy_([getattr(n, own) for n in norms], moved)
                torch._foreach_add_([n.num_batches_tracked for n in norms], 1)
            torch._foreach_copy_(self.means, self.new_means)
            torch._foreach_copy_(self.variances, self.new_variances)
            torch._foreach_add_(self.counters, 1)


def weightless(modules: Sequence[nn.Module]) -> bool:
    """Whether ``modules`` (one candidate on m edges) are alike and act channel by channel without weights (pooling,
    identity, 'none'; with an affine-free closing batch norm): on the same input they give the same output, so one
    computation can serve all the edges leaving one state."""
    first = modules[0]
    layers = (
        list(first) if isinstance(first, nn.Sequential) and type(first).forward is nn.Sequential.forward else [first]
    )
    if any(True for _ in first.parameters()):
        return False
    if not all(isinstance(m, CHANNEL_WISE) or type(m) is nn.BatchNorm2d for m in layers):
        return False
    text = repr(first)
    return all(type(m) is type(first) and repr(m) == text for m in modules)


def batchable(module: nn.Module) -> bool:
    """Whether every module inside ``module`` is of a kind :func:`batched` runs as one operator over edges (a plain
    ``nn.BatchNorm2d`` with a momentum; not a cross-rank one, whose statistics span ranks)."""
    for child in module.modules():
        if isinstance(child, nn.BatchNorm2d) and (type(child) is not nn.BatchNorm2d or child.momentum is None):
            return False
    return True


def batched(
    modules: Sequence[nn.Module], x: torch.Tensor, stats: RunningStats, recompute_depthwise: bool = False
) -> torch.Tensor:
    """``cat([modules[e](block e of x) for e], dim=1)`` with one operator per layer where the kind allows.

    ``modules``: the same candidate of m edges (same structure, own weights); ``x``: (N, m·C, H, W), edge e's input
    in channels [e·C, (e+1)·C). ``recompute_depthwise``: as :func:`batched_layers`."""
    first = modules[0]
    if isinstance(first, CHANNEL_WISE):
        return forward_layer(first, x, recompute_depthwise)
    if isinstance(first, nn.Sequential) and type(first).forward is nn.Sequential.forward:
        return batched_layers([list(m) for m in modules], x, stats, recompute_depthwise)
    if type(first) in (nn.Conv2d, DepthwiseConv2d):
        return _conv(modules, x)
    if type(first) is nn.BatchNorm2d:
        return _batch_norm(modules, x, stats)
    if type(first) is FactorizedReduce:
        return _factorized_reduce(modules, x, stats)
    return torch.cat([m(block) for m, block in zip(modules, x.chunk(len(modules), dim=1))], dim=1)


def batched_after_relu(modules: Sequence[nn.Module], relu_x: torch.Tensor, stats: RunningStats) -> torch.Tensor:
    """:func:`batched` given ``relu_x`` = ReLU(x), for a candidate that begins with that ReLU
    (:func:`nas.ops.starts_with_relu`): the edges' candidates then share one ReLU of the stacked inputs, as
    :func:`nas.ops.forward_after_relu` does for one edge."""
    first = modules[0]
    if isinstance(first, FactorizedReduce):
        return _factorized_reduce(modules, relu_x, stats, after_relu=True)
    if isinstance(first, SepConv):
        return batched([m[1] for m in modules], batched_after_relu([m[0] for m in modules], relu_x, stats), stats)
    return batched_layers([list(m)[1:] for m in modules], relu_x, stats)  # a Sequential that begins with ReLU


def batched_layers(
    layers: Sequence[Sequence[nn.Module]], x: torch.Tensor, stats: RunningStats, recompute_depthwise: bool = False
) -> torch.Tensor:
    """``x`` through each edge's ``layers`` in turn (the same kinds on every edge), each layer batched over edges;
    with ``recompute_depthwise`` each depthwise convolution and the plain 1x1 one after it as one separable
    convolution that recomputes the depthwise output in the backward, a training batch norm and ReLU before one (a
    sep_conv's middle) taken into it, so that the ReLU's output is recomputed too, and a max pooling's argmax
    recomputed (``search.speed.recompute_depthwise``)."""
    first, layer = layers[0], 0
    while layer < len(first):
        if recompute_depthwise and norm_relu_separable_layers(first[layer : layer + 4]):
            norms = [edge[layer] for edge in layers]
            arguments = stacked_norm_arguments(norms, stats)
            if arguments is not None:
                depthwise, pointwise = [edge[layer + 2] for edge in layers], [edge[layer + 3] for edge in layers]
                affine = norms[0].affine
                x = norm_relu_separable(
                    x,
                    torch.cat([n.weight for n in norms]) if affine else None,
                    torch.cat([n.bias for n in norms]) if affine else None,
                    arguments,
                    torch.cat([m.weight for m in depthwise]),
                    torch.cat([m.weight for m in pointwise]),
                    depthwise[0],
                    len(layers),
                )
                layer += 4
                continue
        if recompute_depthwise and layer + 1 < len(first) and _separable(first[layer], first[layer + 1]):
            depthwise, pointwise = [edge[layer] for edge in layers], [edge[layer + 1] for edge in layers]
            weight = torch.cat([m.weight for m in depthwise])
            x = separable_recomputed(x, weight, torch.cat([m.weight for m in pointwise]), depthwise[0], len(layers))
            layer += 2
            continue
        x = batched([edge[layer] for edge in layers], x, stats, recompute_depthwise)
        layer += 1
    return x


def _separable(depthwise: nn.Module, pointwise: nn.Module) -> bool:
    """A depthwise convolution followed by a plain 1x1 one (stride 1, no padding, groups or bias)."""
    return type(depthwise) is DepthwiseConv2d and depthwise.padding_mode == "zeros" and plain_pointwise(pointwise)


def one_norm(norms: Sequence[nn.BatchNorm2d]) -> bool:
    """Whether ``norms`` act as one batch norm over all their channels: the same momentum and ε."""
    return all(m.momentum == norms[0].momentum and m.eps == norms[0].eps for m in norms)


def stacked_norm_arguments(norms: Sequence[nn.BatchNorm2d], stats: RunningStats) -> NormArguments | None:
    """What one training batch norm over all of ``norms``' channels hands ``F.batch_norm`` (their running statistics
    concatenated, written back at the end of the cell by ``stats``; the momentum; ε; whether the native kernel may
    compute it, ``search.speed.native_norm``), for eq. 1's sum to compute it (``search.speed.norm_in_sum``) or
    :func:`nas.ops.batch_norm`; None where they are not one batch norm (:func:`one_norm`)."""
    n = norms[0]
    if not one_norm(norms):
        return None
    native = getattr(n, "native_norm", False)
    if not (n.track_running_stats and n.running_mean is not None):
        return NormArguments(None, None, 0.0, n.eps, native)
    running_mean = torch.cat([m.running_mean for m in norms])
    running_var = torch.cat([m.running_var for m in norms])
    stats.add(norms, running_mean, running_var)
    return NormArguments(running_mean, running_var, n.momentum, n.eps, native)


def _conv(convs: Sequence[nn.Conv2d], x: torch.Tensor) -> torch.Tensor:
    c = convs[0]
    weight = torch.cat([m.weight for m in convs])
    bias = None if c.bias is None else torch.cat([m.bias for m in convs])
    padding = c.padding if c.padding_mode == "zeros" else 0
    if c.padding_mode != "zeros":
        x = F.pad(x, c._reversed_padding_repeated_twice, mode=c.padding_mode)
    if isinstance(c, DepthwiseConv2d):
        return c.convolve(x, weight)  # as each edge's would, dense dilation and native gradient included
    if getattr(c, "native_pointwise", False) and plain_pointwise(c):  # search.speed.native_pointwise
        return grouped_pointwise(x, weight, c.groups * len(convs), True)
    return F.conv2d(x, weight, bias, c.stride, padding, c.dilation, c.groups * len(convs))


def _batch_norm(norms: Sequence[nn.BatchNorm2d], x: torch.Tensor, stats: RunningStats) -> torch.Tensor:
    n = norms[0]
    if not one_norm(norms):  # edge by edge
        return torch.cat([m(block) for m, block in zip(norms, x.chunk(len(norms), dim=1))], dim=1)
    weight = torch.cat([m.weight for m in norms]) if n.affine else None
    bias = torch.cat([m.bias for m in norms]) if n.affine else None
    if n.training or not (n.track_running_stats and n.running_mean is not None):  # batch statistics
        arguments = stacked_norm_arguments(norms, stats)
        assert arguments is not None  # one_norm holds
        return batch_norm(x, weight, bias, arguments)  # updates the copies
    running_mean = torch.cat([m.running_mean for m in norms])
    running_var = torch.cat([m.running_var for m in norms])
    return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, n.eps)


def _factorized_reduce(
    reduces: Sequence[FactorizedReduce], x: torch.Tensor, stats: RunningStats, after_relu: bool = False
) -> torch.Tensor:
    m = len(reduces)
    even, odd = offset_grids(x if after_relu else F.relu(x))
    a = _conv([r.conv_1 for r in reduces], even)
    b = _conv([r.conv_2 for r in reduces], odd)
    # Each edge's output is its two halves side by side: interleave the two stacks edge by edge (as (N, H, W, m·C)
    # pixels when channels_last: a stack of the 4-d tensors would be channels-first).
    if is_channels_last(a):
        halves = [t.permute(0, 2, 3, 1).unflatten(-1, (m, -1)) for t in (a, b)]
        both = torch.stack(halves, dim=-2).flatten(-3).permute(0, 3, 1, 2)
    else:
        both = torch.stack([a.unflatten(1, (m, -1)), b.unflatten(1, (m, -1))], dim=2).flatten(1, 3)
    return _batch_norm([r.bn for r in reduces], both, stats)
