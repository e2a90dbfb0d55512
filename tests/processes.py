"""The processes a test starts, and only those: found by a marker in their command line (a temp folder of their own)
or as a command's descendants, never by name (``ray stop --force`` would end every Ray on the machine); a local Ray
of the test's own; command lines run with a bound that leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest


def _table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(entry.name)] = (parent, cmdline)
    return table


def _with_descendants(table: dict[int, tuple[int, str]], roots: set[int]) -> set[int]:
    found = set(roots)
    frontier = set(roots)
    while frontier:
        frontier = {pid for pid, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def processes_with(marker: str) -> list[int]:
    """The processes whose command line holds ``marker``, and all their descendants."""
    table = _table()
    return sorted(
        _with_descendants(table, {pid for pid, (_, cmd) in table.items() if marker in cmd and pid != os.getpid()})
    )


def end_processes_with(marker: str, timeout: float = 20.0) -> None:
    """End the processes :func:`processes_with` finds (:func:`end_processes`)."""
    end_processes(processes_with(marker), timeout)


def end_processes(pids: list[int], timeout: float = 20.0) -> None:
    """SIGTERM ``pids``, then SIGKILL what is left after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.2)
        pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        if not pids:
            return


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), as they are now."""
    return sorted(_with_descendants(_table(), {pid}) - {pid})


def _ray_worker_stacks(pids: list[int]) -> str:
    """Where each Ray task and actor process among ``pids`` stands (py-spy, which ``ray[default]`` installs), so that a
    hang inside a worker can be read from the test's failure."""
    import shutil
    import sys

    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    table = _table()
    dumps = []
    for pid in pids:
        name = table.get(pid, (0, ""))[1]
        if spy and name.startswith("ray::") and "Agent" not in name:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=20)
                dumps.append(f"--- {name.strip()} (pid {pid})\n{dump.stdout[-2000:]}{dump.stderr[-500:]}")
    return "\n".join(dumps)


def run_bounded(command: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(command, capture_output=True, text=True)``, except that a command still running after
    ``timeout`` seconds fails the test with what it printed and where its Python threads stood (faulthandler's dump on
    SIGABRT), and ends with every process it started: a Ray it brought up would otherwise outlive it, and the next
    test's ``ray.init()`` would join that stale cluster."""
    env = {**(kwargs.pop("env", None) or os.environ), "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        below = descendants(process.pid)  # before the command ends and they are handed to init
        stacks = _ray_worker_stacks(below)
        process.send_signal(signal.SIGABRT)
        try:
            stdout, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        end_processes(below, timeout=5)
        output = f"--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-6000:]}\n{stacks[-8000:]}"
        pytest.fail(f"{command} ran past {timeout:g}s\n{output}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def start_local_ray() -> None:
    """A Ray of its own for this test process (2 CPUs, this machine's size; no dashboard): ``address="local"``, so that
    a cluster some other test left behind is never joined."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)


def stop_local_ray() -> None:
    """``ray.shutdown()`` of :func:`start_local_ray`'s Ray, then the end of any of its worker processes that outlived
    it: a Ray Train controller was once seen to miss its raylet's end and sleep on as an orphan, holding 1 GB."""
    import ray

    table = _table()
    below = _with_descendants(table, {os.getpid()}) - {os.getpid()}
    workers = [pid for pid in below if table[pid][1].startswith("ray::")]
    ray.shutdown()
    end_processes([pid for pid in workers if Path(f"/proc/{pid}").exists()], timeout=5)
