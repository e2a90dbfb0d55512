"""What the search and retrain loops share: the worker context, seeding, RNG capture, metrics, epoch records and
progress lines.

A loop runs in one process (tests, notebooks) with the default :class:`LoopContext`; a distributed caller (the Ray
Train stage) passes a context whose hooks average gradients, sum metrics and wrap the model in DDP, and the loop
code is the same.

Epoch records (:class:`EpochRecord` and its subclasses ``SearchEpoch``, ``RetrainEpoch``) are pydantic models whose
``model_dump(mode="json")`` is their one serialised form: plain lists, dicts, floats (NaN kept) and strings, what
checkpoints (``torch.load(weights_only=True)``) and ``history.json`` hold, and what ``model_validate`` reads back.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer
from torch import Tensor, nn

from nas.genotypes import Genotype, parse_genotype


def _to_genotype(value: Any) -> Genotype:
    """A Genotype from itself, its ``to_dict()`` form, or genotype text/JSON (never evaluated)."""
    if isinstance(value, Genotype):
        return value
    if isinstance(value, Mapping):
        return Genotype.from_dict(value)
    if isinstance(value, str):
        return parse_genotype(value)
    raise ValueError(f"expected a genotype (dict, text or JSON), got {type(value).__name__}")


# A Genotype as a pydantic field: validated from a Genotype, a ``to_dict()`` dict or text/JSON; dumped as to_dict().
GenotypeField = Annotated[
    Genotype,
    BeforeValidator(_to_genotype),
    PlainSerializer(lambda genotype: genotype.to_dict(), return_type=dict[str, list[Any]]),
]


class EpochRecord(BaseModel):
    """What one epoch of a loop reports. ``epoch`` counts from 1 (the first epoch is epoch 1)."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    epoch: int = Field(ge=1)

    @classmethod
    def metric_names(cls) -> list[str]:
        """The numeric scalar fields except ``epoch``: the names :meth:`metrics` reports (a sweep ranks by one)."""
        return [name for name, info in cls.model_fields.items() if name != "epoch" and info.annotation in (float, int)]

    def metrics(self) -> dict[str, float]:
        """The numeric scalar fields except ``epoch`` (what is reported per epoch, with step = epoch; NaN allowed)."""
        return {name: getattr(self, name) for name in self.metric_names()}


def _identity_model(model: nn.Module) -> nn.Module:
    return model


def _no_reduce(tensors: Sequence[Tensor]) -> None:
    return None


@dataclass
class LoopContext:
    """Where a loop runs and how it talks to its peers; the defaults are a single process on the CPU."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Averages a list of tensors across ranks in place (gradients that enter the α step).
    grad_reducer: Callable[[Sequence[Tensor]], None] = _no_reduce
    # Sums a list of tensors across ranks in place (metric totals).
    sum_reducer: Callable[[Sequence[Tensor]], None] = _no_reduce
    # Wraps the model used for the weight step (DDP in the distributed stage).
    wrap_model: Callable[[nn.Module], nn.Module] = _identity_model
    log: Callable[[str], None] = print
    # Called as hook(step) at each step, for tests that inject faults at a chosen step.
    step_hook: Callable[[int], None] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the run; the message is one line naming the file."""


def restore_checkpoint(run: Any, path: Path | str) -> dict[str, Any]:
    """Load ``path`` (tensors and plain values only: ``weights_only=True``) into ``run``; the state it held.

    A corrupt file, a pickle with code in it, or the state of another network raise CheckpointError, one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError (code refused), RuntimeError (not a zip), EOFError (truncated)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not the state of a run")
    try:
        run.load_state_dict(state)
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {path} does not fit this run: {first}") from None
    return state


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """Where a loop's forward passes run: ``fp32`` as they are, ``bf16`` under autocast (convolutions and matmuls in
    bfloat16; weights, α, gradients, optimizer state and losses stay fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


# mallopt(3) parameters of glibc's malloc.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Have the C library's allocator keep freed memory in the process for the next allocation; whether it took.

    PyTorch's CPU tensors come from ``malloc``. glibc serves a block of more than its mmap threshold (at most 32 MB)
    from a fresh mapping and gives it back to the operating system on ``free``, and trims freed memory at the top of
    its heap, so a loop that frees and allocates the same large activations every step faults every page of them in
    again, each one zeroed by the kernel: about 200k page faults per second-order search step at batch 16 and C=16
    (bench/README.md). With every block on the heap and no trimming, a step reuses the last step's memory. The
    arithmetic is untouched; the process's footprint stays at its peak instead of shrinking between steps. A
    process-wide setting (like ``torch.set_num_threads``), for the process that runs the loop; False where the C
    library has no ``mallopt`` or refuses (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # 1 GiB where the library takes it (glibc 2.26 and later); older ones cap the threshold at 32 MB.
    mapped_above = mallopt(_M_MMAP_THRESHOLD, 1 << 30) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    return bool(mapped_above and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block, and on again after it only if it was on before.

    A search step builds an autograd graph of tens of thousands of Python objects (custom functions' contexts, saved
    tuples, lists) that live until its backward and then die by reference counting. Collections triggered during
    the step walk them over and over, and every few steps a full one also walks the supernet's hundreds of
    thousands of long-lived objects (modules, their dicts, parameters): about 0.1 s a second-order step on the
    8-cell supernet (bench/README.md). Nothing the step frees waits for a collection (reference counting frees it);
    what cyclic garbage a step leaves is collected by the first collection after it, never in the middle of a step,
    where on one rank it would keep the others waiting at the all-reduce."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def seed_everything(seed: int) -> None:
    """Seed every RNG a loop draws from, so one seed gives one result on the CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The state of every RNG, as tensors and plain values (loadable with ``weights_only=True``)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": list(np.random.get_state(legacy=True)[1:]),  # (keys, pos, has_gauss, cached_gaussian)
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }
    state["numpy"][0] = torch.from_numpy(state["numpy"][0].astype(np.int64))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    random.setstate((state["python_version"], tuple(int(x) for x in state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Meter:
    """Running sums of loss, correct predictions and examples, kept on the loss's device and read (reduced across
    ranks) once, in :meth:`result`: on a GPU a step's update does not wait for the step to finish, so the host can
    queue the next step (or replay its CUDA graph) while this one runs."""

    def __init__(self) -> None:
        self.sums: Tensor | None = None  # Σ loss·n, Σ correct (float64)
        self.count = 0

    def update(self, loss: Tensor, logits: Tensor, target: Tensor) -> None:
        n = target.size(0)
        correct = (logits.detach().argmax(dim=1) == target).sum()
        step = torch.stack([loss.detach().double() * n, correct.double()])
        self.sums = step if self.sums is None else self.sums.add_(step)
        self.count += n

    def result(self, context: LoopContext) -> tuple[float, float, int]:
        """(mean loss, accuracy, examples) over every rank."""
        sums = torch.zeros(2, dtype=torch.float64) if self.sums is None else self.sums.cpu()
        totals = torch.cat([sums, torch.tensor([float(self.count)], dtype=torch.float64)])
        if context.world_size > 1:
            totals = totals.to(context.device)
            context.sum_reducer([totals])
            totals = totals.cpu()
        loss, correct, count = totals.tolist()
        return (loss / count if count else float("nan"), correct / count if count else float("nan"), int(count))


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Per-epoch lines with elapsed time and an ETA from the mean epoch time so far."""

    def __init__(self, label: str, total_epochs: int, log: Callable[[str], None]):
        self.label = label
        self.total = total_epochs
        self.log = log
        self.durations: list[float] = []

    def epoch_done(self, epoch: int, seconds: float, fields: dict[str, str]) -> None:
        """Log the line of ``epoch`` (1-based: the first epoch is 1) that took ``seconds``."""
        self.durations.append(seconds)
        remaining = (self.total - epoch) * (sum(self.durations) / len(self.durations))
        parts = " | ".join(f"{k} {v}" for k, v in fields.items())
        self.log(
            f"{self.label} epoch {epoch}/{self.total} | {parts} | {seconds:.1f}s | ETA {format_duration(remaining)}"
        )
