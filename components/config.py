"""The pipeline's configuration: the nas/ sections plus where and how the stages run on Ray.

It is one object from the command line to the workers: validated here, passed to every stage unchanged, logged
as it is. A sweep writes its grid into it (``sweep.seeds`` at ``search.seed``, ...), so each trial's config is this
one with its grid values, validated again in the trial, and that resolved config is what selection, retrain and
MLflow see. Load it with :func:`load_pipeline_config` (a preset or YAML file, then ``--set`` overrides).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from components.storage import absolute
from nas.config import Config, ConfigError, _Section, format_validation_error, load_config
from nas.genotypes import GENOTYPES
from nas.search import SearchEpoch


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray cluster address; null: RAY_ADDRESS or a local Ray")
    num_workers: int = Field(1, ge=1, description="data-parallel workers per search or retrain")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, description="fractional CPUs let several workers share a core")
    gpus_per_worker: float = Field(1.0, ge=0)
    sync_bn: bool = Field(False, description="batch-norm statistics over the global batch (exact equivalence)")
    storage_path: str = Field("runs/ray", description="local folder, shared path or URI (s3://, gs://)")
    max_failures: int = Field(2, ge=0, le=20, description="restarts from the last checkpoint after a lost worker")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    checkpoints_to_keep: int = Field(2, ge=1)
    allow_oversubscribe: bool = Field(False, description="allow more worker CPUs than the cluster has")

    @model_validator(mode="after")
    def _gpu_resources(self) -> RayConfig:
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ValueError("use_gpu needs gpus_per_worker > 0")
        return self


class SweepConfig(_Section):
    seeds: list[int] = Field(default_factory=lambda: [2], min_length=1)
    xi: list[float | None] = Field(
        default_factory=lambda: [0.0, None], min_length=1, description="0 = first order; null = the weight lr"
    )
    alpha_lr: list[float] | None = Field(None, description="optional extra grid axis")
    alpha_weight_decay: list[float] | None = None
    w_lr: list[float] | None = None
    max_concurrent_trials: int = Field(0, ge=0, description="0: as many as the resources allow")
    trial_cpus: float = Field(0.05, gt=0, description="CPUs held by each trial's own driver (workers extra)")
    scheduler: Literal["none", "asha"] = Field("none", description="asha stops weak searches early")
    asha_grace_period: int = Field(1, ge=1)
    asha_reduction_factor: int = Field(2, ge=2)
    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    top_k: int = Field(1, ge=1)
    max_skip_connects: int | None = Field(
        None, ge=0, description="refuse cells whose normal cell has more skip_connect (P-DARTS: 2); null: keep all"
    )

    @field_validator("metric")
    @classmethod
    def _reported_metric(cls, value: str) -> str:
        known = ["epoch", *SearchEpoch.metric_names()]
        if value not in known:
            raise ValueError(f"unknown metric {value!r}; a search reports {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _xi_non_negative(self) -> SweepConfig:
        for value in self.xi:
            if value is not None and value < 0:
                raise ValueError(f"xi values must be >= 0 or null, got {value}")
        return self

    def axes(self) -> dict[str, list[Any]]:
        """The grid, keyed by the config field each axis sets in a trial (``search.seed``, ``search.xi``, ...)."""
        extra = {f"search.{axis}": getattr(self, axis) for axis in ("alpha_lr", "alpha_weight_decay", "w_lr")}
        return {"search.seed": self.seeds, "search.xi": self.xi} | {k: v for k, v in extra.items() if v}


class ChampionConfig(_Section):
    candidate_epochs: int = Field(
        2, gt=0, description="brief retrain of each selected genotype, judged on held-out data"
    )
    baselines: list[str] = Field(default_factory=list, description="zoo cells retrained with the champion's recipe")
    random_baselines: int = Field(
        0, ge=0, description="random cells trained at the candidates' budget to rank the searched ones (paper: 24)"
    )
    random_seed: int = Field(0, description="seed of the random cells")
    max_concurrent: int = Field(1, ge=1, description="retrains at once (Ray tasks); 1: one after another")
    trial_cpus: float = Field(0.05, gt=0, description="CPUs held by each concurrent retrain's own driver")

    @field_validator("baselines")
    @classmethod
    def _zoo_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in GENOTYPES:
                raise ValueError(f"unknown baseline {name!r} (the zoo has: {', '.join(GENOTYPES)})")
        return value


class MlflowConfig(_Section):
    tracking_uri: str | None = Field(None, description="null: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str | None = Field(None, description="null: the pipeline name (--name, else the config name)")
    model_name: str | None = Field(
        None, description="registered model name; null: the pipeline's name (--name, else the config's name)"
    )


class PipelineConfig(Config):
    ray: RayConfig = Field(default_factory=RayConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    champion: ChampionConfig = Field(default_factory=ChampionConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @model_validator(mode="after")
    def _cuda_graph_on_one_gpu(self) -> PipelineConfig:
        if self.search.speed.cuda_graph and (not self.ray.use_gpu or self.ray.num_workers > 1):
            raise ValueError("search.speed.cuda_graph needs ray.use_gpu=true and ray.num_workers=1 (one GPU worker)")
        return self


def search_label(config: PipelineConfig) -> str:
    """A search trial as people tell them apart: ``search s2 ξ=lr 2nd`` (seed, virtual-step lr, order) and any
    extra grid axis, e.g. ``α_lr=0.001``. ξ = 0 is first order; ξ = lr (null) uses the weight lr."""
    search, sweep = config.search, config.sweep
    parts = [f"search s{search.seed}"]
    if search.xi == 0:
        parts.append("1st")
    else:
        parts.append(f"ξ={'lr' if search.xi is None else f'{search.xi:g}'} 2nd")
    names = {"alpha_lr": "α_lr", "alpha_weight_decay": "α_wd", "w_lr": "w_lr"}
    parts += [f"{label}={getattr(search, axis):g}" for axis, label in names.items() if getattr(sweep, axis)]
    return " ".join(parts)


def retrain_label(key: str, pipeline: str) -> str:
    """A retrain run's name: ``retrain champion``, ``retrain candidate 1``, ``retrain DARTS_V2``, ``retrain random 3``,
    ``retrain best random cell``, from its key (``<pipeline>-champion``, ``<pipeline>-baseline-DARTS_V2``...)."""
    rest = key.removeprefix(f"{pipeline}-")
    if rest == "baseline-random":
        return "retrain best random cell"
    kind, _, tail = rest.partition("-")
    if kind == "baseline" and tail:
        return f"retrain {tail}"
    if kind in ("candidate", "random") and tail:
        return f"retrain {kind} {tail}"
    return f"retrain {rest}"


def with_absolute_paths(config: PipelineConfig) -> PipelineConfig:
    """The config with its local paths made absolute, as the driver sees them.

    Workers and Tune trials run in other folders (Tune moves each trial into its own), so a relative
    ``runs/ray`` or ``parquet:../data`` would point elsewhere there.
    """
    data = config.data
    kind, sep, where = data.source.partition(":")
    source = f"{kind}:{absolute(where)}" if sep and kind in ("parquet", "imagefolder") else data.source
    return config.model_copy(
        update={
            "data": data.model_copy(update={"source": source, "root": absolute(data.root)}),
            "ray": config.ray.model_copy(update={"storage_path": absolute(config.ray.storage_path)}),
        }
    )


def trial_configs(config: PipelineConfig) -> list[PipelineConfig]:
    """Every trial's config of the sweep grid, validated: a bad grid value is refused before any trial starts.

    Tune expands the same grid itself (``tune.grid_search`` inside the dumped config); this is the preflight's copy.
    """
    axes = config.sweep.axes()
    trials = []
    for values in itertools.product(*axes.values()):
        data = config.model_dump(mode="json")
        for key, value in zip(axes, values):
            section, field = key.split(".")
            data[section][field] = value
        try:
            trials.append(PipelineConfig.model_validate(data))
        except ValidationError as err:
            raise ConfigError(f"sweep grid value: {format_validation_error(err)}") from None
    return trials


def check_champion_choice(config: PipelineConfig) -> None:
    """Candidates are compared on held-out training data, never on the test set.

    Not a model validator: the champion's own final retrain is this same config with ``val_fraction = 0``.
    """
    if config.retrain.val_fraction == 0:
        if config.sweep.top_k > 1:
            raise ConfigError(
                "choosing among sweep.top_k > 1 candidates needs retrain.val_fraction > 0 (never the test set)"
            )
        if config.champion.random_baselines > 0:
            raise ConfigError(
                "ranking against champion.random_baselines needs retrain.val_fraction > 0 (never the test set)"
            )


def load_pipeline_config(preset: str, overrides: Sequence[str] = ()) -> PipelineConfig:
    """A preset (nas/presets: quick, cifar10, cifar10-cpu, cifar10-proxy, digits) or a YAML path, with overrides,
    checked whole."""
    config = load_config(preset, overrides, model=PipelineConfig)
    check_champion_choice(config)
    trial_configs(config)
    return config
