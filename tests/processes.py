"""End only the processes a test started: found by a marker in their command line (a temp folder of their own),
with every descendant, never by name (``ray stop --force`` would end every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


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


def processes_with(marker: str) -> list[int]:
    """The processes whose command line holds ``marker``, and all their descendants."""
    table = _table()
    found = {pid for pid, (_, cmdline) in table.items() if marker in cmdline and pid != os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (parent, _) in table.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return sorted(found)


def end_processes_with(marker: str, timeout: float = 20.0) -> None:
    """SIGTERM the processes :func:`processes_with` finds, then SIGKILL what is left after ``timeout`` seconds."""
    pids = processes_with(marker)
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
