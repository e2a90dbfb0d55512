"""The pipeline against a real MLflow tracking server over HTTP, as on a cluster: ``mlflow server`` on 127.0.0.1
(sqlite backend, artifacts served by the server), the tiny quick pipeline in-process with
``mlflow.tracking_uri=http://127.0.0.1:PORT``, then everything read back through the server alone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from processes import start_local_ray, stop_local_ray
from s3 import S3Server

from components.config import PipelineConfig, load_pipeline_config
from components.driver import prepare

SHRINK = [  # the quick preset with fewer steps (tests/test_pipeline.py uses it too)
    "search.epochs=2",
    "search.steps_per_epoch=2",
    "search.batch_size=16",
    "search.nodes=2",
    "retrain.epochs=2",
    "retrain.steps_per_epoch=2",
    "retrain.layers=3",
    "retrain.channels=4",
    "data.limit=300",
    "data.test_limit=100",
]
ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# the Kubernetes server's settings (deploy/k8s/mlflow.yaml), used here too: allowed Host headers, no job runner
SERVER_SETTINGS = {
    key: value
    for doc in yaml.safe_load_all((K8S / "mlflow.yaml").read_text())
    if doc["kind"] == "ConfigMap"
    for key, value in doc["data"].items()
    if key.startswith("MLFLOW_SERVER_")
}
TRACKING_URI = yaml.safe_load((K8S / "config.yaml").read_text())["data"]["MLFLOW_TRACKING_URI"]


@dataclass(frozen=True)
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT
    artifacts: Path  # --artifacts-destination: where the server puts what clients upload
    log: Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _healthy(uri: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _status(uri: str, host: str) -> int:
    """The HTTP status of an API request sent with another Host header (as a client in the cluster sends it)."""
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server this module started: its own process group (the server and the workers it forked)."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)  # the group is the server's own (start_new_session): nothing else is in it
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def running_server(root: Path, artifacts: str, env: dict[str, str] | None = None) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1 (sqlite under ``root``, artifacts served into ``artifacts``), until it answers;
    stopped at the end with everything it started."""
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    server_env.update({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    server_env.update(SERVER_SETTINGS | (env or {}))
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
        *("--serve-artifacts", "--artifacts-destination", artifacts),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=server_env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        while not _healthy(uri):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer on {uri}: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield MlflowServer(uri, Path(artifacts) if "://" not in artifacts else root, log)
    finally:
        _stop(process)


@dataclass(frozen=True)
class TrackedPipeline:
    server: MlflowServer
    result: Any  # pipelines.full.PipelineResult
    config: PipelineConfig
    workdir: Path  # the pipeline's current directory: nothing may land there (its Ray storage is on S3)
    rerun: Any  # the same pipeline run again once it had finished: a PipelineResult that resumed everything
    runs_after_first: int  # the MLflow runs after the first run (the rerun must add none)


def count_runs(client: Any) -> int:
    """Every run of every experiment that ``client`` (an MlflowClient) sees."""
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


@contextmanager
def pipeline_on_a_server(root: Path, s3: S3Server) -> Iterator[TrackedPipeline]:
    """The tiny quick pipeline, run in-process on a local Ray and tracked to a live ``mlflow server`` over HTTP, its
    Ray storage on a real S3 API (``s3``, tests/s3.py), then run again (a rerun of the finished pipeline); the server
    stays up while the caller reads the records back. Two searches (seed 1, first and second order, run at once), the
    top two cells, two random cells and the DARTS_V2 baseline retrained, the champion registered. Shared by the tests
    through the session fixture ``tracked_pipeline`` (tests/conftest.py), so the suite runs it once."""
    from mlflow import MlflowClient

    from pipelines.full import run_pipeline

    (root / "server").mkdir()
    workdir = root / "work"
    workdir.mkdir()
    with running_server(root / "server", str(root / "server" / "artifacts")) as server:
        # the S3 environment (with NO_PROXY for 127.0.0.1) before Ray starts: its workers inherit it
        with s3.environment(), pytest.MonkeyPatch.context() as env:
            env.chdir(workdir)  # nothing may land in the current directory: no mlflow.db, no mlartifacts/, no runs/
            env.delenv("MLFLOW_TRACKING_URI", raising=False)
            overrides = [*SHRINK, "sweep.seeds=[1]", "sweep.top_k=2", f"mlflow.tracking_uri={server.uri}"]
            overrides += ["champion.baselines=[DARTS_V2]", "champion.max_concurrent=2", "champion.random_baselines=2"]
            config = load_pipeline_config("quick", [*overrides, f"ray.storage_path={s3.uri('quick-store')}"])
            start_local_ray()
            try:
                result = run_pipeline(prepare(config, sweep=True), log=lambda line: None)
                runs_after_first = count_runs(MlflowClient(server.uri))
                rerun = run_pipeline(prepare(config, sweep=True), log=lambda line: None)
            finally:
                stop_local_ray()
        yield TrackedPipeline(server, result, config, workdir, rerun, runs_after_first)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow-server")
    with running_server(root, str(root / "artifacts")) as server:
        yield server


def test_the_kubernetes_server_settings_admit_the_in_cluster_tracking_uri(mlflow_server: MlflowServer) -> None:
    """deploy/k8s: the server's MLFLOW_SERVER_ALLOWED_HOSTS admits the Host header of config.yaml's tracking URI."""
    assert SERVER_SETTINGS["MLFLOW_SERVER_ALLOWED_HOSTS"]
    in_cluster = urllib.parse.urlparse(TRACKING_URI).netloc  # raydarts-mlflow:5000
    assert _status(mlflow_server.uri, in_cluster) == 200
    assert _status(mlflow_server.uri, f"raydarts-mlflow.raydarts.svc.cluster.local:{in_cluster.split(':')[1]}") == 200
    assert _status(mlflow_server.uri, "attacker.example:5000") == 403


def test_the_pipeline_tracks_to_an_mlflow_server_over_http(
    tracked_pipeline: TrackedPipeline, tmp_path: Path, s3: S3Server
) -> None:
    """The records go through the server: uploads land in its artifact store, nothing in the working directory
    (``s3``: the environment that reads the pipeline's storage back)."""
    from mlflow import MlflowClient

    from components.tracking import check_tracking

    result, uri = tracked_pipeline.result, tracked_pipeline.server.uri
    check_tracking(uri)  # the preflight's health check passes on a live server (a dead one: tests/test_pipeline.py)
    assert result.tracking_uri == uri

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(result.experiment)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # uploads go through the server
    runs = client.search_runs([experiment.experiment_id])
    stages = sorted(run.data.tags["raydarts.stage"] for run in runs)
    assert stages == sorted(["pipeline", *["retrain"] * len(result.retrain_runs), "search", "search", "selection"])
    assert all(run.info.status == "FINISHED" for run in runs)

    # each search run's pictures, as MLflow's own images (the params, metrics and files: tests/test_pipeline.py)
    assert sorted(str(trial.config.search.xi) for trial in result.trials) == ["0.0", "None"]  # first, second order
    for trial in result.trials:
        params = client.get_run(result.search_runs[trial.trial]).data.params
        assert params["normal.n0"] and params["reduce.n0"] and "genotype" not in params
        pictures = [a.path for a in client.list_artifacts(result.search_runs[trial.trial], "images")]
        assert sum("cell+step+" in path for path in pictures) >= 2  # the chart view's slider
    champion_job, champion = result.champion.champion
    search_run = result.search_runs[champion_job.source]
    (trial,) = [trial for trial in result.trials if trial.trial == champion_job.source]
    genotype_file = Path(client.download_artifacts(search_run, "genotype.json", str(tmp_path / "down")))
    assert genotype_file.read_text() == trial.location.read_text("genotype.json")

    # the champion's retrain run: curves, pictures, the logged model; all of it stored by the server
    retrain_run = result.retrain_runs["quick-champion"]
    assert [m.step for m in client.get_metric_history(retrain_run, "retrain/train_loss")] == [1, 2]
    assert client.get_run(retrain_run).data.metrics["retrain/test_acc"] >= 0
    assert {"cell.png", "learning_curves.png"} <= {a.path for a in client.list_artifacts(retrain_run)}
    stored = {p.name for p in tracked_pipeline.server.artifacts.rglob("*") if p.is_file()}
    assert {"genotype.json", "cells.gif", "learning_curves.png", "model.pt", "spec.json", "MLmodel"} <= stored

    # the registry: one version, alias champion (its lineage and predictions: tests/test_pipeline.py)
    (version,) = client.search_model_versions("name = 'quick'")
    assert client.get_model_version_by_alias("quick", "champion").version == version.version == result.model_version


def test_a_server_with_the_kubernetes_s3_settings_keeps_artifacts_in_the_bucket(tmp_path: Path, s3: Any) -> None:
    """deploy/k8s/mlflow.yaml's artifact store on a real S3 API (moto): its init container creates the bucket (and
    finds it the next time), and the server, configured by the same variables, stores uploads there."""
    from mlflow import MlflowClient

    deployment = next(
        doc for doc in yaml.safe_load_all((K8S / "mlflow.yaml").read_text()) if doc["kind"] == "Deployment"
    )
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (server,) = pod["containers"]
    names = {var["name"] for var in server["env"]} | {var["name"] for var in init["env"]}
    assert {"MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"} <= names
    assert init["command"][:2] == ["python", "-c"]
    destination = f"s3://{s3.bucket}-mlflow/mlflow"  # a bucket that does not exist yet
    env = s3.env | {"MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "MLFLOW_ARTIFACTS_DESTINATION": destination}
    for _ in range(2):  # creates the bucket, then finds it
        subprocess.run([sys.executable, *init["command"][1:]], env={**os.environ, **env}, check=True, timeout=120)
    assert s3.client().head_bucket(Bucket=f"{s3.bucket}-mlflow")["ResponseMetadata"]["HTTPStatusCode"] == 200

    (tmp_path / "note.txt").write_text("through the server into the bucket")
    with running_server(tmp_path, destination, env) as running:
        client = MlflowClient(running.uri)
        experiment = client.create_experiment("s3-artifacts")
        run_id = client.create_run(experiment).info.run_id
        client.log_artifact(run_id, str(tmp_path / "note.txt"))
        assert [a.path for a in client.list_artifacts(run_id)] == ["note.txt"]
        back = Path(client.download_artifacts(run_id, "note.txt", str(tmp_path / "down")))
        assert back.read_text() == "through the server into the bucket"
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=f"{s3.bucket}-mlflow")["Contents"]]
    assert [key for key in keys if key.endswith("/note.txt")] and all(key.startswith("mlflow/") for key in keys)
