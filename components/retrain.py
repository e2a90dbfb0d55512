"""Retrain on Ray Train: the selected cells briefly on held-out data, then the champion in full, tested once.

The paper's protocol, never selection on the test set: every selected genotype's evaluation network is trained
from scratch for ``champion.candidate_epochs`` with ``retrain.val_fraction`` of the training set held out; the
candidate with the best validation accuracy is the champion; the champion (and any ``champion.baselines`` from the
genotype zoo, for a comparison inside the same experiment) is trained with the full ``retrain`` recipe on the
whole training set and evaluated once, on the test split. Each retrain is a data-parallel Train run with the
search's plumbing (DDP, optional global batch norm, checkpoints every epoch, restarts after a lost worker, resume
by name); ``champion.max_concurrent`` retrains run at once as Ray tasks.

The genotype a retrain trains is its config's ``retrain.genotype`` (the candidates' and champion's configs carry
their searched cell there, as JSON), so the config logged with a retrain says exactly what it trained.

    python -m components.retrain --config digits --set retrain.genotype=DARTS_V2 --set ray.cpus_per_worker=0.5

Outputs, in ``<storage_path>/<name>/outputs/``: result.json (the epoch records and the network spec), model.pt (the
state_dict, loadable with ``weights_only=True``), spec.json (the NetworkSpec that rebuilds and feeds the network),
genotype.json, cells.png. A run whose result.json exists is finished: asking for it again returns it without
starting workers.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from components.config import PipelineConfig, check_champion_choice, retrain_label
from components.driver import Prepared
from components.storage import Location
from components.trainer import (
    StageCallback,
    StageError,
    fit,
    report_epoch,
    restore_latest,
    root_cause,
    stage_main,
    start_worker,
    watch,
    worker_console,
)
from nas.eval_model import NetworkSpec
from nas.genotypes import Genotype, count_ops, parse_genotype, random_genotypes
from nas.retrain import RetrainEpoch

RESULT_FILE = "result.json"
WEIGHTS_FILE = "model.pt"
SPEC_FILE = "spec.json"
HISTORY_FILE = "history.json"
ROLES = ("retrain", "candidate", "random", "champion", "baseline")


class RetrainStageResult(BaseModel):
    """One finished retrain: what was trained (its spec), how it went epoch by epoch, where its weights are."""

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    name: str
    role: str
    spec: NetworkSpec
    history: list[RetrainEpoch]
    outputs: str  # folder or URI of the published files
    resumed: bool = False  # True when the finished result was read back rather than trained now
    started: float | None = None  # wall-clock seconds since the epoch, when the training started and ended
    ended: float | None = None

    @property
    def genotype(self) -> Genotype:
        return self.spec.genotype

    @property
    def last(self) -> RetrainEpoch:
        return self.history[-1]

    @property
    def location(self) -> Location:
        return Location(self.outputs)


# --- inside each worker ---------------------------------------------------------------------------------------------
def _retrain_worker(loop_config: dict[str, Any]) -> None:
    import torch

    from nas.artifacts import write_json, write_text_atomic
    from nas.plot import save_cells
    from nas.retrain import RetrainRun

    config, callback, context = start_worker(loop_config)
    rank, world = context.rank, context.world_size
    console = worker_console(loop_config)
    run = RetrainRun(config, parse_genotype(config.retrain.genotype), context)
    watch(context, callback, run.network)
    restore_latest(run, context, "retrain")

    def on_epoch(report: RetrainEpoch, retrain_run: RetrainRun) -> None:
        callback.on_epoch_end(rank, world, report.epoch, retrain_run.network)
        if context.is_main:
            console.epoch(report.epoch, config.retrain.epochs, report.epoch_seconds)

        def write_files(directory: Path) -> None:
            write_json(directory / HISTORY_FILE, [e.model_dump(mode="json") for e in retrain_run.history])
            write_text_atomic(directory / SPEC_FILE, retrain_run.spec.model_dump_json(indent=2) + "\n")
            write_text_atomic(directory / "genotype.json", retrain_run.genotype.to_json() + "\n")
            torch.save(retrain_run.network.state_dict(), directory / WEIGHTS_FILE)
            save_cells(retrain_run.genotype, directory / "cells.png", title=loop_config["role"])

        due = report.epoch % config.ray.checkpoint_every == 0 or report.epoch == config.retrain.epochs
        report_epoch(report, due=due, rank=rank, world=world, state=retrain_run.state_dict, write_files=write_files)

    run.run(on_epoch)


# --- the driver -----------------------------------------------------------------------------------------------------
def read_result(outputs: Location) -> RetrainStageResult | None:
    """The published result of a finished retrain, or None."""
    text = outputs.read_text(RESULT_FILE)
    return None if text is None else RetrainStageResult.model_validate_json(text).model_copy(update={"resumed": True})


def run_retrain_stage(
    prepared: Prepared,
    *,
    name: str | None = None,
    role: str = "retrain",
    callback: StageCallback | None = None,
    label: str | None = None,
) -> RetrainStageResult:
    """Train the config's ``retrain.genotype`` data-parallel with the ``retrain`` recipe; finished runs are read
    back, interrupted ones resume from their last checkpoint. The workers' lines name it by ``label`` (default: the
    run's name)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    config = prepared.config
    genotype = parse_genotype(config.retrain.genotype)
    name = name or f"{config.name}-retrain"
    outputs = prepared.storage.join(name, "outputs")
    done = read_result(outputs)
    if done is not None:
        if done.genotype.canonical() != genotype.canonical():
            raise StageError(f"retrain {name!r} already holds another genotype; pick another name")
        return done
    loop_config = {
        "config": config.model_dump(mode="json"),
        "callback": callback,
        "role": role,
        "console": prepared.console,
        "label": label or name,
    }
    started = time.time()
    result = fit(_retrain_worker, loop_config, prepared, name=name, label="retrain")
    with result.checkpoint.as_directory() as directory, tempfile.TemporaryDirectory() as tmp:
        checkpoint = Location(directory)
        stage = RetrainStageResult(
            name=name,
            role=role,
            spec=NetworkSpec.model_validate_json(checkpoint.read_text(SPEC_FILE)),
            history=[RetrainEpoch.model_validate(row) for row in checkpoint.read_json(HISTORY_FILE)],
            outputs=outputs.uri,
            started=started,
            ended=time.time(),
        )
        for file in (HISTORY_FILE, "genotype.json", SPEC_FILE, WEIGHTS_FILE, "cells.png"):
            (Path(tmp) / file).write_bytes((Path(directory) / file).read_bytes())
        (Path(tmp) / RESULT_FILE).write_text(stage.model_dump_json(indent=2) + "\n")
        outputs.publish(Path(tmp), marker=RESULT_FILE)  # result.json last: it says the rest is there
    return stage


# --- the champion ---------------------------------------------------------------------------------------------------
@dataclass
class RetrainJob:
    """One retrain to run: its name, role, the prepared config (``retrain.genotype`` is its cell) and the search
    trial the cell came from (None for zoo baselines)."""

    name: str
    role: str
    prepared: Prepared
    source: str | None = None
    label: str | None = None  # how its lines and its MLflow run name it (``retrain champion``)

    @property
    def config(self) -> PipelineConfig:
        return self.prepared.config


Trained = tuple[RetrainJob, RetrainStageResult]


@dataclass
class ChampionResult:
    """The brief retrains (searched candidates best first, random cells in draw order), the champion and the
    baselines trained in full (zoo cells, then the best random cell), and where each searched cell ranks."""

    candidates: list[Trained]
    champion: Trained
    baselines: list[Trained] = field(default_factory=list)
    randoms: list[Trained] = field(default_factory=list)
    ranking: list[dict[str, Any]] = field(default_factory=list)

    @property
    def trained(self) -> list[Trained]:
        """Every retrain: the brief ones (candidates, random cells), the champion, the baselines."""
        return [*self.candidates, *self.randoms, self.champion, *self.baselines]


def random_percentile(value: float, random_values: list[float]) -> float:
    """Where ``value`` sits among the random cells' values, in percent: 100 beats them all, 50 is the median
    random cell (ties count half), as in the random-search comparisons of Li & Talwalkar and Yu et al."""
    if not random_values:
        return math.nan
    below = sum(_score(v) < _score(value) for v in random_values)
    ties = sum(_score(v) == _score(value) for v in random_values)
    return 100.0 * (below + 0.5 * ties) / len(random_values)


def ranking_table(searched: list[Trained], randoms: list[Trained]) -> list[dict[str, Any]]:
    """One row per brief retrain, best validation accuracy first: searched cells with their percentile among the
    random cells (trained with the same budget and split), then where every cell ranks overall."""
    random_values = [stage.last.eval_acc for _, stage in randoms]
    rows = []
    for job, stage in [*searched, *randoms]:
        genotype = stage.genotype
        rows.append(
            {
                "retrain": job.name,
                "kind": "random" if job.role == "random" else "searched",
                "source": job.source,
                "val_acc": stage.last.eval_acc,
                "random_percentile": random_percentile(stage.last.eval_acc, random_values)
                if job.role != "random"
                else None,
                "parameter_free_normal": count_ops(genotype, "normal"),
                "genotype": str(genotype),
            }
        )
    rows.sort(key=lambda row: -_score(row["val_acc"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def retrain_config(
    config: PipelineConfig, genotype: Genotype, *, epochs: int | None = None, val_fraction: float | None = None
) -> PipelineConfig:
    """``config`` retraining ``genotype`` (as JSON in ``retrain.genotype``), optionally with another epoch count
    (the candidates' brief recipe) or held-out share (0 for the full recipe: all of train, tested once)."""
    update: dict[str, Any] = {"genotype": genotype.to_json()}
    if epochs is not None:
        update["epochs"] = epochs
    if val_fraction is not None:
        update["val_fraction"] = val_fraction
    return config.model_copy(update={"retrain": config.retrain.model_copy(update=update)})


def run_jobs(jobs: list[RetrainJob], max_concurrent: int, trial_cpus: float) -> list[RetrainStageResult]:
    """Run retrains one after another, or ``max_concurrent`` at a time as Ray tasks; results in job order."""
    if max_concurrent <= 1 or len(jobs) <= 1:
        return [run_retrain_stage(j.prepared, name=j.name, role=j.role, label=j.label) for j in jobs]
    import ray

    task = ray.remote(num_cpus=trial_cpus, max_retries=0)(run_retrain_stage)
    results: dict[int, RetrainStageResult] = {}
    pending: dict[Any, int] = {}
    queue = list(enumerate(jobs))
    while queue or pending:
        while queue and len(pending) < max_concurrent:
            index, job = queue.pop(0)
            pending[task.remote(job.prepared, name=job.name, role=job.role, label=job.label)] = index
        ready, _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(ready[0])
        try:
            results[index] = ray.get(ready[0])
        except ray.exceptions.RayTaskError as err:
            raise StageError(root_cause(err)) from None
    return [results[i] for i in range(len(jobs))]


def choose_champion(
    prepared: Prepared, candidates: list[tuple[str, Genotype]], *, name: str, log: Callable[[str], None] = print
) -> ChampionResult:
    """Brief retrains of the candidates (when there is a choice to make or random cells to rank them against),
    then the champion, the zoo baselines and the best random cell trained in full and tested once."""
    config = prepared.config
    if not candidates:
        raise StageError("no candidate genotypes to retrain")
    randoms = random_genotypes(
        config.champion.random_baselines, config.champion.random_seed, config.search.primitives, config.search.nodes
    )
    if len(candidates) > 1 or randoms:
        check_champion_choice(config)
    brief = config.champion.candidate_epochs

    def briefly(genotype: Genotype) -> Prepared:
        return prepared.with_config(retrain_config(config, genotype, epochs=brief))

    def job(key: str, role: str, job_prepared: Prepared, source: str | None = None) -> RetrainJob:
        return RetrainJob(f"{name}-{key}", role, job_prepared, source, retrain_label(f"{name}-{key}", name))

    jobs = [job(f"candidate-{i}", "candidate", briefly(g), source) for i, (source, g) in enumerate(candidates, 1)]
    random_jobs = [job(f"random-{i}", "random", briefly(g)) for i, g in enumerate(randoms, start=1)]
    ranked: list[Trained] = []
    random_pairs: list[Trained] = []
    if len(jobs) > 1 or random_jobs:
        extra = f" and {len(random_jobs)} random cells" if random_jobs else ""
        log(f"retraining {len(jobs)} candidate(s){extra} for {brief} epochs on held-out data")
        results = run_jobs(jobs + random_jobs, config.champion.max_concurrent, config.champion.trial_cpus)
        ranked = sorted(zip(jobs, results), key=lambda pair: -_score(pair[1].last.eval_acc))
        random_pairs = list(zip(random_jobs, results[len(jobs) :]))
        best = ranked[0][0]
    else:
        log("one candidate: it is the champion")
        best = jobs[0]

    def full(genotype: Genotype) -> Prepared:
        return prepared.with_config(retrain_config(config, genotype, val_fraction=0.0))

    best_genotype = parse_genotype(best.config.retrain.genotype)
    finals = [job("champion", "champion", full(best_genotype), best.source)]
    finals += [job(f"baseline-{zoo}", "baseline", full(parse_genotype(zoo))) for zoo in config.champion.baselines]
    if random_pairs:  # the paper's random-search baseline: the best random cell on validation, in full
        best_random = max(random_pairs, key=lambda pair: _score(pair[1].last.eval_acc))[1].genotype
        finals.append(job("baseline-random", "baseline", full(best_random)))
    log(f"training the champion{' and baselines' if len(finals) > 1 else ''} for {config.retrain.epochs} epochs")
    results = run_jobs(finals, config.champion.max_concurrent, config.champion.trial_cpus)
    pairs = list(zip(finals, results))
    return ChampionResult(
        candidates=ranked,
        champion=pairs[0],
        baselines=pairs[1:],
        randoms=random_pairs,
        ranking=ranking_table(ranked, random_pairs) if random_pairs else [],
    )


def _score(value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def main(argv: list[str] | None = None) -> int:
    def show(config: PipelineConfig, result: RetrainStageResult) -> None:
        print(f"{result.last.eval_split} accuracy: {result.last.eval_acc:.2%}")
        print(f"outputs: {result.outputs}")

    return stage_main("python -m components.retrain", __doc__, "retrain", run_retrain_stage, show, argv)


if __name__ == "__main__":
    sys.exit(main())
