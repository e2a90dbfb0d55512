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

import nas
from components.config import PipelineConfig
from components.select import Candidate, TrialResult
from components.storage import Location
from nas.config import ConfigError, to_params
from nas.data import load_dataset
from nas.eval_model import NetworkSpec
from nas.genotypes import Genotype, parse_genotype
from nas.plot import save_cells

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SERVING_CODE = Path(__file__).with_name("serving.py")
T = "raydarts."  # tag prefix
ROLES = ("candidate", "random", "champion", "baseline")
_PARAM_MAX, _PARAMS_PER_BATCH, _METRICS_PER_BATCH = 6000, 100, 1000
SEARCH_FILES = ("genotype.json", "genotype.txt", "history.json", "config.json")


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


def cell_text(genotype: Genotype, cell: str) -> str:
    """One cell's edges in the authors' text form, e.g. ``[('sep_conv_3x3', 0), ...]`` (a compare-view param)."""
    edges = genotype.normal if cell == "normal" else genotype.reduce
    return "[" + ", ".join(f"({op!r}, {index})" for op, index in edges) + "]"


def _genotype_params(genotype: Genotype) -> dict[str, str]:
    return {
        "genotype": str(genotype),
        "derived.normal": cell_text(genotype, "normal"),
        "derived.reduce": cell_text(genotype, "reduce"),
        "derived.normal_concat": str(list(genotype.normal_concat)),
        "derived.reduce_concat": str(list(genotype.reduce_concat)),
    }


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


@contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point the fluent API at ``uri`` for a moment, then restore both MLflow's global URI and the env var."""
    from mlflow.tracking._tracking_service import utils

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
                self.experiment_id = self.client.create_experiment(experiment, artifact_location)
            except MlflowException:  # created by someone else in between
                self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            self.experiment_id = found.experiment_id
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

    def _log_history(self, run_id: str, history: Sequence[Any], extra: dict[str, Any] | None = None) -> None:
        """Every epoch record's ``metrics()`` at step = its (1-based) epoch; ``extra`` at the last step."""
        now, metrics = int(time.time() * 1000), []
        for record in history:
            metrics += [Metric(k, float(v), now, record.epoch) for k, v in record.metrics().items()]
        last_step = history[-1].epoch if history else 0
        metrics += [Metric(k, float(v), now, last_step) for k, v in (extra or {}).items() if _is_number(v)]
        for start in range(0, len(metrics), _METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start : start + _METRICS_PER_BATCH])

    def _log_trained(
        self, run_id: str, config: PipelineConfig, genotype: Genotype, history: Sequence[Any], extra: dict | None
    ) -> None:
        """What search and retrain runs share: flat config and cells as params, curves, the training data."""
        self._log_params(run_id, _config_params(config) | _genotype_params(genotype))
        self._log_history(run_id, history, extra)
        if self._dataset is not None:
            self.client.log_inputs(run_id, datasets=[self._dataset])

    def _child(self, stage: str, key: str, tags: dict[str, str], write: Callable[[str], None]) -> str:
        """Get-or-create one child run: FINISHED ones are reused as they are, unfinished ones replaced."""
        parent = self._pipeline_id()
        found = self._find(stage, key)
        finished = [run for run in found if run.info.status == "FINISHED"]
        for run in found:
            if run.info.status != "FINISHED":
                self.client.delete_run(run.info.run_id)
        if finished:
            return finished[0].info.run_id
        base = {"mlflow.parentRunId": parent, f"{T}pipeline": self.pipeline, f"{T}stage": stage, f"{T}key": key}
        run_id = self.client.create_run(self.experiment_id, run_name=f"{stage}-{key}", tags=base | tags).info.run_id
        try:
            write(run_id)
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

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
            self.client.log_inputs(self.run_id, datasets=[self._dataset])
        return self.run_id

    def log_search_trial(self, trial: TrialResult, history: Sequence[Any]) -> str:
        """One search trial: its resolved config, derived cells (side by side in the compare view), every epoch's
        metrics, and its published files and pictures (copied from a URI when they live on one)."""

        def write(run_id: str) -> None:
            self._log_trained(run_id, trial.config, trial.genotype, history, None)
            if trial.location is None:
                return
            with trial.location.local_copy() as out:
                for name in SEARCH_FILES:
                    if (out / name).is_file():
                        self.client.log_artifact(run_id, str(out / name))
                for folder in ("cells", "alpha"):
                    if (out / folder).is_dir():
                        self.client.log_artifacts(run_id, str(out / folder), artifact_path=folder)

        return self._child("search", trial.trial, {f"{T}search_dir": trial.outputs or ""}, write)

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
        return self._child("selection", "selection", tags, write)

    def log_retrain(
        self,
        key: str,
        role: str,
        config: PipelineConfig,
        history: Sequence[Any],
        source_search_run: str | None,
        result_metrics: dict,
    ) -> str:
        """One retrain (candidate, champion or baseline) of its config's ``retrain.genotype``, linked to the search
        that found the cell."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        search_run = self._search_run_id(source_search_run)
        genotype = parse_genotype(config.retrain.genotype)

        def write(run_id: str) -> None:
            self._log_trained(run_id, config, genotype, history, result_metrics)
            with tempfile.TemporaryDirectory() as tmp:
                if history:
                    self.client.log_artifact(run_id, str(_learning_curves(history, Path(tmp) / "learning_curves.png")))
                self.client.log_artifact(run_id, str(save_cells(genotype, Path(tmp) / "cells.png", title=key)))

        tags = {
            f"{T}role": role,
            f"{T}pipeline_run": self._pipeline_id(),
            f"{T}source_search_run": search_run or "",
            f"{T}genotype": genotype.to_json(),
        }
        return self._child("retrain", key, tags, write)

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
        try:
            self.client.create_registered_model(model_name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # the sqlite registry resolves a models:/<model id> source through a client on the *global* URI
        with _fluent_tracking_uri(self.tracking_uri):
            version = self.client.create_model_version(
                model_name, model_uri, run_id=retrain_run, tags=tags, model_id=model_id
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
        signature = ModelSignature(
            Schema([TensorSpec(np.dtype(np.float32), (-1, c, size, size))]),
            Schema([TensorSpec(np.dtype(np.float32), (-1, spec.num_classes))]),
            params=ParamSchema([ParamSpec("pixel_max", "double", 1.0)]),  # 255 for pixels in [0, 255]
        )
        requirements = [
            f"{p}=={metadata.version(p).split('+')[0]}"
            for p in ("mlflow", "torch", "torchvision", "numpy", "pydantic", "pyyaml")
        ]
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

    def finish(self, status: str = "FINISHED") -> None:
        """End the pipeline run (a no-op when it already has that status)."""
        run = self.client.get_run(self._pipeline_id())
        if run.info.status != status:
            self.client.set_terminated(run.info.run_id, status)


def _dataset_input(config: PipelineConfig) -> DatasetInput:
    """The training data as an MLflow dataset input: name, content digest, source and size (no data is copied)."""
    digest, name, rows = dataset_digest(config)
    source = CodeDatasetSource({"data.source": config.data.source, "split": "train", "limit": config.data.limit})
    meta = MetaDataset(source, name=name, digest=digest).to_dict()
    profile = json.dumps({"num_rows": rows})
    entity = Dataset(meta["name"], meta["digest"], meta["source_type"], meta["source"], profile=profile)
    return DatasetInput(entity, [InputTag("mlflow.data.context", "train")])


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
