"""What the search and retrain stages share on Ray Train: the trainer, per-rank checkpoints, resume, the report.

A checkpoint is a folder: ``state.pt`` (the loop's ``state_dict()`` plus every rank's RNG states, loaded with
``weights_only=True``) and whatever files the stage adds (genotype, history, pictures). Rank 0 writes it through
``ray.train.report``; the other ranks report metrics only. A restarted group (lost worker, or the same run name
again) loads the latest one, so the loop continues exactly where it stopped.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from components.config import PipelineConfig

STATE_FILE = "state.pt"


class StageError(RuntimeError):
    """A stage could not start or did not finish; the message says why in one line."""


def worker_log(message: str) -> None:
    """A progress line from a worker, printed once on the driver.

    Train V2 patches ``print`` to go both to its logger and to the (wrapped) stdout, which shows every line twice;
    writing to the process's own stdout bypasses that, and Ray forwards it to the driver.
    """
    print(message, file=sys.__stdout__, flush=True)


def restore_latest(run: Any, rank: int, world: int, label: str) -> bool:
    """Load the latest checkpoint of this Train run into ``run`` (and this rank's RNGs); False when there is none."""
    import ray.train

    from nas.loop import set_rng_state

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    run.load_state_dict(state)
    per_rank = state.get("rng_per_rank") or []
    if len(per_rank) == world:
        set_rng_state(per_rank[rank])
    if rank == 0:
        worker_log(f"resumed {label} from checkpoint at epoch {run.epoch}")
    return True


def report_epoch(
    metrics: dict[str, Any],
    *,
    due: bool,
    rank: int,
    world: int,
    state: Callable[[], dict[str, Any]],
    write_files: Callable[[Path], None],
) -> None:
    """Report this epoch's metrics; when a checkpoint is due, rank 0 attaches state.pt and the stage's files."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    from nas.loop import rng_state

    rngs = [rng_state()]
    if due and world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state())
    if due and rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            saved = state()
            saved["rng_per_rank"] = rngs
            torch.save(saved, Path(tmp) / STATE_FILE)
            write_files(Path(tmp))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def worker_setup(config: PipelineConfig) -> tuple[int, int, torch.device, Callable[[torch.nn.Module], torch.nn.Module]]:
    """This worker's rank, world size, device and the model wrapper (global batch norm if asked, then DDP)."""
    import ray.train
    import ray.train.torch

    from components.distributed import convert_to_global_batchnorm, wrap_ddp

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.ray.cpus_per_worker)))

    def wrap(network: torch.nn.Module) -> torch.nn.Module:
        if config.ray.sync_bn and world > 1:
            convert_to_global_batchnorm(network)
        ignore = network.alpha_names() if hasattr(network, "alpha_names") else ()
        return wrap_ddp(network, device, ignore=ignore)

    return rank, world, device, wrap


def fit(
    worker: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    config: PipelineConfig,
    *,
    name: str,
    storage: str,
    label: str,
    callbacks: list[Any] | None = None,
) -> Any:
    """Run ``worker`` on ``ray.num_workers`` Train workers (gloo on CPU, NCCL on GPU); the Train result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray_cfg = config.ray
    resources: dict[str, float] = {"CPU": ray_cfg.cpus_per_worker}
    if ray_cfg.use_gpu:
        resources["GPU"] = ray_cfg.gpus_per_worker
    trainer = TorchTrainer(
        worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if ray_cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=ray_cfg.checkpoints_to_keep),
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker errors; keep the first line of the cause
        raise StageError(f"{label} {name!r} failed: {str(err).strip().splitlines()[0]}") from err
    if result.checkpoint is None:
        raise StageError(f"{label} {name!r} finished without a checkpoint")
    return result


def stage_main(
    prog: str,
    doc: str,
    stage: str,
    run: Callable[..., Any],
    show: Callable[[PipelineConfig, Any], None],
    argv: list[str] | None,
) -> int:
    """A stage's command line: preset or YAML, ``--set`` overrides, ``--name`` (``run(config, name=...)``); a bad
    input is one line, exit 2."""
    from components.config import load_pipeline_config, stage_arguments
    from nas.config import ConfigError
    from nas.data import DataError

    args = stage_arguments(prog, doc.splitlines()[0], f"<config name>-{stage}", argv)
    try:
        config = load_pipeline_config(args.config, args.overrides)
        result = run(config, name=args.name)
    except (ConfigError, DataError, StageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    show(config, result)
    return 0
