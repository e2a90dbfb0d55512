"""Pick the genotypes worth retraining from a sweep's search trials.

Trials are ranked by a metric (default: the supernet's final validation accuracy); genotypes are canonicalized
first, so two searches that found the same cell (edges listed in another order) are one candidate, credited with
its best trial. The top k candidates are kept. Trials that an early-stopping scheduler (ASHA) cut short are
listed but not candidates: their supernet was measured at another epoch, so the numbers do not compare. The table
of every trial is written as CSV and JSON (to a folder or a URI), so the choice can be checked by eye and read
back by the retrain stage. Each trial carries its resolved config, so the table's grid columns are read from it.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from components.config import PipelineConfig
from components.driver import Prepared
from components.storage import Location
from nas.genotypes import Genotype, count_ops
from nas.search import SearchEpoch

Mode = Literal["max", "min"]


class TrialResult(BaseModel):
    """One finished search: its resolved config (seed, ξ and any other grid value), its last epoch, where its
    outputs are. A record: what the sweep hands to selection, in one process or as JSON between Kubeflow steps."""

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    trial: str
    config: PipelineConfig
    last: SearchEpoch
    outputs: str | None = None  # folder or URI of the published search outputs
    complete: bool = True  # False when a scheduler stopped the search before its last epoch
    started: float | None = None  # wall-clock seconds since the epoch, when the search started and last reported
    ended: float | None = None

    @property
    def location(self) -> Location | None:
        return None if self.outputs is None else Location(self.outputs)

    @property
    def genotype(self) -> Genotype:
        return self.last.genotype

    @property
    def metrics(self) -> dict[str, float]:
        """What the trial reported at its last epoch (the epoch included), as selection ranks it."""
        return {"epoch": self.last.epoch, **self.last.metrics()}

    @property
    def seed(self) -> int:
        return self.config.search.seed

    @property
    def xi(self) -> float | None:
        return self.config.search.xi


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


def collapsed(genotype: Genotype, max_skip_connects: int | None) -> bool:
    """True when the normal cell has more than ``max_skip_connects`` skip connections (P-DARTS's guard against the
    collapse of long searches into parameter-free cells); None: nothing is refused."""
    return max_skip_connects is not None and count_ops(genotype, "normal", "skip_connect") > max_skip_connects


def select_top(
    results: Iterable[TrialResult],
    metric: str = "val_acc",
    mode: Mode = "max",
    k: int = 1,
    max_skip_connects: int | None = None,
) -> list[Candidate]:
    """The k best distinct genotypes of the complete trials whose cells have not collapsed (see :func:`collapsed`);
    ties go to the earlier trial name (a stable choice)."""
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
    complete = [r for r in complete if not collapsed(r.genotype, max_skip_connects)]
    if not complete:
        raise ValueError(
            f"every finished trial's normal cell has more than {max_skip_connects} skip_connect "
            "(sweep.max_skip_connects): the searches collapsed"
        )
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
    results: Sequence[TrialResult],
    candidates: Sequence[Candidate],
    metric: str = "val_acc",
    axes: Sequence[str] = ("search.seed", "search.xi"),
    max_skip_connects: int | None = None,
) -> list[dict[str, Any]]:
    """One row per trial: its grid values (``axes``, named by their field), its numbers, its collapse signals, its
    genotype, and whether (and as what rank) it was selected or why it was refused."""
    rank_of = {c.trial.trial: c.rank for c in candidates}
    same_as = {t: c.trial.trial for c in candidates for t in c.trials if t != c.trial.trial}
    rows = []
    for r in sorted(results, key=lambda r: r.trial):
        grid = {}
        for key in dict.fromkeys(("search.seed", "search.xi", *axes)):
            section, name = key.split(".")
            grid[name] = getattr(getattr(r.config, section), name)
        rows.append(
            {
                "trial": r.trial,
                **grid,
                "order": "second" if r.config.search.is_second_order() else "first",
                "epochs": r.last.epoch,
                "stopped_early": not r.complete,
                metric: r.metrics.get(metric),
                "skip_connects_normal": count_ops(r.genotype, "normal", "skip_connect"),
                "parameter_free_normal": count_ops(r.genotype, "normal"),
                "parameter_free_reduce": count_ops(r.genotype, "reduce"),
                "skip_weight_normal": r.last.skip_weight_normal,
                "collapsed": collapsed(r.genotype, max_skip_connects),
                "selected_rank": rank_of.get(r.trial),
                "same_genotype_as": same_as.get(r.trial),
                "genotype": str(r.genotype),
                "outputs": r.outputs,
            }
        )
    return rows


def write_selection(
    where: Location,
    results: Sequence[TrialResult],
    candidates: Sequence[Candidate],
    metric: str = "val_acc",
    axes: Sequence[str] = ("search.seed", "search.xi"),
    max_skip_connects: int | None = None,
) -> None:
    """``selection.csv`` and ``selection.json`` under ``where`` (a folder or a URI); the JSON also lists the chosen
    genotypes in rank order."""
    rows = selection_table(results, candidates, metric, axes, max_skip_connects)
    fieldnames: list[str] = []
    for row in rows:
        fieldnames += [key for key in row if key not in fieldnames]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames or ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    selected = [
        {
            "rank": c.rank,
            "trial": c.trial.trial,
            metric: c.metric,
            "trials": list(c.trials),
            "genotype": c.genotype.to_dict(),
        }
        for c in candidates
    ]
    where.write_text("selection.csv", buffer.getvalue())
    where.write_json("selection.json", {"metric": metric, "selected": selected, "trials": rows})


def select_and_publish(
    prepared: Prepared, trials: Sequence[TrialResult], sweep_name: str
) -> tuple[list[Candidate], Location]:
    """The top ``sweep.top_k`` distinct cells of a sweep's trials, by ``sweep.metric``, and where the table went
    (``<storage>/<sweep_name>/selection``). Raises ValueError when no trial can be selected."""
    sweep = prepared.config.sweep
    selected = select_top(trials, sweep.metric, sweep.mode, sweep.top_k, sweep.max_skip_connects)
    where = prepared.storage.join(sweep_name, "selection")
    write_selection(where, trials, selected, sweep.metric, sweep.axes(), sweep.max_skip_connects)
    return selected, where
