"""Every registered operation at both strides: shape, gradient, parameter count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nas.ops import (
    PRIMITIVES,
    FactorizedReduce,
    _weightless,
    build_op,
    global_average_pool,
    is_parameter_free,
    offset_grids,
    register_op,
    registered_ops,
    unregister_op,
)

C = 4


def expected_params(name: str, stride: int, c: int = C) -> int:
    """Parameter counts from the operations' definitions (affine batch norm: 2 per channel)."""
    bn = 2 * c
    if name in ("none", "max_pool_3x3", "avg_pool_3x3"):
        return 0
    if name == "skip_connect":
        return 0 if stride == 1 else 2 * c * (c // 2) + bn
    if name.startswith("sep_conv_"):
        k = int(name[-1])
        return 2 * (c * k * k + c * c + bn)
    if name.startswith("dil_conv_"):
        k = int(name[-1])
        return c * k * k + c * c + bn
    if name == "conv_7x1_1x7":
        return 2 * 7 * c * c + bn
    raise AssertionError(f"no expectation for {name}")


def test_primitives_are_the_papers_eight() -> None:
    papers = "none max_pool_3x3 avg_pool_3x3 skip_connect sep_conv_3x3 sep_conv_5x5 dil_conv_3x3 dil_conv_5x5"
    assert tuple(papers.split()) == PRIMITIVES
    assert registered_ops()[:8] == PRIMITIVES


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", registered_ops())
def test_op_shape_backward_and_parameters(name: str, stride: int) -> None:
    torch.manual_seed(0)
    op = build_op(name, C, stride, affine=True)
    x = torch.randn(3, C, 8, 8, requires_grad=True)
    y = op(x)
    assert y.shape == (3, C, 8 // stride, 8 // stride)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None
    if name != "none":
        assert x.grad.abs().sum() > 0
    params = list(op.parameters())
    assert sum(p.numel() for p in params) == expected_params(name, stride)
    assert all(p.grad is not None for p in params)


@pytest.mark.parametrize("name", registered_ops())
def test_affine_false_has_no_batchnorm_parameters(name: str) -> None:
    op = build_op(name, C, 1, affine=False)
    for module in op.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.weight is None and module.bias is None


@pytest.mark.parametrize("name", registered_ops())
def test_is_parameter_free_leaves_torchs_rng_where_it_was(name: str) -> None:
    """Its probe op is built once per process, so in a resumed worker at another epoch than in an undisturbed one:
    a draw there shifted all later augmentation (the lost-node drift of issue #14)."""
    _weightless.cache_clear()
    before = torch.get_rng_state()
    free = is_parameter_free(name)
    assert torch.equal(torch.get_rng_state(), before)
    assert free == (name in ("none", "skip_connect", "max_pool_3x3", "avg_pool_3x3"))


def test_skip_connect_is_torchs_identity_at_stride_1_and_a_factorized_reduce_at_2() -> None:
    op = build_op("skip_connect", C, 1)
    assert type(op) is nn.Identity
    x = torch.randn(2, C, 6, 6)
    assert op(x) is x
    assert isinstance(build_op("skip_connect", C, 2), FactorizedReduce)


def test_none_is_zero_of_the_output_shape() -> None:
    x = torch.randn(2, C, 6, 6)
    assert torch.equal(build_op("none", C, 2)(x), torch.zeros(2, C, 3, 3))


def test_factorized_reduce_odd_input_and_offset_branch() -> None:
    fr = FactorizedReduce(C, 2 * C)
    assert fr(torch.randn(2, C, 7, 7)).shape == (2, 2 * C, 4, 4)
    # On even sizes it is the authors' two stride-2 1x1 convolutions, the second on x[:, :, 1:, 1:].
    x = torch.randn(2, C, 8, 8)
    fr.eval()
    conv = torch.nn.functional.conv2d
    with torch.no_grad():
        relu_x = torch.relu(x)
        want = fr.bn(
            torch.cat(
                [conv(relu_x, fr.conv_1.weight, stride=2), conv(relu_x[:, :, 1:, 1:], fr.conv_2.weight, stride=2)], 1
            )
        )
        torch.testing.assert_close(fr(x), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("c_in", [2, 4])
def test_factorized_reduce_in_channels_last_with_few_channels_runs_backward_cleanly(c_in: int) -> None:
    """A channels_last stride-2 1x1 convolution with 2-4 input channels corrupts the heap in PyTorch's CPU backward
    (torch 2.14.1; the process aborted within a few hundred steps). FactorizedReduce must not reach that kernel."""
    fr = FactorizedReduce(c_in, c_in).to(memory_format=torch.channels_last)
    for _ in range(300):
        x = torch.randn(8, c_in, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
        fr(x).square().sum().backward()
    plain = FactorizedReduce(c_in, c_in)
    plain.load_state_dict(fr.state_dict())
    x = torch.randn(4, c_in, 6, 6)
    torch.testing.assert_close(fr(x.contiguous(memory_format=torch.channels_last)), plain(x), rtol=0, atol=1e-5)


def torch_offset_grids(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[:, :, ::2, ::2], nn.functional.pad(x, (0, 1, 0, 1))[:, :, 1::2, 1::2]


def first_and_second_backward(fn, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:  # noqa: ANN001
    """fn(x)'s outputs, the gradient for random output gradients v, and the gradient of ⟨that gradient, u⟩ with
    respect to v (what a double backward, the exact Hessian's, takes through fn's backward)."""
    gen = torch.Generator().manual_seed(0)
    outs = fn(x.requires_grad_())
    outs = outs if isinstance(outs, tuple) else (outs,)
    vs = [torch.randn(o.shape, generator=gen).requires_grad_() for o in outs]
    (grad,) = torch.autograd.grad(outs, x, vs, create_graph=True)
    u = torch.randn(x.shape, generator=gen)
    return list(outs), grad, list(torch.autograd.grad((grad * u).sum(), vs))


@pytest.mark.parametrize("size", [(8, 8), (7, 6)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(offset_grids, torch_offset_grids), (global_average_pool, lambda x: nn.AdaptiveAvgPool2d(1)(x).flatten(1))],
    ids=["offset_grids", "global_average_pool"],
)
def test_layout_keeping_operators_equal_torchs_with_gradients_in_the_input_layout(
    ours,
    theirs,
    channels_last: bool,
    size: tuple[int, int],  # noqa: ANN001
) -> None:
    """The sub-grids FactorizedReduce reads and the supernet's global pooling: PyTorch's own versions hand back
    channels-first gradients; ours give the same values and gradients (twice differentiated too) in the input's
    layout."""
    x = torch.randn(3, C, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    (outs, grad, second), (want_outs, want_grad, want_second) = (
        first_and_second_backward(fn, x.clone()) for fn in (ours, theirs)
    )
    for a, b in zip([*outs, grad, *second], [*want_outs, want_grad, *want_second], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_register_custom_op_and_use_it_in_a_search() -> None:
    from nas import SearchNetwork, load_config

    @register_op("conv_1x1_test")
    def conv_1x1(channels: int, stride: int, affine: bool) -> nn.Module:
        return nn.Sequential(nn.Conv2d(channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels))

    try:
        assert "conv_1x1_test" in registered_ops()
        with pytest.raises(ValueError, match="already registered"):
            register_op("conv_1x1_test")(conv_1x1)
        net = SearchNetwork(
            in_channels=1, channels=4, num_classes=3, layers=2, nodes=2, primitives=["none", "conv_1x1_test"]
        )
        assert net(torch.randn(2, 1, 8, 8)).shape == (2, 3)
        assert load_config(None, ["search.primitives=[none, conv_1x1_test]"]).search.primitives[-1] == "conv_1x1_test"
    finally:
        unregister_op("conv_1x1_test")
    assert "conv_1x1_test" not in registered_ops()
    with pytest.raises(KeyError, match="unknown operation"):
        build_op("conv_1x1_test", 4, 1)
