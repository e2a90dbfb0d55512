"""The search step's speed table: plain path (every ``search.speed`` switch off) against the default path, first and
second order, the exact Hessian-vector product and the memory option, with the machine's fp32 matmul rate.

Per row: ms per step (median over ``--iters`` timed steps after ``--warmup``), images/s (2 × batch per step),
achieved FLOP/s as a fraction of the measured matmul rate, and peak memory. On CPU every row runs in a fresh
process (its peak RSS is its own); on CUDA all run in this one, each after the last one's memory is freed: the
allocator's peak is per row anyway, and CUDA's and cuDNN's start-up (about 20 s on an H200, its kernels loaded on
first use) is paid once, not once per row. ``--rounds R`` runs the selected rows R times in turn and reports each
row's median over its rounds. ``--interleaved`` instead builds every selected row in this one process and times
one step of each in turn (no peak memory): the way to see a difference of a few percent on a host whose speed drifts.

- FLOPs of a step are nominal: the supernet's forward FLOPs per image (``bench/flops.py``, convolutions and the
  classifier, 2 per multiply-accumulate) × 3 per forward/backward pass × batch × passes, with 2 passes for a first-
  order step (α, then weights) and 5 for a second-order one (virtual step, w', two finite-difference passes,
  weights), whichever Hessian product computes it: the same work, so the rates compare. PC-DARTS rows count the
  full supernet's FLOPs too (the work it replaces), so their rate is an equivalent rate.
- Peak memory on CPU: the process's whole peak RSS (ru_maxrss) minus its RSS after the supernet, optimizers and
  batches are built and before the first step: what the steps themselves (warmup included) added. On CUDA:
  ``torch.cuda.max_memory_allocated`` over the steps, less what was allocated before them.
- The matmul rates: the median of ``torch.mm`` on two n × n matrices, fp32 and bf16, same threads (n = 2048, or
  less where one product already takes 50 ms); a bf16 row's share is of the bf16 rate.
- Timing: ``time.perf_counter`` around each step on CPU; CUDA events on a GPU (recorded on the stream, so the
  clock measures the kernels, not the launches).
- Operators per step: the aten operators one more (untimed) step dispatches, views and bare allocations left out.
  On a GPU each launches at least one kernel, and at the paper's supernet size the launches, not the arithmetic,
  set the step's time (bench/README.md), so this count is the figure a faster GPU step must shrink. Not counted
  for compiled rows (their kernels are fused, not dispatched one by one) nor for captured ones (one graph launch).
- Page faults per step: the process's minor page faults over the timed steps, per step: pages the kernel mapped
  and zeroed because the allocator had given memory back (``search.speed.keep_freed_memory`` keeps it).
- GC ms per step: the time Python's cyclic garbage collector ran over the timed steps (``gc.callbacks``), per step,
  collections between steps included (``search.speed.pause_gc`` pauses it during a step).
- Compiled rows (``search.speed.compile``, inductor) spend their first steps compiling, and CUDA-graph rows
  (``search.speed.cuda_graph``, GPU only) run two steps eagerly and capture the third: their warmup is at least 3
  steps. On CPU the compile itself takes minutes.

    python bench/speed.py --threads 2 --json bench/speed.json          # the issue's setting: batch 16, 8 cells, C=16
    python bench/speed.py --batch 4 --layers 3 --channels 4 --input-size 8 --iters 2 --warmup 1   # seconds
    python bench/speed.py --device cuda --batch 64 --threads 4         # the paper's batch on a GPU (bench/gpu.sh)
    python bench/speed.py --only default default-batched --rounds 3    # two paths in turn, 3 processes each
    python bench/speed.py --only default-flipped_input_grad default --interleaved --iters 8   # one process, in turn
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import multiprocessing
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.flops import supernet_flops  # noqa: E402
from bench.search_step import current_rss_bytes, minor_page_faults, peak_rss_bytes, synchronize  # noqa: E402
from nas.config import SearchConfig, SpeedConfig  # noqa: E402
from nas.loop import LoopContext  # noqa: E402
from nas.search import Searcher  # noqa: E402
from nas.search_model import PLAIN  # noqa: E402

MB = 2**20
PASSES = {"first": 2, "second": 5}


@dataclass(frozen=True)
class Case:
    """One row: a path (speed switches), an order and a Hessian product."""

    name: str
    order: str  # first | second
    speed: dict
    hessian: str = "fd"
    partial_channels: int = 1  # PC-DARTS K (with edge normalization when > 1)
    precision: str = "fp32"  # search.precision: fp32 | bf16 (autocast)


def cases() -> list[Case]:
    default = SpeedConfig().model_dump()
    plain = PLAIN.model_dump()
    compiled = {**default, "compile": True}
    return [
        Case("plain", "first", plain),
        Case("default", "first", default),
        Case("plain", "second", plain),
        Case("default", "second", default),
        Case("default-batched", "first", {**default, "batched_edges": False}),  # edge by edge
        Case("default-batched", "second", {**default, "batched_edges": False}),
        Case("default+exact", "second", default, "exact"),
        Case("default-channels_last", "first", {**default, "channels_last": False}),
        Case("default-channels_last", "second", {**default, "channels_last": False}),
        Case("default+recompute_depthwise", "first", {**default, "recompute_depthwise": True}),
        Case("default+recompute_depthwise", "second", {**default, "recompute_depthwise": True}),
        Case("default-norm_in_sum", "first", {**default, "norm_in_sum": False}),
        Case("default-norm_in_sum", "second", {**default, "norm_in_sum": False}),
        Case("default-norm_in_sum-shared_relu", "first", {**default, "norm_in_sum": False, "shared_relu": False}),
        Case("default-norm_in_sum-shared_relu", "second", {**default, "norm_in_sum": False, "shared_relu": False}),
        Case("default-dense_dilation", "first", {**default, "dense_dilation": False}),
        Case("default-dense_dilation", "second", {**default, "dense_dilation": False}),
        Case("default-keep_freed_memory", "first", {**default, "keep_freed_memory": False}),
        Case("default-keep_freed_memory", "second", {**default, "keep_freed_memory": False}),
        Case("default-native_depthwise_grad", "first", {**default, "native_depthwise_grad": False}),
        Case("default-native_depthwise_grad", "second", {**default, "native_depthwise_grad": False}),
        Case("default-weightless_once", "first", {**default, "weightless_once": False}),
        Case("default-weightless_once", "second", {**default, "weightless_once": False}),
        Case("default-pause_gc", "first", {**default, "pause_gc": False}),
        Case("default-pause_gc", "second", {**default, "pause_gc": False}),
        Case("pc-darts K=4-pause_gc", "second", {**default, "pause_gc": False}, partial_channels=4),
        Case("default-native_sum", "first", {**default, "native_sum": False}),
        Case("default-native_sum", "second", {**default, "native_sum": False}),
        Case("pc-darts K=4-native_sum", "second", {**default, "native_sum": False}, partial_channels=4),
        Case("pc-darts K=4-native_norm", "second", {**default, "native_norm": False}, partial_channels=4),
        Case("pc-darts K=4-native_pointwise", "second", {**default, "native_pointwise": False}, partial_channels=4),
        Case("default-native_pointwise", "second", {**default, "native_pointwise": False}),
        Case("default-native_pool", "second", {**default, "native_pool": False}),
        Case("pc-darts K=4-native_pool", "first", {**default, "native_pool": False}, partial_channels=4),
        Case("pc-darts K=4-native_pool", "second", {**default, "native_pool": False}, partial_channels=4),
        Case("default-flipped_input_grad", "first", {**default, "flipped_input_grad": False}),
        Case("default-flipped_input_grad", "second", {**default, "flipped_input_grad": False}),
        Case("default+checkpoint", "first", {**default, "checkpoint_cells": True}),
        Case("default+checkpoint", "second", {**default, "checkpoint_cells": True}),
        Case("default+bf16", "first", default, precision="bf16"),
        Case("default+bf16", "second", default, precision="bf16"),
        Case("default+compile", "first", compiled),
        Case("default+compile", "second", compiled),
        Case("default+compile+bf16", "second", compiled, precision="bf16"),
        Case("pc-darts K=4", "first", default, partial_channels=4),
        Case("pc-darts K=4", "second", default, partial_channels=4),
        Case("pc-darts K=4-batched_edges", "second", {**default, "batched_edges": False}, partial_channels=4),
        Case(
            "pc-darts K=4-batched_edges-node_shuffle",
            "second",
            {**default, "batched_edges": False, "node_shuffle": False},
            partial_channels=4,
        ),
        Case("pc-darts K=4 plain", "second", plain, partial_channels=4),
        Case("default+cuda_graph", "first", {**default, "cuda_graph": True}),
        Case("default+cuda_graph", "second", {**default, "cuda_graph": True}),
        Case("default-batched+cuda_graph", "first", {**default, "batched_edges": False, "cuda_graph": True}),
        Case("default-batched+cuda_graph", "second", {**default, "batched_edges": False, "cuda_graph": True}),
        Case("pc-darts K=4+cuda_graph", "first", {**default, "cuda_graph": True}, partial_channels=4),
        Case("pc-darts K=4+cuda_graph", "second", {**default, "cuda_graph": True}, partial_channels=4),
    ]


@dataclass
class Row:
    name: str
    order: str
    hessian: str
    precision: str
    ms_per_step: float  # the median of ms_rounds
    ms_all: list[float]  # every timed step, round after round
    ms_rounds: list[float]  # each round's median (--rounds)
    images_per_second: float
    gflop_per_step: float
    gflops: float
    fraction_of_matmul: float
    peak_mb: float | None  # None: --interleaved (one process for all rows)
    rss_after_build_mb: float | None
    ops_per_step: int | None  # aten operators that do work, one step (None: a compiled row)
    page_faults_per_step: float  # the process's minor page faults per timed step
    gc_ms_per_step: float  # time in Python's garbage collector per timed step


class CollectionClock:
    """Seconds Python's cyclic garbage collector runs between :meth:`start` and :meth:`stop` (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.seconds, self.started = 0.0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self.started

    def start(self) -> None:
        gc.callbacks.append(self)

    def stop(self) -> None:
        gc.callbacks.remove(self)


class StepClock:
    """Seconds per step: CUDA events on a GPU (the kernels' time on the stream), the wall clock on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def time(self, step: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        begin = time.perf_counter()
        step()
        return time.perf_counter() - begin


class OperatorCount(TorchDispatchMode):
    """Counts the aten operators dispatched inside it that do work: views (detach, select, reshape…) and bare
    allocations (empty) launch no kernel and are left out."""

    ALLOCATIONS = frozenset({"empty", "empty_strided"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        if not func.is_view and func.overloadpacket.__name__ not in self.ALLOCATIONS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def matmul_gflops(
    threads: int, device: str, repeats: int = 7, largest: int = 2048, dtype: torch.dtype = torch.float32
) -> float:
    """Median ``torch.mm`` rate of two n × n matrices of ``dtype``, GFLOP/s: n = 2048, or less where one product
    already takes 50 ms (bf16 on a CPU without bf16 instructions runs about 40 times slower than fp32)."""
    torch.set_num_threads(threads)
    clock, n = StepClock(device), 256
    while True:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        product = functools.partial(torch.mm, a, b)
        product()
        synchronize(device)
        times = [clock.time(product) for _ in range(repeats)]
        if n >= largest or statistics.median(times) >= 0.05:
            return 2 * n**3 / statistics.median(times) / 1e9
        n *= 2


def build(case: Case, args: argparse.Namespace) -> tuple[Searcher, tuple[torch.Tensor, ...]]:
    """The case's searcher and one train and one val batch (random, already on the device)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = args.device
    cfg = SearchConfig(
        layers=args.layers,
        channels=args.channels,
        batch_size=args.batch,
        xi=0.0 if case.order == "first" else args.xi,
        hessian=case.hessian,
        speed=SpeedConfig(**case.speed),
        partial_channels=case.partial_channels,
        edge_normalization=case.partial_channels > 1,
        precision=case.precision,
    )
    searcher = Searcher(cfg, args.in_channels, args.classes, LoopContext(device=torch.device(device)))
    shape = (args.batch, args.in_channels, args.input_size, args.input_size)
    x_w, x_a = torch.randn(shape, device=device), torch.randn(shape, device=device)
    y_w, y_a = (torch.randint(args.classes, (args.batch,), device=device) for _ in range(2))
    synchronize(device)
    return searcher, (x_w, y_w, x_a, y_a)


def captured(case: Case) -> bool:
    """Compiled or CUDA-graph rows: their first steps compile, or run eagerly and then capture the step's CUDA graph
    (nas/graphed.py), so they warm up at least 3 steps and dispatch no operators one by one."""
    return bool(case.speed.get("compile") or case.speed.get("cuda_graph"))


def warmup_steps(case: Case, args: argparse.Namespace) -> int:
    return max(args.warmup, 3) if captured(case) else args.warmup


def operators_per_step(case: Case, searcher: Searcher, batches: tuple[torch.Tensor, ...]) -> int | None:
    """The operators one more (untimed) step dispatches; None for a captured row."""
    if captured(case):
        return None
    with OperatorCount() as counter:
        searcher.step(*batches)
    return counter.count


def make_row(case: Case, args: argparse.Namespace, matmul: dict[str, float], times: list[float], **measured) -> Row:
    """A row from its timed steps (seconds) and what else was measured (peak_mb, rss_after_build_mb,
    ops_per_step, page_faults_per_step, gc_ms_per_step)."""
    seconds = statistics.median(times)
    flops = supernet_flops(args.in_channels, args.channels, args.classes, args.layers, input_size=args.input_size)
    step_flops = 3 * flops * args.batch * PASSES[case.order]
    return Row(
        name=case.name,
        order=case.order,
        hessian=case.hessian,
        precision=case.precision,
        ms_per_step=1000 * seconds,
        ms_all=[1000 * t for t in times],
        ms_rounds=[1000 * seconds],
        images_per_second=2 * args.batch / seconds,
        gflop_per_step=step_flops / 1e9,
        gflops=step_flops / seconds / 1e9,
        fraction_of_matmul=step_flops / seconds / 1e9 / matmul[case.precision],
        **measured,
    )


def measure(case: Case, args: argparse.Namespace, matmul: dict[str, float]) -> Row:
    """Build, then warm up and time the steps of one case (in a fresh process on CPU: :func:`run_row`)."""
    device, cuda = args.device, args.device.startswith("cuda")
    searcher, batches = build(case, args)
    rss_after_build = None if cuda else current_rss_bytes()
    allocated = torch.cuda.memory_allocated(device) if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    clock, times, faults_before = StepClock(device), [], 0
    warmup = warmup_steps(case, args)
    collections = CollectionClock()
    for i in range(warmup + args.iters):
        if i == warmup:
            faults_before = minor_page_faults()
            collections.start()
        seconds = clock.time(functools.partial(searcher.step, *batches))
        if i >= warmup:
            times.append(seconds)
    synchronize(device)
    collections.stop()
    faults = (minor_page_faults() - faults_before) / args.iters
    peak = (torch.cuda.max_memory_allocated(device) - allocated) if cuda else peak_rss_bytes() - (rss_after_build or 0)
    return make_row(
        case,
        args,
        matmul,
        times,
        peak_mb=peak / MB,
        rss_after_build_mb=None if rss_after_build is None else rss_after_build / MB,
        ops_per_step=operators_per_step(case, searcher, batches),
        page_faults_per_step=faults,
        gc_ms_per_step=1000 * collections.seconds / args.iters,
    )


def interleaved(selected: list[Case], args: argparse.Namespace, matmul: dict[str, float]) -> list[Row]:
    """All cases in this one process, one step of each in turn: a host whose speed drifts from minute to minute
    slows every case alike, so a difference of a few percent between two paths shows (fresh processes one after
    another need many rounds for it). No peak memory: the process's is all the cases' together."""
    built = [build(case, args) for case in selected]
    warmup = max(warmup_steps(case, args) for case in selected)
    clock = StepClock(args.device)
    times: list[list[float]] = [[] for _ in selected]
    faults, collected = [0] * len(selected), [0.0] * len(selected)
    for i in range(warmup + args.iters):
        for k, (searcher, batches) in enumerate(built):
            step = functools.partial(searcher.step, *batches)
            if i < warmup:
                step()
                continue
            collections, faults_before = CollectionClock(), minor_page_faults()
            collections.start()
            times[k].append(clock.time(step))
            collections.stop()
            faults[k] += minor_page_faults() - faults_before
            collected[k] += collections.seconds
    return [
        make_row(
            case,
            args,
            matmul,
            times[k],
            peak_mb=None,
            rss_after_build_mb=None,
            ops_per_step=operators_per_step(case, *built[k]),
            page_faults_per_step=faults[k] / args.iters,
            gc_ms_per_step=1000 * collected[k] / args.iters,
        )
        for k, case in enumerate(selected)
    ]


def run_row(case: Case, args: argparse.Namespace, matmul: dict[str, float]) -> Row:
    """One row: in a fresh process on CPU (the peak RSS a process reports is its whole life's), in this one on CUDA
    (the module docstring says why), the last row's searcher and its graphs freed first."""
    if not args.device.startswith("cuda"):
        return in_fresh_process(case, args, matmul)
    gc.collect()
    torch.cuda.empty_cache()
    return measure(case, args, matmul)


def in_fresh_process(case: Case, args: argparse.Namespace, matmul: dict[str, float]) -> Row:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, case, args, matmul).result()


def over_rounds(rounds: list[Row], matmul: dict[str, float]) -> Row:
    """One case's rows from several rounds as one: its time the median of the rounds' medians (a host whose
    speed drifts from minute to minute moves single rows by 20% or more; alternating rounds see the same drift);
    peak memory the median too."""
    first = rounds[0]
    seconds = statistics.median(r.ms_per_step for r in rounds) / 1000
    gflops = first.gflop_per_step / seconds
    return Row(
        **{
            **asdict(first),
            "ms_per_step": 1000 * seconds,
            "ms_all": [t for r in rounds for t in r.ms_all],
            "ms_rounds": [r.ms_per_step for r in rounds],
            "images_per_second": first.images_per_second * first.ms_per_step / 1000 / seconds,
            "gflops": gflops,
            "fraction_of_matmul": gflops / matmul[first.precision],
            "peak_mb": statistics.median(r.peak_mb for r in rounds),
            "page_faults_per_step": statistics.median(r.page_faults_per_step for r in rounds),
            "gc_ms_per_step": statistics.median(r.gc_ms_per_step for r in rounds),
        }
    )


def format_table(rows: list[Row], matmul: dict[str, float]) -> str:
    plain = {r.order: r.ms_per_step for r in rows if r.name == "plain"}
    lines = [
        f"{'path':24} {'order':6} {'hessian':7} {'ms/step':>9} {'img/s':>7} {'GFLOP/s':>8} {'of mm':>6} "
        f"{'peak MB':>8} {'ops/step':>8} {'faults':>7} {'GC ms':>6} {'plain/this':>10}"
    ]
    for r in rows:
        speedup = plain.get(r.order, float("nan")) / r.ms_per_step
        ops = "-" if r.ops_per_step is None else str(r.ops_per_step)
        peak = "-" if r.peak_mb is None else f"{r.peak_mb:.0f}"
        faults = f"{r.page_faults_per_step / 1000:.1f}k"
        lines.append(
            f"{r.name:24} {r.order:6} {r.hessian:7} {r.ms_per_step:9.0f} {r.images_per_second:7.1f} {r.gflops:8.1f} "
            f"{r.fraction_of_matmul:6.1%} {peak:>8} {ops:>8} {faults:>7} {r.gc_ms_per_step:6.1f} {speedup:10.2f}"
        )
    rates = ", ".join(f"{kind} {rate:.1f} GFLOP/s" for kind, rate in matmul.items())
    lines.append(f"matmul rate: {rates}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--xi", type=float, default=0.025)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the selected cases this many times, one after another in turn (each in a fresh process on CPU); "
        "a row reports the median of its rounds (what decides a difference of 10%% on a host whose speed drifts)",
    )
    parser.add_argument(
        "--interleaved",
        action="store_true",
        help="time the selected cases in this one process, one step of each in turn, and print each one's time "
        "against the first selected case of its order (no peak memory)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", default=None, help="case names to run, in this order (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    if args.interleaved and args.rounds > 1:
        raise SystemExit("--interleaved times every row in one process: ask for more steps with --iters, not --rounds")
    unknown = sorted(set(args.only or []) - {c.name for c in cases()})
    if unknown:  # a renamed row must not vanish from a table without a word
        raise SystemExit(
            f"--only names no case {', '.join(unknown)} (cases: {', '.join(dict.fromkeys(c.name for c in cases()))})"
        )
    selected = [c for c in cases() if args.only is None or c.name in args.only]
    if args.only is not None:  # in the order asked for: a run stopped by its timeout has the first ones
        selected.sort(key=lambda c: args.only.index(c.name))
    if not selected:
        raise SystemExit(f"--only names no case (cases: {', '.join(dict.fromkeys(c.name for c in cases()))})")
    if not args.device.startswith("cuda"):  # a captured step needs a GPU: left out of a whole table, refused if named
        gpu_only = list(dict.fromkeys(c.name for c in selected if c.speed.get("cuda_graph")))
        if args.only is not None and gpu_only:
            raise SystemExit(f"--only names rows that need a CUDA device ({', '.join(gpu_only)}), on {args.device}")
        selected = [c for c in selected if not c.speed.get("cuda_graph")]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    precisions = dict.fromkeys(["fp32", *(c.precision for c in selected)])  # bf16 only where a row needs its rate
    matmul = {p: matmul_gflops(args.threads, args.device, dtype=dtypes[p]) for p in precisions}
    if args.interleaved:
        rows = interleaved(selected, args, matmul)
        write_report(args, matmul, rows)
        print(format_table(rows, matmul))
        print(against_the_first(rows))
        return rows
    measured: list[list[Row]] = [[] for _ in selected]
    rows: list[Row] = []
    print(format_table(rows, matmul).splitlines()[0], flush=True)
    for round_ in range(1, args.rounds + 1):
        for i, case in enumerate(selected):
            measured[i].append(run_row(case, args, matmul))
            rows = [over_rounds(found, matmul) for found in measured if found]
            line = format_table([*rows, measured[i][-1]], matmul).splitlines()[-2]  # this process's own row
            print(line + (f"  (round {round_}/{args.rounds})" if args.rounds > 1 else ""), flush=True)
            write_report(args, matmul, rows)  # after every row: a run stopped by a timeout keeps the rows it finished
    print(format_table(rows, matmul))
    if args.json is not None:
        print(f"wrote {args.json}")
    return rows


def against_the_first(rows: list[Row]) -> str:
    """Each row's median step against the first row of its order (the base of an interleaved comparison)."""
    base: dict[str, Row] = {}
    lines = []
    for r in rows:
        first = base.setdefault(r.order, r)
        if r is not first:
            lines.append(
                f"{r.name} {r.order}: {r.ms_per_step:.0f} against {first.name} {first.ms_per_step:.0f} ms "
                f"({r.ms_per_step / first.ms_per_step:.3f}x; step by step "
                f"{', '.join(f'{b / a:.2f}' for a, b in zip(first.ms_all, r.ms_all))})"
            )
    return "\n".join(lines)


def write_report(args: argparse.Namespace, matmul: dict[str, float], rows: list[Row]) -> None:
    """The JSON report of the rows so far (nothing without ``--json``)."""
    if args.json is not None:
        report = {
            "setting": {k: v for k, v in vars(args).items() if k not in ("json", "only")},
            "machine": {
                "platform": platform.platform(),
                "cpus": multiprocessing.cpu_count(),
                "torch": torch.__version__,
            },
            "matmul_gflops": matmul,  # fp32, and bf16 where a bf16 row was run
            "flops_per_image_forward": supernet_flops(
                args.in_channels, args.channels, args.classes, args.layers, input_size=args.input_size
            ),
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
