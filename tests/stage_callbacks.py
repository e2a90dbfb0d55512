"""Callbacks the stage tests pass into trials and workers: a killed worker, rank agreement, placement, trial starts.

Ray pickles them to its workers, which cannot import this test folder: conftest registers this module to be
pickled by value.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch

from components.trainer import StageCallback


class KillOnce(StageCallback):
    """SIGKILL the worker of ``rank`` before step ``step``, once (the marker file remembers it across restarts)."""

    def __init__(self, rank: int, step: int, marker: Path) -> None:
        self.rank, self.step, self.marker = rank, step, str(marker)

    def on_step(self, rank: int, world_size: int, step: int, network: torch.nn.Module) -> None:
        if rank == self.rank and step == self.step and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"killed rank {rank} at step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)


def max_rank_difference(network: torch.nn.Module) -> float:
    """Largest |difference| between this rank's α and w and any other rank's (0.0 when bit-identical)."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1).double() for p in network.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max(float((g - flat).abs().max()) for g in gathered)


class RankSync(StageCallback):
    """After every step, how far the ranks' parameters are apart; rank 0 writes a JSON line per epoch to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.diffs: list[float] = []

    def on_step(self, rank: int, world_size: int, step: int, network: torch.nn.Module) -> None:
        if world_size > 1 and step > 0:  # the state the previous step left
            self.diffs.append(max_rank_difference(network))

    def on_epoch_end(self, rank: int, world_size: int, epoch: int, network: torch.nn.Module) -> None:
        if world_size > 1:
            self.diffs.append(max_rank_difference(network))
        if rank == 0:
            row = {"epoch": epoch, "rank_max_abs_diff": max(self.diffs), "rank_checks": len(self.diffs)}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.diffs.clear()

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in Path(self.path).read_text().splitlines()]


class NodeLog(StageCallback):
    """Each worker writes the id of the Ray node it runs on to ``folder/rank_<rank>``."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def on_worker_start(self, rank: int, world_size: int) -> None:
        import ray

        Path(self.folder, f"rank_{rank}").write_text(ray.get_runtime_context().get_node_id())


class StartLog(StageCallback):
    """Each sweep trial appends its id to ``path`` when it starts (or restarts)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def on_trial_start(self, trial_id: str) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trial_id}\n")


class FailOnStart(StageCallback):
    """Every worker fails as it starts, with ``message``: an error only the workers see."""

    def __init__(self, message: str) -> None:
        self.message = message

    def on_worker_start(self, rank: int, world_size: int) -> None:
        raise RuntimeError(self.message)


class StallOffNode(StageCallback):
    """Each worker records its node in ``folder/rank_<rank>``. At the end of ``epoch``, the worker that is not on
    ``head`` writes ``folder/stalled`` and waits for its node to be removed (once: ``folder/removed`` marks it)."""

    def __init__(self, folder: Path, head: str, epoch: int) -> None:
        self.folder, self.head, self.epoch = str(folder), head, epoch

    def _node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def on_worker_start(self, rank: int, world_size: int) -> None:
        with open(Path(self.folder, f"rank_{rank}"), "a") as f:
            f.write(self._node() + "\n")

    def on_epoch_end(self, rank: int, world_size: int, epoch: int, network: torch.nn.Module) -> None:
        import time

        removed = Path(self.folder, "removed")
        if epoch == self.epoch and self._node() != self.head and not removed.exists():
            Path(self.folder, "stalled").write_text(f"rank {rank} at the end of epoch {epoch}\n")
            deadline = time.monotonic() + 300
            while not removed.exists() and time.monotonic() < deadline:
                time.sleep(0.2)


class InterruptDriver(StageCallback):
    """Send SIGINT (a Ctrl+C) to the driver process ``pid`` at the end of ``epoch``, once (``marker`` remembers)."""

    def __init__(self, pid: int, epoch: int, marker: Path) -> None:
        self.pid, self.epoch, self.marker = pid, epoch, str(marker)

    def on_epoch_end(self, rank: int, world_size: int, epoch: int, network: torch.nn.Module) -> None:
        if rank == 0 and epoch == self.epoch and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"interrupted the driver at the end of epoch {epoch}\n")
            os.kill(self.pid, signal.SIGINT)
