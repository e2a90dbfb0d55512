"""Where stages read and write their outputs: a local folder or a URI (``s3://``, ``gs://``, ``file://``).

Every file and URI access of the stages goes through :class:`Location`, built on pyarrow's filesystems (the ones Ray
Train uses for ``storage_path``), so a folder and a bucket behave alike. Local writes go through a temporary file
renamed into place and object-store writes are single puts, so a reader never sees half a file. Publishing is
all-or-marker: the file whose presence says "this stage finished" is written after everything else, so a copy cut
short by a crash never looks finished, and the stage runs again instead of reading half an output.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    import pyarrow.fs

# Characters kept as they are when a name is joined onto a URI (Tune's trial names hold '=' and ','); the rest
# (space, '%', '#', '?', non-ASCII) is percent-encoded, which pyarrow decodes: 's3://b/a#b' would silently be 'b/a'.
_URI_SAFE = "/:=,@+!$&'()*;"
_COPY_THREADS = 8


class StorageError(RuntimeError):
    """A location cannot be reached, read or written; the message names it, in one line."""


def is_uri(text: str) -> bool:
    """Whether ``text`` is a URI (``s3://``, ``gs://``, ``file://``...) rather than a local path."""
    return "://" in text


def absolute(path_or_uri: str | os.PathLike[str]) -> str:
    """A local path made absolute (``~`` expanded), since workers and Tune trials run in other folders; URIs as they
    are."""
    text = os.fspath(path_or_uri)
    return text if is_uri(text) else str(Path(text).expanduser().resolve())


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclass(frozen=True, init=False)
class Location:
    """A folder on this machine or under a URI. Plain data (its ``uri``), so Ray ships it to workers as it is."""

    uri: str

    def __init__(self, where: str | os.PathLike[str] | Location) -> None:
        text = where.uri if isinstance(where, Location) else absolute(where)
        if is_uri(text):
            scheme, _, rest = text.partition("://")
            text = f"{scheme}://{rest.rstrip('/')}" if rest.rstrip("/") else text
        object.__setattr__(self, "uri", text)

    def __str__(self) -> str:
        return self.uri

    @property
    def is_local(self) -> bool:
        """Whether the files are on this machine's file system (a path or a ``file://`` URI)."""
        return not is_uri(self.uri) or self.uri.startswith("file://")

    @property
    def local_path(self) -> Path:
        """The folder as a local path; a StorageError for an object store (use :meth:`local_copy` there)."""
        if not is_uri(self.uri):
            return Path(self.uri)
        if self.is_local:
            return Path(self.filesystem()[1])
        raise StorageError(f"{self.uri} is not a local folder")

    def join(self, *parts: str) -> Location:
        """The location of ``parts`` under this one ('/'-separated names)."""
        names = [part.strip("/") for part in parts if part.strip("/")]
        if not is_uri(self.uri):
            return Location(Path(self.uri, *names))
        return Location("/".join([self.uri, *(quote(name, safe=_URI_SAFE) for name in names)]))

    def filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """(pyarrow filesystem, path in it): what pyarrow readers and Ray's ``storage_filesystem`` take."""
        import pyarrow.fs

        if not is_uri(self.uri):
            return pyarrow.fs.LocalFileSystem(), self.uri
        with self._failing("reach"):
            return pyarrow.fs.FileSystem.from_uri(self.uri)

    # --- reading -----------------------------------------------------------------------------------------------
    def exists(self, name: str | None = None) -> bool:
        """Whether the file ``name`` is here (a folder of that name is not), or without a name, this folder."""
        import pyarrow.fs

        filesystem, root = self.filesystem()
        with self._failing("look at", name):
            kind = filesystem.get_file_info(_inner(root, name)).type
        return kind == (pyarrow.fs.FileType.File if name else pyarrow.fs.FileType.Directory)

    def read_bytes(self, name: str) -> bytes | None:
        """The bytes of the file ``name``, or None if there is no such file."""
        import pyarrow.fs

        filesystem, root = self.filesystem()
        with self._failing("read", name):
            if filesystem.get_file_info(_inner(root, name)).type != pyarrow.fs.FileType.File:
                return None
            with filesystem.open_input_stream(_inner(root, name)) as stream:
                return stream.read()

    def read_text(self, name: str) -> str | None:
        """The text of the file ``name``, or None if there is no such file."""
        data = self.read_bytes(name)
        return None if data is None else data.decode()

    def read_json(self, name: str) -> Any:
        """The JSON in the file ``name``; a StorageError when it is missing or not JSON (for files that must be there;
        read_text tells a missing file apart)."""
        text = self.read_text(name)
        if text is None:
            raise StorageError(f"cannot read {_inner(self.uri, name)}: no such file")
        with self._failing("read", name):
            return json.loads(text)

    def list(self) -> list[str]:
        """Every file under here, as sorted '/'-separated paths relative to it; [] when there is nothing."""
        import pyarrow.fs

        filesystem, root = self.filesystem()
        with self._failing("list"):
            infos = filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
        return sorted(info.path[len(root) + 1 :] for info in infos if info.type == pyarrow.fs.FileType.File)

    def download(self, dest: Path) -> Path:
        """Copy the whole tree here into the local folder ``dest`` (created); ``dest``, made absolute."""
        import pyarrow.fs

        dest = Path(dest).expanduser().resolve()
        filesystem, root = self.filesystem()
        with self._failing("download"):
            dest.mkdir(parents=True, exist_ok=True)
            pyarrow.fs.copy_files(
                root, str(dest), source_filesystem=filesystem, destination_filesystem=pyarrow.fs.LocalFileSystem()
            )
        return dest

    @contextlib.contextmanager
    def local_copy(self) -> Iterator[Path]:
        """A local folder holding these files: this folder when local, else a temporary download of the tree
        (MLflow's ``log_artifact(s)`` takes local files only)."""
        if self.is_local:
            yield self.local_path
            return
        with tempfile.TemporaryDirectory(prefix="raydarts-") as tmp:
            yield self.download(Path(tmp))

    # --- writing -----------------------------------------------------------------------------------------------
    def write_bytes(self, name: str, data: bytes) -> None:
        """Write the file ``name`` whole: renamed into place in a local folder, one put on an object store."""
        self._write(name, io.BytesIO(data))

    def write_text(self, name: str, text: str) -> None:
        """Write the file ``name`` whole (UTF-8), as write_bytes."""
        self.write_bytes(name, text.encode())

    def write_json(self, name: str, value: Any) -> None:
        """Write ``value`` as indented JSON to the file ``name``, as write_bytes."""
        self.write_text(name, json.dumps(value, indent=2) + "\n")

    def publish(self, local_dir: Path, marker: str | None = None) -> None:
        """Copy the tree under ``local_dir`` here; ``marker`` (a file in it, '/'-separated) is copied last, once
        everything else is here. ``local_dir`` is left as it is."""
        local_dir = Path(local_dir)
        names = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if not p.is_dir())
        if marker is not None and marker not in names:
            raise StorageError(f"cannot publish {local_dir} to {self.uri}: it holds no {marker}")

        def copy(name: str) -> None:
            with self._failing("publish", name), open(local_dir / name, "rb") as source:
                self._write(name, source)

        self._make_dir()
        with ThreadPoolExecutor(_COPY_THREADS) as pool:
            for _ in pool.map(copy, [name for name in names if name != marker]):
                pass
        if marker is not None:
            copy(marker)

    def check_writable(self) -> None:
        """A location that cannot be written stops a run before any work, with one line. A local folder is checked
        without writing anything (its nearest existing folder must be writable); elsewhere the folder (or prefix)
        is created and a probe file written and deleted there."""
        if self.is_local:
            existing = self.local_path
            while not existing.exists():
                existing = existing.parent
            if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
                problem = "not a folder" if not existing.is_dir() else "not writable"
                raise StorageError(f"cannot create {self.uri}: {existing} is {problem}")
            return
        probe = f".write-probe-{uuid.uuid4().hex}"
        self._make_dir()
        self.write_bytes(probe, b"")
        filesystem, root = self.filesystem()
        with self._failing("write to"):
            filesystem.delete_file(_inner(root, probe))

    # --- helpers -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _failing(self, action: str, name: str | None = None) -> Iterator[None]:
        """Turn pyarrow's and the OS's errors (often many lines) into a one-line StorageError naming the place."""
        import pyarrow

        try:
            yield
        except StorageError:
            raise
        except (OSError, ValueError, pyarrow.ArrowException) as err:
            raise StorageError(f"cannot {action} {_inner(self.uri, name)}: {_one_line(err)}") from err

    def _make_dir(self) -> None:
        filesystem, root = self.filesystem()
        with self._failing("create"):
            filesystem.create_dir(root, recursive=True)

    def _write(self, name: str, source: IO[bytes]) -> None:
        with self._failing("write", name):
            if self.is_local:
                _replace_atomically(self.local_path / name, source)
            else:
                filesystem, root = self.filesystem()
                with filesystem.open_output_stream(_inner(root, name)) as stream:
                    shutil.copyfileobj(source, stream)


def _inner(root: str, name: str | None) -> str:
    return f"{root.rstrip('/')}/{name.strip('/')}" if name else root


def _replace_atomically(target: Path, source: IO[bytes]) -> None:
    """Write ``target`` through a temporary file renamed over it, created with mode 0o666 less the umask like any
    plain ``open()`` (mkstemp's 0o600 would hide outputs from the other users of a shared folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as out:
            shutil.copyfileobj(source, out)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
