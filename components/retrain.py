"""Retrain on Ray Train: the selected cells briefly on held-out data, then the champion in full, tested once.

The paper's protocol, never selection on the test set: every selected genotype's evaluation network is trained
from scratch for ``champion.candidate_epochs`` with ``retrain.val_fraction`` of the training set held out; the
candidate with the best validation accuracy is the champion; the champion (and any ``champion.baselines`` from the
genotype zoo, for a comparison inside the same experiment) is trained with the full ``retrain`` recipe on the
whole training set and evaluated once, on the test split. Each retrain is a data-parallel Train run with the
search's plumbing (DDP, optional global batch norm, checkpoints every epoch, restarts after a lost worker, resume
by name); ``champion.max_concurrent`` retrains run at once as Ray tasks.

    python -m components.retrain --config digits --set retrain.genotype=DARTS_V2 --set ray.cpus_per_worker=0.5

Outputs, in ``<storage_path>/<name>/outputs/``: result.json (history and final numbers), model.pt (the state_dict,
loadable with ``weights_only=True``), network.json (what rebuilds the network), genotype.json, cells.png.
A run whose result.json exists is finished: asking for it again returns it without starting workers.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from components import storage
from components.config import (
    PipelineConfig,
    check_champion_choice,
    with_absolute_paths,
)
from components.search import check_data, check_resources, cluster_capacity, ensure_ray, storage_root
from components.trainer import StageError, fit, report_epoch, restore_latest, stage_main, worker_log, worker_setup
from nas.data import load_dataset
from nas.genotypes import Genotype, parse_genotype

RESULT_FILE = "result.json"
WEIGHTS_FILE = "model.pt"
NETWORK_FILE = "network.json"


@dataclass
class RetrainStageResult:
    """One finished retrain: what was trained, how it went epoch by epoch, where its weights are."""

    name: str
    role: str  # candidate | champion | baseline | retrain
    genotype: Genotype
    eval_split: str
    eval_acc: float
    eval_loss: float
    history: list[dict[str, Any]]
    outputs_dir: str
    network: dict[str, Any]
    resumed: bool = False  # True when the finished result was read back rather than trained now

    @property
    def weights_path(self) -> str:
        return f"{self.outputs_dir}/{WEIGHTS_FILE}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["genotype"] = self.genotype.to_dict()
        data.pop("resumed")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrainStageResult:
        return cls(**{**data, "genotype": Genotype.from_dict(data["genotype"]), "resumed": True})


def network_arguments(config: PipelineConfig) -> dict[str, Any]:
    """What rebuilds the evaluation network and feeds it: EvalNetwork's arguments and the data's normalisation."""
    data, cfg = config.data, config.retrain
    _, info = load_dataset(data.source, "train", root=data.root, download=False, limit=1, image_size=data.image_size)
    return {
        "in_channels": info.in_channels, "channels": cfg.channels, "num_classes": info.num_classes,
        "layers": cfg.layers, "auxiliary": cfg.auxiliary, "stem": cfg.stem, "image_size": info.image_size,
        "mean": list(info.mean), "std": list(info.std), "dataset": info.name,
    }  # fmt: skip


# --- inside each worker ---------------------------------------------------------------------------------------------
def _retrain_worker(loop_config: dict[str, Any]) -> None:
    import torch

    from components.distributed import sum_tensors
    from nas.artifacts import write_json, write_text_atomic
    from nas.loop import LoopContext
    from nas.plot import save_cells
    from nas.retrain import RetrainRun

    config = PipelineConfig.model_validate(loop_config["config"])
    genotype = Genotype.from_dict(loop_config["genotype"])
    hooks = loop_config.get("hooks") or {}
    rank, world, device, wrap = worker_setup(config)

    def step_hook(step: int) -> None:
        fault = hooks.get("fault")
        if fault and rank == fault["rank"] and step == fault["step"] and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).write_text(f"killed rank {rank} at step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    context = LoopContext(
        rank=rank, world_size=world, device=device, sum_reducer=sum_tensors, wrap_model=wrap,
        log=worker_log, step_hook=step_hook,
    )  # fmt: skip
    run = RetrainRun(config, genotype, context)
    restore_latest(run, rank, world, "retrain")

    def on_epoch(report: Any, retrain_run: RetrainRun) -> None:
        metrics = {**asdict(report), "epoch": report.epoch + 1}

        def write_files(directory: Path) -> None:
            history = [{**asdict(e), "epoch": e.epoch + 1} for e in retrain_run.history]
            write_json(directory / "history.json", history)
            write_text_atomic(directory / "genotype.json", genotype.to_json() + "\n")
            write_json(directory / NETWORK_FILE, loop_config["network"])
            torch.save(retrain_run.network.state_dict(), directory / WEIGHTS_FILE)
            save_cells(genotype, directory / "cells.png", title=loop_config["role"])

        epoch_done = report.epoch + 1
        due = epoch_done % config.ray.checkpoint_every == 0 or epoch_done == config.retrain.epochs
        report_epoch(metrics, due=due, rank=rank, world=world, state=retrain_run.state_dict, write_files=write_files)

    run.run(on_epoch)


# --- the driver -----------------------------------------------------------------------------------------------------
def read_result(outputs: str) -> RetrainStageResult | None:
    """The published result of a finished retrain, or None."""
    text = storage.read_text(outputs, RESULT_FILE)
    return None if text is None else RetrainStageResult.from_dict(json.loads(text))


def run_retrain_stage(
    config: PipelineConfig,
    genotype: Genotype | None = None,
    *,
    name: str | None = None,
    role: str = "retrain",
    hooks: dict[str, Any] | None = None,
) -> RetrainStageResult:
    """Train ``genotype`` (default: ``retrain.genotype``) data-parallel with the ``retrain`` recipe; finished runs
    are read back, interrupted ones resume from their last checkpoint."""
    config = with_absolute_paths(config)
    genotype = genotype if genotype is not None else parse_genotype(config.retrain.genotype)
    name = name or f"{config.name}-retrain"
    root = storage_root(config)
    outputs = f"{root.rstrip('/')}/{name}/outputs"
    done = read_result(outputs)
    if done is not None:
        if done.genotype.canonical() != genotype.canonical():
            raise StageError(f"retrain {name!r} already holds another genotype; pick another name")
        return done
    check_data(config)
    ensure_ray(config)
    check_resources(config, *cluster_capacity())
    loop_config = {
        "config": config.model_dump(mode="json"), "genotype": genotype.to_dict(), "hooks": hooks or {},
        "network": network_arguments(config), "role": role,
    }  # fmt: skip
    result = fit(_retrain_worker, loop_config, config, name=name, storage=root, label="retrain")
    with result.checkpoint.as_directory() as directory, tempfile.TemporaryDirectory() as tmp:
        history = json.loads((Path(directory) / "history.json").read_text())
        last = history[-1]
        stage = RetrainStageResult(
            name=name, role=role, genotype=genotype, eval_split=last["eval_split"], eval_acc=last["eval_acc"],
            eval_loss=last["eval_loss"], history=history, outputs_dir=outputs, network=loop_config["network"],
        )  # fmt: skip
        for file in ("history.json", "genotype.json", NETWORK_FILE, WEIGHTS_FILE, "cells.png"):
            (Path(tmp) / file).write_bytes((Path(directory) / file).read_bytes())
        (Path(tmp) / RESULT_FILE).write_text(json.dumps(stage.to_dict(), indent=2) + "\n")
        storage.publish(Path(tmp), outputs, marker=RESULT_FILE)  # result.json last: it says the rest is there
    return replace(stage, resumed=False)


# --- the champion ---------------------------------------------------------------------------------------------------
@dataclass
class RetrainJob:
    name: str
    role: str
    genotype: Genotype
    config: PipelineConfig
    source: str | None = None  # the search trial the genotype came from (None for baselines)


@dataclass
class ChampionResult:
    candidates: list[tuple[RetrainJob, RetrainStageResult]]
    champion: tuple[RetrainJob, RetrainStageResult]
    baselines: list[tuple[RetrainJob, RetrainStageResult]] = field(default_factory=list)


def candidate_config(config: PipelineConfig) -> PipelineConfig:
    """The brief recipe: the retrain settings for ``champion.candidate_epochs``, judged on the held-out split."""
    return config.model_copy(
        update={"retrain": config.retrain.model_copy(update={"epochs": config.champion.candidate_epochs})}
    )


def full_config(config: PipelineConfig) -> PipelineConfig:
    """The full recipe on the whole training set, tested once (a copy: the pipeline's own config keeps its split)."""
    return config.model_copy(update={"retrain": config.retrain.model_copy(update={"val_fraction": 0.0})})


def run_jobs(jobs: list[RetrainJob], max_concurrent: int, trial_cpus: float) -> list[RetrainStageResult]:
    """Run retrains one after another, or ``max_concurrent`` at a time as Ray tasks; results in job order."""
    if max_concurrent <= 1 or len(jobs) <= 1:
        return [run_retrain_stage(j.config, j.genotype, name=j.name, role=j.role) for j in jobs]
    import ray

    task = ray.remote(num_cpus=trial_cpus, max_retries=0)(run_retrain_stage)
    results: dict[int, RetrainStageResult] = {}
    pending: dict[Any, int] = {}
    queue = list(enumerate(jobs))
    while queue or pending:
        while queue and len(pending) < max_concurrent:
            index, job = queue.pop(0)
            pending[task.remote(job.config, job.genotype, name=job.name, role=job.role)] = index
        ready, _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(ready[0])
        try:
            results[index] = ray.get(ready[0])
        except ray.exceptions.RayTaskError as err:
            raise StageError(str(err.cause) if err.cause else str(err).splitlines()[0]) from None
    return [results[i] for i in range(len(jobs))]


def choose_champion(
    config: PipelineConfig, candidates: list[tuple[str, Genotype]], *, name: str, log: Any = print
) -> ChampionResult:
    """Brief retrains of the candidates (when there is a choice to make), the champion and baselines in full."""
    if not candidates:
        raise StageError("no candidate genotypes to retrain")
    if len(candidates) > 1:
        check_champion_choice(config)
    brief = candidate_config(config)
    jobs = [RetrainJob(f"{name}-candidate-{i}", "candidate", g, brief, source) for i, (source, g) in
            enumerate(candidates, start=1)]  # fmt: skip
    ranked: list[tuple[RetrainJob, RetrainStageResult]] = []
    if len(jobs) > 1:
        log(f"retraining {len(jobs)} candidates for {brief.retrain.epochs} epochs on held-out data")
        results = run_jobs(jobs, config.champion.max_concurrent, config.champion.trial_cpus)
        ranked = sorted(zip(jobs, results), key=lambda pair: -_score(pair[1].eval_acc))
        best = ranked[0][0]
    else:
        log("one candidate: it is the champion")
        best = jobs[0]
    full = full_config(config)
    finals = [RetrainJob(f"{name}-champion", "champion", best.genotype, full, best.source)]
    finals += [RetrainJob(f"{name}-baseline-{zoo}", "baseline", parse_genotype(zoo), full) for zoo in
               config.champion.baselines]  # fmt: skip
    log(f"training the champion{' and baselines' if len(finals) > 1 else ''} for {full.retrain.epochs} epochs")
    results = run_jobs(finals, config.champion.max_concurrent, config.champion.trial_cpus)
    pairs = list(zip(finals, results))
    return ChampionResult(candidates=ranked, champion=pairs[0], baselines=pairs[1:])


def _score(value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def main(argv: list[str] | None = None) -> int:
    def show(config: PipelineConfig, result: RetrainStageResult) -> None:
        print(f"{result.eval_split} accuracy: {result.eval_acc:.2%}")
        print(f"outputs: {result.outputs_dir}")

    return stage_main("python -m components.retrain", __doc__, "retrain", run_retrain_stage, show, argv)


if __name__ == "__main__":
    sys.exit(main())
