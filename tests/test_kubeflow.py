"""pipelines/kubeflow.py: the Kubeflow pipeline compiles to a package naming its four steps, and runs end to end with
kfp's local runner (a subprocess per step, no containers) on the tiny preset, ending with a registered champion."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = [  # the quick preset, one short search: the four steps, each on its own local Ray
    "search.epochs=1",
    "search.steps_per_epoch=2",
    "search.batch_size=16",
    "search.nodes=2",
    "retrain.epochs=1",
    "retrain.steps_per_epoch=2",
    "retrain.layers=3",
    "retrain.channels=4",
    "data.limit=200",
    "data.test_limit=60",
    "sweep.seeds=[1]",
    "sweep.xi=[0]",
    "champion.baselines=[DARTS_V2]",
]


def test_the_pipeline_compiles_with_typed_steps(tmp_path: Path) -> None:
    out = tmp_path / "raydarts.yaml"
    proc = subprocess.run(
        [sys.executable, "pipelines/kubeflow.py", "--compile", str(out), "--image", "registry.example/raydarts:1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    package = yaml.safe_load(out.read_text())
    tasks = package["root"]["dag"]["tasks"]
    assert sorted(tasks) == ["register", "retrain", "select", "sweep"]
    assert tasks["register"]["dependentTasks"] == ["retrain", "sweep"]
    assert tasks["retrain"]["dependentTasks"] == ["select", "sweep"]
    executors = package["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example/raydarts:1"}
    components = package["components"]
    assert components["comp-retrain"]["outputDefinitions"]["artifacts"]["champion"]["artifactType"]["schemaTitle"] == (
        "system.Model"
    )
    assert components["comp-select"]["outputDefinitions"]["artifacts"]["selection"]["artifactType"]["schemaTitle"] == (
        "system.Dataset"
    )
    assert components["comp-register"]["outputDefinitions"]["artifacts"]["summary"]["artifactType"]["schemaTitle"] == (
        "system.Markdown"
    )
    parameters = package["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == {"preset", "overrides", "name", "ray_address"}


def test_the_pipeline_runs_locally_and_registers_a_champion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kfp import local

    from components.tracking import walk_lineage
    from pipelines.kubeflow import build_pipeline

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [*TINY, f"ray.storage_path={tmp_path / 'store'}", f"mlflow.tracking_uri={uri}"]
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    # "local": each step starts a Ray of its own, as in its pod, even with a cluster up on this machine
    run = build_pipeline()(preset="quick", overrides=overrides, name="kfp", ray_address="local")
    assert run.output == "models:/kfp/1"
    lineage = walk_lineage(uri, "kfp")  # the model is named after the pipeline
    assert lineage["pipeline"] == "kfp" and lineage["role"] == "champion" and lineage["search_run"]
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    assert client.get_run(lineage["pipeline_run"]).info.status == "FINISHED"  # the last step closed the run
    search = client.get_run(lineage["search_run"])
    assert (
        search.data.params["search.seed"] == "1" and search.data.tags["mlflow.parentRunId"] == lineage["pipeline_run"]
    )
    markdown = next((tmp_path / "kfp").rglob("summary"))
    assert "models:/kfp/1" in markdown.read_text() and "DARTS_V2" in markdown.read_text()
    model_dir = next(p for p in (tmp_path / "kfp").rglob("champion") if p.is_dir())
    assert {p.name for p in model_dir.iterdir()} == {"model.pt", "spec.json"}
