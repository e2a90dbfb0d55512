"""Images/s and peak memory of ONE full DARTS search step, first order (ξ = 0) against second order (ξ > 0).

One search step is exactly what ``SearchRun.run_epoch`` does per batch pair, timed through the same code:
``nas.search.Searcher.step`` (the α step: ``Architect.step`` on a train batch and a val batch, then Adam; then the
weight step: α frozen, cross-entropy, backward, gradient clipping, SGD with momentum) and the ``Meter`` update.
Optimizer settings are the ``SearchConfig`` defaults. Data are random tensors already
on the device, so data loading and host-to-device copies are not measured. Images/s counts both batches a step
consumes: 2 × batch / (seconds per step).

Peak memory, per mode: on CUDA ``torch.cuda.max_memory_allocated`` over the timed loop (reset per mode; it includes
weights, optimizer state and data); on CPU the increase of the process's peak RSS over the RSS just before the timed
loop (standard library: ``resource.getrusage`` ru_maxrss and /proc/self/statm), each mode in a fresh process so the
high-water mark of one mode cannot hide the other's. MB = 2**20 bytes. On CPU this is only growth past the warmup's
high-water mark: glibc and PyTorch keep freed memory resident, so after a warmup it is near zero and is not the step's
activation memory; the JSON rows add the RSS before the first step and the whole peak RSS. Use --warmup 0 to see the
first step's growth (which also includes one-off library initialisation), or CUDA for a clean number.

The paper's setting (CIFAR-10 search, one GPU)::

    python bench/search_step.py --batch 64 --layers 8 --channels 16 --input-size 32

A small CPU run (a few seconds)::

    python bench/search_step.py --device cpu --batch 32 --layers 3 --channels 8 --input-size 8 --in-channels 1 \\
        --iters 5 --warmup 1 --threads 2

Only one mode, with the rows written as JSON::

    python bench/search_step.py --modes second --xi 0.025 --json search_step.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from nas.config import SearchConfig
from nas.loop import LoopContext, Meter
from nas.search import Searcher

MB = 2**20
CUDA_MEMORY = "torch.cuda.max_memory_allocated over the timed loop"
CPU_MEMORY = "peak RSS increase during the timed loop (resource.getrusage ru_maxrss - RSS before; fresh process)"


@dataclass(frozen=True)
class Setting:
    """Everything one measurement depends on (picklable, so a fresh process can be handed it)."""

    batch: int
    layers: int
    channels: int
    nodes: int
    input_size: int
    in_channels: int
    classes: int
    device: str
    warmup: int
    iters: int
    threads: int | None
    seed: int


@dataclass
class Row:
    """One line of the table (and of the JSON output)."""

    mode: str
    xi: float
    batch: int
    layers: int
    channels: int
    nodes: int
    input_size: int
    in_channels: int
    classes: int
    device: str
    threads: int
    warmup: int
    iters: int
    ms_per_step: float
    images_per_second: float
    peak_mb: float
    memory: str
    rss_before_steps_mb: float | None  # CPU: RSS with the model and data built, before the first (warmup) step
    peak_rss_mb: float | None  # CPU: the process's whole peak RSS (ru_maxrss), imports and torch runtime included
    torch: str


def build_searcher(setting: Setting, xi: float) -> Searcher:
    """The supernet, optimizers and architect exactly as a search run builds them (``SearchConfig`` defaults)."""
    cfg = SearchConfig(layers=setting.layers, channels=setting.channels, nodes=setting.nodes, xi=xi)
    context = LoopContext(device=torch.device(setting.device))
    searcher = Searcher(cfg, in_channels=setting.in_channels, num_classes=setting.classes, context=context)
    searcher.network.train()
    return searcher


def random_batches(setting: Setting) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A weight-half batch and an α-half batch, resident on the device so only compute is timed."""
    shape = (setting.batch, setting.in_channels, setting.input_size, setting.input_size)
    device = setting.device
    x_w, x_a = torch.randn(shape, device=device), torch.randn(shape, device=device)
    y_w = torch.randint(setting.classes, (setting.batch,), device=device)
    y_a = torch.randint(setting.classes, (setting.batch,), device=device)
    return x_w, y_w, x_a, y_a


def search_step(searcher: Searcher, batches: tuple[Tensor, Tensor, Tensor, Tensor], meter: Meter) -> None:
    """One step of ``SearchRun.run_epoch``: ``Searcher.step``, then the meter (it synchronises on CUDA)."""
    loss, logits = searcher.step(*batches)
    meter.update(loss, logits, batches[1])


def current_rss_bytes() -> int | None:
    """Resident set size now (Linux /proc); None where there is no /proc, and ru_maxrss stands in."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """The process's RSS high-water mark: ru_maxrss is KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def minor_page_faults() -> int:
    """The process's minor page faults so far: each is a page of memory the kernel mapped (and zeroed) on first
    touch, what a step pays for memory the allocator gave back and takes again (``search.speed.keep_freed_memory``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def synchronize(device: str) -> None:
    """CUDA runs asynchronously: wait for queued kernels so the clock measures the work, not the launches."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def measure_mode(setting: Setting, mode: str, xi: float) -> Row:
    """Warm up, then time ``iters`` search steps of one mode and read its peak memory."""
    if setting.threads is not None:
        torch.set_num_threads(setting.threads)
    torch.manual_seed(setting.seed)
    device, cuda = setting.device, setting.device.startswith("cuda")
    searcher = build_searcher(setting, xi)
    batches = random_batches(setting)
    meter = Meter()
    rss_before_steps = None if cuda else current_rss_bytes()
    for _ in range(setting.warmup):
        search_step(searcher, batches, meter)
    synchronize(device)
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        rss_before = 0
    else:
        now = current_rss_bytes()
        rss_before = peak_rss_bytes() if now is None else now
    start = time.perf_counter()
    for _ in range(setting.iters):
        search_step(searcher, batches, meter)
    synchronize(device)
    seconds = (time.perf_counter() - start) / setting.iters
    peak_rss = None if cuda else peak_rss_bytes()
    peak_mb = torch.cuda.max_memory_allocated(device) / MB if peak_rss is None else max(0, peak_rss - rss_before) / MB
    if meter.count and math.isnan(meter.result(LoopContext())[0]):  # the step is broken: its timing means nothing
        raise RuntimeError(f"{mode}: the training loss became NaN")
    return Row(
        mode=mode,
        xi=xi,
        batch=setting.batch,
        layers=setting.layers,
        channels=setting.channels,
        nodes=setting.nodes,
        input_size=setting.input_size,
        in_channels=setting.in_channels,
        classes=setting.classes,
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        threads=torch.get_num_threads(),
        warmup=setting.warmup,
        iters=setting.iters,
        ms_per_step=1000 * seconds,
        images_per_second=2 * setting.batch / seconds,
        peak_mb=peak_mb,
        memory=CUDA_MEMORY if cuda else CPU_MEMORY,
        rss_before_steps_mb=None if rss_before_steps is None else rss_before_steps / MB,
        peak_rss_mb=None if peak_rss is None else peak_rss / MB,
        torch=torch.__version__,
    )


def run_mode(setting: Setting, mode: str, xi: float) -> Row:
    """On CPU each mode gets a fresh process (ru_maxrss only ever rises); on CUDA the peak counter is reset."""
    if setting.device.startswith("cuda"):
        try:
            return measure_mode(setting, mode, xi)
        finally:
            gc.collect()
            torch.cuda.empty_cache()
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_mode, setting, mode, xi).result()


def format_table(rows: list[Row]) -> str:
    """The rows as an aligned, pipe-separated table, with what "peak MB" means underneath."""
    header = ["mode", "batch", "layers", "C", "input", "ms/step", "img/s", "peak MB"]
    body = [
        [
            f"{r.mode} (xi={r.xi:g})",
            str(r.batch),
            str(r.layers),
            str(r.channels),
            f"{r.in_channels}x{r.input_size}x{r.input_size}",
            f"{r.ms_per_step:.1f}",
            f"{r.images_per_second:.1f}",
            f"{r.peak_mb:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "-+-".join("-" * w for w in widths), *(line(cells) for cells in body)]
    if rows:
        r = rows[0]
        out.append(f"device {r.device}, {r.threads} threads, nodes {r.nodes}, {r.classes} classes, torch {r.torch}")
        out.append(f"peak MB: {r.memory}; img/s counts train + val batches (2 x batch) per step")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--batch", type=int, default=64, help="per batch; a step consumes a train and a val batch")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--channels", type=int, default=16, help="initial channels C")
    parser.add_argument("--nodes", type=int, default=4, help="intermediate nodes per cell")
    parser.add_argument("--input-size", type=int, default=32, help="image height = width")
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, cuDNN, caches)")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--modes", nargs="+", choices=["first", "second"], default=["first", "second"])
    parser.add_argument("--xi", type=float, default=0.025, help="ξ of the second-order mode (first order is 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    for name in ("batch", "layers", "channels", "nodes", "input_size", "in_channels", "classes", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1) or args.xi <= 0:
        parser.error("--warmup must be >= 0, --threads >= 1 and --xi > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    setting = Setting(
        batch=args.batch,
        layers=args.layers,
        channels=args.channels,
        nodes=args.nodes,
        input_size=args.input_size,
        in_channels=args.in_channels,
        classes=args.classes,
        device=args.device,
        warmup=args.warmup,
        iters=args.iters,
        threads=args.threads,
        seed=args.seed,
    )
    xis = {"first": 0.0, "second": args.xi}
    rows = [run_mode(setting, mode, xis[mode]) for mode in args.modes]
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
