"""Files a search leaves behind, in stable formats other stages read: genotype JSON, α history, pictures.

Every file is written atomically (temp file, then rename), so a reader never sees half of one, and gets the mode a
plain ``open()`` would give it (``0o666`` less the umask), like the pictures.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from nas.genotypes import Genotype
from nas.loop import EpochRecord
from nas.plot import save_alpha_heatmap, save_cells


def _write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write`` a temp file next to ``path``, then rename it over ``path``.

    The temp file is created as ``open()`` creates files (mode 0o666 less the umask), not with mkstemp, whose 0600
    mode would survive the rename and hide the file from other users (a tracking server, a colleague).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)  # opens the file it was given for writing: the mode stays
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_torch_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temp file: a checkpoint is either whole or absent."""
    return _write_atomic(path, lambda tmp: torch.save(obj, tmp))


def save_epoch_pictures(
    out_dir: str | Path,
    epoch: int,
    genotype: Genotype,
    alpha_normal: Any,
    alpha_reduce: Any,
    primitives: Sequence[str],
) -> list[Path]:
    """The derived cells and the softmax(α) heatmap of ``epoch`` (1-based, as in the epoch records):
    ``cells/epoch_NNN.png``, ``alpha/epoch_NNN.png``."""
    if epoch < 1:
        raise ValueError(f"epochs count from 1, got epoch {epoch}")
    out = Path(out_dir)
    name = f"epoch_{epoch:03d}.png"
    return [
        save_cells(genotype, out / "cells" / name, title=f"epoch {epoch}"),
        save_alpha_heatmap(alpha_normal, alpha_reduce, primitives, out / "alpha" / name, title=f"epoch {epoch}"),
    ]


def save_search_outputs(out_dir: str | Path, genotype: Genotype, history: Sequence[EpochRecord]) -> list[Path]:
    """The final genotype (JSON and the authors' text form) and the per-epoch records (``history.json``: each
    record's ``model_dump(mode="json")``, which ``SearchEpoch.model_validate`` reads back)."""
    out = Path(out_dir)
    return [
        write_text_atomic(out / "genotype.json", genotype.to_json() + "\n"),
        write_text_atomic(out / "genotype.txt", str(genotype) + "\n"),
        write_json(out / "history.json", [report.model_dump(mode="json") for report in history]),
    ]
