"""Shared fixtures: a real local Ray with 2 CPUs for the stage tests (one per test module), a real S3 API, the tiny
pipeline tracked to a live MLflow server (one per test session)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import ray.cloudpickle
import stage_callbacks
from processes import start_local_ray, stop_local_ray

# Ray's workers cannot import this folder: the test callbacks travel by value.
ray.cloudpickle.register_pickle_by_value(stage_callbacks)


@pytest.hookimpl(wrapper=True)
def pytest_cmdline_main(config: pytest.Config) -> Iterator[Any]:
    """Once pytest is done (summary printed, session ended), run the exit handlers and leave without the interpreter's
    finalization. Ray's native threads (its GCS client's, gRPC's) outlive ``ray.shutdown()``, and this process starts
    and stops Ray many times: once, after every test had passed, its finalization died of a segmentation fault, which
    turned a green run red. Every ``atexit`` handler still runs (Ray's, pyarrow's S3 finalization, logging's)."""
    import atexit
    import os
    import sys

    status = yield
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(status))


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """A local Ray of 2 CPUs (this machine's size), so fractional worker CPUs are what keeps the tests running."""
    import ray

    start_local_ray()
    yield ray
    stop_local_ray()


# --- a real S3 API (moto's server) for any test module: see tests/s3.py -----------------------------------------------
from s3 import S3Server, s3, s3_server  # noqa: E402, F401


# --- the tiny pipeline tracked to a live `mlflow server`, run once for every test that reads its records back -------
@pytest.fixture(scope="session")
def tracked_pipeline(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[Any]:  # noqa: F811
    """tests/test_mlflow_server.py reads it back over HTTP, tests/test_browser.py in a browser, tests/test_pipeline.py
    checks its stages, S3 storage and rerun: one pipeline for all three, since it is the slowest thing any does."""
    from test_mlflow_server import pipeline_on_a_server

    with pipeline_on_a_server(tmp_path_factory.mktemp("tracked-pipeline"), s3_server) as tracked:
        yield tracked
