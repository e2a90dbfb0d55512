"""The Ray Train search stage on a real local Ray: ranks in lock step, global batch norm, a killed worker, resume."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from processes import run_bounded
from stage_callbacks import FailOnStart, KillOnce, RankSync

from components.config import PipelineConfig
from components.driver import Prepared, prepare
from components.search import run_search_stage
from components.trainer import StageError, root_cause
from nas.config import load_config

TINY = [
    "search.steps_per_epoch=3",
    "search.batch_size=8",
    "search.layers=3",
    "search.channels=4",
    "search.nodes=2",
    "search.primitives=[none, max_pool_3x3, skip_connect, sep_conv_3x3]",
    "data.limit=200",
    "ray.cpus_per_worker=0.5",
]


def tiny(tmp_path: Path, *extra: str) -> Prepared:
    return prepare(
        load_config("digits", [*TINY, f"ray.storage_path={tmp_path / 'store'}", *extra], model=PipelineConfig)
    )


def assert_ranks_agree(sync: RankSync, epochs: int) -> None:
    """Every rank held the same α and w, bit for bit, after every step of every epoch (3 steps an epoch)."""
    assert [row["epoch"] for row in sync.rows()] == list(range(1, epochs + 1))
    for row in sync.rows():
        assert row["rank_max_abs_diff"] == 0.0
        assert row["rank_checks"] >= 3


def test_two_first_order_workers_stay_bit_identical_and_the_same_name_resumes(local_ray, tmp_path: Path) -> None:  # noqa: ANN001
    """ξ=0 here; second order (the preset's ξ) in the killed-worker test's uninterrupted run. Then the same name with
    one more epoch resumes from the checkpoint instead of starting over."""
    cfg = tiny(tmp_path, "search.epochs=2", "ray.num_workers=2", "search.xi=0")
    sync = RankSync(tmp_path / "sync.jsonl")
    result = run_search_stage(cfg, name="sync", callback=sync)
    assert [row.epoch for row in result.history] == [1, 2]
    assert_ranks_agree(sync, 2)
    assert all(row.xi == 0 and row.second_order_steps == 0 for row in result.history)
    first, last = result.history[0], result.history[-1]
    assert first.alpha_normal != last.alpha_normal
    outputs = result.outputs.local_path
    for name in ("genotype.json", "genotype.txt", "history.json", "cells/epoch_001.png", "alpha/epoch_002.png"):
        assert (outputs / name).is_file(), name
    longer = run_search_stage(tiny(tmp_path, "search.epochs=3", "ray.num_workers=2", "search.xi=0"), name="sync")
    assert [row.epoch for row in longer.history] == [1, 2, 3]
    assert longer.history[:2] == result.history  # epochs 1-2 came from the checkpoint (their timings too)
    assert longer.history[2].alpha_normal != last.alpha_normal


def test_global_batchnorm_two_workers_equal_one_worker_on_the_global_batch(local_ray, tmp_path: Path) -> None:  # noqa: ANN001
    common = ["search.epochs=2", "search.augment=false", "ray.sync_bn=true"]
    one = run_search_stage(tiny(tmp_path, *common, "ray.num_workers=1", "search.batch_size=16"), name="one")
    two = run_search_stage(tiny(tmp_path, *common, "ray.num_workers=2", "search.batch_size=8"), name="two")
    for key in ("alpha_normal", "alpha_reduce"):
        a, b = torch.tensor(getattr(one.history[-1], key)), torch.tensor(getattr(two.history[-1], key))
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()
        assert not torch.equal(a, torch.tensor(getattr(one.history[0], key)))
    assert one.history[-1].train_loss == pytest.approx(two.history[-1].train_loss, abs=1e-5)


def test_a_killed_worker_resumes_to_the_uninterrupted_result(local_ray, tmp_path: Path) -> None:  # noqa: ANN001
    """Killed in epoch 2 of 3: the group restarts from the epoch-1 checkpoint, and every epoch, the one after the redone
    one included, is the uninterrupted run's bit for bit. The uninterrupted run (second order) also checks that the
    ranks agree after every step."""
    cfg = tiny(tmp_path, "search.epochs=3", "ray.num_workers=2", "ray.max_failures=1")
    sync = RankSync(tmp_path / "sync.jsonl")
    straight = run_search_stage(cfg, name="straight", callback=sync)
    assert_ranks_agree(sync, 3)  # second order: the preset's ξ (null, the weights' lr)
    assert all(row.xi > 0 and row.second_order_steps > 0 for row in straight.history)
    marker = tmp_path / "killed"
    fault = KillOnce(rank=1, step=4, marker=marker)  # second step of epoch 2: after the epoch-1 checkpoint
    recovered = run_search_stage(cfg, name="faulty", callback=fault)
    assert marker.read_text().startswith("killed rank 1 at step 4")
    assert [(row.alpha_normal, row.alpha_reduce, row.train_loss, row.val_loss) for row in recovered.history] == [
        (row.alpha_normal, row.alpha_reduce, row.train_loss, row.val_loss) for row in straight.history
    ]
    assert recovered.genotype == straight.genotype


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ray.num_workers=0", "ray.num_workers"),
        ("ray.num_workers=3", "CPUs but the cluster has"),
        ("search.primitives=[none, conv_9x9]", "unknown primitive 'conv_9x9'"),
        ("search.xi=-0.1", "search.xi"),
        ("search.speed.cuda_graph=true", "search.speed.cuda_graph needs ray.use_gpu=true and ray.num_workers=1"),
        ("data.source=parquet:/nonexistent/cifar", "/nonexistent/cifar"),
    ],
)
def test_bad_config_fails_before_any_worker_with_one_line(tmp_path: Path, override: str, message: str) -> None:
    cmd = [sys.executable, "-m", "components.search", "--config", "digits", "--set", "ray.cpus_per_worker=1"]
    cmd += ["--set", f"ray.storage_path={tmp_path / 'store'}", "--set", "ray.address=local", "--set", override]
    env = {"RAY_ADDRESS": "", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    proc = run_bounded(cmd, timeout=300, cwd=Path(__file__).parents[1], env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "store").exists()


def test_a_worker_error_surfaces_as_one_line_with_its_own_cause(local_ray, tmp_path: Path) -> None:  # noqa: ANN001
    prepared = tiny(tmp_path, "search.epochs=1", "ray.max_failures=0")
    with pytest.raises(StageError) as caught:
        run_search_stage(prepared, name="failing", callback=FailOnStart("the data on this node is unreadable"))
    message = str(caught.value)
    assert message == "search 'failing' failed: RuntimeError: the data on this node is unreadable", message


def test_root_cause_unwraps_train_and_task_errors() -> None:
    from ray.train import ControllerError, WorkerGroupError

    worker = WorkerGroupError("rank 1 failed", {1: ValueError("betas out of range"), 0: KeyError("label 12")})
    assert root_cause(worker) == "KeyError: 'label 12'"  # the lowest rank's own error
    assert root_cause(ControllerError(worker)) == "KeyError: 'label 12'"
    try:
        try:
            raise StageError("search 'x' failed: ValueError: no data")
        except StageError as inner:
            raise RuntimeError("trial wrapper") from inner
    except RuntimeError as outer:
        assert root_cause(outer) == "search 'x' failed: ValueError: no data"
    remote = RuntimeError("ray::train() (pid=1)\nTraceback (most recent call last):\n  File x\nOSError: disk full")
    assert root_cause(remote) == "OSError: disk full"  # a traceback as text: its last line
