"""One calibration, every target: checkpoints for any device from one set of measurement files.

The measurements (INC's ``{prefix}_hooks_{observer}`` files, docs/observers.md) are the artifact of
a calibration; scales are derived from them per target when a checkpoint is written::

    fp8fx.export.export_from_measurements("llama", "stats/measure", "llama-fp8-cuda", target="cuda")
    fp8fx.export.export_from_measurements("llama", "stats/measure", "llama-inc-g2", target="gaudi2",
                                          format="inc")

    fp8fx export --measurements stats/measure --model llama --target gaudi3 --format inc --out OUT

Per target (:mod:`fp8fx.numerics`): ``fp8_max`` is 448 for E4M3 on cpu / cuda / gaudi3 and 240 on
gaudi2; ``maxabs_hw`` (the default method) rounds to powers of two on cpu / cuda, snaps up to
Gaudi3's powers of two 2^-55..2^7, or to Gaudi2's {1/256, 1/16, 1, 16}. The formats:

* ``compressed-tensors``, ``vllm``, ``modelopt`` hold FP8 weights and their scales, derived here
  for the target. Their consumers assume E4M3's full 448 range (vLLM on Gaudi converts such a
  file for Gaudi2 when it loads it), so a gaudi2 export in these formats is
  refused (:func:`fp8fx.export.plan.plan_of` says the same for any 240-range model): use ``inc``.
* ``inc`` holds the high-precision checkpoint, the QUANTIZE config for the target
  (``device_for_scales`` on Gaudi) and a copy of the measurement files; INC derives the scales
  when it loads (:mod:`.inc_format`). The model is still converted here once, so a config that
  the files cannot serve (a Linear they do not name) fails now, naming the node, not at load.

``cfg`` (an FP8Config, a dict of INC keys or a JSON path) gives the allow/blocklists, scale
methods, scheme and backoffs; it is forced to mode QUANTIZE with ``dump_stats_path`` = the
measurements prefix, the target, and (when it does not set one) the observer of the files found.
Without ``cfg``: every Linear but ``lm_head`` (``fp8fx.quantize``'s default blocklist), the
target's default scale method (``maxabs_hw``) and backoffs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import FP8Config
from ..errors import ConfigError, MeasurementError, UnsupportedError
from ..numerics import TARGETS
from ..state import resolve_config
from .inc_format import NAME as INC, MeasurementSet, find_measurements, write_inc

__all__ = ["export_from_measurements", "export", "ExportResult", "convert_from_measurements", "export_config",
           "EXPORT_FORMATS"]


def _tensor_formats() -> tuple[str, ...]:
    from .core import FORMATS

    return tuple(FORMATS)


#: formats ``export_from_measurements`` writes
EXPORT_FORMATS = ("compressed-tensors", "vllm", "modelopt", INC)
_EXAMPLE_TOKENS = 8


def _check_target_format(target: str, format: str) -> None:
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}: use one of {', '.join(sorted(TARGETS))}")
    known = (*_tensor_formats(), INC)
    if format not in known:
        raise ConfigError(f"unknown checkpoint format {format!r}: use one of {', '.join(known)}")
    if target == "gaudi2" and format != INC:
        raise UnsupportedError(
            f"target 'gaudi2' in format {format!r}: Gaudi2's E4M3 range is 240, but {format!r} checkpoints hold "
            "E4M3 codes and scales for the full 448 range, which their consumers assume (vLLM on Gaudi converts "
            "such a file for Gaudi2 when it loads it). Export format 'inc' for gaudi2 (INC derives the 240-range "
            f"scales at load), or a 448-range target (cuda, cpu, gaudi3) in {format!r}")


def _base_config(cfg: FP8Config | dict | str | os.PathLike | None) -> FP8Config:
    if cfg is None:
        from ..api import QUANTIZE_DEFAULT_BLOCKLIST

        return FP8Config(blocklist=QUANTIZE_DEFAULT_BLOCKLIST)
    return resolve_config(cfg, "export")


def export_config(measurements: str | os.PathLike[str], *, target: str = "cuda",
                  cfg: FP8Config | dict | str | os.PathLike | None = None) -> tuple[FP8Config, MeasurementSet]:
    """The QUANTIZE config of an export (module docstring) and the measurement files it reads."""
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}: use one of {', '.join(sorted(TARGETS))}")
    base = _base_config(cfg)
    given = isinstance(cfg, FP8Config) or (isinstance(cfg, dict) and "observer" in cfg) or (
        isinstance(cfg, (str, os.PathLike)) and "observer" in _json_keys(cfg))
    found = find_measurements(measurements, base.observer.value if given else None)
    qcfg = base.replace(mode="QUANTIZE", dump_stats_path=os.fspath(measurements), target=target,
                        observer=found.observer)
    if not qcfg.needs_measurement:
        raise ConfigError(f"the config computes every scale without measurements (scheme "
                          f"{qcfg.scheme.to_json() if qcfg.scheme else qcfg.resolved_scale_method.value!r}): "
                          "exporting from measurements needs static activation scales; use fp8fx.quantize then "
                          "fp8fx.save_pretrained for a scheme without calibration")
    return qcfg, found


def _json_keys(path: str | os.PathLike) -> set[str]:
    import json

    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return set()  # FP8Config.from_json_file has named the problem already
    return set(d) if isinstance(d, dict) else set()


def _per_rank_only(found: MeasurementSet) -> None:
    if not found.shared:
        worlds = ", ".join(f"world {w}: ranks {r}" for w, r in found.worlds.items())
        raise MeasurementError(
            f"prefix '{found.prefix}' has only per-rank measurement files ({worlds}); a single checkpoint needs one "
            f"set: merge them first (fp8fx measurements merge {found.prefix} --world N), or export format 'inc', "
            "which copies every rank's files for INC to read per rank")


def _example_ids(model: nn.Module) -> torch.Tensor:
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or _EXAMPLE_TOKENS)
    return (torch.arange(_EXAMPLE_TOKENS) % max(vocab, 1)).reshape(1, -1)


def convert_from_measurements(model_dir: str | os.PathLike[str], measurements: str | os.PathLike[str], *,
                              target: str = "cuda", cfg: FP8Config | dict | str | os.PathLike | None = None,
                              dtype: str | torch.dtype | None = None) -> tuple[nn.Module, Any, FP8Config]:
    """Load the high-precision model of ``model_dir`` and convert it for ``target`` from the
    measurement files ``measurements``; returns ``(qmodel, tokenizer, quantize_config)``.
    ``dtype`` (default: the config's ``hp_dtype``, else float32) is the model's dtype."""
    import fp8fx

    from ..data import load_model

    qcfg, found = export_config(measurements, target=target, cfg=cfg)
    if dtype is None:
        dtype = qcfg.hp_torch_dtype or torch.float32
    model, tokenizer = load_model(model_dir, dtype)
    if not found.shared:  # per-rank files only: this process reads its own rank's set
        r, w = next((r[0], w) for w, r in found.worlds.items())
        qcfg_convert = qcfg.replace(world_size=w, local_rank=r)
    else:
        qcfg_convert = qcfg
    with torch.no_grad():
        fp8fx.convert(model, qcfg_convert, example_inputs=(_example_ids(model),))
    return model, tokenizer, qcfg


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote: the folder, its format and target, the quantized Linears."""

    path: Path
    format: str
    target: str
    quantized: tuple[str, ...]       # Fp8Linear module names (for inc: what INC quantizes at load)

    def files(self) -> list[str]:
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())


def _linears(model: nn.Module) -> tuple[str, ...]:
    from ..modules import Fp8Linear

    return tuple(n for n, m in model.named_modules() if isinstance(m, Fp8Linear))


def export(model_dir: str | os.PathLike[str], measurements: str | os.PathLike[str], out_dir: str | os.PathLike[str],
           *, target: str = "cuda", format: str = "compressed-tensors",
           cfg: FP8Config | dict | str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
           max_shard_size: int | str | None = None) -> ExportResult:
    """:func:`export_from_measurements`, returning an :class:`ExportResult`."""
    _check_target_format(target, format)
    if not Path(model_dir).is_dir():
        raise ConfigError(f"model folder {model_dir} does not exist; give the high-precision HF model folder")
    qcfg, found = export_config(measurements, target=target, cfg=cfg)
    if format == INC:
        if max_shard_size is not None:
            raise ConfigError(f"max_shard_size {max_shard_size!r}: the inc format copies the model folder's shards as "
                              "they are; leave it unset")
        # converted once as a check: a Linear the files do not name fails now, naming it
        model, _, _ = convert_from_measurements(model_dir, measurements, target=target, cfg=qcfg, dtype=dtype)
        path = write_inc(out_dir, model_dir=model_dir, measurements=found, cfg=qcfg)
        return ExportResult(path, format, target, _linears(model))
    _per_rank_only(found)
    from .core import save_pretrained

    model, tokenizer, _ = convert_from_measurements(model_dir, measurements, target=target, cfg=qcfg, dtype=dtype)
    path = save_pretrained(model, out_dir, format=format, tokenizer=tokenizer,
                           max_shard_size="5GB" if max_shard_size is None else max_shard_size)
    return ExportResult(path, format, target, _linears(model))


def export_from_measurements(model_dir: str | os.PathLike[str], measurements: str | os.PathLike[str],
                             out_dir: str | os.PathLike[str], *, target: str = "cuda",
                             format: str = "compressed-tensors",
                             cfg: FP8Config | dict | str | os.PathLike | None = None,
                             dtype: str | torch.dtype | None = None, max_shard_size: int | str | None = None) -> Path:
    """Write a ``format`` checkpoint of ``model_dir`` for ``target`` into ``out_dir`` (atomically),
    with the scales derived from the measurement files of prefix ``measurements`` (module
    docstring); returns ``out_dir``. ``max_shard_size`` (default 5GB) applies to the tensor
    formats; ``inc`` copies the model folder's shards as they are."""
    return export(model_dir, measurements, out_dir, target=target, format=format, cfg=cfg, dtype=dtype,
                  max_shard_size=max_shard_size).path
