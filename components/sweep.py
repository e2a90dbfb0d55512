"""Ray Tune sweep over seeds and ξ (optionally α lr, α weight decay, weight lr): one data-parallel search per trial.

The grid is written inside the pipeline config itself (``tune.grid_search`` at ``search.seed``, ``search.xi``, ...),
so Tune resolves each trial's config, the trial validates it again, and that config is what selection, retrain
and MLflow see. Each trial is a Tune function trainable that runs the Ray Train search stage (a ``TorchTrainer``);
its epoch records reach Tune through a relay (``_EpochRelay``) that the trial reports from its own thread. ξ = 0
trials are first order, ξ = null or > 0 second order. When every trial has finished, ``python -m components.sweep``
ranks them and selects the top genotypes (components/select.py); the table lands in
``<storage>/<name>/selection/``.

    python -m components.sweep --config digits --set sweep.seeds=[1,2] --set sweep.xi=[0,null] \
        --set ray.cpus_per_worker=0.5

Resumable: if the driver dies, the same command restores the experiment; finished trials are not rerun and
unfinished ones continue from their search checkpoints. Tune's state files are pickles, so a sweep is restored only
from state this pipeline wrote: the driver signs the digest of every state file it writes (HMAC, with a key kept
outside the storage path: ``RAYDARTS_STATE_KEY`` or ``~/.config/raydarts/state.key``) into
``<storage>/<name>.manifest.json``, beside the experiment folder (Tune copies every JSON file of that folder to
the driver and back when it restores, which would put back a stale manifest), and a state file whose digest the
manifest lacks is refused in one line.

``sweep.scheduler=asha`` stops searches whose validation accuracy trails early (useful when many trials run long
searches; with few, short trials it only adds noise, since DARTS's supernet accuracy early in the search predicts
the final cell poorly).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ray.train.v2.api.callback import UserCallback
from ray.tune import Callback

from components.config import PipelineConfig
from components.console import ConsoleChannel, drain_queue
from components.driver import Prepared
from components.search import publish_from_checkpoint, read_history, run_search_stage, search_outputs
from components.select import Candidate, TrialResult, select_and_publish
from components.storage import Location
from components.trainer import StageCallback, StageError, root_cause, stage_main
from nas.search import SearchEpoch


@dataclass
class SweepResult:
    name: str
    trials: list[TrialResult]
    errors: list[str]  # one line per trial that failed


class _EpochRelay(UserCallback):
    """Carries each epoch report from the Train controller to its Tune trial over a Ray queue that never blocks.

    Ray's own ``TuneReportCallback`` hands the last report to the trial actor's main thread, which can race the
    end of the trial function: the function's closing report fills the one-slot result queue first, the main
    thread then blocks putting the last epoch behind it, and the trial stays RUNNING forever (seen under
    ``ray job submit``). Here the trial's own thread re-reports every epoch with ``tune.report`` and returns only
    after the last one, so all of a trial's reports come from one thread, in order."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        record = dict(metrics[0])
        if checkpoint is not None:
            record["checkpoint_path"] = checkpoint.path  # already in storage: Tune gets its path, not a copy
        self.queue.put(record)


def _trial(
    params: dict[str, Any],
    sweep_name: str,
    callback: StageCallback | None = None,
    console: ConsoleChannel | None = None,
) -> None:
    """One Tune trial: a whole data-parallel search on the trial's resolved config, reporting each epoch to Tune."""
    from ray import tune
    from ray.util.queue import Queue

    config = PipelineConfig.model_validate(params)  # the grid values Tune put in, validated again
    trial_id = tune.get_context().get_trial_id()
    if callback is not None:
        callback.on_trial_start(trial_id)
    queue, finished = Queue(actor_options={"num_cpus": 0}), threading.Event()
    # every relayed epoch is reported to Tune from this trial's own thread, until the search ended and all are in
    relayed = (queue, tune.report, finished)
    relay = threading.Thread(target=drain_queue, args=relayed, name="raydarts-relay", daemon=True)
    relay.start()
    try:
        run_search_stage(
            Prepared.trusted(config, console),
            name=f"{sweep_name}-{trial_id}",
            callback=callback,
            callbacks=[_EpochRelay(queue)],
        )
    finally:
        finished.set()
        relay.join()
        queue.shutdown()


def param_space(config: PipelineConfig) -> dict[str, Any]:
    """The config as Tune's param space, each grid axis a ``tune.grid_search`` at the field it sets."""
    from ray import tune

    space = config.model_dump(mode="json")
    for key, values in config.sweep.axes().items():
        section, field = key.split(".")
        space[section][field] = tune.grid_search(list(values))
    return space


def concurrent_trials(config: PipelineConfig, cluster_cpus: float) -> int:
    """How many searches fit at once: each needs its workers' CPUs plus its own driver's."""
    if config.sweep.max_concurrent_trials:
        return config.sweep.max_concurrent_trials
    per_trial = config.ray.num_workers * config.ray.cpus_per_worker + config.sweep.trial_cpus
    return max(1, int(math.floor(cluster_cpus / per_trial + 1e-9)))


# --- trusted state: Tune restores by unpickling, so only state this driver wrote is restored ------------------------
MANIFEST_SUFFIX = ".manifest.json"
KEY_ENV = "RAYDARTS_STATE_KEY"
_IGNORED = {".validate_storage_marker"}
_DIGESTS_KEPT = 64  # versions per file: the storage copy may lag the driver's latest by an upload or two
_STORAGE_READ_SECONDS = 1.0  # how often a restored run reads its storage copies to sign them
_TUNE_NEW_OUTPUT = "RAY_AIR_NEW_OUTPUT"


def state_key() -> bytes:
    """The signing key: ``RAYDARTS_STATE_KEY``, else ``~/.config/raydarts/state.key`` (made once, mode 0600).

    It must live outside the storage path, or whoever can write there could sign their own state."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode()
    path = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "raydarts" / "state.key"
    if not path.exists():  # written whole, then linked into place: no reader ever sees an empty key
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        draft = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(32))
        try:
            os.link(draft, path)  # fails if another process made the key first: theirs is kept
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_bytes().strip()


def _manifest_file(name: str) -> str:
    """``<name>.manifest.json``, in the storage root beside the experiment folder (outside the folder Tune syncs)."""
    return name + MANIFEST_SUFFIX


def _signature(files: dict[str, list[str]], key: bytes) -> str:
    return hmac.new(key, json.dumps(files, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def read_manifest(storage: Location, name: str, key: bytes) -> dict[str, list[str]] | None:
    """The signed digests of the experiment ``name``'s state files (file -> digests of the versions written), or
    None when there is no manifest; StageError when it is not signed with ``key``."""
    text = storage.read_text(_manifest_file(name))
    if text is None:
        return None
    try:
        manifest = json.loads(text)
    except ValueError:
        manifest = None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    mac = manifest.get("hmac") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not isinstance(mac, str) or not hmac.compare_digest(mac, _signature(files, key)):
        raise StageError(
            f"sweep state manifest {storage.join(_manifest_file(name))} is not signed with this pipeline's key"
        )
    return files


def sign_state(storage: Location, name: str, written: dict[str, bytes], key: bytes) -> None:
    """Add the digests of state files this driver wrote (file -> content) to the experiment's signed manifest."""
    files = read_manifest(storage, name, key) or {}
    changed = False
    for file, data in written.items():
        digest = hashlib.sha256(data).hexdigest()
        known = files.setdefault(file, [])
        if digest not in known:
            files[file] = [*known, digest][-_DIGESTS_KEPT:]
            changed = True
    if changed:
        storage.write_json(_manifest_file(name), {"files": files, "hmac": _signature(files, key)})


def check_state(storage: Location, name: str, key: bytes) -> None:
    """Refuse (StageError, one line) to restore the experiment ``name`` with a state file this pipeline did not
    write."""
    experiment = storage.join(name)
    files = read_manifest(storage, name, key)
    if files is None:
        raise StageError(
            f"sweep state at {experiment} has no manifest signed by this pipeline; refusing to restore it "
            "(pick another --name, or remove that folder if you wrote it)"
        )
    for file in experiment.list():
        if "/" in file or file in _IGNORED:
            continue  # trial folders hold results (JSON/CSV) that restoring does not unpickle
        digest = hashlib.sha256(experiment.read_bytes(file) or b"").hexdigest()
        if digest not in files.get(file, []):
            raise StageError(
                f"sweep state file {experiment.join(file)} was not written by this pipeline; refusing to restore"
            )


class _SignState:
    """A Tune callback on the driver: after each step (Tune saves its state just before), sign the state files in
    the driver's own staging folder, which only this driver writes, before the upload to storage lands. A restored
    experiment's trials may name a staging folder of the earlier driver; then the storage copies are signed as
    they land (see the README's trust boundary for what that leaves open)."""

    def __init__(self, storage: str, name: str) -> None:
        self.storage, self.name = storage, name
        self._seen: dict[str, tuple[int, int] | str] = {}
        self._last_read = 0.0

    def __getstate__(self) -> dict[str, Any]:  # pickled into tuner.pkl: never the key, never stale bookkeeping
        return {"storage": self.storage, "name": self.name, "_seen": {}, "_last_read": 0.0}

    def sign(self, staging_folders: list[str]) -> None:
        staging = next((Path(f) for f in staging_folders if f and Path(f).is_dir()), None)
        written: dict[str, bytes] = {}
        if staging is not None:
            for path in staging.iterdir():
                if path.is_file() and path.name not in _IGNORED:
                    stat = path.stat()
                    if self._seen.get(path.name) != (stat.st_mtime_ns, stat.st_size):
                        self._seen[path.name] = (stat.st_mtime_ns, stat.st_size)
                        written[path.name] = path.read_bytes()
        elif time.monotonic() - self._last_read > _STORAGE_READ_SECONDS:
            self._last_read = time.monotonic()
            experiment = Location(self.storage).join(self.name)
            for file in experiment.list():
                if "/" not in file and file not in _IGNORED:
                    data = experiment.read_bytes(file) or b""
                    digest = hashlib.sha256(data).hexdigest()
                    if self._seen.get(file) != digest:
                        self._seen[file] = digest
                        written[file] = data
        if written:
            sign_state(Location(self.storage), self.name, written, state_key())


class SignState(_SignState, Callback):
    """:class:`_SignState` as a Tune callback (module level, so tuner.pkl refers to it rather than copying it)."""

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self.sign([trial.local_experiment_path for trial in trials[:1]])

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.sign([trial.local_experiment_path for trial in trials[:1]])


def _sign_tuner(storage: Location, name: str) -> None:
    """Sign ``tuner.pkl``, which Tune writes straight to storage when a Tuner is made or restored."""
    data = storage.join(name).read_bytes("tuner.pkl")
    if data is not None:
        sign_state(storage, name, {"tuner.pkl": data}, state_key())


@contextmanager
def _scoped_env(name: str, value: str | None) -> Iterator[None]:
    """``name`` set to ``value`` for a block (None leaves it alone), then back to what it was."""
    previous = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _tune_output(shown: bool) -> contextlib.AbstractContextManager[None]:
    """Tune's terminal output while the sweep runs: its tables with Ray's logs (``--verbose``), else none. Its new
    output engine prints a banner even at ``verbose=0``; the classic one, picked here for the sweep, honours it."""
    return _scoped_env(_TUNE_NEW_OUTPUT, None if shown else "0")


@contextmanager
def _ctrl_c_for_tune() -> Iterator[threading.Event]:
    """Tune ends a sweep gracefully on Ctrl+C (state saved, trials stopped), then returns as if it had finished, its
    stopped trials marked terminated. So Ctrl+C is caught here instead: remembered in the event this yields, then
    handed to Tune as the SIGUSR1 it also listens to. A second Ctrl+C does what it did before."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        yield interrupted  # Tune catches no signal here either
        return

    def on_ctrl_c(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, previous_int)
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, previous_usr1):  # Tune is not listening yet
            raise KeyboardInterrupt
        interrupted.set()
        os.kill(os.getpid(), signal.SIGUSR1)

    previous_int, previous_usr1 = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        with _scoped_env("TUNE_DISABLE_SIGINT_HANDLER", "1"):
            yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGUSR1, previous_usr1)


def run_sweep(
    prepared: Prepared,
    *,
    name: str | None = None,
    callback: StageCallback | None = None,
    tune_callbacks: Sequence[Callback] = (),
) -> SweepResult:
    """Run or restore the sweep (``tune_callbacks`` watch it from the driver, e.g. live MLflow logging; a restored
    sweep keeps the ones it started with)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    config = prepared.config
    name = name or f"{config.name}-sweep"
    experiment = prepared.storage.join(name)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, sweep_name=name, callback=callback, console=prepared.console),
        {"CPU": config.sweep.trial_cpus},
    )
    if tune.Tuner.can_restore(experiment.uri):
        check_state(prepared.storage, name, state_key())  # before anything is unpickled
        print(f"restoring sweep {name!r} from {experiment}", flush=True)
        tuner = tune.Tuner.restore(experiment.uri, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = None
        if config.sweep.scheduler == "asha":
            scheduler = ASHAScheduler(
                time_attr="epoch",
                max_t=config.search.epochs,
                grace_period=config.sweep.asha_grace_period,
                reduction_factor=config.sweep.asha_reduction_factor,
            )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(config),
            tune_config=tune.TuneConfig(
                metric=config.sweep.metric,
                mode=config.sweep.mode,
                scheduler=scheduler,
                max_concurrent_trials=concurrent_trials(config, ray.cluster_resources().get("CPU", 1.0)),
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=prepared.storage.uri,
                callbacks=[SignState(prepared.storage.uri, name), *tune_callbacks],
                verbose=1 if prepared.ray_logs else 0,  # Tune's tables: only with Ray's own logs (--verbose)
            ),
        )
    _sign_tuner(prepared.storage, name)
    with _tune_output(shown=prepared.ray_logs), _ctrl_c_for_tune() as interrupted:
        grid = tuner.fit()
    if interrupted.is_set():  # its stopped trials must never pass for finished searches
        raise StageError(f"sweep {name!r} was interrupted (Ctrl+C); its state is saved: run the same command to resume")
    trials, errors = [], []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or (PurePosixPath(result.path).name if result.path else "?"))
        if result.error is not None or "genotype" not in metrics:
            errors.append(f"{trial_id}: {root_cause(result.error) if result.error else 'no result'}")
            continue
        trial_config = PipelineConfig.model_validate(result.config)
        last = SearchEpoch.model_validate({key: metrics[key] for key in SearchEpoch.model_fields})
        search = prepared.storage.join(f"{name}-{trial_id}")  # the trial's search run: checkpoints and outputs
        outputs = search_outputs(prepared.storage, f"{name}-{trial_id}")
        if read_history(outputs) is None and not _publish_stopped(search, outputs, metrics, trial_config):
            outputs = None
        trials.append(
            TrialResult(
                trial=trial_id,
                config=trial_config,
                last=last,
                outputs=None if outputs is None else outputs.uri,
                complete=last.epoch >= trial_config.search.epochs,
                started=_number(metrics.get("timestamp")) - _number(metrics.get("time_total_s")),
                ended=_number(metrics.get("timestamp")),
            )
        )
    if not trials:
        raise StageError(f"sweep {name!r}: no trial finished ({'; '.join(errors) or 'no trials'})")
    return SweepResult(name, trials, errors)


def _number(value: Any) -> float:
    """A Tune bookkeeping number (NaN when missing, so that a start computed from it is NaN too)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _publish_stopped(search: Location, outputs: Location, metrics: dict[str, Any], config: PipelineConfig) -> bool:
    """Publish a trial's outputs from its last checkpoint when Tune stopped it before it could; False if none."""
    checkpoint = metrics.get("checkpoint_path")
    if not checkpoint:
        return False
    publish_from_checkpoint(search.join(PurePosixPath(checkpoint).name).uri, outputs, config)
    return True


def sweep_and_select(
    prepared: Prepared, *, name: str | None = None, callback: StageCallback | None = None
) -> tuple[SweepResult, list[Candidate], Location]:
    """The sweep, then the selection of its trials (what ``python -m components.sweep`` runs)."""
    sweep = run_sweep(prepared, name=name, callback=callback)
    try:
        selected, where = select_and_publish(prepared, sweep.trials, sweep.name)
    except ValueError as err:
        raise StageError(f"sweep {sweep.name!r}: {err}") from None
    return sweep, selected, where


def main(argv: list[str] | None = None) -> int:
    def show(config: PipelineConfig, result: tuple[SweepResult, list[Candidate], Location]) -> None:
        sweep, selected, where = result
        for candidate in selected:
            metric = f"{config.sweep.metric}={candidate.metric:.4f}"
            print(f"#{candidate.rank} {candidate.trial.trial} {metric} {candidate.genotype}")
        print(f"selection: {where}")
        for error in sweep.errors:
            print(f"failed trial {error}", file=sys.stderr)

    return stage_main("python -m components.sweep", __doc__, "sweep", sweep_and_select, show, argv)


if __name__ == "__main__":
    sys.exit(main())
