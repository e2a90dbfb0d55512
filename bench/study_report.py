"""The results of one pipeline run as Markdown, read back from MLflow: its searches, every retrain, the ranking of
the searched cells among the random ones, and the wall time. What bench/RESULTS.md records for a study.

    python pipelines/full.py --config cifar10-proxy
    python bench/study_report.py --name cifar10-proxy                        # sqlite:///mlflow.db by default
    python bench/study_report.py --name cifar10-proxy --tracking-uri http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__" and __package__ is None:  # `python bench/study_report.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlflow import MlflowClient
from mlflow.entities import Run

from components.tracking import T, resolve_tracking_uri
from nas.genotypes import node_formulas, parse_genotype

ROLE_ORDER = {"candidate": 0, "random": 1, "champion": 2, "baseline": 3}


def _runs(client: MlflowClient, experiment_id: str, pipeline: str, stage: str) -> list[Run]:
    query = f"tags.`{T}pipeline` = '{pipeline}' AND tags.`{T}stage` = '{stage}' AND attributes.status = 'FINISHED'"
    return list(client.search_runs([experiment_id], query, max_results=1000))


def _number(value: Any, digits: int = 4) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _cell(genotype_json: str | None, cell: str) -> str:
    if not genotype_json:
        return ""
    return "; ".join(node_formulas(parse_genotype(genotype_json), cell))


def report(tracking_uri: str, name: str, experiment: str | None = None) -> str:
    """Markdown tables of the pipeline ``name``'s finished runs in ``experiment`` (default: ``name``)."""
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    found = client.get_experiment_by_name(experiment or name)
    if found is None:
        raise SystemExit(f"error: no MLflow experiment {experiment or name!r} at {tracking_uri}")
    eid = found.experiment_id
    (pipeline,) = _runs(client, eid, name, "pipeline") or [None]
    if pipeline is None:
        raise SystemExit(f"error: no finished pipeline run {name!r} in experiment {found.name!r}")
    lines = [f"Pipeline run `{pipeline.info.run_id}`, wall time {_wall(pipeline)}.", ""]
    lines += ["| search | seed | ξ | supernet val acc | parameter-free ops (normal/reduce) | normal cell |"]
    lines += ["| --- | --- | --- | --- | --- | --- |"]
    for run in sorted(_runs(client, eid, name, "search"), key=lambda r: r.data.tags[f"{T}key"]):
        params, metrics = run.data.params, run.data.metrics
        xi = {"0.0": "0 (1st order)", "null": "lr (2nd order)"}.get(
            params.get("search.xi", ""), params.get("search.xi")
        )
        free = "/".join(str(int(metrics.get(f"search/parameter_free_{cell}", -1))) for cell in ("normal", "reduce"))
        normal = _cell(run.data.tags.get(f"{T}genotype"), "normal")
        lines.append(
            f"| {run.data.tags[f'{T}key']} | {params.get('search.seed')} | {xi} | "
            f"{_number(metrics.get('search/val_acc'))} | {free} | {normal} |"
        )
    lines += ["", "| retrain | role | epochs | val acc | test acc | percentile among random cells | normal cell |"]
    lines += ["| --- | --- | --- | --- | --- | --- | --- |"]
    retrains = _runs(client, eid, name, "retrain")
    retrains.sort(key=lambda r: (ROLE_ORDER.get(r.data.tags.get(f"{T}role", ""), 9), r.data.tags[f"{T}key"]))
    for run in retrains:
        metrics, tags = run.data.metrics, run.data.tags
        lines.append(
            f"| {tags[f'{T}key']} | {tags.get(f'{T}role')} | {run.data.params.get('retrain.epochs')} | "
            f"{_number(metrics.get('retrain/val_acc'))} | {_number(metrics.get('retrain/test_acc'))} | "
            f"{_number(metrics.get('random_percentile'), 0)} | {_cell(tags.get(f'{T}genotype'), 'normal')} |"
        )
    return "\n".join(lines)


def _wall(run: Run) -> str:
    if not run.info.end_time:
        return "unfinished"
    seconds = (run.info.end_time - run.info.start_time) / 1000
    return f"{seconds / 60:.0f} min ({seconds:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/study_report.py", description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the pipeline's name (--name, else its config's name)")
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    parser.add_argument("--experiment", default=None, help="default: the pipeline's name")
    args = parser.parse_args(argv)
    print(report(args.tracking_uri, args.name, args.experiment))
    return 0


if __name__ == "__main__":
    sys.exit(main())
