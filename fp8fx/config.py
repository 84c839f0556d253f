"""FP8Config: every Intel Neural Compressor (INC) FP8 config key, validated up front.

One frozen dataclass holds the whole configuration. The constructor takes plain strings, dicts
and lists (what a QUANT_CONFIG JSON file holds) and coerces them to str-Enums and small frozen
value classes in ``__post_init__``; anything unknown raises :class:`~fp8fx.errors.ConfigError`
naming the key, the bad value, the valid choices and the closest one. Nothing here probes
hardware: ``target`` says which device the scales are for.

Keys (INC names), defaults and accepted values::

    mode                 "AUTO"      AUTO | MEASURE | QUANTIZE | SHAPE | LOAD
    fp8_config           "E4M3"      E4M3 | E5M2
    hp_dtype             None        bf16 | fp16 | fp32: dtype of non-FP8 ops and of outputs; the
                                     model's high-precision parameters must have it (checked at
                                     prepare/convert: fp8fx never casts a model); None (INC:
                                     "bf16") follows the model
    observer             "maxabs"    maxabs | maxabs_per_channel | percentile | mse | shape | save
    observer_params      {}          {"percentile": 99.99} (observer percentile), {"maxshrink": 0.8,
                                     "grid": 100, "norm": 2.0} (observer mse), {"kv_cache_strategy":
                                     "tensor" | "attn_head"} (any observer: per-head KV/attention
                                     scales); :class:`fp8fx.observers.ObserverParams`, docs/observers.md
    allowlist            {"names": [], "types": []}   empty: every supported op
    blocklist            {"names": [], "types": []}   names: regexes, re.search on module path
    dump_stats_path      "./hqt_output/measure"       directory plus file-name prefix
    scale_method         (target default, DEFAULT_SCALE_METHOD) a method name or a dict
    measure_exclude      "OUTPUT"    NONE | OUTPUT | INPUT | PARAMS | ALL
    scale_format         "scalar"    scalar | const
    use_qdq, fake_quant  false
    scale_params         (target default, DEFAULT_BACKOFFS) {"input_backoff": .., "weight_backoff": ..},
                         each in (0, 1]; gaudi: INC's 0.25 / 0.5, cpu/cuda: 0.5 / 1.0
    device_for_scales    GAUDI2 | GAUDI3: INC's key, sets ``target``
    target               "cpu"       cpu | cuda | gaudi2 | gaudi3 (written for cpu/cuda)
    dynamic_quantization false       activation scales computed at run time (per token)
    ignore_modules_wo_measures false skip modules without measurements instead of failing
    recalc_scales        false       recompute scales even when a cached scale file exists
    calibration_sample_interval 0    dump measurements every N samples (0: at the end only)
    world_size, local_rank null      per-rank file names: {prefix}_hooks_{observer}_{rank}_{world}
    seperate_measure_files true      (INC's spelling) one measurement file per rank
    calibration_parallel "auto"      fp8fx only (INC has no such key): data | tensor | auto. "data":
                                     the ranks of a torch.distributed group hold the same model and
                                     calibrate different data; finalize_calibration reduces their
                                     statistics and rank 0 writes one set of files. "tensor": each
                                     rank writes its own per-rank files (sharded weights, INC's way).
                                     "auto": data when every rank of an initialized group measured
                                     the same nodes with the same weights, else tensor
                                     (:mod:`fp8fx.distributed`, docs/distributed.md)
    kv_cache_dtype       null        E4M3 | E5M2 (also vLLM's fp8_e4m3 / fp8_e5m2): FP8 format of
                                     the KV cache; null: fp8_config's
    scheme               null        FP8 | FP8_DYNAMIC | FP8_BLOCK | FP8_WEIGHT_ONLY, or an object
                                     {"weights": tensor|channel|block, "activations": static|
                                     dynamic_tensor|dynamic_token|dynamic_group|none, "block":
                                     [128, 128], "group_size": 128}, or {"linear": .., "experts": ..}
                                     (:mod:`fp8fx.schemes`); null: weights per scale_method,
                                     activations static (dynamic per token with
                                     dynamic_quantization). A scheme without static activations
                                     defaults to scale_method maxabs_arbitrary, weight_backoff 1.0

Example QUANT_CONFIG::

    {"mode": "QUANTIZE", "observer": "maxabs", "scale_method": "maxabs_hw",
     "allowlist": {"types": [], "names": []}, "blocklist": {"types": [], "names": ["lm_head"]},
     "dump_stats_path": "./hqt_output/measure", "device_for_scales": "GAUDI3"}

``scale_method`` also takes INC's dict form (a default plus per-node, per-layer and per-type
overrides, each with its own backoffs); :mod:`fp8fx.scale_methods` describes it and holds the
method table. Deliberate differences from INC: a dict entry without ``backoff`` uses
``scale_params`` (INC uses 1.0 there and INC 3.x ignores ``scale_params``); INPUT and PARAMS in
``measure_exclude`` act literally (INC only acts on OUTPUT and ALL).

Legacy HQT keys (``method``, ``quantize_weight``, ``whitelist``, ``blacklist``) load with a
FutureWarning; INC keys without meaning here (``measure_on_hpu``, ``mod_dict``...) with a
UserWarning. HW-aligned methods (``maxabs_hw*``, ``hw_aligned_single_scale``) are allowed on
cpu/cuda targets, where the hardware scale set is plain powers of two.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import numerics
from .fp8 import FORMATS, format_of
from .errors import ConfigError
from .fileio import atomic_write_json
from .observers import ObserverParams
from .schemes import LinearScheme, Scheme, WeightGranularity, ActivationScheme
from .scale_methods import (
    ScaleMethod, ScaleMethodOverrides, ScaleRule, ScaleSpec, _backoff, _check_keys, _choice, _first,
    _short, _StrEnum, coerce_scale_method,
)

__all__ = [
    "Mode", "Fp8Format", "HpDtype", "ObserverKind", "Target", "ScaleFormat", "MeasureExclude",
    "ScaleSpec", "ScaleMethod", "ScaleRule", "ScaleMethodOverrides", "OpFilter", "FP8Config",
    "DEFAULT_SCALE_METHOD", "DEFAULT_BACKOFFS", "CalibrationParallel",
]


class Mode(_StrEnum):
    AUTO = "AUTO"
    MEASURE = "MEASURE"
    QUANTIZE = "QUANTIZE"
    SHAPE = "SHAPE"
    LOAD = "LOAD"


class Fp8Format(_StrEnum):
    E4M3 = "E4M3"
    E5M2 = "E5M2"

    @property
    def torch_dtype(self) -> torch.dtype:
        return format_of(self.value).dtype


class HpDtype(_StrEnum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.value]


_DTYPE_ALIASES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                  "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
                  **{f.dtype: f.name.upper() for f in FORMATS.values()}}


_KV_ALIASES = {"fp8": "E4M3", "fp8_e4m3": "E4M3", "fp8_e5m2": "E5M2", "e4m3": "E4M3", "e5m2": "E5M2"}


class ObserverKind(_StrEnum):
    MAXABS = "maxabs"
    MAXABS_PER_CHANNEL = "maxabs_per_channel"
    PERCENTILE = "percentile"
    MSE = "mse"
    SHAPE = "shape"
    SAVE = "save"


class Target(_StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    GAUDI2 = "gaudi2"
    GAUDI3 = "gaudi3"


class ScaleFormat(_StrEnum):
    SCALAR = "scalar"
    CONST = "const"


class CalibrationParallel(_StrEnum):
    """How the ranks of a multi-process calibration share the work (fp8fx.distributed)."""

    AUTO = "auto"
    DATA = "data"
    TENSOR = "tensor"


class MeasureExclude(_StrEnum):
    """Tensors MEASURE mode skips. INC takes exactly one name ("INPUT|OUTPUT" is an error)."""

    NONE = "NONE"
    OUTPUT = "OUTPUT"
    INPUT = "INPUT"
    PARAMS = "PARAMS"
    ALL = "ALL"

    def measures(self, kind: str) -> bool:
        """Whether ``kind`` ("INPUT", "OUTPUT" or "PARAMS") is measured."""
        return self.value not in (kind.upper(), "ALL")


#: Method used when ``scale_method`` is None: INC's default on every target. For cpu/cuda it was
#: picked by a sweep scored on a validation text disjoint from calibration and evaluation
#: (docs/accuracy.md, ``scripts/sweep_defaults.py``): maxabs_hw (power-of-two scales there) with
#: INC's backoffs scored best; unrounded maxabs scales did not do better.
DEFAULT_SCALE_METHOD: dict[Target, ScaleMethod] = {t: ScaleMethod.MAXABS_HW for t in Target}

#: (input_backoff, weight_backoff) used when scale_params does not set them: INC's (see above).
DEFAULT_BACKOFFS: dict[Target, tuple[float, float]] = {t: (0.25, 0.5) for t in Target}

#: Weight scale method and backoff of a ``scheme`` without static activations (FP8_DYNAMIC,
#: FP8_BLOCK, FP8_WEIGHT_ONLY) when scale_method / scale_params do not set them: ``amax /
#: fp8_max`` unrounded, what llm-compressor and vLLM compute for these schemes.
SCHEME_SCALE_METHOD = ScaleMethod.MAXABS_ARBITRARY
SCHEME_WEIGHT_BACKOFF = 1.0


# -------------------------------------------------------------------------------- op filters
@dataclass(frozen=True)
class OpFilter:
    """An allowlist or blocklist: name regexes (``re.search``) and type names.

    Types compare by class name, the spelling INC uses: "torch.nn.Linear",
    "torch.nn.modules.linear.Linear" and "Linear" all match each other.
    """

    names: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    _patterns: tuple[re.Pattern[str], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("names", "types"):
            raw = getattr(self, key)
            listed = isinstance(raw, Iterable) and not isinstance(raw, (str, bytes, Mapping))
            value = tuple(raw) if listed else None
            if value is None or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"invalid value {raw!r} for {key!r}: give a list of strings, "
                                  f"e.g. {{\"{key}\": [\"lm_head\"]}}")
            object.__setattr__(self, key, value)
        patterns = []
        for n in self.names:
            try:
                patterns.append(re.compile(n))
            except re.error as e:
                raise ConfigError(f"invalid regex {n!r} in 'names': {e}; escape special "
                                  f"characters, e.g. 'model\\.layers\\.0\\.'") from None
        object.__setattr__(self, "_patterns", tuple(patterns))

    @classmethod
    def coerce(cls, value: Any, key: str) -> OpFilter:
        if isinstance(value, OpFilter) or value is None:
            return value or cls()
        if not isinstance(value, Mapping):
            raise ConfigError(f"invalid value {value!r} for {key!r}: expected an object "
                              f"{{\"names\": [regex, ...], \"types\": [type name, ...]}}")
        _check_keys(value, ("names", "types"), key)
        try:
            return cls(value.get("names") or (), value.get("types") or ())
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None

    def is_empty(self) -> bool:
        return not self.names and not self.types

    def matches_name(self, name: str) -> bool:
        return any(p.search(name) for p in self._patterns)

    def matches_type(self, type_names: Iterable[str]) -> bool:
        type_names = (type_names,) if isinstance(type_names, str) else type_names
        short = {_short(t) for t in self.types}
        return any(_short(t) in short for t in type_names)

    def matches(self, name: str, type_names: Iterable[str]) -> bool:
        return self.matches_name(name) or self.matches_type(type_names)

    def to_dict(self) -> dict[str, list[str]]:
        return {"names": list(self.names), "types": list(self.types)}


# --------------------------------------------------------------------------------- FP8Config
_LEGACY_KEYS = {"method": "HQT's hook method, always HOOKS", "quantize_weight": "weights are always quantized"}
_RENAMED_KEYS = {"whitelist": "allowlist", "blacklist": "blocklist"}
_IGNORED_INC_KEYS = ("measure_on_hpu", "row_parallel_linear_allreduce_quantization", "mod_dict",
                     "device_type", "global_rank")
_INC_DEVICE = {Target.GAUDI2: "GAUDI2", Target.GAUDI3: "GAUDI3"}
_ENUM_FIELDS = {"mode": Mode, "fp8_config": Fp8Format, "hp_dtype": HpDtype, "observer": ObserverKind,
                "measure_exclude": MeasureExclude, "scale_format": ScaleFormat, "target": Target,
                "calibration_parallel": CalibrationParallel}
_BOOL_FIELDS = ("use_qdq", "fake_quant", "dynamic_quantization", "ignore_modules_wo_measures",
                "recalc_scales", "seperate_measure_files")


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # INC accepts "True"
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(f"invalid value {value!r} for {key!r}: use true or false")
    return value


def _int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"invalid value {value!r} for {key!r}: expected an integer >= {minimum}")
    return value


@dataclass(frozen=True)
class FP8Config:
    """The whole FP8 configuration; the module docstring lists keys and defaults."""

    mode: Mode = Mode.AUTO
    fp8_config: Fp8Format = Fp8Format.E4M3
    hp_dtype: HpDtype | None = None      # None: the model's own dtype
    observer: ObserverKind = ObserverKind.MAXABS
    observer_params: ObserverParams = ObserverParams()  # fp8fx.observers; empty: defaults
    allowlist: OpFilter = OpFilter()
    blocklist: OpFilter = OpFilter()
    dump_stats_path: str = "./hqt_output/measure"
    scale_method: ScaleMethod | ScaleMethodOverrides | None = None
    measure_exclude: MeasureExclude = MeasureExclude.OUTPUT
    scale_format: ScaleFormat = ScaleFormat.SCALAR
    use_qdq: bool = False
    fake_quant: bool = False
    target: Target = Target.CPU
    input_backoff: float | None = None   # None: DEFAULT_BACKOFFS[target]
    weight_backoff: float | None = None
    dynamic_quantization: bool = False
    ignore_modules_wo_measures: bool = False
    recalc_scales: bool = False
    calibration_sample_interval: int = 0
    world_size: int | None = None
    local_rank: int | None = None
    seperate_measure_files: bool = True
    calibration_parallel: CalibrationParallel = CalibrationParallel.AUTO  # fp8fx.distributed
    kv_cache_dtype: Fp8Format | None = None  # None: fp8_config
    scheme: Scheme | None = None  # None: from scale_method and dynamic_quantization (INC's way)

    def __post_init__(self) -> None:
        put = object.__setattr__.__get__(self)  # frozen: coerce fields in place
        for key, enum_cls in _ENUM_FIELDS.items():
            value = getattr(self, key)
            if key == "hp_dtype" and value is None:
                continue
            if key in ("fp8_config", "hp_dtype") and isinstance(value, (str, torch.dtype)):
                value = _DTYPE_ALIASES.get(value, value)
            put(key, enum_cls.coerce(value, key))
        if self.kv_cache_dtype is not None:
            kv = self.kv_cache_dtype
            kv = _KV_ALIASES.get(kv.lower(), kv) if isinstance(kv, str) else _DTYPE_ALIASES.get(kv, kv)
            put("kv_cache_dtype", Fp8Format.coerce(kv, "kv_cache_dtype"))
        put("scheme", Scheme.coerce(self.scheme, "scheme"))
        put("observer_params", ObserverParams.coerce(self.observer_params, "observer_params"))
        self.observer_params.check_observer(self.observer.value)
        put("allowlist", OpFilter.coerce(self.allowlist, "allowlist"))
        put("blocklist", OpFilter.coerce(self.blocklist, "blocklist"))
        path = self.dump_stats_path
        path = os.fspath(path) if isinstance(path, os.PathLike) else path
        if not isinstance(path, str) or not path.strip():
            raise ConfigError(f"invalid value {self.dump_stats_path!r} for 'dump_stats_path': give "
                              f"a directory plus file-name prefix, e.g. './hqt_output/measure'")
        put("dump_stats_path", path)
        put("scale_method", coerce_scale_method(self.scale_method))
        for key in _BOOL_FIELDS:
            put(key, _bool(getattr(self, key), key))
        for key in ("input_backoff", "weight_backoff"):
            if getattr(self, key) is not None:
                put(key, _backoff(getattr(self, key), key))
        interval = _int(self.calibration_sample_interval, "calibration_sample_interval", 0)
        put("calibration_sample_interval", interval)
        for key, minimum in (("world_size", 1), ("local_rank", 0)):
            if getattr(self, key) is not None:
                put(key, _int(getattr(self, key), key, minimum))
        if self.world_size is not None and self.local_rank is not None and self.local_rank >= self.world_size:
            raise ConfigError(f"local_rank {self.local_rank} must be below world_size {self.world_size}")
        if self.calibration_parallel is CalibrationParallel.DATA and (self.world_size, self.local_rank) != (None, None):
            raise ConfigError("calibration_parallel 'data' writes and reads one shared set of measurement files, "
                              "but world_size/local_rank name per-rank files: drop world_size and local_rank, or use "
                              "calibration_parallel 'tensor'")
        self._check_dynamic()

    def _check_dynamic(self) -> None:
        sm = self.scale_method
        rules = sm.rules() if isinstance(sm, ScaleMethodOverrides) else [ScaleRule(self.resolved_scale_method)]
        for m in (r.method for r in rules):
            if m.dynamic_only and not self.dynamic_quantization:
                raise ConfigError(f"scale_method {m.value!r} computes activation scales at run time: "
                                  f"set \"dynamic_quantization\": true or pick a static method")
            if self.dynamic_quantization and m.activation_spec.value_type == "FIXED_VALUE":
                raise ConfigError(f"scale_method {m.value!r} uses fixed scales, which contradicts "
                                  f"\"dynamic_quantization\": true; pick a maxabs method")
        if self.dynamic_quantization and self.mode in (Mode.MEASURE, Mode.SHAPE):
            raise ConfigError(f"mode {self.mode.value!r} measures activations, but "
                              f"\"dynamic_quantization\": true needs none: use QUANTIZE, LOAD or AUTO")
        self._check_scheme(rules)

    def _check_scheme(self, rules: list[ScaleRule]) -> None:
        scheme = self.scheme
        if scheme is None:
            return
        label = scheme.name or "scheme"
        if self.dynamic_quantization and any(s.static for s in scheme.all()):
            raise ConfigError(f"\"dynamic_quantization\": true contradicts scheme {scheme.to_json()!r}, whose "
                              "activations are static: drop one of the two keys")
        if self.mode in (Mode.MEASURE, Mode.SHAPE) and not scheme.needs_measurement:
            raise ConfigError(f"mode {self.mode.value!r} measures activations, but scheme {scheme.to_json()!r} has "
                              "no static activation scale to calibrate: use mode QUANTIZE (or fp8fx.quantize)")
        for m in (r.method for r in rules):
            for kind, s in (("linear", scheme.linear), ("experts", scheme.experts)):
                if s.static and m.dynamic_only:
                    raise ConfigError(f"scale_method {m.value!r} computes activation scales at run time, but {label} "
                                      f"has static activations ({kind}): pick a static method")
                if s.weights is WeightGranularity.TENSOR and m.weight_per_channel:
                    raise ConfigError(f"scale_method {m.value!r} gives one weight scale per channel, but {label} "
                                      f"asks for one per tensor ({kind}): pick a per-tensor method or 'weights': "
                                      "'channel'")
                if s.weights is not WeightGranularity.TENSOR and m.weight_spec.value_type == "OPT" \
                        and not (s.weights is WeightGranularity.CHANNEL and m.weight_per_channel):
                    raise ConfigError(f"scale_method {m.value!r} searches per-tensor weight scales; {label} has "
                                      f"{s.weights.value} weights ({kind}): use a maxabs method")

    # ------------------------------------------------------------------------------ derived
    @property
    def fp8_dtype(self) -> torch.dtype:
        return self.fp8_config.torch_dtype

    @property
    def fp8_max(self) -> float:
        """Largest finite FP8 value: 448 (E4M3), 240 (E4M3 on Gaudi2), 57344 (E5M2)."""
        return numerics.fp8_max(self.fp8_dtype, self.target.value)

    @property
    def kv_fp8_dtype(self) -> torch.dtype:
        """FP8 dtype of the KV cache: ``kv_cache_dtype``, else ``fp8_config``'s."""
        return (self.kv_cache_dtype or self.fp8_config).torch_dtype

    @property
    def kv_fp8_max(self) -> float:
        return self.replace(fp8_config=self.kv_cache_dtype).fp8_max if self.kv_cache_dtype else self.fp8_max

    @property
    def hp_torch_dtype(self) -> torch.dtype | None:
        """The dtype the model's high-precision parameters (and so the non-FP8 ops and the
        outputs) must have; None follows the model."""
        return None if self.hp_dtype is None else self.hp_dtype.torch_dtype

    @property
    def resolved_scale_method(self) -> ScaleMethod:
        """The configured method (a dict's default entry), else the scheme's default (unrounded
        maxabs scales for a scheme without static activations, as the peers compute them),
        else the target's default."""
        sm = self.scale_method
        if isinstance(sm, ScaleMethodOverrides):
            return sm.default.method
        if sm is None and self.scheme is not None and not self.scheme.needs_measurement:
            return SCHEME_SCALE_METHOD
        return DEFAULT_SCALE_METHOD[self.target] if sm is None else sm

    def scheme_for(self, name: str, type_name: str, experts: bool = False) -> LinearScheme:
        """The scheme of one Linear (``experts``: an MoE expert stack). Without a ``scheme`` key it
        follows INC: weight granularity from the node's scale method, activations static, or
        dynamic per token with ``dynamic_quantization``."""
        if self.scheme is not None:
            return self.scheme.for_match(experts)
        method = self.scale_method_for(name, type_name)
        return LinearScheme(WeightGranularity.CHANNEL if method.weight_per_channel else WeightGranularity.TENSOR,
                            ActivationScheme.DYNAMIC_TOKEN if self.dynamic_quantization else ActivationScheme.STATIC)

    @property
    def needs_measurement(self) -> bool:
        """Whether converting needs measurement files (some static activation scale is measured)."""
        if self.scheme is not None and not self.scheme.needs_measurement:
            return False
        if self.dynamic_quantization:
            return False
        sm = self.scale_method
        rules = sm.rules() if isinstance(sm, ScaleMethodOverrides) else [ScaleRule(self.resolved_scale_method)]
        return any(r.method.needs_measurement for r in rules)

    measure_inputs = property(lambda self: self.measure_exclude.measures("INPUT"), doc="Inputs measured?")
    measure_outputs = property(lambda self: self.measure_exclude.measures("OUTPUT"), doc="Outputs measured?")
    measure_params = property(lambda self: self.measure_exclude.measures("PARAMS"), doc="Weights measured?")

    def scale_method_for(self, name: str, type_name: str) -> ScaleMethod:
        """The scale method of the op at module path ``name`` whose type is ``type_name``."""
        if isinstance(self.scale_method, ScaleMethodOverrides):
            return self.scale_method.method_for(name, type_name)
        return self.resolved_scale_method

    @property
    def backoffs(self) -> tuple[float, float]:
        """``(input_backoff, weight_backoff)`` from scale_params, else the target's default."""
        default_in, default_w = DEFAULT_BACKOFFS[self.target]
        if self.scheme is not None and not self.scheme.needs_measurement:
            default_w = SCHEME_WEIGHT_BACKOFF
        return _first(self.input_backoff, default_in), _first(self.weight_backoff, default_w)

    def backoffs_for(self, name: str, type_name: str) -> tuple[float, float]:
        """``(input_backoff, weight_backoff)`` of one op: its dict entry's own, else :attr:`backoffs`."""
        base_in, base_w = self.backoffs
        if isinstance(self.scale_method, ScaleMethodOverrides):
            rule = self.scale_method.rule_for(name, type_name)
            return _first(rule.input_backoff, base_in), _first(rule.weight_backoff, base_w)
        return base_in, base_w

    def filter_reason(self, name: str, type_names: Iterable[str]) -> str | None:
        """INC's allow/block rule, the one implementation of it: None when ``name`` (a qualified
        node name) with ``type_names`` (every spelling of its type) is selected, else why not.
        Blocked when a type is in ``blocklist.types`` or a ``blocklist.names`` regex matches;
        otherwise allowed when the allowlist is empty or names its type or matches its name."""
        type_names = (type_names,) if isinstance(type_names, str) else tuple(type_names)
        spellings = {_short(t) for t in type_names}
        blocked = [t for t in self.blocklist.types if _short(t) in spellings]
        if blocked:
            return f"blocklist types contains {blocked[0]!r}"
        for pattern in self.blocklist._patterns:
            if pattern.search(name):
                return f"blocklist names: {pattern.pattern!r} matches {name!r}"
        if not self.allowlist.is_empty() and not self.allowlist.matches(name, type_names):
            return (f"not in the allowlist (types {list(self.allowlist.types)}, names "
                    f"{list(self.allowlist.names)}): add its type or a name regex to it")
        return None

    def selects(self, name: str, type_names: Iterable[str]) -> bool:
        """Whether INC's allow/block rule selects the node (see :meth:`filter_reason`)."""
        return self.filter_reason(name, type_names) is None

    # -------------------------------------------------------------------------- (de)serialize
    def replace(self, **changes: Any) -> FP8Config:
        """A copy with ``changes`` applied, validated again."""
        _check_keys(changes, [f.name for f in dataclasses.fields(self)], "FP8Config.replace")
        return dataclasses.replace(self, **changes)

    @classmethod
    def valid_keys(cls) -> list[str]:
        """Keys ``from_dict`` accepts, besides legacy and ignored INC keys."""
        keys = [f.name for f in dataclasses.fields(cls) if not f.name.endswith("_backoff")]
        return keys + ["scale_params", "device_for_scales"]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | os.PathLike[str] | None = None) -> FP8Config:
        """Build from an INC QUANT_CONFIG dict; errors name ``source`` (a file) when given."""
        try:
            return cls._from_dict(d)
        except ConfigError as e:
            if source is None:
                raise
            raise ConfigError(f"{os.fspath(source)}: {e}") from None

    @classmethod
    def _from_dict(cls, d: Mapping[str, Any]) -> FP8Config:
        if not isinstance(d, Mapping):
            raise ConfigError(f"an FP8 config must be a JSON object (dict), got {type(d).__name__}")
        d = dict(d)
        for old, new in _RENAMED_KEYS.items():
            if old in d:
                warnings.warn(f"config key {old!r} is deprecated; use {new!r}", FutureWarning, stacklevel=3)
                legacy = d.pop(old)
                if new not in d:
                    d[new] = legacy
                elif isinstance(legacy, Mapping) and isinstance(d[new], Mapping):
                    d[new] = {**legacy, **d[new]}
        for old, why in _LEGACY_KEYS.items():
            if old in d:
                d.pop(old)
                warnings.warn(f"legacy config key {old!r} ({why}) is ignored; remove it",
                              FutureWarning, stacklevel=3)
        ignored = [k for k in _IGNORED_INC_KEYS if k in d]
        if ignored:
            warnings.warn(f"INC config keys {ignored} have no effect in fp8fx and are ignored",
                          UserWarning, stacklevel=3)
        for k in ("input_backoff", "weight_backoff"):
            if k in d:
                raise ConfigError(f"key {k!r} belongs under 'scale_params': "
                                  f"{{\"scale_params\": {{\"{k}\": {d[k]!r}}}}}")
        kwargs = {k: v for k, v in d.items() if k not in (*_IGNORED_INC_KEYS, "scale_params", "device_for_scales")}
        _check_keys(kwargs, cls.valid_keys(), "FP8 config")
        params = d.get("scale_params") or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"invalid value {params!r} for 'scale_params': expected an object "
                              f"{{\"input_backoff\": 0.25, \"weight_backoff\": 0.5}}")
        _check_keys(params, ("input_backoff", "weight_backoff"), "scale_params")
        kwargs.update(params)
        if d.get("device_for_scales") is not None:
            dev = _choice(d["device_for_scales"], "device_for_scales", tuple(_INC_DEVICE.values()))
            target = Target.coerce(dev, "device_for_scales")
            if "target" in d and Target.coerce(d["target"], "target") is not target:
                raise ConfigError(f"'device_for_scales' {dev!r} contradicts 'target' {d['target']!r}: keep one")
            kwargs["target"] = target
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict with INC key names; ``from_dict`` reads it back unchanged."""
        out: dict[str, Any] = {
            "mode": self.mode.value, "fp8_config": self.fp8_config.value,
            "observer": self.observer.value, "allowlist": self.allowlist.to_dict(),
            "blocklist": self.blocklist.to_dict(), "dump_stats_path": self.dump_stats_path}
        if self.observer_params.to_dict():  # defaults are written as no key
            out["observer_params"] = self.observer_params.to_dict()
        if self.hp_dtype is not None:  # None (follow the model) is written as no key
            out["hp_dtype"] = self.hp_dtype.value
        if isinstance(self.scale_method, ScaleMethodOverrides):
            out["scale_method"] = self.scale_method.to_inc()
        elif self.scale_method is not None:  # None (target default) is written as no key
            out["scale_method"] = self.scale_method.value
        params = {k: getattr(self, k) for k in ("input_backoff", "weight_backoff") if getattr(self, k) is not None}
        if params:  # unset backoffs (target defaults) are written as no key
            out["scale_params"] = params
        out.update(measure_exclude=self.measure_exclude.value, scale_format=self.scale_format.value,
                   use_qdq=self.use_qdq, fake_quant=self.fake_quant)
        if self.target in _INC_DEVICE:
            out["device_for_scales"] = _INC_DEVICE[self.target]
        else:
            out["target"] = self.target.value
        for key in ("dynamic_quantization", "ignore_modules_wo_measures", "recalc_scales",
                    "calibration_sample_interval", "seperate_measure_files", "world_size", "local_rank"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.kv_cache_dtype is not None:
            out["kv_cache_dtype"] = self.kv_cache_dtype.value
        if self.calibration_parallel is not CalibrationParallel.AUTO:  # not an INC key: default unwritten
            out["calibration_parallel"] = self.calibration_parallel.value
        if self.scheme is not None:
            out["scheme"] = self.scheme.to_json()
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> FP8Config:
        """Read a QUANT_CONFIG JSON file; every error names the file."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise ConfigError(f"FP8 config file {path!r} does not exist (relative paths start at "
                              f"{os.getcwd()!r}); check the path") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read FP8 config file {path!r}: {e}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"FP8 config file {path!r} is not valid JSON: {e.msg} at line {e.lineno}, "
                              f"column {e.colno}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"FP8 config file {path!r} must hold a JSON object at top level, "
                              f"found {type(d).__name__}")
        return cls.from_dict(d, source=path)

    def to_json_file(self, path: str | os.PathLike[str]) -> None:
        """Write ``to_dict()`` atomically: a temporary file in the same directory, then rename."""
        atomic_write_json(path, self.to_dict(), indent=4)

    @classmethod
    def from_env(cls, var: str = "QUANT_CONFIG") -> FP8Config:
        """Load the JSON file named by the environment variable ``var``."""
        path = os.environ.get(var, "").strip()
        if not path:
            raise ConfigError(f"environment variable {var} is not set: point it at an FP8 config "
                              f"JSON file, e.g. {var}=./quant_config.json")
        try:
            return cls.from_json_file(path)
        except ConfigError as e:
            raise ConfigError(f"{var}: {e}") from None
