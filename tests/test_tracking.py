"""Lineage in a real sqlite MLflow store: runs found by tags, idempotent reruns, the champion loadable by alias."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from components.config import PipelineConfig, retrain_label, search_label
from components.search import read_history
from components.select import TrialResult, select_top, write_selection
from components.storage import Location
from components.tracking import (
    DEFAULT_TRACKING_URI,
    NOTE,
    Lineage,
    dataset_digest,
    genotype_params,
    resolve_tracking_uri,
    walk_lineage,
)
from nas.artifacts import save_epoch_pictures, save_search_outputs
from nas.config import ConfigError, from_params, load_config
from nas.data import load_dataset
from nas.eval_model import EvalNetwork
from nas.genotypes import DARTS_V2, Genotype, cell_markdown, node_formulas, parse_genotype
from nas.retrain import RetrainRun
from nas.search import SearchRun

TINY = [
    "data.limit=200",
    "search.epochs=2",
    "search.layers=3",
    "search.channels=4",
    "search.batch_size=16",
    "search.steps_per_epoch=2",
    "search.xi=0",
    "search.nodes=2",
    "retrain.epochs=1",
    "retrain.steps_per_epoch=2",
    "retrain.layers=3",
    "retrain.channels=4",
    "retrain.batch_size=16",
    "retrain.auxiliary=false",
]
MODEL = "digits-champion"
EXPERIMENT = "raydarts-test"


def tiny_config(*extra: str) -> PipelineConfig:
    return load_config("digits", [*TINY, *extra], model=PipelineConfig)


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Genuine stage outputs: two 2-epoch searches (files as the search stage writes them) and a trained network."""
    root = tmp_path_factory.mktemp("stages")
    config = tiny_config(f"retrain.genotype={DARTS_V2.to_json()}")
    trials = []
    for seed in (2, 3):
        trial_config = tiny_config(f"search.seed={seed}")
        result = SearchRun(trial_config).run()
        out = root / f"trial_{seed}"
        save_search_outputs(out, result.genotype, result.history)
        for report in result.history:
            primitives = trial_config.search.primitives
            save_epoch_pictures(
                out, report.epoch, report.genotype, report.alpha_normal, report.alpha_reduce, primitives
            )
        started = 1_700_000_000.0 + 1000 * seed  # when the search ran: the run shows these, not when it was logged
        trials.append(
            TrialResult(
                trial=f"trial_{seed}",
                config=trial_config,
                last=result.history[-1],
                outputs=str(out),
                started=started,
                ended=started + 321.5,
            )
        )
    retrain = RetrainRun(config, DARTS_V2)
    result = retrain.run()
    published = root / "retrain"
    published.mkdir()
    torch.save(retrain.network.state_dict(), published / "model.pt")
    return {
        "config": config,
        "trials": trials,
        "histories": {t.trial: read_history(t.location) for t in trials},
        "outputs": Location(str(published)),
        "spec": retrain.spec,
        "history": result.history,
        "root": root,
    }


def run_pipeline(uri: str, stages: dict, out: Path) -> dict:
    """The driver's calls, in order, after each stage; returns the ids they gave back."""
    lineage = Lineage(uri, EXPERIMENT, "digits-pipeline")
    pipeline = lineage.pipeline_run(stages["config"])
    search_runs = {}
    for trial in stages["trials"]:
        search_runs[trial.trial] = lineage.log_search_trial(trial, stages["histories"][trial.trial])
    chosen = select_top(stages["trials"], k=1)
    write_selection(Location(str(out)), stages["trials"], chosen)
    selection = lineage.log_selection(Location(str(out)), chosen, "val_acc")
    source = chosen[0].trial.trial
    retrain = lineage.log_retrain(
        "digits-pipeline-champion",
        "champion",
        stages["config"],
        stages["history"],
        source,
        {"random_percentile": 75.0},
        started=1_700_100_000.0,
        ended=1_700_100_042.0,
    )
    version = lineage.register_champion(retrain, stages["outputs"], stages["spec"], MODEL, source)
    lineage.finish()
    return {
        "pipeline": pipeline,
        "search": search_runs,
        "selection": selection,
        "retrain": retrain,
        "version": version,
        "source": source,
    }


def all_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)


@pytest.fixture(scope="module")
def store(stages: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One sqlite store with a whole pipeline logged into it."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/db/mlflow.db"
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)  # anything written to MLflow's defaults (./mlflow.db, ./mlruns) would land here
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        ids = run_pipeline(uri, stages, root / "selection")
    return {"uri": uri, "ids": ids, "root": root, "cwd": cwd, "client": MlflowClient(uri, registry_uri=uri)}


# ---------------------------------------------------------------------------------------------------- URIs


def test_resolve_tracking_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == DEFAULT_TRACKING_URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri(None) == "http://tracking:5000"
    assert resolve_tracking_uri("sqlite:///nested/dir/m.db") == "sqlite:///nested/dir/m.db"
    assert (tmp_path / "nested" / "dir").is_dir()
    for refused in ("mlruns", "/tmp/mlruns", "file:///tmp/mlruns", "file:mlruns"):
        with pytest.raises(ConfigError, match="file store.*sqlite:///"):
            resolve_tracking_uri(refused)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    with pytest.raises(ConfigError, match="file store"):
        resolve_tracking_uri(None)


# ---------------------------------------------------------------------------------------------------- lineage


def test_lineage_reaches_search_pipeline_and_data(store: dict, stages: dict) -> None:
    client, ids = store["client"], store["ids"]
    found = walk_lineage(store["uri"], MODEL)
    assert found["retrain_run"] == ids["retrain"]
    assert found["search_run"] == ids["search"][ids["source"]]
    assert found["search_key"] == ids["source"]
    assert found["pipeline_run"] == ids["pipeline"]
    digest, name, rows = dataset_digest(stages["config"])
    assert (found["dataset_digest"], found["dataset_name"], found["dataset_rows"]) == (digest, name, 200)
    assert json.loads(found["genotype"]) == DARTS_V2.to_dict()
    assert ids["version"].run_id == ids["retrain"]
    assert client.get_model_version_by_alias(MODEL, "champion").version == ids["version"].version
    # every child hangs off the pipeline run, and the search runs carry the same data set
    for run_id in [*ids["search"].values(), ids["selection"], ids["retrain"]]:
        assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == ids["pipeline"]
        assert client.get_run(run_id).info.status == "FINISHED"
    search_inputs = client.get_run(ids["search"][ids["source"]]).inputs.dataset_inputs
    assert [d.dataset.digest for d in search_inputs] == [digest]
    selection = client.get_run(ids["selection"]).data
    assert json.loads(selection.tags["raydarts.selected_search_runs"]) == [found["search_run"]]
    assert {a.path for a in client.list_artifacts(ids["selection"])} == {"selection.csv", "selection.json"}
    # nothing went to MLflow's global defaults; artifacts sit beside the database
    assert list(store["cwd"].iterdir()) == []
    assert client.get_run(ids["retrain"]).info.artifact_uri.startswith(str(store["root"] / "db" / "mlartifacts"))


def test_search_runs_hold_cells_metrics_and_artifacts(store: dict, stages: dict) -> None:
    client = store["client"]
    for trial in stages["trials"]:
        run = client.get_run(store["ids"]["search"][trial.trial])
        params = run.data.params
        # one param per node and cell, in canonical order; no flat duplicate of the whole genotype
        cells = {k: v for k, v in params.items() if k.startswith(("normal.", "reduce."))}
        assert cells == genotype_params(trial.genotype)
        assert params["normal.n0"] == node_formulas(trial.genotype, "normal")[0]
        assert "genotype" not in params and not any(k.startswith("derived.") for k in params)
        assert params["search.seed"] == str(trial.config.search.seed)
        assert params["search.primitives"] == json.dumps(trial.config.search.primitives)
        config_params = {k: v for k, v in params.items() if k not in cells}
        assert from_params(config_params, PipelineConfig) == trial.config  # params -> config -> the same trial
        # a readable name, what tells searches apart as tags, the cell as the run's description
        assert run.info.run_name == search_label(trial.config) == f"search s{trial.config.search.seed} 1st"
        tags = run.data.tags
        seed = str(trial.config.search.seed)
        assert (tags["raydarts.seed"], tags["raydarts.xi"], tags["raydarts.order"]) == (seed, "0", "first")
        assert cell_markdown(trial.genotype) in tags[NOTE]
        assert Genotype.from_dict(json.loads(tags["raydarts.genotype"])) == trial.genotype
        # when the search ran, not when it was logged
        assert (run.info.start_time, run.info.end_time) == (int(trial.started * 1000), int(trial.ended * 1000))
        for key in ("train_loss", "val_acc", "alpha_entropy_normal", "second_order_steps"):
            history = client.get_metric_history(run.info.run_id, f"search/{key}")
            expected = [(row.epoch, getattr(row, key)) for row in stages["histories"][trial.trial]]
            assert sorted((m.step, m.value) for m in history) == expected
        assert set(run.data.metrics) == {f"search/{key}" for key in trial.last.metrics()}
        # pictures: each epoch's cell and α as MLflow images (chart view, step slider), the final ones on top
        top = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"genotype.json", "genotype.txt", "history.json", "cell.png", "alpha.png", "cells.gif"} <= top
        assert not {"cells", "alpha"} & top
        steps = Lineage(store["uri"], EXPERIMENT, "digits-pipeline")._logged_steps(run.info.run_id)
        assert steps == {"cell": {1, 2}, "alpha": {1, 2}}


def test_retrain_run_holds_curves_and_links(store: dict, stages: dict) -> None:
    client, ids = store["client"], store["ids"]
    run = client.get_run(ids["retrain"])
    tags = run.data.tags
    assert run.info.run_name == "retrain champion"
    assert (run.info.start_time, run.info.end_time) == (1_700_100_000_000, 1_700_100_042_000)
    assert tags["raydarts.role"] == "champion"
    assert tags["raydarts.source_search_run"] == ids["search"][ids["source"]]
    assert tags["raydarts.pipeline_run"] == ids["pipeline"]
    assert cell_markdown(DARTS_V2) in tags[NOTE]
    assert "genotype" not in run.data.params
    assert run.data.params["normal.n3"] == "skip_connect(c_{k-2}) + dil_conv_3x3(n0)"
    assert parse_genotype(run.data.params["retrain.genotype"]) == DARTS_V2
    split = stages["history"][-1].eval_split
    for key, name in (("train_loss", "train_loss"), ("eval_acc", f"{split}_acc"), ("lr", "lr")):
        history = client.get_metric_history(ids["retrain"], f"retrain/{name}")
        assert [(m.step, m.value) for m in history] == [(row.epoch, getattr(row, key)) for row in stages["history"]]
    assert not any(key.startswith(("retrain/eval_", "final_")) for key in run.data.metrics)
    assert run.data.metrics["random_percentile"] == 75.0
    assert {"learning_curves.png", "cell.png"} <= {a.path for a in client.list_artifacts(ids["retrain"])}


def test_one_cell_has_one_set_of_params_whatever_its_edge_order() -> None:
    flipped = Genotype(
        normal=[(op, i) for k in range(0, 8, 2) for op, i in reversed(DARTS_V2.normal[k : k + 2])],
        normal_concat=list(reversed(DARTS_V2.normal_concat)),
        reduce=DARTS_V2.reduce,
        reduce_concat=DARTS_V2.reduce_concat,
    )
    assert genotype_params(flipped) == genotype_params(DARTS_V2)
    assert genotype_params(DARTS_V2)["normal.concat"] == "n0, n1, n2, n3"
    assert len(genotype_params(DARTS_V2)) == 2 * (DARTS_V2.nodes + 1)


@pytest.mark.parametrize(
    ("key", "label"),
    [
        ("p-champion", "retrain champion"),
        ("p-candidate-2", "retrain candidate 2"),
        ("p-random-11", "retrain random 11"),
        ("p-baseline-DARTS_V2", "retrain DARTS_V2"),
        ("p-baseline-random", "retrain best random cell"),
    ],
)
def test_retrain_labels(key: str, label: str) -> None:
    assert retrain_label(key, "p") == label


# ---------------------------------------------------------------------------------------------------- model


def test_champion_loads_by_alias_and_predicts_like_the_network(store: dict, stages: dict) -> None:
    dataset, info = load_dataset("digits", "test", limit=12)
    batch = (dataset.images.to(torch.float32) / 255.0).numpy()  # (12, 1, 8, 8) in [0, 1]
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(store["uri"])
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
        probabilities = model.predict(batch)
    finally:
        mlflow.set_tracking_uri(None)
        if previous_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
    assert probabilities.shape == (12, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    network = EvalNetwork(DARTS_V2, in_channels=1, channels=4, num_classes=10, layers=3, auxiliary=False)
    network.load_state_dict(torch.load(stages["outputs"].local_path / "model.pt", weights_only=True))
    network.eval()
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(network((torch.from_numpy(batch) - mean) / std)[0], dim=1).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    # raw pixels in [0, 255]: through the pyfunc with pixel_max, or as uint8 to the class itself
    np.testing.assert_allclose(model.predict(batch * 255.0, params={"pixel_max": 255}), expected, atol=1e-5)
    python_model = model.unwrap_python_model()
    np.testing.assert_allclose(python_model.predict(None, dataset.images.numpy()), expected, atol=1e-5)
    # the class itself also takes (N, H, W) one-channel images, and names a wrong shape
    np.testing.assert_allclose(python_model.predict(None, batch[:, 0]), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        python_model.predict(None, np.zeros((2, 3, 8, 8)))
    # through the pyfunc too: float64 and (N, H, W) as documented; a wrong shape is one line, without the array
    np.testing.assert_allclose(model.predict(batch.astype(np.float64)), expected, atol=1e-5)
    np.testing.assert_allclose(model.predict(batch[:, 0]), expected, atol=1e-5)
    with pytest.raises(ValueError) as refused:
        model.predict(np.full((2, 3, 8, 8), 0.123456))
    assert len(str(refused.value).splitlines()) == 1 and "0.123456" not in str(refused.value)


def test_the_model_and_experiment_describe_themselves(store: dict) -> None:
    client = store["client"]
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert "digits-pipeline" in version.description and cell_markdown(DARTS_V2) in version.description
    assert "input" in client.get_registered_model(MODEL).description.lower()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # model training, not GenAI


# ---------------------------------------------------------------------------------------------------- reruns


def test_rerun_creates_no_runs_and_no_versions(store: dict, stages: dict) -> None:
    client = store["client"]
    before = {run.info.run_id for run in all_runs(client)}
    versions = client.search_model_versions(f"name = '{MODEL}'")
    again = run_pipeline(store["uri"], stages, store["root"] / "selection-again")
    assert {run.info.run_id for run in all_runs(client)} == before
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == len(versions) == 1
    assert again["retrain"] == store["ids"]["retrain"] and again["search"] == store["ids"]["search"]
    assert again["version"].version == store["ids"]["version"].version
    # a driver that died between logging the model and registering it finds the logged model again
    lineage = Lineage(store["uri"], EXPERIMENT, "digits-pipeline")
    lineage.pipeline_run(stages["config"])
    model_uri, model_id = lineage._logged_model(store["ids"]["retrain"], stages["outputs"], stages["spec"])
    assert model_id == walk_lineage(store["uri"], MODEL)["model_id"]
    assert model_uri == f"models:/{model_id}" == store["ids"]["version"].source


def test_an_unfinished_child_is_completed_once(tmp_path: Path, stages: dict) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    trial = stages["trials"][0]
    history = stages["histories"][trial.trial]
    lineage = Lineage(uri, EXPERIMENT, "crash")
    lineage.pipeline_run(stages["config"])
    # live logging wrote the first epoch, then the driver died half-way through completing the run
    live = lineage.open_search_run(trial.trial, trial.config, started=trial.started)
    lineage.log_search_epoch(live, history[0], trial.config)
    lineage.log_search_epoch(live, history[0], trial.config)  # an epoch reported again after a resume

    def crash(run_id: str) -> None:
        lineage.log_epoch(run_id, history[1], "search")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lineage._child("search", trial.trial, {}, crash, "crash")
    assert MlflowClient(uri).get_run(live).info.status == "FAILED"
    again = Lineage(uri, EXPERIMENT, "crash")
    again.pipeline_run(stages["config"])
    run_id = again.log_search_trial(trial, history)
    assert run_id == live
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.start_time == int(trial.started * 1000)
    assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "search/val_acc")] == [1, 2]
    assert again._logged_steps(run_id) == {"cell": {1, 2}, "alpha": {1, 2}}
    assert len(again._find("search", trial.trial)) == 1


def test_concurrent_writers_share_one_sqlite_store(tmp_path: Path, stages: dict) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Lineage(uri, EXPERIMENT, "threads").pipeline_run(stages["config"])
    trial = stages["trials"][0]
    errors: list[BaseException] = []
    history = stages["histories"][trial.trial]
    writers, runs_each = 3, 2  # each run drawn while the others write

    def writer(n: int) -> None:
        try:
            lineage = Lineage(uri, EXPERIMENT, "threads")
            lineage.pipeline_run(stages["config"])
            for k in range(runs_each):
                lineage.log_search_trial(trial.model_copy(update={"trial": f"t{n}-{k}"}), history)
        except BaseException as err:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    client = MlflowClient(uri)
    lineage = Lineage(uri, EXPERIMENT, "threads")
    for n in range(writers):
        for k in range(runs_each):
            (run,) = lineage._find("search", f"t{n}-{k}")
            assert run.info.status == "FINISHED"
            assert [m.step for m in client.get_metric_history(run.info.run_id, "search/val_acc")] == [1, 2]
            assert "cell.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_the_same_data_inserted_by_another_pipeline_meanwhile_is_linked(tmp_path: Path, stages: dict) -> None:
    """MLflow looks the dataset up, then inserts it. Another pipeline's row arriving in between (two pipelines of
    one data starting at once) fails that insert on the store's uniqueness constraint; the run still gets linked,
    to the one row. The other pipeline's insert is made, with its own id, just before ours reaches the store."""
    import sqlite3

    from sqlalchemy import event

    db = tmp_path / "mlflow.db"
    lineage = Lineage(f"sqlite:///{db}", EXPERIMENT, "late")
    engine = lineage.client._tracking_client.store.engine
    raced: list[str] = []

    def other_pipeline_inserts_first(conn, cursor, statement: str, parameters, context, executemany) -> None:
        if statement.lstrip().startswith("INSERT INTO datasets") and not raced:
            raced.append(parameters[0])
            with sqlite3.connect(db) as other:
                other.execute(statement, ("other-pipeline", *parameters[1:]))

    event.listen(engine, "before_cursor_execute", other_pipeline_inserts_first)
    try:
        run_id = lineage.pipeline_run(stages["config"])
    finally:
        event.remove(engine, "before_cursor_execute", other_pipeline_inserts_first)
    assert len(raced) == 1, "the store no longer inserts datasets this way: the race is not reproduced"
    digest, name, _ = dataset_digest(stages["config"])
    (linked,) = lineage.client.get_run(run_id).inputs.dataset_inputs
    assert (linked.dataset.name, linked.dataset.digest) == (name, digest)
    with sqlite3.connect(db) as store:
        assert store.execute("SELECT dataset_uuid FROM datasets").fetchall() == [("other-pipeline",)]


def test_two_pipelines_at_once_keep_their_own_model_and_alias(tmp_path: Path, stages: dict) -> None:
    """Two pipelines of one config under different names, registering into one store at the same time."""
    from components.pipeline import model_name

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = stages["config"]
    errors: list[BaseException] = []

    def pipeline(name: str) -> None:
        try:
            lineage = Lineage(uri, EXPERIMENT, name)
            lineage.pipeline_run(config)
            retrain = lineage.log_retrain(f"{name}-champion", "champion", config, stages["history"], None, {})
            lineage.register_champion(retrain, stages["outputs"], stages["spec"], model_name(config, name))
            lineage.finish()
        except BaseException as err:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=pipeline, args=(name,)) for name in ("north", "south")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    client = MlflowClient(uri, registry_uri=uri)
    for name in ("north", "south"):
        version = client.get_model_version_by_alias(name, "champion")
        assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
        assert str(version.version) == "1"
        assert version.tags["raydarts.pipeline"] == name
        assert walk_lineage(uri, name)["pipeline"] == name
