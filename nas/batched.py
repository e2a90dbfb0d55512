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

from nas.ops import DepthwiseConv2d, FactorizedReduce, Zero, dilated_as_dense, offset_grids

CHANNEL_WISE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Identity, Zero)


class RunningStats:
    """Batch-norm running-statistics updates gathered over a cell and applied as a few multi-tensor operators
    (``torch._foreach_*``) instead of one update per batch norm: the same arithmetic as ``nn.BatchNorm2d``
    (an exponential average with the module's momentum, unbiased variance)."""

    def __init__(self) -> None:
        self.momentum: list[float] = []
        self.means: list[torch.Tensor] = []
        self.variances: list[torch.Tensor] = []
        self.new_means: list[torch.Tensor] = []
        self.new_variances: list[torch.Tensor] = []
        self.counters: list[torch.Tensor] = []

    def add(self, norms: Sequence[nn.BatchNorm2d], mean: torch.Tensor, variance: torch.Tensor) -> None:
        """``mean``, ``variance``: the batch's per-channel statistics over all of ``norms``' channels, in order (cast
        to the statistics' own dtype: under bf16 autocast they come in bf16, the running statistics stay fp32)."""
        mean, variance = mean.to(norms[0].running_mean.dtype), variance.to(norms[0].running_var.dtype)
        width = norms[0].num_features
        for norm, m, v in zip(norms, mean.split(width), variance.split(width)):
            self.momentum.append(float(norm.momentum))
            self.means.append(norm.running_mean)
            self.variances.append(norm.running_var)
            self.new_means.append(m)
            self.new_variances.append(v)
            self.counters.append(norm.num_batches_tracked)

    def apply(self) -> None:
        if not self.means:
            return
        with torch.no_grad():
            for momentum in set(self.momentum):
                chosen = [i for i, m in enumerate(self.momentum) if m == momentum]
                torch._foreach_lerp_([self.means[i] for i in chosen], [self.new_means[i] for i in chosen], momentum)
                torch._foreach_lerp_(
                    [self.variances[i] for i in chosen], [self.new_variances[i] for i in chosen], momentum
                )
            torch._foreach_add_(self.counters, 1)


def batchable(module: nn.Module) -> bool:
    """Whether every module inside ``module`` is of a kind :func:`batched` runs as one operator over edges (a plain
    ``nn.BatchNorm2d`` with a momentum; not a cross-rank one, whose statistics span ranks)."""
    for child in module.modules():
        if isinstance(child, nn.BatchNorm2d) and (type(child) is not nn.BatchNorm2d or child.momentum is None):
            return False
    return True


def batched(modules: Sequence[nn.Module], x: torch.Tensor, stats: RunningStats) -> torch.Tensor:
    """``cat([modules[e](block e of x) for e], dim=1)`` with one operator per layer where the kind allows.

    ``modules``: the same candidate of m edges (same structure, own weights); ``x``: (N, m·C, H, W), edge e's input
    in channels [e·C, (e+1)·C)."""
    first = modules[0]
    if isinstance(first, CHANNEL_WISE):
        return first(x)
    if isinstance(first, nn.Sequential) and type(first).forward is nn.Sequential.forward:
        for layer in range(len(first)):
            x = batched([m[layer] for m in modules], x, stats)
        return x
    if type(first) in (nn.Conv2d, DepthwiseConv2d):
        return _conv(modules, x)
    if type(first) is nn.BatchNorm2d:
        return _batch_norm(modules, x, stats)
    if type(first) is FactorizedReduce:
        return _factorized_reduce(modules, x, stats)
    return torch.cat([m(block) for m, block in zip(modules, x.chunk(len(modules), dim=1))], dim=1)


def _conv(convs: Sequence[nn.Conv2d], x: torch.Tensor) -> torch.Tensor:
    c = convs[0]
    weight = torch.cat([m.weight for m in convs])
    bias = None if c.bias is None else torch.cat([m.bias for m in convs])
    padding = c.padding if c.padding_mode == "zeros" else 0
    if c.padding_mode != "zeros":
        x = F.pad(x, c._reversed_padding_repeated_twice, mode=c.padding_mode)
    if isinstance(c, DepthwiseConv2d) and c.dense and c.dilation[0] > 1:
        return dilated_as_dense(x, weight, c.stride[0], c.padding[0], c.dilation[0])
    return F.conv2d(x, weight, bias, c.stride, padding, c.dilation, c.groups * len(convs))


def _batch_norm(norms: Sequence[nn.BatchNorm2d], x: torch.Tensor, stats: RunningStats) -> torch.Tensor:
    n = norms[0]
    weight = torch.cat([m.weight for m in norms]) if n.affine else None
    bias = torch.cat([m.bias for m in norms]) if n.affine else None
    tracked = n.track_running_stats and n.running_mean is not None
    if n.training or not tracked:
        if n.training and tracked:
            with torch.no_grad():
                variance, mean = torch.var_mean(x, dim=(0, 2, 3), correction=1)
            stats.add(norms, mean, variance)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, n.eps)
    running_mean = torch.cat([m.running_mean for m in norms])
    running_var = torch.cat([m.running_var for m in norms])
    return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, n.eps)


def _factorized_reduce(reduces: Sequence[FactorizedReduce], x: torch.Tensor, stats: RunningStats) -> torch.Tensor:
    m = len(reduces)
    even, odd = offset_grids(F.relu(x))
    a = _conv([r.conv_1 for r in reduces], even)
    b = _conv([r.conv_2 for r in reduces], odd)
    # Each edge's output is its two halves side by side: interleave the two stacks edge by edge.
    both = torch.stack([a.unflatten(1, (m, -1)), b.unflatten(1, (m, -1))], dim=2).flatten(1, 3)
    return _batch_norm([r.bn for r in reduces], both, stats)
