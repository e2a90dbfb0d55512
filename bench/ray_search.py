"""Ray overhead and all-reduce share of the data-parallel DARTS search, on CPU workers of a local Ray.

Three measurements on the same configuration (the ``digits`` preset with the sizes given below), each repeated
``--repeats`` times, interleaved, reported as medians (min and max beside them):

1. Ray overhead. Mean epoch seconds of one Ray Train worker running the search stage
   (``components.search.run_search_stage`` with ray.num_workers=1, ray.cpus_per_worker=2, so the worker sets
   torch to 2 threads) against the same loop without Ray (``nas.search.SearchRun(config).run_epoch()`` with
   ``torch.set_num_threads(2)``). Both numbers are ``SearchEpoch.epoch_seconds`` (the steps, then the evaluation on
   the α half; checkpointing between epochs is not in it). The first epoch of each run is a warm-up and is left out.
   Overhead = (ray - in-process) / in-process; target <= 10%. The in-process baseline runs in a fresh (spawned)
   process without Ray, at the niceness Ray gives its workers (15 by default): with a foreign load on the machine,
   two OpenMP threads at normal priority can run many times slower than the same threads at niceness 15, and that
   difference would be counted as Ray's. On an idle machine niceness changes nothing. Ray's daemons are up (and
   idle) during the baseline, so the overhead measured is that of running inside a Ray Train worker.

2. All-reduce share with two workers (ray.num_workers=2, ray.cpus_per_worker=1). A TorchTrainer built here runs
   the same pieces as ``components.search._search_worker`` (``SearchRun`` with a ``LoopContext`` whose reducers are
   ``components.distributed.average_tensors`` / ``sum_tensors``, the weight-step model wrapped by ``wrap_ddp``), with
   every collective timed inside the workers: the α-step gradient averages (``grad_reducer``), the DDP gradient
   buckets (a comm hook that calls torch's ``allreduce_hook`` and waits on its future, so DDP's overlap of
   communication with the backward pass is given up: an upper bound), and separately DDP's buffer broadcast before
   each forward and the metric sums after the steps. Step time runs from one step's ``step_hook`` to the next, the
   last step ending at the first metric sum after the loop. The seconds inside the all-reduce calls (α gradients +
   DDP buckets), over both ranks and the epochs after the first, split in two by lining up the ranks' calls: waiting
   (a rank is in the call, the other has not reached it yet) and exchanging (both are in it). The all-reduce share
   is the exchanging part / step seconds; target <= 5%. ray.sync_bn is off (the default), so batch norm adds no
   collectives.

3. Control: why the waiting is not counted. The same two workers run the same epochs with no collective inside
   them (``synchronize=False``: reducers that only mark where an all-reduce would be, no DDP, a hook marking where
   its bucket would be reduced), so each rank goes at its own pace. From the segment times between those marks,
   the table gives what a barrier costing nothing, at the same points, would make the ranks wait. Two identical
   single-threaded workers on this VM's two vCPUs drift apart by several percent per segment (Ray's own processes
   take about 15% of one core and land on one rank or the other; even CPU seconds for the same work differ by up to
   10% between ranks), so any synchronous data-parallel step pays that, whatever its all-reduce costs. Computed the
   same way on the synchronized run, this reproduces the waiting measured inside the calls.

Ray runs locally with 2 CPUs (``ray.init(address="local", num_cpus=2, ...)``) unless this process is already connected;
checkpoints and outputs go to a temporary directory that is removed at the end. Its dashboard runs on a free port
(see ``start_ray``). A repeat whose Ray run fails is reported under the table and left out of the medians.

Epoch times on a shared 2-core VM vary by about 20% from run to run with no Ray at all, so a 10% overhead target
needs more ``--repeats`` (or a quiet machine) to be settled either way; the min and max columns show the spread.

The default run (about 8 minutes on 2 cores)::

    python bench/ray_search.py

Bigger cells, more repeats, rows also written as JSON::

    python bench/ray_search.py --layers 5 --channels 16 --steps 10 --repeats 5 --json ray_search.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from components.config import PipelineConfig
from nas.config import ConfigError, load_config

CLUSTER_CPUS = 2
OVERHEAD_TARGET = 0.10
ALLREDUCE_TARGET = 0.05
TIMINGS_FILE = "timings.json"
ALLREDUCE_KINDS = ("alpha_grads", "ddp_buckets")  # what the share counts
OTHER_KINDS = ("buffer_broadcast", "metric_sums")  # timed too, reported beside it


@dataclass(frozen=True)
class Sizes:
    """The search configuration both measurements share (picklable, logged in the JSON)."""

    layers: int
    channels: int
    batch: int
    steps: int
    epochs: int
    limit: int


def make_config(sizes: Sizes, storage: str, workers: int, cpus_per_worker: float) -> PipelineConfig:
    """The digits preset with the benchmark's sizes, so the Ray runs and the in-process run see one config."""
    overrides = [
        f"search.layers={sizes.layers}",
        f"search.channels={sizes.channels}",
        f"search.batch_size={sizes.batch}",
        f"search.steps_per_epoch={sizes.steps}",
        f"search.epochs={sizes.epochs}",
        f"data.limit={sizes.limit}",
        f"ray.num_workers={workers}",
        f"ray.cpus_per_worker={cpus_per_worker}",
        f"ray.storage_path={storage}",
        "ray.max_failures=0",  # a failed worker is a failed measurement, not something to retry
        "ray.checkpoints_to_keep=1",
    ]
    return load_config("digits", overrides, model=PipelineConfig)


def warm_mean(seconds: Sequence[float]) -> float:
    """Mean over the epochs after the first: the first pays for allocator, thread-pool and DDP set-up."""
    rest = list(seconds[1:])
    if not rest:
        raise ValueError("need at least 2 epochs: the first is a warm-up")
    return sum(rest) / len(rest)


# --- 1. Ray overhead ------------------------------------------------------------------------------------------------
def inprocess_epochs(config: PipelineConfig, threads: int) -> tuple[list[float], float]:
    """Epoch seconds of ``SearchRun.run_epoch`` in this process, and the wall time of the whole run."""
    from nas.loop import LoopContext
    from nas.search import SearchRun

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        run = SearchRun(config, LoopContext(log=lambda message: None))
        epochs = [run.run_epoch().epoch_seconds for _ in range(config.search.epochs)]
        return epochs, time.perf_counter() - start
    finally:
        torch.set_num_threads(before)


def inprocess_child(config: dict[str, Any], threads: int, niceness: int) -> tuple[list[float], float]:
    """``inprocess_epochs`` in a fresh process at the Ray workers' niceness, so a foreign load on the machine
    preempts the baseline as it preempts the Ray worker (at equal priority, 2 OpenMP threads against a busy core
    can run many times slower, which would be counted as negative Ray overhead)."""
    if niceness > os.nice(0):
        os.nice(niceness - os.nice(0))
    return inprocess_epochs(PipelineConfig.model_validate(config), threads)


def run_inprocess(config: PipelineConfig, threads: int, niceness: int) -> tuple[list[float], float]:
    """The in-process baseline, in a spawned process (no Ray in it, no state shared with this driver)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(inprocess_child, config.model_dump(mode="json"), threads, niceness).result()


def ray_worker_niceness() -> int:
    """The niceness Ray gives its worker processes (the raylet's ``worker_niceness``, 15 unless configured)."""
    import ray

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    return int(ray.get(niceness.remote()))


def ray_epochs(config: PipelineConfig, name: str) -> tuple[list[float], float]:
    """Epoch seconds reported by the search stage's worker, and the wall time of the whole stage."""
    from components.driver import prepare
    from components.search import run_search_stage

    start = time.perf_counter()
    result = run_search_stage(prepare(config), name=name)
    wall = time.perf_counter() - start
    epochs = [row.epoch_seconds for row in result.history]
    if len(epochs) != config.search.epochs:
        raise RuntimeError(f"{name}: expected {config.search.epochs} epochs, the stage reported {len(epochs)}")
    return epochs, wall


# --- 2. All-reduce share (runs inside the Ray Train workers) --------------------------------------------------------
class CommClock:
    """Seconds spent in each kind of collective, inside the search steps, and the steps' own seconds.

    A step starts at ``step_hook``; the last step of the epoch ends at the first metric sum after the loop
    (``Meter.result``: only ``scheduler.step()`` lies between them). Collectives outside the steps (the metric sums
    of the training meter and of the evaluation) are counted as ``metric_sums``. Each call is also kept as
    (kind, start, end) on ``time.perf_counter``, which on Linux is CLOCK_MONOTONIC, one clock for every process on
    the machine: the driver lines the ranks' calls up to split each into waiting for the other rank and exchanging.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.in_step = False
        self.step_start = 0.0
        self.step_seconds = 0.0
        self.steps = 0
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.events: list[tuple[str, float, float]] = []

    def step_started(self, step: int) -> None:
        now = time.perf_counter()
        if self.in_step:
            self.step_seconds += now - self.step_start
        self.in_step, self.step_start = True, now
        self.steps += 1

    def steps_ended(self) -> None:
        if self.in_step:
            self.step_seconds += time.perf_counter() - self.step_start
            self.in_step = False

    def add(self, kind: str, start: float) -> None:
        end = time.perf_counter()
        self.seconds[kind] += end - start
        self.calls[kind] += 1
        self.events.append((kind, start, end))

    def reducer(self, kind: str, reduce: Callable[[Sequence[Tensor]], None]) -> Callable[[Sequence[Tensor]], None]:
        """A ``LoopContext`` reducer that times ``reduce`` (a blocking all-reduce: its seconds are its cost)."""

        def timed(tensors: Sequence[Tensor]) -> None:
            if kind == "metric_sums":
                self.steps_ended()
            start = time.perf_counter()
            reduce(tensors)
            self.add(kind, start)

        return timed

    def marker(self, kind: str) -> Callable[[Sequence[Tensor]], None]:
        """A reducer that reduces nothing: it records, as a call of no duration, where an all-reduce would be."""

        def mark(tensors: Sequence[Tensor]) -> None:
            self.add(kind, time.perf_counter())

        return mark

    def ddp_hook(self, state: dist.ProcessGroup | None, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        """DDP's default all-reduce, waited for here so it can be timed (DDP would otherwise overlap it)."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        start = time.perf_counter()
        future = allreduce_hook(state, bucket)  # type: ignore[arg-type]  # None: the default group
        future.wait()
        self.add("ddp_buckets", start)
        return future

    def wrap_method(self, kind: str, method: Callable[[], Any]) -> Callable[[], Any]:
        def timed() -> Any:
            start = time.perf_counter()
            out = method()
            self.add(kind, start)
            return out

        return timed

    def totals(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "step_seconds": self.step_seconds,
            "seconds": {k: self.seconds.get(k, 0.0) for k in ALLREDUCE_KINDS + OTHER_KINDS},
            "calls": {k: self.calls.get(k, 0) for k in ALLREDUCE_KINDS + OTHER_KINDS},
            "events": [e for e in self.events if e[0] in ALLREDUCE_KINDS],
        }


# DDP checks a comm hook's annotations against the real objects, and this module's are strings (postponed).
CommClock.ddp_hook.__annotations__.update({"bucket": dist.GradBucket, "return": torch.futures.Future[Tensor]})


def timed_search_worker(loop_config: dict[str, Any]) -> None:
    """``_search_worker`` without checkpoints or fault hooks, every collective timed; rank 0 reports all ranks.

    With ``loop_config["synchronize"]`` false, the control run: no collective at all inside the epoch (the reducers
    only mark where an all-reduce would be, the model is not wrapped in DDP and a hook marks where its gradient
    bucket would be reduced once every weight gradient is ready), so each rank runs its own steps at its own pace.
    """
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint
    from torch.nn.parallel import DistributedDataParallel

    from components.distributed import average_tensors, sum_tensors, wrap_ddp
    from nas.loop import LoopContext
    from nas.search import SearchRun

    config = PipelineConfig.model_validate(loop_config["config"])
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.ray.cpus_per_worker)))
    clock = CommClock()

    synchronize = bool(loop_config.get("synchronize", True))

    def wrap(network: nn.Module) -> nn.Module:
        if not synchronize:
            mark = clock.marker("ddp_buckets")
            torch.autograd.graph.register_multi_grad_hook(list(network.weights()), lambda grads: mark(()), mode="all")
            return network
        model = wrap_ddp(network, device, ignore=network.alpha_names())
        if isinstance(model, DistributedDataParallel):
            model.register_comm_hook(None, clock.ddp_hook)
            model._sync_buffers = clock.wrap_method("buffer_broadcast", model._sync_buffers)  # type: ignore[method-assign]
        return model

    if synchronize:
        grad_reducer = clock.reducer("alpha_grads", average_tensors)
        sum_reducer = clock.reducer("metric_sums", sum_tensors)
    else:
        grad_reducer = clock.marker("alpha_grads")
        sum_reducer = clock.reducer("metric_sums", no_reduce)  # reduces nothing, but still ends the last step
    context = LoopContext(
        rank=rank,
        world_size=world,
        device=device,
        grad_reducer=grad_reducer,
        sum_reducer=sum_reducer,
        wrap_model=wrap,
        log=lambda message: None,
        step_hook=clock.step_started,
    )
    run = SearchRun(config, context)
    epochs = []
    for _ in range(config.search.epochs):
        clock.reset()
        report = run.run_epoch()
        clock.steps_ended()
        epochs.append({**clock.totals(), "epoch_seconds": report.epoch_seconds})
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, epochs)
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / TIMINGS_FILE).write_text(json.dumps(per_rank))
            ray.train.report({"ranks": world}, checkpoint=Checkpoint.from_directory(tmp))
    else:
        ray.train.report({"ranks": world})


def no_reduce(tensors: Sequence[Tensor]) -> None:
    return None


def allreduce_timings(config: PipelineConfig, name: str, synchronize: bool = True) -> list[list[dict[str, Any]]]:
    """Per rank, per epoch: step seconds and collective seconds, from a TorchTrainer running the timed worker."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from components.storage import absolute

    ray_cfg = config.ray
    trainer = TorchTrainer(
        timed_search_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "synchronize": synchronize},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(
            num_workers=ray_cfg.num_workers, use_gpu=False, resources_per_worker={"CPU": ray_cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name, storage_path=absolute(config.ray.storage_path), failure_config=FailureConfig(max_failures=0)
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: the timed search finished without reporting its timings")
    with result.checkpoint.as_directory() as directory:
        return json.loads((Path(directory) / TIMINGS_FILE).read_text())


@dataclass
class ShareRun:
    """One two-worker run, summed over both ranks and the epochs after the first."""

    steps: int  # per rank, per epoch
    step_seconds: float  # mean per step
    seconds_per_step: dict[str, float]  # each kind of collective, mean per step
    share: float  # (alpha_grads + ddp_buckets) / step seconds
    wait_share: float  # the part of it spent before the other rank had entered the same call
    barrier_share: float  # what a free barrier at the same points would make the ranks wait, from their segment times
    calls_per_step: dict[str, float]


def summarize_share(per_rank: list[list[dict[str, Any]]]) -> ShareRun:
    """Pool both ranks' warm epochs: each rank's all-reduce time includes waiting for the other."""
    warm = [epoch for epochs in per_rank for epoch in epochs[1:]]
    if not warm:
        raise ValueError("need at least 2 epochs: the first is a warm-up")
    steps = sum(e["steps"] for e in warm)
    step_seconds = sum(e["step_seconds"] for e in warm)
    kinds = ALLREDUCE_KINDS + OTHER_KINDS
    seconds = {k: sum(e["seconds"][k] for e in warm) / steps for k in kinds}
    calls = {k: sum(e["calls"][k] for e in warm) / steps for k in kinds}
    allreduce = sum(seconds[k] for k in ALLREDUCE_KINDS)
    return ShareRun(
        steps=warm[0]["steps"],
        step_seconds=step_seconds / steps,
        seconds_per_step=seconds,
        share=allreduce / (step_seconds / steps),
        wait_share=peer_wait_seconds(per_rank) / step_seconds,
        barrier_share=barrier_wait_seconds(per_rank) / step_seconds,
        calls_per_step=calls,
    )


def peer_wait_seconds(per_rank: list[list[dict[str, Any]]]) -> float:
    """Seconds the ranks spent inside an all-reduce before the last rank had entered it (warm epochs, all ranks).

    The ranks make the same collectives in the same order, so the i-th call of a kind in an epoch is one collective;
    whatever a rank spends in it before the last rank arrives is waiting, not communication.
    """
    total = 0.0
    for epoch in range(1, min(len(epochs) for epochs in per_rank)):
        for kind in ALLREDUCE_KINDS:
            calls = [[e for e in epochs[epoch]["events"] if e[0] == kind] for epochs in per_rank]
            if len({len(c) for c in calls}) != 1:
                raise RuntimeError(f"epoch {epoch}: the ranks made different numbers of {kind} calls")
            for same_call in zip(*calls):
                last_arrival = max(start for _, start, _ in same_call)
                total += sum(max(0.0, min(last_arrival, end) - start) for _, start, end in same_call)
    return total


def barrier_wait_seconds(per_rank: list[list[dict[str, Any]]]) -> float:
    """Seconds the ranks would wait at a barrier of no cost placed at each all-reduce (warm epochs, all ranks).

    The segment before the i-th call runs from the end of call i-1 to the start of call i; at a barrier every rank
    waits for the slowest one, so rank r waits max(segments) - its own. On a synchronized run this reproduces
    ``peer_wait_seconds``; on the control run, whose ranks never wait for each other, it is the price of this machine's
    uneven progress between two identical workers that any synchronous data-parallel step pays.
    """
    total = 0.0
    for epoch in range(1, min(len(epochs) for epochs in per_rank)):
        calls = [epochs[epoch]["events"] for epochs in per_rank]
        if len({tuple(kind for kind, _, _ in c) for c in calls}) != 1:
            raise RuntimeError(f"epoch {epoch}: the ranks made different sequences of all-reduce calls")
        for i in range(1, len(calls[0])):
            segments = [c[i][1] - c[i - 1][2] for c in calls]
            total += sum(max(segments) - segment for segment in segments)
    return total


# --- the driver -----------------------------------------------------------------------------------------------------
@dataclass
class Repeat:
    """One round of all four runs, back to back."""

    inprocess_epochs: list[float]
    inprocess_wall: float
    ray_epochs: list[float]
    ray_wall: float
    overhead: float
    share: ShareRun
    control: ShareRun  # the same two workers with no collective inside the epoch
    niceness: int  # of the Ray workers, and given to the in-process baseline
    load_average: tuple[float, float, float] = field(default_factory=lambda: os.getloadavg())


def run_repeat(sizes: Sizes, storage: str, index: int, niceness: int) -> Repeat:
    """In-process and one Ray worker (in alternating order), two timed Ray workers, then the two without
    collectives: interleaved, so slow phases of the machine hit all four."""

    def progress(what: str, epochs: Sequence[float], wall: float) -> None:
        seconds = ", ".join(f"{e:.2f}" for e in epochs)
        print(f"  repeat {index + 1}: {what}: epochs {seconds} s, {wall:.0f} s wall", flush=True)

    one = make_config(sizes, storage, workers=1, cpus_per_worker=CLUSTER_CPUS)
    measured: dict[str, tuple[list[float], float]] = {}
    order = ["in-process", "Ray 1 worker"]
    for what in order if index % 2 == 0 else order[::-1]:  # odd repeats run Ray first: drift favours neither
        if what == "in-process":
            measured[what] = run_inprocess(one, threads=CLUSTER_CPUS, niceness=niceness)
        else:
            measured[what] = ray_epochs(one, name=f"overhead-{index}")
        progress(what, *measured[what])
    (inproc, inproc_wall), (ray_run, ray_wall) = measured["in-process"], measured["Ray 1 worker"]
    two = make_config(sizes, storage, workers=2, cpus_per_worker=CLUSTER_CPUS / 2)
    start = time.perf_counter()
    timings = allreduce_timings(two, name=f"allreduce-{index}")
    progress("Ray 2 workers (rank 0)", [e["epoch_seconds"] for e in timings[0]], time.perf_counter() - start)
    start = time.perf_counter()
    control = allreduce_timings(two, name=f"control-{index}", synchronize=False)
    control_wall = time.perf_counter() - start
    progress("Ray 2 workers, no collectives (rank 0)", [e["epoch_seconds"] for e in control[0]], control_wall)
    overhead = (warm_mean(ray_run) - warm_mean(inproc)) / warm_mean(inproc)
    return Repeat(
        inproc, inproc_wall, ray_run, ray_wall, overhead, summarize_share(timings), summarize_share(control), niceness
    )


@dataclass
class Line:
    """One row of the table: a quantity's median over the repeats, its spread, and its target if it has one."""

    quantity: str
    median: float
    low: float
    high: float
    unit: str
    target: float | None = None

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.median <= self.target


def line(quantity: str, values: Sequence[float], unit: str, target: float | None = None) -> Line:
    return Line(quantity, statistics.median(values), min(values), max(values), unit, target)


def build_lines(repeats: list[Repeat]) -> list[Line]:
    """The table's rows, medians over the repeats (the overhead is the median of the paired per-repeat values)."""
    inproc = [warm_mean(r.inprocess_epochs) for r in repeats]
    ray_run = [warm_mean(r.ray_epochs) for r in repeats]
    shares = [r.share for r in repeats]
    controls = [r.control for r in repeats]
    exchange = [s.share - s.wait_share for s in shares]
    return [
        line(f"in-process epoch ({CLUSTER_CPUS} torch threads)", inproc, "s"),
        line(f"Ray Train 1 worker epoch ({CLUSTER_CPUS} CPUs)", ray_run, "s"),
        line("Ray overhead (ray - in-process) / in-process", [r.overhead for r in repeats], "%", OVERHEAD_TARGET),
        line("in-process run wall (init + all epochs)", [r.inprocess_wall for r in repeats], "s"),
        line("Ray stage wall (start, epochs, checkpoints, outputs)", [r.ray_wall for r in repeats], "s"),
        line("2 workers: step", [s.step_seconds for s in shares], "s"),
        line("  all-reduce: alpha-step gradients", [s.seconds_per_step["alpha_grads"] for s in shares], "s"),
        line("  all-reduce: DDP gradient buckets", [s.seconds_per_step["ddp_buckets"] for s in shares], "s"),
        line("  DDP buffer broadcast (not counted)", [s.seconds_per_step["buffer_broadcast"] for s in shares], "s"),
        line("  metric sums, after the steps (not counted)", [s.seconds_per_step["metric_sums"] for s in shares], "s"),
        line("2 workers: time inside all-reduce calls / step time", [s.share for s in shares], "%"),
        line("  waiting there for the other rank to arrive", [s.wait_share for s in shares], "%"),
        line("    the same, from the segment times between the calls", [s.barrier_share for s in shares], "%"),
        line("  all-reduce share: exchanging, once both had arrived", exchange, "%", ALLREDUCE_TARGET),
        line("control, 2 workers without collectives: step", [c.step_seconds for c in controls], "s"),
        line("  uneven progress: a free barrier at each all-reduce", [c.barrier_share for c in controls], "%"),
    ]


def format_value(value: float, unit: str) -> str:
    return f"{value:.1%}" if unit == "%" else f"{value:.3f} s"


def format_table(lines: list[Line], sizes: Sizes, repeats: list[Repeat]) -> str:
    """An aligned, pipe-separated table with the configuration and the machine's load underneath."""
    header = ["quantity", "median", "min", "max", "target", "met"]
    body = [
        [
            row.quantity,
            format_value(row.median, row.unit),
            format_value(row.low, row.unit),
            format_value(row.high, row.unit),
            "" if row.target is None else f"<= {row.target:.0%}",
            "" if row.met is None else ("yes" if row.met else "NO"),
        ]
        for row in lines
    ]
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    share = repeats[0].share
    calls = ", ".join(f"{k} {v:g}" for k, v in share.calls_per_step.items())
    loads = ", ".join(f"{r.load_average[0]:.2f}" for r in repeats)
    return "\n".join(
        [
            fmt(header),
            "-+-".join("-" * w for w in widths),
            *(fmt(cells) for cells in body),
            f"digits, layers {sizes.layers}, C {sizes.channels}, batch {sizes.batch} per worker, "
            f"steps/epoch <= {sizes.steps} (2 workers: {share.steps}), {sizes.epochs} epochs (first = warm-up), "
            f"data.limit {sizes.limit}, {len(repeats)} repeats",
            f"2-worker collectives per step: {calls}; step seconds are per rank, all-reduce includes peer waits",
            f"{os.cpu_count()} CPUs, Ray cluster {CLUSTER_CPUS} CPUs, Ray workers and in-process baseline at "
            f"niceness {repeats[0].niceness}, 1-min load after each repeat: {loads}; "
            f"torch {torch.__version__}, Python {platform.python_version()}",
        ]
    )


def failure_summary(err: BaseException) -> str:
    """Ray's errors run to pages: the root cause's type and first three lines say what failed."""
    root = err
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    lines = [text.strip() for text in str(root).splitlines() if text.strip()]
    return f"{type(root).__name__}: {' / '.join(lines[:3])[:300]}"


def start_ray() -> bool:
    """A local Ray with the benchmark's CPUs, unless this process already has one; True if started here.

    The dashboard runs, on a free port: without it Ray still records 127.0.0.1:8265 as the State API's address, and
    Ray Train's placement-group cleaner, asking there whether the run's controller is alive, gets "no such actor"
    from any other Ray on this machine whose dashboard holds 8265, and tears the healthy run down.
    """
    import ray

    if ray.is_initialized():
        return False
    ray.init(
        address="local",
        num_cpus=CLUSTER_CPUS,
        include_dashboard=True,
        dashboard_port=0,
        configure_logging=False,
        log_to_driver=False,
    )
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layers", type=int, default=3, help="cells in the supernet")
    parser.add_argument("--channels", type=int, default=8, help="initial channels C")
    parser.add_argument("--batch", type=int, default=32, help="per worker, per half (a step takes two batches)")
    parser.add_argument("--steps", type=int, default=3, help="search.steps_per_epoch (a cap)")
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is a warm-up, not measured")
    parser.add_argument("--limit", type=int, default=800, help="data.limit: halves of 400 = 6 global batches of 64")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all three runs; medians are reported")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement to this file")
    args = parser.parse_args(argv)
    for name in ("layers", "channels", "batch", "steps", "limit", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first is a warm-up)")
    if args.limit // 2 < 2 * args.batch:
        parser.error(f"--limit {args.limit} leaves each half fewer examples than 2 workers' global batch")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sizes = Sizes(args.layers, args.channels, args.batch, args.steps, args.epochs, args.limit)
    try:  # fail in one line before Ray starts, not inside a worker
        make_config(sizes, tempfile.gettempdir(), workers=2, cpus_per_worker=CLUSTER_CPUS / 2)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    import ray

    load = os.getloadavg()[0]
    if load > 0.5:
        print(
            f"warning: 1-min load average {load:.2f} on {os.cpu_count()} CPUs before the start: something else is "
            "running, and OpenMP threads that share cores with it slow down erratically (medians help only so much)",
            flush=True,
        )
    started = start_ray()
    repeats: list[Repeat] = []
    failures: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="ray_search_bench_") as storage:
            niceness = ray_worker_niceness()
            for index in range(args.repeats):
                try:
                    repeats.append(run_repeat(sizes, storage, index, niceness))
                except Exception as err:  # a lost Ray run costs one repeat, not the measurements already taken
                    failures.append(f"repeat {index + 1}: {failure_summary(err)}")
                    print(f"repeat {index + 1}/{args.repeats} FAILED: {failures[-1]}", flush=True)
                    continue
                r = repeats[-1]
                print(
                    f"repeat {index + 1}/{args.repeats}: in-process {warm_mean(r.inprocess_epochs):.3f} s, "
                    f"ray {warm_mean(r.ray_epochs):.3f} s ({r.overhead:+.1%}), "
                    f"all-reduce calls {r.share.share:.1%} of {r.share.step_seconds:.3f} s steps: "
                    f"{r.share.share - r.share.wait_share:.1%} exchanging, {r.share.wait_share:.1%} waiting for the "
                    f"other rank (without collectives, a free barrier would cost {r.control.barrier_share:.1%})",
                    flush=True,
                )
    finally:
        if started:
            ray.shutdown()
    if not repeats:
        raise SystemExit("error: every repeat failed:\n" + "\n".join(failures))
    lines = build_lines(repeats)
    print(format_table(lines, sizes, repeats))
    for failure in failures:
        print(f"failed (not in the medians): {failure}")
    out = {
        "sizes": asdict(sizes),
        "lines": [{**asdict(row), "met": row.met} for row in lines],
        "repeats": [asdict(r) for r in repeats],
        "failures": failures,
        "cluster_cpus": CLUSTER_CPUS,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
