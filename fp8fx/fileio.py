"""Atomic file writes.

Every file fp8fx writes (measurements, scales, configs, checkpoints) goes through
:func:`atomic_path`: the content is written to a temporary file in the *same directory* as the
target, flushed to disk with ``fsync``, and only then moved onto the target with
``os.replace`` (atomic on POSIX and Windows when both paths are on one file system). A run that
is interrupted — an exception, Ctrl-C, a full disk — therefore leaves the previous file intact
and no half-written file behind; the temporary file is deleted on failure.

The temporary name starts with a dot (hidden, and never matched by a ``dump_stats_path``
prefix) and keeps the target's extension, so libraries that append an extension to names
without one (``numpy.savez`` adds ``.npz``) write exactly where they are told. The file is
created with mode ``0o666`` filtered by the process umask, like an ordinary ``open(..., "w")``.

Several files that belong together (a measurement ``.json`` and its ``.npz``) are written with
one :class:`contextlib.ExitStack` holding an :func:`atomic_path` per file: nothing is replaced
until every file has been written.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json"]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` when the block succeeds.

    The temporary file exists (empty) when the block starts; the block may write it or replace
    it. If the block raises, the temporary file is removed, ``path`` is untouched and the
    exception propagates. Parent directories of ``path`` are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp-{uuid.uuid4().hex[:12]}{target.suffix}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path`` as a :class:`Path`."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path`` as a :class:`Path`."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 4,
                      allow_nan: bool = False) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically; returns ``path`` as a :class:`Path`.

    ``allow_nan`` is off by default: NaN and Infinity are not JSON, and most readers reject
    them. The object is serialized before anything touches the disk, so an unserializable
    object raises without creating a temporary file.
    """
    text = json.dumps(obj, indent=indent, allow_nan=allow_nan)
    return atomic_write_text(path, text + "\n")
