"""Whether ``search.speed.cuda_graph`` gives the eager step's α and weights (needs a CUDA device; bench/gpu.sh runs it).

Two searchers from one seed and one config, one eager (``Searcher.eager_step``) and one replaying its captured step,
take the same 8 steps on the same batches: the first two eager in both (the warmup), then the graphed one captures
and replays; before the fifth step the weight learning rate is halved in both (and with it ξ, second order), so the
graphed one must capture again: a replay of the old graph would step with the old rate. First order, then second
order. After every step the loss and the α gradient are compared (relative to the gradient's norm), at the end α and
every weight and buffer. Exits 1 if any differs by more than the tolerances, or the graphed searcher did not capture
twice and replay six times.

    python bench/cuda_graph_check.py                    # batch 64, 5 cells, C=16, 32x32, both orders
    python bench/cuda_graph_check.py --partial-channels 4   # PC-DARTS (K=4, edge normalization)
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

TOLERANCE = 1e-4  # α, weights, buffers and the loss
GRADIENT_TOLERANCE = 1e-3  # the α gradient, relative to its norm


def search_config(order: str, args: argparse.Namespace) -> SearchConfig:
    """The config of both searchers. Adam is built capturable, as the graph needs, in both: capturable Adam rounds
    its bias correction differently (α differs by about 1e-9 after one step), and the supernet's ReLU and max-pool
    kinks turn so small a difference into weight gradients 1e-5 apart within a step; so the eager reference calls
    eager_step under this same config, and the replay is the only difference between the two."""
    return SearchConfig(
        layers=args.layers,
        channels=args.channels,
        batch_size=args.batch,
        xi=0.0 if order == "first" else None,
        speed=SpeedConfig(cuda_graph=True),  # batched edges, the default
        partial_channels=args.partial_channels,
        edge_normalization=args.partial_channels > 1,
    )


def run(order: str, graphed: bool, args: argparse.Namespace) -> tuple[Searcher, list[dict]]:
    """8 steps of one searcher; per step its seconds (synchronized), loss and α gradient."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = search_config(order, args)
    searcher = Searcher(cfg, 3, 10, LoopContext(device=device))
    gen = torch.Generator(device="cpu").manual_seed(1)
    steps = []
    for step in range(8):
        if step == 4:  # a new weight lr (and ξ = lr second order): the graph must be captured again
            for group in searcher.w_optimizer.param_groups:
                group["lr"] *= 0.5
        x_w, x_a = (torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device) for _ in range(2))
        y_w, y_a = (torch.randint(0, 10, (args.batch,), generator=gen).to(device) for _ in range(2))
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss, _ = (searcher.step if graphed else searcher.eager_step)(x_w, y_w, x_a, y_a)
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        alpha_grad = torch.cat([a.grad.detach().reshape(-1) for a in searcher.network.alphas()]).double().cpu()
        steps.append({"seconds": seconds, "loss": float(loss.detach()), "alpha_grad": alpha_grad})
    return searcher, steps


def largest_difference(a: Searcher, b: Searcher) -> tuple[float, str]:
    worst, name = 0.0, ""
    for (key, x), y in zip(a.network.state_dict().items(), b.network.state_dict().values()):
        diff = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        if diff > worst:
            worst, name = diff, key
    return worst, name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--partial-channels", type=int, default=1, help="PC-DARTS's K (with edge normalization)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_graph check: no CUDA device", file=sys.stderr)
        return 1
    torch.backends.cudnn.deterministic = True  # so that the two runs differ only by what the graph changes
    torch.backends.cudnn.benchmark = False
    failed = False
    label = "DARTS" if args.partial_channels == 1 else f"PC-DARTS K={args.partial_channels}"
    for order in ("first", "second"):
        eager, eager_steps = run(order, False, args)
        graphed, graphed_steps = run(order, True, args)
        worst, where = largest_difference(eager, graphed)
        loss_gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(eager_steps, graphed_steps))
        grad_gap = max(
            float((a["alpha_grad"] - b["alpha_grad"]).norm() / a["alpha_grad"].norm().clamp_min(1e-30))
            for a, b in zip(eager_steps, graphed_steps)
        )
        step = graphed.graphed
        assert step is not None
        ok = (
            worst <= TOLERANCE
            and loss_gap <= TOLERANCE
            and grad_gap <= GRADIENT_TOLERANCE
            and (step.captures, step.replays) == (2, 6)
            and step.failed is None
        )
        failed |= not ok
        print(
            f"cuda_graph {label} {order} order: {'PASS' if ok else 'FAIL'}; largest difference {worst:.2e} ({where}), "
            f"loss {loss_gap:.2e}, α gradient {grad_gap:.2e} of its norm; {step.captures} captures, "
            f"{step.replays} replays, failed={step.failed}"
        )
        print(
            f"  ms/step eager {[round(1000 * s['seconds']) for s in eager_steps]}\n"
            f"  ms/step graph {[round(1000 * s['seconds']) for s in graphed_steps]}  (steps 3 and 5 capture)"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
