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
from components.console import WorkerConsole, open_console, quiet_libraries
from components.driver import Prepared
from nas.loop import LoopContext

STATE_FILE = "state.pt"


class StageError(RuntimeError):
    """A stage could not start or did not finish; the message says why in one line."""


class StageCallback:
    """Hooks into a stage's trials and workers, for a caller that must watch or disturb them (tests inject faults,
    check that ranks agree, record where workers ran). Ray pickles it to every trial and worker, so a subclass
    must be picklable. Every hook is called on every rank, so a hook may run a collective; the default does nothing.
    """

    def on_trial_start(self, trial_id: str) -> None:
        """A sweep trial starts (or restarts after the driver died)."""

    def on_worker_start(self, rank: int, world_size: int) -> None:
        """A worker joined the group, before its model is built."""

    def on_step(self, rank: int, world_size: int, step: int, network: torch.nn.Module) -> None:
        """Before training step ``step`` (counted over the whole run, from 0)."""

    def on_epoch_end(self, rank: int, world_size: int, epoch: int, network: torch.nn.Module) -> None:
        """After epoch ``epoch`` (1-based) was measured, before it is reported and checkpointed."""


def worker_console(loop_config: dict[str, Any]) -> WorkerConsole:
    """This worker's console: its run's label, and the driver's channel when the driver opened one."""
    return WorkerConsole(loop_config.get("label") or "run", loop_config.get("console"))


def restore_latest(run: Any, context: LoopContext, label: str) -> bool:
    """Load the latest checkpoint of this Train run into ``run`` (and this rank's RNGs); False when there is none."""
    import ray.train

    from nas.loop import restore_checkpoint, set_rng_state

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as directory:
        state = restore_checkpoint(run, Path(directory) / STATE_FILE)
    per_rank = state.get("rng_per_rank") or []
    if len(per_rank) == context.world_size:
        set_rng_state(per_rank[context.rank])
    if context.is_main:
        context.log(f"resumed {label} from checkpoint at epoch {run.epoch}")
    return True


def report_epoch(
    record: Any,
    *,
    due: bool,
    rank: int,
    world: int,
    state: Callable[[], dict[str, Any]],
    write_files: Callable[[Path], None],
) -> None:
    """Report an epoch record (its ``model_dump``, as everywhere); when a checkpoint is due, rank 0 attaches
    state.pt and the stage's files."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    from nas.loop import rng_state

    metrics = record.model_dump(mode="json")
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


def start_worker(
    loop_config: dict[str, Any], *, average_alpha_gradients: bool = False
) -> tuple[PipelineConfig, StageCallback, LoopContext]:
    """What every stage's worker does first: its config (validated again), the caller's callback (told that the
    worker started), and the LoopContext: rank, device, metric sums across ranks, the model wrapper (global batch
    norm if asked, then DDP), the α-gradient average when asked. Call :func:`watch` once the run is built."""
    import ray.train
    import ray.train.torch

    from components.distributed import average_tensors, convert_to_global_batchnorm, sum_tensors, wrap_ddp

    config = PipelineConfig.model_validate(loop_config["config"])
    callback: StageCallback = loop_config["callback"] or StageCallback()
    train_context = ray.train.get_context()
    rank, world = train_context.get_world_rank(), train_context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.ray.cpus_per_worker)))
    callback.on_worker_start(rank, world)

    def wrap(network: torch.nn.Module) -> torch.nn.Module:
        if config.ray.sync_bn and world > 1:
            convert_to_global_batchnorm(network)
        ignore = network.alpha_names() if hasattr(network, "alpha_names") else ()
        return wrap_ddp(network, device, ignore=ignore)

    context = LoopContext(
        rank=rank,
        world_size=world,
        device=device,
        sum_reducer=sum_tensors,
        wrap_model=wrap,
        log=worker_console(loop_config).log,
    )
    if average_alpha_gradients:
        context.grad_reducer = average_tensors
    return config, callback, context


def watch(context: LoopContext, callback: StageCallback, network: torch.nn.Module) -> None:
    """Call ``callback`` before every step of the run on ``context``, with the run's ``network``."""
    context.step_hook = lambda step: callback.on_step(context.rank, context.world_size, step, network)


def root_cause(err: BaseException) -> str:
    """One line naming what really failed: the innermost error under Ray's wrappers (a Train worker's own exception,
    a task's or Tune trial's cause), as ``Type: message``; a StageError's message as it is."""
    seen: set[int] = set()
    while id(err) not in seen:
        seen.add(id(err))
        failures = getattr(err, "worker_failures", None)
        inner = (
            failures[min(failures)]
            if failures
            else getattr(err, "controller_failure", None) or getattr(err, "cause", None) or err.__cause__
        )
        if not isinstance(inner, BaseException):
            break
        err = inner
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1]  # a traceback as text (an error from another process): its last line names the error
    message = lines[0] if lines else ""
    if isinstance(err, StageError) or message.startswith(f"{type(err).__name__}:"):
        return message
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def fit(
    worker: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    prepared: Prepared,
    *,
    name: str,
    label: str,
    callbacks: list[Any] | None = None,
) -> Any:
    """Run ``worker`` on ``ray.num_workers`` Train workers (gloo on CPU, NCCL on GPU); the Train result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray_cfg = prepared.config.ray
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
            storage_path=prepared.storage.uri,
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=ray_cfg.checkpoints_to_keep),
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker errors: name the worker's own
        raise StageError(f"{label} {name!r} failed: {root_cause(err)}") from err
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
    """A stage's command line: preset or YAML, ``--set`` overrides, ``--name`` (``run(prepared, name=...)``); a bad
    input is one line, exit 2, before Ray starts."""
    from components.config import load_pipeline_config
    from components.driver import prepare
    from components.storage import StorageError
    from nas.config import ConfigError, check_name, config_parser
    from nas.data import DataError

    parser = config_parser(prog, doc.splitlines()[0], "digits")
    parser.add_argument("--name", default=None, help=f"run name (default: <config name>-{stage}); reuse to resume")
    parser.add_argument("--verbose", action="store_true", help="also show Ray's own logs (workers, Tune's tables)")
    args = parser.parse_args(argv)
    try:
        if args.name is not None:
            check_name(args.name, "--name")
        config = load_pipeline_config(args.config, args.overrides)
        quiet_libraries(args.verbose)
        prepared = prepare(config, sweep=stage == "sweep", ray_logs=args.verbose)
        with open_console() as console:
            result = run(prepared.with_console(console.channel), name=args.name)
    except (ConfigError, DataError, StageError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    show(prepared.config, result)
    return 0
