"""The whole pipeline in one command: sweep -> select -> retrain -> register, with lineage in MLflow.

    python pipelines/full.py                                    # the quick preset (digits) on the local Ray
    python pipelines/full.py --config cifar10-cpu --set search.epochs=3
    python pipelines/full.py --config cifar10 --dry-run         # the resolved config and the plan, nothing run
    ray job submit --address http://<head>:8265 --working-dir . -- python pipelines/full.py --config cifar10

Presets live in nas/presets/ (quick, cifar10, cifar10-cpu, cifar10-proxy, digits); any YAML path works too, and ``--set
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

from components.config import PipelineConfig, load_pipeline_config, search_label, trial_configs
from components.console import open_console, quiet_libraries
from components.driver import Prepared, prepare
from components.pipeline import (
    model_name,
    open_lineage,
    register_stage,
    retrain_stage,
    select_stage,
    sweep_stage,
    work_plan,
)
from components.retrain import ChampionResult
from components.select import Candidate, TrialResult
from components.storage import StorageError
from components.tracking import experiment_url
from components.trainer import StageError
from nas.config import ConfigError, check_name, config_parser
from nas.data import DataError


@dataclass
class PipelineResult:
    name: str
    tracking_uri: str
    experiment: str
    experiment_id: str
    pipeline_run: str
    trials: list[TrialResult]
    selected: list[Candidate]
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
    champion = config.champion
    if sweep.max_skip_connects is not None:
        lines[-1] += f", refusing normal cells with more than {sweep.max_skip_connects} skip_connect"
    randoms = f" and {champion.random_baselines} random cells" if champion.random_baselines else ""
    if sweep.top_k > 1 or randoms:
        lines.append(
            f"3. retrain each candidate{randoms} for {champion.candidate_epochs} epochs, "
            f"{config.retrain.val_fraction:.0%} of train held out; the best candidate is the champion"
        )
    else:
        lines.append("3. the single candidate is the champion")
    baselines = [*champion.baselines, *(["the best random cell"] if randoms else [])]
    extra = f" and baselines {', '.join(baselines)}" if baselines else ""
    lines += [
        f"4. train the champion{extra} for {config.retrain.epochs} epochs on all of train; test once",
        f"5. register the champion as {model_name(config, name)!r} with alias 'champion'",
    ]
    return lines


def run_pipeline(prepared: Prepared, *, name: str | None = None, log: Any = print) -> PipelineResult:
    """Run (or resume) every stage and record it in MLflow; the driver is MLflow's only writer."""
    config = prepared.config
    name = name or config.name
    lineage = open_lineage(config, name)
    log(
        f"[pipeline] {name}: MLflow run {lineage.run_id} in experiment {lineage.experiment!r} at {lineage.tracking_uri}"
    )
    with open_console(log, work_plan(prepared)) as console:
        prepared = prepared.with_console(console.channel)
        try:
            log("[pipeline] 1/4 sweep")
            trials, search_runs = sweep_stage(prepared, lineage, name)
            console.complete([search_label(trial.config) for trial in trials])
            log("[pipeline] 2/4 selection")
            selected = select_stage(prepared, lineage, trials, name)
            log("[pipeline] 3/4 retrain")
            candidates = [(c.trial.trial, c.genotype) for c in selected]
            champion, retrain_runs = retrain_stage(
                prepared, lineage, candidates, name, log=lambda line: log(f"[pipeline] {line}"), trials=trials
            )
            console.complete([job.label or job.name for job, _ in champion.trained])
            log("[pipeline] 4/4 register")
            job, stage = champion.champion
            version = register_stage(lineage, retrain_runs[job.name], stage, model_name(config, name), job.source)
        except BaseException:
            lineage.finish("FAILED")
            raise
    lineage.finish()
    return PipelineResult(
        name=name,
        tracking_uri=lineage.tracking_uri,
        experiment=lineage.experiment,
        experiment_id=lineage.experiment_id,
        pipeline_run=lineage.run_id,
        trials=trials,
        selected=selected,
        champion=champion,
        model_name=model_name(config, name),
        model_version=str(version.version),
        metric=config.sweep.metric,
        search_runs=search_runs,
        retrain_runs=retrain_runs,
    )


def summary(result: PipelineResult) -> str:
    """The end-of-run table: every search, the retrains, the registered model, how to look at it all."""
    metric = result.metric
    rows = ["search trials:", f"  {'search':<28} {'trial':<12} {metric:>8}  genotype"]
    for t in sorted(result.trials, key=lambda t: t.trial):
        value = t.metrics.get(metric, float("nan"))
        rows.append(f"  {search_label(t.config):<28} {t.trial:<12} {value:>8.4f}  {t.genotype}")
    rows.append("retrains:")
    champion = result.champion
    for job, stage in champion.trained:
        label = job.label or job.name
        rows.append(f"  {label:<28} {job.role:<9} {stage.last.eval_split} acc {stage.last.eval_acc:.4f}")
    for row in champion.ranking:
        if row["kind"] == "searched":
            randoms = len(champion.randoms)
            rows.append(
                f"  {row['retrain']} ranks {row['rank']} of {len(champion.ranking)} on validation: "
                f"better than {row['random_percentile']:.0f}% of {randoms} random cells"
            )
    rows.append(f"registered model: models:/{result.model_name}@champion (version {result.model_version})")
    if result.tracking_uri.startswith(("http://", "https://")):
        rows.append(f"MLflow: {experiment_url(result.tracking_uri, result.experiment_id)}")
    else:
        rows += [
            f"MLflow: mlflow ui --backend-store-uri {result.tracking_uri}",
            f"  then open {experiment_url('http://127.0.0.1:5000', result.experiment_id)}",
        ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("python pipelines/full.py", __doc__.splitlines()[0], "quick")
    parser.add_argument("--name", default=None, help="pipeline name (default: the config's name); reuse to resume")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, run nothing")
    parser.add_argument("--verbose", action="store_true", help="also show Ray's own logs (workers, Tune's tables)")
    args = parser.parse_args(argv)
    try:
        from components.tracking import check_tracking, resolve_tracking_uri

        config = load_pipeline_config(args.config, args.overrides)
        name = check_name(args.name, "--name") if args.name is not None else config.name
        tracking_uri = resolve_tracking_uri(config.mlflow.tracking_uri)
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip())
            print(f"\nplan for {name!r} (MLflow: {tracking_uri}):")
            print("\n".join(plan(config, name)))
            return 0
        start = time.perf_counter()
        quiet_libraries(args.verbose)
        check_tracking(tracking_uri)
        result = run_pipeline(prepare(config, sweep=True, ray_logs=args.verbose), name=name)
    except (ConfigError, DataError, StageError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(result))
    print(f"done in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
