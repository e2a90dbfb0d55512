"""The native kernels (nas/kernels.py): the depthwise weight gradient (nas/depthwise_grad.c,
``search.speed.native_depthwise_grad``), the same gradient as PyTorch's over the geometries a search meets and odd
ones, reached by every 5x5 depthwise convolution of a search step; the once-per-state gradients of the batched sum
(nas/edge_sum_grad.c, ``search.speed.weightless_once``) against their formulas; the channels_last training batch
norm (nas/norm_cl.c, ``search.speed.native_norm``) against PyTorch's, reached by every narrow norm of a search step;
the poolings (nas/pool.c, ``search.speed.native_pool``): PyTorch's values, argmax and gradients, every pooling of a
search step; built once into a cache, and PyTorch's operators where no compiler builds them."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from processes import run_bounded
from torch.utils._python_dispatch import TorchDispatchMode

from nas import kernels
from nas.config import SearchConfig, SpeedConfig
from nas.ops import NormArguments, batch_norm, depthwise_conv2d, dilated_as_dense, native_norm_applies
from nas.search import Searcher

ROOT = Path(__file__).resolve().parents[1]


def pytorch_weight_gradient(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, s: int, p: int, d: int):
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, [s] * 2, [p] * 2, [d] * 2, False, [0, 0], weight.shape[0], [False, True, False]
    )[1]


@pytest.mark.parametrize("layout", ["channels_last", "channels_first", "sub_grid"])
@pytest.mark.parametrize(
    ("channels", "kernel", "stride", "padding", "dilation", "height", "width"),
    [
        (16, 5, 1, 2, 1, 32, 32),  # sep_conv_5x5 at the search's size
        (80, 5, 1, 2, 1, 16, 16),  # five edges batched: several full vectors of 16 channels
        (37, 5, 2, 2, 1, 15, 17),  # a reduction: stride 2, odd sizes, channels past the last full vector
        (5, 5, 1, 4, 2, 9, 7),  # dilated, no dense re-layout
        (3, 7, 1, 3, 1, 6, 11),  # 7x7, a kernel wider than the image's height
        (20, 5, 1, 0, 1, 8, 8),  # no padding
        (4, 5, 3, 4, 1, 10, 9),  # stride 3, padding past half the kernel
        (1, 6, 2, 1, 1, 7, 7),  # an even kernel, one channel
        (17, 3, 1, 1, 1, 12, 12),  # 3x3: the kernel computes it too (the search keeps PyTorch's there)
    ],
)
def test_the_native_weight_gradient_equals_pytorchs(
    channels: int, kernel: int, stride: int, padding: int, dilation: int, height: int, width: int, layout: str
) -> None:
    gen = torch.Generator().manual_seed(channels * 7 + kernel)
    x = torch.randn(3, channels, height, width, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "sub_grid":  # a strided view of a channels_last tensor, as the dense dilation hands over
        x = torch.randn(3, channels, 2 * height, 2 * width, generator=gen)
        x = x.contiguous(memory_format=torch.channels_last)[:, :, 1::2, ::2]
    weight = torch.randn(channels, 1, kernel, kernel, generator=gen)
    out = F.conv2d(x, weight, None, stride, padding, dilation, channels)
    grad = torch.randn(out.shape, generator=gen)
    want = pytorch_weight_gradient(x.double(), grad.double(), weight.double(), stride, padding, dilation)
    got = kernels.depthwise_weight_gradient(x, grad, kernel, stride, padding, dilation)
    assert got.shape == weight.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
def test_a_depthwise_convolution_with_the_native_gradient_has_pytorchs_gradients_and_hessian(
    stride: int, dilation: int
) -> None:
    """Through :func:`nas.ops.depthwise_conv2d` and the dense dilation: the input's and the weight's gradients, and
    (``create_graph``, the exact Hessian) a second derivative."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 12, 12).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(6, 1, 5, 5, requires_grad=True)
    padding = 2 * dilation
    results = []
    for native in (True, False):
        out = dilated_as_dense(x, weight, stride, padding, dilation, native_grad=native)
        first = torch.autograd.grad(out.square().sum(), [x, weight], create_graph=True)
        second = torch.autograd.grad(sum(g.sin().sum() for g in first), [x, weight])
        plain = torch.autograd.grad(
            depthwise_conv2d(x, weight, stride, padding, dilation, native).square().sum(), [x, weight]
        )
        results.append((*first, *second, *plain))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


class WeightGradients(TorchDispatchMode):
    """Counts PyTorch's depthwise convolution backwards that compute a weight gradient, by kernel size."""

    def __init__(self) -> None:
        super().__init__()
        self.by_kernel: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is torch.ops.aten.convolution_backward.default:
            weight, groups, mask = args[2], args[9], args[10]
            if mask[1] and groups == weight.shape[0] > 1 and weight.shape[1] == 1:
                self.by_kernel[weight.shape[-1]] = self.by_kernel.get(weight.shape[-1], 0) + 1
        return func(*args, **(kwargs or {}))


def one_step_under(mode: TorchDispatchMode, speed: SpeedConfig, **supernet: object) -> TorchDispatchMode:
    """``mode`` after it watched one second-order step of a 3-cell supernet of 2 nodes a cell, batch 4, 8x8."""
    cfg = SearchConfig(layers=3, nodes=2, batch_size=4, speed=speed, **supernet)
    torch.manual_seed(0)
    searcher = Searcher(cfg, in_channels=1, num_classes=3)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    with mode:
        searcher.step(x, y, x, y)
    return mode


@pytest.mark.parametrize("batched_edges", [True, False])
def test_the_native_gradient_reaches_every_5x5_and_dilated_depthwise_convolution_of_a_search_step(
    batched_edges: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Second order, default switches: every 5x5 depthwise weight gradient (sep_conv_5x5, dil_conv_5x5 in normal and
    reduction cells, edge by edge and batched) and every dilated one at stride 1 (dil_conv_3x3 too: its dense
    re-layout is then not kept) comes from the native kernel, each weight gradient computed once either way; off,
    PyTorch computes them all."""
    native_calls: dict[int, int] = {}
    native = kernels.depthwise_weight_gradient

    def counted(x: torch.Tensor, grad: torch.Tensor, kernel: int, stride: int, padding: int, dilation: int):  # noqa: ANN202
        native_calls[kernel] = native_calls.get(kernel, 0) + 1
        return native(x, grad, kernel, stride, padding, dilation)

    monkeypatch.setattr(kernels, "depthwise_weight_gradient", counted)
    counts = {}
    for on in (True, False):
        speed = SpeedConfig(native_depthwise_grad=on, batched_edges=batched_edges)
        counts[on] = one_step_under(WeightGradients(), speed, channels=4).by_kernel
        if on:
            on_native, native_calls = native_calls, {}
    assert native_calls == {}  # nothing native with the switch off
    assert counts[True].get(5, 0) == 0 and on_native[5] == counts[False][5] > 0
    assert 0 < on_native[3] < counts[False][3]  # the dilated 3x3 ones; sep_conv_3x3's stay PyTorch's (as fast)
    assert counts[True][3] + on_native[3] == counts[False][3]


@pytest.mark.parametrize("normalized", [True, False], ids=["norm", "no-norm"])
@pytest.mark.parametrize(
    ("states", "r", "channels", "height", "sliced"),
    [(1, 4, 16, 8, False), (2, 4, 16, 5, False), (1, 3, 20, 4, True), (2, 2, 3, 3, True), (3, 2, 37, 2, False)],
)
def test_the_once_per_state_gradients_equal_their_formulas(
    states: int, r: int, channels: int, height: int, sliced: bool, normalized: bool
) -> None:
    """d_w[u, j] = Σ grad[u, j] · x̂[u] and Σ_j w[u, j] · grad[u, j], against float64 PyTorch; inputs that are channel
    slices (PC-DARTS's partial channels), channel counts off the vector width, each output alone."""
    gen = torch.Generator().manual_seed(states * 100 + channels)
    n, width = 3, height + 1
    grad = torch.randn(n, states * r * channels, height, width, generator=gen)
    grad = grad.contiguous(memory_format=torch.channels_last)
    x = torch.randn(n, 2 * states * channels, height, width, generator=gen).contiguous(
        memory_format=torch.channels_last
    )
    x = x[:, : states * channels] if sliced else x[:, : states * channels].contiguous(memory_format=torch.channels_last)
    mean = torch.randn(states * channels, generator=gen) if normalized else None
    invstd = torch.rand(states * channels, generator=gen) + 0.5 if normalized else None
    weights = torch.softmax(torch.randn(states, r, generator=gen), 1)

    g64 = grad.double().permute(0, 2, 3, 1).unflatten(-1, (states, r, channels))
    x64 = x.double()
    if normalized:
        x64 = (x64 - mean.double().view(1, -1, 1, 1)) * invstd.double().view(1, -1, 1, 1)
    x64 = x64.permute(0, 2, 3, 1).unflatten(-1, (states, 1, channels))
    want_w = (g64 * x64).sum((0, 1, 2, 5)).flatten()
    want_g = (g64 * weights.double().view(states, r, 1)).sum(4).flatten(-2).permute(0, 3, 1, 2)
    d_w, d_g = kernels.once_per_state_gradients(grad, x, mean, invstd, weights, True, True)
    torch.testing.assert_close(d_w.double(), want_w, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(d_g.double(), want_g, rtol=1e-5, atol=1e-5)
    assert d_g.is_contiguous(memory_format=torch.channels_last) or d_g.shape[2] * d_g.shape[3] == 1
    only_w, none = kernels.once_per_state_gradients(grad, x, mean, invstd, weights, True, False)
    assert none is None and torch.equal(only_w, d_w)
    none, only_g = kernels.once_per_state_gradients(grad, x, mean, invstd, weights, False, True)
    assert none is None and torch.equal(only_g, d_g)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.once_per_state_gradients(grad[:, 1:], x, mean, invstd, weights, True, True)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(
    ("n", "channels", "height", "width"),
    [(16, 4, 8, 8), (3, 12, 5, 7), (2, 24, 4, 4), (5, 16, 3, 3), (4, 37, 2, 3), (2, 70, 3, 3), (1, 3, 1, 2)],
)
def test_the_native_batch_norm_equals_pytorchs(n: int, channels: int, height: int, width: int, affine: bool) -> None:
    """Output, batch mean and 1/σ, the running statistics moved, and the input's, scale's and shift's gradients,
    against float64 PyTorch: narrow and wide channels, pixel counts that are no whole number of the kernel's blocks,
    a large mean (the kernel must not cancel its digits), each gradient alone."""
    gen = torch.Generator().manual_seed(n * 1000 + channels)
    x = (torch.randn(n, channels, height, width, generator=gen) * 3 + 50).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    scale = torch.rand(channels, generator=gen) + 0.5 if affine else None
    shift = torch.randn(channels, generator=gen) if affine else None
    running = (torch.randn(channels, generator=gen), torch.rand(channels, generator=gen) + 0.5)
    mine = tuple(r.clone() for r in running)
    want_running = tuple(r.double() for r in running)
    as64 = [None if t is None else t.double() for t in (scale, shift)]
    y64, mean64, invstd64 = torch.native_batch_norm(x.double(), *as64, *want_running, True, 0.1, 1e-5)
    y, mean, invstd = kernels.norm_forward(x, scale, shift, *mine, 0.1, 1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(invstd.double(), invstd64, rtol=1e-5, atol=1e-6)
    for got, want in zip(mine, want_running):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    unit = torch.ones(channels, dtype=torch.float64)
    wanted = [True, True, affine]
    want = torch.ops.aten.native_batch_norm_backward(
        grad.double(), x.double(), unit if scale is None else as64[0], None, None, mean64, invstd64, True, 1e-5, wanted
    )
    got = kernels.norm_backward(grad, x, scale, mean, invstd, (True, True, affine))
    # each gradient's natural scale: |grad|·scale·1/σ for the input's (it cancels to nearly 0 on few pixels),
    # Σ|grad| for the scale's and shift's
    a = invstd64 if scale is None else invstd64 * as64[0]
    sizes = (float(grad.abs().max() * a.max()), float(grad.abs().sum()), float(grad.abs().sum()))
    for g, w, size in zip(got, want, sizes):
        if w is not None:
            torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5 * size)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for alone in range(3 if affine else 2):
        mask = tuple(i == alone for i in range(3))
        single = kernels.norm_backward(grad, x, scale, mean, invstd, mask)
        assert [t is None for t in single] == [not m for m in mask]
        assert torch.equal(single[alone], got[alone])


def test_the_native_batch_norm_has_pytorchs_gradients_and_hessian() -> None:
    """:func:`nas.ops.batch_norm` with the native kernel: the output and gradients of ``F.batch_norm``, and under
    ``create_graph`` (the exact Hessian) a gradient that is differentiated again to PyTorch's second derivatives."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 12, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(12, generator=gen) + 0.5, torch.randn(12, generator=gen)
    probe = torch.randn(x.shape, generator=gen)
    assert native_norm_applies(x) and not native_norm_applies(x[:, :4].contiguous())  # channels-first: PyTorch's
    assert not native_norm_applies(torch.randn(2, 16, 3, 3).contiguous(memory_format=torch.channels_last))
    results = []
    for native in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, scale, shift)]
        running = (torch.zeros(12), torch.ones(12))
        y = batch_norm(*leaves, NormArguments(*running, 0.1, 1e-5, native))
        assert (y.grad_fn.name() == "_NativeNormBackward") == native
        first = torch.autograd.grad((y * probe).sum(), leaves, create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in first), leaves[:2])  # no gradient is the shift's
        results.append((y, *running, *first, *second))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class NormWidths(TorchDispatchMode):
    """The channel counts of the training batch norms PyTorch computes (forward), those of 4-d inputs only."""

    def __init__(self) -> None:
        super().__init__()
        self.widths: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        if func.overloadpacket.__name__ in ("native_batch_norm", "_native_batch_norm_legit") and args[0].dim() == 4:
            self.widths.append(args[0].shape[1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batched_edges", [True, False])
def test_the_native_batch_norm_computes_every_narrow_norm_of_a_search_step(
    batched_edges: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Second order, default switches, PC-DARTS on 16 channels (4 through each edge's candidates, 8 in a reduction
    cell): every batch norm whose channels are no multiple of 16 is the native kernel's, forward and backward, edge
    by edge and batched, and PyTorch computes the others (the stem's and the cells' own, 16·k channels, and a batch
    of edges 16 wide); with the switch off, PyTorch computes them all."""
    calls = {"forward": 0, "backward": 0}
    forward, backward = kernels.norm_forward, kernels.norm_backward

    def counted_forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["forward"] += 1
        return forward(*args, **kwargs)

    def counted_backward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["backward"] += 1
        return backward(*args, **kwargs)

    monkeypatch.setattr(kernels, "norm_forward", counted_forward)
    monkeypatch.setattr(kernels, "norm_backward", counted_backward)
    widths = {}
    for on in (True, False):
        speed = SpeedConfig(native_norm=on, native_sum=False, batched_edges=batched_edges)  # the sum's: below
        pc_darts = {"channels": 16, "partial_channels": 4, "edge_normalization": True}
        widths[on] = one_step_under(NormWidths(), speed, **pc_darts).widths
        if on:
            on_calls, calls = dict(calls), {"forward": 0, "backward": 0}
    assert calls == {"forward": 0, "backward": 0}  # nothing native with the switch off
    assert on_calls["forward"] > 0 and on_calls["backward"] > 0
    assert len(widths[True]) + on_calls["forward"] == len(widths[False])
    assert all(width % 16 == 0 for width in widths[True])
    assert sum(width % 16 != 0 for width in widths[False]) == on_calls["forward"]


@pytest.mark.parametrize("partial_channels", [1, 4], ids=["darts", "pc-darts"])
def test_the_native_sum_computes_every_batched_sum_of_a_search_step(
    partial_channels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Second order, default switches: every batched eq. 1 sum's forward is the native kernel's (its norms'
    statistics by the batch norm's kernel), none PyTorch's; with the switch off, the other way round, as often."""
    from nas import search_model

    calls = {"native": 0, "pytorch": 0, "statistics": 0}
    native, pytorch, norm = kernels.edge_sum_forward, search_model._edge_sum, kernels.norm_forward

    def counted(name: str, function: Callable) -> Callable:
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[name] += 1
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(kernels, "edge_sum_forward", counted("native", native))
    monkeypatch.setattr(search_model, "_edge_sum", counted("pytorch", pytorch))
    monkeypatch.setattr(kernels, "norm_forward", counted("statistics", norm))
    seen = {}
    for on in (True, False):
        speed = SpeedConfig(native_sum=on, native_norm=False)
        shape = {"channels": 4 * partial_channels, "partial_channels": partial_channels}
        one_step_under(NormWidths(), speed, **shape, edge_normalization=partial_channels > 1)
        seen[on], calls = calls, {"native": 0, "pytorch": 0, "statistics": 0}
    assert seen[True]["pytorch"] == 0 and seen[True]["native"] == seen[False]["pytorch"] > 0
    assert seen[False]["native"] == seen[False]["statistics"] == 0
    assert seen[True]["statistics"] >= seen[True]["native"]  # each sum's closing norms: pooling's and convolutions'


@pytest.mark.parametrize(
    ("channels", "width", "pixels"),
    [
        (32, 4, 16 * 64),
        (64, 8, 16 * 16),
        (12, 4, 37),
        (8, 4, 5),
        (4, 4, 3),
        (24, 8, 7 * 9),
        (20, 2, 11),
        (6, 2, 1),
        (128, 16, 300),  # DARTS's width: a broadcast, not a permutation
        (48, 16, 5),
    ],
)
def test_the_native_grouped_pointwise_convolution_equals_pytorchs(channels: int, width: int, pixels: int) -> None:
    """Forward, input gradient (each group's weight transposed) and weight gradient against float64 PyTorch: channel
    counts of whole 16-lane blocks, of fewer, of periods of several blocks, pixel counts that leave a partial block
    and a partial period."""
    gen = torch.Generator().manual_seed(channels * 10 + width)
    groups = channels // width
    x = torch.randn(pixels, channels, 1, 1, generator=gen).view(1, pixels, 1, channels).permute(0, 3, 1, 2)
    assert x.is_contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, width, 1, 1, generator=gen)
    grad = torch.randn(x.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    geometry = ([1, 1], [0, 0], [1, 1], False, [0, 0], groups, [True, True, False])
    want_y = F.conv2d(x.double(), weight.double(), None, 1, 0, 1, groups)
    want_dx, want_dw, _ = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), weight.double(), None, *geometry
    )
    y = kernels.grouped_pointwise(x, weight)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    d_x = kernels.grouped_pointwise(grad, weight, transposed=True)
    torch.testing.assert_close(d_x.double(), want_dx, rtol=1e-5, atol=1e-5)
    d_weight = kernels.grouped_pointwise_weight_gradient(x, grad, width)
    torch.testing.assert_close(d_weight.double(), want_dw, rtol=1e-5, atol=1e-5 * float(grad.abs().sum()) / channels)
    with pytest.raises(ValueError, match="no grouped 1x1 kernel"):
        kernels.grouped_pointwise(x, torch.randn(channels, 1, 1, 1))


def test_the_native_grouped_pointwise_convolution_has_pytorchs_gradients_and_hessian() -> None:
    """:func:`nas.ops.grouped_pointwise` with the native kernel: the values and first derivatives of ``F.conv2d``,
    and under ``create_graph`` (the exact Hessian) gradients that are differentiated again to PyTorch's."""
    from nas.ops import grouped_pointwise

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 24, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(24, 4, 1, 1, generator=gen)
    probe = torch.randn(3, 24, 5, 5, generator=gen)
    results = []
    for native in (True, False):
        leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
        y = grouped_pointwise(*leaves, 6, native)
        assert (y.grad_fn.name() == "_NativePointwiseBackward") == native
        first = torch.autograd.grad((y * probe).sum(), leaves, create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in first), leaves)
        plain = torch.autograd.grad((grouped_pointwise(*leaves, 6, native) * probe).sum(), leaves)
        results.append((y, *first, *second, *plain))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class CountingMode(TorchDispatchMode):
    """How many of the operators PyTorch runs ``counted(name, args)`` picks out."""

    def __init__(self, counted: Callable[[str, tuple], bool]) -> None:
        super().__init__()
        self.counted, self.count = counted, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        self.count += self.counted(func.overloadpacket.__name__, args)
        return func(*args, **(kwargs or {}))


def narrow_pointwise(name: str, args: tuple) -> bool:
    """A grouped 1x1 convolution of groups 2, 4, 8 or 16 channels wide, forward or backward."""
    if name not in ("convolution", "convolution_backward"):
        return False
    weight, groups = (args[1], args[8]) if name == "convolution" else (args[2], args[9])
    narrow = weight.shape[0] == weight.shape[1] * groups and weight.shape[1] in (2, 4, 8, 16)
    return groups > 1 and narrow and tuple(weight.shape[2:]) == (1, 1)


@pytest.mark.parametrize("partial_channels", [1, 4], ids=["darts", "pc-darts"])
def test_the_native_pointwise_kernel_computes_every_narrow_grouped_1x1_convolution_of_a_search_step(
    partial_channels: int,
) -> None:
    """Second order, default switches, 16 channels (DARTS: 16 a group, 32 in a reduction cell; PC-DARTS: 4 and 8):
    no grouped 1x1 convolution of groups 2-16 channels wide is left to PyTorch; with the switch off, there are
    some."""
    supernet = {"channels": 16, "partial_channels": partial_channels, "edge_normalization": partial_channels > 1}
    on = one_step_under(CountingMode(narrow_pointwise), SpeedConfig(), **supernet).count
    off = one_step_under(CountingMode(narrow_pointwise), SpeedConfig(native_pointwise=False), **supernet).count
    assert on == 0 < off


def pooling_input(layout: str, channels: int, height: int, width: int, values: str) -> torch.Tensor:
    """A pooling's input: channels_last, or the first ``channels`` of a wider channels_last tensor (PC-DARTS's cut);
    random values, small integers (ties in every window), or random with NaN and whole rows of -inf."""
    gen = torch.Generator().manual_seed(channels * 100 + height)
    wide = channels if layout == "channels_last" else channels + 5
    if values == "ties":
        base = torch.randint(-2, 3, (3, wide, height, width), generator=gen).float()
    else:
        base = torch.randn(3, wide, height, width, generator=gen)
    if values == "nan_inf":
        base[0, :, 1] = float("-inf")
        base[1, 0, 2, 3] = base[2, -1, 0, 0] = float("nan")
    return base.contiguous(memory_format=torch.channels_last)[:, :channels]


@pytest.mark.parametrize("values", ["random", "ties", "nan_inf"])
@pytest.mark.parametrize("layout", ["channels_last", "cut"])
@pytest.mark.parametrize(
    ("channels", "height", "width", "kernel", "stride", "padding", "ceil_mode"),
    [
        (4, 8, 8, 3, 1, 1, False),  # a PC-DARTS candidate's pooling
        (12, 7, 9, 3, 2, 1, False),  # a reduction's, odd sizes
        (8, 7, 5, 2, 2, 0, True),  # PC-DARTS's passed-by channels at stride 2: ceil_mode's clipped last windows
        (17, 6, 6, 3, 1, 0, False),  # no padding, channels past a vector
        (3, 5, 11, 5, 1, 2, False),  # a wider window
        (16, 9, 9, 3, 3, 1, True),  # stride 3
        (1, 4, 4, 3, 1, 1, False),  # one channel
    ],
)
@pytest.mark.parametrize("is_max", [True, False], ids=["max", "avg"])
def test_the_native_pooling_equals_pytorchs(
    channels: int,
    height: int,
    width: int,
    kernel: int,
    stride: int,
    padding: int,
    ceil_mode: bool,
    layout: str,
    values: str,
    is_max: bool,
) -> None:
    """Max pooling: PyTorch's values and argmax indices exactly (ties go to the first in the window's row order, a
    NaN wins, a window of -inf points at its first input), so that PyTorch's backward reads them; average pooling
    counting only the inputs inside: PyTorch's values."""
    x = pooling_input(layout, channels, height, width, values)
    y, indices = kernels.pool2d(x, kernel, stride, padding, ceil_mode, is_max)
    assert y.is_contiguous(memory_format=torch.channels_last)
    if is_max:
        want_y, want_indices = F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True)
        torch.testing.assert_close(y, want_y, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(indices, want_indices)
    else:
        want_y = F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad=False)
        torch.testing.assert_close(y, want_y, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert indices is None


def test_the_native_pooling_refuses_what_it_does_not_compute() -> None:
    with pytest.raises(TypeError, match="dense channels"):
        kernels.pool2d(torch.randn(2, 3, 5, 5), 3, 1, 1, False, True)  # channels-first: channel stride 25
    with pytest.raises(ValueError, match="no pooling of window 3, stride 1, padding 2"):
        kernels.pool2d(torch.randn(2, 3, 5, 5).contiguous(memory_format=torch.channels_last), 3, 1, 2, False, True)


@pytest.mark.parametrize("geometry", [(3, 1, 1, False), (3, 2, 1, False), (2, 2, 0, True)])
@pytest.mark.parametrize("is_max", [True, False], ids=["max", "avg"])
def test_the_native_pooling_has_pytorchs_gradients_and_hessian(geometry: tuple, is_max: bool) -> None:
    """:func:`nas.ops.pool2d` with the native kernel: PyTorch's values and input gradient, and under
    ``create_graph`` (the exact Hessian) a gradient that is differentiated again, with respect to the output's
    gradient, to PyTorch's."""
    from nas.ops import pool2d

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 9, 7, 7, generator=gen).contiguous(memory_format=torch.channels_last)[:, :6]
    results = []
    for native in (True, False):
        leaf = x.clone().requires_grad_()
        y = pool2d(leaf, *geometry, is_max=is_max, native=native)
        assert (y.grad_fn.name() == "_NativePoolBackward") == native
        probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
        (first,) = torch.autograd.grad((y * probe).sum(), leaf, create_graph=True)
        (second,) = torch.autograd.grad((first * torch.linspace(-1, 1, first.numel()).view(first.shape)).sum(), probe)
        (plain,) = torch.autograd.grad((pool2d(leaf, *geometry, is_max=is_max, native=native) * probe).sum(), leaf)
        results.append((y, first, second, plain))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def pooling(name: str, args: tuple) -> bool:
    """A max or average pooling's forward (their backwards stay PyTorch's either way)."""
    return name in ("max_pool2d_with_indices", "avg_pool2d", "max_pool2d")


@pytest.mark.parametrize("batched_edges", [True, False])
@pytest.mark.parametrize("partial_channels", [1, 4], ids=["darts", "pc-darts"])
def test_the_native_pooling_computes_every_pooling_of_a_search_step(partial_channels: int, batched_edges: bool) -> None:
    """Second order, default switches: no pooling forward is left to PyTorch (the candidates' 3x3 ones at stride 1
    and 2, PC-DARTS's 2x2 of the passed-by channels in a reduction cell), edge by edge and batched; with the switch
    off, they all are."""
    supernet = {"channels": 16, "partial_channels": partial_channels, "edge_normalization": partial_channels > 1}
    on = one_step_under(CountingMode(pooling), SpeedConfig(batched_edges=batched_edges), **supernet).count
    off = one_step_under(
        CountingMode(pooling), SpeedConfig(native_pool=False, batched_edges=batched_edges), **supernet
    ).count
    assert on == 0 < off


def test_without_a_compiler_pytorchs_kernel_runs_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kernels.native_kernels.cache_clear()
    try:
        torch.manual_seed(0)
        x = torch.randn(2, 4, 8, 8)
        weight = torch.randn(4, 1, 5, 5, requires_grad=True)
        with pytest.warns(UserWarning, match="no C compiler") as caught:
            assert not kernels.native_available()
        assert kernels.native_problem() == str(caught[0].message)  # the line a Ray worker sends to the console
        assert kernels.native_problem().startswith("native kernels (search.speed.native_depthwise_grad")
        out = depthwise_conv2d(x, weight, 1, 2, 1, native_grad=True)
        assert out.grad_fn.name() == "ConvolutionBackward0"  # PyTorch's own
        assert not (tmp_path / "cache").exists()
    finally:
        kernels.native_kernels.cache_clear()


def test_the_kernel_is_built_once_into_the_cache_and_loaded_from_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels.native_kernels.cache_clear()
    try:
        assert kernels.native_available() and kernels.native_problem() is None
        built = list((tmp_path / "raydarts" / "kernels").iterdir())
        assert [p.suffix for p in built] == [".so"]  # no temporary file left
        stamp = built[0].stat().st_mtime_ns
        kernels.native_kernels.cache_clear()
        assert kernels.native_available()
        assert list((tmp_path / "raydarts" / "kernels").iterdir()) == built and built[0].stat().st_mtime_ns == stamp
    finally:
        kernels.native_kernels.cache_clear()


def test_a_failed_build_warns_and_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(kernels, "SOURCES", (broken,))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kernels.native_kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match="not built"):
            assert not kernels.native_available()
        assert "not built" in kernels.native_problem() and "broken.c" in kernels.native_problem()
        assert list((tmp_path / "cache" / "raydarts" / "kernels").iterdir()) == []
    finally:
        kernels.native_kernels.cache_clear()


OPENMP_RUNTIMES = """
from pathlib import Path
import torch
from nas import kernels
x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
kernels.depthwise_weight_gradient(x, torch.randn_like(x), 5, 1, 2, 1)
mapped = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}
assert any(Path(p).name.startswith("raydarts_kernels-") for p in mapped), mapped
print("\\n".join(sorted(p for p in mapped if Path(p).name.startswith(("libgomp", "libiomp", "libomp")))))
"""


def test_the_kernel_runs_on_pytorchs_own_openmp_runtime() -> None:
    """Linked by soname, the kernel's OpenMP runtime is the one PyTorch loaded: one thread pool, not two whose idle
    threads would spin against each other on the same cores. In a fresh process holding only PyTorch and the kernel
    (other libraries bring their own runtimes: scikit-learn's wheels do)."""
    done = run_bounded([sys.executable, "-c", OPENMP_RUNTIMES], timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    runtimes = done.stdout.split()
    assert len(runtimes) == 1, runtimes
