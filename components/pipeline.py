"""The pipeline's four stages with their MLflow records, as both compositions call them: pipelines/full.py (one
driver) and pipelines/kubeflow.py (one Kubeflow step per stage, each on its own pod).

Every stage is idempotent by name: the sweep restores, finished retrains are read back, MLflow runs are found by
their tags. So a stage that runs again (a rerun of the driver, a retried Kubeflow step) adds no run and no model
version, and a later stage needs only names and small records from the earlier ones, never their Python objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from mlflow.entities.model_registry import ModelVersion

from components.config import PipelineConfig, retrain_label, search_label, trial_configs
from components.console import WorkPlan
from components.driver import Prepared
from components.retrain import ChampionResult, RetrainJob, RetrainStageResult, choose_champion
from components.search import read_history
from components.select import Candidate, TrialResult, select_and_publish
from components.sweep import run_sweep
from components.tracking import Lineage, LiveSearchLog, resolve_tracking_uri
from components.trainer import StageError
from nas.config import RetrainConfig, SearchConfig
from nas.data import DataSummary
from nas.eval_model import EvalNetwork, count_parameters, forward_flops, image_flops
from nas.genotypes import GENOTYPES, Genotype, node_formulas, parse_genotype
from nas.search_model import SearchNetwork


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


TRAINING_PASS = 3.0  # a forward and a backward pass cost about three forward passes
SEARCH_PASSES = {"first": 2.0, "second": 5.0}  # training passes per search step over one batch: first order the α
# step on the α batch and the weight step; second order also the virtual step and the two Hessian gradients


def _images_per_epoch(rows: int, batch: int, workers: int, steps_cap: int | None) -> float:
    """Images one epoch processes over all workers: every batch of ``rows``, or ``steps_cap`` steps at most."""
    steps = max(1, math.ceil(rows / (batch * workers)))
    return float(min(steps, steps_cap) if steps_cap else steps) * batch * workers


def supernet_flops(search: SearchConfig, data: DataSummary) -> float:
    """Forward FLOPs per image of the supernet ``search`` trains, counted on the meta device (nothing computed)."""
    with torch.device("meta"):
        network = SearchNetwork.from_config(search, data.in_channels, data.num_classes)
    return float(image_flops(network, data.in_channels, data.image_size))


def cell_flops(genotype: Genotype, retrain: RetrainConfig, data: DataSummary) -> float:
    """Forward FLOPs per image of the evaluation network ``retrain`` builds from ``genotype`` (meta device)."""
    with torch.device("meta"):
        network = EvalNetwork(
            genotype,
            in_channels=data.in_channels,
            channels=retrain.channels,
            num_classes=data.num_classes,
            layers=retrain.layers,
            auxiliary=retrain.auxiliary,
            stem=retrain.stem,
        )
    return float(image_flops(network, data.in_channels, data.image_size))


def work_plan(prepared: Prepared) -> WorkPlan:
    """The pipeline's work for its progress line, in forward FLOPs: every search trial (its training passes, and the
    supernet on the α half after each epoch), the brief retrains (candidates when there is a choice or random cells
    to rank against, random cells: training, then validation each epoch) and the full ones (champion, baselines:
    training, then the test split once). Cells not chosen yet are costed as the config's own retrain cell, so the
    ETA is an estimate; without a data summary (no preflight) the plan is empty and no ETA shows."""
    config, data = prepared.config, prepared.data
    plan = WorkPlan()
    if data is None:
        return plan
    rows, workers, retrain, champion = data.train_rows, config.ray.num_workers, config.retrain, config.champion
    supernets: dict[tuple[Any, ...], float] = {}  # trials of a seed or ξ sweep share one supernet: count it once
    for trial in trial_configs(config):
        s = trial.search
        shape = (s.channels, s.layers, s.nodes, tuple(s.primitives), s.stem_multiplier, s.partial_channels)
        if shape not in supernets:
            supernets[shape] = supernet_flops(s, data)
        half = round(rows * s.train_portion)
        passes = SEARCH_PASSES["first" if s.xi == 0 else "second"]
        trained = _images_per_epoch(half, s.batch_size, workers, s.steps_per_epoch) * passes * TRAINING_PASS
        plan.searches[search_label(trial)] = (trained + rows - half) * s.epochs * supernets[shape]
    held_out = round(rows * retrain.val_fraction)
    brief = (
        _images_per_epoch(rows - held_out, retrain.batch_size, workers, retrain.steps_per_epoch) * TRAINING_PASS
        + held_out
    ) * champion.candidate_epochs
    full = _images_per_epoch(rows, retrain.batch_size, workers, retrain.steps_per_epoch) * TRAINING_PASS
    full = full * retrain.epochs + data.test_rows
    cell = cell_flops(parse_genotype(retrain.genotype), retrain, data)
    randoms = champion.random_baselines
    if config.sweep.top_k > 1 or randoms:
        plan.retrains["candidate"] = (config.sweep.top_k, brief * cell)
    if randoms:
        plan.retrains["random"] = (randoms, brief * cell)
    plan.retrains["champion"] = (1, full * cell)
    baselines = [cell_flops(GENOTYPES[name], retrain, data) for name in champion.baselines] + [cell] * (randoms > 0)
    if baselines:
        plan.retrains["baseline"] = (len(baselines), full * sum(baselines) / len(baselines))
    return plan


def sweep_stage(prepared: Prepared, lineage: Lineage, name: str) -> tuple[list[TrialResult], dict[str, str]]:
    """Run (or restore) the sweep ``<name>-sweep``, logging every trial to MLflow as it runs and completing its run
    afterwards: (trials, their search run ids)."""
    live = LiveSearchLog(lineage.tracking_uri, lineage.experiment, lineage.pipeline)
    sweep = run_sweep(prepared, name=f"{name}-sweep", tune_callbacks=[live])
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
    trials: Sequence[TrialResult] = (),
) -> tuple[ChampionResult, dict[str, str]]:
    """Choose the champion among ``(search trial, cell)`` candidates, train it and the baselines in full, log each
    retrain and the comparison of every cell (``trials``: the sweep's, for the search side of that table):
    (the result, retrain run ids by retrain name)."""
    champion = choose_champion(prepared, candidates, name=name, log=log)
    percentile = {row["retrain"]: row["random_percentile"] for row in champion.ranking if row["kind"] == "searched"}
    runs = {}
    for job, stage in champion.trained:
        extra = {"random_percentile": percentile[job.name]} if job.name in percentile else {}
        runs[job.name] = log_retrain(lineage, job, stage, extra)
    if champion.ranking:
        lineage.log_ranking(champion.ranking)
    lineage.log_comparison(comparison_rows(champion, trials, name))
    return champion, runs


def log_retrain(lineage: Lineage, job: RetrainJob, stage: RetrainStageResult, extra: dict | None = None) -> str:
    """One retrain's MLflow run (found again when it exists): its epochs, when it ran, and ``extra`` numbers."""
    return lineage.log_retrain(
        job.name, job.role, job.config, stage.history, job.source, extra or {}, stage.started, stage.ended
    )


def comparison_rows(
    champion: ChampionResult, trials: Sequence[TrialResult] = (), pipeline: str = ""
) -> list[dict[str, Any]]:
    """One row per trained cell (and per search trial whose cell was not retrained): where it came from (trial,
    seed, ξ, supernet accuracy), its cell node by node, its retrained accuracy, parameters and FLOPs."""
    by_trial = {trial.trial: trial for trial in trials}
    costs: dict[str, tuple[int, int]] = {}
    rows: list[dict[str, Any]] = []

    def source(trial: TrialResult | None) -> dict[str, Any]:
        if trial is None:
            return {"trial": None, "seed": None, "xi": None, "supernet_val_acc": None}
        xi = trial.xi
        return {
            "trial": search_label(trial.config),
            "seed": trial.seed,
            "xi": "lr" if xi is None else xi,
            "supernet_val_acc": trial.last.val_acc,
        }

    def cells(genotype: Genotype) -> dict[str, str]:
        return {cell: "; ".join(node_formulas(genotype, cell)) for cell in ("normal", "reduce")}

    for job, stage in champion.trained:
        key = stage.spec.model_dump_json()
        if key not in costs:
            network = EvalNetwork.from_spec(stage.spec)
            costs[key] = (count_parameters(network), forward_flops(network, stage.spec))
        rows.append(
            {
                "retrain": retrain_label(job.name, pipeline),
                "role": job.role,
                **source(by_trial.get(job.source or "")),
                "eval_split": stage.last.eval_split,
                "retrained_acc": stage.last.eval_acc,
                "epochs": stage.last.epoch,
                "params": costs[key][0],
                "flops": costs[key][1],
                **cells(stage.genotype),
            }
        )
    retrained = {job.source for job, _ in champion.trained if job.source}
    for trial in sorted(trials, key=lambda t: t.trial):
        if trial.trial not in retrained:
            rows.append({"retrain": None, "role": "search", **source(trial), **cells(trial.genotype)})
    return rows


def register_stage(
    lineage: Lineage, champion_run: str, stage: RetrainStageResult, name: str, source: str | None
) -> ModelVersion:
    """Register the champion's network (alias ``champion``) with its lineage."""
    return lineage.register_champion(champion_run, stage.location, stage.spec, name, source_search_run=source)
