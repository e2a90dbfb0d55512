"""A real S3 API for the tests: moto's server on 127.0.0.1, one bucket, and the environment that points pyarrow,
Ray Train (which goes through pyarrow) and boto3 at it, so the same ``s3://bucket/x`` string works for all three.

Fixtures (imported by conftest.py): ``s3_server`` (one server per session) and ``s3`` (the server, with its
environment applied to the test through monkeypatch). Apply the environment before ``ray.init`` so workers inherit it.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BUCKET = "raydarts-test"
REGION = "us-east-1"

# Variables that would send the AWS clients elsewhere (another profile, role or credentials) are removed.
_CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server: its endpoint, its bucket and its request log."""

    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    log: Path  # the server's output: one line per request, in the order the responses went out

    @property
    def env(self) -> dict[str, str]:
        """What makes pyarrow (25 reads AWS_ENDPOINT_URL), Ray Train and boto3 use this server.

        The region is explicit (nothing resolves it over the network) and the instance-metadata lookup is off; the
        config files are emptied so a developer's ~/.aws cannot redirect the clients; no proxy for 127.0.0.1.
        """
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def uri(self, prefix: str = "") -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{prefix.strip('/')}".rstrip("/")

    def apply(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Set :attr:`env` (and clear what could override it) for one test."""
        for name in _CLEARED:
            monkeypatch.delenv(name, raising=False)
        for name, value in self.env.items():
            monkeypatch.setenv(name, value)

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """:attr:`env` applied for a block: for module- or session-scoped fixtures (set it before ``ray.init``)."""
        with pytest.MonkeyPatch.context() as patch:
            self.apply(patch)
            yield

    def client(self) -> Any:
        """A boto3 S3 client for this server, whatever the environment says."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def requests(self) -> list[str]:
        """The request lines answered so far (``PUT /bucket/key HTTP/1.1`` ...), oldest first."""
        lines = re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text()).splitlines()  # werkzeug colours some lines
        return [line.split('"')[1] for line in lines if line.count('"') >= 2]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(endpoint: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(endpoint + "/", timeout=1):
            return True
    except OSError:
        return False


def start_moto(log: Path, timeout: float = 60.0) -> tuple[subprocess.Popen[bytes], S3Server]:
    """Start ``python -m moto.server`` on a free port and wait until it answers; (process, server)."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    while not _answers(endpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            raise RuntimeError(f"moto server on port {port} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return process, S3Server(endpoint=endpoint, bucket=BUCKET, log=log)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server this module started (its own process id only)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One moto S3 server for the session, with the bucket ``raydarts-test`` created; stopped at the end."""
    process, server = start_moto(tmp_path_factory.mktemp("moto") / "server.log")
    try:
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        _stop(process)


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The session's S3 server, with its environment applied to this test."""
    s3_server.apply(monkeypatch)
    return s3_server
