"""Shared fixtures: a real local Ray with 2 CPUs for the stage tests (one per test module), a real S3 API."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import ray.cloudpickle
import stage_callbacks

# Ray's workers cannot import this folder: the test callbacks travel by value.
ray.cloudpickle.register_pickle_by_value(stage_callbacks)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """A local Ray of 2 CPUs (this machine's size), so fractional worker CPUs are what keeps the tests running."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# --- a real S3 API (moto's server) for any test module: see tests/s3.py -----------------------------------------------
from s3 import S3Server, s3, s3_server  # noqa: E402, F401
