"""Pick the genotypes worth retraining from a sweep's search trials.

Trials are ranked by a metric (default: the supernet's final validation accuracy); genotypes are canonicalized
first, so two searches that found the same cell (edges listed in another order) are one candidate, credited with
its best trial. The top k candidates are kept. Trials that an early-stopping scheduler (ASHA) cut short are
listed but not candidates: their supernet was measured at another epoch, so the numbers do not compare. The table
of every trial is written as CSV and JSON (to a folder or a URI), so the choice can be checked by eye and read
back by the retrain stage.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from components import storage
from nas.artifacts import write_json, write_text_atomic
from nas.genotypes import Genotype

Mode = Literal["max", "min"]


@dataclass(frozen=True)
class TrialResult:
    """One finished search: who ran it, with what seed and ξ, what it measured and what it derived."""

    trial: str
    seed: int
    xi: float | None
    metrics: dict[str, float]
    genotype: Genotype
    search_dir: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # the trial's other grid values (alpha_lr, w_lr, ...)
    complete: bool = True  # False when a scheduler stopped the search before its last epoch


@dataclass(frozen=True)
class Candidate:
    """A distinct genotype, represented by its best trial."""

    rank: int
    genotype: Genotype
    metric: float
    trial: TrialResult
    trials: tuple[str, ...] = field(default_factory=tuple)


def _score(result: TrialResult, metric: str, mode: Mode) -> float:
    """A key where larger is better and missing or NaN metrics rank last."""
    value = result.metrics.get(metric)
    if value is None or not isinstance(value, int | float) or math.isnan(value):
        return -math.inf
    return float(value) if mode == "max" else -float(value)


def select_top(
    results: Iterable[TrialResult], metric: str = "val_acc", mode: Mode = "max", k: int = 1
) -> list[Candidate]:
    """The k best distinct genotypes of the complete trials; ties go to the earlier trial name (a stable choice)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    results = list(results)
    if not results:
        raise ValueError("no trial results to select from")
    complete = [r for r in results if r.complete]
    if not complete:
        raise ValueError("every trial was stopped early; none ran the whole search")
    ordered = sorted(complete, key=lambda r: (-_score(r, metric, mode), r.trial))
    groups: dict[Genotype, list[TrialResult]] = {}
    for result in ordered:
        groups.setdefault(result.genotype.canonical(), []).append(result)
    candidates = []
    for rank, (genotype, members) in enumerate(groups.items(), start=1):
        if rank > k:
            break
        best = members[0]
        value = best.metrics.get(metric, math.nan)
        candidates.append(Candidate(rank, genotype, float(value), best, tuple(m.trial for m in members)))
    return candidates


def selection_table(
    results: Sequence[TrialResult], candidates: Sequence[Candidate], metric: str = "val_acc"
) -> list[dict[str, Any]]:
    """One row per trial: its numbers, its genotype, and whether (and as what rank) it was selected."""
    rank_of = {c.trial.trial: c.rank for c in candidates}
    same_as = {t: c.trial.trial for c in candidates for t in c.trials if t != c.trial.trial}
    rows = []
    for r in sorted(results, key=lambda r: r.trial):
        rows.append({
            "trial": r.trial,
            "seed": r.seed,
            "xi": r.xi,
            "order": "first" if r.xi == 0 else "second",
            **r.params,
            "epochs": r.metrics.get("epoch"),
            "stopped_early": not r.complete,
            metric: r.metrics.get(metric),
            "selected_rank": rank_of.get(r.trial),
            "same_genotype_as": same_as.get(r.trial),
            "genotype": str(r.genotype),
            "search_dir": r.search_dir,
        })  # fmt: skip
    return rows


def write_selection(
    out_dir: str | Path, results: Sequence[TrialResult], candidates: Sequence[Candidate], metric: str = "val_acc"
) -> tuple[str, str]:
    """``selection.csv`` and ``selection.json`` in a folder or under a URI (s3://, gs://, file://); their paths.

    The JSON also lists the chosen genotypes in rank order.
    """
    if "://" not in str(out_dir):
        csv_path, json_path = _write_selection_files(Path(out_dir), results, candidates, metric)
        return str(csv_path), str(json_path)
    with tempfile.TemporaryDirectory() as tmp:
        _write_selection_files(Path(tmp), results, candidates, metric)
        storage.publish(Path(tmp), str(out_dir))
    base = str(out_dir).rstrip("/")
    return f"{base}/selection.csv", f"{base}/selection.json"


def _write_selection_files(
    out: Path, results: Sequence[TrialResult], candidates: Sequence[Candidate], metric: str
) -> tuple[Path, Path]:
    rows = selection_table(results, candidates, metric)
    fieldnames: list[str] = []
    for row in rows:  # rows of different grids may carry different extra axes
        fieldnames += [key for key in row if key not in fieldnames]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames or ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    csv_path = write_text_atomic(out / "selection.csv", buffer.getvalue())
    json_path = write_json(
        out / "selection.json",
        {
            "metric": metric,
            "selected": [
                {"rank": c.rank, "trial": c.trial.trial, metric: c.metric, "trials": list(c.trials),
                 "genotype": c.genotype.to_dict()}
                for c in candidates
            ],
            "trials": rows,
        },
    )  # fmt: skip
    return csv_path, json_path
