"""Quantization schemes: how a Linear's weight and activation get their FP8 scales.

A :class:`LinearScheme` is two choices:

``weights``
    ``tensor`` (one scale), ``channel`` (one per output channel, ``[out]``) or ``block``
    (one per ``block = (rows, cols)`` tile of the ``[out, in]`` weight, ``[ceil(out/rows),
    ceil(in/cols)]``; DeepSeek's and compressed-tensors' layout). A tile at the edge of a weight
    whose size the block does not divide covers the rest of the rows/columns: the weight is
    treated as zero-padded to whole tiles, which is what the checkpoints of these formats hold.
``activations``
    ``static`` (one scale per tensor, from calibration), ``dynamic_tensor`` (one scale per call,
    ``amax(|x|) / fp8_max``), ``dynamic_token`` (one per row of ``x``), ``dynamic_group`` (one
    per row and per ``group_size`` columns along K, DeepSeek's 1x128) or ``none`` (weight-only:
    the activation stays in high precision and the weight is dequantized for the GEMM).

:class:`Scheme` holds one LinearScheme for plain Linears (``linear``) and one for MoE expert
stacks (``experts``). Presets use the peers' names and meanings:

================  ===================================  =======================================
preset            weights                              activations
================  ===================================  =======================================
FP8               per tensor                           static per tensor (calibrated)
FP8_DYNAMIC       per output channel                   dynamic per token
FP8_BLOCK         128x128 blocks                       dynamic 1x128 groups along K
FP8_WEIGHT_ONLY   per output channel                   none (high precision)
================  ===================================  =======================================

JSON (the ``scheme`` key of an FP8 config): a preset name, one LinearScheme object for both kinds
(``{"weights": "channel", "activations": "dynamic_token"}``, also ``"block": [128, 128]`` and
``"group_size": 128``), or ``{"linear": ..., "experts": ...}`` whose values are presets or objects
(a missing ``experts`` follows ``linear``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .scale_methods import _check_keys, _choices_error, _StrEnum

__all__ = ["WeightGranularity", "ActivationScheme", "LinearScheme", "Scheme", "PRESETS", "DEFAULT_BLOCK",
           "DEFAULT_GROUP"]

DEFAULT_BLOCK = (128, 128)
DEFAULT_GROUP = 128


class WeightGranularity(_StrEnum):
    TENSOR = "tensor"
    CHANNEL = "channel"
    BLOCK = "block"


class ActivationScheme(_StrEnum):
    STATIC = "static"
    DYNAMIC_TENSOR = "dynamic_tensor"
    DYNAMIC_TOKEN = "dynamic_token"
    DYNAMIC_GROUP = "dynamic_group"
    NONE = "none"

    @property
    def op_name(self) -> str:
        """The ``activations`` argument of ``fp8fx::scaled_linear``."""
        return {"static": "static", "dynamic_tensor": "tensor", "dynamic_token": "token",
                "dynamic_group": "group", "none": "none"}[self.value]


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"invalid value {value!r} for {key!r}: expected a positive integer")
    return value


@dataclass(frozen=True)
class LinearScheme:
    """Weight granularity and activation scheme of one kind of Linear (module docstring)."""

    weights: WeightGranularity = WeightGranularity.TENSOR
    activations: ActivationScheme = ActivationScheme.STATIC
    block: tuple[int, int] = DEFAULT_BLOCK
    group_size: int = DEFAULT_GROUP

    def __post_init__(self) -> None:
        put = object.__setattr__.__get__(self)
        put("weights", WeightGranularity.coerce(self.weights, "weights"))
        put("activations", ActivationScheme.coerce(self.activations, "activations"))
        block = self.block
        if isinstance(block, int) and not isinstance(block, bool):
            block = (block, block)
        if not isinstance(block, (list, tuple)) or len(block) != 2:
            raise ConfigError(f"invalid value {self.block!r} for 'block': give [rows, cols] of a weight "
                              f"tile, e.g. [128, 128]")
        put("block", (_positive_int(block[0], "block"), _positive_int(block[1], "block")))
        put("group_size", _positive_int(self.group_size, "group_size"))

    @property
    def static(self) -> bool:
        """Whether the activation scale comes from calibration."""
        return self.activations is ActivationScheme.STATIC

    @property
    def dynamic(self) -> bool:
        return self.activations not in (ActivationScheme.STATIC, ActivationScheme.NONE)

    @property
    def weight_only(self) -> bool:
        return self.activations is ActivationScheme.NONE

    @property
    def op_block(self) -> tuple[int, int]:
        """``(block_n, block_k)`` as ``fp8fx::scaled_linear`` takes them: 0 unless block weights."""
        return self.block if self.weights is WeightGranularity.BLOCK else (0, 0)

    @property
    def op_group(self) -> int:
        return self.group_size if self.activations is ActivationScheme.DYNAMIC_GROUP else 0

    @property
    def uses_linear_op(self) -> bool:
        """Whether ``fp8fx::linear`` (static activations, per-tensor/per-channel weights) runs it."""
        return self.static and self.weights is not WeightGranularity.BLOCK

    def describe(self) -> str:
        w = f"block {self.block[0]}x{self.block[1]}" if self.weights is WeightGranularity.BLOCK else self.weights.value
        a = {"static": "static", "dynamic_tensor": "dynamic per tensor", "dynamic_token": "dynamic per token",
             "dynamic_group": f"dynamic per 1x{self.group_size} group", "none": "high precision"}[self.activations.value]
        return f"weights {w}, activations {a}"

    @classmethod
    def coerce(cls, value: Any, key: str) -> LinearScheme:
        if isinstance(value, LinearScheme):
            return value
        if isinstance(value, str):
            return Scheme.preset(value, key).linear
        if not isinstance(value, Mapping):
            raise ConfigError(f"invalid value {value!r} for {key!r}: give a preset name "
                              f"({', '.join(PRESETS)}) or an object like {{\"weights\": \"channel\", "
                              f"\"activations\": \"dynamic_token\"}}")
        _check_keys(value, ("weights", "activations", "block", "group_size"), key)
        try:
            return cls(**value)
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weights": self.weights.value, "activations": self.activations.value}
        if self.weights is WeightGranularity.BLOCK:
            out["block"] = list(self.block)
        if self.activations is ActivationScheme.DYNAMIC_GROUP:
            out["group_size"] = self.group_size
        return out


@dataclass(frozen=True)
class Scheme:
    """The schemes of plain Linears and of MoE expert stacks; ``name`` is the preset's or None."""

    linear: LinearScheme = LinearScheme()
    experts: LinearScheme = LinearScheme()
    name: str | None = None

    @classmethod
    def preset(cls, name: str, key: str = "scheme") -> Scheme:
        spec = PRESETS.get(name.upper()) if isinstance(name, str) else None
        if spec is None:
            raise _choices_error(key, name, PRESETS, "preset")
        return cls(spec, spec, name.upper())

    @classmethod
    def coerce(cls, value: Any, key: str = "scheme") -> Scheme | None:
        if value is None or isinstance(value, Scheme):
            return value
        if isinstance(value, str):
            return cls.preset(value, key)
        if isinstance(value, Mapping) and ("linear" in value or "experts" in value):
            _check_keys(value, ("linear", "experts"), key)
            if "linear" not in value:
                raise ConfigError(f"{key!r} names 'experts' but not 'linear': give both, e.g. "
                                  f"{{\"linear\": \"FP8_DYNAMIC\", \"experts\": \"FP8_WEIGHT_ONLY\"}}")
            linear = LinearScheme.coerce(value["linear"], f"{key}.linear")
            experts = LinearScheme.coerce(value.get("experts", linear), f"{key}.experts")
            return cls(linear, experts)
        spec = LinearScheme.coerce(value, key)
        return cls(spec, spec)

    def all(self) -> tuple[LinearScheme, LinearScheme]:
        return (self.linear, self.experts)

    @property
    def needs_measurement(self) -> bool:
        """Whether some Linear needs a calibrated (static) activation scale."""
        return any(s.static for s in self.all())

    def for_match(self, experts: bool) -> LinearScheme:
        return self.experts if experts else self.linear

    def to_json(self) -> Any:
        if self.name is not None:
            return self.name
        if self.linear == self.experts:
            return self.linear.to_dict()
        return {"linear": self.linear.to_dict(), "experts": self.experts.to_dict()}


PRESETS: dict[str, LinearScheme] = {
    "FP8": LinearScheme(WeightGranularity.TENSOR, ActivationScheme.STATIC),
    "FP8_DYNAMIC": LinearScheme(WeightGranularity.CHANNEL, ActivationScheme.DYNAMIC_TOKEN),
    "FP8_BLOCK": LinearScheme(WeightGranularity.BLOCK, ActivationScheme.DYNAMIC_GROUP, DEFAULT_BLOCK, DEFAULT_GROUP),
    "FP8_WEIGHT_ONLY": LinearScheme(WeightGranularity.CHANNEL, ActivationScheme.NONE),
}
