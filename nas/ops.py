"""Candidate operations of the DARTS search space and the registry that names them.

Every operation is built by a factory ``factory(channels, stride, affine) -> nn.Module`` that keeps the channel
count and divides the spatial size by ``stride``. The search supernet builds them with ``affine=False`` (as in
the paper, so batch-norm scales cannot stand in for α); evaluation networks build them with ``affine=True``.

Add an operation by name and it can be listed in a search's primitives or used in a genotype::

    from nas.ops import register_op

    @register_op("conv_3x3")
    def conv_3x3(channels: int, stride: int, affine: bool) -> nn.Module:
        return ReLUConvBN(channels, channels, 3, stride, 1, affine=affine)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from nas import kernels

OpFactory = Callable[[int, int, bool], nn.Module]

_REGISTRY: dict[str, OpFactory] = {}

# The 8 candidate operations of the DARTS paper (section 3.1), in the authors' order.
PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


def register_op(name: str, *, replace: bool = False) -> Callable[[OpFactory], OpFactory]:
    """Register an operation factory under ``name`` so searches and genotypes can refer to it."""

    def decorator(factory: OpFactory) -> OpFactory:
        if not replace and name in _REGISTRY:
            raise ValueError(f"operation {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def unregister_op(name: str) -> None:
    """Remove an operation added with :func:`register_op` (the 8 DARTS primitives stay)."""
    if name in PRIMITIVES:
        raise ValueError(f"the DARTS primitive {name!r} cannot be removed")
    _REGISTRY.pop(name, None)


def registered_ops() -> tuple[str, ...]:
    """Names of every registered operation (the 8 DARTS primitives first)."""
    return tuple(_REGISTRY)


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def is_parameter_free(name: str) -> bool:
    """True for an operation without weights at stride 1 (pools, skip_connect, 'none'): the ops a collapsing DARTS
    search drifts to, since they fit fastest early in training."""
    return _weightless(_factory(name))


@functools.cache
def _weightless(factory: OpFactory) -> bool:
    """Per factory, so an op registered again under the same name (``replace=True``) is looked at anew. The probe's
    weight initialisation must not draw from torch's RNG: the first call happens at a different epoch in a resumed
    worker than in an undisturbed one, and would shift every later random draw (augmentation, batch order)."""
    with torch.random.fork_rng(devices=[]):
        return not any(p.numel() for p in factory(4, 1, True).parameters())


def _factory(name: str) -> OpFactory:
    if name not in _REGISTRY:
        raise KeyError(f"unknown operation {name!r} (registered: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


def build_op(name: str, channels: int, stride: int, affine: bool = True) -> nn.Module:
    """Instantiate a registered operation."""
    factory = _factory(name)
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    return factory(channels, stride, affine)


class ReLUConvBN(nn.Sequential):
    """ReLU -> conv -> batch norm: the preprocessing of cell inputs."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


def dilated_as_dense(
    x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int, native_grad: bool = False
) -> torch.Tensor:
    """The depthwise ``conv2d(x, weight, stride, padding, dilation, groups=channels)`` computed as a dense (dilation 1)
    convolution, where the shapes allow: the same products and sums, in operators PyTorch runs several times faster
    on CPU (its backward of a dilated depthwise convolution is slow there).

    A dilated kernel only ever touches input pixels of one residue class (row mod d, column mod d) per output pixel:
    - stride 1: the d×d interleaved sub-grids are stacked along the batch (:func:`_grids_to_batch`), convolved
      densely with padding p/d, and interleaved back;
    - stride d: only the sub-grid of residue (0, 0) is read, so it is one dense convolution of ``x[:, :, ::d, ::d]``.
    Other shapes (padding not a multiple of d, a size not divisible by d at stride 1) run the dilated convolution.
    The result keeps the input's memory layout (channels_last or not). ``native_grad``: as :func:`depthwise_conv2d`.
    """
    d = dilation
    divisible = d > 1 and padding % d == 0
    if divisible and stride == d:
        out = depthwise_conv2d(sub_grid(x, d), weight, 1, padding // d, 1, native_grad)
        if is_channels_last(x):
            out = out.contiguous(memory_format=torch.channels_last)
        return out
    if divisible and stride == 1 and x.shape[-2] % d == 0 and x.shape[-1] % d == 0:
        if native_grad and _native_weight_gradient(x, weight, min_kernel=1):
            return _DenseDilatedNativeGrad.apply(x, weight, padding, d)
        return _batch_to_grids(depthwise_conv2d(_grids_to_batch(x, d), weight, 1, padding // d, 1, native_grad), d)
    return depthwise_conv2d(x, weight, stride, padding, d, native_grad)


class _DenseDilatedNativeGrad(torch.autograd.Function):
    """:func:`dilated_as_dense` at stride 1 that keeps only its input for the backward, not the re-laid copy of it
    (one activation less per dilated convolution): the weight's gradient comes from the native kernel on the input
    as it is (dilated), the input's from the dense re-layout without the forward (:func:`depthwise_input_gradient`'s
    way). Under ``create_graph`` (the exact Hessian) the backward differentiates a recomputed forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, padding: int, d: int):  # noqa: ANN001, ANN205
        ctx.geometry = (padding, d)
        ctx.save_for_backward(x, weight)
        return _batch_to_grids(F.conv2d(_grids_to_batch(x, d), weight, None, 1, padding // d, 1, weight.shape[0]), d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        x, weight = ctx.saved_tensors
        padding, d = ctx.geometry
        wanted = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            with torch.enable_grad():
                y = dilated_as_dense(x, weight, 1, padding, d)
            return (*_gradients_to_differentiate_again(y, (x, weight), wanted, grad), None, None)
        d_x = d_weight = None
        if wanted[0]:
            n, c, h, w = x.shape
            stand_in = _stand_in((d * d * n, c, h // d, w // d), x)
            d_x = _batch_to_grids(_input_gradient(_grids_to_batch(grad, d), weight, stand_in, 1, padding // d, 1), d)
        if wanted[1]:
            d_weight = kernels.depthwise_weight_gradient(x, grad, weight.shape[-1], 1, padding, d)
        return d_x, d_weight, None, None


def _gradients_to_differentiate_again(
    y: torch.Tensor, inputs: Sequence[torch.Tensor], wanted: Sequence[bool], grad: torch.Tensor
) -> list[torch.Tensor | None]:
    """The gradients of the recomputed ``y`` for the ``wanted`` ``inputs`` (None for the others), with a graph: a
    backward under ``create_graph`` (the exact Hessian) whose result is differentiated again."""
    found = iter(torch.autograd.grad(y, [t for t, want in zip(inputs, wanted) if want], grad, create_graph=True))
    return [next(found) if want else None for want in wanted]


# The smallest kernel whose weight gradient the native kernel computes: oneDNN's 3x3 one is as fast (bench/README.md).
NATIVE_GRAD_MIN_KERNEL = 5


def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int,
    padding: int,
    dilation: int,
    native_grad: bool = False,
    flipped: bool = False,
) -> torch.Tensor:
    """``F.conv2d(x, weight, None, stride, padding, dilation, groups=C)`` for a depthwise ``weight`` (C, 1, K, K).

    ``native_grad`` (``search.speed.native_depthwise_grad``): where the weight needs a gradient, the kernel is at
    least 5x5 and the tensors are float32 on the CPU (outside autocast and compiled graphs), the backward computes
    that gradient with :mod:`nas.kernels`' native kernel: the same sums in another order. ``flipped``
    (``search.speed.flipped_input_grad``): that backward computes the input's gradient at stride 1 as a forward
    convolution with the kernel flipped (:func:`_input_gradient`), else by PyTorch's backward."""
    if native_grad and _native_weight_gradient(x, weight, NATIVE_GRAD_MIN_KERNEL):
        return _NativeGradDepthwise.apply(x, weight, stride, padding, dilation, flipped)
    return F.conv2d(x, weight, None, stride, padding, dilation, weight.shape[0])


def native_grad_applies(x: torch.Tensor, weight: torch.Tensor, min_kernel: int = NATIVE_GRAD_MIN_KERNEL) -> bool:
    """Whether the native kernel computes this depthwise convolution's weight gradient (:func:`depthwise_conv2d`):
    a square kernel of at least ``min_kernel``, float32 CPU tensors outside autocast and compiled graphs (a graph
    cannot trace a C call), the kernel built here."""
    return (
        weight.shape[-1] == weight.shape[-2] >= min_kernel
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and kernels.native_available()
    )


def _native_weight_gradient(x: torch.Tensor, weight: torch.Tensor, min_kernel: int) -> bool:
    """Whether this forward records a native weight gradient: the weight needs one, and the kernel applies."""
    return weight.requires_grad and torch.is_grad_enabled() and native_grad_applies(x, weight, min_kernel)


class _NativeGradDepthwise(torch.autograd.Function):
    """A depthwise convolution whose backward computes the weight's gradient with the native kernel
    (:func:`depthwise_conv2d`). Under ``create_graph`` (the exact Hessian) it differentiates a recomputed forward
    instead, so the gradient can be differentiated again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int, flipped: bool):  # noqa: ANN001, ANN205
        ctx.geometry = (stride, padding, dilation)
        ctx.flipped = flipped
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, None, stride, padding, dilation, weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        wanted = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            with torch.enable_grad():
                y = F.conv2d(x, weight, None, stride, padding, dilation, weight.shape[0])
            return (*_gradients_to_differentiate_again(y, (x, weight), wanted, grad), None, None, None, None)
        d_x = d_weight = None
        if wanted[0]:
            d_x = _input_gradient(grad, weight, x, stride, padding, dilation, ctx.flipped)
        if wanted[1]:
            d_weight = kernels.depthwise_weight_gradient(x, grad, weight.shape[-1], stride, padding, dilation)
        return d_x, d_weight, None, None, None, None


class _SubGrid(torch.autograd.Function):
    """``x[:, :, row::step, col::step]`` with a gradient laid out as ``x`` is. PyTorch's own slice backward returns a
    channels-first gradient for a channels_last input, and every elementwise gradient that then meets it in the
    other layout (ReLU's, a sum's) takes a strided path 10-20 times slower on CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: int, row: int, col: int) -> torch.Tensor:  # noqa: ANN001
        ctx.shape, ctx.grid, ctx.layout = x.shape, (step, row, col), memory_layout(x)
        return x[:, :, row::step, col::step]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        step, row, col = ctx.grid
        full = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.layout).zero_()
        full[:, :, row::step, col::step] = grad  # a tracked copy: differentiable again (the exact Hessian's backward)
        return full, None, None, None


class _GlobalAveragePool(torch.autograd.Function):
    """(N, C, H, W) -> (N, C), the mean over the pixels, with a gradient laid out as the input is (PyTorch's adaptive
    average pooling and mean both hand back channels-first)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.shape, ctx.layout = x.shape, memory_layout(x)
        return x.mean((2, 3))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        n, c, h, w = ctx.shape
        spread = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.layout)
        return spread.copy_((grad / (h * w)).view(n, c, 1, 1).expand(ctx.shape))  # tracked: differentiable again


def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """The mean of every channel over the pixels, (N, C, H, W) -> (N, C); a channels_last input gets a channels_last
    gradient, so that layout reaches back through the whole network's backward."""
    return _GlobalAveragePool.apply(x)


def sub_grid(x: torch.Tensor, step: int, row: int = 0, col: int = 0) -> torch.Tensor:
    """The pixels (row + i·step, col + j·step) of every image and channel: a strided view whose gradient keeps the
    input's memory layout (:class:`_SubGrid`)."""
    return _SubGrid.apply(x, step, row, col)


def memory_layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format a tensor laid out as ``x`` is made in: channels_last for a channels_last ``x``, else plain."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def is_channels_last(x: torch.Tensor) -> bool:
    """Laid out channels_last and not also plainly contiguous (a tensor with one channel or one pixel is both)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _grids_to_batch(x: torch.Tensor, d: int) -> torch.Tensor:
    """(N, C, H, W) -> (d·d·N, C, H/d, W/d): sub-grid (r, q) = ``x[:, :, r::d, q::d]`` is batch block r·d + q. One
    copy, in the input's layout (moving whole channel vectors when it is channels_last)."""
    n, c, h, w = x.shape
    if is_channels_last(x):
        grids = x.permute(0, 2, 3, 1).reshape(n, h // d, d, w // d, d, c).permute(2, 4, 0, 1, 3, 5)
        return grids.reshape(d * d * n, h // d, w // d, c).permute(0, 3, 1, 2)
    return x.reshape(n, c, h // d, d, w // d, d).permute(3, 5, 0, 1, 2, 4).reshape(d * d * n, c, h // d, w // d)


def _batch_to_grids(y: torch.Tensor, d: int) -> torch.Tensor:
    """The inverse of :func:`_grids_to_batch`: interleave the d·d batch blocks back into one image each."""
    m, c, h, w = y.shape
    n = m // (d * d)
    if is_channels_last(y):
        grids = y.permute(0, 2, 3, 1).reshape(d, d, n, h, w, c).permute(2, 3, 0, 4, 1, 5)
        return grids.reshape(n, h * d, w * d, c).permute(0, 3, 1, 2)
    return y.reshape(d, d, n, c, h, w).permute(2, 3, 4, 0, 5, 1).reshape(n, c, h * d, w * d)


class DepthwiseConv2d(nn.Conv2d):
    """One filter per channel (groups = channels, no bias), optionally dilated. ``dense`` (off by default; the
    supernet sets it from ``search.speed.dense_dilation``) computes a dilated one with :func:`dilated_as_dense`;
    ``native_grad`` (likewise, from ``search.speed.native_depthwise_grad``) its weight gradient with the native
    kernel (:func:`depthwise_conv2d`); ``flipped`` (from ``search.speed.flipped_input_grad``) its input gradient at
    stride 1 as a forward convolution with the kernel flipped, and with ``native_grad`` a dilated one at stride 1
    runs dilated as it is, neither re-laid dense nor with PyTorch's dilated backward. The parameters and state dict
    are those of the ``nn.Conv2d`` it extends."""

    def __init__(self, channels: int, kernel: int, stride: int, padding: int, dilation: int):
        super().__init__(channels, channels, kernel, stride, padding, dilation=dilation, groups=channels, bias=False)
        self.dense = False
        self.native_grad = False
        self.flipped = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolve(x, self.weight)

    def convolve(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This convolution with ``weight`` for its own (a separable convolution's backward recomputes it, and the
        batched edges pass their concatenated weights)."""
        stride, padding, dilation = self.stride[0], self.padding[0], self.dilation[0]
        as_it_is = self.flipped and self.native_grad and dilation > 1 and stride == 1  # no dense re-layout
        if as_it_is and native_grad_applies(x, weight, min_kernel=1):
            if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):  # α passes: the input's alone
                return _NativeGradDepthwise.apply(x, weight, 1, padding, dilation, True)
            return F.conv2d(x, weight, None, 1, padding, dilation, weight.shape[0])  # no gradient wanted
        if self.dense and dilation > 1:
            return dilated_as_dense(x, weight, stride, padding, dilation, self.native_grad)
        return depthwise_conv2d(x, weight, stride, padding, dilation, self.native_grad, self.flipped)


class _SeparableRecomputed(torch.autograd.Function):
    """``pointwise(depthwise(x))`` keeping only ``x`` and the weights for the backward, which recomputes the depthwise
    output where it needs it: one or two activations less kept per separable or dilated convolution (the dense
    dilation's two re-laid copies), for one more depthwise convolution per backward that asks for a weight gradient.

    ``depthwise``: the :class:`DepthwiseConv2d`; ``groups``: the pointwise convolution's (the batched edges run m
    edges' pointwise convolutions as one of m groups). An undilated one goes back by ``convolution_backward`` directly,
    recomputing nothing when only the input's gradient is asked (an α-only pass); a dilated one recomputes its
    forward with a graph and differentiates that. Under ``create_graph`` (the exact Hessian) every kind does, so the
    gradient can be differentiated again."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, pointwise: torch.Tensor, depthwise: DepthwiseConv2d, groups: int
    ):  # noqa: ANN001, ANN205, E501
        ctx.depthwise, ctx.groups = depthwise, groups
        ctx.save_for_backward(x, weight, pointwise)
        return F.conv2d(depthwise.convolve(x, weight), pointwise, None, 1, 0, 1, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        x, weight, pointwise = ctx.saved_tensors
        depthwise: DepthwiseConv2d = ctx.depthwise
        wanted = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # a gradient that will be differentiated again: through a recomputed forward
            with torch.enable_grad():
                z = F.conv2d(depthwise.convolve(x, weight), pointwise, None, 1, 0, 1, ctx.groups)
            return (*_gradients_to_differentiate_again(z, (x, weight, pointwise), wanted, grad), None, None)
        return (*separable_gradients(grad, x, weight, pointwise, depthwise, ctx.groups, wanted), None, None)


def separable_gradients(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    pointwise: torch.Tensor,
    depthwise: DepthwiseConv2d,
    groups: int,
    wanted: Sequence[bool],
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``conv2d(depthwise.convolve(x, weight), pointwise, groups=groups)`` for the ``wanted`` of
    (x, weight, pointwise), given the output's ``grad``, not to be differentiated again, recomputing the depthwise
    output only where a weight gradient needs it. An undilated depthwise convolution goes back by
    ``convolution_backward`` directly; a dilated one recomputes its forward with a graph and differentiates that,
    unless only the input's gradient is asked (an α-only pass)."""
    if depthwise.dilation[0] != 1 and (wanted[1] or wanted[2]):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(want) for t, want in zip((x, weight, pointwise), wanted)]
            z = F.conv2d(depthwise.convolve(leaves[0], leaves[1]), leaves[2], None, 1, 0, 1, groups)
        found = iter(torch.autograd.grad(z, [t for t, want in zip(leaves, wanted) if want], grad))
        return tuple(next(found) if want else None for want in wanted)
    # The depthwise output is needed only for the pointwise weight's gradient; the input gradients read the
    # weights alone, so otherwise an unfilled tensor stands in for its shape.
    shape = (grad.shape[0], pointwise.shape[1] * groups, *grad.shape[2:])
    y = depthwise.convolve(x, weight) if wanted[2] else _stand_in(shape, x)
    d_y, d_pointwise, _ = torch.ops.aten.convolution_backward(
        grad,
        y,
        pointwise,
        None,
        [1, 1],
        [0, 0],
        [1, 1],
        False,
        [0, 0],
        groups,
        [wanted[0] or wanted[1], wanted[2], False],
    )
    if depthwise.dilation[0] != 1:  # only the input's gradient is asked (above): no forward to recompute
        return depthwise_input_gradient(depthwise, d_y, x, weight), None, d_pointwise
    d_x = d_weight = None
    if wanted[0] or wanted[1]:
        stride, padding = list(depthwise.stride), list(depthwise.padding)
        native = wanted[1] and depthwise.native_grad and native_grad_applies(x, weight)
        d_x, d_weight, _ = torch.ops.aten.convolution_backward(
            d_y,
            x,
            weight,
            None,
            stride,
            padding,
            [1, 1],
            False,
            [0, 0],
            weight.shape[0],
            [wanted[0], wanted[1] and not native, False],
        )
        if native:
            d_weight = kernels.depthwise_weight_gradient(x, d_y, weight.shape[-1], stride[0], padding[0], 1)
    return d_x, d_weight, d_pointwise


class _NormReluSeparable(torch.autograd.Function):
    """``conv2d(depthwise.convolve(relu(batch_norm(u)), weight), pointwise, groups=groups)``, the batch norm in
    training (batch statistics; the running ones updated once, in the forward), keeping for the backward only ``u``
    (which the norm's own backward keeps anyway), its per-channel mean and 1/σ and the weights: neither the ReLU's
    output nor the depthwise output. The backward recomputes both (one more batch norm and depthwise convolution),
    then goes back through the ReLU and the norm. This is the middle of a sep_conv (``search.speed.
    recompute_depthwise``); under ``create_graph`` (the exact Hessian) it differentiates a recomputed forward."""

    @staticmethod
    def forward(
        ctx,
        u: torch.Tensor,
        scale: torch.Tensor | None,
        shift: torch.Tensor | None,
        weight: torch.Tensor,
        pointwise: torch.Tensor,
        norm: tuple,
        depthwise: DepthwiseConv2d,
        groups: int,
    ):  # noqa: ANN001, ANN205
        y, mean, invstd = train_norm(u, scale, shift, norm)
        ctx.depthwise, ctx.groups, ctx.eps, ctx.native = depthwise, groups, norm.eps, norm.native
        ctx.save_for_backward(u, scale, shift, weight, pointwise, mean, invstd)
        return F.conv2d(depthwise.convolve(y.relu_(), weight), pointwise, None, 1, 0, 1, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        u, scale, shift, weight, pointwise, mean, invstd = ctx.saved_tensors
        depthwise: DepthwiseConv2d = ctx.depthwise
        wanted = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():
            with torch.enable_grad():
                r = F.relu(F.batch_norm(u, None, None, scale, shift, True, 0.0, ctx.eps))
                z = F.conv2d(depthwise.convolve(r, weight), pointwise, None, 1, 0, 1, ctx.groups)
            found = _gradients_to_differentiate_again(z, (u, scale, shift, weight, pointwise), wanted, grad)
            return (*found, None, None, None)
        # the same kernel on the same input: the forward's normalized values, bit for bit
        r = train_norm(u, scale, shift, NormArguments(None, None, 0.0, ctx.eps, ctx.native))[0].relu_()
        want_r = any(wanted[:3])
        d_r, d_weight, d_pointwise = separable_gradients(
            grad, r, weight, pointwise, depthwise, ctx.groups, (want_r, wanted[3], wanted[4])
        )
        d_u = d_scale = d_shift = None
        if want_r:
            d_y = torch.ops.aten.threshold_backward(d_r, r, 0)
            d_u, d_scale, d_shift = train_norm_backward(d_y, u, scale, mean, invstd, ctx.eps, wanted[:3], ctx.native)
        return d_u, d_scale, d_shift, d_weight, d_pointwise, None, None, None


def depthwise_input_gradient(
    depthwise: DepthwiseConv2d, d_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """The gradient of ``depthwise.convolve(x, weight)`` for ``x``, given the output's ``d_y``, by the operators its
    own backward runs (the same values) but without its forward: the input's values are never read, only its
    shape. A stride-d dense dilation (a reduction cell) takes the general way: it recomputes."""
    d, stride, padding = depthwise.dilation[0], depthwise.stride[0], depthwise.padding[0]
    if depthwise.flipped and stride == 1:
        return _input_gradient(d_y, weight, _stand_in(x.shape, x), 1, padding, d, flipped=True)
    dense = depthwise.dense and d > 1 and padding % d == 0
    if dense and stride == 1 and x.shape[-2] % d == 0 and x.shape[-1] % d == 0:
        n, c, h, w = x.shape
        stand_in = _stand_in((d * d * n, c, h // d, w // d), x)
        return _batch_to_grids(_input_gradient(_grids_to_batch(d_y, d), weight, stand_in, 1, padding // d, 1), d)
    if dense and stride == d:
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            return torch.autograd.grad(depthwise.convolve(leaf, weight), leaf, d_y)[0]
    return _input_gradient(d_y, weight, _stand_in(x.shape, x), stride, padding, d)


def _input_gradient(
    grad: torch.Tensor,
    weight: torch.Tensor,
    x: torch.Tensor,
    stride: int,
    padding: int,
    dilation: int,
    flipped: bool = False,
) -> torch.Tensor:
    """The input's gradient of a depthwise convolution of ``x``, given its output's ``grad``: PyTorch's backward,
    which reads only the input's shape and layout (``x`` may be an unfilled stand-in: :func:`_stand_in`); with
    ``flipped`` at stride 1, the forward convolution of ``grad`` with the kernel flipped (``search.speed.
    flipped_input_grad``): each input pixel gathers the output pixels its taps reached, so the same products, by
    oneDNN's forward kernel, which at the search's shapes is as fast dilated as dense, where its dilated input
    gradient takes 10-15 times as long (bench/README.md)."""
    k = weight.shape[-1]
    turned = dilation * (k - 1) - padding  # the padding that gives back the input's size
    if flipped and stride == 1 and weight.shape[-2] == k and turned >= 0:
        d_x = F.conv2d(grad, weight.flip(-2, -1), None, 1, turned, dilation, weight.shape[0])
        return d_x.contiguous(memory_format=memory_layout(x))
    return torch.ops.aten.convolution_backward(
        grad,
        x,
        weight,
        None,
        [stride] * 2,
        [padding] * 2,
        [dilation] * 2,
        False,
        [0, 0],
        weight.shape[0],
        [True, False, False],
    )[0]


def _stand_in(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """An unfilled tensor of ``shape`` with ``like``'s dtype, device and memory layout."""
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_layout(like))


def separable(depthwise: DepthwiseConv2d, pointwise: nn.Conv2d, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    """``pointwise(depthwise(x))``; with ``recompute`` (and a plain 1x1 ``pointwise``: stride 1, no padding, groups or
    bias), the depthwise output is recomputed in the backward instead of kept (:class:`_SeparableRecomputed`)."""
    if not recompute or not plain_pointwise(pointwise):
        return pointwise(depthwise(x))
    return separable_recomputed(x, depthwise.weight, pointwise.weight, depthwise, 1)


def plain_pointwise(conv: nn.Module) -> bool:
    """A plain 1x1 convolution (stride 1, no padding, groups or bias): what :class:`_SeparableRecomputed` runs."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.groups == 1
        and conv.bias is None
    )


def separable_recomputed(
    x: torch.Tensor, weight: torch.Tensor, pointwise: torch.Tensor, depthwise: DepthwiseConv2d, groups: int
) -> torch.Tensor:
    """``conv2d(depthwise.convolve(x, weight), pointwise, groups=groups)``, the depthwise output recomputed in the
    backward instead of kept (:class:`_SeparableRecomputed`)."""
    return _SeparableRecomputed.apply(x, weight, pointwise, depthwise, groups)


def norm_relu_separable(
    u: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    norm: NormArguments,
    weight: torch.Tensor,
    pointwise: torch.Tensor,
    depthwise: DepthwiseConv2d,
    groups: int,
) -> torch.Tensor:
    """A training batch norm of ``u`` (affine ``scale`` and ``shift`` or None; ``norm``: :class:`NormArguments`),
    ReLU, then :func:`separable_recomputed`, keeping neither the ReLU's output nor the depthwise output for the
    backward (:class:`_NormReluSeparable`)."""
    return _NormReluSeparable.apply(u, scale, shift, weight, pointwise, norm, depthwise, groups)


def norm_relu_separable_layers(layers: Sequence[nn.Module]) -> bool:
    """Whether ``layers`` are a batch norm in training (batch statistics), a ReLU, a depthwise convolution and a plain
    1x1 one: what :func:`norm_relu_separable` runs as one."""
    if len(layers) < 4 or type(layers[0]) is not nn.BatchNorm2d or type(layers[1]) is not nn.ReLU:
        return False
    norm, depthwise = layers[0], layers[2]
    return (
        batch_statistics(norm)
        and type(depthwise) is DepthwiseConv2d
        and depthwise.padding_mode == "zeros"
        and plain_pointwise(layers[3])
    )


def grouped_pointwise(x: torch.Tensor, weight: torch.Tensor, groups: int, native: bool) -> torch.Tensor:
    """``F.conv2d(x, weight, groups=groups)`` for a 1x1 ``weight`` with as many channels out as in a group; with
    ``native`` (``search.speed.native_pointwise``) by the native kernel (:class:`_NativePointwise`) where it applies
    (:func:`native_pointwise_applies`)."""
    if native and native_pointwise_applies(x, weight, groups):
        return _NativePointwise.apply(x, weight)
    return F.conv2d(x, weight, None, 1, 0, 1, groups)


def native_pointwise_applies(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """Whether the native kernel computes this grouped 1x1 convolution: groups of 2, 4, 8 or 16 channels in and out
    (wider ones are oneDNN's fast case), a float32 CPU input laid out channels_last, outside autocast and compiled
    graphs, the kernel built here."""
    width = weight.shape[1]
    return (
        weight.shape[0] == width * groups
        and width in kernels.POINTWISE_WIDTHS
        and tuple(weight.shape[2:]) == (1, 1)
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and kernels.native_available()
    )


class _NativePointwise(torch.autograd.Function):
    """A grouped 1x1 convolution by the native kernel (:func:`grouped_pointwise`): forward, and in the backward the
    input's gradient (the same kernel with each group's weight transposed) and the weight's. Under ``create_graph``
    (the exact Hessian) the backward differentiates a recomputed forward of PyTorch's instead."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, weight)
        return kernels.grouped_pointwise(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        x, weight = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            with torch.enable_grad():
                y = F.conv2d(x, weight, None, 1, 0, 1, weight.shape[0] // weight.shape[1])
            return tuple(_gradients_to_differentiate_again(y, (x, weight), wanted, grad))
        d_x = kernels.grouped_pointwise(grad, weight, transposed=True) if wanted[0] else None
        d_weight = kernels.grouped_pointwise_weight_gradient(x, grad, weight.shape[1]) if wanted[1] else None
        return d_x, d_weight


class NormArguments(NamedTuple):
    """What a training batch norm hands its kernel besides its input, scale and shift: the running mean and variance
    (None where it runs without them), the averaging factor, ε, and whether the native kernel may compute it
    (``search.speed.native_norm``, :func:`native_norm_applies`)."""

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    momentum: float
    eps: float
    native: bool = False


def norm_arguments(norm: nn.BatchNorm2d) -> NormArguments:
    """What ``norm``'s training forward hands ``F.batch_norm``, counting the batch as ``nn.BatchNorm2d.forward``
    does; ``native`` as the search set it on the module (``search.speed.native_norm``)."""
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    running = (norm.running_mean, norm.running_var) if norm.track_running_stats else (None, None)
    return NormArguments(*running, factor, norm.eps, getattr(norm, "native_norm", False))


# PyTorch's channels_last batch norm is fast where the channels are a multiple of this (its vector width in float32
# on AVX-512), and 4-10 times slower otherwise; the native kernel computes the others (bench/README.md).
NATIVE_NORM_SKIPS_MULTIPLES_OF = 16


def native_norm_applies(x: torch.Tensor) -> bool:
    """Whether the native kernel computes a training batch norm of ``x`` (``search.speed.native_norm``): a float32
    CPU tensor laid out channels_last whose channels are not a multiple of 16, outside autocast and compiled graphs
    (a graph cannot trace a C call), the kernel built here."""
    return (
        x.dim() == 4
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.shape[1] % NATIVE_NORM_SKIPS_MULTIPLES_OF != 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and kernels.native_available()
    )


def train_norm(
    x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None, norm: NormArguments
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.native_batch_norm`` in training (batch statistics, the running ones moved): the output, the batch's
    per-channel mean and 1/σ; by the native kernel where ``norm.native`` and it applies (:func:`native_norm_applies`).
    Not differentiable: for the forward of an autograd function, whose backward is :func:`train_norm_backward`."""
    if norm.native and native_norm_applies(x):
        return kernels.norm_forward(x, scale, shift, norm.running_mean, norm.running_var, norm.momentum, norm.eps)
    return torch.native_batch_norm(x, scale, shift, norm.running_mean, norm.running_var, True, norm.momentum, norm.eps)


def train_norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    eps: float,
    wanted: Sequence[bool],
    native: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``native_batch_norm_backward`` of a training batch norm: the gradients of its input, scale and shift (None
    where not ``wanted``); by the native kernel where ``native`` and it applies, except under ``create_graph`` (the
    exact Hessian), where PyTorch's differentiable operator runs."""
    if native and not torch.is_grad_enabled() and native_norm_applies(x):
        return kernels.norm_backward(grad, x, scale, mean, invstd, (wanted[0], wanted[1], wanted[2]))
    found = torch.ops.aten.native_batch_norm_backward(grad, x, scale, None, None, mean, invstd, True, eps, list(wanted))
    return tuple(t if want else None for t, want in zip(found, wanted))


def batch_norm(
    x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None, norm: NormArguments
) -> torch.Tensor:
    """``F.batch_norm`` in training given ``norm`` (:func:`norm_arguments`): the native kernel's forward and backward
    (:class:`_NativeNorm`) where ``norm.native`` and it applies, else PyTorch's."""
    if norm.native and native_norm_applies(x):
        return _NativeNorm.apply(x, scale, shift, norm)
    return F.batch_norm(x, norm.running_mean, norm.running_var, scale, shift, True, norm.momentum, norm.eps)


class _NativeNorm(torch.autograd.Function):
    """A training batch norm by the native kernel (:func:`batch_norm`), keeping its input, scale and the batch's
    mean and 1/σ for the backward, as PyTorch's does. Under ``create_graph`` (the exact Hessian) it differentiates
    a recomputed forward of PyTorch's operators instead."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None, norm: NormArguments):  # noqa: ANN001, ANN205
        y, mean, invstd = train_norm(x, scale, shift, norm)
        ctx.eps = norm.eps
        ctx.save_for_backward(x, scale, shift, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        x, scale, shift, mean, invstd = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            with torch.enable_grad():
                y = F.batch_norm(x, None, None, scale, shift, True, 0.0, ctx.eps)
            return (*_gradients_to_differentiate_again(y, (x, scale, shift), wanted, grad), None)
        d_x, d_scale, d_shift = train_norm_backward(grad, x, scale, mean, invstd, ctx.eps, wanted, True)
        return d_x, d_scale, d_shift, None


class _MaxPoolRecomputed(torch.autograd.Function):
    """``pool(x)`` for an ``nn.MaxPool2d`` keeping only ``x`` for the backward, not the argmax indices (int64: twice
    the size of a float32 output), which the backward finds again from ``x`` with one more pooling. Under
    ``create_graph`` (the exact Hessian) it differentiates a recomputed forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:  # noqa: ANN001
        ctx.pool = pool
        ctx.save_for_backward(x)
        return pool(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # noqa: ANN001
        (x,) = ctx.saved_tensors
        pool: nn.MaxPool2d = ctx.pool
        if torch.is_grad_enabled():
            with torch.enable_grad():
                y = pool(x)
            return _gradients_to_differentiate_again(y, (x,), (True,), grad)[0], None
        geometry = (
            _pair(pool.kernel_size),
            _pair(pool.stride if pool.stride is not None else pool.kernel_size),
            _pair(pool.padding),
            _pair(pool.dilation),
            pool.ceil_mode,
        )
        indices = torch.ops.aten.max_pool2d_with_indices(x, *geometry)[1]
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *geometry, indices), None


class _NativePool(torch.autograd.Function):
    """A max or average pooling by the native kernel (:func:`pool2d`); the backward PyTorch's own, from the argmax
    indices the kernel wrote as PyTorch writes them. Under ``create_graph`` (the exact Hessian) it differentiates a
    recomputed forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: int, stride: int, padding: int, ceil_mode: bool, is_max: bool):  # noqa: ANN001, ANN205
        y, indices = kernels.pool2d(x, kernel, stride, padding, ceil_mode, is_max)
        ctx.geometry, ctx.is_max = (kernel, stride, padding, ceil_mode), is_max
        ctx.save_for_backward(x, *([indices] if is_max else []))
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        x, *indices = ctx.saved_tensors
        kernel, stride, padding, ceil_mode = ctx.geometry
        if torch.is_grad_enabled():
            with torch.enable_grad():
                y = pool2d(x, kernel, stride, padding, ceil_mode, ctx.is_max, native=False)
            return _gradients_to_differentiate_again(y, (x,), (True,), grad)[0], None, None, None, None, None
        window, step, pad = [kernel] * 2, [stride] * 2, [padding] * 2
        if ctx.is_max:
            d_x = torch.ops.aten.max_pool2d_with_indices_backward(
                grad, x, window, step, pad, [1, 1], ceil_mode, indices[0]
            )
        else:
            d_x = torch.ops.aten.avg_pool2d_backward(grad, x, window, step, pad, ceil_mode, False, None)
        return d_x, None, None, None, None, None


def pool2d(
    x: torch.Tensor, kernel: int, stride: int, padding: int, ceil_mode: bool, is_max: bool, native: bool
) -> torch.Tensor:
    """``F.max_pool2d`` (``is_max``) or ``F.avg_pool2d`` with ``count_include_pad=False`` of a square window; with
    ``native`` (``search.speed.native_pool``) by the native kernel where it applies (:func:`native_pool_applies`):
    the same values, argmax and gradients as PyTorch's."""
    if native and native_pool_applies(x):
        return _NativePool.apply(x, kernel, stride, padding, ceil_mode, is_max)
    if is_max:
        return F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode)
    return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad=False)


def native_pool_applies(x: torch.Tensor) -> bool:
    """Whether the native kernel computes a pooling of ``x``: a 4-d float32 CPU tensor whose channels are dense
    (channels_last, or channels cut from it, as PC-DARTS cuts them), outside autocast and compiled graphs (a graph
    cannot trace a C call), the kernel built here."""
    return (
        x.dim() == 4
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and kernels.dense_channels(x)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and kernels.native_available()
    )


def pool_geometry(layer: nn.Module) -> tuple[int, int, int, bool, bool] | None:
    """(kernel, stride, padding, ceil_mode, is_max) of a pooling :func:`pool2d` computes: an ``nn.MaxPool2d``
    without dilation or returned indices, or an ``nn.AvgPool2d`` that counts only the inputs inside, both of square
    windows, strides and paddings; None for any other layer."""
    if type(layer) is nn.MaxPool2d:
        if layer.return_indices or _pair(layer.dilation) != (1, 1):
            return None
    elif type(layer) is not nn.AvgPool2d or layer.count_include_pad or layer.divisor_override is not None:
        return None
    kernel, padding = _pair(layer.kernel_size), _pair(layer.padding)
    stride = _pair(layer.stride if layer.stride is not None else layer.kernel_size)
    if any(len(set(pair)) != 1 for pair in (kernel, stride, padding)):
        return None
    return kernel[0], stride[0], padding[0], layer.ceil_mode, type(layer) is nn.MaxPool2d


def forward_layer(layer: nn.Module, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    """``layer(x)``; with ``recompute`` (``search.speed.recompute_depthwise``) a max pooling that keeps no argmax
    indices for the backward (:class:`_MaxPoolRecomputed`); a pooling marked ``native_pool`` by the search by the
    native kernel where it applies (:func:`pool2d`); a training batch norm marked ``native_norm`` by the search by
    the native kernel where it applies (:func:`batch_norm`)."""
    if recompute and type(layer) is nn.MaxPool2d and not layer.return_indices and torch.is_grad_enabled():
        return _MaxPoolRecomputed.apply(x, layer)
    if getattr(layer, "native_pool", False) and (geometry := pool_geometry(layer)) is not None:
        return pool2d(x, *geometry, native=True)
    native = type(layer) is nn.BatchNorm2d and getattr(layer, "native_norm", False)
    if native and batch_statistics(layer) and native_norm_applies(x):
        return batch_norm(x, layer.weight, layer.bias, norm_arguments(layer))
    return layer(x)


def batch_statistics(norm: nn.BatchNorm2d) -> bool:
    """Whether ``norm`` normalizes by the batch's statistics (training, or no running ones), as its forward does."""
    return norm.training or not (norm.track_running_stats and norm.running_mean is not None)


class DilConv(nn.Sequential):
    """ReLU -> dilated depthwise conv -> pointwise conv -> batch norm."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int, affine: bool = True
    ):
        super().__init__(
            nn.ReLU(inplace=False),
            DepthwiseConv2d(c_in, kernel, stride, padding, dilation),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """Two stacked separable convolutions (the first carries the stride), as in the DARTS authors' code."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            DilConv(c_in, c_in, kernel, stride, padding, 1, affine=affine),
            DilConv(c_in, c_out, kernel, 1, padding, 1, affine=affine),
        )


class Zero(nn.Module):
    """The 'none' operation: zeros of the output shape (a missing edge)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the spatial size with two offset stride-2 1x1 convolutions, concatenated.

    The offset branch pads one row and column at the far edge, which equals the authors' ``x[:, :, 1:, 1:]`` on
    even sizes and keeps both branches the same shape on odd sizes (the authors' version fails there).

    A stride-2 1x1 convolution reads only the even sub-grid of its input, so each branch runs as a stride-1 1x1
    convolution of its sub-grid (:func:`offset_grids`): the same products, and it keeps clear of PyTorch's CPU
    backward of a channels_last stride-2 1x1 convolution with few input channels, which corrupts the heap (seen
    with 2-4 input channels, torch 2.14.1).
    """

    def __init__(self, c_in: int, c_out: int, affine: bool = True):
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {c_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_after_relu(self.relu(x))

    def forward_after_relu(self, x: torch.Tensor) -> torch.Tensor:
        """The rest of :meth:`forward`, given ReLU(x) (a supernet edge computes that ReLU once for all its ops)."""
        even, odd = offset_grids(x)
        return forward_layer(self.bn, torch.cat([self.conv_1(even), self.conv_2(odd)], dim=1), False)


def offset_grids(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What :class:`FactorizedReduce`'s two branches read: ``x[:, :, ::2, ::2]`` and, one pixel down and right
    (zero-padded at the far edge), ``pad(x)[:, :, 1::2, 1::2]``; both ceil(H/2) × ceil(W/2). On even sizes the pad
    is never read, so it is left out (a copy of the whole input less), and both come from one operator
    (:class:`_OffsetGrids`)."""
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        return sub_grid(x, 2), sub_grid(F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2)), 2, 1, 1)
    return _OffsetGrids.apply(x)


class _OffsetGrids(torch.autograd.Function):
    """The sub-grids of residues (0, 0) and (1, 1) of an input of even size, with one gradient for both in the
    input's layout: the other two residues zeroed and the two gradients copied into place. Two :func:`sub_grid`
    backwards would each zero a whole input, and their sum read both again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        ctx.shape, ctx.layout = x.shape, memory_layout(x)
        return x[:, :, 0::2, 0::2], x[:, :, 1::2, 1::2]

    @staticmethod
    def backward(ctx, even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        full = torch.empty(ctx.shape, dtype=even.dtype, device=even.device, memory_format=ctx.layout)
        full[:, :, 0::2, 1::2].zero_()
        full[:, :, 1::2, 0::2].zero_()
        full[:, :, 0::2, 0::2] = even  # tracked copies: differentiable again (the exact Hessian's backward)
        full[:, :, 1::2, 1::2] = odd
        return full


def starts_with_relu(op: nn.Module) -> bool:
    """Whether ``op(x)`` begins with ReLU(x), so :func:`forward_after_relu` can take a ReLU computed elsewhere."""
    if isinstance(op, FactorizedReduce):
        return True
    if isinstance(op, SepConv):
        return starts_with_relu(op[0])
    return isinstance(op, nn.Sequential) and len(op) > 0 and type(op[0]) is nn.ReLU


def forward_after_relu(op: nn.Module, relu_x: torch.Tensor) -> torch.Tensor:
    """``op(x)`` given ``relu_x`` = ReLU(x), for an op where :func:`starts_with_relu` holds: the same modules and
    parameters, the leading ReLU skipped."""
    if isinstance(op, FactorizedReduce):
        return op.forward_after_relu(relu_x)
    if isinstance(op, SepConv):
        return op[1](forward_after_relu(op[0], relu_x))
    for module in list(op)[1:]:
        relu_x = module(relu_x)
    return relu_x


@register_op("none")
def _none(channels: int, stride: int, affine: bool) -> nn.Module:
    return Zero(stride)


@register_op("max_pool_3x3")
def _max_pool_3x3(channels: int, stride: int, affine: bool) -> nn.Module:
    return nn.MaxPool2d(3, stride=stride, padding=1)


@register_op("avg_pool_3x3")
def _avg_pool_3x3(channels: int, stride: int, affine: bool) -> nn.Module:
    return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)


@register_op("skip_connect")
def _skip_connect(channels: int, stride: int, affine: bool) -> nn.Module:
    return nn.Identity() if stride == 1 else FactorizedReduce(channels, channels, affine=affine)


@register_op("sep_conv_3x3")
def _sep_conv_3x3(channels: int, stride: int, affine: bool) -> nn.Module:
    return SepConv(channels, channels, 3, stride, 1, affine=affine)


@register_op("sep_conv_5x5")
def _sep_conv_5x5(channels: int, stride: int, affine: bool) -> nn.Module:
    return SepConv(channels, channels, 5, stride, 2, affine=affine)


@register_op("dil_conv_3x3")
def _dil_conv_3x3(channels: int, stride: int, affine: bool) -> nn.Module:
    return DilConv(channels, channels, 3, stride, 2, 2, affine=affine)


@register_op("dil_conv_5x5")
def _dil_conv_5x5(channels: int, stride: int, affine: bool) -> nn.Module:
    return DilConv(channels, channels, 5, stride, 4, 2, affine=affine)


# Operations outside the DARTS search space, registered so the published NASNet and AmoebaNet cells build.
@register_op("sep_conv_7x7")
def _sep_conv_7x7(channels: int, stride: int, affine: bool) -> nn.Module:
    return SepConv(channels, channels, 7, stride, 3, affine=affine)


@register_op("conv_7x1_1x7")
def _conv_7x1_1x7(channels: int, stride: int, affine: bool) -> nn.Module:
    return nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(channels, channels, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
        nn.Conv2d(channels, channels, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
        nn.BatchNorm2d(channels, affine=affine),
    )
