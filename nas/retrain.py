"""The per-worker retrain loop: train a genotype's evaluation network from scratch (appendix A.2 of the paper).

With ``val_fraction > 0`` a seeded share of the training set is held out and each epoch is measured on it (how
candidates are compared, never on the test set); with ``val_fraction = 0`` the network trains on the whole
training set and is measured once on the test split, after its last epoch (the champion's final training: the
test set chooses nothing, so it is looked at once). Auxiliary loss,
linearly increasing drop path, cutout and gradient clipping follow the paper's recipe.

One process::

    python -m nas retrain --config digits --set retrain.genotype=DARTS_V2
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from nas.config import Config
from nas.data import epoch_batches, load_dataset, make_loader, split_indices
from nas.eval_model import EvalNetwork, NetworkSpec
from nas.genotypes import Genotype, parse_genotype
from nas.loop import EpochRecord, LoopContext, Meter, Progress, rng_state, seed_everything, set_rng_state


class RetrainEpoch(EpochRecord):
    """What one retrain epoch reports (``epoch`` from 1). ``eval_loss``/``eval_acc`` are NaN on epochs that are not
    measured (before the last one when ``eval_split`` is "test"). ``metrics()``: every numeric field but ``epoch``."""

    train_loss: float
    train_acc: float
    eval_loss: float
    eval_acc: float
    eval_split: Literal["val", "test"]
    lr: float
    drop_path: float
    epoch_seconds: float
    images_per_second: float


@dataclass
class RetrainResult:
    genotype: Genotype
    eval_split: str
    eval_acc: float
    history: list[RetrainEpoch] = field(default_factory=list)


class RetrainRun:
    """Training of one evaluation network; checkpointable at epoch ends like the search."""

    def __init__(self, config: Config, genotype: Genotype | None = None, context: LoopContext | None = None):
        self.config = config
        self.context = context or LoopContext()
        cfg, data = config.retrain, config.data
        self.genotype = genotype if genotype is not None else parse_genotype(cfg.genotype)
        seed_everything(cfg.seed)
        self.train_set, info = load_dataset(
            data.source,
            "train",
            root=data.root,
            download=data.download,
            augment=cfg.augment,
            cutout=cfg.cutout,
            limit=data.limit,
            image_size=data.image_size,
        )
        self.info = info
        if cfg.val_fraction > 0:
            self.train_indices, self.eval_indices = split_indices(len(self.train_set), cfg.seed, 1 - cfg.val_fraction)
            self.eval_set = self.train_set.unaugmented()
            self.eval_split = "val"
        else:
            self.train_indices = list(range(len(self.train_set)))
            self.eval_set, _ = load_dataset(
                data.source,
                "test",
                root=data.root,
                download=data.download,
                augment=False,
                limit=data.test_limit,
                image_size=data.image_size,
            )
            self.eval_indices = list(range(len(self.eval_set)))
            self.eval_split = "test"
        if len(self.train_indices) < cfg.batch_size * self.context.world_size:
            raise ValueError(
                f"{len(self.train_indices)} training examples are fewer than the global batch "
                f"({cfg.batch_size} x {self.context.world_size} workers)"
            )
        self.spec = NetworkSpec.for_retrain(cfg, self.genotype, info)
        self.network = EvalNetwork.from_spec(self.spec, drop_path=0.0).to(self.context.device)
        self.optimizer = torch.optim.SGD(
            self.network.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=cfg.epochs, eta_min=cfg.lr_min
        )
        self.train_model: nn.Module = self.context.wrap_model(self.network)
        self.epoch = 0  # epochs done; the next report is epoch self.epoch + 1
        self.history: list[RetrainEpoch] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "rng": rng_state(),
            "history": [report.model_dump(mode="json") for report in self.history],
            "genotype": self.genotype.to_json(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.T_max = self.config.retrain.epochs  # a resumed run may have been given more epochs
        self.epoch = int(state["epoch"])
        self.history = [RetrainEpoch.model_validate(report) for report in state["history"]]
        set_rng_state(state["rng"])

    def run_epoch(self) -> RetrainEpoch:
        cfg, ctx = self.config.retrain, self.context
        index = self.epoch  # 0-based: seeds the batch order, sets drop path
        start = time.perf_counter()
        batches = epoch_batches(
            self.train_indices, cfg.batch_size, rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed, epoch=index
        )
        if cfg.steps_per_epoch:
            batches = batches[: cfg.steps_per_epoch]
        # Drop path grows linearly from 0 to its configured value over training (as in the authors' code).
        self.network.drop_path_prob = cfg.drop_path * index / cfg.epochs
        lr = self.scheduler.get_last_lr()[0]
        meter = Meter()
        self.network.train()
        loader = make_loader(self.train_set, batches, num_workers=self.config.data.num_workers, device=ctx.device)
        for step, (x, y) in enumerate(loader):
            if ctx.step_hook is not None:
                ctx.step_hook(index * len(batches) + step)
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            logits, logits_aux = self.train_model(x)
            loss = F.cross_entropy(logits, y)
            total = loss + cfg.auxiliary_weight * F.cross_entropy(logits_aux, y) if logits_aux is not None else loss
            total.backward()
            nn.utils.clip_grad_norm_(self.network.parameters(), cfg.grad_clip)
            self.optimizer.step()
            meter.update(loss, logits, y)
        self.scheduler.step()
        train_loss, train_acc, seen = meter.result(ctx)
        eval_loss = eval_acc = math.nan
        self.epoch += 1
        if self.eval_split == "val" or self.epoch == cfg.epochs:
            eval_loss, eval_acc = self.evaluate()
        seconds = time.perf_counter() - start
        report = RetrainEpoch(
            epoch=self.epoch,
            train_loss=train_loss,
            train_acc=train_acc,
            eval_loss=eval_loss,
            eval_acc=eval_acc,
            eval_split=self.eval_split,
            lr=lr,
            drop_path=self.network.drop_path_prob,
            epoch_seconds=seconds,
            images_per_second=seen / seconds if seconds > 0 else math.nan,
        )
        self.history.append(report)
        return report

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Loss and accuracy on this run's evaluation split (held-out val, or test), sharded across ranks."""
        ctx = self.context
        batches = epoch_batches(
            self.eval_indices, 1, rank=ctx.rank, world_size=ctx.world_size, seed=0, epoch=0
        )  # one example per rank per step: every example is seen once whatever the world size
        per_rank = [i for batch in batches for i in batch]
        chunks = [per_rank[i : i + 256] for i in range(0, len(per_rank), 256)]
        meter = Meter()
        self.network.eval()
        for x, y in make_loader(self.eval_set, chunks, device=ctx.device):
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            logits, _ = self.network(x)
            meter.update(F.cross_entropy(logits, y), logits, y)
        self.network.train()
        loss, acc, _ = meter.result(ctx)
        return loss, acc

    def run(self, on_epoch: Callable[[RetrainEpoch, RetrainRun], None] | None = None) -> RetrainResult:
        cfg = self.config.retrain
        log = self.context.log if self.context.is_main else (lambda message: None)
        progress = Progress("retrain", cfg.epochs, log)
        progress.durations = [e.epoch_seconds for e in self.history]
        while self.epoch < cfg.epochs:
            report = self.run_epoch()
            fields = {
                "train loss": f"{report.train_loss:.3f}",
                "acc": f"{report.train_acc:.1%}",
                f"{report.eval_split} loss": _shown(report.eval_loss, "{:.3f}"),
                "acc ": _shown(report.eval_acc, "{:.1%}"),
                "drop path": f"{report.drop_path:.3f}",
                "img/s": f"{report.images_per_second:.0f}",
            }
            progress.epoch_done(report.epoch, report.epoch_seconds, fields)
            if on_epoch is not None:
                on_epoch(report, self)
        last = self.history[-1] if self.history else None
        return RetrainResult(
            genotype=self.genotype,
            eval_split=self.eval_split,
            eval_acc=last.eval_acc if last else math.nan,
            history=list(self.history),
        )


def _shown(value: float, form: str) -> str:
    return "-" if math.isnan(value) else form.format(value)


def retrain(config: Config, genotype: Genotype | None = None, context: LoopContext | None = None) -> RetrainResult:
    """Train ``genotype`` (default: the config's) from scratch in this process."""
    return RetrainRun(config, genotype, context).run()
