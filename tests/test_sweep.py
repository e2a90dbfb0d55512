"""The Ray Tune sweep on a real local Ray: an interrupted sweep restored, a Ctrl+C, then on the module's Ray a grid of
seeds with twins and ASHA."""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import run_bounded, start_local_ray, stop_local_ray
from stage_callbacks import InterruptDriver, StartLog

from components.config import PipelineConfig
from components.driver import Prepared, prepare
from components.search import read_history
from components.select import TrialResult
from components.storage import Location
from components.sweep import KEY_ENV, check_state, read_manifest, run_sweep, state_key, sweep_and_select
from components.trainer import StageError
from nas.config import load_config

TINY = [
    "search.epochs=1",
    "search.steps_per_epoch=2",
    "search.batch_size=8",
    "search.layers=3",
    "search.channels=4",
    "search.nodes=2",
    "search.primitives=[none, max_pool_3x3, skip_connect, sep_conv_3x3]",
    "data.limit=200",
    "ray.num_workers=1",
    "ray.cpus_per_worker=0.5",
    "sweep.seeds=[1,1,2]",
    "sweep.xi=[0,null]",
]
ROOT = Path(__file__).resolve().parents[1]


def finished_trials_saved(experiment: Path) -> int:
    """The most trials that one of Tune's saved experiment states in ``experiment`` records as finished."""
    counts = [0]
    for state in experiment.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):
            continue  # being written
        counts.append(sum(json.loads(trial)["status"] == "TERMINATED" for trial, _ in trials))
    return max(counts)


def test_an_interrupted_sweep_restores_without_rerunning_finished_trials(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    overrides = [*TINY, f"ray.storage_path={tmp_path}", "sweep.max_concurrent_trials=1", "ray.address=local"]
    overrides += ["sweep.seeds=[1,2,3]", "sweep.xi=[0]", "search.epochs=2"]  # three trials, one at a time
    script = (
        "import sys; sys.path.insert(0, 'tests'); import conftest; from stage_callbacks import StartLog; "
        "from components.config import PipelineConfig; from components.driver import prepare; "
        "from components.sweep import run_sweep; from nas.config import load_config; "
        f"cfg = prepare(load_config('digits', {overrides!r}, model=PipelineConfig), sweep=True); "
        f"r = run_sweep(cfg, name='restore', callback=StartLog({str(starts)!r})); "
        "print('TRIALS', len(r.trials), len(r.errors))"
    )
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 400
        while time.time() < deadline and (not starts.exists() or len(starts.read_text().split()) < 2):
            time.sleep(1)
        assert starts.exists() and len(starts.read_text().split()) >= 2, "the first trial never finished"
        while time.time() < deadline and not finished_trials_saved(tmp_path / "restore"):
            time.sleep(0.5)  # until Tune's saved experiment state records the finished trial (it signs it first)
        assert finished_trials_saved(tmp_path / "restore"), "no saved experiment state records a finished trial"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-sweep
        proc.wait()
    first_run = starts.read_text().split()
    assert len(set(first_run)) < 3, "the sweep finished before it was interrupted"
    rerun = run_bounded([sys.executable, "-c", script], timeout=900, cwd=ROOT, env=env)
    assert "TRIALS 3 0" in rerun.stdout, rerun.stderr[-3000:]
    check_state(Location(str(tmp_path)), "restore", state_key())  # the restored run signed what it wrote too
    all_starts = starts.read_text().split()
    finished_first = first_run[0]
    assert all_starts.count(finished_first) == 1  # not rerun
    assert set(all_starts) == set(first_run) | set(all_starts[len(first_run) :])
    assert len(set(all_starts)) == 3


def test_a_ctrl_c_stops_the_sweep_in_one_line_and_the_same_command_resumes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tune catches the first SIGINT, saves its state and returns as if it were done: the sweep must say that it was
    interrupted (a half-trained search must never pass for a finished one and be selected), and a rerun finishes it.
    On a Ray of its own, started before the module's (``local_ray``, for the tests below): the interrupted trial's
    actors may outlive the sweep and keep the CPUs its resumed run waits for."""
    monkeypatch.setenv(KEY_ENV, "the key of this test's pipeline")
    overrides = [*TINY, "search.epochs=2", "sweep.seeds=[1]", "sweep.xi=[0]", f"ray.storage_path={tmp_path}"]
    marker = tmp_path / "interrupted"
    start_local_ray()
    try:
        prepared = prepare(load_config("digits", overrides, model=PipelineConfig), sweep=True)
        ctrl_c = InterruptDriver(os.getpid(), epoch=1, marker=marker)
        with pytest.raises(StageError, match=r"^sweep 'ctrl-c' was interrupted \(Ctrl\+C\); its state is saved: run"):
            run_sweep(prepared, name="ctrl-c", callback=ctrl_c)
        assert marker.exists()
        resumed = run_sweep(prepared, name="ctrl-c", callback=ctrl_c)
    finally:
        stop_local_ray()
    [trial] = resumed.trials
    assert trial.complete and [row.epoch for row in read_history(trial.location)] == [1, 2]


class _Payload:
    """A pickle that runs a command when loaded: what a writer of a shared bucket could plant."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _alpha_history(trial: TrialResult) -> list[list]:
    return [[row.alpha_normal, row.alpha_reduce] for row in read_history(trial.location)]


@pytest.mark.usefixtures("local_ray")
def test_a_grid_of_seeds_with_twins_on_two_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeds 1, 1, 2 (first order): three searches, a few at a time on 2 CPUs. Seeds differ, and twins (the same
    grid point twice) are the same search to the last bit and one candidate. (The grid's expansion over several axes
    is checked below without Ray; both orders run in the tracked pipeline, tests/test_pipeline.py.)"""
    monkeypatch.setenv(KEY_ENV, "the key of this test's pipeline")
    overrides = [*TINY, f"ray.storage_path={tmp_path}", "sweep.xi=[0]", "sweep.top_k=2"]
    cfg = load_config("digits", overrides, model=PipelineConfig)
    starts = StartLog(tmp_path / "starts")
    result, selected, where = sweep_and_select(prepare(cfg, sweep=True), name="grid", callback=starts)
    assert not result.errors
    assert sorted((t.seed, t.xi) for t in result.trials) == [(1, 0.0), (1, 0.0), (2, 0.0)]
    twin, other, seed_2 = sorted(result.trials, key=lambda t: t.seed)
    assert twin.genotype == other.genotype  # the same grid point twice: the same search, to the last bit
    assert _alpha_history(twin) == _alpha_history(other)
    assert twin.metrics["val_loss"] == other.metrics["val_loss"]
    assert _alpha_history(twin) != _alpha_history(seed_2)  # seeds differ, in α's whole trajectory
    assert twin.metrics["val_loss"] != seed_2.metrics["val_loss"]
    for t in result.trials:  # each trial's resolved config is its own grid point, the rest as configured
        assert t.config.search.model_dump(exclude={"seed", "xi"}) == cfg.search.model_dump(exclude={"seed", "xi"})
        assert json.loads((t.location.local_path / "config.json").read_text()) == t.config.model_dump(mode="json")
        assert TrialResult.model_validate_json(t.model_dump_json()) == t  # a record: JSON between Kubeflow steps
    assert sorted((tmp_path / "starts").read_text().split()) == sorted(t.trial for t in result.trials)
    # the top 2 distinct cells (twins are one), each with every trial that found it; the best first
    cells = {t.genotype.canonical() for t in result.trials}
    assert len({c.genotype.canonical() for c in selected}) == len(selected) == len(cells)  # at most 2: twins are one
    for candidate in selected:
        found = sorted(t.trial for t in result.trials if t.genotype.canonical() == candidate.genotype)
        assert sorted(candidate.trials) == found
    assert selected[0].metric == max(t.metrics["val_acc"] for t in result.trials)
    rows = {r["trial"]: r for r in csv.DictReader(where.read_text("selection.csv").splitlines())}
    assert set(rows) == {t.trial for t in result.trials} and where.exists("selection.json")
    # what this pipeline wrote is signed; a pickle planted in its storage is refused before anything unpickles it
    storage = Location(str(tmp_path))
    check_state(storage, "grid", state_key())
    assert {"tuner.pkl"} < set(read_manifest(storage, "grid", state_key()))
    marker = tmp_path / "payload-ran"
    (tmp_path / "grid" / "tuner.pkl").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(StageError, match=r"sweep state file .*tuner.pkl was not written by this pipeline"):
        run_sweep(Prepared.trusted(cfg), name="grid")  # refused before Tune starts
    assert not marker.exists()
    (tmp_path / "grid" / "evil-state.json").write_text("{}")  # a file the manifest never listed
    monkeypatch.setenv(KEY_ENV, "someone else's key")  # ... and a manifest signed with another key
    with pytest.raises(StageError, match="manifest .* is not signed with this pipeline's key"):
        run_sweep(Prepared.trusted(cfg), name="grid")  # refused before Tune starts
    (tmp_path / "grid.manifest.json").unlink()
    with pytest.raises(StageError, match="has no manifest signed by this pipeline"):
        run_sweep(Prepared.trusted(cfg), name="grid")  # refused before Tune starts


@pytest.mark.usefixtures("local_ray")
def test_asha_stops_a_trailing_search_at_its_first_rung(tmp_path: Path) -> None:
    """An extra grid axis (the weights' lr) reaches the search: the trial with a 10⁴ times smaller lr trails."""
    overrides = [*TINY, f"ray.storage_path={tmp_path}", "search.epochs=2", "search.steps_per_epoch=6"]
    overrides += ["sweep.seeds=[1]", "sweep.xi=[0]", "sweep.w_lr=[0.1,0.00001]", "sweep.scheduler=asha"]
    overrides += ["sweep.metric=val_loss", "sweep.mode=min", "sweep.max_concurrent_trials=1"]
    cfg = prepare(load_config("digits", overrides, model=PipelineConfig), sweep=True)
    result, selected, where = sweep_and_select(cfg, name="asha", callback=StartLog(tmp_path / "starts"))
    order = (tmp_path / "starts").read_text().split()
    first, second = (next(t for t in result.trials if t.trial == trial_id) for trial_id in order)
    assert first.complete and first.metrics["epoch"] == 2  # nothing to compare with at the rung: it runs on
    first_rung_loss = read_history(first.location)[0].val_loss
    # ASHA (reduction factor 2) stops the second trial at epoch 1 exactly when it trails the first there.
    trails = second.metrics["val_loss"] > first_rung_loss if second.metrics["epoch"] == 1 else None
    assert second.config.search.w_lr == 0.00001 and second.metrics["epoch"] == 1 and trails
    assert not second.complete
    assert [c.trial.trial for c in selected] == [first.trial]  # a stopped search is not a candidate
    rows = list(csv.DictReader(where.read_text("selection.csv").splitlines()))
    assert sorted(float(row["w_lr"]) for row in rows) == [0.00001, 0.1]  # the selection table names the extra axis


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sweep.xi=[-1]", "xi values must be >= 0"),
        ("sweep.seeds=[]", "sweep.seeds"),
        ("sweep.alpha_lr=[0.1,-1]", "sweep grid value: invalid config: search.alpha_lr"),
        ("sweep.w_lr=[0]", "search.w_lr"),
    ],
)
def test_bad_sweep_settings_are_refused(override: str, message: str) -> None:
    from components.config import load_pipeline_config
    from nas.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_pipeline_config("digits", [override])


def test_the_grid_is_written_inside_the_config() -> None:
    from ray import tune

    from components.config import load_pipeline_config, trial_configs
    from components.sweep import param_space

    config = load_pipeline_config("quick", ["sweep.seeds=[1,2]", "sweep.xi=[0,null]", "sweep.alpha_lr=[0.1,0.2]"])
    space = param_space(config)
    assert space["search"]["seed"] == tune.grid_search([1, 2]) and space["search"]["xi"] == tune.grid_search([0, None])
    assert space["search"]["alpha_lr"] == tune.grid_search([0.1, 0.2]) and space["sweep"] == config.sweep.model_dump()
    trials = trial_configs(config)
    assert len(trials) == 8 and len({(t.search.seed, t.search.xi, t.search.alpha_lr) for t in trials}) == 8
    assert all(t.retrain == config.retrain and t.ray == config.ray for t in trials)
