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

Several files that belong together (a measurement ``.json``, its ``.npz`` and its module list)
are written with :func:`atomic_paths`: every temporary file is written and flushed before any
target is replaced, and the targets are then replaced one after the other. No file system can
replace several files in one step, so if that renaming phase is interrupted (an exception,
Ctrl-C) the targets already replaced are rolled back from hidden hard-link backups (copies where
links are not supported) taken just before. Only a hard crash (power loss, ``kill -9``) in the
few microseconds between two renames can leave a mixed set; readers detect that with the write
id that :mod:`fp8fx.formats.inc` stamps into every file of one write.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_paths", "atomic_write_bytes", "atomic_write_text",
           "atomic_write_json"]


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


def _sibling(target: Path, tag: str) -> Path:
    """A hidden name next to ``target`` that keeps its extension (``.{stem}.{tag}-{id}{ext}``)."""
    return target.with_name(f".{target.stem}.{tag}-{uuid.uuid4().hex[:12]}{target.suffix}")


def _backup(target: Path) -> Path | None:
    """A hidden hard link (or copy) of ``target``, or None when ``target`` does not exist."""
    if not target.exists():
        return None
    bak = _sibling(target, "bak")
    try:
        os.link(target, bak)
    except OSError:
        shutil.copy2(target, bak)
    return bak


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """Yield one temporary path per target; move them all onto the targets when the block succeeds.

    The temporary files exist (empty) when the block starts; the block may write or replace
    them. If the block raises, every temporary file is removed, no target is touched and the
    exception propagates. Otherwise the targets are replaced in the order given; if that is
    interrupted, the targets already replaced get their previous content back (or are removed
    when they did not exist) before the exception propagates. Parent directories are created.
    """
    targets = [Path(p) for p in paths]
    tmps: list[Path] = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = _sibling(target, "tmp")
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            tmps.append(tmp)
        yield list(tmps)
        for tmp in tmps:
            _fsync_file(tmp)
    except BaseException:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    # Backups of every target but the last (nothing follows the last rename to roll back).
    backups: list[Path | None] = []
    done = 0
    try:
        for target in targets[:-1]:
            backups.append(_backup(target))
        for tmp, target in zip(tmps, targets):
            os.replace(tmp, target)
            done += 1
    except BaseException:
        for target, bak in reversed(list(zip(targets[:done], backups))):
            with contextlib.suppress(OSError):
                if bak is None:
                    os.unlink(target)
                else:
                    os.replace(bak, target)
        for leftover in tmps[done:] + [b for b in backups if b is not None]:
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        raise
    for bak in backups:
        if bak is not None:
            with contextlib.suppress(OSError):
                os.unlink(bak)
    for directory in dict.fromkeys(t.parent for t in targets):
        _fsync_dir(directory)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` when the block succeeds.

    The temporary file exists (empty) when the block starts; the block may write it or replace
    it. If the block raises, the temporary file is removed, ``path`` is untouched and the
    exception propagates. Parent directories of ``path`` are created.
    """
    with atomic_paths(path) as (tmp,):
        yield tmp


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
