"""The per-worker DARTS search loop (Algorithm 1 of the paper), usable in one process or inside a Ray Train worker.

Each step alternates, as in the paper: an α step on a batch of the α half (Adam), then a weight step on a batch of
the weight half (SGD with momentum, cosine learning rate, gradient clipping). The training set is split into two
seeded halves: weights are trained on one and α on the other.

One process, on the digits preset::

    python -m nas search --config digits --set search.epochs=3
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nas.architect import Architect
from nas.config import Config, SearchConfig
from nas.data import epoch_batches, load_dataset, make_loader, split_indices
from nas.genotypes import Genotype, count_ops
from nas.graphed import GraphedStep, step_key
from nas.loop import (
    EpochRecord,
    GenotypeField,
    LoopContext,
    Meter,
    Progress,
    autocast,
    collection_paused,
    keep_freed_memory,
    rng_state,
    seed_everything,
    set_rng_state,
)
from nas.search_model import SearchNetwork

__all__ = [
    "GenotypeField",
    "SearchEpoch",
    "SearchResult",
    "SearchRun",
    "Searcher",
    "alpha_entropy",
    "largest_op_weight",
    "search",
]


def alpha_entropy(alpha: torch.Tensor) -> float:
    """Mean entropy (nats) of softmax(α) over the edges: log(#ops) at the start, falling as edges commit."""
    p = F.softmax(alpha.detach().double(), dim=-1)
    return float(-(p * p.clamp_min(1e-30).log()).sum(dim=-1).mean())


def largest_op_weight(alpha: torch.Tensor, primitives: Sequence[str], op: str = "skip_connect") -> float:
    """The largest softmax(α) weight of ``op`` over a cell's edges (NaN when it is not a primitive): how close the
    search is to making some edge that op, the collapse that parameter-free ops win in long DARTS searches."""
    if op not in primitives:
        return math.nan
    return float(F.softmax(alpha.detach().double(), dim=-1)[:, list(primitives).index(op)].max())


class SearchEpoch(EpochRecord):
    """What one search epoch reports (``epoch`` from 1). ``metrics()``: every numeric field but ``epoch``."""

    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    alpha_entropy_normal: float
    alpha_entropy_reduce: float
    lr: float
    xi: float
    epoch_seconds: float
    images_per_second: float
    second_order_steps: int  # α steps through the unrolled virtual step, in this run so far
    parameter_free_normal: int  # collapse signals: parameter-free ops among the derived cell's edges
    parameter_free_reduce: int
    skip_weight_normal: float  # the largest softmax weight of skip_connect over the cell's edges
    skip_weight_reduce: float
    genotype: GenotypeField
    alpha_normal: list[list[float]]
    alpha_reduce: list[list[float]]


@dataclass
class SearchResult:
    genotype: Genotype
    alpha_normal: torch.Tensor
    alpha_reduce: torch.Tensor
    history: list[SearchEpoch] = field(default_factory=list)


class Searcher:
    """The supernet, both optimizers, the learning-rate schedule and the architect: everything a search step needs.

    No data: :meth:`step` takes the tensors of one weight-half batch and one α-half batch, so a benchmark times
    exactly the step a :class:`SearchRun` takes. Build it after seeding (the supernet's weights and α draw from the
    torch RNG).
    """

    def __init__(self, config: SearchConfig, in_channels: int, num_classes: int, context: LoopContext | None = None):
        self.config = cfg = config
        self.context = context or LoopContext()
        if cfg.speed.keep_freed_memory and self.context.device.type == "cpu":
            keep_freed_memory()
        self.network = SearchNetwork.from_config(cfg, in_channels, num_classes).to(self.context.device)
        # Multi-tensor (foreach) updates on every device, as torch already picks on GPUs: a few operators per step
        # instead of a few per weight tensor (the supernet has over a thousand).
        self.w_optimizer = torch.optim.SGD(
            self.network.weights(),
            lr=cfg.w_lr,
            momentum=cfg.w_momentum,
            weight_decay=cfg.w_weight_decay,
            foreach=True,
        )
        self.a_optimizer = torch.optim.Adam(
            self.network.alphas(),
            lr=cfg.alpha_lr,
            betas=cfg.alpha_betas,
            weight_decay=cfg.alpha_weight_decay,
            foreach=True,
            capturable=cfg.speed.cuda_graph,  # its step count on the device: no host read to capture
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.w_optimizer, T_max=cfg.epochs, eta_min=cfg.w_lr_min
        )
        self.architect = Architect(
            self.network,
            self.w_optimizer,
            xi=cfg.xi,
            hessian_scale=cfg.hessian_scale,
            grad_reducer=self.context.grad_reducer,
            hessian=cfg.hessian,
            precision=cfg.precision,
        )
        self.train_model: nn.Module = self.context.wrap_model(self.network)
        self.graphed: GraphedStep | None = None
        if cfg.speed.cuda_graph:
            if self.context.world_size > 1:
                raise ValueError("search.speed.cuda_graph runs on one worker (ray.num_workers=1)")
            self.graphed = GraphedStep(self.eager_step, self.context.device, before_capture=self._drop_gradients)

    def step(self, x_w: Tensor, y_w: Tensor, x_a: Tensor, y_a: Tensor) -> tuple[Tensor, Tensor]:
        """One search step: the α step (architect on both batches, then Adam), then the weight step on the weight
        batch. Returns the weight step's (loss, logits), what :meth:`Meter.update` takes with ``y_w``. With
        ``search.speed.cuda_graph``, a replay of the step's recorded CUDA graph (nas/graphed.py); with
        ``search.speed.pause_gc``, no garbage collection during it (:func:`nas.loop.collection_paused`)."""
        with collection_paused() if self.config.speed.pause_gc else contextlib.nullcontext():
            if self.graphed is None:
                return self.eager_step(x_w, y_w, x_a, y_a)
            return self.graphed_step(x_w, y_w, x_a, y_a)

    def graphed_step(self, x_w: Tensor, y_w: Tensor, x_a: Tensor, y_a: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`step` as a replay of its CUDA graph, captured first where no graph fits the step's key."""
        architect, xi = self.architect, self.architect.current_xi()
        counts = architect.first_order_steps, architect.second_order_steps
        key = (step_key((self.w_optimizer, self.a_optimizer), xi, (x_w, y_w, x_a, y_a)), self.network.training)
        loss, logits = self.graphed(key, x_w, y_w, x_a, y_a)
        # The architect counts its steps in Python, which a replay skips and a capture runs without a real step.
        architect.first_order_steps, architect.second_order_steps = counts[0] + (xi == 0), counts[1] + (xi != 0)
        return loss, logits

    def _drop_gradients(self) -> None:
        self.w_optimizer.zero_grad(set_to_none=True)
        self.a_optimizer.zero_grad(set_to_none=True)

    def eager_step(self, x_w: Tensor, y_w: Tensor, x_a: Tensor, y_a: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`step`, operator by operator."""
        self.a_optimizer.zero_grad(set_to_none=True)
        self.architect.step(x_w, y_w, x_a, y_a)
        self.a_optimizer.step()
        return self.weight_step(x_w, y_w)

    def weight_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """SGD on the weights with α frozen (no α gradient is computed), gradient clipping; (loss, logits)."""
        self.w_optimizer.zero_grad(set_to_none=True)
        for alpha in self.network.alphas():  # α is not trained by this step: skip its gradient
            alpha.requires_grad_(False)
        try:
            with autocast(self.config.precision, x.device):
                logits = self.train_model(x)
                loss = F.cross_entropy(logits, y)
            loss.backward()
        finally:
            for alpha in self.network.alphas():
                alpha.requires_grad_(True)
        # The optimizer's own list: what it steps, without walking the supernet's ~5k modules (9 ms) every step.
        weights = [p for group in self.w_optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(weights, self.config.w_grad_clip, foreach=True)
        self.w_optimizer.step()
        return loss, logits

    def state_dict(self) -> dict[str, Any]:
        return {
            "network": self.network.state_dict(),
            "w_optimizer": self.w_optimizer.state_dict(),
            "a_optimizer": self.a_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "architect_steps": [self.architect.first_order_steps, self.architect.second_order_steps],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        self.w_optimizer.load_state_dict(state["w_optimizer"])
        self.a_optimizer.load_state_dict(state["a_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.T_max = self.config.epochs  # a resumed run may have been given more epochs
        self.architect.first_order_steps, self.architect.second_order_steps = (int(n) for n in state["architect_steps"])
        for group in self.a_optimizer.param_groups:  # as this run's config says, whatever the checkpoint's said
            group["capturable"] = self.config.speed.cuda_graph
        for alpha in self.network.alphas():  # where Adam's step count lives: on α's device if capturable, else CPU
            adam = self.a_optimizer.state.get(alpha, {})
            if "step" in adam:
                device = alpha.device if self.config.speed.cuda_graph else torch.device("cpu")
                adam["step"] = torch.as_tensor(adam["step"], dtype=torch.float32, device=device)
        if self.graphed is not None:
            self.graphed.restart()  # the optimizers' buffers are new tensors: a graph captured before reads the old


class SearchRun:
    """A whole search: data halves, a :class:`Searcher` (supernet, optimizers, architect) and the epoch loop;
    checkpointable at epoch ends."""

    def __init__(self, config: Config, context: LoopContext | None = None):
        self.config = config
        self.context = context or LoopContext()
        cfg, data = config.search, config.data
        seed_everything(cfg.seed)  # identical on every rank: same α and w at initialisation
        self.train_set, info = load_dataset(
            data.source,
            "train",
            root=data.root,
            download=data.download,
            augment=cfg.augment,
            limit=data.limit,
            image_size=data.image_size,
        )
        self.eval_set = self.train_set.unaugmented()  # the α half, for the end-of-epoch evaluation
        self.info = info
        self.w_indices, self.a_indices = split_indices(len(self.train_set), cfg.seed, cfg.train_portion)
        global_batch = cfg.batch_size * self.context.world_size
        if min(len(self.w_indices), len(self.a_indices)) < global_batch:
            raise ValueError(
                f"each half of the training set ({min(len(self.w_indices), len(self.a_indices))} examples) is "
                f"smaller than the global batch ({cfg.batch_size} x {self.context.world_size} workers)"
            )
        self.searcher = Searcher(cfg, info.in_channels, info.num_classes, self.context)
        self.epoch = 0  # epochs done; the next report is epoch self.epoch + 1
        self.step = 0
        self.history: list[SearchEpoch] = []

    # --- the searcher's parts, by their old names ----------------------------------------------------------------
    @property
    def network(self) -> SearchNetwork:
        return self.searcher.network

    @property
    def w_optimizer(self) -> torch.optim.SGD:
        return self.searcher.w_optimizer

    @property
    def a_optimizer(self) -> torch.optim.Adam:
        return self.searcher.a_optimizer

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.CosineAnnealingLR:
        return self.searcher.scheduler

    @property
    def architect(self) -> Architect:
        return self.searcher.architect

    @property
    def train_model(self) -> nn.Module:
        return self.searcher.train_model

    # --- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this run stands (tensors and plain values only)."""
        return {
            **self.searcher.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "rng": rng_state(),
            "history": [report.model_dump(mode="json") for report in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.searcher.load_state_dict(state)
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.history = [SearchEpoch.model_validate(report) for report in state["history"]]
        set_rng_state(state["rng"])

    # --- the loop ----------------------------------------------------------------------------------------------
    def _batches(self, indices: list[int], epoch: int, salt: int, limit: int | None) -> list[list[int]]:
        ctx, cfg = self.context, self.config.search
        batches = epoch_batches(
            indices, cfg.batch_size, rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed * 1000 + salt, epoch=epoch
        )
        return batches[:limit] if limit else batches

    def run_epoch(self) -> SearchEpoch:
        """One epoch of alternating α and weight steps, then the supernet on the α half."""
        cfg, ctx, device = self.config.search, self.context, self.context.device
        index = self.epoch  # 0-based: seeds this epoch's batch order
        start = time.perf_counter()
        w_batches = self._batches(self.w_indices, index, 1, cfg.steps_per_epoch)
        a_batches = self._batches(self.a_indices, index, 2, cfg.steps_per_epoch)
        steps = min(len(w_batches), len(a_batches))
        workers = self.config.data.num_workers
        w_loader = make_loader(self.train_set, w_batches[:steps], num_workers=workers, device=device)
        a_loader = make_loader(self.train_set, a_batches[:steps], num_workers=workers, device=device)
        lr = self.scheduler.get_last_lr()[0]
        xi = self.architect.current_xi()
        meter = Meter()
        self.network.train()
        for (x_w, y_w), (x_a, y_a) in zip(w_loader, a_loader):
            if ctx.step_hook is not None:
                ctx.step_hook(self.step)
            x_w, y_w, x_a, y_a = (t.to(device, non_blocking=True) for t in (x_w, y_w, x_a, y_a))
            loss, logits = self.searcher.step(x_w, y_w, x_a, y_a)
            meter.update(loss, logits, y_w)
            self.step += 1
        self.scheduler.step()
        train_loss, train_acc, seen = meter.result(ctx)
        val_loss, val_acc = self.evaluate(index)
        seconds = time.perf_counter() - start
        self.epoch += 1
        genotype, primitives = self.network.genotype(), self.network.primitives
        report = SearchEpoch(
            epoch=self.epoch,
            train_loss=train_loss,
            train_acc=train_acc,
            val_loss=val_loss,
            val_acc=val_acc,
            alpha_entropy_normal=alpha_entropy(self.network.alpha_normal),
            alpha_entropy_reduce=alpha_entropy(self.network.alpha_reduce),
            lr=lr,
            xi=xi,
            epoch_seconds=seconds,
            images_per_second=2 * seen / seconds if seconds > 0 else math.nan,
            second_order_steps=self.architect.second_order_steps,
            parameter_free_normal=count_ops(genotype, "normal"),
            parameter_free_reduce=count_ops(genotype, "reduce"),
            skip_weight_normal=largest_op_weight(self.network.alpha_normal, primitives),
            skip_weight_reduce=largest_op_weight(self.network.alpha_reduce, primitives),
            genotype=genotype,
            alpha_normal=self.network.alpha_normal.detach().cpu().tolist(),
            alpha_reduce=self.network.alpha_reduce.detach().cpu().tolist(),
        )
        self.history.append(report)
        return report

    @torch.no_grad()
    def evaluate(self, epoch: int) -> tuple[float, float]:
        """Supernet loss and accuracy on the α half (no augmentation, running batch-norm statistics off);
        ``epoch`` (0-based) seeds the batch order."""
        meter = Meter()
        self.network.eval()
        device = self.context.device
        for x, y in make_loader(self.eval_set, self._batches(self.a_indices, epoch, 3, None), device=device):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(self.config.search.precision, device):
                logits = self.network(x)
            meter.update(F.cross_entropy(logits.float(), y), logits, y)
        self.network.train()
        loss, acc, _ = meter.result(self.context)
        return loss, acc

    def run(self, on_epoch: Callable[[SearchEpoch, SearchRun], None] | None = None) -> SearchResult:
        """Run the remaining epochs; ``on_epoch`` sees each report (and the run, to checkpoint it)."""
        cfg = self.config.search
        progress = Progress("search", cfg.epochs, self.context.log if self.context.is_main else _silent)
        progress.durations = [e.epoch_seconds for e in self.history]
        while self.epoch < cfg.epochs:
            report = self.run_epoch()
            fields = {
                "train loss": f"{report.train_loss:.3f}",
                "acc": f"{report.train_acc:.1%}",
                "val loss": f"{report.val_loss:.3f}",
                "acc ": f"{report.val_acc:.1%}",
                "H(α)": f"{report.alpha_entropy_normal:.4f}/{report.alpha_entropy_reduce:.4f}",
                "img/s": f"{report.images_per_second:.0f}",
            }
            progress.epoch_done(report.epoch, report.epoch_seconds, fields)
            if on_epoch is not None:
                on_epoch(report, self)
        return self.result()

    def result(self) -> SearchResult:
        return SearchResult(
            genotype=self.network.genotype(),
            alpha_normal=self.network.alpha_normal.detach().cpu().clone(),
            alpha_reduce=self.network.alpha_reduce.detach().cpu().clone(),
            history=list(self.history),
        )


def _silent(message: str) -> None:
    return None


def search(config: Config, context: LoopContext | None = None) -> SearchResult:
    """Run a whole search in this process and return the derived genotype, α and per-epoch history."""
    return SearchRun(config, context).run()
