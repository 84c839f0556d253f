"""What the eager entry points (:mod:`fp8fx.api`) and the torch.compile backend
(:mod:`fp8fx.backends.dynamo`) share: the per-model state, config resolution and checks, the
measurement files of a config, and the MEASURE passes on one captured graph.

Both import this module and neither imports the other, so there is no import cycle::

    fp8fx.api ──────────┐
                        ├──> fp8fx.state ──> config, capture, formats.inc, passes.*
    fp8fx.backends.dynamo ┘

Where a model's state lives:

* ``prepare``/``convert`` put it on the model, in ``model.__dict__["_fp8fx"]``;
* ``torch.compile(model, backend="fp8fx")`` in MEASURE mode cannot (the backend sees graphs,
  not always the model), so it keys the state by the model's parameters (by identity, weakly) in
  :data:`_MEASURE` (:func:`compiled_state_of`); :func:`state_of` finds either.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .capture import CapturedGraph, CompiledForward
from .config import FP8Config, Mode
from .errors import ConfigError, UnsupportedError
from .formats.inc import Measurements, measurement_file_paths, read_measurements
from .fp8 import FP8_DTYPES
from .observers import NodeObserver
from .passes.annotate import Decision, annotate
from .passes.match import check_same_op, find_matches
from .passes.observe import insert_observers
from .passes.rewrite_attention import AttentionQuant

__all__ = ["Fp8fxState", "ATTR", "unwrap", "state_of", "compiled_state_of", "measure_state", "resolve_config", "check_supported",
           "check_hp_dtype", "worker", "rank_world", "measurement_exists", "load_measurements", "quantize_config",
           "instrument"]

ATTR = "_fp8fx"  # the attribute of the model that holds its Fp8fxState


@dataclass
class Fp8fxState:
    config: FP8Config
    phase: str                                   # "measure" | "pending" | "converted"
    compiled: CompiledForward | None = None
    original_forward: Any = None                 # the model's own forward while fp8fx replaces it
    observers: dict[str, NodeObserver] = field(default_factory=dict)
    decisions: dict[str, Decision] = field(default_factory=dict)   # name -> decision
    measurements: Measurements | None = None
    files: list[Path] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    attention: dict[str, AttentionQuant] = field(default_factory=dict)  # graph-level scales by name
    calls_at_finalize: int | None = None         # observer calls when the files were written

    def record(self, decisions: list[Decision]) -> None:
        """Keep the first decision per node name; a name that another graph gave to a different
        op raises (:func:`~fp8fx.passes.match.check_same_op`)."""
        for d in decisions:
            known = self.decisions.setdefault(d.match.name, d)
            check_same_op(known.match, d.match)


# ----------------------------------------------------------------------------- where state lives
# parameter -> the MEASURE state of the torch.compile(backend="fp8fx")-compiled model that owns it
# (keyed by identity: tensors compare elementwise, so a plain WeakKeyDictionary cannot hold them)
_MEASURE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind a ``torch.compile`` wrapper (OptimizedModule)."""
    return getattr(model, "_orig_mod", model)


def state_of(model: nn.Module) -> Fp8fxState | None:
    """The model's fp8fx state: the one ``prepare``/``convert`` put on it or, failing that, the
    MEASURE state that ``torch.compile(model, backend="fp8fx")`` built; None when neither."""
    model = unwrap(model)
    state = model.__dict__.get(ATTR)
    return state if state is not None else compiled_state_of(model)


def compiled_state_of(model: nn.Module) -> Fp8fxState | None:
    """The MEASURE state that ``torch.compile(model, backend="fp8fx")`` built, or None."""
    for p in model.parameters():
        state = _MEASURE.get(p)
        if state is not None:
            return state
    return None


def measure_state(cg: CapturedGraph, cfg: FP8Config) -> Fp8fxState:
    """The MEASURE state shared by every graph (prefill, decode, ...) that dynamo hands the
    backend for the same model and config, found through the graph's parameters."""
    params = [t for t in cg.example_inputs if isinstance(t, nn.Parameter)]
    for p in params:
        state = _MEASURE.get(p)
        if state is not None and state.config == cfg:
            break
    else:
        state = Fp8fxState(config=cfg, phase="measure")
    for p in params:
        _MEASURE[p] = state
    return state


# ------------------------------------------------------------------------------- config checks
def resolve_config(cfg: FP8Config | dict | str | os.PathLike | None, what: str) -> FP8Config:
    """``cfg`` as an FP8Config: itself, a dict of INC keys, a JSON path, or (None) the file named
    by QUANT_CONFIG. ``what`` names the entry point in the error messages."""
    if cfg is None:
        if not os.environ.get("QUANT_CONFIG"):
            raise ConfigError(f"fp8fx.{what}: no config given and QUANT_CONFIG is not set; pass an "
                              "FP8Config or set QUANT_CONFIG to a JSON config file")
        return FP8Config.from_env()
    if isinstance(cfg, FP8Config):
        return cfg
    if isinstance(cfg, dict):
        return FP8Config.from_dict(cfg)
    if isinstance(cfg, (str, os.PathLike)):
        return FP8Config.from_json_file(cfg)
    raise ConfigError(f"fp8fx.{what}: config must be an FP8Config, a dict or a JSON path, got {type(cfg).__name__}")


_NO_EFFECT = {"use_qdq": False, "fake_quant": False, "recalc_scales": False, "calibration_sample_interval": 0,
              "scale_format": "scalar"}


def check_supported(cfg: FP8Config) -> None:
    """Refuse what this version cannot do instead of silently doing something else."""
    if cfg.mode in (Mode.LOAD, Mode.SHAPE):
        raise UnsupportedError(
            f"mode {cfg.mode.value!r} is not supported by this version of fp8fx (INC's LOAD reads a model "
            "that was quantized and saved before; SHAPE records shapes only). Load an FP8 checkpoint with "
            "fp8fx.load_pretrained(DIR), or use QUANTIZE with the measurement files (dump_stats_path), or MEASURE")
    if cfg.observer.value not in ("maxabs", "maxabs_per_channel", "percentile", "mse"):
        raise UnsupportedError(f"observer {cfg.observer.value!r} is not supported by this version of fp8fx; "
                               "use 'maxabs', 'maxabs_per_channel', 'percentile' or 'mse'")
    if cfg.mode is not Mode.QUANTIZE and not (cfg.measure_inputs or cfg.measure_outputs or cfg.measure_params):
        raise ConfigError("measure_exclude='ALL' measures nothing; use 'OUTPUT' (the default) or 'NONE'")
    changed = [k for k, default in _NO_EFFECT.items() if getattr(cfg, k) != default]
    if changed:
        warnings.warn(f"FP8Config keys {changed} have no effect in this version of fp8fx (FP8 weights "
                      "are always stored as FP8 and scales computed at convert)", UserWarning, stacklevel=3)


def check_hp_dtype(model: nn.Module, cfg: FP8Config) -> None:
    """``hp_dtype`` is the dtype of the non-FP8 ops and of the outputs, which run in the model's
    own parameters' dtype: a model whose high-precision parameters have another dtype is refused
    (fp8fx never casts a model behind the user's back)."""
    want = cfg.hp_torch_dtype
    if want is None:
        return
    wrong = [(n, p.dtype) for n, p in model.named_parameters()
             if p.is_floating_point() and p.dtype not in FP8_DTYPES and p.dtype != want]
    if wrong:
        listing = ", ".join(f"{n} ({str(d).replace('torch.', '')})" for n, d in wrong[:3])
        raise ConfigError(
            f"hp_dtype is {cfg.hp_dtype.value!r} but {len(wrong)} parameter(s) of {type(model).__name__} are "
            f"not {str(want).replace('torch.', '')}: {listing}{' ...' if len(wrong) > 3 else ''}. Cast the "
            f"model first (model.to({want})), set hp_dtype to the model's dtype, or leave hp_dtype unset "
            "to follow the model")


def quantize_config(cfg: FP8Config | dict | str | None, fallback: FP8Config | None) -> FP8Config:
    """The QUANTIZE config of ``convert``: ``cfg`` resolved (or ``fallback`` with mode QUANTIZE
    when ``cfg`` is None), checked, with AUTO turned into QUANTIZE."""
    cfg = fallback.replace(mode="QUANTIZE") if cfg is None and fallback is not None else resolve_config(cfg, "convert")
    check_supported(cfg)
    if cfg.mode is Mode.MEASURE:
        raise ConfigError("fp8fx.convert: the config's mode is MEASURE; use fp8fx.prepare to "
                          "calibrate, or set mode to QUANTIZE")
    return cfg.replace(mode="QUANTIZE") if cfg.mode is not Mode.QUANTIZE else cfg


# --------------------------------------------------------------------------- measurement files
def worker(cfg: FP8Config) -> tuple[int | None, int | None]:
    """(rank, world_size) of the measurement files this process reads: its own per-rank files
    (:func:`rank_world`), or the one shared set that a data-parallel calibration wrote
    (``calibration_parallel``, :func:`fp8fx.distributed.files_worker`)."""
    from .distributed import files_worker

    return files_worker(cfg, rank_world(cfg))


def rank_world(cfg: FP8Config) -> tuple[int | None, int | None]:
    """(rank, world_size) of the per-rank file names: the config's, else LOCAL_RANK/WORLD_SIZE
    from the environment when more than one process runs (as INC does), else none."""
    if cfg.world_size is not None:
        return (cfg.local_rank if cfg.local_rank is not None else 0), cfg.world_size
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    except ValueError as exc:
        raise ConfigError(f"environment variables WORLD_SIZE / LOCAL_RANK (or RANK) must be integers: {exc}; "
                          "unset them or set local_rank and world_size in the FP8Config") from exc
    return (rank, world) if world > 1 else (None, None)


def measurement_exists(cfg: FP8Config) -> bool:
    rank, world = worker(cfg)
    return any(p.exists() for p in measurement_file_paths(cfg.dump_stats_path, cfg.observer.value, rank, world))


def load_measurements(cfg: FP8Config) -> Measurements | None:
    """The config's measurement files, or None when its scale methods need none and none exist."""
    if not cfg.needs_measurement and not measurement_exists(cfg):
        return None
    rank, world = worker(cfg)
    return read_measurements(cfg.dump_stats_path, observer=cfg.observer.value, rank=rank, world_size=world)


# ------------------------------------------------------------------------------ MEASURE passes
def instrument(cg: CapturedGraph, state: Fp8fxState, model: nn.Module | None = None) -> torch.fx.GraphModule:
    """MEASURE passes on one captured graph: match, annotate, observer nodes. ``model`` is None
    under torch.compile (decisions are then taken from the graph alone)."""
    cfg = state.config
    decisions = annotate(cg.gm, find_matches(cg), cfg, model)
    state.record(decisions)
    insert_observers(cg.gm, decisions, state.observers, measure_inputs=cfg.measure_inputs,
                     measure_outputs=cfg.measure_outputs, cfg=cfg)
    return cg.gm
