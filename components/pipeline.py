"""The pipeline's four stages with their MLflow records, as both compositions call them: pipelines/full.py (one
driver) and pipelines/kubeflow.py (one Kubeflow step per stage, each on its own pod).

Every stage is idempotent by name: the sweep restores, finished retrains are read back, MLflow runs are found by
their tags. So a stage that runs again (a rerun of the driver, a retried Kubeflow step) adds no run and no model
version, and a later stage needs only names and small records from the earlier ones, never their Python objects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mlflow.entities.model_registry import ModelVersion

from components.config import PipelineConfig
from components.driver import Prepared
from components.retrain import ChampionResult, RetrainJob, RetrainStageResult, choose_champion
from components.search import read_history
from components.select import Candidate, TrialResult, select_and_publish
from components.sweep import run_sweep
from components.tracking import Lineage, resolve_tracking_uri
from components.trainer import StageError
from nas.genotypes import Genotype


@dataclass
class Records:
    """The MLflow run ids a pipeline's stages logged, by trial or retrain name."""

    pipeline_run: str
    search_runs: dict[str, str] = field(default_factory=dict)
    selection_run: str | None = None
    retrain_runs: dict[str, str] = field(default_factory=dict)


def open_lineage(config: PipelineConfig, name: str) -> Lineage:
    """The pipeline's MLflow writer, its parent run found or created (config as params, data as input)."""
    lineage = Lineage(resolve_tracking_uri(config.mlflow.tracking_uri), config.mlflow.experiment or name, name)
    lineage.pipeline_run(config)
    return lineage


def model_name(config: PipelineConfig, pipeline: str) -> str:
    """The registered model's name: ``mlflow.model_name``, else the pipeline's name, so two pipelines of one config
    under different names never move each other's ``champion`` alias."""
    return config.mlflow.model_name or pipeline


def sweep_stage(prepared: Prepared, lineage: Lineage, name: str) -> tuple[list[TrialResult], dict[str, str]]:
    """Run (or restore) the sweep ``<name>-sweep`` and log every trial: (trials, their search run ids)."""
    sweep = run_sweep(prepared, name=f"{name}-sweep")
    runs = {}
    for trial in sweep.trials:
        history = (read_history(trial.location) if trial.location is not None else None) or []
        runs[trial.trial] = lineage.log_search_trial(trial, history)
    return sweep.trials, runs


def select_stage(prepared: Prepared, lineage: Lineage, trials: list[TrialResult], name: str) -> list[Candidate]:
    """Rank the trials, keep the top ``sweep.top_k`` distinct cells, publish and log the table."""
    try:
        selected, where = select_and_publish(prepared, trials, f"{name}-sweep")
    except ValueError as err:
        raise StageError(f"selection of {name!r}: {err}") from None
    lineage.log_selection(where, selected, prepared.config.sweep.metric)
    return selected


def retrain_stage(
    prepared: Prepared,
    lineage: Lineage,
    candidates: list[tuple[str, Genotype]],
    name: str,
    log: Callable[[str], None] = print,
) -> tuple[ChampionResult, dict[str, str]]:
    """Choose the champion among ``(search trial, cell)`` candidates, train it and the baselines in full, log each
    retrain: (the result, retrain run ids by retrain name)."""
    champion = choose_champion(prepared, candidates, name=name, log=log)
    percentile = {row["retrain"]: row["random_percentile"] for row in champion.ranking if row["kind"] == "searched"}
    runs = {}
    for job, stage in champion.trained:
        extra = {"random_percentile": percentile[job.name]} if job.name in percentile else {}
        runs[job.name] = log_retrain(lineage, job, stage, extra)
    if champion.ranking:
        lineage.log_ranking(champion.ranking)
    return champion, runs


def log_retrain(lineage: Lineage, job: RetrainJob, stage: RetrainStageResult, extra: dict | None = None) -> str:
    """One retrain's MLflow run (found again when it exists), with its final numbers on its evaluation split."""
    split = stage.last.eval_split
    metrics = {f"final_{split}_acc": stage.last.eval_acc, f"final_{split}_loss": stage.last.eval_loss}
    return lineage.log_retrain(job.name, job.role, job.config, stage.history, job.source, metrics | (extra or {}))


def register_stage(
    lineage: Lineage, champion_run: str, stage: RetrainStageResult, name: str, source: str | None
) -> ModelVersion:
    """Register the champion's network (alias ``champion``) with its lineage."""
    return lineage.register_champion(champion_run, stage.location, stage.spec, name, source_search_run=source)
