"""The architect: computes the gradient of the validation loss with respect to α (section 2.3 of the paper).

First order (ξ = 0) uses ∇α L_val(w, α). Second order (ξ > 0) differentiates through one virtual step of the
weight optimizer (eq. 6-8)::

    w' = w − ξ·(μ·v + ∇w L_train(w, α) + λ·w)            the SGD-momentum step the weight optimizer would take
    ∇α L_val(w', α) − ξ·H
    H  = (∇α L_train(w⁺, α) − ∇α L_train(w⁻, α)) / (2ε),   w± = w ± ε·∇w' L_val(w', α)
    ε  = scale / ‖∇w' L_val(w', α)‖                          (scale = 0.01 in the paper)

``hessian="exact"`` replaces the finite difference by the exact Hessian-vector product
``∇α (∇w L_train(w, α) · v)`` (double backward, :func:`exact_hessian_vector_product`): one forward and a backward
through the backward instead of two forward/backward passes, and no ε.

The network is evaluated on new weight tensors put in its parameters' places for the call (:class:`TensorSlots`, what
``torch.func.functional_call`` does, with the places found once), so nothing is deep-copied and the network's own
weights and batch-norm statistics are never touched: they are bit-identical afterwards.

For data-parallel use, ``grad_reducer`` averages a list of tensors across ranks in place. It is applied to every
gradient that enters the α step (∇w L_train for the virtual step, ∇w' L_val for ε and w±, and the final α
gradient), so every rank computes the same w', the same ε, and ends with the same α gradient: the global batch's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nas.loop import autocast
from nas.search_model import SearchNetwork

GradReducer = Callable[[Sequence[Tensor]], None]
LossFn = Callable[[Tensor, Tensor], Tensor]
HessianMode = Literal["fd", "exact"]
BATCH_NORM_STATISTICS = frozenset({"running_mean", "running_var", "num_batches_tracked"})


def _no_reduce(tensors: Sequence[Tensor]) -> None:
    return None


def exact_hessian_vector_product(
    loss: Callable[[Sequence[Tensor]], Tensor],
    weights: Sequence[Tensor],
    alphas: Sequence[Tensor],
    vector: Sequence[Tensor],
) -> list[Tensor]:
    """∇²_{α,w} L · v = ∇α (∇w L(w, α) · v), exactly, by double backward.

    ``loss(weights)`` evaluates L with the given weight tensors (α taken from ``alphas``); ``weights`` are leaves
    that require grad. ``vector`` is constant (no gradient flows into it).
    """
    grads = torch.autograd.grad(loss(weights), weights, create_graph=True, allow_unused=True)
    dot = sum((g * v.detach()).sum() for g, v in zip(grads, vector) if g is not None)
    return list(torch.autograd.grad(dot, alphas, materialize_grads=True))


class TensorSlots:
    """Where each named parameter and buffer of a module lives (its owner's ``_parameters`` or ``_buffers`` entry),
    so that other tensors can stand in for them during a call. ``torch.func.functional_call`` does the same but walks
    the whole module tree by name several times on every call: on the supernet about 20 ms of Python per call, four
    calls per second-order step. Here the places are found again only when the tree has changed (a module swapped
    in, as ``ray.sync_bn`` swaps its batch norms after the architect is built), which one pass over the tree's
    modules tells. A tensor shared by several modules (tied) is replaced in all its places at once."""

    def __init__(self, module: nn.Module):
        self._module = module
        self._tree: list[int] = []
        self._places: dict[str, list[tuple[dict, str]]] = {}

    def _find_places(self) -> None:
        self._places = {}
        first_name: dict[int, str] = {}  # a tied tensor's places are listed under each of its names
        for prefix, owner in self._module.named_modules(remove_duplicate=False):
            for table in (owner._parameters, owner._buffers):
                for key, tensor in table.items():
                    name = f"{prefix}.{key}" if prefix else key
                    if tensor is None:
                        self._places[name] = [(table, key)]
                        continue
                    shared = first_name.setdefault(id(tensor), name)
                    places = self._places.setdefault(shared, [])
                    places.append((table, key))
                    self._places[name] = places

    @contextmanager
    def substituted(self, tensors: Iterable[tuple[str, Tensor | None]]) -> Iterator[None]:
        """The module with ``tensors`` (name, tensor) in those places until the block ends, the originals restored
        then, whatever happens inside."""
        tree = _module_ids(self._module)
        if tree != self._tree:
            self._find_places()
            self._tree = tree
        saved: list[tuple[dict, str, Tensor | None]] = []
        try:
            for name, tensor in tensors:
                places = self._places.get(name)
                if places is None:
                    raise KeyError(f"no parameter or buffer named {name!r}")
                for table, key in places:
                    saved.append((table, key, table[key]))
                    table[key] = tensor
            yield
        finally:
            for table, key, original in reversed(saved):
                table[key] = original


def _module_ids(module: nn.Module) -> list[int]:
    """The identities of ``module`` and every module under it, depth first: what changes when one is swapped."""
    ids = [id(module)]
    for child in module._modules.values():
        if child is not None:
            ids.extend(_module_ids(child))
    return ids


def laid_out_as(tensors: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """Each tensor with the strides of its counterpart in ``like``: a view where only the strides of dimensions of
    size 1 differ, else a copy. Multi-tensor arithmetic on channels_last weights can hand back channels-first
    results, and a network run with them would leave channels_last for the whole pass (its CPU kernels are several
    times slower there); PyTorch reads the layout from the strides, even those of a dimension of size 1 (a
    one-channel input's convolution takes it from the weight's)."""
    return [
        t
        if t.stride() == w.stride()
        else t.as_strided(w.shape, w.stride())
        if same_layout(t, w)
        else torch.empty_like(w).copy_(t)
        for t, w in zip(tensors, like)
    ]


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` (of one shape) put each element at the same offset: their strides agree wherever the
    size is not 1. A depthwise (C, 1, k, k) or a pointwise (C, C, 1, 1) weight is laid out so in both layouts."""
    return all(size == 1 or sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride()))


def finite_difference_hessian_vector_product(
    grad_alpha: Callable[[Sequence[Tensor]], Sequence[Tensor]],
    weights: Sequence[Tensor],
    vector: Sequence[Tensor],
    eps: float | Tensor,
) -> list[Tensor]:
    """Eq. 8: (∇α L(w + ε·v, α) − ∇α L(w − ε·v, α)) / (2ε) ≈ ∇²_{α,w} L · v; ``grad_alpha(w)`` is ∇α L(w, α)."""
    with torch.no_grad():  # multi-tensor operators: three for all the weights, not three per weight tensor
        step = torch._foreach_mul(list(vector), eps)
        w_plus = laid_out_as(torch._foreach_add(list(weights), step), weights)
        w_minus = laid_out_as(torch._foreach_sub(list(weights), step), weights)
    g_plus = grad_alpha(w_plus)
    g_minus = grad_alpha(w_minus)
    return [(p - m) / (2 * eps) for p, m in zip(g_plus, g_minus)]


class Architect:
    """Computes α gradients for a :class:`SearchNetwork` and leaves them in each α's ``.grad``."""

    def __init__(
        self,
        network: SearchNetwork,
        w_optimizer: torch.optim.Optimizer,
        xi: float | None = None,
        hessian_scale: float = 0.01,
        grad_reducer: GradReducer | None = None,
        loss_fn: LossFn = F.cross_entropy,
        hessian: HessianMode = "fd",
        precision: str = "fp32",
    ):
        if xi is not None and xi < 0:
            raise ValueError(f"xi must be >= 0 (0 = first order), got {xi}")
        if hessian_scale <= 0:
            raise ValueError(f"hessian_scale must be > 0, got {hessian_scale}")
        if hessian not in ("fd", "exact"):
            raise ValueError(f"hessian must be 'fd' or 'exact', got {hessian!r}")
        self.hessian = hessian
        self.precision = precision
        self.network = network
        self.w_optimizer = w_optimizer
        self.xi = xi
        self.hessian_scale = hessian_scale
        self.reduce = grad_reducer or _no_reduce
        self.loss_fn = loss_fn
        named = list(network.named_weights())
        self.weight_names = [n for n, _ in named]
        self.weights = [p for _, p in named]
        self.alpha_names = list(network.alpha_names())
        self.alphas = list(network.alphas())
        optimized = {id(p) for group in w_optimizer.param_groups for p in group["params"]}
        if any(id(a) in optimized for a in self.alphas):
            raise ValueError("the weight optimizer must not hold α: build it from network.weights()")
        # How many α steps of each kind ran: evidence that second order really unrolled.
        self.first_order_steps = 0
        self.second_order_steps = 0
        self._group_of = {id(p): group for group in w_optimizer.param_groups for p in group["params"]}
        self._slots = TensorSlots(network)
        buffers = [n for n, _ in network.named_buffers()]
        self._statistics = [n for n in buffers if n.rsplit(".", 1)[-1] in BATCH_NORM_STATISTICS]
        self._other_buffers = [n for n in buffers if n.rsplit(".", 1)[-1] not in BATCH_NORM_STATISTICS]
        self._no_statistics: list[tuple[str, Tensor | None]] = [(n, None) for n in self._statistics]

    def current_xi(self) -> float:
        """ξ of the virtual step: the configured value, or the weight optimizer's current learning rate."""
        return float(self.w_optimizer.param_groups[0]["lr"]) if self.xi is None else float(self.xi)

    def loss(
        self, weights: Sequence[Tensor], alphas: Sequence[Tensor], x: Tensor, y: Tensor, precision: str | None = None
    ) -> Tensor:
        """L(w, α) on a batch, with the given tensors standing in for the network's weights and α; in the
        architect's precision unless ``precision`` says otherwise."""
        tensors = [*zip(self.weight_names, weights), *zip(self.alpha_names, alphas), *self._side_buffers()]
        with self._slots.substituted(tensors), autocast(precision or self.precision, x.device):
            return self.loss_fn(self.network(x), y)

    def _side_buffers(self) -> list[tuple[str, Tensor | None]]:
        """Buffers for the architect's side computations, which must leave the batch-norm running statistics as
        they are. In training mode batch norm normalizes with the batch's statistics, so running statistics of None
        give the same output and nothing to update; that spares a copy of every buffer per call (over a thousand
        kernel launches on the paper's supernet). In eval mode (running statistics used), copies."""
        if not self.network.training:
            return [(n, b.clone()) for n, b in self.network.named_buffers()]
        others = [(n, self.network.get_buffer(n).clone()) for n in self._other_buffers]
        return self._no_statistics + others

    def step(self, train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor) -> Tensor:
        """Set ``α.grad`` to the (first- or second-order) α gradient; return the validation loss used."""
        xi = self.current_xi()
        if xi == 0.0:
            # The weights as constants: no operator works out a weight gradient nobody asked for (autograd's own
            # skip those anyway; a hand-written backward only knows what requires a gradient).
            val_loss = self.loss([w.detach() for w in self.weights], self.alphas, val_x, val_y)
            grads = list(torch.autograd.grad(val_loss, self.alphas, materialize_grads=True))
            self.first_order_steps += 1
        else:
            val_loss, grads = self._unrolled_gradient(train_x, train_y, val_x, val_y, xi)
            self.second_order_steps += 1
        self.reduce(grads)
        for alpha, grad in zip(self.alphas, grads):
            alpha.grad = grad.detach()
        return val_loss.detach()

    def virtual_step(self, train_x: Tensor, train_y: Tensor, xi: float) -> list[Tensor]:
        """w' = w − ξ·d, where d is the exact update direction of the SGD weight optimizer (eq. 6)."""
        weights = self._aliases()
        # α as constants: only ∇w is wanted here, and a hand-written backward only knows what requires a gradient.
        train_loss = self.loss(weights, [a.detach() for a in self.alphas], train_x, train_y)
        grads = list(torch.autograd.grad(train_loss, weights))
        self.reduce(grads)
        with torch.no_grad():
            return laid_out_as(torch._foreach_add(self.weights, self._sgd_directions(grads), alpha=-xi), self.weights)

    def _aliases(self) -> list[Tensor]:
        """The weights as new leaves sharing their storage: gradients taken through them never reach the
        parameters' own autograd nodes, so hooks on those (DDP's gradient reducer) see only the weight step."""
        return [w.detach().requires_grad_() for w in self.weights]

    def _sgd_directions(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """What ``torch.optim.SGD.step`` would subtract from each weight divided by lr: μ·v + g + λ·w for dampening
        0 (a weight outside the optimizer: g). Multi-tensor operators over the weights that share a parameter
        group and a momentum state, so the count of operators does not grow with the number of weight tensors."""
        parts: dict[tuple[int, bool], tuple[dict | None, list[int]]] = {}
        for i, w in enumerate(self.weights):
            group = self._group_of.get(id(w))
            has_buffer = group is not None and self.w_optimizer.state.get(w, {}).get("momentum_buffer") is not None
            parts.setdefault((id(group), has_buffer), (group, []))[1].append(i)
        directions: list[Tensor] = list(grads)
        for (_, has_buffer), (group, indices) in parts.items():
            if group is not None:
                d = self._group_directions(
                    group, [self.weights[i] for i in indices], [grads[i] for i in indices], has_buffer
                )
                for i, direction in zip(indices, d):
                    directions[i] = direction
        return directions

    def _group_directions(
        self, group: dict, weights: list[Tensor], grads: list[Tensor], has_buffer: bool
    ) -> list[Tensor]:
        """:meth:`_sgd_directions` for weights of one parameter group that all have a momentum buffer or none."""
        decay = group.get("weight_decay", 0.0)
        d = torch._foreach_add(grads, weights, alpha=decay) if decay else grads
        momentum = group.get("momentum", 0.0)
        if not momentum:
            return d
        buf = d
        if has_buffer:
            buf = torch._foreach_mul([self.w_optimizer.state[w]["momentum_buffer"] for w in weights], momentum)
            torch._foreach_add_(buf, d, alpha=1.0 - group.get("dampening", 0.0))
        return torch._foreach_add(d, buf, alpha=momentum) if group.get("nesterov", False) else buf

    def _unrolled_gradient(
        self, train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, xi: float
    ) -> tuple[Tensor, list[Tensor]]:
        unrolled = [w.requires_grad_() for w in self.virtual_step(train_x, train_y, xi)]
        val_loss = self.loss(unrolled, self.alphas, val_x, val_y)
        grads = torch.autograd.grad(val_loss, unrolled + self.alphas, materialize_grads=True)
        d_unrolled, d_alpha = list(grads[: len(unrolled)]), grads[len(unrolled) :]
        self.reduce(d_unrolled)
        hessian = self.hessian_vector_product(d_unrolled, train_x, train_y)
        return val_loss, [da - xi * h for da, h in zip(d_alpha, hessian)]

    def hessian_vector_product(
        self, vector: Sequence[Tensor], train_x: Tensor, train_y: Tensor, scale: float | None = None
    ) -> list[Tensor]:
        """∇²_{α,w} L_train(w, α) · vector: the central finite difference of eq. 8 (``hessian="fd"``, ε =
        scale / ‖vector‖) or the exact product by double backward (``hessian="exact"``; ``scale`` unused)."""
        if self.hessian == "exact":
            return self.exact_hessian_vector_product(vector, train_x, train_y)
        scale = self.hessian_scale if scale is None else scale
        norm = torch.cat([v.reshape(-1) for v in vector]).norm()
        # For v = 0 any finite ε gives w± = w and a difference of exactly 0, the product's value. So ε is read from
        # the tensor, never tested on the host: a CUDA graph cannot capture a host read (search.speed.cuda_graph).
        eps = scale / torch.where(norm > 0, norm, torch.ones_like(norm))
        return finite_difference_hessian_vector_product(
            lambda w: self._alpha_gradient(w, train_x, train_y), self.weights, vector, eps
        )

    def exact_hessian_vector_product(self, vector: Sequence[Tensor], train_x: Tensor, train_y: Tensor) -> list[Tensor]:
        """∇α (∇w L_train(w, α) · vector), exactly (double backward through the network)."""
        return exact_hessian_vector_product(
            lambda w: self.loss(w, self.alphas, train_x, train_y), self._aliases(), self.alphas, vector
        )

    def _alpha_gradient(self, weights: Sequence[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
        """∇α L(w, α) at the given weights, in fp32 whatever the architect's precision: the finite difference
        subtracts two of these, ε apart, and bfloat16 would round the difference away."""
        loss = self.loss(weights, self.alphas, x, y, precision="fp32")
        return list(torch.autograd.grad(loss, self.alphas, materialize_grads=True))
