"""The architect against exact autograd: eq. 6 (virtual step), eq. 7 (α gradient), eq. 8 (finite difference)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F

from nas import Architect, SearchNetwork
from nas.architect import TensorSlots

PRIMS = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")
LR, MOMENTUM, WD = 0.1, 0.9, 3e-4


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    fa = torch.cat([t.reshape(-1) for t in a])
    fb = torch.cat([t.reshape(-1) for t in b])
    return float((fa - fb).norm() / fb.norm())


@pytest.fixture
def setup() -> tuple[SearchNetwork, torch.optim.SGD, tuple[torch.Tensor, ...]]:
    """A tiny float64 supernet whose optimizer already holds momentum buffers, and train/val batches."""
    torch.manual_seed(0)
    net = SearchNetwork(in_channels=1, channels=4, num_classes=3, layers=3, nodes=2, primitives=PRIMS).double()
    with torch.no_grad():
        for a in net.alphas():
            a.normal_(0, 0.5)
    opt = torch.optim.SGD(net.weights(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    gen = torch.Generator().manual_seed(1)
    tx, vx = (
        torch.randn(8, 1, 6, 6, generator=gen, dtype=torch.float64),
        torch.randn(8, 1, 6, 6, generator=gen, dtype=torch.float64),
    )
    ty, vy = torch.randint(0, 3, (8,), generator=gen), torch.randint(0, 3, (8,), generator=gen)
    F.cross_entropy(net(tx), ty).backward()  # one real step so μ·v is not zero
    opt.step()
    opt.zero_grad(set_to_none=True)
    for a in net.alphas():
        a.grad = None
    return net, opt, (tx, ty, vx, vy)


def exact_hvp(arch: Architect, v: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """∇α (∇w L_train(w, α) · v) by double backward."""
    loss = arch.loss(arch.weights, arch.alphas, x, y)
    g = torch.autograd.grad(loss, arch.weights, create_graph=True)
    dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
    return list(torch.autograd.grad(dot, arch.alphas))


def test_finite_difference_hessian_converges_to_exact(setup) -> None:  # noqa: ANN001
    net, opt, (tx, ty, vx, vy) = setup
    arch = Architect(net, opt, xi=LR)
    torch.manual_seed(3)
    v = [torch.randn_like(w) for w in arch.weights]
    exact = exact_hvp(arch, v, tx, ty)
    errors = {s: rel_err(arch.hessian_vector_product(v, tx, ty, scale=s), exact) for s in (1.0, 1e-2, 1e-4)}
    assert errors[1e-4] < 1e-4, errors
    assert errors[1e-4] < errors[1.0], errors


def test_second_order_gradient_equals_autograd_through_the_virtual_step(setup) -> None:  # noqa: ANN001
    net, opt, (tx, ty, vx, vy) = setup
    xi = 0.05
    alphas = list(net.alphas())
    arch = Architect(net, opt, xi=xi, hessian_scale=1e-4)
    # Exact: w' = w − ξ(μ·v + ∇w L_train + λ·w) kept in the graph, then ∇α L_val(w'(α), α).
    loss = arch.loss(arch.weights, alphas, tx, ty)
    g = torch.autograd.grad(loss, arch.weights, create_graph=True)
    unrolled = [w - xi * (MOMENTUM * opt.state[w]["momentum_buffer"] + gi + WD * w) for w, gi in zip(arch.weights, g)]
    exact = torch.autograd.grad(arch.loss(unrolled, alphas, vx, vy), alphas)
    arch.step(tx, ty, vx, vy)
    got = [a.grad for a in alphas]
    assert rel_err(got, list(exact)) < 1e-4
    # And the second-order term matters: the first-order gradient is measurably different.
    first = torch.autograd.grad(arch.loss(arch.weights, alphas, vx, vy), alphas)
    assert rel_err(list(first), list(exact)) > 1e-3


def test_virtual_step_is_exactly_the_optimizers_step(setup) -> None:  # noqa: ANN001
    net, opt, (tx, ty, vx, vy) = setup
    arch = Architect(net, opt)
    unrolled = arch.virtual_step(tx, ty, xi=LR)
    assert any(not torch.equal(u, w) for u, w in zip(unrolled, arch.weights))
    F.cross_entropy(net(tx), ty).backward()
    opt.step()
    for u, w in zip(unrolled, net.weights()):
        assert torch.allclose(u, w, rtol=0, atol=1e-12)


def test_step_restores_weights_and_buffers_bit_exactly(setup) -> None:  # noqa: ANN001
    net, opt, (tx, ty, vx, vy) = setup
    before = {k: v.clone() for k, v in net.state_dict().items() if "alpha" not in k}
    momentum = {id(p): opt.state[p]["momentum_buffer"].clone() for p in net.weights()}
    arch = Architect(net, opt, xi=LR)
    arch.step(tx, ty, vx, vy)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(momentum[id(p)], opt.state[p]["momentum_buffer"]) for p in net.weights())
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in net.alphas())
    assert all(p.grad is None for p in net.weights())


@pytest.mark.parametrize("training", [True, False])
def test_side_losses_equal_the_network_s_own_and_leave_its_statistics(setup, training: bool) -> None:  # noqa: ANN001
    """The architect's losses give no running statistics in training mode (batch norm then normalizes with the
    batch's own) and copies in eval mode: either way the loss the network itself computes, statistics untouched."""
    net, opt, (tx, ty, _, _) = setup
    net.train(training)
    reference = copy.deepcopy(net)
    want = F.cross_entropy(reference(tx), ty)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    got = Architect(net, opt, xi=LR).loss(list(net.weights()), list(net.alphas()), tx, ty)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    moved = [k for k, v in reference.state_dict().items() if not torch.equal(before[k], v)]
    assert bool(moved) == training  # the reference's own forward did move its statistics in training mode


def test_tensor_slots_stand_in_everywhere_and_restore_whatever_happens() -> None:
    """Given tensors replace a module's parameters and buffers for a block only: a tied weight in all its places,
    the originals back afterwards (also when the block raises), an unknown name refused with nothing left changed."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 3))
    net[2].weight = net[0].weight  # tied
    slots = TensorSlots(net)
    x = torch.randn(4, 3)
    originals = {k: v for k, v in net.state_dict(keep_vars=True).items()}
    eye = torch.eye(3, dtype=torch.float32)
    statistics = [("1.running_mean", None), ("1.running_var", None), ("1.num_batches_tracked", None)]
    with slots.substituted([("0.weight", eye), ("2.bias", torch.zeros(3)), *statistics]):
        assert net[0].weight is eye and net[2].weight is eye and net[1].running_mean is None
        normalized = F.batch_norm(x, None, None, net[1].weight, net[1].bias, training=True)
        assert torch.equal(net(x), normalized)  # both linear maps are the identity now
    assert net[1].num_batches_tracked == 0  # no statistics were updated
    assert all(v is originals[k] for k, v in net.state_dict(keep_vars=True).items())
    with pytest.raises(RuntimeError, match="inside"), slots.substituted([("0.weight", eye)]):
        raise RuntimeError("inside")
    assert net[0].weight is originals["0.weight"] and net[2].weight is originals["0.weight"]
    with pytest.raises(KeyError, match="0.wieght"), slots.substituted([("2.bias", torch.zeros(3)), ("0.wieght", eye)]):
        pass
    assert all(v is originals[k] for k, v in net.state_dict(keep_vars=True).items())
    net[1] = torch.nn.BatchNorm1d(3)  # swapped in after the slots were made (as ray.sync_bn swaps its norms)
    with slots.substituted([("1.weight", torch.full((3,), 2.0))]):
        assert torch.equal(net[1].weight, torch.full((3,), 2.0))
    assert torch.equal(net[1].weight, torch.ones(3))


def test_first_order_is_the_plain_validation_gradient(setup) -> None:  # noqa: ANN001
    net, opt, (tx, ty, vx, vy) = setup
    arch = Architect(net, opt, xi=0.0)
    want = torch.autograd.grad(F.cross_entropy(net(vx), vy), list(net.alphas()))
    arch.step(tx, ty, vx, vy)
    for a, w in zip(net.alphas(), want):
        assert torch.allclose(a.grad, w, rtol=1e-10, atol=1e-12)


def test_xi_defaults_to_the_current_weight_learning_rate(setup) -> None:  # noqa: ANN001
    net, opt, _ = setup
    arch = Architect(net, opt)
    assert arch.current_xi() == LR
    opt.param_groups[0]["lr"] = 0.01
    assert arch.current_xi() == 0.01
    assert Architect(net, opt, xi=0.3).current_xi() == 0.3


def test_alpha_step_moves_alpha_and_weight_optimizer_never_sees_it(setup) -> None:  # noqa: ANN001
    net, opt, (tx, ty, vx, vy) = setup
    assert not {id(a) for a in net.alphas()} & {id(p) for g in opt.param_groups for p in g["params"]}
    with pytest.raises(ValueError, match="must not hold α"):
        Architect(net, torch.optim.SGD(net.parameters(), lr=0.1))
    alpha_opt = torch.optim.Adam(net.alphas(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    start = [a.detach().clone() for a in net.alphas()]
    Architect(net, opt).step(tx, ty, vx, vy)
    alpha_opt.step()
    assert all(not torch.equal(s, a) for s, a in zip(start, net.alphas()))


def test_every_gradient_entering_the_alpha_step_goes_through_the_reducer(setup) -> None:  # noqa: ANN001
    net, opt, (tx, ty, vx, vy) = setup
    seen: list[list[tuple[int, ...]]] = []

    def record(tensors) -> None:  # noqa: ANN001
        seen.append([tuple(t.shape) for t in tensors])

    weight_shapes = [tuple(p.shape) for p in net.weights()]
    alpha_shapes = [tuple(a.shape) for a in net.alphas()]
    Architect(net, opt, xi=LR, grad_reducer=record).step(tx, ty, vx, vy)
    # ∇w L_train (virtual step), ∇w' L_val (ε and w±), the final α gradient.
    assert seen == [weight_shapes, weight_shapes, alpha_shapes]
    seen.clear()
    Architect(net, opt, xi=0.0, grad_reducer=record).step(tx, ty, vx, vy)
    assert seen == [alpha_shapes]


def test_reducer_that_averages_makes_the_result_the_global_batch_gradient(setup) -> None:  # noqa: ANN001
    """Two 'ranks' in one process: averaging their gradients gives the gradient on the union of their batches."""
    net, opt, (tx, ty, vx, vy) = setup
    full = Architect(net, opt, xi=LR, hessian_scale=1e-4)
    # Rank 0 and rank 1 each see half the batch; the reducer swaps in the other half's value and averages.
    # Batch norm uses per-batch statistics, so equality holds only where statistics do not matter: freeze them.
    net.eval()
    full.step(tx, ty, vx, vy)
    want = [a.grad.clone() for a in net.alphas()]
    halves = [(tx[:4], ty[:4], vx[:4], vy[:4]), (tx[4:], ty[4:], vx[4:], vy[4:])]
    # Run both ranks in lock step with threads that exchange through a shared board.
    barrier = threading.Barrier(2)
    board: dict[int, list[torch.Tensor]] = {}
    results: dict[int, list[torch.Tensor]] = {}

    def make_reducer(rank: int):  # noqa: ANN202
        def reduce(tensors) -> None:  # noqa: ANN001
            board[rank] = [t.detach().clone() for t in tensors]
            barrier.wait()
            other = board[1 - rank]
            barrier.wait()
            for t, o in zip(tensors, other):
                t.copy_((t + o) / 2)

        return reduce

    def worker(rank: int) -> None:
        # Each rank has its own replica (functional_call swaps a module's parameters, so threads cannot share one).
        replica = copy.deepcopy(net)
        replica_opt = torch.optim.SGD(replica.weights(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
        replica_opt.load_state_dict(opt.state_dict())
        arch = Architect(replica, replica_opt, xi=LR, hessian_scale=1e-4, grad_reducer=make_reducer(rank))
        results[rank] = list(arch._unrolled_gradient(*halves[rank], xi=LR)[1])
        make_reducer(rank)(results[rank])

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rel_err(results[0], want) < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1]))


def test_exact_hessian_vector_product_equals_double_backward(setup) -> None:  # noqa: ANN001
    net, opt, (tx, ty, vx, vy) = setup
    arch = Architect(net, opt, xi=LR, hessian="exact")
    torch.manual_seed(3)
    v = [torch.randn_like(w) for w in arch.weights]
    want = exact_hvp(arch, v, tx, ty)
    got = arch.hessian_vector_product(v, tx, ty)
    assert rel_err(got, want) < 1e-10
    assert all(p.grad is None for p in net.weights())  # the aliases keep the weights' own gradients untouched


def test_finite_difference_approaches_the_exact_product_as_the_scale_shrinks(setup) -> None:  # noqa: ANN001
    net, opt, (tx, ty, vx, vy) = setup
    fd, exact = Architect(net, opt, xi=LR), Architect(net, opt, xi=LR, hessian="exact")
    torch.manual_seed(4)
    v = [torch.randn_like(w) for w in fd.weights]
    want = exact.hessian_vector_product(v, tx, ty)
    errors = [rel_err(fd.hessian_vector_product(v, tx, ty, scale=s), want) for s in (1e-1, 1e-4, 1e-6)]
    # Large ε crosses ReLU and max-pool kinks; small ε leaves only the O(ε²) term and rounding.
    assert errors[1] < 1e-6 and errors[2] < 1e-6 and errors[0] > 100 * errors[1], errors


def test_second_order_step_with_the_exact_product_equals_autograd_through_the_virtual_step(setup) -> None:  # noqa: ANN001
    net, opt, (tx, ty, vx, vy) = setup
    xi = 0.05
    alphas = list(net.alphas())
    arch = Architect(net, opt, xi=xi, hessian="exact")
    loss = arch.loss(arch.weights, alphas, tx, ty)
    g = torch.autograd.grad(loss, arch.weights, create_graph=True)
    unrolled = [w - xi * (MOMENTUM * opt.state[w]["momentum_buffer"] + gi + WD * w) for w, gi in zip(arch.weights, g)]
    exact = torch.autograd.grad(arch.loss(unrolled, alphas, vx, vy), alphas)
    before = {k: v.clone() for k, v in net.state_dict().items() if "alpha" not in k}
    arch.step(tx, ty, vx, vy)
    assert rel_err([a.grad for a in alphas], list(exact)) < 1e-9  # no ε: exact up to float64 rounding
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items() if k in before)
    assert all(p.grad is None for p in net.weights())


def test_hessian_mode_is_checked() -> None:
    net = SearchNetwork(in_channels=1, channels=4, num_classes=3, layers=3, nodes=2, primitives=PRIMS)
    with pytest.raises(ValueError, match="hessian must be"):
        Architect(net, torch.optim.SGD(net.weights(), lr=0.1), hessian="bogus")
