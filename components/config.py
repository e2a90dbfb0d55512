"""The pipeline's configuration: the nas/ sections plus where and how the stages run on Ray.

It is one object from the command line to the workers: validated here, passed to every stage unchanged, logged
as it is. Load it with ``nas.config.load_config(preset, overrides, model=PipelineConfig)``.
"""

from __future__ import annotations

import argparse
from typing import Literal

from pydantic import Field, model_validator

from nas.config import Config, _Section


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


class PipelineConfig(Config):
    ray: RayConfig = Field(default_factory=RayConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)


def stage_arguments(prog: str, description: str, default_name: str, argv: list[str] | None) -> argparse.Namespace:
    """The command line every stage shares: a preset or YAML file, overrides, and the run name to reuse."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default="digits", help="preset name or YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--name", default=None, help=f"run name (default: {default_name}); reuse it to resume")
    return parser.parse_args(argv)
