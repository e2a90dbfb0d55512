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

Outputs, in ``<storage_path>/<name>/outputs/``: genotype.json, genotype.txt, history.json (the epoch records:
metrics, genotype and α per epoch), config.json, cells/epoch_NNN.png and alpha/epoch_NNN.png.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import PipelineConfig, search_label
from components.driver import Prepared
from components.storage import Location
from components.trainer import (
    StageCallback,
    StageError,
    fit,
    report_epoch,
    restore_latest,
    stage_main,
    start_worker,
    watch,
    worker_console,
)
from nas.genotypes import Genotype
from nas.loop import LoopContext
from nas.search import SearchEpoch

OUTPUTS_MARKER = "history.json"  # published last: a search whose outputs hold it has finished

__all__ = ["SearchStageResult", "StageError", "run_search_stage"]


@dataclass
class SearchStageResult:
    name: str
    genotype: Genotype
    history: list[SearchEpoch]
    outputs: Location


# --- inside each worker ---------------------------------------------------------------------------------------------
def _say_if_native_kernels_missing(config: PipelineConfig, context: LoopContext) -> None:
    """A CPU worker whose config asks for the native kernels but cannot build them (no C compiler there) runs
    PyTorch's slower operators; its warning would stay in its own Ray log, so each such rank says it on the console."""
    from nas import kernels

    speed = config.search.speed
    natives = (speed.native_depthwise_grad, speed.weightless_once, speed.native_norm, speed.native_sum)
    natives += (speed.native_pointwise, speed.native_pool)
    if context.device.type == "cpu" and any(natives):
        problem = kernels.native_problem()
        if problem is not None:
            context.log(f"rank {context.rank}: {problem}")


def _search_worker(loop_config: dict[str, Any]) -> None:
    from nas.artifacts import save_epoch_pictures, save_search_outputs, write_json
    from nas.search import SearchRun

    config, callback, context = start_worker(loop_config, average_alpha_gradients=True)
    rank, world = context.rank, context.world_size
    console = worker_console(loop_config)
    _say_if_native_kernels_missing(config, context)
    run = SearchRun(config, context)
    watch(context, callback, run.network)
    restore_latest(run, context, "search")

    def on_epoch(report: SearchEpoch, search_run: SearchRun) -> None:
        callback.on_epoch_end(rank, world, report.epoch, search_run.network)
        if context.is_main:
            console.epoch(report.epoch, config.search.epochs, report.epoch_seconds)

        def write_files(directory: Path) -> None:
            save_search_outputs(directory, report.genotype, search_run.history)
            save_epoch_pictures(
                directory,
                report.epoch,
                report.genotype,
                report.alpha_normal,
                report.alpha_reduce,
                config.search.primitives,
            )
            write_json(directory / "config.json", config.model_dump(mode="json"))

        due = report.epoch % config.ray.checkpoint_every == 0 or report.epoch == config.search.epochs
        report_epoch(report, due=due, rank=rank, world=world, state=search_run.state_dict, write_files=write_files)

    run.run(on_epoch)


# --- the driver -----------------------------------------------------------------------------------------------------
def run_search_stage(
    prepared: Prepared,
    *,
    name: str | None = None,
    callback: StageCallback | None = None,
    callbacks: list[Any] | None = None,
) -> SearchStageResult:
    """Run (or resume) one data-parallel search and publish its outputs next to its checkpoints.

    ``callback`` reaches every worker (see StageCallback); ``callbacks`` are Ray Train's own (Tune's reporter).
    The workers' lines name the search by :func:`search_label` (``search s2 ξ=lr 2nd``).
    """
    config = prepared.config
    name = name or f"{config.name}-search"
    loop_config = {
        "config": config.model_dump(mode="json"),
        "callback": callback,
        "console": prepared.console,
        "label": search_label(config),
    }
    result = fit(_search_worker, loop_config, prepared, name=name, label="search", callbacks=callbacks)
    outputs = search_outputs(prepared.storage, name)
    with result.checkpoint.as_directory() as directory:
        genotype, history = publish_outputs(Path(directory), outputs, config)
    return SearchStageResult(name=name, genotype=genotype, history=history, outputs=outputs)


def search_outputs(storage: Location, name: str) -> Location:
    """Where the search run ``name`` publishes its outputs: beside its checkpoints."""
    return storage.join(name, "outputs")


def read_history(outputs: Location) -> list[SearchEpoch] | None:
    """The epoch records of a published search, or None when it has not finished publishing."""
    rows = outputs.read_json(OUTPUTS_MARKER) if outputs.exists(OUTPUTS_MARKER) else None
    return None if rows is None else [SearchEpoch.model_validate(row) for row in rows]


def publish_from_checkpoint(checkpoint: str, outputs: Location, config: PipelineConfig) -> list[SearchEpoch]:
    """Publish a search's outputs from one of its checkpoints (a folder or a URI); its epoch records.

    A sweep needs this: Tune may stop a trial (ASHA, or its last epoch) before the trial publishes by itself.
    """
    from ray.train import Checkpoint

    with Checkpoint(checkpoint).as_directory() as directory:
        return publish_outputs(Path(directory), outputs, config)[1]


def publish_outputs(
    checkpoint_dir: Path, outputs: Location, config: PipelineConfig
) -> tuple[Genotype, list[SearchEpoch]]:
    """Genotype, history, config and every epoch's pictures (redrawn from the α history) into ``outputs``."""
    from nas.artifacts import save_epoch_pictures
    from nas.genotypes import parse_genotype

    genotype = parse_genotype((checkpoint_dir / "genotype.json").read_text())
    history = [SearchEpoch.model_validate(row) for row in Location(str(checkpoint_dir)).read_json(OUTPUTS_MARKER)]
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("genotype.json", "genotype.txt", OUTPUTS_MARKER, "config.json"):
            (Path(tmp) / name).write_bytes((checkpoint_dir / name).read_bytes())
        for row in history:
            save_epoch_pictures(
                tmp, row.epoch, row.genotype, row.alpha_normal, row.alpha_reduce, config.search.primitives
            )
        outputs.publish(Path(tmp), marker=OUTPUTS_MARKER)
    return genotype, history


def main(argv: list[str] | None = None) -> int:
    def show(config: PipelineConfig, result: SearchStageResult) -> None:
        print(f"genotype: {result.genotype}")
        print(f"outputs: {result.outputs}")

    return stage_main("python -m components.search", __doc__, "search", run_search_stage, show, argv)


if __name__ == "__main__":
    sys.exit(main())
