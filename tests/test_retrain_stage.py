"""The retrain stage on a real local Ray: a lost worker, the champion chosen on held-out data, reruns that resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from stage_callbacks import KillOnce

from components.config import PipelineConfig
from components.driver import Prepared, prepare
from components.retrain import choose_champion, retrain_config, run_retrain_stage
from nas.config import load_config
from nas.genotypes import GENOTYPES, Genotype, parse_genotype

TINY = [
    "retrain.epochs=2",
    "retrain.steps_per_epoch=3",
    "retrain.batch_size=16",
    "retrain.layers=3",
    "retrain.channels=4",
    "retrain.cutout=0",
    "champion.candidate_epochs=1",
    "data.limit=300",
    "data.test_limit=60",
    "ray.cpus_per_worker=0.5",
]


def tiny(tmp_path: Path, *extra: str) -> Prepared:
    return prepare(
        load_config("digits", [*TINY, f"ray.storage_path={tmp_path / 'store'}", *extra], model=PipelineConfig)
    )


def training(prepared: Prepared, genotype: Genotype) -> Prepared:
    return prepared.with_config(retrain_config(prepared.config, genotype))


def test_a_killed_retrain_worker_resumes_to_the_uninterrupted_weights(local_ray, tmp_path: Path) -> None:  # noqa: ANN001
    cfg = training(tiny(tmp_path, "ray.num_workers=2"), GENOTYPES["DARTS_V2"])
    clean = run_retrain_stage(cfg, name="clean")
    marker = tmp_path / "killed"
    fault = KillOnce(rank=1, step=4, marker=marker)  # epoch 2, after the first checkpoint
    faulted = run_retrain_stage(cfg, name="faulted", callback=fault)
    assert marker.exists()  # the worker really died
    assert not clean.resumed and not faulted.resumed
    assert [row.train_loss for row in faulted.history] == [row.train_loss for row in clean.history]
    a = torch.load(clean.location.local_path / "model.pt", weights_only=True)
    b = torch.load(faulted.location.local_path / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert faulted.last.eval_split == "val" and faulted.last.eval_acc == clean.last.eval_acc


def test_the_champion_is_the_best_candidate_on_held_out_data_and_is_tested_once(local_ray, tmp_path: Path) -> None:  # noqa: ANN001
    cfg = tiny(tmp_path, "champion.max_concurrent=2", "champion.baselines=[DARTS_V1]", "sweep.top_k=2")
    candidates = [("trial-a", GENOTYPES["PC_DARTS"]), ("trial-b", GENOTYPES["DARTS_V2"])]
    lines: list[str] = []
    result = choose_champion(cfg, candidates, name="pick", log=lines.append)
    assert len(result.candidates) == 2
    accs = {job.source: stage.last.eval_acc for job, stage in result.candidates}
    assert all(stage.last.eval_split == "val" and len(stage.history) == 1 for _, stage in result.candidates)
    job, champion = result.champion
    assert accs[job.source] == max(accs.values())  # chosen on validation accuracy
    assert champion.genotype == dict(candidates)[job.source] and champion.role == "champion"
    assert parse_genotype(job.config.retrain.genotype) == champion.genotype  # the config says what was trained
    assert champion.spec.genotype == champion.genotype and champion.spec.layers == job.config.retrain.layers
    assert champion.last.eval_split == "test" and len(champion.history) == 2
    assert math.isnan(champion.history[0].eval_acc) and 0.0 <= champion.history[1].eval_acc <= 1.0
    [(baseline_job, baseline)] = result.baselines
    assert baseline.genotype == GENOTYPES["DARTS_V1"] and baseline.last.eval_split == "test"
    assert champion.location.exists("model.pt") and champion.location.exists("cells.png")
    assert champion.location.exists("spec.json")
    again = choose_champion(cfg, candidates, name="pick", log=lines.append)
    assert again.champion[1].resumed and all(stage.resumed for _, stage in again.candidates)
    dumped = [json.dumps(e.model_dump(mode="json")) for e in champion.history]
    assert [json.dumps(e.model_dump(mode="json")) for e in again.champion[1].history] == dumped  # NaN-safe


def test_a_finished_name_refuses_another_genotype(local_ray, tmp_path: Path) -> None:  # noqa: ANN001
    from components.trainer import StageError

    cfg = tiny(tmp_path, "retrain.epochs=1", "retrain.steps_per_epoch=1")
    run_retrain_stage(training(cfg, GENOTYPES["DARTS_V2"]), name="once")
    with pytest.raises(StageError, match="another genotype"):
        run_retrain_stage(training(cfg, GENOTYPES["PC_DARTS"]), name="once")
