"""The pipeline as a Kubeflow Pipelines (v2) pipeline: sweep -> select -> retrain -> register, one step each.

Each step runs its stage on Ray (a local Ray in the step's pod, or a cluster: ``ray_address``, for example a KubeRay
head service ``ray://raydarts-head-svc:10001``) and records it in MLflow (``mlflow.tracking_uri``: a tracking
server). Steps hand each other typed artifacts: the resolved config (YAML), the sweep's trials and the selection
(``Dataset``), the champion (``Model``: weights and ``spec.json``, genotype and metrics in its metadata) and a
``Markdown`` report. Every stage is idempotent by ``name``, so a retried step adds nothing twice.

    python pipelines/kubeflow.py --compile raydarts.yaml                            # the package to upload
    python pipelines/kubeflow.py --compile raydarts.yaml --image registry.example.com/raydarts:0.1.0

Upload ``raydarts.yaml`` in the Kubeflow Pipelines UI (Pipelines -> Upload pipeline) and start a run with its
parameters, or from Python::

    import kfp
    kfp.Client(host="https://<kubeflow>/pipeline").create_run_from_pipeline_package(
        "raydarts.yaml", arguments={"config": "cifar10", "name": "cifar10", "ray_address": "ray://raydarts-head-svc:10001",
        "overrides": ["ray.storage_path=s3://bucket/raydarts", "mlflow.tracking_uri=http://mlflow:5000"]})

Storage (``ray.storage_path``) must be shared by the steps' pods (``s3://``, ``gs://`` or a shared volume), and the
image must hold this project (the repository's Dockerfile). The same steps run on one machine with
``kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False))`` (tests/test_kubeflow.py does).
"""

# No `from __future__ import annotations` here: kfp reads the steps' annotations (Output[Dataset], ...) as objects.
import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__" and __package__ is None:  # `python pipelines/kubeflow.py` from a checkout not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE = "raydarts:latest"  # what the repository's Dockerfile builds; --image at compile time names yours
PIPELINE_NAME = "raydarts"


# --- what each step does (imported by the steps inside their pods) ---------------------------------------------------
def _config(config_yaml: str, ray_address: str = "") -> Any:
    """The first step's resolved config, validated again, with ``ray_address`` ('' : a local Ray) set in it."""
    import yaml

    from components.config import PipelineConfig

    return _on(PipelineConfig.model_validate(yaml.safe_load(config_yaml)), ray_address)


def _on(config: Any, ray_address: str) -> Any:
    """``config`` running its stages on the Ray at ``ray_address`` (unchanged when it is empty)."""
    if not ray_address:
        return config
    return config.model_copy(update={"ray": config.ray.model_copy(update={"address": ray_address})})


def _yaml(config: Any) -> str:
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def sweep_step(preset: str, overrides: list[str], name: str, ray_address: str, trials_path: str) -> str:
    """Resolve the config (checked whole before anything runs), run the sweep, log its trials; the resolved config
    as YAML, which every later step takes."""
    from components.config import load_pipeline_config
    from components.console import open_console
    from components.driver import prepare
    from components.pipeline import open_lineage, sweep_stage
    from components.tracking import check_tracking, resolve_tracking_uri
    from nas.config import check_name

    check_name(name, "name")
    config = _on(load_pipeline_config(preset, overrides), ray_address)
    check_tracking(resolve_tracking_uri(config.mlflow.tracking_uri))
    prepared = prepare(config, sweep=True, ray_logs=False)
    with open_console() as console:  # the step's log: our lines only, each naming its trial
        trials, _ = sweep_stage(prepared.with_console(console.channel), open_lineage(prepared.config, name), name)
    Path(trials_path).write_text(json.dumps([t.model_dump(mode="json") for t in trials], indent=2))
    return _yaml(prepared.config)


def select_step(config_yaml: str, name: str, trials_path: str, selection_path: str) -> dict[str, Any]:
    """Rank the trials, publish and log the selection; its summary (the Dataset's metadata)."""
    from components.driver import Prepared
    from components.pipeline import open_lineage, select_stage
    from components.select import TrialResult

    prepared = Prepared.trusted(_config(config_yaml))  # no Ray needed: storage and MLflow only
    trials = [TrialResult.model_validate(row) for row in json.loads(Path(trials_path).read_text())]
    selected = select_stage(prepared, open_lineage(prepared.config, name), trials, name)
    rows = [
        {"rank": c.rank, "trial": c.trial.trial, "metric": c.metric, "genotype": c.genotype.to_dict()} for c in selected
    ]
    Path(selection_path).write_text(json.dumps(rows, indent=2))
    return {"metric": prepared.config.sweep.metric, "candidates": len(rows), "best_trial": rows[0]["trial"]}


def retrain_step(config_yaml: str, name: str, ray_address: str, selection_path: str, model_dir: str) -> dict[str, Any]:
    """Choose the champion among the selected cells, train it (and the baselines) in full, log every retrain; the
    champion's weights and spec land in ``model_dir``, its summary is returned (the Model's metadata)."""
    from components.console import open_console
    from components.driver import prepare
    from components.pipeline import open_lineage, retrain_stage
    from nas.genotypes import Genotype

    prepared = prepare(_config(config_yaml, ray_address), ray_logs=False)
    candidates = [
        (row["trial"], Genotype.from_dict(row["genotype"])) for row in json.loads(Path(selection_path).read_text())
    ]
    with open_console() as console:
        lineage = open_lineage(prepared.config, name)
        champion, runs = retrain_stage(prepared.with_console(console.channel), lineage, candidates, name)
    job, stage = champion.champion
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    with stage.location.local_copy() as published:
        for file in ("model.pt", "spec.json"):
            (Path(model_dir) / file).write_bytes((published / file).read_bytes())
    summary = {
        "genotype": stage.genotype.to_json(),
        "test_acc": stage.last.eval_acc,
        "retrain_run": runs[job.name],
        "outputs": stage.outputs,
        "source_trial": job.source or "",
        "baselines": {j.name: s.last.eval_acc for j, s in champion.baselines},
        "random_percentile": {
            r["retrain"]: r["random_percentile"] for r in champion.ranking if r["kind"] == "searched"
        },
    }
    return summary


def register_step(config_yaml: str, name: str, champion: dict[str, Any]) -> str:
    """Register the champion (alias ``champion``) with its lineage; ``models:/<name>/<version>``."""
    from components.pipeline import model_name, open_lineage, register_stage
    from components.retrain import read_result
    from components.storage import Location

    config = _config(config_yaml)
    stage = read_result(Location(champion["outputs"]))
    if stage is None:
        raise RuntimeError(f"the champion's outputs are gone from {champion['outputs']}")
    registered = model_name(config, name)
    lineage = open_lineage(config, name)
    version = register_stage(lineage, champion["retrain_run"], stage, registered, champion["source_trial"] or None)
    lineage.finish()  # the last step: the pipeline's run is complete
    return f"models:/{registered}/{version.version}"


def report(champion: dict[str, Any], model_uri: str) -> str:
    """The run's Markdown report: the champion, its accuracy beside the baselines, where the model is."""
    lines = [
        "# raydarts",
        "",
        f"Registered: `{model_uri}` (alias `champion`)",
        "",
        "| retrain | test accuracy |",
        "| --- | --- |",
        f"| champion | {champion['test_acc']:.4f} |",
    ]
    lines += [f"| {baseline} | {acc:.4f} |" for baseline, acc in champion["baselines"].items()]
    lines += ["", f"Cell: `{champion['genotype']}`", ""]
    return "\n".join(lines)


# --- the pipeline -----------------------------------------------------------------------------------------------------
def build_pipeline(image: str = IMAGE) -> Any:
    """The Kubeflow pipeline whose steps run in ``image`` (one that holds this project)."""
    from kfp import dsl
    from kfp.dsl import Dataset, Input, Markdown, Model, Output

    @dsl.component(base_image=image)
    def sweep(preset: str, overrides: list, name: str, ray_address: str, trials: Output[Dataset]) -> str:
        from pipelines.kubeflow import sweep_step

        return sweep_step(preset, overrides, name, ray_address, trials.path)

    @dsl.component(base_image=image)
    def select(config: str, name: str, trials: Input[Dataset], selection: Output[Dataset]) -> None:
        from pipelines.kubeflow import select_step

        selection.metadata.update(select_step(config, name, trials.path, selection.path))

    @dsl.component(base_image=image)
    def retrain(config: str, name: str, ray_address: str, selection: Input[Dataset], champion: Output[Model]) -> None:
        from pipelines.kubeflow import retrain_step

        champion.metadata.update(retrain_step(config, name, ray_address, selection.path, champion.path))

    @dsl.component(base_image=image)
    def register(config: str, name: str, champion: Input[Model], summary: Output[Markdown]) -> str:
        from pathlib import Path

        from pipelines.kubeflow import register_step, report

        model_uri = register_step(config, name, dict(champion.metadata))
        Path(summary.path).write_text(report(dict(champion.metadata), model_uri))
        return model_uri

    @dsl.pipeline(name=PIPELINE_NAME, description="DARTS search on Ray: sweep, select, retrain, register (MLflow)")
    def raydarts(preset: str = "quick", overrides: list = [], name: str = "quick", ray_address: str = "") -> str:  # noqa: B006
        swept = sweep(preset=preset, overrides=overrides, name=name, ray_address=ray_address)
        selected = select(config=swept.outputs["Output"], name=name, trials=swept.outputs["trials"])
        trained = retrain(
            config=swept.outputs["Output"], name=name, ray_address=ray_address, selection=selected.outputs["selection"]
        )
        registered = register(config=swept.outputs["Output"], name=name, champion=trained.outputs["champion"])
        return registered.outputs["Output"]

    return raydarts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python pipelines/kubeflow.py", description=__doc__.splitlines()[0])
    parser.add_argument("--compile", dest="output", required=True, metavar="PIPELINE.yaml", help="write the package")
    parser.add_argument("--image", default=IMAGE, help=f"the image every step runs in (default: {IMAGE})")
    args = parser.parse_args(argv)
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(args.image), args.output)
    print(
        f"wrote {args.output}: upload it in the Kubeflow Pipelines UI, or kfp.Client().create_run_from_pipeline_package"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
