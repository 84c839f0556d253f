"""Scale methods: how each tensor gets its FP8 scale, and INC's per-op overrides of it.

A scale method names a pair of :class:`ScaleSpec` (weight, activation), each a triple in INC's
terms: granularity (PTS per tensor, PCS per channel), value type (MAXABS, FIXED_VALUE, OPT) and
rounding (IDENTITY, POW2, HW_ALIGNED, HW_ALIGNED_FIXED, SCALE_UNIT). :class:`ScaleMethod` is
INC's table of the thirteen known pairs; its properties (``needs_measurement``,
``dynamic_only``, ``uses_hw_scales``...) are read off the specs, so the table is the single
source of truth and a spec pair maps back to exactly one method.

``scale_method`` in a config is a method name or INC's dict form::

    {"default": {"weight": {"granularity": "PCS", "scale_value_type": "MAXABS",
                            "rounding_method": "POW2", "backoff": 0.5},
                 "activation": {"rounding_method": "HW_ALIGNED", "backoff": 0.25}},
     "nodes": {"model.layers.0.mlp.down_proj": {...}},   # exact module path
     "layers": {"3": {...}},                             # index found as "layers.3" / "layers/3"
     "layer_types": {"Matmul": {...}}}                   # module type name

Each entry parses to a :class:`ScaleRule` (a method plus optional backoffs); the dict as a
whole to a frozen, hashable :class:`ScaleMethodOverrides`. Precedence: nodes > layers >
layer_types > default. An override's unspecified fields (and backoffs) come from the default;
each weight/activation (granularity, scale_value_type, rounding_method) pair must name a known
method. fp8fx also takes a method name as any entry (``"default": "maxabs_pow2"``). An entry
without ``backoff`` leaves it None, and the config fills in ``scale_params`` (INC uses 1.0
there and INC 3.x ignores ``scale_params``).

The small coercion helpers that :mod:`fp8fx.config` shares (case-insensitive str-Enums, choice
errors with a closest-match hint, key checks, backoff checks) live here, so that config imports
this module and never the other way round.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

from .errors import ConfigError

__all__ = ["ScaleSpec", "ScaleMethod", "ScaleRule", "ScaleMethodOverrides", "coerce_scale_method"]


# -------------------------------------------------------------------------- shared coercion
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


def _backoff(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 < value <= 1.0:
        raise ConfigError(f"invalid value {value!r} for {key!r}: a backoff is a number in (0, 1], "
                          f"the fraction of the FP8 range that a measured max-abs maps to")
    return float(value)


def _opt_backoff(value: Any, key: str) -> float | None:
    return None if value is None else _backoff(value, key)


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value.strip().upper() in choices:
        return value.strip().upper()
    raise _choices_error(key, value, choices)


def _first(a: Any, b: Any) -> Any:
    return b if a is None else a


def _short(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1]


# --------------------------------------------------------------------------- method table
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


def coerce_scale_method(value: Any) -> ScaleMethod | ScaleMethodOverrides | None:
    """A config's ``scale_method``: None (the target's default), a method, or overrides.

    Takes a method name, a ScaleMethod, a ScaleRule, ScaleMethodOverrides or INC's dict form;
    a rule without its own backoffs collapses to its plain method.
    """
    if isinstance(value, Mapping):
        return ScaleMethodOverrides.from_inc(value)
    if isinstance(value, ScaleRule):
        no_backoffs = value.input_backoff is None and value.weight_backoff is None
        return value.method if no_backoffs else ScaleMethodOverrides(value)
    if value is None or isinstance(value, ScaleMethodOverrides):
        return value
    return ScaleMethod.coerce(value, "scale_method")
