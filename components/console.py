"""The console: what a person watching a run reads. Our own lines only, each naming its run (``[search s2 1st]
search epoch 3/50 | ...``), and a pipeline-level progress line with an overall ETA. Ray's own logs (worker output,
Tune's status tables) stay in Ray's log folder; ``--verbose`` forwards them as well.

Workers, Tune trials and retrain tasks run in other processes. With Ray's log forwarding off they send their lines
to the driver over a Ray queue: a :class:`ConsoleChannel` travels in ``Prepared`` to every trial, task and worker,
and :func:`open_console` prints what arrives, on the driver, in order of arrival.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from nas.loop import format_duration

_POLL_SECONDS = 1.0  # a get returns as soon as an item arrives: this only bounds how late a stop is seen


def drain_queue(queue: Any, handle: Callable[[Any], None], stop: threading.Event) -> None:
    """Hand every item of a Ray queue to ``handle`` until ``stop`` is set and the queue is empty (an item put just
    before ``stop`` is still handled); returns early if the queue's actor is gone (Ray shut down)."""
    from ray.util.queue import Empty

    while True:
        try:
            item = queue.get(block=True, timeout=_POLL_SECONDS)
        except Empty:
            if stop.is_set() and queue.empty():
                return
            continue
        except Exception:  # noqa: BLE001 - the queue's actor is gone: nothing more can arrive
            return
        handle(item)


def _labelled(label: str, text: str) -> str:
    return f"[{label}] {text}"


@dataclass(frozen=True)
class ConsoleChannel:
    """The way to the driver's console from any process of the run (picklable: it holds a Ray queue's handle)."""

    queue: Any  # ray.util.queue.Queue

    def line(self, label: str, text: str) -> None:
        self._put(("line", label, text), _labelled(label, text))

    def epoch(self, label: str, epoch: int, total: int, seconds: float = math.nan) -> None:
        """Run ``label`` finished epoch ``epoch`` of ``total``, which took ``seconds``: what the overall progress
        counts."""
        self._put(("epoch", label, epoch, total, seconds), None)

    def _put(self, item: tuple[Any, ...], fallback: str | None) -> None:
        """Never fail the worker over its console: with the driver's queue gone (the driver ended while a task
        still ran), the line goes to the process's own stdout, which Ray keeps in its log folder."""
        try:
            self.queue.put(item)
        except Exception:  # noqa: BLE001 - the queue's actor is gone
            if fallback is not None:
                print(fallback, file=sys.__stdout__, flush=True)


@dataclass(frozen=True)
class WorkerConsole:
    """A worker's (or trial's) console: its lines and its epochs, under its run's label."""

    label: str
    channel: ConsoleChannel | None = None

    def log(self, text: str) -> None:
        if self.channel is None:  # no driver console (a worker started by hand): the process's own stdout
            print(_labelled(self.label, text), file=sys.__stdout__, flush=True)
        else:
            self.channel.line(self.label, text)

    def epoch(self, epoch: int, total: int, seconds: float = math.nan) -> None:
        if self.channel is not None:
            self.channel.epoch(self.label, epoch, total, seconds)


@dataclass
class WorkPlan:
    """A pipeline's planned work in forward FLOPs (:func:`components.pipeline.work_plan`): per search
    trial by its label, and per retrain by its role (``candidate``, ``random``, ``champion``, ``baseline``)."""

    searches: dict[str, float] = field(default_factory=dict)
    retrains: dict[str, tuple[int, float]] = field(default_factory=dict)  # role -> (how many, units each)

    @property
    def total(self) -> float:
        return sum(self.searches.values()) + sum(count * units for count, units in self.retrains.values())

    def units(self, label: str) -> float:
        """The planned units of the run ``label`` (``search ...`` or ``retrain <role> ...``); 0 when unplanned."""
        if label in self.searches or not label.startswith("retrain "):
            return self.searches.get(label, 0.0)
        role = label.removeprefix("retrain ").split(" ")[0]
        if role not in self.retrains:  # zoo cells and the best random cell are baselines
            role = "baseline"
        return self.retrains.get(role, (0, 0.0))[1]


class PipelineProgress:
    """The overall progress: each run counts its planned units times the share of its epochs done; the ETA assumes
    the rate measured so far (FLOPs per second) for the work left.

    The rate counts only work done here, and only from when the first reported epoch began: the start-up before it
    (Ray, workers, data) would otherwise weigh on the first ETAs as if it recurred for all the work left (a quick
    pipeline's first ETA said 11m45s for 131 s of work), and runs or epochs read back on a resumed pipeline took no
    time here."""

    def __init__(self, plan: WorkPlan, clock: Callable[[], float] = time.monotonic) -> None:
        self.plan, self.clock = plan, clock
        self.started = clock()
        self.working_since: float | None = None  # when the first reported epoch began
        self.done: dict[str, float] = {}
        self.read_back = 0.0  # units counted without being run here

    def epoch(self, label: str, epoch: int, total: int, seconds: float = math.nan) -> None:
        if self.working_since is None:
            now = self.clock()
            self.working_since = max(self.started, now - seconds) if math.isfinite(seconds) else self.started
        share = self.plan.units(label) / max(total, 1)
        if label not in self.done:  # a run resumed from a checkpoint: its earlier epochs ran before this process
            self.read_back += share * min(epoch - 1, total)
        self.done[label] = share * min(epoch, total)

    def complete(self, labels: list[str]) -> None:
        """Runs that finished without reporting all their epochs here (read back on a resumed pipeline)."""
        for label in labels:
            units = self.plan.units(label)
            self.read_back += units - self.done.get(label, 0.0)
            self.done[label] = units

    @property
    def fraction(self) -> float:
        total = self.plan.total
        return min(1.0, sum(self.done.values()) / total) if total > 0 else 0.0

    def line(self) -> str:
        now, fraction, done = self.clock(), self.fraction, sum(self.done.values())
        since = self.started if self.working_since is None else self.working_since  # a clock may read 0.0
        worked, timed = done - self.read_back, now - since
        if fraction >= 1.0:
            left = format_duration(0.0)
        elif worked > 0 and timed > 0:
            left = format_duration((self.plan.total - done) * timed / worked)
        else:
            left = "unknown"
        return f"{fraction:.0%} of the planned work | {format_duration(now - self.started)} elapsed | ETA {left}"


class Console:
    """The driver's end of the queue: prints every line as ``[label] text``; after an epoch, the progress line
    (at most every ``every`` seconds, so that short epochs do not flood it)."""

    def __init__(self, log: Callable[[str], None], progress: PipelineProgress | None, every: float) -> None:
        from ray.util.queue import Queue

        self.log, self.progress, self.every = log, progress, every
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.channel = ConsoleChannel(self.queue)
        self._stop = threading.Event()
        self._last_progress = -math.inf
        self._shown_fraction: float | None = None
        args = (self.queue, self._show, self._stop)
        self._thread = threading.Thread(target=drain_queue, args=args, name="raydarts-console", daemon=True)
        self._thread.start()

    def _show(self, item: tuple[Any, ...]) -> None:
        if item[0] == "line":
            self.log(_labelled(item[1], item[2]))
        elif item[0] == "epoch" and self.progress is not None:
            self.progress.epoch(*item[1:])
            now = time.monotonic()
            if now - self._last_progress >= self.every or self.progress.fraction >= 1.0:
                self._last_progress = now
                self.show_progress()

    def complete(self, labels: list[str]) -> None:
        """A stage ended: its runs count in full (some were read back, not run), and the progress line shows."""
        if self.progress is not None:
            self.progress.complete(labels)
            if self.progress.fraction != self._shown_fraction:
                self._last_progress = time.monotonic()
                self.show_progress()

    def show_progress(self) -> None:
        if self.progress is not None:
            self._shown_fraction = self.progress.fraction
            self.log(f"[pipeline] {self.progress.line()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.queue.shutdown()


def quiet_libraries(verbose: bool) -> None:
    """What a command line does before it runs: MLflow's own INFO lines (database setup, input validation) stay
    off the console unless ``--verbose``; its warnings and errors still show."""
    import logging

    logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.WARNING)


@contextmanager
def open_console(
    log: Callable[[str], None] = print, plan: WorkPlan | None = None, every: float = 30.0
) -> Iterator[Console]:
    """A console for one run of a pipeline or stage (Ray must be up): its ``channel`` goes into ``Prepared``."""
    console = Console(log, PipelineProgress(plan) if plan is not None else None, every)
    try:
        yield console
    finally:
        console.close()
