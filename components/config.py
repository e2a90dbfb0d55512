"""The pipeline's configuration: the nas/ sections plus where and how the stages run on Ray.

It is one object from the command line to the workers: validated here, passed to every stage unchanged, logged
as it is. Load it with ``nas.config.load_config(preset, overrides, model=PipelineConfig)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from nas.config import Config, ConfigError, _Section, load_config
from nas.genotypes import GENOTYPES


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray cluster address; null: RAY_ADDRESS or a local Ray")
    num_workers: int = Field(1, ge=1, description="data-parallel workers per search or retrain")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, description="fractional CPUs let several workers share a core")
    gpus_per_worker: float = Field(1.0, ge=0)
    sync_bn: bool = Field(False, description="batch-norm statistics over the global batch (exact equivalence)")
    storage_path: str = Field("runs/ray", description="local folder, shared path or URI (s3://, gs://)")
    max_failures: int = Field(2, ge=-1, description="restarts from the last checkpoint after a lost worker")
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

    @model_validator(mode="after")
    def _xi_non_negative(self) -> SweepConfig:
        for value in self.xi:
            if value is not None and value < 0:
                raise ValueError(f"xi values must be >= 0 or null, got {value}")
        return self


class ChampionConfig(_Section):
    candidate_epochs: int = Field(
        2, gt=0, description="brief retrain of each selected genotype, judged on held-out data"
    )
    baselines: list[str] = Field(default_factory=list, description="zoo cells retrained with the champion's recipe")
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
    model_name: str | None = Field(None, description="registered model name; null: the config's name")


class PipelineConfig(Config):
    ray: RayConfig = Field(default_factory=RayConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    champion: ChampionConfig = Field(default_factory=ChampionConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def with_absolute_paths(config: PipelineConfig) -> PipelineConfig:
    """The config with its local paths made absolute, as the driver sees them.

    Workers and Tune trials run in other folders (Tune moves each trial into its own), so a relative
    ``runs/ray`` or ``parquet:../data`` would point elsewhere there.
    """
    data = config.data
    kind, sep, where = data.source.partition(":")
    source = f"{kind}:{_absolute(where)}" if sep and kind in ("parquet", "imagefolder") else data.source
    return config.model_copy(update={
        "data": data.model_copy(update={"source": source, "root": _absolute(data.root)}),
        "ray": config.ray.model_copy(update={"storage_path": _absolute(config.ray.storage_path)}),
    })  # fmt: skip


def check_champion_choice(config: PipelineConfig) -> None:
    """Candidates are compared on held-out training data, never on the test set.

    Not a model validator: the champion's own final retrain is this same config with ``val_fraction = 0``.
    """
    if config.sweep.top_k > 1 and config.retrain.val_fraction == 0:
        raise ConfigError(
            "choosing among sweep.top_k > 1 candidates needs retrain.val_fraction > 0 (never the test set)"
        )


PIPELINE_PRESETS = Path(__file__).resolve().parents[1] / "pipelines" / "presets"


def load_pipeline_config(preset: str, overrides: Sequence[str] = ()) -> PipelineConfig:
    """A pipeline preset (pipelines/presets: quick, cifar10, cifar10-cpu), a nas/ preset, or a YAML path."""
    path = PIPELINE_PRESETS / f"{preset}.yaml"
    config = load_config(
        path if not Path(preset).suffix and path.is_file() else preset, overrides, model=PipelineConfig
    )
    check_champion_choice(config)
    return config


def pipeline_presets() -> list[str]:
    return sorted(p.stem for p in PIPELINE_PRESETS.glob("*.yaml"))


def stage_arguments(prog: str, description: str, default_name: str, argv: list[str] | None) -> argparse.Namespace:
    """The command line every stage shares: a preset or YAML file, overrides, and the run name to reuse."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default="digits", help="preset name or YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--name", default=None, help=f"run name (default: {default_name}); reuse it to resume")
    return parser.parse_args(argv)
