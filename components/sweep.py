"""Ray Tune sweep over seeds and ξ (optionally α lr, α weight decay, weight lr): one data-parallel search per trial.

Each trial is a Tune function trainable that runs the Ray Train search stage (a ``TorchTrainer``); its per-epoch
metrics reach Tune through Train V2's ``TuneReportCallback``. ξ = 0 trials are first order, ξ = null or > 0
second order. When every trial has finished, the trials are ranked and the top genotypes selected
(components/select.py); the table lands in ``<storage>/<name>/selection/``.

    python -m components.sweep --config digits --set sweep.seeds=[1,2] --set sweep.xi=[0,null] \
        --set ray.cpus_per_worker=0.5

Resumable: if the driver dies, the same command restores the experiment; finished trials are not rerun and
unfinished ones continue from their search checkpoints. ``sweep.scheduler=asha`` stops searches whose
validation accuracy trails early (useful when many trials run long searches; with few, short trials it only adds
noise, since DARTS's supernet accuracy early in the search predicts the final cell poorly).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from components.config import PipelineConfig, with_absolute_paths
from components.search import (
    StageError,
    check_data,
    check_resources,
    cluster_capacity,
    ensure_ray,
    outputs_exist,
    publish_from_checkpoint,
    run_search_stage,
    storage_root,
)
from components.select import Candidate, TrialResult, select_top, write_selection
from components.trainer import stage_main
from nas.genotypes import parse_genotype

GRID_AXES = {"seeds": "seed", "xi": "xi", "alpha_lr": "alpha_lr", "alpha_weight_decay": "alpha_weight_decay",
             "w_lr": "w_lr"}  # fmt: skip


@dataclass
class SweepResult:
    name: str
    trials: list[TrialResult]
    selected: list[Candidate]
    selection_csv: str
    selection_json: str
    errors: list[str]


def trial_config(base: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """The base config with this trial's grid values put into the search section (validated again)."""
    data = base.model_dump(mode="json")
    for axis in GRID_AXES.values():
        if axis in params:
            data["search"][axis] = params[axis]
    return PipelineConfig.model_validate(data)


def _trial(params: dict[str, Any]) -> None:
    """One Tune trial: a whole data-parallel search, reporting each epoch to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config = trial_config(PipelineConfig.model_validate(params["config"]), params)
    trial_id = tune.get_context().get_trial_id()
    start_log = (params.get("hooks") or {}).get("start_log")
    if start_log:  # test-only: which trials (re)started
        with open(start_log, "a") as f:
            f.write(f"{trial_id}\n")
    run_search_stage(config, name=f"{params['sweep_name']}-{trial_id}", callbacks=[TuneReportCallback()])


def _param_space(config: PipelineConfig, name: str, hooks: dict[str, Any] | None) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {"config": config.model_dump(mode="json"), "sweep_name": name, "hooks": hooks or {}}
    for field, axis in GRID_AXES.items():
        values = getattr(config.sweep, field)
        if values:
            space[axis] = tune.grid_search(list(values))
    return space


def concurrent_trials(config: PipelineConfig, cluster_cpus: float) -> int:
    """How many searches fit at once: each needs its workers' CPUs plus its own driver's."""
    if config.sweep.max_concurrent_trials:
        return config.sweep.max_concurrent_trials
    per_trial = config.ray.num_workers * config.ray.cpus_per_worker + config.sweep.trial_cpus
    return max(1, int(math.floor(cluster_cpus / per_trial + 1e-9)))


def run_sweep(config: PipelineConfig, *, name: str | None = None, hooks: dict[str, Any] | None = None) -> SweepResult:
    """Run or restore the sweep, then select the top genotypes."""
    config = with_absolute_paths(config)
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    check_data(config)
    ensure_ray(config)
    cpus, gpus = cluster_capacity()
    check_resources(config, cpus, gpus)
    name = name or f"{config.name}-sweep"
    storage = storage_root(config)
    experiment = f"{storage.rstrip('/')}/{name}"
    trainable = tune.with_resources(_trial, {"CPU": config.sweep.trial_cpus})
    if tune.Tuner.can_restore(experiment):
        print(f"restoring sweep {name!r} from {experiment}", flush=True)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = None
        if config.sweep.scheduler == "asha":
            scheduler = ASHAScheduler(
                time_attr="epoch", max_t=config.search.epochs, grace_period=config.sweep.asha_grace_period,
                reduction_factor=config.sweep.asha_reduction_factor,
            )  # fmt: skip
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(config, name, hooks),
            tune_config=tune.TuneConfig(
                metric=config.sweep.metric,
                mode=config.sweep.mode,
                scheduler=scheduler,
                max_concurrent_trials=concurrent_trials(config, cpus),
            ),  # fmt: skip
            run_config=tune.RunConfig(name=name, storage_path=storage),
        )
    grid = tuner.fit()
    trials, errors = [], []
    for result in grid:
        trial_id = str((result.metrics or {}).get("trial_id") or (Path(result.path).name if result.path else "?"))
        if result.error is not None or not result.metrics or "genotype" not in result.metrics:
            errors.append(f"{trial_id}: {str(result.error).strip().splitlines()[0] if result.error else 'no result'}")
            continue
        params = result.config or {}
        search_dir = _search_dir(storage, name, result)
        if search_dir and not _ensure_outputs(search_dir, result.metrics, trial_config(config, params)):
            search_dir = None
        extra = {axis: params[axis] for axis in GRID_AXES.values() if axis not in ("seed", "xi") and axis in params}
        trials.append(TrialResult(
            trial=trial_id, seed=int(params.get("seed", config.search.seed)),
            xi=params.get("xi", config.search.xi),
            metrics={k: v for k, v in result.metrics.items() if isinstance(v, int | float)},
            genotype=parse_genotype(result.metrics["genotype"]), search_dir=search_dir,
            params=extra, complete=int(result.metrics.get("epoch", 0)) >= config.search.epochs,
        ))  # fmt: skip
    if not trials:
        raise StageError(f"sweep {name!r}: no trial finished ({'; '.join(errors) or 'no trials'})")
    try:
        selected = select_top(trials, metric=config.sweep.metric, mode=config.sweep.mode, k=config.sweep.top_k)
    except ValueError as err:
        raise StageError(f"sweep {name!r}: {err}") from None
    csv_path, json_path = write_selection(f"{experiment}/selection", trials, selected, config.sweep.metric)
    return SweepResult(name, trials, selected, csv_path, json_path, errors)


def _ensure_outputs(search_dir: str, metrics: dict[str, Any], config: PipelineConfig) -> bool:
    """Publish the trial's outputs from its last checkpoint when Tune stopped it before it could; False if none."""
    outputs = f"{search_dir}/outputs"
    if outputs_exist(outputs):
        return True
    checkpoint = metrics.get("checkpoint_path")
    if not checkpoint:
        return False
    publish_from_checkpoint(f"{search_dir}/{PurePosixPath(checkpoint).name}", outputs, config)
    return True


def _search_dir(storage: str, sweep_name: str, result: Any) -> str | None:
    """The trial's own search stage folder (its Train run is named after the trial); outputs/ holds its files."""
    trial_id = (result.metrics or {}).get("trial_id")
    return f"{storage.rstrip('/')}/{sweep_name}-{trial_id}" if trial_id else None


def main(argv: list[str] | None = None) -> int:
    def show(config: PipelineConfig, result: SweepResult) -> None:
        for candidate in result.selected:
            metric = f"{config.sweep.metric}={candidate.metric:.4f}"
            print(f"#{candidate.rank} {candidate.trial.trial} {metric} {candidate.genotype}")
        print(f"selection: {result.selection_csv}")
        for error in result.errors:
            print(f"failed trial {error}", file=sys.stderr)

    return stage_main("python -m components.sweep", __doc__, "sweep", run_sweep, show, argv)


if __name__ == "__main__":
    sys.exit(main())
