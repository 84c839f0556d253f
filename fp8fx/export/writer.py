"""Sharded safetensors and an atomically replaced checkpoint folder.

:func:`write_folder` writes every file into a hidden sibling folder (``.<name>.tmp-<id>``),
``fsync``s each file and the folder, and only then moves it onto ``out_dir`` with one
``os.rename``. When ``out_dir`` already holds a checkpoint, it is first renamed to a hidden
backup (``.<name>.old-<id>``) and deleted only after the new folder is in place; if that second
rename fails the backup is moved back. So a save that is interrupted at any point leaves either
the previous folder or the new one under ``out_dir`` (a hard crash between the two renames
leaves no ``out_dir`` and the previous checkpoint in the hidden backup), never a folder that
looks complete but is not. A folder that does not look like a checkpoint (no ``config.json``)
is never replaced: fp8fx will not delete files it did not write.

Shards follow transformers' layout: one ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
files plus ``model.safetensors.index.json`` (``metadata.total_size`` and a ``weight_map``) when
the tensors exceed ``max_shard_size``. Every file carries the safetensors metadata
``{"format": "pt"}`` that transformers requires.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from ..errors import ConfigError, Fp8fxError
from ..fileio import _fsync_dir, _fsync_file
from .checks import CONFIG, INDEX, SINGLE

__all__ = ["parse_size", "shard", "write_folder", "write_tensors"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from ``5_000_000_000``, ``"5GB"`` or ``"500MiB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ConfigError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size) if isinstance(size, str) else None
    if m is None or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"max_shard_size {size!r}: give bytes (an int) or a size like '5GB' or '500MiB'")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ConfigError(f"max_shard_size must be positive, got {size!r}")
    return value


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def shard(tensors: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """Split in order; a tensor larger than ``max_bytes`` gets a shard of its own."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = _nbytes(t)
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def write_tensors(folder: Path, tensors: dict[str, Tensor], max_bytes: int) -> list[Path]:
    from safetensors.torch import save_file

    parts = shard(tensors, max_bytes)
    written = []
    if len(parts) == 1:
        names = [SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for name, part in zip(names, parts):
        path = folder / name
        save_file({k: v.detach().contiguous() for k, v in part.items()}, str(path), metadata={"format": "pt"})
        written.append(path)
    if len(parts) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
                 "weight_map": {k: name for name, part in zip(names, parts) for k in part}}
        path = folder / INDEX
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def write_folder(out_dir: str | os.PathLike[str], fill: Callable[[Path], None]) -> Path:
    """Call ``fill(tmp)`` to write the checkpoint into a hidden sibling folder, then move it onto
    ``out_dir`` (module docstring). Returns ``out_dir`` as a Path."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise Fp8fxError(f"{out}: exists and is not a folder; give a folder to save the checkpoint into")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG).is_file():
        raise Fp8fxError(f"{out}: a non-empty folder without {CONFIG}, so not a checkpoint; fp8fx replaces only a "
                         "previous checkpoint folder. Choose another folder or empty it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = out.with_name(f".{out.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tag}")
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            with contextlib.suppress(OSError):
                os.rename(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
