"""Ray Tune sweep over seeds and ξ (optionally α lr, α weight decay, weight lr): one data-parallel search per trial.

The grid is written inside the pipeline config itself (``tune.grid_search`` at ``search.seed``, ``search.xi``, ...),
so Tune resolves each trial's config, the trial validates it again, and that config is what selection, retrain
and MLflow see. Each trial is a Tune function trainable that runs the Ray Train search stage (a ``TorchTrainer``);
its epoch records reach Tune through Train V2's ``TuneReportCallback``. ξ = 0 trials are first order, ξ = null or > 0
second order. When every trial has finished, ``python -m components.sweep`` ranks them and selects the top genotypes
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
from pathlib import PurePosixPath
from typing import Any

from components.config import PipelineConfig
from components.driver import Prepared
from components.search import publish_from_checkpoint, read_history, run_search_stage, search_outputs
from components.select import Candidate, TrialResult, select_and_publish
from components.storage import Location
from components.trainer import StageCallback, StageError, stage_main
from nas.search import SearchEpoch


@dataclass
class SweepResult:
    name: str
    trials: list[TrialResult]
    errors: list[str]  # one line per trial that failed


def _trial(params: dict[str, Any], sweep_name: str, callback: StageCallback | None = None) -> None:
    """One Tune trial: a whole data-parallel search on the trial's resolved config, reporting each epoch to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config = PipelineConfig.model_validate(params)  # the grid values Tune put in, validated again
    trial_id = tune.get_context().get_trial_id()
    if callback is not None:
        callback.on_trial_start(trial_id)
    run_search_stage(
        Prepared.trusted(config),
        name=f"{sweep_name}-{trial_id}",
        callback=callback,
        callbacks=[TuneReportCallback()],
    )


def param_space(config: PipelineConfig) -> dict[str, Any]:
    """The config as Tune's param space, each grid axis a ``tune.grid_search`` at the field it sets."""
    from ray import tune

    space = config.model_dump(mode="json")
    for key, values in config.sweep.axes().items():
        section, field = key.split(".")
        space[section][field] = tune.grid_search(list(values))
    return space


def concurrent_trials(config: PipelineConfig, cluster_cpus: float) -> int:
    """How many searches fit at once: each needs its workers' CPUs plus its own driver's."""
    if config.sweep.max_concurrent_trials:
        return config.sweep.max_concurrent_trials
    per_trial = config.ray.num_workers * config.ray.cpus_per_worker + config.sweep.trial_cpus
    return max(1, int(math.floor(cluster_cpus / per_trial + 1e-9)))


def run_sweep(prepared: Prepared, *, name: str | None = None, callback: StageCallback | None = None) -> SweepResult:
    """Run or restore the sweep, then select the top genotypes."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    config = prepared.config
    name = name or f"{config.name}-sweep"
    experiment = prepared.storage.join(name)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, sweep_name=name, callback=callback), {"CPU": config.sweep.trial_cpus}
    )
    if tune.Tuner.can_restore(experiment.uri):
        print(f"restoring sweep {name!r} from {experiment}", flush=True)
        tuner = tune.Tuner.restore(experiment.uri, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = None
        if config.sweep.scheduler == "asha":
            scheduler = ASHAScheduler(
                time_attr="epoch",
                max_t=config.search.epochs,
                grace_period=config.sweep.asha_grace_period,
                reduction_factor=config.sweep.asha_reduction_factor,
            )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(config),
            tune_config=tune.TuneConfig(
                metric=config.sweep.metric,
                mode=config.sweep.mode,
                scheduler=scheduler,
                max_concurrent_trials=concurrent_trials(config, ray.cluster_resources().get("CPU", 1.0)),
            ),
            run_config=tune.RunConfig(name=name, storage_path=prepared.storage.uri),
        )
    grid = tuner.fit()
    trials, errors = [], []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or (PurePosixPath(result.path).name if result.path else "?"))
        if result.error is not None or "genotype" not in metrics:
            errors.append(f"{trial_id}: {str(result.error).strip().splitlines()[0] if result.error else 'no result'}")
            continue
        trial_config = PipelineConfig.model_validate(result.config)
        last = SearchEpoch.model_validate({key: metrics[key] for key in SearchEpoch.model_fields})
        search = prepared.storage.join(f"{name}-{trial_id}")  # the trial's search run: checkpoints and outputs
        outputs = search_outputs(prepared.storage, f"{name}-{trial_id}")
        if read_history(outputs) is None and not _publish_stopped(search, outputs, metrics, trial_config):
            outputs = None
        trials.append(
            TrialResult(
                trial=trial_id,
                config=trial_config,
                last=last,
                outputs=None if outputs is None else outputs.uri,
                complete=last.epoch >= trial_config.search.epochs,
            )
        )
    if not trials:
        raise StageError(f"sweep {name!r}: no trial finished ({'; '.join(errors) or 'no trials'})")
    return SweepResult(name, trials, errors)


def _publish_stopped(search: Location, outputs: Location, metrics: dict[str, Any], config: PipelineConfig) -> bool:
    """Publish a trial's outputs from its last checkpoint when Tune stopped it before it could; False if none."""
    checkpoint = metrics.get("checkpoint_path")
    if not checkpoint:
        return False
    publish_from_checkpoint(search.join(PurePosixPath(checkpoint).name).uri, outputs, config)
    return True


def sweep_and_select(
    prepared: Prepared, *, name: str | None = None, callback: StageCallback | None = None
) -> tuple[SweepResult, list[Candidate], Location]:
    """The sweep, then the selection of its trials (what ``python -m components.sweep`` runs)."""
    sweep = run_sweep(prepared, name=name, callback=callback)
    try:
        selected, where = select_and_publish(prepared, sweep.trials, sweep.name)
    except ValueError as err:
        raise StageError(f"sweep {sweep.name!r}: {err}") from None
    return sweep, selected, where


def main(argv: list[str] | None = None) -> int:
    def show(config: PipelineConfig, result: tuple[SweepResult, list[Candidate], Location]) -> None:
        sweep, selected, where = result
        for candidate in selected:
            metric = f"{config.sweep.metric}={candidate.metric:.4f}"
            print(f"#{candidate.rank} {candidate.trial.trial} {metric} {candidate.genotype}")
        print(f"selection: {where}")
        for error in sweep.errors:
            print(f"failed trial {error}", file=sys.stderr)

    return stage_main("python -m components.sweep", __doc__, "sweep", sweep_and_select, show, argv)


if __name__ == "__main__":
    sys.exit(main())
