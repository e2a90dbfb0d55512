"""The console: our own lines only, each naming its run, an overall progress line; Ray's logs with ``--verbose``.

The quick pipeline's whole console is checked where users run it, under ``ray job submit``
(tests/test_pipeline.py); here, the progress arithmetic, the pipeline's work plan, and a stage's console with and
without ``--verbose``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from processes import run_bounded

from components.config import load_pipeline_config, search_label, trial_configs
from components.console import PipelineProgress, WorkPlan
from components.driver import STARTUP_CONCURRENCY, Prepared
from components.pipeline import work_plan
from components.storage import Location
from nas.data import DataSummary
from nas.genotypes import GENOTYPES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.flops import eval_network_flops, supernet_flops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUR_LINE = re.compile(r"^\[(pipeline|search s\d+ [^\]]+|retrain [^\]]+)\] ")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_counts_each_run_by_its_share_of_the_plan_and_extrapolates_the_rate() -> None:
    plan = WorkPlan(searches={"search s1 1st": 100.0, "search s1 ξ=lr 2nd": 200.0})
    plan.retrains = {"candidate": (2, 50.0), "champion": (1, 300.0), "baseline": (2, 150.0)}
    assert plan.total == 1000.0
    clock = Clock()
    progress = PipelineProgress(plan, clock)
    assert progress.fraction == 0.0 and progress.line().endswith("ETA unknown")
    clock.now += 60
    progress.epoch("search s1 ξ=lr 2nd", 1, 2)  # half of 200 units
    assert progress.fraction == pytest.approx(0.1)
    assert progress.line() == "10% of the planned work | 1m00s elapsed | ETA 9m00s"  # 100 units a minute
    progress.epoch("search s1 ξ=lr 2nd", 2, 2)
    progress.epoch("retrain candidate 2", 3, 3)  # a role's runs each count their own units
    progress.epoch("retrain DARTS_V2", 1, 6)  # a zoo cell is a baseline
    assert progress.fraction == pytest.approx((200 + 50 + 25) / 1000)
    progress.epoch("search unplanned", 1, 1)  # a run the plan does not know adds nothing
    assert progress.fraction == pytest.approx(0.275)
    finished = ["search s1 1st", "retrain candidate 1", "retrain champion", "retrain best random cell"]
    progress.complete([*finished, "retrain DARTS_V2"])  # runs read back on a resumed pipeline count in full
    assert progress.fraction == pytest.approx(1.0)
    assert progress.line().endswith("ETA 0s")


def test_the_eta_leaves_out_the_start_up_and_the_runs_read_back() -> None:
    """Two searches at once after 30 s of start-up: the rate is the work over the time since the first reported
    epoch began, so the ETA is right once both have reported, not stretched by the start-up. A stage read back on
    a resumed pipeline counts as done but took no time here, nor did a run's epochs before the checkpoint it
    resumed from."""
    plan = WorkPlan(searches={"search s1": 100.0, "search s2": 100.0}, retrains={"champion": (1, 200.0)})
    clock = Clock()
    progress = PipelineProgress(plan, clock)
    clock.now += 50  # 30 s of start-up, then 20 s of the first epoch of each search
    progress.epoch("search s1", 1, 4, seconds=20.0)
    clock.now += 1
    progress.epoch("search s2", 1, 4, seconds=20.0)  # 50 units done in 21 s: 350 units left take 147 s
    assert progress.line() == "12% of the planned work | 51s elapsed | ETA 2m27s"
    resumed = PipelineProgress(plan, clock)
    resumed.complete(["search s1", "search s2"])  # the sweep finished before the pipeline was restarted
    assert resumed.line() == "50% of the planned work | 0s elapsed | ETA unknown"
    clock.now += 40
    resumed.epoch("retrain champion", 1, 4, seconds=10.0)  # 50 units in 10 s: 150 units left take 30 s
    assert resumed.line() == "62% of the planned work | 40s elapsed | ETA 30s"
    again = PipelineProgress(plan, clock)
    clock.now += 10
    again.epoch("search s1", 3, 4, seconds=10.0)  # resumed from its checkpoint: epochs 1-2 ran before
    assert again.line() == "19% of the planned work | 10s elapsed | ETA 2m10s"  # 25 units in 10 s, 325 left


def test_the_work_plan_counts_the_flops_of_every_search_and_retrain(tmp_path: Path) -> None:
    """In forward FLOPs per image (bench/flops.py's analytic formulas, an independent count) times the images each
    run trains on (x3: forward and backward; a search step 2 such passes first order, 5 second order) and those it
    only evaluates (the α half after each search epoch, validation after each brief epoch, the test split once)."""
    overrides = [
        "sweep.seeds=[1,2]",
        "sweep.xi=[0,null]",
        "sweep.top_k=2",
        "champion.random_baselines=3",
        "champion.baselines=[DARTS_V2]",
        "search.steps_per_epoch=4",
        "search.batch_size=8",
        "search.epochs=3",
        "retrain.steps_per_epoch=5",
        "retrain.batch_size=16",
        "retrain.epochs=7",
        "retrain.genotype=DARTS_V1",
        "retrain.val_fraction=0.25",
        "champion.candidate_epochs=2",
        "ray.num_workers=1",
    ]
    config = load_pipeline_config("quick", overrides)
    data = DataSummary(train_rows=200, test_rows=90, num_classes=10, in_channels=1, image_size=8)
    plan = work_plan(Prepared(config, Location(str(tmp_path)), data=data))
    labels = {search_label(trial) for trial in trial_configs(config)}
    assert set(plan.searches) == labels and len(labels) == 4
    s, r = config.search, config.retrain
    supernet = supernet_flops(1, s.channels, 10, s.layers, s.nodes, s.primitives, s.stem_multiplier, 8)
    assert plan.searches["search s1 1st"] == pytest.approx(3 * (4 * 8 * 2 * 3 + 100) * supernet, rel=1e-9)
    assert plan.searches["search s2 ξ=lr 2nd"] == pytest.approx(3 * (4 * 8 * 5 * 3 + 100) * supernet, rel=1e-9)

    def cell(name: str) -> float:
        return eval_network_flops(GENOTYPES[name], 1, r.channels, 10, r.layers, input_size=8)

    brief, full = 2 * (5 * 16 * 3 + 50), 7 * 5 * 16 * 3 + 90
    assert plan.retrains["candidate"] == (2, pytest.approx(brief * cell("DARTS_V1"), rel=1e-9))
    assert plan.retrains["random"] == (3, pytest.approx(brief * cell("DARTS_V1"), rel=1e-9))
    assert plan.retrains["champion"] == (1, pytest.approx(full * cell("DARTS_V1"), rel=1e-9))
    both = (cell("DARTS_V2") + cell("DARTS_V1")) / 2  # DARTS_V2 and the best random cell (costed as the config's)
    assert plan.retrains["baseline"] == (2, pytest.approx(full * both, rel=1e-9))
    assert work_plan(Prepared(config, Location(str(tmp_path)))).total == 0  # no preflight, no data: no ETA


def _search(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "components.search", "--config", "digits", "--name", "console"]
    for override in (
        "search.epochs=2",
        "search.steps_per_epoch=2",
        "search.batch_size=16",
        "search.nodes=2",
        "search.layers=3",
        "search.channels=4",
        "data.limit=200",
        "ray.cpus_per_worker=0.5",
        "ray.address=local",  # a Ray of its own, even with a cluster up on this machine
        f"ray.storage_path={tmp_path / 'store'}",
    ):
        command += ["--set", override]
    env = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1", **(env or {})}
    return run_bounded([*command, *extra], timeout=300, cwd=ROOT, env=env)


def test_a_stage_prints_only_its_own_lines_unless_verbose(tmp_path: Path) -> None:
    """The quiet run's worker has no C compiler (the cluster the stage starts inherits $CC): it says so on the
    console, once, where its own warning would stay in its Ray log; the verbose run's worker has one and says
    nothing of it."""
    quiet = _search(tmp_path / "quiet", env={"CC": str(tmp_path / "no-such-compiler")})
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    lines = quiet.stdout.splitlines()
    ours = [line for line in lines if OUR_LINE.match(line)]
    assert ours[0] == (
        "[search s2 ξ=lr 2nd] rank 0: native kernels (search.speed.native_depthwise_grad, weightless_once, "
        "native_norm, native_sum, native_pointwise, native_pool): "
        "no C compiler (cc, gcc, clang or $CC); PyTorch's operators run"
    )
    assert [line.split(" | ")[0] for line in ours[1:]] == [
        "[search s2 ξ=lr 2nd] search epoch 1/2",  # the digits preset's seed and order name the run
        "[search s2 ξ=lr 2nd] search epoch 2/2",
    ]
    assert [line.split(":")[0] for line in lines[len(ours) :]] == ["genotype", "outputs"]
    assert quiet.stderr == ""  # no Ray, Train or MLflow line

    verbose = _search(tmp_path / "verbose", "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert sum(bool(OUR_LINE.match(line)) for line in verbose.stdout.splitlines()) == 2  # ours, once each
    assert "(TrainController pid=" in verbose.stdout + verbose.stderr  # and Ray's own, forwarded
    assert "native kernels" not in verbose.stdout + verbose.stderr  # built (or found in the cache) here


WORKERS_AT_ONCE = """
import os, sys, time
import ray
from components.config import PipelineConfig
from components.driver import STARTUP_CONCURRENCY, ensure_ray
from nas.config import load_config

ensure_ray(load_config("digits", ["ray.address=local"], model=PipelineConfig), ray_logs=False)
assert STARTUP_CONCURRENCY not in os.environ, "the driver's environment changed"


@ray.remote(num_cpus=0.01)
class Ping:
    def ping(self) -> int:
        return 1


actors = [Ping.remote() for _ in range(int(sys.argv[1]))]
print("pings", sum(ray.get([actor.ping.remote() for actor in actors])))
time.sleep(2)  # the driver's listener polls Ray's error channel
ray.shutdown()
"""


def test_a_local_ray_starting_many_workers_says_nothing_on_the_console(tmp_path: Path) -> None:
    """More Python workers than 4x the CPUs (a sweep's trials with their Train controllers and workers): the raylet
    of a Ray started by a stage warned on the console with Ray's default start-up concurrency (its CPUs)."""
    workers = 4 * (os.cpu_count() or 1) + 12  # the raylet leaves 8 out of its count (room for I/O workers)
    env = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}
    env.pop(STARTUP_CONCURRENCY, None)
    done = run_bounded([sys.executable, "-c", WORKERS_AT_ONCE, str(workers)], timeout=240, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [f"pings {workers}"]
    assert done.stderr == ""
