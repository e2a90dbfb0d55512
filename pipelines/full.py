"""The whole pipeline in one command: sweep -> select -> retrain -> register, with lineage in MLflow.

    python pipelines/full.py                                    # the quick preset (digits) on the local Ray
    python pipelines/full.py --config cifar10-cpu --set search.epochs=3
    python pipelines/full.py --config cifar10 --dry-run         # the resolved config and the plan, nothing run
    ray job submit --address http://<head>:8265 --working-dir . -- python pipelines/full.py --config cifar10

Presets live in nas/presets/ (quick, cifar10, cifar10-cpu, digits); any YAML path works too, and ``--set
section.field=value`` overrides are validated with the rest before anything starts. Rerunning with the same
``--name`` resumes: the sweep is restored, finished retrains are read back, and MLflow gains no new runs nor
model versions. Afterwards: ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__" and __package__ is None:  # `python pipelines/full.py` from a checkout not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import PipelineConfig, load_pipeline_config, trial_configs
from components.driver import Prepared, prepare
from components.retrain import ChampionResult, RetrainJob, RetrainStageResult, choose_champion
from components.search import read_history
from components.storage import StorageError
from components.sweep import SweepResult, run_sweep
from components.trainer import StageError
from nas.config import ConfigError, config_parser
from nas.data import DataError


@dataclass
class PipelineResult:
    name: str
    tracking_uri: str
    experiment: str
    pipeline_run: str
    sweep: SweepResult
    champion: ChampionResult
    model_name: str
    model_version: str
    metric: str = "val_acc"
    search_runs: dict[str, str] = field(default_factory=dict)
    retrain_runs: dict[str, str] = field(default_factory=dict)


def plan(config: PipelineConfig, name: str) -> list[str]:
    """What the pipeline will do, stage by stage, in words."""
    sweep, ray_cfg = config.sweep, config.ray
    axes = ", ".join(f"{key} in {values}" for key, values in sweep.axes().items())
    where = f"{ray_cfg.num_workers} {'GPU' if ray_cfg.use_gpu else 'CPU'} worker(s) each"
    searches = len(trial_configs(config))
    lines = [
        f"1. sweep {name}-sweep: {searches} searches ({axes}), {config.search.epochs} epochs, {where}",
        f"2. select the top {sweep.top_k} genotype(s) by {sweep.metric} ({sweep.mode})",
    ]
    if sweep.top_k > 1:
        lines.append(
            f"3. retrain each candidate for {config.champion.candidate_epochs} epochs, "
            f"{config.retrain.val_fraction:.0%} of train held out; the best is the champion"
        )
    else:
        lines.append("3. the single candidate is the champion")
    extra = f" and baselines {', '.join(config.champion.baselines)}" if config.champion.baselines else ""
    lines += [
        f"4. train the champion{extra} for {config.retrain.epochs} epochs on all of train; test once",
        f"5. register the champion as {config.mlflow.model_name or config.name!r} with alias 'champion'",
    ]
    return lines


def run_pipeline(prepared: Prepared, *, name: str | None = None, log: Any = print) -> PipelineResult:
    """Run (or resume) every stage and record it in MLflow; the driver is MLflow's only writer."""
    from components.tracking import Lineage, resolve_tracking_uri

    config = prepared.config
    name = name or config.name
    tracking_uri = resolve_tracking_uri(config.mlflow.tracking_uri)
    experiment = config.mlflow.experiment or name
    model_name = config.mlflow.model_name or config.name
    lineage = Lineage(tracking_uri, experiment=experiment, pipeline=name)
    pipeline_run = lineage.pipeline_run(config)
    log(f"[pipeline] {name}: MLflow run {pipeline_run} in experiment {experiment!r} at {tracking_uri}")
    try:
        log("[pipeline] 1/4 sweep")
        sweep = run_sweep(prepared, name=f"{name}-sweep")
        search_runs = {}
        for trial in sweep.trials:
            history = (read_history(trial.outputs) if trial.outputs is not None else None) or []
            search_runs[trial.trial] = lineage.log_search_trial(trial, history)
        log("[pipeline] 2/4 selection")
        lineage.log_selection(sweep.selection, sweep.selected, config.sweep.metric)
        log("[pipeline] 3/4 retrain")
        candidates = [(c.trial.trial, c.genotype) for c in sweep.selected]
        champion = choose_champion(prepared, candidates, name=name, log=lambda line: log(f"[pipeline] {line}"))
        retrain_runs: dict[str, str] = {}

        def record(job: RetrainJob, stage: RetrainStageResult) -> str:
            split = stage.last.eval_split
            metrics = {f"final_{split}_acc": stage.last.eval_acc, f"final_{split}_loss": stage.last.eval_loss}
            run_id = lineage.log_retrain(job.name, job.role, job.config, stage.history, job.source, metrics)
            retrain_runs[job.name] = run_id
            return run_id

        for job, stage in champion.candidates:
            record(job, stage)
        champion_run = record(*champion.champion)
        for job, stage in champion.baselines:
            record(job, stage)
        log("[pipeline] 4/4 register")
        job, stage = champion.champion
        version = lineage.register_champion(
            champion_run, stage.location, stage.spec, model_name, source_search_run=job.source
        )
    except BaseException:
        lineage.finish("FAILED")
        raise
    lineage.finish()
    return PipelineResult(
        name=name,
        tracking_uri=tracking_uri,
        experiment=experiment,
        pipeline_run=pipeline_run,
        sweep=sweep,
        champion=champion,
        model_name=model_name,
        model_version=str(version.version),
        metric=config.sweep.metric,
        search_runs=search_runs,
        retrain_runs=retrain_runs,
    )


def summary(result: PipelineResult) -> str:
    """The end-of-run table: every search, the retrains, the registered model, how to look at it all."""
    metric = result.metric
    rows = ["search trials:", f"  {'trial':<24} {'seed':>4} {'xi':>8} {metric:>8}  genotype"]
    for t in sorted(result.sweep.trials, key=lambda t: t.trial):
        xi = "null" if t.xi is None else f"{t.xi:g}"
        value = t.metrics.get(metric, float("nan"))
        rows.append(f"  {t.trial:<24} {t.seed:>4} {xi:>8} {value:>8.4f}  {t.genotype}")
    rows.append("retrains:")
    stages = [*result.champion.candidates, result.champion.champion, *result.champion.baselines]
    for job, stage in stages:
        rows.append(f"  {job.name:<32} {job.role:<9} {stage.last.eval_split} acc {stage.last.eval_acc:.4f}")
    rows += [
        f"registered model: models:/{result.model_name}@champion (version {result.model_version})",
        f"MLflow: mlflow ui --backend-store-uri {result.tracking_uri}  (experiment {result.experiment!r})",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("python pipelines/full.py", __doc__.splitlines()[0], "quick")
    parser.add_argument("--name", default=None, help="pipeline name (default: the config's name); reuse to resume")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, run nothing")
    args = parser.parse_args(argv)
    try:
        from components.tracking import resolve_tracking_uri

        config = load_pipeline_config(args.config, args.overrides)
        name = args.name or config.name
        tracking_uri = resolve_tracking_uri(config.mlflow.tracking_uri)
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip())
            print(f"\nplan for {name!r} (MLflow: {tracking_uri}):")
            print("\n".join(plan(config, name)))
            return 0
        start = time.perf_counter()
        result = run_pipeline(prepare(config, sweep=True), name=name)
    except (ConfigError, DataError, StageError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(result))
    print(f"done in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
