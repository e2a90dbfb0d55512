"""The pipeline's lineage in MLflow, written by one process (the driver) after each stage.

Runs are found again by tags, not remembered: ``raydarts.pipeline`` (the pipeline name), ``raydarts.stage``
(pipeline, search, selection, retrain) and ``raydarts.key`` (stable per child). So every call is idempotent: a
child found FINISHED is returned untouched, one found unfinished (a driver that died while logging it) is deleted
and logged again, and a rerun of a finished pipeline creates no run and no model version. Workers never touch
MLflow. ``MlflowClient`` is used throughout, so nothing global changes, except inside :meth:`register_champion`,
where ``mlflow.pyfunc.log_model`` needs a fluent active run (the global URI is restored afterwards).

Lineage of the registered champion: version -> retrain run -> source search run -> pipeline run -> data set
(name + content digest); :func:`walk_lineage` follows it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
import torch
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelStatus, Metric, Param, Run, ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec
from ray.tune import Callback

import nas
from components.config import PipelineConfig, retrain_label, search_label
from components.select import Candidate, TrialResult
from components.storage import Location
from nas.config import ConfigError, to_params
from nas.data import load_dataset
from nas.eval_model import NetworkSpec
from nas.genotypes import Genotype, cell_markdown, input_name, node_formulas, parse_genotype
from nas.plot import alpha_figure, cells_figure, figure_image, save_alpha_heatmap, save_cells, save_cells_animation
from nas.search import SearchEpoch

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SERVING_CODE = Path(__file__).with_name("serving.py")
T = "raydarts."  # tag prefix
ROLES = ("candidate", "random", "champion", "baseline")
_PARAM_MAX, _PARAMS_PER_BATCH, _METRICS_PER_BATCH = 6000, 100, 1000
SEARCH_FILES = ("genotype.json", "genotype.txt", "history.json", "config.json")
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow's record of what the experiment is
UI_RUNS_VIEW = "workflowType=machine_learning"  # MLflow 3.17's UI opens on GenAI traces without it (see experiment_url)
NOTE = "mlflow.note.content"  # a run's description in the UI (Markdown)
_IMAGE_STEP = re.compile(r"^(?:.*/)?(?P<key>[^/+]+)\+step\+(?P<step>\d+)\+")


def experiment_url(ui: str, experiment_id: str) -> str:
    """The link that opens an experiment on its runs in MLflow's UI at ``ui`` (``http://127.0.0.1:5000``).

    MLflow 3.17's UI picks its view per browser (machine learning or GenAI, GenAI by default) and ignores the
    experiment's kind tag; the ``workflowType`` query parameter selects the runs view for this link."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}?{UI_RUNS_VIEW}"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """The configured URI, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``; file stores are refused."""
    uri = (configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI).strip()
    if urlparse(uri).scheme in ("", "file") and not uri.startswith("databricks"):
        raise ConfigError(
            f"tracking URI {uri!r} is a file store, which MLflow 3.17 no longer supports; "
            "use sqlite:///path/mlflow.db (or an http(s):// tracking server)"
        )
    if path := _sqlite_path(uri):
        with contextlib.suppress(OSError):  # an unwritable place: check_tracking says so in one line
            path.parent.mkdir(parents=True, exist_ok=True)
    return uri


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """The tracking store answers and can be written, within seconds (ConfigError, one line, otherwise): a server's
    health check for http(s), a writable folder for sqlite. MLflow itself would retry for minutes."""
    import urllib.error
    import urllib.request

    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                status = response.status
        except urllib.error.HTTPError as err:
            status = err.code
        except Exception as err:
            reason = getattr(err, "reason", err)
            raise ConfigError(f"MLflow tracking server {uri} does not answer within {timeout:g}s: {reason}") from None
        if status != 200:
            raise ConfigError(f"{uri} is not an MLflow tracking server: its /health answers HTTP {status}")
    elif path := _sqlite_path(uri):
        path = path.expanduser().resolve()
        folder = path.parent if path.exists() else next(p for p in path.parents if p.exists())
        try:  # a probe file, gone at once: permission bits alone say nothing for root or read-only mounts
            with tempfile.TemporaryFile(dir=folder):
                pass
            writable = not path.exists() or os.access(path, os.W_OK)
        except OSError:
            writable = False
        if not writable:
            raise ConfigError(f"MLflow database {path} cannot be written there ({folder} is not writable)")


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the current directory unless absolute)."""
    path = uri.removeprefix("sqlite:///").split("?")[0] if uri.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


def dataset_digest(config: PipelineConfig) -> tuple[str, str, int]:
    """(content digest, name, rows) of the configured training data: the same digest means the same examples."""
    data = config.data
    dataset, info = load_dataset(
        data.source, "train", root=data.root, download=False, limit=data.limit, image_size=data.image_size
    )
    sha = hashlib.sha256()
    if isinstance(dataset.images, torch.Tensor):  # one uint8 tensor: hashed through the buffer, without a copy
        sha.update(repr(tuple(dataset.images.shape)).encode())
        sha.update(dataset.images.contiguous().numpy())
    else:  # image files read on demand (imagefolder): their bytes, so the digest does not depend on where they are
        for path in dataset.images.paths:
            content = Path(path).read_bytes()
            sha.update(len(content).to_bytes(8, "little") + content)
    sha.update(dataset.labels.to(torch.int64).contiguous().numpy())
    return sha.hexdigest()[:16], info.name, len(dataset)


def genotype_params(genotype: Genotype) -> dict[str, str]:
    """A cell as MLflow params, one per node and cell, edges in canonical order (``normal.n0 =
    sep_conv_3x3(c_{k-2}) + dil_conv_3x3(c_{k-1})``), so the compare view lines up node by node and shows no
    difference between a search and the retrain of its cell."""
    params = {}
    for cell in ("normal", "reduce"):
        for node, formula in enumerate(node_formulas(genotype, cell)):
            params[f"{cell}.n{node}"] = formula
        concat = genotype.normal_concat if cell == "normal" else genotype.reduce_concat
        params[f"{cell}.concat"] = ", ".join(input_name(i) for i in sorted(concat))
    return params


def _epoch_metrics(record: Any, prefix: str) -> dict[str, float]:
    """An epoch record's metrics under ``<prefix>/``; a retrain's eval numbers named by their split (``val_acc``,
    ``test_acc``), and the epochs that measured nothing (NaN) left out."""
    split = getattr(record, "eval_split", None)
    metrics = {}
    for key, value in record.metrics().items():
        if split and key.startswith("eval_"):
            if value is None or math.isnan(value):
                continue
            key = f"{split}_{key.removeprefix('eval_')}"
        metrics[f"{prefix}/{key}"] = float(value)
    return metrics


def _config_params(config: PipelineConfig) -> dict[str, str]:
    """The flat config as MLflow params, exactly (``nas.config.from_params`` reads it back)."""
    return to_params(config)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _quoted(value: str) -> str:
    """A value safe inside a single-quoted MLflow filter string (MLflow has no escaping for quotes)."""
    if "'" in value or "\\" in value:
        raise ValueError(f"names and keys must not contain quotes or backslashes: {value!r}")
    return f"'{value}'"


def _client(tracking_uri: str) -> MlflowClient:
    """A client bound to one store. Concurrent sqlite writers need no retries here: MLflow's sqlite sessions set
    ``PRAGMA busy_timeout = 20000``, so a writer waits for the lock instead of failing with "database is locked"."""
    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


_UNIQUE_CONFLICT = ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry")  # sqlite, postgres, mysql


def _log_dataset(client: MlflowClient, run_id: str, dataset: DatasetInput) -> None:
    """Link ``run_id`` to the training data. MLflow's store looks the dataset up, then inserts it if missing: two
    pipelines logging the same data for the first time at once can both insert, and the later one fails on the
    store's uniqueness constraint. Its transaction is rolled back whole, so logging again finds the earlier row."""
    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=[dataset])
            return
        except MlflowException as err:
            if attempt == 2 or not any(text in str(err) for text in _UNIQUE_CONFLICT):
                raise


_FLUENT = threading.RLock()  # MLflow's fluent URI is process-wide: one user at a time


@contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point the fluent API at ``uri`` for a moment, then restore both MLflow's global URI and the env var. Threads
    of one process (two pipelines in one interpreter) take turns, so none restores the URI under another."""
    from mlflow.tracking._tracking_service import utils

    with _FLUENT:
        saved, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved)
            if saved_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved_env


class Lineage:
    """The one writer of a pipeline's runs; construct it anew on every driver start, it finds what exists."""

    def __init__(self, tracking_uri: str, experiment: str, pipeline: str, artifact_location: str | None = None):
        """``artifact_location`` applies to a new experiment; for sqlite it defaults to ``mlartifacts/`` beside
        the database (MLflow's default, ``./mlruns``, would follow the current directory)."""
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.client = _client(self.tracking_uri)
        self.pipeline = pipeline
        self.experiment = experiment
        _quoted(pipeline)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            if artifact_location is None and (path := _sqlite_path(self.tracking_uri)):
                artifact_location = str(path.resolve().parent / "mlartifacts" / re.sub(r"[^\w.-]", "_", experiment))
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location, EXPERIMENT_KIND)
            except MlflowException:  # created by someone else in between
                self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            self.experiment_id = found.experiment_id
            if not found.tags.get(*EXPERIMENT_KIND):
                for tag, value in EXPERIMENT_KIND.items():
                    self.client.set_experiment_tag(self.experiment_id, tag, value)
        self.run_id: str | None = None
        self._dataset: DatasetInput | None = None

    # ---------------------------------------------------------------------------------------------- helpers

    def _find(self, stage: str, key: str) -> list[Run]:
        query = f"tags.`{T}pipeline` = {_quoted(self.pipeline)} AND tags.`{T}stage` = '{stage}'"
        query += f" AND tags.`{T}key` = {_quoted(key)}"
        order = ["attributes.start_time ASC"]
        return list(self.client.search_runs([self.experiment_id], query, ViewType.ACTIVE_ONLY, order_by=order))

    def _pipeline_id(self) -> str:
        if self.run_id is None:
            raise RuntimeError("call pipeline_run(config) first: every stage run hangs off the pipeline run")
        return self.run_id

    def _log_params(self, run_id: str, params: dict[str, str], existing: dict[str, str] | None = None) -> None:
        existing = existing or {}
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            warnings.warn(f"run {run_id} keeps its first values of {', '.join(changed)}", stacklevel=3)
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for start in range(0, len(new), _PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=new[start : start + _PARAMS_PER_BATCH])

    def _log_history(self, run_id: str, history: Sequence[Any], prefix: str, extra: dict[str, Any] | None) -> None:
        """Every epoch record's metrics at step = its (1-based) epoch, under ``<prefix>/``; ``extra`` at the last
        step. Idempotent: each epoch is one batch, and epochs already in the run are not logged again."""
        if not history:
            return
        sentinel = next(iter(_epoch_metrics(history[0], prefix)), None)
        done = {m.step for m in self.client.get_metric_history(run_id, sentinel)} if sentinel else set()
        for record in history:
            if record.epoch not in done:
                self.log_epoch(run_id, record, prefix)
        logged = self.client.get_run(run_id).data.metrics
        now = int(time.time() * 1000)
        last = [Metric(k, float(v), now, history[-1].epoch) for k, v in (extra or {}).items() if _is_number(v)]
        if last := [m for m in last if m.key not in logged]:
            self.client.log_batch(run_id, metrics=last)

    def log_epoch(self, run_id: str, record: Any, prefix: str, timestamp: float | None = None) -> None:
        """One epoch record's metrics, in one batch, at step = its epoch."""
        now = int((timestamp or time.time()) * 1000)
        metrics = [Metric(k, v, now, record.epoch) for k, v in _epoch_metrics(record, prefix).items()]
        for start in range(0, len(metrics), _METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start : start + _METRICS_PER_BATCH])

    def _log_trained(
        self,
        run_id: str,
        config: PipelineConfig,
        genotype: Genotype,
        history: Sequence[Any],
        prefix: str,
        extra: dict | None,
    ) -> None:
        """What search and retrain runs share: flat config and cells as params, curves, the training data."""
        run = self.client.get_run(run_id)
        self._log_params(run_id, _config_params(config) | genotype_params(genotype), run.data.params)
        self._log_history(run_id, history, prefix, extra)
        if self._dataset is not None and not (run.inputs and run.inputs.dataset_inputs):
            _log_dataset(self.client, run_id, self._dataset)

    def _logged_steps(self, run_id: str) -> dict[str, set[int]]:
        """Steps of the images logged by key (``log_image(key=..., step=...)``), read from the artifact names."""
        steps: dict[str, set[int]] = {}
        for artifact in self.client.list_artifacts(run_id, "images"):
            if match := _IMAGE_STEP.match(artifact.path):
                steps.setdefault(match["key"], set()).add(int(match["step"]))
        return steps

    def log_search_pictures(
        self, run_id: str, records: Sequence[SearchEpoch], primitives: Sequence[str], label: str
    ) -> None:
        """The cell and the α heatmap of each epoch as MLflow images (keys ``cell`` and ``alpha``, step = epoch):
        the chart view then shows the cells of the selected runs side by side, with a step slider. Steps already
        logged are skipped."""
        done = self._logged_steps(run_id)
        for record in records:
            if record.epoch not in done.get("cell", set()):
                title = f"{label}, epoch {record.epoch}"
                self.client.log_image(
                    run_id, figure_image(cells_figure(record.genotype, title)), key="cell", step=record.epoch
                )
            if record.epoch not in done.get("alpha", set()):
                figure = alpha_figure(record.alpha_normal, record.alpha_reduce, primitives, f"epoch {record.epoch}")
                self.client.log_image(run_id, figure_image(figure), key="alpha", step=record.epoch)

    def _child(
        self,
        stage: str,
        key: str,
        tags: dict[str, str],
        write: Callable[[str], None],
        run_name: str,
        started: float | None = None,
        ended: float | None = None,
    ) -> str:
        """Get-or-create one child run and write it: FINISHED ones are reused as they are; an unfinished one (a
        live run, or a driver that died while logging it) is completed, since every write is idempotent.
        ``started``/``ended``: when the work itself ran (seconds since the epoch), not when it was logged."""
        run_id = self._open_child(stage, key, tags, run_name, started)
        if self.client.get_run(run_id).info.status == "FINISHED":
            return run_id
        try:
            write(run_id)
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        end = int(ended * 1000) if ended is not None and math.isfinite(ended) else None
        self.client.set_terminated(run_id, "FINISHED", end_time=end)
        return run_id

    def _open_child(self, stage: str, key: str, tags: dict[str, str], run_name: str, started: float | None) -> str:
        """The child run ``(stage, key)``: a FINISHED one, else the latest unfinished one (set RUNNING again), else a
        new one, started at ``started``. Failed duplicates of an earlier attempt are deleted."""
        parent = self._pipeline_id()
        found = self._find(stage, key)
        finished = [run for run in found if run.info.status == "FINISHED"]
        unfinished = [run for run in found if run.info.status != "FINISHED"]
        keep = finished[0] if finished else unfinished[-1] if unfinished else None
        for run in found:
            if run is not keep:
                self.client.delete_run(run.info.run_id)
        if keep is not None:
            if keep.info.status != "FINISHED":
                self.client.update_run(keep.info.run_id, status="RUNNING")
            return keep.info.run_id
        base = {"mlflow.parentRunId": parent, f"{T}pipeline": self.pipeline, f"{T}stage": stage, f"{T}key": key}
        start = int(started * 1000) if started is not None and math.isfinite(started) else None
        return self.client.create_run(
            self.experiment_id, start_time=start, run_name=run_name, tags=base | tags
        ).info.run_id

    def _search_run_id(self, ref: str | None) -> str | None:
        """A search trial key of this pipeline resolved to its run id; anything else is taken as a run id."""
        if not ref:
            return None
        found = [run for run in self._find("search", ref) if run.info.status == "FINISHED"]
        return found[0].info.run_id if found else ref

    # ---------------------------------------------------------------------------------------------- stages

    def pipeline_run(self, config: PipelineConfig) -> str:
        """Get-or-create the parent run; log the config and the training data (name + digest) it lacks."""
        found = self._find("pipeline", self.pipeline)
        if found:
            run = self.client.get_run(found[0].info.run_id)
        else:
            tags = {f"{T}pipeline": self.pipeline, f"{T}stage": "pipeline", f"{T}key": self.pipeline}
            run = self.client.create_run(self.experiment_id, run_name=self.pipeline, tags=tags)
        self.run_id = run.info.run_id
        self._log_params(self.run_id, _config_params(config), run.data.params)
        if run.inputs and run.inputs.dataset_inputs:
            self._dataset = run.inputs.dataset_inputs[0]
        else:
            self._dataset = _dataset_input(config)
            _log_dataset(self.client, self.run_id, self._dataset)
        return self.run_id

    def _search_tags(self, config: PipelineConfig) -> dict[str, str]:
        xi = config.search.xi
        return {
            f"{T}seed": str(config.search.seed),
            f"{T}xi": "lr" if xi is None else f"{xi:g}",
            f"{T}order": "first" if xi == 0 else "second",
        }

    def open_search_run(self, trial: str, config: PipelineConfig, started: float | None = None) -> str:
        """The search run of a trial that is still running (get-or-create, RUNNING), with its config as params, so
        its epochs can be logged as they are reported (:meth:`log_search_epoch`)."""
        tags = self._search_tags(config) | {f"{T}live": "true"}
        run_id = self._open_child("search", trial, tags, search_label(config), started)
        run = self.client.get_run(run_id)
        if run.info.status != "FINISHED":
            self._log_params(run_id, _config_params(config), run.data.params)
        return run_id

    def log_search_epoch(self, run_id: str, record: SearchEpoch, config: PipelineConfig) -> None:
        """One epoch of a running search: its metrics (``search/...``), its cell and α pictures, its cell so far.
        An epoch reported again (a trial resumed from an earlier checkpoint) is not logged twice."""
        sentinel = next(iter(_epoch_metrics(record, "search")))
        if record.epoch not in {m.step for m in self.client.get_metric_history(run_id, sentinel)}:
            self.log_epoch(run_id, record, "search")
        self.log_search_pictures(run_id, [record], config.search.primitives, search_label(config))
        self.client.set_tag(run_id, NOTE, _search_note(config, record))

    def attach(self) -> str:
        """Find this pipeline's run (made by :meth:`pipeline_run`) without logging anything to it."""
        found = self._find("pipeline", self.pipeline)
        if not found:
            raise RuntimeError(f"pipeline {self.pipeline!r} has no run in experiment {self.experiment!r} yet")
        self.run_id = found[0].info.run_id
        return self.run_id

    def log_search_trial(self, trial: TrialResult, history: Sequence[Any]) -> str:
        """One search trial: its resolved config and derived cell as params (one per node), every epoch's metrics
        and pictures (MLflow images, step = epoch), the final cell and α, an animation of the cell over the epochs,
        and its published files. Completes the run that live logging started, if there is one."""
        config, label = trial.config, search_label(trial.config)

        def write(run_id: str) -> None:
            self._log_trained(run_id, config, trial.genotype, history, "search", None)
            self.log_search_pictures(run_id, history, config.search.primitives, label)
            self.client.set_tag(run_id, NOTE, _search_note(config, trial.last))
            self.client.set_tag(run_id, f"{T}genotype", trial.genotype.to_json())
            logged = {a.path for a in self.client.list_artifacts(run_id)}
            with tempfile.TemporaryDirectory() as tmp:
                pictures = {
                    "cell.png": lambda path: save_cells(trial.genotype, path, title=label),
                    "alpha.png": lambda path: save_alpha_heatmap(
                        trial.last.alpha_normal, trial.last.alpha_reduce, config.search.primitives, path, label
                    ),
                }
                if history:
                    titles = [f"{label}, epoch {record.epoch}" for record in history]
                    pictures["cells.gif"] = lambda path: save_cells_animation(
                        [record.genotype for record in history], path, titles
                    )
                for name, draw in pictures.items():
                    if name not in logged:
                        self.client.log_artifact(run_id, str(draw(Path(tmp) / name)))
            if trial.location is None:
                return
            with trial.location.local_copy() as out:
                for name in SEARCH_FILES:
                    if (out / name).is_file() and name not in logged:
                        self.client.log_artifact(run_id, str(out / name))

        tags = self._search_tags(config) | {f"{T}search_dir": trial.outputs or ""}
        return self._child("search", trial.trial, tags, write, label, trial.started, trial.ended)

    def log_selection(self, selection: Location | None, selected: Sequence[Candidate], metric: str) -> str:
        """The selection: its table as artifacts, the chosen trials and genotypes by rank, links to their runs."""
        runs = [self._search_run_id(c.trial.trial) for c in selected]

        def write(run_id: str) -> None:
            params = {"selection.metric": metric}
            for c in selected:
                params |= {
                    f"rank_{c.rank}.trial": c.trial.trial,
                    f"rank_{c.rank}.genotype": str(c.genotype)[:_PARAM_MAX],
                }
            self._log_params(run_id, params)
            now = int(time.time() * 1000)
            ranks = [Metric(f"rank_{c.rank}.{metric}", c.metric, now, 0) for c in selected if _is_number(c.metric)]
            self.client.log_batch(run_id, metrics=ranks)
            if selection is not None:
                with selection.local_copy() as folder:
                    for name in ("selection.csv", "selection.json"):
                        if (folder / name).is_file():
                            self.client.log_artifact(run_id, str(folder / name))

        tags = {
            f"{T}selected_trials": json.dumps([c.trial.trial for c in selected]),
            f"{T}selected_search_runs": json.dumps(runs),
        }
        return self._child("selection", "selection", tags, write, "selection")

    def log_retrain(
        self,
        key: str,
        role: str,
        config: PipelineConfig,
        history: Sequence[Any],
        source_search_run: str | None,
        result_metrics: dict,
        started: float | None = None,
        ended: float | None = None,
    ) -> str:
        """One retrain (candidate, random cell, champion or baseline) of its config's ``retrain.genotype``, linked to
        the search that found the cell: metrics ``retrain/...`` per epoch, its cell, its learning curves."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        search_run = self._search_run_id(source_search_run)
        genotype = parse_genotype(config.retrain.genotype)
        label = retrain_label(key, self.pipeline)

        def write(run_id: str) -> None:
            self._log_trained(run_id, config, genotype, history, "retrain", result_metrics)
            self.client.set_tag(run_id, NOTE, _retrain_note(label, role, genotype, history))
            logged = {a.path for a in self.client.list_artifacts(run_id)}
            with tempfile.TemporaryDirectory() as tmp:
                if history and "learning_curves.png" not in logged:
                    self.client.log_artifact(run_id, str(_learning_curves(history, Path(tmp) / "learning_curves.png")))
                if "cell.png" not in logged:
                    self.client.log_artifact(run_id, str(save_cells(genotype, Path(tmp) / "cell.png", title=label)))

        tags = {
            f"{T}role": role,
            f"{T}pipeline_run": self._pipeline_id(),
            f"{T}source_search_run": search_run or "",
            f"{T}genotype": genotype.to_json(),
        }
        return self._child("retrain", key, tags, write, label, started, ended)

    def register_champion(
        self,
        retrain_run: str,
        outputs: Location,
        spec: NetworkSpec,
        model_name: str,
        source_search_run: str | None = None,
    ) -> ModelVersion:
        """Log the retrained network (``model.pt`` under ``outputs``, built from ``spec``) as a pyfunc model (from
        code, no pickles), register it, alias ``champion``.

        Idempotent: a version of ``model_name`` tagged with this pipeline run is returned as it is.
        """
        pipeline_run = self._pipeline_id()
        for version in self.client.search_model_versions(f"name = {_quoted(model_name)}"):
            if version.tags.get(f"{T}pipeline_run") == pipeline_run:
                return version
        retrain_tags = self.client.get_run(retrain_run).data.tags
        search_run = self._search_run_id(source_search_run) or retrain_tags.get(f"{T}source_search_run", "")
        model_uri, model_id = self._logged_model(retrain_run, outputs, spec)
        tags = {
            f"{T}pipeline": self.pipeline,
            f"{T}pipeline_run": pipeline_run,
            f"{T}retrain_run": retrain_run,
            f"{T}search_run": search_run or "",
            f"{T}genotype": spec.genotype.to_json(),
            f"{T}dataset_digest": self._dataset.dataset.digest if self._dataset else "",
            f"{T}model_id": model_id,  # the sqlite registry does not keep ModelVersion.model_id
        }
        about = (
            f"DARTS cells found by the pipeline `{self.pipeline}` and retrained on {spec.dataset} "
            f"({spec.in_channels}x{spec.image_size}x{spec.image_size} images, {spec.num_classes} classes). "
            "Input: float images (N, C, H, W) in [0, 1] (or [0, 255] with params pixel_max=255); output: class "
            "probabilities. The alias `champion` points at the version the latest pipeline run registered."
        )
        try:
            self.client.create_registered_model(model_name, description=about)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        metrics = self.client.get_run(retrain_run).data.metrics
        accuracy = metrics.get("retrain/test_acc")
        data = self._dataset.dataset if self._dataset else None
        description = "\n\n".join(
            [
                f"Champion of pipeline `{self.pipeline}`: test accuracy "
                + (f"{accuracy:.2%}" if accuracy is not None else "not measured")
                + f", {spec.layers} cells of {spec.channels} channels on {spec.dataset}"
                + (f" (training data digest `{data.digest}`)" if data else "")
                + ".",
                cell_markdown(spec.genotype),
            ]
        )
        # the sqlite registry resolves a models:/<model id> source through a client on the *global* URI
        with _fluent_tracking_uri(self.tracking_uri):
            version = self.client.create_model_version(
                model_name, model_uri, run_id=retrain_run, tags=tags, model_id=model_id, description=description
            )
        self.client.set_registered_model_alias(model_name, "champion", version.version)
        return self.client.get_model_version(model_name, version.version)

    def _logged_model(self, retrain_run: str, outputs: Location, spec: NetworkSpec) -> tuple[str, str]:
        """(model URI, model id) of the run's pyfunc model; a READY one from an earlier attempt is reused."""
        query = f"source_run_id = {_quoted(retrain_run)} AND name = 'model'"  # (a status filter matches nothing)
        for model in self.client.search_logged_models([self.experiment_id], filter_string=query):
            if model.status == LoggedModelStatus.READY:
                return model.model_uri, model.model_id
        c, size = spec.in_channels, spec.image_size
        # No input schema: MLflow would refuse float64 and (N, H, W) arrays, which the model accepts, with a message
        # that prints the whole array; the model checks its input itself, in one line (NetworkSpec.normalise).
        # The input example shows the documented form.
        signature = ModelSignature(
            inputs=None,
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec.num_classes))]),
            params=ParamSchema([ParamSpec("pixel_max", "double", 1.0)]),  # 255 for pixels in [0, 255]
        )
        requirements = [
            f"{p}=={metadata.version(p).split('+')[0]}"
            for p in ("mlflow", "torch", "torchvision", "numpy", "pydantic", "pyyaml")
        ]
        end_time = self.client.get_run(retrain_run).info.end_time  # the fluent run's end would overwrite it
        with tempfile.TemporaryDirectory() as tmp, outputs.local_copy() as published:
            spec_file = Path(tmp) / "spec.json"
            spec_file.write_text(spec.model_dump_json(indent=2))
            artifacts = {"weights": str(published / "model.pt"), "spec": str(spec_file)}
            with _fluent_tracking_uri(self.tracking_uri), mlflow.start_run(run_id=retrain_run):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(SERVING_CODE),
                    artifacts=artifacts,
                    code_paths=[str(Path(nas.__file__).parent)],
                    signature=signature,
                    input_example=np.full((2, c, size, size), 0.5, dtype=np.float32),
                    pip_requirements=requirements,
                    tags={f"{T}pipeline_run": self._pipeline_id()},
                )
        self.client.set_terminated(retrain_run, "FINISHED", end_time=end_time)
        return info.model_uri, info.model_id

    def log_ranking(self, rows: Sequence[dict[str, Any]]) -> None:
        """The searched cells against the random ones on the pipeline run: the table (``ranking.json``, shown by
        the UI's artifact view and ``mlflow.load_table``) and each searched cell's ``random_percentile``."""
        run_id = self._pipeline_id()
        logged = self.client.get_run(run_id).data.metrics
        now = int(time.time() * 1000)
        metrics = [
            Metric(f"random_percentile.{row['retrain']}", float(row["random_percentile"]), now, 0)
            for row in rows
            if row["kind"] == "searched" and f"random_percentile.{row['retrain']}" not in logged
        ]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        if any(a.path == "ranking.json" for a in self.client.list_artifacts(run_id)):
            return  # logged by an earlier attempt (log_table would append the rows again)
        columns = list(dict.fromkeys(key for row in rows for key in row))
        table = {key: [row.get(key) for row in rows] for key in columns}
        self.client.log_table(run_id, data=table, artifact_file="ranking.json")

    def log_comparison(self, rows: Sequence[dict[str, Any]]) -> None:
        """The pipeline's comparison of every cell it searched and trained, on the pipeline run: the table
        ``comparison.json`` (trial, seed, ξ, cells, supernet and retrained accuracy, params, FLOPs) and the figure
        ``comparison.png`` (retrained accuracy of candidates, random cells and baselines)."""
        run_id = self._pipeline_id()
        logged = {a.path for a in self.client.list_artifacts(run_id)}
        if rows and "comparison.json" not in logged:  # (log_table appends to an existing table)
            columns = list(dict.fromkeys(key for row in rows for key in row))
            self.client.log_table(
                run_id, data={k: [row.get(k) for row in rows] for k in columns}, artifact_file="comparison.json"
            )
        if rows and "comparison.png" not in logged:
            with tempfile.TemporaryDirectory() as tmp:
                self.client.log_artifact(run_id, str(_comparison_figure(rows, Path(tmp) / "comparison.png")))

    def finish(self, status: str = "FINISHED") -> None:
        """End the pipeline run (a no-op when it already has that status)."""
        run = self.client.get_run(self._pipeline_id())
        if run.info.status != status:
            self.client.set_terminated(run.info.run_id, status)


class LiveSearchLog(Callback):
    """A Tune callback on the driver that logs each search trial to MLflow as it runs: the run is created when the
    trial starts (its real start time), and each epoch's metrics and pictures land as Tune reports them. The
    driver stays MLflow's only writer; :meth:`Lineage.log_search_trial` completes the runs after the sweep (files,
    final pictures, end time). Tune pickles its callbacks into the experiment state, so only the store's address
    is kept; a logging failure is reported once and never stops the sweep."""

    def __init__(self, tracking_uri: str, experiment: str, pipeline: str) -> None:
        self.tracking_uri, self.experiment, self.pipeline = tracking_uri, experiment, pipeline
        self._lineage: Lineage | None = None
        self._runs: dict[str, tuple[str, PipelineConfig]] = {}
        self._failed = False

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "experiment": self.experiment, "pipeline": self.pipeline}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracking_uri"], state["experiment"], state["pipeline"])

    def _guard(self, what: Callable[[], None]) -> None:
        if self._failed:
            return
        try:
            what()
        except Exception as err:  # noqa: BLE001 - live logging is a view; the runs are completed after the sweep
            self._failed = True
            print(f"[mlflow] live logging stopped ({type(err).__name__}: {err}); runs are logged after the sweep")

    def _run(self, trial: Any) -> tuple[str, PipelineConfig]:
        if trial.trial_id not in self._runs:
            if self._lineage is None:
                self._lineage = Lineage(self.tracking_uri, self.experiment, self.pipeline)
                self._lineage.attach()
            config = PipelineConfig.model_validate(trial.config)
            self._runs[trial.trial_id] = (self._lineage.open_search_run(trial.trial_id, config, time.time()), config)
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._guard(lambda: self._run(trial))

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        def log() -> None:
            if "genotype" not in result:
                return
            run_id, config = self._run(trial)
            record = SearchEpoch.model_validate({key: result[key] for key in SearchEpoch.model_fields})
            self._lineage.log_search_epoch(run_id, record, config)

        self._guard(log)


def _dataset_input(config: PipelineConfig) -> DatasetInput:
    """The training data as an MLflow dataset input: name, content digest, source and size (no data is copied)."""
    digest, name, rows = dataset_digest(config)
    source = CodeDatasetSource({"data.source": config.data.source, "split": "train", "limit": config.data.limit})
    meta = MetaDataset(source, name=name, digest=digest).to_dict()
    profile = json.dumps({"num_rows": rows})
    entity = Dataset(meta["name"], meta["digest"], meta["source_type"], meta["source"], profile=profile)
    return DatasetInput(entity, [InputTag("mlflow.data.context", "train")])


def _search_note(config: PipelineConfig, record: SearchEpoch) -> str:
    """A search run's description: which search, how far, how good, and its cell node by node."""
    xi = config.search.xi
    order = "first order (ξ = 0)" if xi == 0 else f"second order, ξ = {'the weight lr' if xi is None else f'{xi:g}'}"
    return (
        f"**{search_label(config)}**: seed {config.search.seed}, {order}. After epoch {record.epoch} of "
        f"{config.search.epochs}: supernet validation accuracy {record.val_acc:.2%}, α entropy "
        f"{record.alpha_entropy_normal:.3f} (normal) / {record.alpha_entropy_reduce:.3f} (reduce).\n\n"
        + cell_markdown(record.genotype)
    )


def _retrain_note(label: str, role: str, genotype: Genotype, history: Sequence[Any]) -> str:
    """A retrain run's description: its role, its result, its cell node by node."""
    result = ""
    if history:
        last = history[-1]
        result = f" After {last.epoch} epochs: {last.eval_split} accuracy {last.eval_acc:.2%}."
    return f"**{label}** (role: {role}).{result}\n\n" + cell_markdown(genotype)


def _comparison_figure(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Retrained accuracy per cell, grouped by role: the brief retrains (candidates against random cells, on
    held-out data) and the full ones (champion against baselines, on the test set)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = {"candidate": "#3182bd", "random": "#bdbdbd", "champion": "#e6550d", "baseline": "#31a354"}
    panels = [
        ("brief retrains (validation)", [r for r in rows if r.get("role") in ("candidate", "random")]),
        ("full retrains (test)", [r for r in rows if r.get("role") in ("champion", "baseline")]),
    ]
    panels = [(title, group) for title, group in panels if group]
    figure = Figure(figsize=(4.5 * max(1, len(panels)), 3.8))
    FigureCanvasAgg(figure)
    for ax, (title, group) in zip(figure.subplots(1, max(1, len(panels)), squeeze=False)[0], panels):
        group = sorted(group, key=lambda r: -(r.get("retrained_acc") or 0.0))
        names = [r["retrain"] for r in group]
        values = [r.get("retrained_acc") or 0.0 for r in group]
        ax.barh(names, values, color=[colours.get(r["role"], "#999999") for r in group])
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.1%}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, min(1.0, max(values, default=1.0) * 1.18 + 1e-9))
        ax.set(title=title, xlabel="accuracy")
        ax.tick_params(axis="y", labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def _learning_curves(history: Sequence[Any], path: Path) -> Path:
    """Train/eval loss and accuracy per epoch, drawn on an Agg canvas (no pyplot, no global figure state)."""
    from matplotlib.figure import Figure

    rows = [record.model_dump() for record in history]
    epochs = [row.get("epoch", i) for i, row in enumerate(rows)]
    eval_name = rows[-1].get("eval_split", "eval")
    figure = Figure(figsize=(9, 3.5))
    for ax, what in zip(figure.subplots(1, 2), ("loss", "acc")):
        for split, label in (("train", "train"), ("eval", eval_name)):
            ax.plot(epochs, [row.get(f"{split}_{what}", math.nan) for row in rows], marker="o", label=label)
        ax.set(xlabel="epoch", title="loss" if what == "loss" else "accuracy")
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def walk_lineage(tracking_uri: str, model_name: str, alias: str = "champion") -> dict[str, Any]:
    """From a registered version back to its retrain run, search run, pipeline run and training data."""
    client = _client(tracking_uri)
    version = client.get_model_version_by_alias(model_name, alias)
    retrain_id = version.run_id or version.tags[f"{T}retrain_run"]
    retrain = client.get_run(retrain_id)
    search_id = retrain.data.tags.get(f"{T}source_search_run") or None
    search = client.get_run(search_id) if search_id else None
    pipeline = client.get_run(retrain.data.tags.get(f"{T}pipeline_run") or retrain.data.tags["mlflow.parentRunId"])
    dataset = pipeline.inputs.dataset_inputs[0].dataset if pipeline.inputs.dataset_inputs else None
    return {
        "model_name": model_name,
        "version": version.version,
        "model_id": getattr(version, "model_id", None) or version.tags.get(f"{T}model_id"),
        "model_source": version.source,
        "genotype": version.tags.get(f"{T}genotype"),
        "retrain_run": retrain_id,
        "role": retrain.data.tags.get(f"{T}role"),
        "search_run": search_id,
        "search_key": search.data.tags.get(f"{T}key") if search else None,
        "pipeline_run": pipeline.info.run_id,
        "pipeline": pipeline.data.tags.get(f"{T}pipeline"),
        "dataset_name": dataset.name if dataset else None,
        "dataset_digest": dataset.digest if dataset else None,
        "dataset_rows": json.loads(dataset.profile).get("num_rows") if dataset and dataset.profile else None,
    }
