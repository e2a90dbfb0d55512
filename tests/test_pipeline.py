"""pipelines/full.py end to end on the quick preset (shrunk): in-process, then again (a rerun), on S3 storage and a
live MLflow server (the session's shared pipeline, tests/conftest.py ``tracked_pipeline``); then as a Ray job."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from processes import end_processes_with
from s3 import S3Server
from test_mlflow_server import SHRINK, TrackedPipeline, count_runs

from components.config import load_pipeline_config, search_label
from components.tracking import Lineage, dataset_digest, walk_lineage
from nas.config import from_params
from nas.genotypes import node_formulas, random_genotypes

ROOT = Path(__file__).resolve().parents[1]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_the_quick_pipeline_on_s3_registers_a_champion_with_its_lineage(
    tracked_pipeline: TrackedPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3: S3Server
) -> None:
    """The shared tiny pipeline (tests/conftest.py ``tracked_pipeline``), its storage on a real S3 API (moto): sweep,
    retrain and registration, with every stage's artifacts in MLflow; then its rerun, which resumed everything."""
    from mlflow import MlflowClient

    from components.config import PipelineConfig
    from pipelines.full import summary

    result, again, config = tracked_pipeline.result, tracked_pipeline.rerun, tracked_pipeline.config
    uri = tracked_pipeline.server.uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    # nothing in the current directory: the server and the bucket hold all of it
    assert list(tracked_pipeline.workdir.iterdir()) == []
    listed = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="quick-store/")
    objects = [o["Key"] for o in listed["Contents"]]
    assert any(key.endswith("quick-sweep/selection/selection.csv") for key in objects)
    assert any(key.endswith("quick-champion/outputs/result.json") for key in objects)
    # the rerun resumed everything and added nothing to MLflow
    assert again.pipeline_run == result.pipeline_run and again.model_version == result.model_version
    assert count_runs(client) == tracked_pipeline.runs_after_first
    assert len(client.search_model_versions("name = 'quick'")) == 1
    # both searches (first and second order) ran concurrently and were logged: every epoch of every metric, their
    # files and pictures
    assert len(result.search_runs) == 2
    assert sorted(str(trial.xi) for trial in result.trials) == ["0.0", "None"]
    for trial in result.trials:
        assert (trial.metrics["second_order_steps"] > 0) == (trial.xi is None)  # really unrolled, or really not
        assert (trial.metrics["xi"] > 0) == (trial.xi is None)  # unset: ξ is the weights' lr
        run_id = result.search_runs[trial.trial]
        run = client.get_run(run_id)
        assert run.info.run_name == search_label(trial.config)
        assert run.data.params["normal.n0"] == node_formulas(trial.genotype, "normal")[0]
        config_params = {k: v for k, v in run.data.params.items() if not k.startswith(("normal.", "reduce."))}
        assert from_params(config_params, PipelineConfig) == trial.config  # params are exactly the trial's config
        for metric in ("train_loss", "val_acc", "alpha_entropy_normal", "parameter_free_normal", "skip_weight_normal"):
            assert [m.step for m in client.get_metric_history(run_id, f"search/{metric}")] == [1, 2], metric
        # logged live by the driver as Tune reported each epoch (then completed after the sweep)
        assert run.data.tags["raydarts.live"] == "true"
        assert run.info.start_time <= client.get_metric_history(run_id, "search/val_acc")[0].timestamp
        files = {a.path for a in client.list_artifacts(run_id)}
        assert {"genotype.json", "history.json", "config.json", "cell.png", "alpha.png", "cells.gif"} <= files
        assert Lineage(uri, "quick", "quick")._logged_steps(run_id) == {"cell": {1, 2}, "alpha": {1, 2}}
    selection_run = client.search_runs([run.info.experiment_id], "tags.`raydarts.stage` = 'selection'")[0]
    assert {a.path for a in client.list_artifacts(selection_run.info.run_id)} == {"selection.csv", "selection.json"}
    for run_id in result.retrain_runs.values():
        assert {"cell.png", "learning_curves.png"} <= {a.path for a in client.list_artifacts(run_id)}
    names = {client.get_run(run_id).info.run_name for run_id in result.retrain_runs.values()}
    assert {"retrain champion", "retrain DARTS_V2", "retrain best random cell", "retrain random 2"} <= names
    # every trained cell and every search compared in one table on the pipeline run, and in one figure
    table = json.loads(
        Path(client.download_artifacts(result.pipeline_run, "comparison.json", str(tmp_path))).read_text()
    )
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    trained = [row for row in rows if row["role"] != "search"]
    assert len(trained) == len(result.champion.trained)
    champion_row = next(row for row in rows if row["role"] == "champion")
    assert champion_row["retrained_acc"] == pytest.approx(result.champion.champion[1].last.eval_acc, abs=1e-9)
    source = next(t for t in result.trials if t.trial == result.champion.champion[0].source)
    assert champion_row["trial"] == search_label(source.config) and champion_row["params"] > 0
    assert champion_row["supernet_val_acc"] == pytest.approx(source.last.val_acc, abs=1e-9)  # (JSON: 10 digits)
    assert champion_row["flops"] > champion_row["params"]
    assert {row["trial"] for row in rows if row["trial"]} <= {search_label(t.config) for t in result.trials}
    assert "comparison.png" in {a.path for a in client.list_artifacts(result.pipeline_run)}
    # lineage: registered version -> retrain run -> search run -> pipeline run -> data set
    lineage = walk_lineage(uri, "quick")
    assert str(lineage["version"]) == result.model_version and lineage["role"] == "champion"
    assert lineage["retrain_run"] == result.retrain_runs["quick-champion"]
    champion_job, champion = result.champion.champion
    assert lineage["search_run"] == result.search_runs[champion_job.source]
    assert lineage["pipeline_run"] == result.pipeline_run
    assert lineage["dataset_digest"] == dataset_digest(config)[0] and lineage["dataset_rows"] == 300
    assert lineage["pipeline"] == "quick" and lineage["genotype"] == champion.genotype.to_json()
    assert champion.last.eval_split == "test" and {job.role for job, _ in result.champion.baselines} == {"baseline"}
    assert len(result.champion.candidates) == len(result.selected) >= 1
    # two random cells, drawn as the config says, trained at the candidates' budget and split; the best in full
    randoms = random_genotypes(2, config.champion.random_seed, config.search.primitives, config.search.nodes)
    assert [stage.genotype for _, stage in result.champion.randoms] == randoms
    for job, stage in [*result.champion.randoms, *result.champion.candidates]:
        assert job.config.retrain.epochs == config.champion.candidate_epochs == len(stage.history)
        assert job.config.retrain.val_fraction == config.retrain.val_fraction and stage.last.eval_split == "val"
    best_random = max(result.champion.randoms, key=lambda pair: pair[1].last.eval_acc)[1].genotype
    baselines = {job.name: stage for job, stage in result.champion.baselines}
    assert baselines["quick-baseline-random"].genotype == best_random
    assert baselines["quick-baseline-random"].last.eval_split == "test"
    # where each searched cell ranks among them: in the result, on its retrain run and on the pipeline run
    ranking = result.champion.ranking
    brief = [job.name for job, _ in [*result.champion.candidates, *result.champion.randoms]]
    assert sorted(row["retrain"] for row in ranking) == sorted(brief) and [row["rank"] for row in ranking] == [
        1,
        2,
        3,
        4,
    ]
    pipeline_metrics = client.get_run(result.pipeline_run).data.metrics
    for job, stage in result.champion.candidates:
        beaten = sum(s.last.eval_acc < stage.last.eval_acc for _, s in result.champion.randoms)
        tied = sum(s.last.eval_acc == stage.last.eval_acc for _, s in result.champion.randoms)
        expected = 100 * (beaten + tied / 2) / 2
        assert pipeline_metrics[f"random_percentile.{job.name}"] == expected
        assert client.get_run(result.retrain_runs[job.name]).data.metrics["random_percentile"] == expected
    table = json.loads(Path(client.download_artifacts(result.pipeline_run, "ranking.json", str(tmp_path))).read_text())
    column = table["columns"].index("retrain")
    assert sorted(row[column] for row in table["data"]) == sorted(row["retrain"] for row in ranking)
    assert "better than" in summary(result)
    sys.path.insert(0, str(ROOT))  # bench/ is scripts, not an installed package
    from bench.study_report import report  # what bench/RESULTS.md records, read back from MLflow

    markdown = report(uri, "quick")
    assert sum(" order) |" in line for line in markdown.splitlines()) == 2  # the two searches
    assert "| quick-random-2 | random | 1 |" in markdown
    assert "| quick-baseline-random | baseline | 2 |" in markdown and "wall time" in markdown
    champion_params = client.get_run(lineage["retrain_run"]).data.params
    assert champion_params["retrain.genotype"] == champion.genotype.to_json()  # what it trained, not the preset's
    # the registered model predicts class probabilities, as the retrained network does, from raw pixels too
    import mlflow.pyfunc
    from sklearn.datasets import load_digits

    from nas.eval_model import EvalNetwork

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model("models:/quick@champion")

    images = (load_digits().images[:5] / 16.0).astype(np.float32)[:, None]
    probabilities = model.predict(images)
    assert probabilities.shape == (5, 10) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    network = EvalNetwork.from_spec(champion.spec)
    with champion.location.local_copy() as published:
        network.load_state_dict(torch.load(published / "model.pt", weights_only=True))
    network.eval()
    spec = champion.spec
    mean, std = torch.tensor(spec.mean)[None, :, None, None], torch.tensor(spec.std)[None, :, None, None]
    with torch.no_grad():
        expected = torch.softmax(network((torch.from_numpy(images) - mean) / std)[0], dim=1).numpy()
    assert np.allclose(probabilities, expected, atol=1e-5)
    text = summary(result)
    assert "models:/quick@champion" in text
    assert f"{uri}/#/experiments/{result.experiment_id}?workflowType=machine_learning" in text  # opens on the runs


def test_dry_run_and_bad_input_touch_nothing(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """The command line itself (a subprocess) for the dry run and one bad input; the other bad inputs through its
    ``main`` in this process (the same code from argv on, without an interpreter start each): exit 2, one line on
    stderr, nothing written, no Ray started."""
    import ray

    from pipelines.full import main

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dry = subprocess.run(
        [sys.executable, "pipelines/full.py", "--dry-run", "--set", "sweep.seeds=[1,2,3]"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert dry.returncode == 0, dry.stderr
    assert "seeds:\n  - 1\n  - 2\n  - 3" in dry.stdout and "1. sweep quick-sweep: 6 searches" in dry.stdout
    store = _sets([f"ray.storage_path={tmp_path / 'store'}"])
    bad = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "full.py"), "--name", "../../escaped", *store],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: --name '../../escaped' must be 1-100 characters of letters, digits, '_', '.', '-', starting with a "
        "letter or digit"
    ]
    assert sorted(tmp_path.iterdir()) == []
    monkeypatch.chdir(tmp_path)
    for args, message in [
        (_sets(["mlflow.tracking_uri=/tmp/mlruns"]), "sqlite"),
        (_sets(["champion.baselines=[NOPE]"]), "unknown baseline 'NOPE'"),
        (_sets(["sweep.top_k=2", "retrain.val_fraction=0"]), "never the test set"),
        (_sets(["data.source=parquet:/nonexistent"]), "/nonexistent"),
        (_sets(["search.batch_size=1000"]), "needs 1000 images in each half of the training split"),
        (
            _sets(["search.epochs=true", "search.w_lr=.inf"]),
            "not true/false (got True); search.w_lr: Input should be a finite",
        ),
        (_sets(["sweep.metric=bogus"]), "unknown metric 'bogus'"),
        (["--name", "x" * 101], "must be 1-100 characters"),
        (_sets([f"mlflow.tracking_uri=http://127.0.0.1:{_free_port()}"]), "does not answer within 5s"),
        (_sets(["mlflow.tracking_uri=sqlite:////proc/raydarts/mlflow.db"]), "(/proc is not writable)"),
        (_sets([f"ray.address=127.0.0.1:{_free_port()}"]), "does not answer within 5s: Connection refused"),
    ]:
        assert main([*args, *store]) == 2, args
        captured = capsys.readouterr()
        assert len(captured.err.strip().splitlines()) == 1 and message in captured.err, captured.err
        assert captured.out == ""
        assert sorted(tmp_path.iterdir()) == [] and not ray.is_initialized()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OUR_LINE = re.compile(r"^\[(pipeline|search s\d+ [^\]]+|retrain [^\]]+)\] ")
JOB_FRAMING = ("Running entrypoint for job", "job_manager.py", "(raylet)")  # Ray's job log and its error channel


def foreign_console_lines(submit_output: str) -> list[str]:
    """The lines of a pipeline job's log that are not the pipeline's own: each of its lines names its run
    (``[search s1 1st] ...``) until the closing summary, which runs from ``search trials:`` to ``done in``."""
    log = submit_output.split("Tailing logs until the job exits", 1)[1].splitlines()[1:]
    log = log[: next(i for i, line in enumerate(log) if "WebSocket closed" in line or "SUCC cli.py" in line)]
    log = [line for line in log if not any(frame in line for frame in JOB_FRAMING)]
    start = next(i for i, line in enumerate(log) if line == "search trials:")
    assert log[-1].startswith("done in "), log[-5:]
    return [line for line in log[:start] if not OUR_LINE.match(line)]


def test_ray_job_submit_runs_the_pipeline_on_a_head_node(tmp_path: Path) -> None:
    ray_bin = Path(sys.executable).parent / "ray"
    port, dashboard = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env["PATH"] = f"{ray_bin.parent}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this environment's
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # Ray's socket paths must stay short
    start = subprocess.run(
        [
            str(ray_bin),
            "start",
            "--head",
            f"--port={port}",
            f"--dashboard-port={dashboard}",
            "--include-dashboard=true",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--dashboard-agent-listen-port",
            str(_free_port()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert start.returncode == 0, start.stderr[-2000:]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    try:
        overrides = [*SHRINK, "sweep.seeds=[1]", f"mlflow.tracking_uri={uri}", f"ray.storage_path={tmp_path / 'store'}"]
        overrides += ["--name", "job"]
        args = [*_sets(overrides[:-2]), *overrides[-2:]]
        submit = subprocess.run(
            [
                str(ray_bin),
                "job",
                "submit",
                f"--address=http://127.0.0.1:{dashboard}",
                f"--working-dir={ROOT}",
                "--",
                "python",
                "pipelines/full.py",
                *args,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=1100,
        )
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
        assert "succeeded" in submit.stdout.lower()
        assert "models:/job@champion" in submit.stdout  # the model is named after the pipeline
        assert not foreign_console_lines(submit.stdout), foreign_console_lines(submit.stdout)
        runs = {match.group(1) for match in map(OUR_LINE.match, submit.stdout.splitlines()) if match}
        assert {"search s1 1st", "search s1 ξ=lr 2nd", "retrain champion"} <= runs  # each line names its run
        assert "MLflow: mlflow ui --backend-store-uri " + uri in submit.stdout  # how to open a local store
        assert "then open http://127.0.0.1:5000/#/experiments/" in submit.stdout  # ... and where to look
    finally:
        end_processes_with(temp_dir)  # the Ray this test started, not every Ray on the machine
        shutil.rmtree(temp_dir, ignore_errors=True)
    lineage = walk_lineage(uri, "job")
    assert lineage["pipeline"] == "job" and lineage["search_run"] and lineage["dataset_digest"]
    assert json.loads(lineage["genotype"])


def test_local_paths_become_absolute_before_workers_see_them(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from components.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    config = with_absolute_paths(load_pipeline_config("quick", ["data.source=parquet:../cifar", "data.root=data"]))
    assert config.ray.storage_path == str(tmp_path / "runs" / "ray")
    assert config.data.source == f"parquet:{tmp_path.parent / 'cifar'}" and config.data.root == str(tmp_path / "data")
    remote = with_absolute_paths(
        load_pipeline_config("quick", ["ray.storage_path=s3://bucket/runs", "data.source=parquet:s3://bucket/cifar"])
    )
    assert remote.ray.storage_path == "s3://bucket/runs" and remote.data.source == "parquet:s3://bucket/cifar"
