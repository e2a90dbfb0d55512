"""The search step's speed switches (``search.speed.*``): each one on its own, and all the defaults together, give
the plain path's α and w after 3 steps (within 1e-4)."""

from __future__ import annotations

import copy
import gc
import os
import resource
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from processes import run_bounded
from pydantic import ValidationError
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from nas import SearchNetwork, kernels
from nas.architect import laid_out_as
from nas.batched import RunningStats, batched, batched_after_relu
from nas.config import SearchConfig, SpeedConfig
from nas.graphed import step_key
from nas.loop import LoopContext, Meter
from nas.ops import (
    PRIMITIVES,
    DepthwiseConv2d,
    NormArguments,
    build_op,
    dilated_as_dense,
    forward_after_relu,
    forward_layer,
    is_channels_last,
    memory_layout,
    norm_relu_separable,
    registered_ops,
    starts_with_relu,
)
from nas.search import Searcher
from nas.search_model import (
    PLAIN,
    MixedOp,
    closing_norm,
    edge_groups,
    norm_arguments,
    stacked_weighted_sum,
    weighted_sum,
)

SWITCHES = [name for name in SpeedConfig.model_fields]
CPU_SWITCHES = [name for name in SWITCHES if name not in ("compile", "cuda_graph")]  # these two: their own tests


def tiny_config(
    speed: SpeedConfig, xi: float | None = None, hessian: str = "fd", precision: str = "fp32"
) -> SearchConfig:
    """A 3-cell supernet on every DARTS primitive (a reduction with FactorizedReduce skips included)."""
    return SearchConfig(
        layers=3, channels=4, nodes=2, batch_size=8, xi=xi, hessian=hessian, speed=speed, precision=precision
    )


def three_steps(cfg: SearchConfig) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """α and every parameter and buffer after 3 search steps on fixed random batches."""
    torch.manual_seed(0)
    searcher = Searcher(cfg, in_channels=1, num_classes=3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x_w, x_a = (torch.randn(8, 1, 8, 8, generator=gen) for _ in range(2))
        y_w, y_a = (torch.randint(0, 3, (8,), generator=gen) for _ in range(2))
        searcher.step(x_w, y_w, x_a, y_a)
    state = {k: v.detach().clone() for k, v in searcher.network.state_dict().items()}
    return [a.detach().clone() for a in searcher.network.alphas()], state


def assert_same(got: tuple, want: tuple) -> None:
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert got[1].keys() == want[1].keys()
    for key in want[1]:
        torch.testing.assert_close(got[1][key].float(), want[1][key].float(), rtol=0, atol=1e-4, msg=key)


@pytest.fixture(scope="module")
def plain_second_order() -> tuple:
    return three_steps(tiny_config(PLAIN))


@pytest.mark.parametrize("switch", [name for name in CPU_SWITCHES if name != "node_shuffle"])  # PC-DARTS's: below
def test_each_switch_alone_gives_the_plain_paths_alpha_and_weights(switch: str, plain_second_order: tuple) -> None:
    needs = {  # switches that act inside others', so alone they would not
        "recompute_depthwise": {"norm_in_sum": True, "batched_edges": True, "channels_last": True},
        "weightless_once": {"batched_edges": True, "channels_last": True, "norm_in_sum": True},
        "native_norm": {"channels_last": True, "norm_in_sum": True},  # norms the search computes itself
        "native_sum": {"batched_edges": True, "channels_last": True},
        "flipped_input_grad": {"native_depthwise_grad": True},  # for the backwards that are ours
        "native_pointwise": {"batched_edges": True, "channels_last": True},
        "native_pool": {"channels_last": True},  # dense channels
    }
    speed = PLAIN.model_copy(update={switch: True, **needs.get(switch, {})})
    assert_same(three_steps(tiny_config(speed)), plain_second_order)


def test_recomputed_depthwise_outputs_edge_by_edge_give_the_plain_paths_alpha_and_weights(
    plain_second_order: tuple,
) -> None:
    """recompute_depthwise where the edges run one by one (MixedOp's sum), as above with the batched edges."""
    speed = PLAIN.model_copy(update={"recompute_depthwise": True, "norm_in_sum": True, "channels_last": True})
    assert_same(three_steps(tiny_config(speed)), plain_second_order)


def tiny_network(speed: SpeedConfig, partial_channels: int = 1) -> SearchNetwork:
    """A 3-cell supernet of two nodes a cell, 4 channels through each edge's candidates (PC-DARTS: 4·K in all)."""
    return SearchNetwork(
        in_channels=1,
        channels=4 * partial_channels,
        num_classes=3,
        layers=3,
        nodes=2,
        speed=speed,
        partial_channels=partial_channels,
        edge_normalization=partial_channels > 1,
    )


def pc_darts_config(speed: SpeedConfig, xi: float | None = None) -> SearchConfig:
    """tiny_config's supernet with PC-DARTS: 2 of 8 channels through the candidates, edge normalization."""
    return tiny_config(speed, xi=xi).model_copy(
        update={"channels": 8, "partial_channels": 4, "edge_normalization": True}
    )


@pytest.fixture(scope="module")
def plain_pc_darts() -> tuple:
    return three_steps(pc_darts_config(PLAIN))


@pytest.mark.parametrize(
    "speed",
    [
        PLAIN.model_copy(update={"node_shuffle": True}),
        PLAIN.model_copy(update={"batched_edges": True}),
        SpeedConfig(),  # batched edges
        SpeedConfig(batched_edges=False),  # the default switches with node_shuffle, edge by edge
        SpeedConfig(**dict.fromkeys(CPU_SWITCHES, True)),
    ],
    ids=["node_shuffle", "batched_edges", "default", "default-batched_edges", "every"],
)
def test_pc_darts_switches_give_the_plain_paths_alpha_beta_and_weights(
    speed: SpeedConfig, plain_pc_darts: tuple
) -> None:
    """node_shuffle acts only with PC-DARTS (partial_channels > 1), and batched edges take its partial channels."""
    assert_same(three_steps(pc_darts_config(speed)), plain_pc_darts)


def test_pc_darts_default_switches_first_order_and_with_the_exact_hessian() -> None:
    """The batched PC-DARTS sum's hand-written gradient (nas.search_model._EdgeWeightedSum) is differentiated again
    by the exact Hessian-vector product."""
    assert_same(three_steps(pc_darts_config(SpeedConfig(), xi=0.0)), three_steps(pc_darts_config(PLAIN, xi=0.0)))
    exact = pc_darts_config(SpeedConfig()).model_copy(update={"hessian": "exact"})
    assert_same(three_steps(exact), three_steps(pc_darts_config(PLAIN).model_copy(update={"hessian": "exact"})))


@pytest.mark.parametrize(
    "speed",
    [SpeedConfig(), SpeedConfig(batched_edges=False)],  # batched edges (the default), and edge by edge
    ids=["default", "default-batched_edges"],
)
def test_the_default_switches_give_the_plain_path_first_and_second_order(
    speed: SpeedConfig, plain_second_order: tuple
) -> None:
    assert speed != PLAIN  # something is on by default
    assert_same(three_steps(tiny_config(speed)), plain_second_order)
    assert_same(three_steps(tiny_config(speed, xi=0.0)), three_steps(tiny_config(PLAIN, xi=0.0)))


def test_every_switch_at_once_first_and_second_order(plain_second_order: tuple) -> None:
    every = SpeedConfig(**dict.fromkeys(CPU_SWITCHES, True))
    assert_same(three_steps(tiny_config(every)), plain_second_order)
    assert_same(three_steps(tiny_config(every, xi=0.0)), three_steps(tiny_config(PLAIN, xi=0.0)))


def test_every_switch_at_once_with_the_exact_hessian() -> None:
    every = SpeedConfig(**dict.fromkeys(CPU_SWITCHES, True))
    want = three_steps(tiny_config(PLAIN, hessian="exact"))
    assert_same(three_steps(tiny_config(every, hessian="exact")), want)


def test_compile_gives_the_plain_path(monkeypatch: pytest.MonkeyPatch, plain_second_order: tuple) -> None:
    """Dynamo's tracing (the 'eager' backend, so no code generation: seconds, not minutes on 2 CPUs)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", **kw))
    assert_same(three_steps(tiny_config(SpeedConfig(compile=True))), plain_second_order)


def test_compile_falls_back_to_eager_when_it_fails(monkeypatch: pytest.MonkeyPatch, plain_second_order: tuple) -> None:
    def broken(fn, **kw):  # noqa: ANN001, ANN003, ANN202
        def run(*args):  # noqa: ANN002, ANN202
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="running eagerly"):
        got = three_steps(tiny_config(SpeedConfig(compile=True)))
    assert_same(got, plain_second_order)


def test_exact_hessian_with_compile_is_refused() -> None:
    with pytest.raises(ValueError, match="double backward"):
        SearchConfig(hessian="exact", speed=SpeedConfig(compile=True))


class HostReads(TorchDispatchMode):
    """Records every operator that reads a tensor's value on the host (``.item()``, ``float(t)``, ``if t:``): what
    a CUDA graph cannot capture, and on a GPU a wait for the device."""

    READS = (
        torch.ops.aten._local_scalar_dense.default,  # .item(), float(t), int(t)
        torch.ops.aten.is_nonzero.default,  # if t:
        torch.ops.aten.equal.default,
        torch.ops.aten.nonzero.default,  # data-dependent shapes: the host waits for the values
        torch.ops.aten.masked_select.default,
    )

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        if func in self.READS:
            self.found.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("xi", "hessian", "speed", "partial"),
    [
        (0.0, "fd", SpeedConfig(), 1),
        (None, "fd", SpeedConfig(), 1),
        (None, "fd", SpeedConfig(norm_in_sum=False), 1),  # the switches a GPU search would take
        (None, "fd", SpeedConfig(batched_edges=False), 1),
        (None, "exact", SpeedConfig(), 1),
        (None, "fd", PLAIN, 1),
        (None, "fd", SpeedConfig(norm_in_sum=False), 2),  # PC-DARTS: partial channels, edge normalization
    ],
    ids=["first-order", "second-order", "gpu-switches", "edge-by-edge", "exact-hessian", "plain", "pc-darts"],
)
def test_the_step_never_reads_a_tensor_on_the_host(
    xi: float | None, hessian: str, speed: SpeedConfig, partial: int
) -> None:
    """What search.speed.cuda_graph captures (the architect, the weight step with its gradient clipping) reads no
    tensor's value on the host; Adam's part is torch's capturable mode."""
    torch.manual_seed(0)
    cfg = tiny_config(speed, xi=xi, hessian=hessian)
    if partial > 1:
        cfg = cfg.model_copy(update={"partial_channels": partial, "edge_normalization": True})
    searcher = Searcher(cfg, in_channels=1, num_classes=3)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    searcher.step(x, y, x, y)  # the momentum buffers exist from here on, as they do when a graph is captured
    with HostReads() as reads:
        searcher.architect.step(x, y, x, y)
        searcher.weight_step(x, y)
    assert reads.found == []


def test_the_meter_reads_nothing_on_the_host_until_its_result() -> None:
    """The epoch loop's running sums stay on the device: a GPU step (or a graph replay) is not waited for."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 3, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (4, 6)]
    losses = [torch.nn.functional.cross_entropy(logits, target) for logits, target in batches]
    meter = Meter()
    with HostReads() as reads:
        for loss, (logits, target) in zip(losses, batches):
            meter.update(loss, logits, target)
    assert reads.found == []
    mean_loss, accuracy, count = meter.result(LoopContext())
    assert count == 10
    assert mean_loss == pytest.approx((4 * float(losses[0]) + 6 * float(losses[1])) / 10)
    assert accuracy == sum(int((logits.argmax(1) == target).sum()) for logits, target in batches) / 10


def test_a_zero_vector_gives_a_zero_hessian_product() -> None:
    """ε is not tested on the host: for v = 0 the finite difference itself gives exactly 0."""
    torch.manual_seed(0)
    searcher = Searcher(tiny_config(SpeedConfig()), in_channels=1, num_classes=3)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    zeros = [torch.zeros_like(w) for w in searcher.architect.weights]
    for product in searcher.architect.hessian_vector_product(zeros, x, y):
        assert torch.equal(product, torch.zeros_like(product))
    nonzero = [torch.randn_like(w) for w in searcher.architect.weights]
    assert any(p.abs().sum() > 0 for p in searcher.architect.hessian_vector_product(nonzero, x, y))


@pytest.mark.parametrize(
    ("update", "refused"),
    [
        ({"speed": SpeedConfig(cuda_graph=True, compile=True)}, "search.speed.compile"),
        ({"speed": SpeedConfig(cuda_graph=True, checkpoint_cells=True)}, "search.speed.checkpoint_cells"),
        ({"speed": SpeedConfig(cuda_graph=True), "precision": "bf16"}, "search.precision=bf16"),
    ],
)
def test_cuda_graph_is_refused_with_what_it_cannot_capture(update: dict, refused: str) -> None:
    with pytest.raises(ValueError, match=f"cuda_graph cannot be combined with {refused}"):
        SearchConfig(**update)


def test_cuda_graph_needs_a_cuda_device() -> None:
    with pytest.raises(ValueError, match="needs a CUDA device, not cpu"):
        Searcher(tiny_config(SpeedConfig(cuda_graph=True)), in_channels=1, num_classes=3)


def test_a_resumed_search_builds_its_alpha_optimizer_as_its_own_config_says() -> None:
    """A checkpoint of a graphed search holds a capturable Adam (its step count on the GPU): resumed without
    search.speed.cuda_graph, Adam must step as an ordinary one (and the other way round, capturable again)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    searcher = Searcher(tiny_config(SpeedConfig()), in_channels=1, num_classes=3)
    searcher.step(x, y, x, y)
    state = searcher.state_dict()
    for group in state["a_optimizer"]["param_groups"]:
        group["capturable"] = True  # as a graphed search's checkpoint says
    resumed = Searcher(tiny_config(SpeedConfig()), in_channels=1, num_classes=3)
    resumed.load_state_dict(state)
    assert [g["capturable"] for g in resumed.a_optimizer.param_groups] == [False]
    steps = [resumed.a_optimizer.state[a]["step"] for a in resumed.network.alphas()]
    assert all(s.device.type == "cpu" and s.dtype == torch.float32 and float(s) == 1.0 for s in steps)
    resumed.step(x, y, x, y)  # a capturable Adam would refuse CPU parameters here
    assert all(float(resumed.a_optimizer.state[a]["step"]) == 2.0 for a in resumed.network.alphas())


def test_a_captured_step_is_keyed_by_learning_rates_xi_and_batch_shape() -> None:
    """A graph bakes in Python values: the key must change whenever one of them does, and only then."""
    searcher = Searcher(tiny_config(SpeedConfig()), in_channels=1, num_classes=3)
    optimizers = (searcher.w_optimizer, searcher.a_optimizer)
    batch = (torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,)))
    key = step_key(optimizers, 0.025, batch)
    assert step_key(optimizers, 0.025, (torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))) == key
    assert step_key(optimizers, 0.01, batch) != key
    assert step_key(optimizers, 0.025, (torch.randn(4, 1, 8, 8), batch[1][:4])) != key
    assert step_key(optimizers, 0.025, (batch[0].double(), batch[1])) != key
    searcher.w_optimizer.param_groups[0]["lr"] = 0.02  # a new weight lr, as the cosine schedule sets each epoch
    assert step_key(optimizers, 0.025, batch) != key


@pytest.mark.parametrize("stride", [1, 2])
def test_forward_after_relu_is_the_op_on_relu_x(stride: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    shared = [name for name in PRIMITIVES if starts_with_relu(build_op(name, 4, stride))]
    expected = {"sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"} | (
        {"skip_connect"} if stride == 2 else set()
    )
    assert set(shared) == expected
    for name in shared:
        op = build_op(name, 4, stride).eval()
        assert torch.equal(forward_after_relu(op, torch.relu(x)), op(x)), name


NONE_INSIDE = ("max_pool_3x3", "sep_conv_3x3", "none", "skip_connect", "dil_conv_3x3")  # active: not one run


@pytest.mark.parametrize(
    ("primitives", "speed"),
    [
        (PRIMITIVES, SpeedConfig(skip_none=True, shared_relu=True, stacked_mixture=False)),
        (PRIMITIVES, SpeedConfig(skip_none=False, shared_relu=False, stacked_mixture=True)),
        (PRIMITIVES, SpeedConfig(skip_none=True, shared_relu=True, stacked_mixture=True)),
        (NONE_INSIDE, SpeedConfig(skip_none=True, shared_relu=False, stacked_mixture=True)),
    ],
    ids=["skip_none+shared_relu", "stacked", "all", "stacked-none-inside"],
)
def test_the_fast_mixed_op_equals_eq_1_with_gradients(primitives: tuple[str, ...], speed: SpeedConfig) -> None:
    torch.manual_seed(0)
    plain = MixedOp(4, 2, primitives)
    fast = MixedOp(4, 2, primitives, speed)
    fast.load_state_dict(plain.state_dict())
    none_skipped = primitives.index("none") not in fast.active
    assert none_skipped == speed.skip_none
    assert sum(fast.after_relu) == (sum(map(starts_with_relu, fast.ops)) if speed.shared_relu else 0)
    assert not (speed.shared_relu and primitives == PRIMITIVES) or sum(fast.after_relu) == 5  # 4 convs + reduce
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    alpha = torch.randn(len(primitives), requires_grad=True)
    outs, grads = [], []
    for op in (plain, fast):
        y = op(x, torch.softmax(alpha, 0))
        outs.append(y)
        grads.append(torch.autograd.grad((y * y).sum(), [x, alpha, *op.parameters()]))
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_cpu_weighted_sum_equals_the_stacked_product_twice_differentiated(channels_last: bool) -> None:
    """Eq. 1's sum on CPU (in place, hand-written gradient) against the stacked product a GPU runs: the same values,
    gradients for the weights and every output, and the same second derivatives through the gradient (the exact
    Hessian's double backward)."""
    gen = torch.Generator().manual_seed(0)
    outputs = [torch.randn(2, 4, 3, 3, generator=gen) for _ in range(5)]
    if channels_last:
        outputs = [y.contiguous(memory_format=torch.channels_last) for y in outputs]
    weights = torch.softmax(torch.randn(5, generator=gen), 0)
    upstream, probe = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(5, generator=gen)
    results = []
    for fn in (weighted_sum, stacked_weighted_sum):
        ws, ys = weights.clone().requires_grad_(), [y.clone().requires_grad_() for y in outputs]
        total = fn(ws, ys)
        grads = torch.autograd.grad(total, [ws, *ys], upstream, create_graph=True)
        second = torch.autograd.grad((grads[0] * probe).sum(), ys)  # d⟨∂/∂weights, probe⟩ / d outputs
        results.append([total, *grads, *second])
        assert total.is_contiguous(memory_format=torch.channels_last) == channels_last
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("native", [False, True], ids=["pytorch", "native"])
@pytest.mark.parametrize("normalized", [False, True], ids=["sum", "norms-in-sum"])
def test_the_batched_cpu_sum_equals_each_edges_own_sum_twice_differentiated(normalized: bool, native: bool) -> None:
    """Eq. 1 for m edges stacked along the channels (nas.search_model._EdgeWeightedSum, CPU, channels_last; its
    forward and norms by PyTorch's operators or the native kernels, ``search.speed.native_sum`` and ``native_norm``)
    against each edge's own sum on its block of channels (the stacked product; with closing batch norms inside the
    sum for some candidates, the edge's own _NormalizedWeightedSum): values, gradients for the (candidate, edge) weights
    and every input, second derivatives through those gradients (the exact Hessian's double backward), and the
    running statistics the norms leave."""
    from nas.search_model import _EdgeWeightedSum, _NormalizedWeightedSum

    gen = torch.Generator().manual_seed(0)
    k, m, c = 5, 3, 4
    inputs = [
        torch.randn(2, m * c, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last) for _ in range(k)
    ]
    weights = torch.softmax(torch.randn(k, m, generator=gen), 0)
    upstream = torch.randn(2, m * c, 3, 3, generator=gen)
    probes = [torch.randn(k, m, generator=gen), *(torch.randn(x.shape, generator=gen) for x in inputs)]
    normed = [normalized and i in (1, 2, 4) for i in range(k)]
    running = [(torch.rand(m * c, generator=gen), 1 + torch.rand(m * c, generator=gen)) for _ in range(k)]

    def norms(block: slice, native: bool = False) -> tuple:
        arguments = [NormArguments(rm[block], rv[block], 0.1, 1e-5, native) for rm, rv in running]
        return tuple(a if on else None for on, a in zip(normed, arguments))

    def each_edge(ws: torch.Tensor, xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        blocks = [slice(e * c, (e + 1) * c) for e in range(m)]
        if not normalized:
            return tuple(stacked_weighted_sum(ws[:, e], [x[:, b] for x in xs]) for e, b in enumerate(blocks))
        dense = [[x[:, b].contiguous(memory_format=torch.channels_last) for x in xs] for b in blocks]
        return tuple(_NormalizedWeightedSum.apply(ws[:, e], norms(b), *dense[e]) for e, b in enumerate(blocks))

    def together(ws: torch.Tensor, xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return _EdgeWeightedSum.apply(ws, norms(slice(None), native), (False,) * k, 1, native, *xs).split(c, dim=1)

    start = [(rm.clone(), rv.clone()) for rm, rv in running]
    results = []
    for fn in (together, each_edge):
        ws, xs = weights.clone().requires_grad_(), [x.clone().requires_grad_() for x in inputs]
        total = torch.cat(fn(ws, xs), dim=1)
        stats = [t.clone() for pair in running for t in pair]
        for (rm, rv), (rm0, rv0) in zip(running, start):  # the same statistics for the other way
            rm.copy_(rm0)
            rv.copy_(rv0)
        grads = torch.autograd.grad(total, [ws, *xs], upstream, create_graph=True)
        second = torch.autograd.grad(sum((g * p).sum() for g, p in zip(grads, probes)), [ws, *xs])
        results.append([total, *grads, *second, *stats])
    assert torch.cat(together(weights, inputs), dim=1).is_contiguous(memory_format=torch.channels_last)
    if normalized:  # the norms moved the running statistics
        assert not torch.equal(results[0][-2], start[-1][0])
    # float32 sums in another order: atol 1e-6 holds at this seed, but fails for 1-3% of seeds, norms or none
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [False, True], ids=["pytorch", "native"])
@pytest.mark.parametrize("states", [1, 2])
def test_a_candidate_computed_once_per_state_equals_it_on_every_edge(states: int, native: bool) -> None:
    """The batched sum (nas.search_model._EdgeWeightedSum) with candidates given once per state (one with its batch
    norm inside the sum, one without; its forward and norms by PyTorch's operators or the native kernels) against
    the same sum, by PyTorch's, with those inputs repeated for every edge leaving the state: values, the running
    statistics the norms leave, gradients by the native kernel (nothing to differentiate again) and by PyTorch's
    operators (differentiated again: the exact Hessian's double backward), and second derivatives."""
    from nas.search_model import _EdgeWeightedSum

    gen = torch.Generator().manual_seed(states)
    r, c = 3, 4
    m = states * r
    full = [torch.randn(2, m * c, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    once = [
        torch.randn(2, states * c, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last) for _ in range(2)
    ]
    weights = torch.softmax(torch.randn(4, m, generator=gen), 0)
    upstream = torch.randn(2, m * c, 3, 3, generator=gen)
    probes = [torch.randn(4, m, generator=gen), *(torch.randn(x.shape, generator=gen) for x in full + once)]
    leaders = (torch.rand(states * c, generator=gen), 1 + torch.rand(states * c, generator=gen))

    def repeated(x: torch.Tensor) -> torch.Tensor:  # each state's block once for each of its edges
        blocks = x.split(c, dim=1)
        return torch.cat([b for b in blocks for _ in range(r)], dim=1).contiguous(memory_format=torch.channels_last)

    def run(shared: bool, create_graph: bool) -> list[torch.Tensor]:
        ws = weights.clone().requires_grad_()
        xs = [x.clone().requires_grad_() for x in full + once]
        full_stats = [torch.zeros(m * c), torch.ones(m * c)]
        stats = [t.clone() for t in leaders]
        if not shared:  # every edge with its state's statistics
            stats = [repeated(t.view(1, -1, 1, 1)).flatten() for t in stats]
        on = native and shared
        norms = (None, NormArguments(*full_stats, 0.1, 1e-5, on), None, NormArguments(*stats, 0.1, 1e-5, on))
        if shared:
            total = _EdgeWeightedSum.apply(ws, norms, (False, False, True, True), states, on, *xs)
        else:
            total = _EdgeWeightedSum.apply(ws, norms, (False,) * 4, 1, False, *xs[:2], *map(repeated, xs[2:]))
        grads = torch.autograd.grad(total, [ws, *xs], upstream, create_graph=create_graph)
        second = []
        if create_graph:
            second = torch.autograd.grad(sum((g * p).sum() for g, p in zip(grads, probes)), [ws, *xs])
        return [total, *grads, *second, *full_stats, *stats]

    for create_graph in (False, True):
        got, want = run(True, create_graph), run(False, create_graph)
        if not create_graph:
            assert kernels.native_available()  # the gradients above came from the native kernel
        assert not torch.equal(got[-2], leaders[0])  # the norm moved the statistics
        for a, b in zip(got[:-2], want[:-2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(got[-2:], want[-2:]):  # each edge's: its state's
            torch.testing.assert_close(b.view(states, r, c), a.view(states, 1, c).expand(states, r, c))


def test_edges_following_a_leaders_batch_norm_update_their_own_statistics() -> None:
    """RunningStats.follow: an edge whose candidate was computed by another edge leaving the same state (a leader)
    ends with the running statistics its own batch norm would have reached on that batch, from its own old ones."""
    from nas.batched import stacked_norm_arguments

    gen = torch.Generator().manual_seed(0)
    c = 3
    norms = [nn.BatchNorm2d(c, affine=False, momentum=0.25) for _ in range(4)]
    for norm in norms:
        norm.running_mean.copy_(torch.randn(c, generator=gen))
        norm.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    own = [copy.deepcopy(n) for n in norms]
    x = torch.randn(5, 2 * c, 4, 4, generator=gen)  # two states, c channels each; edges 0, 1 leave the first
    for norm, block in zip(own, [x[:, :c], x[:, :c], x[:, c:], x[:, c:]]):
        norm(block)
    stats = RunningStats()
    mean, var, momentum, eps, _ = stacked_norm_arguments([norms[0], norms[2]], stats)
    torch.native_batch_norm(x, None, None, mean, var, True, momentum, eps)
    stats.follow([norms[1], norms[3]], [norms[0], norms[2]])
    stats.apply()
    for got, want in zip(norms, own):
        torch.testing.assert_close(got.running_mean, want.running_mean)
        torch.testing.assert_close(got.running_var, want.running_var)
        assert got.num_batches_tracked == want.num_batches_tracked == 1


class PoolChannels(TorchDispatchMode):
    """The channels every pooling operator is handed."""

    def __init__(self) -> None:
        super().__init__()
        self.channels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        if func.overloadpacket in (torch.ops.aten.max_pool2d_with_indices, torch.ops.aten.avg_pool2d):
            self.channels += args[0].shape[1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("partial_channels", [1, 4], ids=["darts", "pc-darts"])
def test_weightless_candidates_run_once_per_state_in_training_and_per_edge_in_eval(partial_channels: int) -> None:
    """``weightless_once``: in training the pooling candidates see each state once, not once for each edge leaving
    it (14 edges leave 5 states in a normal cell of 4 nodes), for the same output and gradients. In eval mode, where
    each edge's batch norm uses its own running statistics, they run for every edge, and the output is still the
    same with the switch on and off."""
    x = torch.randn(2, 1, 8, 8)
    nets, outputs, channels = [], [], []
    for once in (True, False):
        torch.manual_seed(0)
        speed = SpeedConfig(weightless_once=once, native_pool=False)  # PyTorch's poolings: the ones counted here
        net = tiny_network(speed, partial_channels).to(memory_format=torch.channels_last)
        with PoolChannels() as pools:
            outputs.append(net(x))
        nets.append(net)
        channels.append(pools.channels)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    # nodes=2: the cell inputs' 4 edges leave 2 states, node 0's one edge its own state: 3 of 5 blocks (PC-DARTS
    # also max-pools the channels its reductions pass by, as many either way)
    assert channels[0] * 5 == channels[1] * 3 if partial_channels == 1 else channels[0] < channels[1]
    grads = [torch.autograd.grad(out.square().sum(), list(net.alphas())) for out, net in zip(outputs, nets)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for net in nets:  # each edge's own running statistics, the same in both networks
        gen = torch.Generator().manual_seed(1)
        for name, buffer in sorted(net.named_buffers()):
            if "running" in name:
                buffer.copy_(torch.rand(buffer.shape, generator=gen) + 0.5)
        net.eval()
    evaluated = []
    for net in nets:
        with PoolChannels() as pools:
            evaluated.append(net(x))
        channels.append(pools.channels)
    torch.testing.assert_close(evaluated[0], evaluated[1], rtol=1e-5, atol=1e-5)
    assert channels[2] == channels[3]


def test_a_cells_candidates_are_found_once_and_again_after_eval_or_a_swap() -> None:
    """SearchCell.candidates: each group's candidates and their closing norms are looked up once, not on every
    forward; switching to eval mode (no closing norm in the sum) or swapping the modules (the key can_batch watches)
    finds them again, with the swapped-in norm; so does once_per_state (a pooling swapped for a convolution has
    weights)."""
    cell = tiny_network(SpeedConfig()).cells[0]
    k = PRIMITIVES.index("max_pool_3x3")  # the pooling, then its closing norm
    candidates, splits = cell.candidates(0, k)
    assert cell.candidates(0, k)[0] is candidates  # found once
    assert all(split is not None and type(split[1]) is torch.nn.BatchNorm2d for split in splits)
    cell.eval()
    assert cell.candidates(0, k)[1] == [None] * len(splits)  # a norm in eval mode is no closing norm of the sum
    cell.train()
    assert cell.once_per_state(0, k, normalize=True)
    op = cell.edges[cell.groups[0][0][1]].ops[k]
    op[-1] = torch.nn.BatchNorm2d(op[-1].num_features, affine=False)
    op[0] = torch.nn.Conv2d(op[-1].num_features, op[-1].num_features, 3, padding=1)
    cell.preprocess1[-1] = torch.nn.BatchNorm2d(cell.preprocess1[-1].num_features)  # as ray.sync_bn swaps them all
    assert cell.candidates(0, k)[1][0][1] is op[-1]
    assert not cell.once_per_state(0, k, normalize=True)


def two_mixed_ops(
    stride: int, channels_last: bool, switch: str = "norm_in_sum", **common: bool
) -> tuple[MixedOp, MixedOp]:
    """The same edge with ``switch`` off and on (each candidate's closing batch norm outside eq. 1's sum and inside
    it, by default)."""
    torch.manual_seed(0)
    outside = MixedOp(4, stride, PRIMITIVES, SpeedConfig(**{**common, switch: False}))
    inside = MixedOp(4, stride, PRIMITIVES, SpeedConfig(**{**common, switch: True}))
    inside.load_state_dict(outside.state_dict())
    if channels_last:
        outside, inside = (m.to(memory_format=torch.channels_last) for m in (outside, inside))
    return outside, inside


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_batch_norm_inside_the_sum_equals_it_outside_twice_differentiated(stride: int, channels_last: bool) -> None:
    """Values, first derivatives (input, α, every weight), the second derivatives the exact Hessian takes (of the
    α-gradient through the weights and the input), and the running statistics after the forward."""
    outside, inside = two_mixed_ops(stride, channels_last)
    fused = [closing_norm(op, after) is not None for op, after in zip(inside.ops, inside.after_relu)]
    assert sum(fused) == 6  # both pools, both sep convs, both dil convs; not skip_connect nor 'none'
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    alpha = torch.randn(len(PRIMITIVES), generator=gen)
    probe = torch.randn(len(PRIMITIVES), generator=gen)
    results = []
    for op in (outside, inside):
        xs, a = x.clone().requires_grad_(), alpha.clone().requires_grad_()
        y = op(xs, torch.softmax(a, 0))
        assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
        first = torch.autograd.grad((y * y).sum(), [xs, a, *op.parameters()], create_graph=True)
        second = torch.autograd.grad((first[1] * probe).sum(), [xs, *op.parameters()])
        results.append([y, *first, *second, *op.state_dict().values()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def kept_for_the_backward(ops: Sequence[MixedOp], x: torch.Tensor) -> list[int]:
    """Bytes each op's forward keeps for its backward (distinct storages)."""
    weights = torch.softmax(torch.randn(len(PRIMITIVES)), 0).requires_grad_()
    kept = []
    for op in ops:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor, storages: dict[int, int] = storages) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            op(x, weights)
        kept.append(sum(storages.values()))
    return kept


def test_batch_norm_inside_the_sum_keeps_one_activation_less_per_candidate() -> None:
    """The six normalized candidate outputs are no longer kept, and nothing of that size is added."""
    outside, inside = two_mixed_ops(1, channels_last=True, recompute_depthwise=False)
    x = torch.randn(4, 4, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    kept = kept_for_the_backward((outside, inside), x)
    output = x.numel() * x.element_size()
    assert 6 * output <= kept[0] - kept[1] <= 6 * output + 1024  # (the outside norms also keep running statistics)


@pytest.mark.parametrize("stride", [1, 2])
def test_recomputing_the_depthwise_outputs_keeps_twelve_or_ten_activations_less_per_edge(stride: int) -> None:
    """sep_conv_3x3 and sep_conv_5x5 each keep neither of their two depthwise outputs nor the ReLU's output between
    their two halves; dil_conv_3x3 and dil_conv_5x5 keep neither the input's sub-grids stacked along the batch nor
    the output interleaved back (stride 1), nor the output of the stride-d sub-grid (stride 2); max_pool_3x3 keeps no
    argmax (int64: two activations' bytes)."""
    outside, inside = two_mixed_ops(
        stride, channels_last=True, switch="recompute_depthwise", native_depthwise_grad=False
    )  # with the native gradient the dilated ones keep no sub-grids either way (below)
    x = torch.randn(4, 4, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    kept = kept_for_the_backward((outside, inside), x)
    depthwise_output = x.numel() // stride**2 * x.element_size()  # both at the output's size (the first has the stride)
    less = (12 if stride == 1 else 10) * depthwise_output
    assert less <= kept[0] - kept[1] <= less + 1024  # (the layers' norms also keep their running statistics)


def test_recomputing_the_depthwise_outputs_with_batched_edges_keeps_them_for_no_edge() -> None:
    """With batched edges, ``recompute_depthwise`` keeps none of the stacked depthwise outputs of the separable and
    dilated convolutions (two per sep_conv, one per dil_conv, each the size of the stacked input at the candidates'
    stride) nor the ReLU's output in the middle of a sep_conv, for the same output and gradients (against the plain
    path: test_each_switch_alone...)."""
    x = torch.randn(2, 1, 8, 8)
    kept, outputs = [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        speed = SpeedConfig(recompute_depthwise=recompute, native_depthwise_grad=False)
        net = tiny_network(speed).to(memory_format=torch.channels_last)
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor, storages: dict[int, int] = storages) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs.append(net(x))
        kept.append(sum(storages.values()))
    torch.testing.assert_close(outputs[0], outputs[1])
    # the first cell (a normal one: 8x8, 4 channels an edge, 5 edges in 2 groups): 2 + 2 + 1 + 1 depthwise outputs
    # and 1 + 1 ReLU outputs of every edge, 8 x 5 x (2 x 4 x 8 x 8) floats, at least (the dense dilation's copies
    # come on top)
    assert kept[0] - kept[1] >= 8 * 5 * 2 * 4 * 8 * 8 * 4


@pytest.mark.parametrize("native", [False, True], ids=["pytorch-norm", "native-norm"])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [False, True])
def test_a_norm_relu_and_separable_convolution_as_one_give_the_layers_values_statistics_and_derivatives(
    affine: bool, momentum: float | None, dilation: int, native: bool
) -> None:
    """:func:`nas.ops.norm_relu_separable` (two edges' layers batched: a pointwise convolution of 2 groups) against
    the batch norm, ReLU, depthwise and 1x1 convolutions run as modules: output, running statistics, first
    derivatives (input, norm's scale and shift, both weights) with and without a graph, an α-only pass's (the weights
    constant) and second derivatives through a gradient (the exact Hessian's); its norm by PyTorch's kernel (bit for
    bit the running statistics) or the native one (``search.speed.native_norm``, the same sums in another order)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, 8, 8, generator=gen).contiguous(memory_format=torch.channels_last)
    probe = torch.randn(3, 8, 8, 8, generator=gen)
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(8, affine=affine, momentum=momentum)
    depthwise = DepthwiseConv2d(8, 5, 1, 2 * dilation, dilation)
    depthwise.native_grad = True  # the native weight gradient where it is built; dilated: the dense re-layout
    depthwise.dense = dilation > 1
    pointwise = nn.Conv2d(4, 8, 1, bias=False)  # 2 groups: 4 channels in and 4 out an edge
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    twin = copy.deepcopy(norm)
    twin.native_norm = native
    parameters = [p for p in (norm.weight, norm.bias) if p is not None] + [depthwise.weight, pointwise.weight]
    twin_parameters = [p for p in (twin.weight, twin.bias) if p is not None] + [depthwise.weight, pointwise.weight]

    def layers(u: torch.Tensor) -> torch.Tensor:
        return F.conv2d(depthwise(F.relu(norm(u))), pointwise.weight, None, 1, 0, 1, 2)

    def fused(u: torch.Tensor) -> torch.Tensor:
        arguments = norm_arguments(twin)
        return norm_relu_separable(
            u, twin.weight, twin.bias, arguments, depthwise.weight, pointwise.weight, depthwise, 2
        )

    results = []
    for run, params in ((layers, parameters), (fused, twin_parameters)):
        u = x.clone().requires_grad_()
        y = run(u)
        first = torch.autograd.grad((y * probe).sum(), [u, *params], create_graph=True)
        second = torch.autograd.grad((first[0] * probe).sum(), [u, *params])
        plain_first = torch.autograd.grad((run(u) * probe).sum(), [u, *params])  # the weight step's: no graph
        for p in params:  # as the architect's α pass: the weights constant, the input's gradient alone
            p.requires_grad_(False)
        alpha_only = torch.autograd.grad((run(u) * probe).sum(), u)
        for p in params:
            p.requires_grad_(True)
        results.append([y, *first, *second, *plain_first, *alpha_only])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    exact = 1e-6 if native else 0.0
    torch.testing.assert_close(norm.running_mean, twin.running_mean, rtol=exact, atol=exact)
    torch.testing.assert_close(norm.running_var, twin.running_var, rtol=exact, atol=exact)
    assert int(norm.num_batches_tracked) == int(twin.num_batches_tracked) == 3
    assert is_channels_last(results[1][0]) and is_channels_last(results[1][1])


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("stride", [1, 2, None])
def test_a_max_pooling_with_its_argmax_recomputed_gives_the_layers_values_and_derivatives_and_keeps_no_indices(
    stride: int | None, ceil_mode: bool
) -> None:
    """:func:`nas.ops.forward_layer` with ``recompute`` on an ``nn.MaxPool2d`` (stride None: the kernel's) against
    the layer: output, first derivatives with and without a graph, second derivatives through a gradient (the
    pooling's backward differentiated in its incoming gradient), and of what the pooling keeps for the backward only
    its input (no int64 argmax)."""
    pool = nn.MaxPool2d(3, stride=stride, padding=1, ceil_mode=ceil_mode)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 9, 9, generator=gen).contiguous(memory_format=torch.channels_last)
    probe, probe_in = torch.randn(pool(x).shape, generator=gen), torch.randn(x.shape, generator=gen)
    results, kept = [], []
    for recompute in (False, True):
        u = x.clone().requires_grad_()
        v = torch.sin(u)  # the pooling's input and its gradient both depend on u: a real second derivative
        storages: dict[int, tuple[int, torch.dtype]] = {}

        def pack(t: torch.Tensor, storages: dict = storages) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = forward_layer(pool, v, recompute)
        kept.append(storages)
        first = torch.autograd.grad((y * y * probe).sum(), u, create_graph=True)[0]
        second = torch.autograd.grad((first * probe_in).sum(), u)[0]
        plain_first = torch.autograd.grad((forward_layer(pool, torch.sin(u), recompute) * probe).sum(), u)[0]
        results.append([y, first, second, plain_first])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert results[1][2].abs().sum() > 0
    assert any(dtype == torch.int64 for _, dtype in kept[0].values())  # the layer keeps its argmax
    assert list(kept[1].values()) == [(x.numel() * x.element_size(), torch.float32)]  # only its input


@pytest.mark.parametrize("stride", [1, 2])
def test_the_native_gradient_keeps_no_sub_grids_of_a_dilated_convolution(stride: int) -> None:
    """At stride 1, dil_conv_3x3 and dil_conv_5x5 keep their input as it is (already kept: the shared ReLU's output)
    instead of its sub-grids stacked along the batch: two activations less per edge. At stride 2 they read a view
    of the input, nothing copied, so nothing changes."""
    outside, inside = two_mixed_ops(stride, channels_last=True, switch="native_depthwise_grad")
    x = torch.randn(4, 4, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    kept = kept_for_the_backward((outside, inside), x)
    assert kept[0] - kept[1] == (2 * x.numel() * x.element_size() if stride == 1 else 0)


@pytest.mark.parametrize("dense_dilation", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_recomputed_depthwise_outputs_give_the_same_values_and_derivatives(
    stride: int, channels_last: bool, dense_dilation: bool
) -> None:
    """Values, first and second derivatives, and an α pass's (the weights constant: the input's gradient alone)."""
    outside, inside = two_mixed_ops(stride, channels_last, "recompute_depthwise", dense_dilation=dense_dilation)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    alpha, probe = torch.randn(len(PRIMITIVES), generator=gen), torch.randn(len(PRIMITIVES), generator=gen)
    results = []
    for op in (outside, inside):
        xs, a = x.clone().requires_grad_(), alpha.clone().requires_grad_()
        y = op(xs, torch.softmax(a, 0))
        first = torch.autograd.grad((y * y).sum(), [xs, a, *op.parameters()], create_graph=True)
        second = torch.autograd.grad((first[1] * probe).sum(), [xs, *op.parameters()])
        constants = {n: p.detach() for n, p in op.named_parameters()}  # as the architect's α pass: no weight gradient
        again = functional_call(op, constants, (xs, torch.softmax(a, 0)))
        alpha_only = torch.autograd.grad((again**2).sum(), [xs, a])
        results.append([y, *first, *second, *alpha_only])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_default_mixed_op_under_activation_checkpointing_gives_the_same_gradients() -> None:
    """Its hand-written backwards read their saved tensors once, as recomputed ones may be read only once."""
    torch.manual_seed(0)
    op = MixedOp(4, 1, PRIMITIVES, SpeedConfig())
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    alpha = torch.randn(len(PRIMITIVES), requires_grad=True)
    grads = []
    for checkpointed in (False, True):
        run = torch.utils.checkpoint.checkpoint if checkpointed else lambda f, *a, **_: f(*a)
        y = run(op, x, torch.softmax(alpha, 0), use_reentrant=False)
        grads.append(torch.autograd.grad((y * y).sum(), [x, alpha, *op.parameters()]))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_only_a_plain_closing_batch_norm_in_training_goes_inside_the_sum() -> None:
    class CrossRank(nn.BatchNorm2d):  # as ray.sync_bn's norm: its statistics come from every rank
        pass

    def candidate(norm: nn.Module) -> nn.Sequential:
        return nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 1), norm)

    op = candidate(nn.BatchNorm2d(4, affine=False))
    assert closing_norm(op, after_relu=False) == ([op[0], op[1]], op[2])
    assert closing_norm(op, after_relu=True) == ([op[1]], op[2])
    assert closing_norm(op.eval(), after_relu=False) is None  # eval: running statistics, no batch statistics
    assert closing_norm(candidate(CrossRank(4, affine=False)), after_relu=False) is None
    assert closing_norm(candidate(nn.BatchNorm2d(4)), after_relu=False) is None  # affine: not in the supernet
    assert closing_norm(nn.Sequential(nn.Conv2d(4, 4, 1)), after_relu=False) is None


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "size"),
    [
        (3, 1, 2, 2, 8),  # dil_conv_3x3: interleaved sub-grids
        (5, 1, 4, 2, 6),  # dil_conv_5x5
        (5, 2, 4, 2, 8),  # reduction: the even sub-grid alone
        (3, 2, 2, 2, 7),  # reduction on an odd size
        (3, 3, 3, 3, 9),  # dilation 3, stride 3
        (3, 1, 3, 3, 9),  # dilation 3, 9 sub-grids
        (3, 1, 2, 2, 7),  # odd size at stride 1: runs dilated
        (3, 1, 1, 2, 8),  # padding not a multiple of the dilation: runs dilated
    ],
)
def test_a_dilated_depthwise_convolution_computed_dense_equals_it_with_gradients(
    kernel: int, stride: int, padding: int, dilation: int, size: int, channels_last: bool
) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, size, size + 2 * (size % 2 == 0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(4, 1, kernel, kernel, requires_grad=True)
    want = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, 4)
    got = dilated_as_dense(x, weight, stride, padding, dilation)
    assert got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, [x, weight], g), torch.autograd.grad(want, [x, weight], g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("kernel", "padding", "dilation", "height", "width"),
    [
        (3, 1, 1, 8, 8),  # sep_conv_3x3
        (5, 2, 1, 8, 6),  # sep_conv_5x5
        (3, 2, 2, 8, 10),  # dil_conv_3x3
        (5, 4, 2, 7, 9),  # dil_conv_5x5 on odd sizes
        (3, 0, 1, 6, 6),  # no padding: the output is smaller
        (3, 1, 2, 7, 7),  # padding off the dilation's multiple: still the input's size back
        (3, 3, 3, 9, 5),  # dilation 3
    ],
)
def test_the_flipped_input_gradient_equals_pytorchs_backward(
    kernel: int, padding: int, dilation: int, height: int, width: int, channels_last: bool
) -> None:
    """``search.speed.flipped_input_grad``: a depthwise convolution's input gradient at stride 1 as the forward
    convolution of the output's gradient with the kernel flipped, against PyTorch's backward (float64), in the
    input's memory layout; at stride 2 PyTorch's backward runs."""
    from nas.ops import _input_gradient

    gen = torch.Generator().manual_seed(kernel * 10 + dilation)
    x = torch.randn(3, 5, height, width, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(5, 1, kernel, kernel, generator=gen)
    for stride in (1, 2):
        out = F.conv2d(x, weight, None, stride, padding, dilation, 5)
        grad = torch.randn(out.shape, generator=gen).contiguous(memory_format=memory_layout(x))
        geometry = ([stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], 5, [True, False, False])
        want = torch.ops.aten.convolution_backward(grad.double(), x.double(), weight.double(), None, *geometry)[0]
        got = _input_gradient(grad, weight, x, stride, padding, dilation, flipped=True)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert is_channels_last(got) == is_channels_last(x)


class DilatedBackward(TorchDispatchMode):
    """How many dilated depthwise convolutions PyTorch differentiates (its own backward), and how many it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.backward = self.forward = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        name = func.overloadpacket.__name__
        if name in ("convolution", "convolution_backward"):
            weight, dilation = (args[1], args[5]) if name == "convolution" else (args[2], args[6])
            if weight.shape[1] == 1 and max(dilation) > 1:
                self.forward += name == "convolution"
                self.backward += name == "convolution_backward"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batched_edges", [True, False])
def test_flipped_input_gradients_leave_no_dilated_convolution_to_pytorchs_backward(
    batched_edges: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Second order, default switches (the dense re-layout on): with flipped_input_grad every dilated depthwise
    convolution at stride 1 runs dilated as it is, forward and flipped, in the weight passes and in the α passes
    (weights as constants) alike: nothing is re-laid dense, and PyTorch's dilated backward never runs (the
    reductions' stride-2 edges read one sub-grid, a dense convolution); off, none runs dilated (all re-laid
    dense)."""
    import nas.ops

    relaid = []
    grids_to_batch = nas.ops._grids_to_batch

    def counted(x: torch.Tensor, d: int) -> torch.Tensor:
        relaid.append(d)
        return grids_to_batch(x, d)

    monkeypatch.setattr(nas.ops, "_grids_to_batch", counted)
    seen = {}
    for on in (True, False):
        torch.manual_seed(0)
        cfg = tiny_config(SpeedConfig(flipped_input_grad=on, batched_edges=batched_edges), xi=0.01)
        searcher = Searcher(cfg, in_channels=1, num_classes=3)
        x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
        relaid.clear()
        with DilatedBackward() as mode:
            searcher.step(x, y, x, y)
        seen[on] = (mode.forward, mode.backward, len(relaid))
    assert seen[True][0] > 0 and seen[True][1:] == (0, 0)
    assert seen[False][:2] == (0, 0) and seen[False][2] > 0


def test_dense_dilation_reaches_every_dilated_convolution_and_keeps_the_state_dict() -> None:
    dense = MixedOp(4, 1, PRIMITIVES, SpeedConfig(dense_dilation=True))
    dilated = MixedOp(4, 1, PRIMITIVES, SpeedConfig(dense_dilation=False))
    depthwise = [m for m in dense.modules() if isinstance(m, DepthwiseConv2d)]
    assert sum(m.dilation[0] > 1 for m in depthwise) == 2  # dil_conv_3x3 and dil_conv_5x5
    assert all(m.dense for m in depthwise)
    assert not any(m.dense for m in dilated.modules() if isinstance(m, DepthwiseConv2d))
    assert dense.state_dict().keys() == dilated.state_dict().keys()
    assert all(
        key.endswith(("weight", "running_mean", "running_var", "num_batches_tracked")) for key in dense.state_dict()
    )


def test_channels_last_network_keeps_its_state_dict_and_deepcopies() -> None:
    import copy

    net = SearchNetwork(
        in_channels=1, channels=4, num_classes=3, layers=3, nodes=2, speed=SpeedConfig(channels_last=True)
    )
    conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain = SearchNetwork(in_channels=1, channels=4, num_classes=3, layers=3, nodes=2)
    assert net.state_dict().keys() == plain.state_dict().keys()
    assert copy.deepcopy(net)(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_a_channels_last_supernet_keeps_the_layout_through_every_mixed_op() -> None:
    """A mixed op that handed back channels-first tensors would leave the network in mixed layouts, where every
    elementwise operator and its gradient runs on a slow strided path. Edge by edge: batched edges call no mixed
    op's forward (their layout is tested below, through a whole backward)."""
    speed = SpeedConfig(channels_last=True, batched_edges=False)
    net = SearchNetwork(in_channels=1, channels=4, num_classes=3, layers=3, nodes=2, speed=speed)
    layouts: list[bool] = []
    for module in net.modules():
        if isinstance(module, MixedOp):
            module.register_forward_hook(
                lambda m, args, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last))
            )
    net(torch.randn(2, 1, 8, 8))
    assert layouts == [True] * sum(isinstance(m, MixedOp) for m in net.modules())


class ChannelsFirstOperands(TorchDispatchMode):
    """Records every operator that does work on a 4-d tensor laid out channels-first (one with more than one channel
    and more than one pixel, so that the layout is not ambiguous)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4]
        if not func.is_view and any(channels_first(t) for t in tensors):
            self.found.append(f"{func.overloadpacket.__name__} {[tuple(t.shape) for t in tensors]}")
        return func(*args, **(kwargs or {}))


def channels_first(t: torch.Tensor) -> bool:
    return t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1 and t.is_contiguous() and not is_channels_last(t)


@pytest.mark.parametrize("partial_channels", [1, 4], ids=["darts", "pc-darts"])
def test_a_channels_last_supernets_backward_never_meets_a_channels_first_gradient(partial_channels: int) -> None:
    """Forward and backward of the default path stay channels_last: slicing a sub-grid or PC-DARTS's channels,
    global average pooling and a channel shuffle by view and reshape all hand back channels-first tensors in
    PyTorch, and an elementwise operator (ReLU's gradient, a sum) over one operand of each layout runs 10-20 times
    slower on CPU than over two of the same."""
    torch.manual_seed(0)
    net = tiny_network(SpeedConfig(), partial_channels)
    assert SpeedConfig().channels_last and SpeedConfig().dense_dilation
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    with ChannelsFirstOperands() as mode:
        nn.functional.cross_entropy(net(x), y).backward()
    assert mode.found == []


def test_every_pass_of_a_second_order_step_stays_channels_last() -> None:
    """The virtual step's w' and the finite difference's w ± ε·v come from multi-tensor arithmetic, which can hand
    back channels-first tensors for channels_last weights; a pass run with those (here, on a one-channel input,
    whose layout is ambiguous) would run channels-first from the stem on."""
    torch.manual_seed(0)
    searcher = Searcher(tiny_config(SpeedConfig(), xi=0.025), in_channels=1, num_classes=3)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    with ChannelsFirstOperands() as mode:
        searcher.step(x, y, x, y)
    assert mode.found == []


def test_laid_out_as_gives_the_weights_strides_by_a_view_where_memory_agrees_and_a_copy_where_not() -> None:
    cl = torch.channels_last
    depthwise, stem = torch.randn(16, 1, 5, 5), torch.randn(12, 3, 3, 3)
    like = [depthwise.contiguous(memory_format=cl), stem.contiguous(memory_format=cl), torch.randn(7)]
    results = [depthwise * 2, stem * 2, torch.arange(7.0)]  # channels-first, as multi-tensor arithmetic may give
    out = laid_out_as(results, like)
    assert [o.stride() for o in out] == [w.stride() for w in like]
    assert all(torch.equal(o, r) for o, r in zip(out, results))
    assert out[0].data_ptr() == results[0].data_ptr()  # same memory order: a view
    assert out[1].data_ptr() != results[1].data_ptr() and out[2] is results[2]


def one_step_gradients(precision: str, xi: float | None) -> tuple[torch.Tensor, torch.Tensor, Searcher]:
    """The α gradient and the weight gradient of one search step, flattened."""
    torch.manual_seed(0)
    searcher = Searcher(tiny_config(SpeedConfig(), xi=xi, precision=precision), in_channels=1, num_classes=3)
    gen = torch.Generator().manual_seed(1)
    x_w, x_a = (torch.randn(8, 1, 8, 8, generator=gen) for _ in range(2))
    y_w, y_a = (torch.randint(0, 3, (8,), generator=gen) for _ in range(2))
    searcher.step(x_w, y_w, x_a, y_a)  # the gradients stay in .grad after the optimizers' steps
    alpha = torch.cat([a.grad.reshape(-1) for a in searcher.network.alphas()])
    weights = torch.cat([w.grad.reshape(-1) for w in searcher.network.weights() if w.grad is not None])
    return alpha, weights, searcher


@pytest.mark.parametrize("xi", [0.0, None])
def test_bf16_autocast_gives_fp32_gradients_within_a_few_percent(xi: float | None) -> None:
    """Not the same mathematics (bfloat16 keeps 8 bits of mantissa), so close rather than equal: the α and weight
    gradients of a step point where fp32's do (cosine above 0.95; on this tiny supernet, batch 8 of 8x8 images,
    they measure 0.98-0.99, about 15-20% apart in norm), and are not equal, which shows the forward passes really
    ran in bfloat16; every parameter, gradient and optimizer state stays fp32."""
    alpha, weights, searcher = one_step_gradients("bf16", xi)
    want_alpha, want_weights, _ = one_step_gradients("fp32", xi)
    for got, want in [(alpha, want_alpha), (weights, want_weights)]:
        assert got.dtype == torch.float32 and not torch.equal(got, want)
        assert float(torch.nn.functional.cosine_similarity(got, want, dim=0)) > 0.95
    states = [*searcher.w_optimizer.state.values(), *searcher.a_optimizer.state.values()]
    assert all(t.dtype == torch.float32 for state in states for t in state.values() if t.is_floating_point())


def test_the_finite_difference_hessian_runs_in_fp32_under_bf16() -> None:
    """Its two passes are ε apart: in bfloat16 their difference would be rounding noise."""
    products = []
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        searcher = Searcher(tiny_config(SpeedConfig(), precision=precision), in_channels=1, num_classes=3)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        vector = [torch.randn(w.shape, generator=gen) for w in searcher.architect.weights]
        products.append(searcher.architect.hessian_vector_product(vector, x, y))
    for fp32, bf16 in zip(*products):
        assert torch.equal(fp32, bf16)


LAYOUTS = pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
RELU_FIRST = [(n, s) for n in registered_ops() for s in (1, 2) if starts_with_relu(build_op(n, 4, s, affine=False))]


@pytest.mark.parametrize("name", registered_ops())
@pytest.mark.parametrize("stride", [1, 2])
@LAYOUTS
def test_batched_runs_each_registered_op_on_m_edges_as_they_run_alone(
    name: str, stride: int, layout: torch.memory_format
) -> None:
    """nas/batched.py on the same candidate of 3 edges (own weights), against each edge's module on its block of
    channels: outputs and gradients in training, outputs in eval, and the running statistics the modules keep; the
    output in the input's layout."""
    assert_batched_as_alone(name, stride, layout, lambda together, x, stats: batched(together, x, stats))


@pytest.mark.parametrize(("name", "stride"), RELU_FIRST)
@LAYOUTS
def test_batched_after_a_shared_relu_runs_each_op_that_begins_with_one_as_alone(
    name: str, stride: int, layout: torch.memory_format
) -> None:
    """``search.speed.shared_relu`` with batched edges: one ReLU of the stacked inputs for every such candidate."""
    assert {n for n, _ in RELU_FIRST} >= {"sep_conv_3x3", "dil_conv_5x5", "skip_connect"}  # skip: FactorizedReduce
    assert_batched_as_alone(
        name, stride, layout, lambda together, x, stats: batched_after_relu(together, x.relu(), stats)
    )


class ReLUCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        self.count += func.overloadpacket is torch.ops.aten.relu
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("once", [False, True], ids=["", "weightless_once"])
@pytest.mark.parametrize("partial_channels", [1, 4], ids=["darts", "pc-darts"])
def test_batched_edges_share_one_relu_per_stack(partial_channels: int, once: bool) -> None:
    """With batched edges, ``shared_relu`` takes one ReLU of each group's stacked inputs for every candidate that
    begins with one (four in a normal cell, five with the reduction's skip): fewer ReLUs, the same output. With
    ``weightless_once``, one ReLU of each state the group's edges leave (two for the cell inputs' edges)."""
    x = torch.randn(2, 1, 8, 8)
    outputs, counts = [], []
    for shared in (True, False):
        torch.manual_seed(0)
        speed = SpeedConfig(batched_edges=True, shared_relu=shared, weightless_once=once)
        net = tiny_network(speed, partial_channels)
        with ReLUCount() as relus:
            outputs.append(net(x))
        counts.append(relus.count)
    torch.testing.assert_close(outputs[0], outputs[1])
    groups, cells = 2, 3  # nodes=2: the cell inputs' edges, then node 0's
    assert counts[1] - counts[0] >= (3 * groups - once) * cells


def assert_batched_as_alone(name: str, stride: int, layout: torch.memory_format, run: Callable) -> None:
    torch.manual_seed(0)
    alone = [build_op(name, 4, stride, affine=False).to(memory_format=layout) for _ in range(3)]
    together = [build_op(name, 4, stride, affine=False).to(memory_format=layout) for _ in range(3)]
    for a, b in zip(alone, together):
        b.load_state_dict(a.state_dict())
    x = torch.randn(2, 12, 8, 8).contiguous(memory_format=layout).requires_grad_()
    for training in (True, True, False):
        for m in (*alone, *together):
            m.train(training)
        want = torch.cat([m(block) for m, block in zip(alone, x.chunk(3, dim=1))], dim=1)
        stats = RunningStats()
        got = run(together, x, stats)
        stats.apply()
        torch.testing.assert_close(got, want)
        assert got.is_contiguous(memory_format=layout)
        params = [p for m in alone for p in m.parameters()]
        if training and params:
            # A random probe, not got.square().sum(): through an affine-free batch norm the gradient of a sum of
            # squares is zero but for ε, and what is left is rounding.
            probe = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
            g_want = torch.autograd.grad((want * probe).sum(), [x, *params])
            g_got = torch.autograd.grad((got * probe).sum(), [x, *(p for m in together for p in m.parameters())])
            for a, b in zip(g_got, g_want):  # float32 sums over the batch in another order: 1e-5-ish apart
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(together, alone):
        for (key, got_buffer), want_buffer in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(got_buffer, want_buffer, msg=key)


def test_edge_groups_take_every_edge_once_after_its_input_is_ready() -> None:
    for nodes in (1, 2, 4, 5):
        groups = edge_groups(nodes)
        edges = [edge for group in groups for _, edge in group]
        assert sorted(edges) == list(range(sum(2 + i for i in range(nodes))))
        targets = [i for i in range(nodes) for _ in range(2 + i)]
        sources = [j for i in range(nodes) for j in range(2 + i)]
        for g, group in enumerate(groups):
            assert all(sources[edge] == source for source, edge in group)
            assert all(source < 2 + g for source, _ in group)  # ready: a cell input or a node of an earlier group
            assert len({source for source, _ in group}) == (2 if g == 0 else 1)
            assert g not in [targets[e] for later in groups[g + 1 :] for _, e in later]  # node g complete after g


def test_cross_rank_batch_norm_cells_run_edge_by_edge() -> None:
    """``ray.sync_bn`` swaps in batch norms whose statistics span ranks: nas/batched.py must not stand in for them."""
    from components.distributed import convert_to_global_batchnorm

    torch.manual_seed(0)
    batched = SpeedConfig(batched_edges=True)
    net = SearchNetwork(in_channels=1, channels=4, num_classes=3, layers=3, nodes=2, speed=batched)
    assert all(cell.batch_edges and cell.can_batch() for cell in net.cells)
    convert_to_global_batchnorm(net)
    assert not any(cell.can_batch() for cell in net.cells)
    pc = SearchNetwork(in_channels=1, channels=4, num_classes=3, layers=3, nodes=2, speed=batched, partial_channels=2)
    assert all(cell.batch_edges and cell.can_batch() for cell in pc.cells)
    convert_to_global_batchnorm(pc)
    assert not any(cell.can_batch() for cell in pc.cells)


@pytest.mark.parametrize(
    ("batched_edges", "partial_channels", "on"),
    [(None, 1, True), (None, 4, True), (False, 1, False), (False, 4, False)],
    ids=["darts-default", "pc-darts-default", "darts-off", "pc-darts-off"],
)
def test_batched_edges_are_on_by_default_for_darts_and_pc_darts(
    batched_edges: bool | None, partial_channels: int, on: bool
) -> None:
    """None: the field left out, its default (batched for both); ``False`` runs edge by edge."""
    speed = SpeedConfig() if batched_edges is None else SpeedConfig(batched_edges=batched_edges)
    net = SearchNetwork(
        in_channels=1, channels=8, num_classes=3, layers=3, nodes=2, speed=speed, partial_channels=partial_channels
    )
    assert all(cell.batch_edges is on for cell in net.cells)


def test_batched_edges_is_a_plain_bool_and_a_stored_null_reads_as_on() -> None:
    """No unset state any more: ``null``, which configs stored before meant "on for PC-DARTS only", is read as the
    default (on) so that their runs resume; anything but a bool is refused."""
    assert SpeedConfig.model_validate({"batched_edges": None}).batched_edges is True
    assert SpeedConfig(batched_edges=False).batched_edges is False
    with pytest.raises(ValidationError, match="batched_edges"):
        SpeedConfig(batched_edges="sometimes")


# 64 MB of float32: over glibc's largest mmap threshold, so by default every allocation of it is a fresh mapping.
PAGE_FAULTS_OF_AN_ALLOCATION_LOOP = """
import sys, torch
from bench.search_step import minor_page_faults
from nas.config import SearchConfig, SpeedConfig
from nas.search import Searcher

speed = SpeedConfig(keep_freed_memory=sys.argv[1] == "on")
Searcher(SearchConfig(layers=3, channels=4, nodes=2, batch_size=8, speed=speed), in_channels=1, num_classes=3)
for _ in range(3):  # the first ones fault their pages in either way, until the heap has room beside small objects
    torch.empty(64 << 18).fill_(1.0)
before = minor_page_faults()
for _ in range(4):
    torch.empty(64 << 18).fill_(1.0)
print(minor_page_faults() - before)
"""


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "given-back"])
def test_a_cpu_search_keeps_freed_memory_for_the_next_allocation(keep: bool) -> None:
    """``search.speed.keep_freed_memory``: once a search is built, memory a step frees is there for the next one,
    not mapped afresh and faulted in page by page (16384 faults per 64 MB); off, the allocator is left as it is. In
    a fresh process, since the setting is the process's."""
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-c", PAGE_FAULTS_OF_AN_ALLOCATION_LOOP, "on" if keep else "off"]
    done = run_bounded(command, timeout=120, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    faults = int(done.stdout.split()[-1])
    pages = 4 * (64 << 20) // resource.getpagesize()
    if keep:
        assert faults <= pages // 4  # none once the heap is warm; one allocation of the four at the most
    else:
        assert faults >= pages * 9 // 10


@pytest.mark.parametrize("pause", [True, False])
def test_a_search_step_runs_no_garbage_collection_with_pause_gc_and_leaves_the_collector_as_it_was(pause: bool) -> None:
    """``search.speed.pause_gc``: no collection starts between the step's first forward and its weight update, even
    with a threshold of one allocation, and the collector is on again after the step (also after one that raised),
    unless it was off before; off, collections run during the step as usual."""
    cfg = tiny_config(SpeedConfig(pause_gc=pause))
    torch.manual_seed(0)
    searcher = Searcher(cfg, in_channels=1, num_classes=3)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    inside, collections = [False], []
    searcher.network.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    searcher.w_optimizer.register_step_post_hook(lambda *_: inside.__setitem__(0, False))
    thresholds = gc.get_threshold()
    gc.set_threshold(1)
    gc.callbacks.append(lambda phase, _: collections.append(phase) if inside[0] and phase == "start" else None)
    try:
        searcher.step(x, y, x, y)
        after, during = gc.isenabled(), len(collections)
        with pytest.raises(ValueError, match="batch_size"):
            searcher.step(x, y[:3], x, y)  # labels that do not fit the batch
        after_an_error = gc.isenabled()
        gc.disable()
        searcher.step(x, y, x, y)
        off_before = gc.isenabled()
    finally:
        gc.callbacks.pop()
        gc.set_threshold(*thresholds)
        gc.enable()
    assert after and after_an_error and not off_before
    assert (during == 0) if pause else (during > 10)
