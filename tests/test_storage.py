"""Stage outputs in a folder or under a URI, one behaviour for all: a local folder, a relative folder, a ``file://``
URI and a real S3 API (moto's server). The finished-marker is only there when everything else is."""

from __future__ import annotations

import os
import pickle
import re
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from processes import start_local_ray, stop_local_ray
from s3 import S3Server

from components import storage
from components.storage import Location, StorageError

TREE = {"cells/epoch_001.png": b"\x89PNG", "model.pt": b"weights", "result.json": b'{"done": true}'}


def _tree(root: Path, files: dict[str, bytes] = TREE) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["folder", "relative", "file_uri", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A location that does not exist yet, as a caller would write it."""
    if request.param == "folder":
        return str(tmp_path / "out" / "a")
    if request.param == "relative":
        monkeypatch.chdir(tmp_path)
        return "rel/out"
    if request.param == "file_uri":
        return (tmp_path / "out" / "a").as_uri()
    s3: S3Server = request.getfixturevalue("s3")
    return s3.uri(_unique(request.node.originalname))


@pytest.fixture
def umask() -> Iterator[None]:
    """A known umask (0o027) for the test, the old one back afterwards."""
    old = os.umask(0o027)
    yield
    os.umask(old)


# --- every kind of location -------------------------------------------------------------------------------------------
def test_publish_copies_the_tree_and_reads_back(place: str, tmp_path: Path) -> None:
    location = Location(place)
    assert not location.exists() and not location.exists("result.json") and location.list() == []
    assert location.read_text("result.json") is None and location.read_bytes("model.pt") is None
    location.publish(_tree(tmp_path / "src"), marker="result.json")
    assert (tmp_path / "src" / "result.json").is_file()  # the source is left as it was
    assert location.list() == sorted(TREE)
    assert location.exists() and location.exists("result.json") and location.exists("cells/epoch_001.png")
    assert not location.exists("cells")  # a folder is not a file
    assert location.read_bytes("cells/epoch_001.png") == b"\x89PNG"
    assert location.read_text("result.json") == '{"done": true}'
    assert location.read_json("result.json") == {"done": True}
    assert location.join("cells").list() == ["epoch_001.png"]
    with pytest.raises(StorageError, match="no such file"):
        location.read_json("missing.json")


def test_writes_are_whole_files_and_read_back(place: str) -> None:
    location = Location(place)
    location.write_json("a/b/config.json", {"seed": 1, "xi": None})
    location.write_text("notes.txt", "α first\n")
    location.write_bytes("notes.txt", b"second")  # overwrites
    assert location.read_json("a/b/config.json") == {"seed": 1, "xi": None}
    assert location.read_text("a/b/config.json").endswith("}\n")
    assert location.read_text("notes.txt") == "second"
    assert location.list() == ["a/b/config.json", "notes.txt"]  # no temporary files left
    assert location.join("a", "b").read_json("config.json") == {"seed": 1, "xi": None}


def test_local_copy_and_download(place: str, tmp_path: Path) -> None:
    location = Location(place)
    location.publish(_tree(tmp_path / "src"), marker="result.json")
    with location.local_copy() as folder:
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == sorted(TREE)
        assert (folder / "model.pt").read_bytes() == b"weights"
    if location.is_local:
        assert folder == location.local_path  # no copy of a local folder
    else:
        assert not folder.exists()  # the temporary download is gone
    copied = location.download(tmp_path / "copy")
    assert (copied / "cells" / "epoch_001.png").read_bytes() == b"\x89PNG"


def test_check_writable_leaves_nothing(place: str) -> None:
    location = Location(place)
    location.check_writable()
    assert location.list() == []
    assert location.exists() != location.is_local  # a local folder is only looked at; a bucket prefix is probed


def test_a_failed_copy_leaves_no_marker(place: str, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src")
    (source / "cells" / "epoch_002.png").symlink_to(tmp_path / "gone.png")  # cannot be read: the copy fails
    location = Location(place)
    with pytest.raises(StorageError) as caught:
        location.publish(source, marker="result.json")
    assert "\n" not in str(caught.value) and location.uri in str(caught.value)
    assert not location.exists("result.json")
    assert "result.json" not in location.list()


# --- local folders ----------------------------------------------------------------------------------------------------
def test_a_failed_local_copy_leaves_no_marker(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "cells").write_text("a file where the cells folder must go")  # the copy of cells/ fails
    with pytest.raises(StorageError, match=re.escape(str(target))):
        Location(target).publish(_tree(tmp_path / "src"), marker="result.json")
    assert not Location(target).exists("result.json")


def test_local_files_get_the_mode_of_a_plain_open(tmp_path: Path, umask: None) -> None:
    location = Location(tmp_path / "out")
    location.write_text("one.txt", "1")
    location.publish(_tree(tmp_path / "src"), marker="result.json")
    for name in ("one.txt", "model.pt", "result.json", "cells/epoch_001.png"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o640, name  # 0o666 & ~0o027


def test_location_paths_and_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert str(Location("runs/ray")) == str(tmp_path / "runs" / "ray") == Location("runs/ray/").uri
    assert Location("~/x").local_path == tmp_path / "home" / "x"
    assert Location(tmp_path).join("a", "b/c.json") == Location(tmp_path / "a" / "b" / "c.json")
    assert Location(Location("runs")) == Location("runs")
    assert storage.absolute("runs") == str(tmp_path / "runs") and storage.absolute("s3://b/x") == "s3://b/x"
    assert storage.is_uri("gs://b/x") and not storage.is_uri(str(tmp_path))

    s3 = Location("s3://bucket/root/")
    assert s3.uri == "s3://bucket/root" and not s3.is_local
    assert str(s3.join("trial_seed=1,xi=0.0", "cells")) == "s3://bucket/root/trial_seed=1,xi=0.0/cells"
    assert str(s3.join("a b#c")) == "s3://bucket/root/a%20b%23c"  # '#' would cut the URI short
    with pytest.raises(StorageError, match="s3://bucket/root is not a local folder"):
        _ = s3.local_path
    assert pickle.loads(pickle.dumps(s3)) == s3 and hash(pickle.loads(pickle.dumps(s3))) == hash(s3)

    uri = (tmp_path / "a b").as_uri()
    local = Location(uri)
    assert local.is_local and local.uri == uri and local.local_path == tmp_path / "a b"
    local.join("c d").write_text("x.txt", "x")
    assert (tmp_path / "a b" / "c d" / "x.txt").read_text() == "x"


def test_an_unwritable_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    location = Location(tmp_path / "file" / "out")
    with pytest.raises(StorageError, match=f"^cannot create {re.escape(location.uri)}: [^\n]*$"):
        location.check_writable()


# --- S3 (moto) --------------------------------------------------------------------------------------------------------
def test_s3_marker_is_written_after_everything_else(s3: S3Server, tmp_path: Path) -> None:
    prefix = _unique("order")
    files = {f"cells/epoch_{i:03d}.png": bytes([i]) * 100 for i in range(20)} | {"result.json": b"{}"}
    Location(s3.uri(prefix)).publish(_tree(tmp_path / "src", files), marker="result.json")
    writes = [r for r in s3.requests() if r.split()[0] in ("PUT", "POST") and f"/{prefix}/" in r]
    keys = [re.sub(r"\?.*", "", r.split()[1]).split(f"/{prefix}/", 1)[1] for r in writes]
    keys = [key for key in keys if key]  # '' is the folder object that creating the prefix writes
    first_marker = keys.index("result.json")
    assert set(keys[:first_marker]) == set(files) - {"result.json"} and set(keys[first_marker:]) == {"result.json"}


def test_s3_objects_are_plain_objects_for_boto3(s3: S3Server) -> None:
    import boto3

    prefix = _unique("boto3")
    Location(s3.uri(prefix)).write_json("result.json", {"done": True})
    client = boto3.client("s3")  # configured by the environment alone
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{prefix}/")
    assert [item["Key"] for item in listed["Contents"]] == [f"{prefix}/result.json"]
    body = client.get_object(Bucket=s3.bucket, Key=f"{prefix}/result.json")["Body"].read()
    assert body == b'{\n  "done": true\n}\n'


def test_the_environment_applies_for_a_block(s3_server: S3Server) -> None:
    before = os.environ.get("AWS_ENDPOINT_URL")
    with s3_server.environment():
        assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint
        Location(s3_server.uri(_unique("block"))).check_writable()
    assert os.environ.get("AWS_ENDPOINT_URL") == before


def test_a_missing_bucket_is_one_line(s3: S3Server) -> None:
    location = Location("s3://no-such-bucket/out")
    with pytest.raises(StorageError, match=r"^cannot create s3://no-such-bucket/out: [^\n]*$"):
        location.check_writable()
    assert location.read_text("x.json") is None and not location.exists()


def test_ray_train_checkpoints_to_s3(s3: S3Server) -> None:
    """Ray Train (V2) takes s3:// on moto as its storage_path: the env is set before ray.init, so workers see it."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        import tempfile

        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "model.txt").write_text("weights")
            ray.train.report({"step": 1}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    root = Location(s3.uri(_unique("ray")))
    start_local_ray()
    try:
        result = TorchTrainer(
            loop,
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name="tiny", storage_path=str(root)),
        ).fit()
    finally:
        stop_local_ray()
    assert result.checkpoint is not None and result.checkpoint.filesystem.type_name == "s3"
    checkpoint = PurePosixPath(result.checkpoint.path).name
    run = root.join("tiny")
    assert f"{checkpoint}/model.txt" in run.list()
    assert run.join(checkpoint).read_text("model.txt") == "weights"
