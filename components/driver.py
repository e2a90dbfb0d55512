"""The preflight, once, at the outermost entry: everything a run needs is checked before any stage starts.

``prepare(config)`` makes local paths absolute (workers and Tune trials run in other folders), checks that the
data can be read, that the storage location can be written, connects to Ray (or starts a local one) and checks
that the cluster has room for what the config asks. Stages take the :class:`Prepared` result and check nothing
again; a Tune trial or a Ray task that runs a stage builds its ``Prepared`` from the config it was handed, which the
driver's preflight has already passed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from components.config import PipelineConfig, trial_configs, with_absolute_paths
from components.console import ConsoleChannel
from components.storage import Location
from nas.config import ConfigError
from nas.data import DataSummary, load_dataset, summarize_data


@dataclass(frozen=True)
class Prepared:
    """A config that passed the preflight, and where its stages keep their files (picklable: Ray ships it)."""

    config: PipelineConfig
    storage: Location
    data: DataSummary | None = None  # what the data holds (None inside trials and tasks, which do not check it)
    console: ConsoleChannel | None = None  # where workers send their lines (None: to their own stdout)
    ray_logs: bool = True  # Ray forwards its workers' output and Tune prints its tables (--verbose)

    @classmethod
    def trusted(cls, config: PipelineConfig, console: ConsoleChannel | None = None) -> Prepared:
        """The ``Prepared`` of a config the driver already prepared (inside a Tune trial or a Ray task)."""
        return cls(config, Location(config.ray.storage_path), console=console)

    def with_config(self, config: PipelineConfig) -> Prepared:
        """The same run with another variant of its config (the candidates' brief recipe, the champion's full one)."""
        return dataclasses.replace(self, config=config)

    def with_console(self, console: ConsoleChannel) -> Prepared:
        return dataclasses.replace(self, console=console)


def check_data(config: PipelineConfig) -> DataSummary:
    """Fail early and clearly on missing or bad data and on batches larger than the split they are drawn from (the
    workers would fail the same way, later); what the data holds."""
    data = config.data
    load_dataset(data.source, "train", root=data.root, download=data.download, limit=1, image_size=data.image_size)
    summary = summarize_data(
        data.source,
        root=data.root,
        download=data.download,
        limit=data.limit,
        test_limit=data.test_limit,
        image_size=data.image_size,
    )
    workers, n = config.ray.num_workers, summary.train_rows
    search, retrain = config.search, config.retrain
    weight_half = round(n * search.train_portion)
    smallest_half = min(weight_half, n - weight_half)
    if search.batch_size * workers > smallest_half:
        raise ConfigError(
            f"search.batch_size {search.batch_size} x {workers} worker(s) needs {search.batch_size * workers} images "
            f"in each half of the training split, but the smaller half has {smallest_half} (of {n} rows used)"
        )
    train_part = n - round(n * retrain.val_fraction)
    if retrain.batch_size * workers > train_part:
        raise ConfigError(
            f"retrain.batch_size {retrain.batch_size} x {workers} worker(s) needs {retrain.batch_size * workers} "
            f"training images, but {train_part} of the {n} rows used are left for training"
        )
    if retrain.val_fraction > 0 and train_part == n:
        raise ConfigError(f"retrain.val_fraction {retrain.val_fraction:g} of {n} rows holds out no image")
    return summary


def check_resources(config: PipelineConfig, available_cpus: float, available_gpus: float, sweep: bool) -> None:
    """The workers of one search or retrain, and in a sweep the trial's own driver, fit in the cluster."""
    ray_cfg = config.ray
    need_cpus = ray_cfg.num_workers * ray_cfg.cpus_per_worker + (config.sweep.trial_cpus if sweep else 0.0)
    if need_cpus > available_cpus + 1e-9 and not ray_cfg.allow_oversubscribe:
        trial = f" + sweep.trial_cpus {config.sweep.trial_cpus:g}" if sweep else ""
        raise ConfigError(
            f"ray.num_workers x ray.cpus_per_worker{trial} = {need_cpus:g} CPUs but the cluster has "
            f"{available_cpus:g}; lower them, use fractional ray.cpus_per_worker, or set ray.allow_oversubscribe=true"
        )
    if ray_cfg.use_gpu and ray_cfg.num_workers * ray_cfg.gpus_per_worker > available_gpus + 1e-9:
        raise ConfigError(
            f"ray.use_gpu with {ray_cfg.num_workers} workers x {ray_cfg.gpus_per_worker:g} GPUs "
            f"but the cluster has {available_gpus:g} GPUs"
        )


def check_ray_address(address: str | None, timeout: float = 5.0) -> None:
    """A ``host:port`` or ``ray://host:port`` address accepts a connection within seconds (ConfigError, one line,
    otherwise): ``ray.init`` would wait minutes on a dead one. ``auto``, ``local`` and none are not checked."""
    import socket
    from urllib.parse import urlparse

    if not address or address in ("auto", "local"):
        return
    parsed = urlparse(address)
    host: str | None
    port: int | None
    try:
        if parsed.netloc:  # ray://host:port
            host, port = parsed.hostname, parsed.port
        else:  # host:port
            host, _, port_text = address.rpartition(":")
            port = int(port_text) if port_text.isdigit() else None
    except ValueError:
        host = port = None
    if not host or not port:
        raise ConfigError(f"Ray address {address!r} is not host:port or ray://host:port")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise ConfigError(f"Ray at {address} does not answer within {timeout:g}s: {err.strerror or err}") from None


# A raylet starts at most this many Python workers at once (Ray's default: its CPUs) and says so on every driver's
# console, as a warning, each time the workers it started pass 4, 5, 6... times it. A sweep's trials, their Train
# workers and controllers are 18 workers on a 2-CPU machine: started 16 at a time they come up as fast (measured),
# and the console keeps the warning for a real excess.
STARTUP_CONCURRENCY = "RAY_worker_maximum_startup_concurrency"


def ensure_ray(config: PipelineConfig, ray_logs: bool = True) -> tuple[float, float]:
    """Connect to ``ray.address``, RAY_ADDRESS, or start a local Ray; the cluster's (CPUs, GPUs).

    With ``ray_logs`` off, workers' output stays in Ray's log folder and Ray's driver-side messages below ERROR are
    not shown (the console's lines come through :mod:`components.console` instead). A local Ray started here starts
    up to 16 workers at once (:data:`STARTUP_CONCURRENCY`, unless set), for the raylet inherits the environment of
    ``ray.init``; the driver's own environment is left as it was."""
    import logging
    import os

    import ray

    if not ray.is_initialized():
        check_ray_address(config.ray.address or os.environ.get("RAY_ADDRESS"))
        shown = {"log_to_driver": True, "configure_logging": False}
        kwargs = shown if ray_logs else {"log_to_driver": False, "logging_level": logging.ERROR}
        preset = STARTUP_CONCURRENCY in os.environ
        os.environ.setdefault(STARTUP_CONCURRENCY, str(max(16, os.cpu_count() or 1)))
        try:
            ray.init(address=config.ray.address, **kwargs)
        finally:
            if not preset:
                os.environ.pop(STARTUP_CONCURRENCY, None)
    resources = ray.cluster_resources()
    return float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))


def prepare(config: PipelineConfig, *, sweep: bool = False, ray_logs: bool = True) -> Prepared:
    """Check everything once (grid values, data, storage, Ray and its room), before any stage or worker starts.

    ``ray_logs=False`` (the command lines without ``--verbose``) keeps Ray's own output off the console; the caller
    then opens a :func:`components.console.open_console` so that the workers' lines still arrive.
    Raises ConfigError, DataError or StorageError with one line; nothing is written when it does.
    """
    config = with_absolute_paths(config)
    if sweep:
        trial_configs(config)
    summary = check_data(config)
    storage = Location(config.ray.storage_path)
    storage.check_writable()
    check_resources(config, *ensure_ray(config, ray_logs), sweep=sweep)
    return Prepared(config, storage, data=summary, ray_logs=ray_logs)
