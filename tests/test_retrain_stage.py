"""The retrain stage on a real local Ray: a lost worker, the champion chosen on held-out data, reruns that resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from stage_callbacks import KillOnce

from components.config import PipelineConfig, load_pipeline_config
from components.driver import Prepared, prepare
from components.retrain import (
    RetrainJob,
    RetrainStageResult,
    choose_champion,
    random_percentile,
    ranking_table,
    retrain_config,
    run_retrain_stage,
)
from components.trainer import StageError
from nas.config import ConfigError, load_config
from nas.eval_model import NetworkSpec
from nas.genotypes import GENOTYPES, PC_DARTS, Genotype, parse_genotype, random_genotypes
from nas.retrain import RetrainEpoch

RANDOM = random_genotypes(3, seed=0)

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
    """Killed in epoch 2: the retrain resumes to the uninterrupted weights, bit for bit. Then the finished name refuses
    another genotype."""
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
    with pytest.raises(StageError, match="another genotype"):
        run_retrain_stage(training(cfg, GENOTYPES["PC_DARTS"]), name="clean")


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


def test_random_percentile_and_the_ranking_table() -> None:
    assert random_percentile(0.9, [0.5, 0.6, 0.7, 0.95]) == 75.0
    assert random_percentile(0.6, [0.5, 0.6, 0.7, 0.95]) == 37.5  # a tie counts half
    assert random_percentile(0.1, [0.5, 0.6]) == 0.0 and random_percentile(0.7, [0.5, 0.6]) == 100.0
    assert random_percentile(math.nan, [0.5]) == 0.0 and math.isnan(random_percentile(0.5, []))

    def trained(name: str, role: str, acc: float, genotype: Genotype) -> tuple[RetrainJob, RetrainStageResult]:
        sizes = dict(in_channels=1, num_classes=10, channels=4, layers=3, image_size=8)
        spec = NetworkSpec(genotype=genotype, **sizes, mean=[0.5], std=[0.2], dataset="digits")
        numbers = dict(lr=0.1, drop_path=0.0, epoch_seconds=1.0, images_per_second=1.0)
        epoch = RetrainEpoch(
            epoch=1, train_loss=1.0, train_acc=0.5, eval_loss=1.0, eval_acc=acc, eval_split="val", **numbers
        )
        job = RetrainJob(name, role, None, "trial-a" if role == "candidate" else None)  # type: ignore[arg-type]
        return job, RetrainStageResult(name=name, role=role, spec=spec, history=[epoch], outputs="x")

    searched = [trained("c1", "candidate", 0.8, GENOTYPES["DARTS_V2"]), trained("c2", "candidate", 0.4, PC_DARTS)]
    randoms = [trained(f"r{i}", "random", acc, g) for i, (acc, g) in enumerate(zip([0.3, 0.9, 0.5], RANDOM), 1)]
    rows = ranking_table(searched, randoms)
    assert [(row["retrain"], row["rank"]) for row in rows] == [("r2", 1), ("c1", 2), ("r3", 3), ("c2", 4), ("r1", 5)]
    by_name = {row["retrain"]: row for row in rows}
    assert by_name["c1"]["random_percentile"] == pytest.approx(200 / 3) and by_name["c1"]["source"] == "trial-a"
    assert by_name["c2"]["random_percentile"] == pytest.approx(100 / 3) and by_name["r1"]["random_percentile"] is None
    assert by_name["c1"]["kind"] == "searched" and by_name["r3"]["kind"] == "random"
    assert by_name["c1"]["parameter_free_normal"] == 2 and by_name["r3"]["genotype"] == str(RANDOM[2])


def test_random_baselines_need_held_out_data() -> None:
    with pytest.raises(ConfigError, match="random_baselines needs retrain.val_fraction > 0"):
        load_pipeline_config("quick", ["champion.random_baselines=2", "retrain.val_fraction=0"])
    assert load_pipeline_config("quick", ["champion.random_baselines=2"]).champion.random_baselines == 2
    paper = load_pipeline_config("cifar10")  # four searches, 100-epoch candidates, 24 random cells, DARTS_V2
    assert (paper.sweep.seeds, paper.sweep.xi, paper.sweep.top_k) == ([1, 2, 3, 4], [None], 4)
    champion = paper.champion
    assert (champion.candidate_epochs, champion.random_baselines, champion.baselines) == (100, 24, ["DARTS_V2"])
