"""Publishing stage outputs to a folder or a URI: the finished-marker is only there when everything else is."""

from __future__ import annotations

from pathlib import Path

import pytest

from components import storage


def _tree(root: Path) -> None:
    (root / "cells").mkdir(parents=True)
    (root / "cells" / "epoch_001.png").write_bytes(b"\x89PNG")
    (root / "model.pt").write_bytes(b"weights")
    (root / "result.json").write_text('{"done": true}')


@pytest.mark.parametrize("as_uri", [False, True])
def test_publish_copies_the_tree_and_reads_back(tmp_path: Path, as_uri: bool) -> None:
    _tree(tmp_path / "src")
    target = tmp_path / "out" / "a"
    location = target.as_uri() if as_uri else str(target)
    assert not storage.file_exists(location, "result.json") and storage.read_text(location, "result.json") is None
    storage.publish(tmp_path / "src", location, marker="result.json")
    assert (target / "cells" / "epoch_001.png").read_bytes() == b"\x89PNG"
    assert (target / "model.pt").read_bytes() == b"weights"
    assert storage.file_exists(location, "result.json")
    assert storage.read_text(location, "result.json") == '{"done": true}'
    assert not storage.file_exists(location, "cells")  # a folder is not a file


def test_relative_folder_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    storage.publish(tmp_path / "src", "rel/out")
    assert (tmp_path / "rel" / "out" / "result.json").is_file()
    assert storage.file_exists("rel/out", "model.pt")


def test_a_failed_copy_leaves_no_marker(tmp_path: Path) -> None:
    _tree(tmp_path / "src")
    target = tmp_path / "out"
    target.mkdir()
    (target / "cells").write_text("a file where the cells folder must go")  # the copy of cells/ fails
    with pytest.raises(OSError):
        storage.publish(tmp_path / "src", str(target), marker="result.json")
    assert not storage.file_exists(str(target), "result.json")
