"""torch.distributed plumbing for the Ray Train workers: gradient averaging, global batch norm, DDP without α.

Kept apart from nas/ so the library stays single-process; these are the hooks nas.loop.LoopContext takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


def _flat_all_reduce(tensors: Sequence[Tensor], average: bool) -> None:
    """One collective for a whole list of tensors (fewer, larger messages than one per tensor)."""
    if not tensors or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if average:
        flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def average_tensors(tensors: Sequence[Tensor]) -> None:
    """Average in place across ranks (the gradients that enter the α step)."""
    _flat_all_reduce(tensors, average=True)


def sum_tensors(tensors: Sequence[Tensor]) -> None:
    """Sum in place across ranks (metric totals)."""
    _flat_all_reduce(tensors, average=False)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training statistics cover the global batch, on any backend (gloo included).

    ``nn.SyncBatchNorm`` runs on GPUs only; this one all-reduces the per-channel sums with a differentiable
    collective, so gradients flow across ranks as they would through one big batch.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        dims = (0, 2, 3)
        count = torch.tensor([x.numel() / x.size(1)], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dim=dims), (x * x).sum(dim=dims), count])
        stats = dist_fn.all_reduce(stats, op=dist.ReduceOp.SUM)
        c = x.size(1)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d for a GlobalBatchNorm2d sharing its parameters and buffers (names unchanged)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            replacement.load_state_dict(child.state_dict())
            if child.affine:
                replacement.weight, replacement.bias = child.weight, child.bias
            setattr(module, name, replacement)
        else:
            convert_to_global_batchnorm(child)
    return module


def wrap_ddp(module: nn.Module, device: torch.device, ignore: Sequence[str] = ()) -> nn.Module:
    """DDP for the weight step; α (``ignore``) is synchronized by the architect's own all-reduce instead."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return module
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(ignore))
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=True)
