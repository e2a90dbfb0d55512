"""Where stages publish their outputs: a local folder or a URI (``s3://``, ``gs://``, ``file://``), through pyarrow.

Publishing is all-or-marker: the file whose presence says "this stage finished" is copied after everything else, so
a copy cut short by a crash never looks finished, and the stage runs again instead of reading half an output.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any


def resolve(location: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a folder (made absolute) or a URI."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(location if "://" in location else str(Path(location).resolve()))


def file_exists(location: str, name: str) -> bool:
    """Whether ``name`` is a file under ``location``."""
    import pyarrow.fs

    filesystem, path = resolve(location)
    return filesystem.get_file_info(f"{path}/{name}").type == pyarrow.fs.FileType.File


def read_text(location: str, name: str) -> str | None:
    """The text of ``name`` under ``location``, or None if there is no such file."""
    import pyarrow.fs

    filesystem, path = resolve(location)
    if filesystem.get_file_info(f"{path}/{name}").type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_stream(f"{path}/{name}") as stream:
        return stream.read().decode()


def publish(local_dir: Path, location: str, marker: str | None = None) -> None:
    """Copy the tree under ``local_dir`` into ``location``; ``marker`` (a file in ``local_dir``) is copied last.

    ``marker`` is moved out of ``local_dir`` while the rest is copied.
    """
    import pyarrow.fs

    filesystem, path = resolve(location)
    filesystem.create_dir(path, recursive=True)
    with tempfile.TemporaryDirectory() as held:
        if marker is not None:
            shutil.move(str(local_dir / marker), str(Path(held) / marker))
        pyarrow.fs.copy_files(str(local_dir), path, destination_filesystem=filesystem)
        if marker is not None:
            pyarrow.fs.copy_files(str(Path(held) / marker), f"{path}/{marker}", destination_filesystem=filesystem)
