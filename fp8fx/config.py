"""FP8Config: every Intel Neural Compressor (INC) FP8 config key, validated up front.

One frozen dataclass holds the whole configuration. The constructor takes plain strings, dicts
and lists (what a QUANT_CONFIG JSON file holds) and coerces them to str-Enums and small frozen
value classes in ``__post_init__``; anything unknown raises :class:`~fp8fx.errors.ConfigError`
naming the key, the bad value, the valid choices and the closest one. Nothing here probes
hardware: ``target`` says which device the scales are for.

Keys (INC names), defaults and accepted values::

    mode                 "AUTO"      AUTO | MEASURE | QUANTIZE | SHAPE | LOAD
    fp8_config           "E4M3"      E4M3 | E5M2
    hp_dtype             "bf16"      bf16 | fp16 | fp32: dtype of non-FP8 ops and of outputs
    observer             "maxabs"    maxabs | maxabs_per_channel | shape | save
    allowlist            {"names": [], "types": []}   empty: every supported op
    blocklist            {"names": [], "types": []}   names: regexes, re.search on module path
    dump_stats_path      "./hqt_output/measure"       directory plus file-name prefix
    scale_method         (target default, DEFAULT_SCALE_METHOD) a method name or a dict
    measure_exclude      "OUTPUT"    NONE | OUTPUT | INPUT | PARAMS | ALL
    scale_format         "scalar"    scalar | const
    use_qdq, fake_quant  false
    scale_params         {"input_backoff": 0.25, "weight_backoff": 0.5}, each in (0, 1]
    device_for_scales    GAUDI2 | GAUDI3: INC's key, sets ``target``
    target               "cpu"       cpu | cuda | gaudi2 | gaudi3 (written for cpu/cuda)
    dynamic_quantization false       activation scales computed at run time (per token)
    ignore_modules_wo_measures false skip modules without measurements instead of failing
    recalc_scales        false       recompute scales even when a cached scale file exists
    calibration_sample_interval 0    dump measurements every N samples (0: at the end only)
    world_size, local_rank null      per-rank file names: {prefix}_hooks_{observer}_{rank}_{world}
    seperate_measure_files true      (INC's spelling) one measurement file per rank

Example QUANT_CONFIG::

    {"mode": "QUANTIZE", "observer": "maxabs", "scale_method": "maxabs_hw",
     "allowlist": {"types": [], "names": []}, "blocklist": {"types": [], "names": ["lm_head"]},
     "dump_stats_path": "./hqt_output/measure", "device_for_scales": "GAUDI3"}

Dict form of ``scale_method`` (INC's schema)::

    {"default": {"weight": {"granularity": "PCS", "scale_value_type": "MAXABS",
                            "rounding_method": "POW2", "backoff": 0.5},
                 "activation": {"rounding_method": "HW_ALIGNED", "backoff": 0.25}},
     "nodes": {"model.layers.0.mlp.down_proj": {...}},   # exact module path
     "layers": {"3": {...}},                             # index found as "layers.3" / "layers/3"
     "layer_types": {"Matmul": {...}}}                   # module type name

Precedence: nodes > layers > layer_types > default. An override's unspecified fields (and
backoffs) come from the default; each weight/activation (granularity, scale_value_type,
rounding_method) pair must name a known method. fp8fx also takes a method name as any entry
(``"default": "maxabs_pow2"``). Deliberate differences from INC: an entry without ``backoff``
uses ``scale_params`` (INC uses 1.0 there and INC 3.x ignores ``scale_params``); INPUT and
PARAMS in ``measure_exclude`` act literally (INC only acts on OUTPUT and ALL).

Legacy HQT keys (``method``, ``quantize_weight``, ``whitelist``, ``blacklist``) load with a
FutureWarning; INC keys without meaning here (``measure_on_hpu``, ``mod_dict``...) with a
UserWarning. HW-aligned methods (``maxabs_hw*``, ``hw_aligned_single_scale``) are allowed on
cpu/cuda targets, where the hardware scale set is plain powers of two.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

import torch

from .errors import ConfigError
from .fileio import atomic_write_json

__all__ = [
    "Mode", "Fp8Format", "HpDtype", "ObserverKind", "Target", "ScaleFormat", "MeasureExclude",
    "ScaleSpec", "ScaleMethod", "ScaleRule", "ScaleMethodOverrides", "OpFilter", "FP8Config",
    "DEFAULT_SCALE_METHOD",
]


def _choices_error(key: str, value: Any, choices: Iterable[str], what: str = "value") -> ConfigError:
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    hint = difflib.get_close_matches(str(value).lower(), lowered, n=1, cutoff=0.5)
    msg = f"invalid {what} {value!r} for {key!r}; valid choices: {', '.join(choices)}"
    return ConfigError(msg + (f". Did you mean {lowered[hint[0]]!r}?" if hint else ""))


def _check_keys(d: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    valid = list(valid)
    for k in d:
        if k not in valid:
            raise _choices_error(where, k, valid, what="key")


class _StrEnum(str, Enum):
    """str-Enum coerced case-insensitively from a member's value or name."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def coerce(cls, value: Any, key: str) -> Any:
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            for m in cls:
                if value.strip().lower() in (m.value.lower(), m.name.lower()):
                    return m
        raise _choices_error(key, value, [m.value for m in cls])


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
        return torch.float8_e4m3fn if self is Fp8Format.E4M3 else torch.float8_e5m2


class HpDtype(_StrEnum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.value]


_DTYPE_ALIASES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                  "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
                  torch.float8_e4m3fn: "E4M3", torch.float8_e5m2: "E5M2"}


class ObserverKind(_StrEnum):
    MAXABS = "maxabs"
    MAXABS_PER_CHANNEL = "maxabs_per_channel"
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


class ScaleSpec(NamedTuple):
    """How one tensor kind gets its scale, in INC's terms.

    granularity: PTS (per tensor) | PCS (per channel; per token for dynamic activations);
    value_type: MAXABS | FIXED_VALUE | OPT (minimum-MSE among candidates);
    rounding: IDENTITY | POW2 | HW_ALIGNED | HW_ALIGNED_FIXED | SCALE_UNIT.
    """

    granularity: str
    value_type: str
    rounding: str


_SPEC_CHOICES = {"granularity": ("PTS", "PCS"),
                 "scale_value_type": ("MAXABS", "FIXED_VALUE", "OPT", "DUMMY_SCALES"),
                 "rounding_method": ("IDENTITY", "POW2", "HW_ALIGNED", "HW_ALIGNED_FIXED", "SCALE_UNIT")}
_SPEC_DEFAULT = ScaleSpec("PTS", "MAXABS", "IDENTITY")  # INC's defaults for omitted fields


class ScaleMethod(_StrEnum):
    """INC's scale methods; the last two need ``dynamic_quantization``."""

    UNIT_SCALE = "unit_scale"
    HW_ALIGNED_SINGLE_SCALE = "hw_aligned_single_scale"
    MAXABS_HW = "maxabs_hw"
    MAXABS_POW2 = "maxabs_pow2"
    MAXABS_ARBITRARY = "maxabs_arbitrary"
    MAXABS_HW_OPT_WEIGHT = "maxabs_hw_opt_weight"
    MAXABS_POW2_OPT_WEIGHT = "maxabs_pow2_opt_weight"
    ACT_MAXABS_HW_WEIGHTS_PCS_MAXABS_POW2 = "act_maxabs_hw_weights_pcs_maxabs_pow2"
    ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2 = "act_maxabs_pow2_weights_pcs_maxabs_pow2"
    ACT_MAXABS_HW_WEIGHTS_PCS_OPT_POW2 = "act_maxabs_hw_weights_pcs_opt_pow2"
    ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2 = "act_maxabs_pow2_weights_pcs_opt_pow2"
    MAXABS_PCS_POW2 = "maxabs_pcs_pow2"
    ACT_MAXABS_PCS_POW2_WEIGHT_MAXABS_PTS_POW2_HW = "act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw"

    @property
    def weight_spec(self) -> ScaleSpec:
        return _METHOD_SPECS[self][0]

    @property
    def activation_spec(self) -> ScaleSpec:
        return _METHOD_SPECS[self][1]

    @property
    def needs_measurement(self) -> bool:
        """False when no calibration run is needed (fixed scales, or dynamic activations)."""
        return not self.dynamic_only and self.activation_spec.value_type != "FIXED_VALUE"

    @property
    def weight_per_channel(self) -> bool:
        return self.weight_spec.granularity == "PCS"

    @property
    def activation_per_channel(self) -> bool:
        return self.activation_spec.granularity == "PCS"

    @property
    def dynamic_only(self) -> bool:
        return self.activation_per_channel

    @property
    def uses_hw_scales(self) -> bool:
        return any(s.rounding.startswith("HW_ALIGNED") for s in _METHOD_SPECS[self])


def _specs(w: str, a: str | None = None) -> tuple[ScaleSpec, ScaleSpec]:
    return ScaleSpec(*w.split()), ScaleSpec(*(a or w).split())


_METHOD_SPECS: dict[ScaleMethod, tuple[ScaleSpec, ScaleSpec]] = {  # (weight, activation)
    ScaleMethod.UNIT_SCALE: _specs("PTS FIXED_VALUE SCALE_UNIT"),
    ScaleMethod.HW_ALIGNED_SINGLE_SCALE: _specs("PTS FIXED_VALUE HW_ALIGNED_FIXED"),
    ScaleMethod.MAXABS_HW: _specs("PTS MAXABS HW_ALIGNED"),
    ScaleMethod.MAXABS_POW2: _specs("PTS MAXABS POW2"),
    ScaleMethod.MAXABS_ARBITRARY: _specs("PTS MAXABS IDENTITY"),
    ScaleMethod.MAXABS_HW_OPT_WEIGHT: _specs("PTS OPT HW_ALIGNED", "PTS MAXABS HW_ALIGNED"),
    ScaleMethod.MAXABS_POW2_OPT_WEIGHT: _specs("PTS OPT POW2", "PTS MAXABS POW2"),
    ScaleMethod.ACT_MAXABS_HW_WEIGHTS_PCS_MAXABS_POW2: _specs("PCS MAXABS POW2", "PTS MAXABS HW_ALIGNED"),
    ScaleMethod.ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2: _specs("PCS MAXABS POW2", "PTS MAXABS POW2"),
    ScaleMethod.ACT_MAXABS_HW_WEIGHTS_PCS_OPT_POW2: _specs("PCS OPT POW2", "PTS MAXABS HW_ALIGNED"),
    ScaleMethod.ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2: _specs("PCS OPT POW2", "PTS MAXABS POW2"),
    ScaleMethod.MAXABS_PCS_POW2: _specs("PCS MAXABS POW2"),
    ScaleMethod.ACT_MAXABS_PCS_POW2_WEIGHT_MAXABS_PTS_POW2_HW: _specs("PTS MAXABS HW_ALIGNED", "PCS MAXABS POW2"),
}
_METHOD_BY_SPECS = {specs: method for method, specs in _METHOD_SPECS.items()}

#: Method used when ``scale_method`` is None. Gaudi follows INC (maxabs_hw); cpu/cuda have no
#: hardware scale set worth snapping to, so they default to unrounded maxabs scales.
DEFAULT_SCALE_METHOD: dict[Target, ScaleMethod] = {
    Target.CPU: ScaleMethod.MAXABS_ARBITRARY,
    Target.CUDA: ScaleMethod.MAXABS_ARBITRARY,
    Target.GAUDI2: ScaleMethod.MAXABS_HW,
    Target.GAUDI3: ScaleMethod.MAXABS_HW,
}


def _backoff(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 < value <= 1.0:
        raise ConfigError(f"invalid value {value!r} for {key!r}: a backoff is a number in (0, 1], "
                          f"the fraction of the FP8 range that a measured max-abs maps to")
    return float(value)


def _opt_backoff(value: Any, key: str) -> float | None:
    return None if value is None else _backoff(value, key)


# ------------------------------------------------------------------------- scale_method dict
@dataclass(frozen=True)
class ScaleRule:
    """One entry of a scale_method dict: a method and, optionally, its own backoffs."""

    method: ScaleMethod
    input_backoff: float | None = None
    weight_backoff: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", ScaleMethod.coerce(self.method, "scale_method"))
        object.__setattr__(self, "input_backoff", _opt_backoff(self.input_backoff, "activation.backoff"))
        object.__setattr__(self, "weight_backoff", _opt_backoff(self.weight_backoff, "weight.backoff"))

    @classmethod
    def parse(cls, value: Any, key: str, base: ScaleRule | None = None) -> ScaleRule:
        """A method name, a ScaleRule, or INC's ``{"weight": {...}, "activation": {...}}``.

        Fields an INC dict leaves out come from ``base`` (the default entry), else INC defaults.
        """
        if isinstance(value, ScaleRule):
            rule = value
        elif not isinstance(value, Mapping):
            rule = cls(ScaleMethod.coerce(value, key))
        else:
            _check_keys(value, ("weight", "activation"), key)
            specs, backoffs = [], []
            for i, part in enumerate(("weight", "activation")):
                sub, where = value.get(part, {}), f"{key}.{part}"
                if not isinstance(sub, Mapping):
                    raise ConfigError(f"{where!r} must be an object with keys {', '.join(_SPEC_CHOICES)}"
                                      f", backoff; got {sub!r}")
                _check_keys(sub, (*_SPEC_CHOICES, "backoff", "params"), where)
                if sub.get("params"):
                    warnings.warn(f"{where}.params is ignored: fp8fx uses each method's standard "
                                  f"candidate scales", UserWarning, stacklevel=2)
                inherit = _METHOD_SPECS[base.method][i] if base else _SPEC_DEFAULT
                specs.append(ScaleSpec(*(
                    _choice(sub[k], f"{where}.{k}", choices) if sub.get(k) is not None else old
                    for (k, choices), old in zip(_SPEC_CHOICES.items(), inherit))))
                backoffs.append(_opt_backoff(sub.get("backoff"), f"{where}.backoff"))
            method = _METHOD_BY_SPECS.get((specs[0], specs[1]))
            if method is None:
                known = "; ".join(f"{m.value}: weight {' '.join(w)}, activation {' '.join(a)}"
                                  for m, (w, a) in _METHOD_SPECS.items())
                raise ConfigError(f"{key!r}: weight {' '.join(specs[0])}, activation "
                                  f"{' '.join(specs[1])} is no known scale method; known: {known}")
            rule = cls(method, input_backoff=backoffs[1], weight_backoff=backoffs[0])
        if base is None:
            return rule
        return cls(rule.method, _first(rule.input_backoff, base.input_backoff),
                   _first(rule.weight_backoff, base.weight_backoff))

    def to_inc(self) -> dict[str, Any]:
        out = {}
        for part, spec, backoff in zip(("weight", "activation"), _METHOD_SPECS[self.method],
                                       (self.weight_backoff, self.input_backoff)):
            out[part] = dict(zip(_SPEC_CHOICES, spec)) | ({} if backoff is None else {"backoff": backoff})
        return out


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value.strip().upper() in choices:
        return value.strip().upper()
    raise _choices_error(key, value, choices)


def _first(a: Any, b: Any) -> Any:
    return b if a is None else a


def _short(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1]


_LAYER_RES = (re.compile(r"layers\.(\d+)"), re.compile(r"layers/(\d+)"))


@dataclass(frozen=True)
class ScaleMethodOverrides:
    """INC's dict form of scale_method: a default plus per-node, -layer and -type overrides.

    Sections are stored as sorted tuples of pairs (hashable); the constructor also takes dicts.
    """

    default: ScaleRule
    nodes: tuple[tuple[str, ScaleRule], ...] = ()
    layers: tuple[tuple[int, ScaleRule], ...] = ()
    layer_types: tuple[tuple[str, ScaleRule], ...] = ()

    def __post_init__(self) -> None:
        default = ScaleRule.parse(self.default, "scale_method.default")
        object.__setattr__(self, "default", default)
        for section in ("nodes", "layers", "layer_types"):
            value, items = getattr(self, section), []
            if isinstance(value, Mapping):
                value = value.items()
            elif value is None or isinstance(value, str):
                value = () if value is None else [value]
            for pair in value:
                if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                    raise ConfigError(f"'scale_method.{section}' must map names to scale methods; "
                                      f"got {getattr(self, section)!r}")
                k, v = pair
                if section == "layers":
                    if isinstance(k, bool) or not (isinstance(k, int) or (isinstance(k, str) and k.isdigit())):
                        raise ConfigError(f"invalid key {k!r} in 'scale_method.layers': use a layer "
                                          f"index such as \"3\" (matches 'layers.3' in module paths)")
                    k = int(k)
                elif not isinstance(k, str):
                    raise ConfigError(f"invalid key {k!r} in 'scale_method.{section}': use a string")
                items.append((k, ScaleRule.parse(v, f"scale_method.{section}.{k}", base=default)))
            object.__setattr__(self, section, tuple(sorted(items, key=lambda kv: kv[0])))

    @classmethod
    def from_inc(cls, d: Mapping[str, Any]) -> ScaleMethodOverrides:
        _check_keys(d, ("default", "nodes", "layers", "layer_types"), "scale_method")
        if "default" not in d:
            raise ConfigError("'scale_method' given as an object needs a 'default' entry, e.g. "
                              "{\"default\": \"maxabs_hw\", \"nodes\": {...}}")
        return cls(d["default"], d.get("nodes"), d.get("layers"), d.get("layer_types"))

    def to_inc(self) -> dict[str, Any]:
        out: dict[str, Any] = {"default": self.default.to_inc()}
        for section in ("nodes", "layers", "layer_types"):
            if getattr(self, section):
                out[section] = {str(k): r.to_inc() for k, r in getattr(self, section)}
        return out

    def rule_for(self, name: str, type_name: str) -> ScaleRule:
        """INC's precedence: exact node name, layer index, layer type (class name), default."""
        for k, rule in self.nodes:
            if k == name:
                return rule
        m = _LAYER_RES[0].search(name) or _LAYER_RES[1].search(name)
        for k, rule in self.layers if m else ():
            if k == int(m.group(1)):
                return rule
        for k, rule in self.layer_types:
            if _short(k) == _short(type_name):
                return rule
        return self.default

    def method_for(self, name: str, type_name: str) -> ScaleMethod:
        return self.rule_for(name, type_name).method

    def rules(self) -> list[ScaleRule]:
        return [self.default, *(r for s in (self.nodes, self.layers, self.layer_types) for _, r in s)]


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
            value = tuple(raw) if isinstance(raw, Iterable) and not isinstance(raw, str) else None
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
                "measure_exclude": MeasureExclude, "scale_format": ScaleFormat, "target": Target}
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
    hp_dtype: HpDtype = HpDtype.BF16
    observer: ObserverKind = ObserverKind.MAXABS
    allowlist: OpFilter = OpFilter()
    blocklist: OpFilter = OpFilter()
    dump_stats_path: str = "./hqt_output/measure"
    scale_method: ScaleMethod | ScaleMethodOverrides | None = None
    measure_exclude: MeasureExclude = MeasureExclude.OUTPUT
    scale_format: ScaleFormat = ScaleFormat.SCALAR
    use_qdq: bool = False
    fake_quant: bool = False
    target: Target = Target.CPU
    input_backoff: float = 0.25
    weight_backoff: float = 0.5
    dynamic_quantization: bool = False
    ignore_modules_wo_measures: bool = False
    recalc_scales: bool = False
    calibration_sample_interval: int = 0
    world_size: int | None = None
    local_rank: int | None = None
    seperate_measure_files: bool = True

    def __post_init__(self) -> None:
        put = object.__setattr__.__get__(self)  # frozen: coerce fields in place
        for key, enum_cls in _ENUM_FIELDS.items():
            value = getattr(self, key)
            if key in ("fp8_config", "hp_dtype") and isinstance(value, (str, torch.dtype)):
                value = _DTYPE_ALIASES.get(value, value)
            put(key, enum_cls.coerce(value, key))
        put("allowlist", OpFilter.coerce(self.allowlist, "allowlist"))
        put("blocklist", OpFilter.coerce(self.blocklist, "blocklist"))
        path = self.dump_stats_path
        path = os.fspath(path) if isinstance(path, os.PathLike) else path
        if not isinstance(path, str) or not path.strip():
            raise ConfigError(f"invalid value {self.dump_stats_path!r} for 'dump_stats_path': give "
                              f"a directory plus file-name prefix, e.g. './hqt_output/measure'")
        put("dump_stats_path", path)
        sm = self.scale_method
        if isinstance(sm, Mapping):
            sm = ScaleMethodOverrides.from_inc(sm)
        elif isinstance(sm, ScaleRule):
            sm = sm.method if sm.input_backoff is None and sm.weight_backoff is None else ScaleMethodOverrides(sm)
        elif sm is not None and not isinstance(sm, ScaleMethodOverrides):
            sm = ScaleMethod.coerce(sm, "scale_method")
        put("scale_method", sm)
        for key in _BOOL_FIELDS:
            put(key, _bool(getattr(self, key), key))
        put("input_backoff", _backoff(self.input_backoff, "input_backoff"))
        put("weight_backoff", _backoff(self.weight_backoff, "weight_backoff"))
        interval = _int(self.calibration_sample_interval, "calibration_sample_interval", 0)
        put("calibration_sample_interval", interval)
        for key, minimum in (("world_size", 1), ("local_rank", 0)):
            if getattr(self, key) is not None:
                put(key, _int(getattr(self, key), key, minimum))
        if self.world_size is not None and self.local_rank is not None and self.local_rank >= self.world_size:
            raise ConfigError(f"local_rank {self.local_rank} must be below world_size {self.world_size}")
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

    # ------------------------------------------------------------------------------ derived
    @property
    def fp8_dtype(self) -> torch.dtype:
        return self.fp8_config.torch_dtype

    @property
    def fp8_max(self) -> float:
        """Largest finite FP8 value: 448 (E4M3), 240 (E4M3 on Gaudi2), 57344 (E5M2)."""
        if self.fp8_config is Fp8Format.E5M2:
            return 57344.0
        return 240.0 if self.target is Target.GAUDI2 else 448.0

    @property
    def hp_torch_dtype(self) -> torch.dtype:
        return self.hp_dtype.torch_dtype

    @property
    def resolved_scale_method(self) -> ScaleMethod:
        """The configured method (a dict's default entry) or the target's default."""
        sm = self.scale_method
        if isinstance(sm, ScaleMethodOverrides):
            return sm.default.method
        return DEFAULT_SCALE_METHOD[self.target] if sm is None else sm

    measure_inputs = property(lambda self: self.measure_exclude.measures("INPUT"), doc="Inputs measured?")
    measure_outputs = property(lambda self: self.measure_exclude.measures("OUTPUT"), doc="Outputs measured?")
    measure_params = property(lambda self: self.measure_exclude.measures("PARAMS"), doc="Weights measured?")

    def scale_method_for(self, name: str, type_name: str) -> ScaleMethod:
        """The scale method of the op at module path ``name`` whose type is ``type_name``."""
        if isinstance(self.scale_method, ScaleMethodOverrides):
            return self.scale_method.method_for(name, type_name)
        return self.resolved_scale_method

    def backoffs_for(self, name: str, type_name: str) -> tuple[float, float]:
        """``(input_backoff, weight_backoff)`` of one op: its dict entry's own, else scale_params."""
        if isinstance(self.scale_method, ScaleMethodOverrides):
            rule = self.scale_method.rule_for(name, type_name)
            return _first(rule.input_backoff, self.input_backoff), _first(rule.weight_backoff, self.weight_backoff)
        return self.input_backoff, self.weight_backoff

    def selects(self, name: str, type_names: Iterable[str]) -> bool:
        """INC's rule: in the allowlist (or the allowlist is empty) and not in the blocklist."""
        type_names = (type_names,) if isinstance(type_names, str) else tuple(type_names)
        allowed = self.allowlist.is_empty() or self.allowlist.matches(name, type_names)
        return allowed and not self.blocklist.matches(name, type_names)

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
            "mode": self.mode.value, "fp8_config": self.fp8_config.value, "hp_dtype": self.hp_dtype.value,
            "observer": self.observer.value, "allowlist": self.allowlist.to_dict(),
            "blocklist": self.blocklist.to_dict(), "dump_stats_path": self.dump_stats_path}
        if isinstance(self.scale_method, ScaleMethodOverrides):
            out["scale_method"] = self.scale_method.to_inc()
        elif self.scale_method is not None:  # None (target default) is written as no key
            out["scale_method"] = self.scale_method.value
        out["scale_params"] = {"input_backoff": self.input_backoff, "weight_backoff": self.weight_backoff}
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
