"""Data-parallel DARTS search on Ray Train: the nas/ search loop on N workers with α identical on every rank.

Weights are synchronized by DDP. Every gradient that enters the α step (∇w L_train of the virtual step, ∇w' L_val,
the final α gradient) is averaged across ranks by the architect's reducer, so every rank takes the same α step:
the result is that of one process on the global batch (per-worker batch × workers), batch-norm statistics aside;
``ray.sync_bn`` makes those global too. Learning rates are per global batch as configured: if you raise the
number of workers at a fixed per-worker batch, scale ``search.w_lr`` linearly with the global batch (and keep
ξ = the weight lr), the usual rule for SGD.

Each epoch rank 0 writes a checkpoint (weights, α, both optimizers, scheduler, epoch, every rank's RNG states,
the genotype history) through ``ray.train.report``; a lost worker restarts the group from it
(``ray.max_failures``), and running the same command again (same name and storage) resumes instead of restarting.

    python -m components.search --config digits --set ray.num_workers=2 --set ray.cpus_per_worker=0.5
    python -m components.search --config cifar10 --set ray.num_workers=8 --set ray.use_gpu=true \
        --set ray.storage_path=s3://bucket/raydarts

Outputs, in ``<storage_path>/<name>/outputs/``: genotype.json, genotype.txt, history.json (metrics and α per
epoch), cells/epoch_NNN.png and alpha/epoch_NNN.png.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from components import storage
from components.config import PipelineConfig, with_absolute_paths
from components.trainer import StageError, fit, report_epoch, restore_latest, stage_main, worker_log, worker_setup
from nas.config import ConfigError
from nas.data import load_dataset
from nas.genotypes import Genotype

SYNC_FILE = "rank_sync.json"  # written when the verify_sync hook is on
OUTPUTS_MARKER = "history.json"  # published last: a search whose outputs hold it has finished

__all__ = ["SearchStageResult", "StageError", "check_data", "check_resources", "run_search_stage"]


@dataclass
class SearchStageResult:
    name: str
    genotype: Genotype
    history: list[dict[str, Any]]
    storage_dir: str
    outputs_dir: str
    checkpoint_path: str | None
    rank_sync: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final_metrics(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    @property
    def alpha_normal(self) -> torch.Tensor:
        return torch.tensor(self.history[-1]["alpha_normal"])

    @property
    def alpha_reduce(self) -> torch.Tensor:
        return torch.tensor(self.history[-1]["alpha_reduce"])


# --- before any worker starts --------------------------------------------------------------------------------------
def check_data(config: PipelineConfig) -> None:
    """Fail early and clearly on missing or unreadable data (the workers would fail the same way, later)."""
    data = config.data
    load_dataset(data.source, "train", root=data.root, download=data.download, limit=1, image_size=data.image_size)


def check_resources(config: PipelineConfig, available_cpus: float, available_gpus: float) -> None:
    ray_cfg = config.ray
    need_cpus = ray_cfg.num_workers * ray_cfg.cpus_per_worker
    if need_cpus > available_cpus + 1e-9 and not ray_cfg.allow_oversubscribe:
        raise ConfigError(
            f"ray.num_workers x ray.cpus_per_worker = {need_cpus:g} CPUs but the cluster has {available_cpus:g}; "
            "lower them, use fractional ray.cpus_per_worker, or set ray.allow_oversubscribe=true"
        )
    if ray_cfg.use_gpu and ray_cfg.num_workers * ray_cfg.gpus_per_worker > available_gpus + 1e-9:
        raise ConfigError(
            f"ray.use_gpu with {ray_cfg.num_workers} workers x {ray_cfg.gpus_per_worker:g} GPUs "
            f"but the cluster has {available_gpus:g} GPUs"
        )


def ensure_ray(config: PipelineConfig) -> None:
    """Connect to the configured cluster, RAY_ADDRESS, or start a local Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(address=config.ray.address, log_to_driver=True, configure_logging=False)


def cluster_capacity() -> tuple[float, float]:
    import ray

    resources = ray.cluster_resources()
    return float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))


def storage_root(config: PipelineConfig) -> str:
    """Local storage paths become absolute (workers may run elsewhere); URIs pass through."""
    path = config.ray.storage_path
    return path if "://" in path else str(Path(path).expanduser().resolve())


# --- inside each worker ---------------------------------------------------------------------------------------------
def _search_worker(loop_config: dict[str, Any]) -> None:
    from components.distributed import average_tensors, sum_tensors
    from nas.artifacts import save_epoch_pictures, save_search_outputs, write_json
    from nas.loop import LoopContext
    from nas.search import SearchRun

    config = PipelineConfig.model_validate(loop_config["config"])
    hooks = loop_config.get("hooks") or {}
    rank, world, device, wrap = worker_setup(config)
    sync_diffs: list[float] = []
    sync_log: list[dict[str, Any]] = []  # per epoch: the largest difference between ranks after every step

    def step_hook(step: int) -> None:
        fault = hooks.get("fault")
        if fault and rank == fault["rank"] and step == fault["step"] and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).write_text(f"killed rank {rank} at step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        if hooks.get("verify_sync") and world > 1 and step > 0:
            sync_diffs.append(_max_rank_difference(run.network))

    context = LoopContext(
        rank=rank, world_size=world, device=device, grad_reducer=average_tensors, sum_reducer=sum_tensors,
        wrap_model=wrap, log=worker_log, step_hook=step_hook,
    )  # fmt: skip
    if hooks.get("node_log"):  # test-only: where each rank ran
        import ray

        Path(hooks["node_log"], f"rank_{rank}").write_text(ray.get_runtime_context().get_node_id())
    run = SearchRun(config, context)
    restore_latest(run, rank, world, "search")

    def on_epoch(report: Any, search_run: SearchRun) -> None:
        metrics: dict[str, Any] = {
            "epoch": report.epoch + 1,
            **report.metrics(),
            "order": "second" if report.xi > 0 else "first",
            "genotype": str(report.genotype),
        }
        if hooks.get("verify_sync") and world > 1:
            sync_diffs.append(_max_rank_difference(search_run.network))
            metrics["rank_max_abs_diff"] = max(sync_diffs)
            metrics["rank_checks"] = len(sync_diffs)
            sync_log.append({k: metrics[k] for k in ("epoch", "rank_max_abs_diff", "rank_checks")})
            sync_diffs.clear()

        def write_files(directory: Path) -> None:
            save_search_outputs(directory, report.genotype, search_run.history)
            save_epoch_pictures(
                directory, report.epoch, report.genotype, report.alpha_normal, report.alpha_reduce,
                config.search.primitives,
            )  # fmt: skip
            write_json(directory / "config.json", config.model_dump(mode="json"))
            if sync_log:
                write_json(directory / SYNC_FILE, sync_log)

        epoch_done = report.epoch + 1
        due = epoch_done % config.ray.checkpoint_every == 0 or epoch_done == config.search.epochs
        report_epoch(metrics, due=due, rank=rank, world=world, state=search_run.state_dict, write_files=write_files)

    run.run(on_epoch)


def _max_rank_difference(network: torch.nn.Module) -> float:
    """Largest |difference| between this rank's α and w and any other rank's (0.0 when bit-identical)."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1).double() for p in network.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max(float((g - flat).abs().max()) for g in gathered)


# --- the driver -----------------------------------------------------------------------------------------------------
def run_search_stage(
    config: PipelineConfig,
    *,
    name: str | None = None,
    hooks: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
) -> SearchStageResult:
    """Run (or resume) one data-parallel search and publish its outputs next to its checkpoints."""
    config = with_absolute_paths(config)
    check_data(config)
    ensure_ray(config)
    check_resources(config, *cluster_capacity())
    name = name or f"{config.name}-search"
    root = storage_root(config)
    loop_config = {"config": config.model_dump(mode="json"), "hooks": hooks or {}}
    result = fit(_search_worker, loop_config, config, name=name, storage=root, label="search", callbacks=callbacks)
    outputs = f"{root.rstrip('/')}/{name}/outputs"
    with result.checkpoint.as_directory() as directory:
        genotype, history = publish_outputs(Path(directory), outputs, config)
        sync_path = Path(directory) / SYNC_FILE
        rank_sync = json.loads(sync_path.read_text()) if sync_path.is_file() else []
    return SearchStageResult(
        name=name, genotype=genotype, history=history, storage_dir=f"{root.rstrip('/')}/{name}",
        outputs_dir=outputs, checkpoint_path=result.checkpoint.path, rank_sync=rank_sync,
    )  # fmt: skip


def outputs_exist(outputs: str) -> bool:
    """Whether a search's outputs were published (a folder or a URI)."""
    return storage.file_exists(outputs, OUTPUTS_MARKER)


def publish_from_checkpoint(checkpoint: str, outputs: str, config: PipelineConfig) -> tuple[Genotype, list[dict]]:
    """Publish a search's outputs from one of its checkpoints (a folder or a URI).

    A sweep needs this: Tune may stop a trial (ASHA, or its last epoch) before the trial publishes by itself.
    """
    from ray.train import Checkpoint

    with Checkpoint(checkpoint).as_directory() as directory:
        return publish_outputs(Path(directory), outputs, config)


def publish_outputs(checkpoint_dir: Path, outputs: str, config: PipelineConfig) -> tuple[Genotype, list[dict]]:
    """Genotype, history and every epoch's pictures (redrawn from the α history) into ``outputs``."""
    from nas.artifacts import save_epoch_pictures
    from nas.genotypes import parse_genotype

    genotype = parse_genotype((checkpoint_dir / "genotype.json").read_text())
    history = json.loads((checkpoint_dir / "history.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("genotype.json", "genotype.txt", "history.json", "config.json"):
            (Path(tmp) / name).write_bytes((checkpoint_dir / name).read_bytes())
        for row in history:
            save_epoch_pictures(
                tmp, row["epoch"] - 1, Genotype.from_dict(row["genotype"]), row["alpha_normal"], row["alpha_reduce"],
                config.search.primitives,
            )  # fmt: skip
        storage.publish(Path(tmp), outputs, marker=OUTPUTS_MARKER)
    return genotype, history


def main(argv: list[str] | None = None) -> int:
    def show(config: PipelineConfig, result: SearchStageResult) -> None:
        print(f"genotype: {result.genotype}")
        print(f"outputs: {result.outputs_dir}")

    return stage_main("python -m components.search", __doc__, "search", run_search_stage, show, argv)


if __name__ == "__main__":
    sys.exit(main())
