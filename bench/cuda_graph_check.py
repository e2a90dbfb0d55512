"""Whether ``search.speed.cuda_graph`` gives the eager step's α and weights (needs a CUDA device; bench/gpu.sh runs it).

Two searchers from one seed, one eager and one replaying its captured step, take the same 8 steps on the same
batches: the first two eager in both (the warmup), then the graphed one captures and replays; before the fifth step
both take a scheduler step, so the graphed one must capture again under the new learning rate (and, second order,
the new ξ). First order, then second order. Prints the largest differences, the captures and replays, and the
step times, and exits 1 if α or any weight or buffer differs by more than 1e-4 or the captures are not the two
expected.

    python bench/cuda_graph_check.py                    # batch 64, 5 cells, C=16, 32x32, both orders
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nas.config import SearchConfig, SpeedConfig  # noqa: E402
from nas.loop import LoopContext  # noqa: E402
from nas.search import Searcher  # noqa: E402

TOLERANCE = 1e-4


def run(order: str, graphed: bool, args: argparse.Namespace) -> tuple[Searcher, list[float]]:
    """8 steps of one searcher; its per-step seconds (synchronized)."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    speed = SpeedConfig(batched_edges=True, cuda_graph=graphed)
    cfg = SearchConfig(
        layers=args.layers,
        channels=args.channels,
        batch_size=args.batch,
        xi=0.0 if order == "first" else None,
        speed=speed,
    )
    searcher = Searcher(cfg, 3, 10, LoopContext(device=device))
    gen = torch.Generator(device="cpu").manual_seed(1)
    times = []
    for step in range(8):
        if step == 4:
            searcher.scheduler.step()  # a new weight lr (and ξ = lr second order): the graph must be captured again
        x_w, x_a = (torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device) for _ in range(2))
        y_w, y_a = (torch.randint(0, 10, (args.batch,), generator=gen).to(device) for _ in range(2))
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        searcher.step(x_w, y_w, x_a, y_a)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return searcher, times


def largest_difference(a: Searcher, b: Searcher) -> tuple[float, str]:
    worst, name = 0.0, ""
    for (key, x), y in zip(a.network.state_dict().items(), b.network.state_dict().values()):
        diff = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        if diff > worst:
            worst, name = diff, key
    return worst, name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_graph check: no CUDA device", file=sys.stderr)
        return 1
    torch.backends.cudnn.deterministic = True  # so that the two runs differ only by what the graph changes
    torch.backends.cudnn.benchmark = False
    failed = False
    for order in ("first", "second"):
        eager, eager_times = run(order, False, args)
        graphed, graphed_times = run(order, True, args)
        worst, where = largest_difference(eager, graphed)
        step = graphed.graphed
        counts_match = (eager.architect.first_order_steps, eager.architect.second_order_steps) == (
            graphed.architect.first_order_steps,
            graphed.architect.second_order_steps,
        )
        ok = worst <= TOLERANCE and step.captures == 2 and step.failed is None and counts_match
        failed |= not ok
        print(
            f"cuda_graph {order} order: {'PASS' if ok else 'FAIL'}; largest difference {worst:.2e} ({where}); "
            f"{step.captures} captures, {step.replays} replays, failed={step.failed}, architect counts match: "
            f"{counts_match}"
        )
        print(
            f"  ms/step eager {[round(1000 * t) for t in eager_times]}\n"
            f"  ms/step graph {[round(1000 * t) for t in graphed_times]}  (steps 3 and 5 capture)"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
