"""FP8 numerics: casts, scale methods and hardware scale sets, as pure tensor functions.

Everything here is a free function of tensors and plain arguments (no module state, no config
objects), so the passes, the observers, the file formats and the tests share one implementation.

One scale convention, everywhere
--------------------------------
A scale ``s`` is a *dequantization multiplier*::

    q = saturate_cast(x / s)        # quantize
    x ~= q.to(hp) * s               # dequantize

This is the convention of every file format fp8fx reads and writes (INC scale files, vLLM and
compressed-tensors checkpoints). ``saturate_cast``, ``quantize`` (``quantize_fp32``: the ops'
float32 form) and ``dequantize`` are the one implementation of it; the fast kernels
(:mod:`fp8fx.kernels`) specialize it and are tested bit for bit against it. Format facts
(max, bias, mantissa bits, NaN codes, Gaudi2's E4M3 range) come from :mod:`fp8fx.fp8`.

Scales are float32 tensors: 0-d for a per-tensor scale, ``[C]`` for a per-output-channel weight
scale (``quantize_weight`` reshapes it to ``[C, 1, ...]``).

Scale methods (the INC names)
-----------------------------
The list of methods and each one's (granularity, value type, rounding) for weights and
activations is :class:`fp8fx.scale_methods.ScaleMethod`; here each static one gets its
computation, ``s = maxabs / (fp8_max * backoff)`` then a rounding step:

* ``maxabs_arbitrary``  no rounding;
* ``maxabs_pow2``       ``2 ** ceil(log2 s)`` (rounded *up*, so the measured range still fits);
* ``maxabs_hw``         pow2, then up to the next scale of the target's HW set, clamped to the
                        set (Gaudi2 E4M3 {1/256, 1/16, 1, 16}; Gaudi3 every 2^-55..2^7);
* ``unit_scale``        1; ``hw_aligned_single_scale``: the first (largest) HW scale;
* ``*_opt_weight``      weights only: the candidate scale with the least quantization error;
* ``*_weights_pcs_*``   weights get one scale per output channel.

The backoff (weights 0.5, activations 0.25 by default) applies to every maxabs method, including
``maxabs_arbitrary``, and to the reference scale of the per-channel opt search; the per-tensor opt
search picks among absolute candidates and ignores it (as INC does). On targets without a HW
scale set (``"cpu"``, ``"cuda"``) "hw" rounding is pow2 rounding.

Decisions where INC is silent or inconsistent (documented so callers can rely on them):

* Zero maxabs: every scale is floored at ``SCALE_FLOOR = 2**-126`` (the smallest normal float32,
  INC's floor for per-channel scales) before rounding, so an all-zero tensor gets a finite,
  invertible scale (pow2: 2^-126; Gaudi2: 1/256; Gaudi3: 2^-55). INC's per-tensor path returns 0.
* Non-finite or negative maxabs raises ``MeasurementError`` naming the node (``where``).
* Scales are computed in float32 (INC computes them in ``hp_dtype``, by default bfloat16).
* NaN inputs stay NaN through ``saturate_cast``; ±inf saturate to ±max like any large value.
* E5M2 HW sets follow INC's exponent-bias tables per dtype (Gaudi2 {1}, Gaudi3 2^-47..2^15);
  INC's own rounding code applies the E4M3 set to both dtypes (so its single scale is 16 / 128).
* Without a HW set, ``hw_aligned_single_scale`` raises ``ConfigError`` and
  ``maxabs_hw_opt_weight`` searches like ``maxabs_pow2_opt_weight``.
* Opt searches compare errors in float32 as INC does; candidates equal to float32 precision tie,
  and ties are broken as INC breaks them (``_opt_candidates``, ``_opt_per_channel``).
* ``maxabs_pow2_opt_weight`` searches 2^-10..2^9 (INC's range) plus the plain maxabs-pow2 scale,
  so it is never worse than ``maxabs_pow2``; INC's fixed range alone loses on tiny weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fp8fx.errors import ConfigError, Fp8fxError, MeasurementError, QuantizationError
from fp8fx.fp8 import E4M3, E5M2, FORMATS, FP8_DTYPES
from fp8fx.scale_methods import ScaleMethod, ScaleSpec

# --------------------------------------------------------------------------------------------
# Formats and targets (the format facts themselves: fp8fx.fp8)
# --------------------------------------------------------------------------------------------

E4M3_MAX = E4M3.max
E4M3_GAUDI2_MAX = E4M3.gaudi2_max
E5M2_MAX = E5M2.max
SCALE_FLOOR = 2.0**-126  # smallest normal float32 (== bfloat16 tiny)

TARGETS = frozenset({"cpu", "cuda", "gaudi2", "gaudi3"})

# Exponent biases each Gaudi supports per FP8 dtype; a bias b gives the scale 2**(default - b),
# the default being the format's own bias (fp8fx.fp8).
_GAUDI_EXP_BIASES: dict[tuple[str, torch.dtype], tuple[int, ...]] = {
    ("gaudi2", torch.float8_e4m3fn): (3, 7, 11, 15),
    ("gaudi2", torch.float8_e5m2): (15,),
    ("gaudi3", torch.float8_e4m3fn): tuple(range(63)),
    ("gaudi3", torch.float8_e5m2): tuple(range(63)),
}


def _check_target(target: str) -> str:
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}: use one of {sorted(TARGETS)}")
    return target


def _check_fp8_dtype(fp8_dtype: torch.dtype) -> torch.dtype:
    if fp8_dtype not in FORMATS:
        raise ConfigError(
            f"unsupported FP8 dtype {fp8_dtype}: use torch.float8_e4m3fn (E4M3) or "
            "torch.float8_e5m2 (E5M2)"
        )
    return fp8_dtype


def fp8_max(fp8_dtype: torch.dtype, target: str = "cpu") -> float:
    """Largest finite value of ``fp8_dtype`` on ``target`` (E4M3 on Gaudi2 is clamped to 240)."""
    fmt = FORMATS[_check_fp8_dtype(fp8_dtype)]
    return fmt.gaudi2_max if _check_target(target) == "gaudi2" else fmt.max


# --------------------------------------------------------------------------------------------
# Casts: the one saturate/quantize family (kernels that specialize it are tested bit-exact)
# --------------------------------------------------------------------------------------------


def _as_fp32(x: Tensor | float) -> Tensor | float:
    """Upcast to at least float32 (a 0-d fp32 scale would not promote a bf16 tensor); a Python
    float (a scale that is a graph constant) is used as it is."""
    if not isinstance(x, Tensor):
        return x
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


def saturate_cast(x: Tensor, fp8_dtype: torch.dtype, max_value: float | None = None) -> Tensor:
    """Clamp ``x`` to ``±max_value`` (default: the dtype's max), then round-to-nearest-even cast.

    ±inf saturate to ±max; NaN stays NaN (E4M3fn's NaN pattern, E5M2's NaN) so that a broken
    input stays visible instead of silently becoming a finite number.
    """
    _check_fp8_dtype(fp8_dtype)
    limit = FORMATS[fp8_dtype].max if max_value is None else float(max_value)
    return _as_fp32(x).clamp(-limit, limit).to(fp8_dtype)


def quantize(
    x: Tensor, scale: Tensor | float, fp8_dtype: torch.dtype, max_value: float | None = None
) -> Tensor:
    """``saturate_cast(x / scale)``; ``scale`` broadcasts (0-d per tensor, ``[C, 1]`` per row)
    or is a Python float. Computed in float32, or float64 for a float64 ``x``."""
    return saturate_cast(_as_fp32(x) / _as_fp32(scale), fp8_dtype, max_value)


def quantize_fp32(
    x: Tensor, scale: Tensor | float, fp8_dtype: torch.dtype, max_value: float | None = None
) -> Tensor:
    """``quantize`` with the division in float32 whatever ``x``'s dtype: the fp8fx ops' form."""
    return quantize(x.to(torch.float32), scale, fp8_dtype, max_value)


def dequantize(q: Tensor, scale: Tensor | float, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q * scale`` computed in float32, returned as ``dtype``."""
    return (q.to(torch.float32) * _as_fp32(scale)).to(dtype)


def _weight_scale_view(weight: Tensor, scale: Tensor) -> Tensor:
    """Shape a 0-d, [1], [out] or [out, 1] weight scale to broadcast over ``weight``."""
    if scale.numel() == 1:
        return scale.reshape(())
    out = weight.shape[0] if weight.dim() > 0 else 0
    if scale.numel() != out or scale.dim() > 2 or (scale.dim() == 2 and scale.shape[1] != 1):
        raise QuantizationError(
            f"weight scale of shape {tuple(scale.shape)} does not fit a weight of shape "
            f"{tuple(weight.shape)}: use a per-tensor scale (0-d) or one scale per output "
            f"channel (shape [{out}])"
        )
    return scale.reshape([out] + [1] * (weight.dim() - 1))


def quantize_weight(
    weight: Tensor, scale: Tensor, fp8_dtype: torch.dtype, max_value: float | None = None
) -> Tensor:
    """Quantize a weight ``[out, ...]`` with a per-tensor (0-d) or per-channel (``[out]``) scale."""
    return quantize(weight, _weight_scale_view(weight, scale), fp8_dtype, max_value)


def dequantize_weight(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of ``quantize_weight``: accepts the same 0-d or ``[out]`` scale."""
    return dequantize(q, _weight_scale_view(q, scale), dtype)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def maxabs(x: Tensor, dim: int | None = None) -> Tensor:
    """Max |x| in float32: 0-d, or shape ``[x.shape[dim]]`` reducing every other dimension.

    NaN propagates (callers reject it); an empty tensor has maxabs 0.
    """
    x = x.detach()
    if dim is None:
        if x.numel() == 0:
            return torch.zeros((), dtype=torch.float32, device=x.device)
        return x.abs().amax().to(torch.float32)
    if x.dim() == 0:
        raise Fp8fxError(
            f"maxabs per channel needs a tensor with dimension {dim}, got a 0-d tensor"
        )
    rows = x.movedim(dim, 0)
    channels = rows.shape[0]
    if rows.numel() == 0:
        return torch.zeros(channels, dtype=torch.float32, device=x.device)
    return rows.reshape(channels, -1).abs().amax(dim=1).to(torch.float32)


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - approx)^2)`` in dB.

    ``inf`` when ``approx`` equals ``reference`` exactly; computed in float64.
    """
    if reference.shape != approx.shape:
        raise Fp8fxError(
            f"sqnr_db needs tensors of equal shape, got {tuple(reference.shape)} and "
            f"{tuple(approx.shape)}"
        )
    ref = reference.detach().to(torch.float64)
    noise = float((ref - approx.detach().to(torch.float64)).square().sum())
    signal = float(ref.square().sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# --------------------------------------------------------------------------------------------
# Scale rounding and HW scale sets
# --------------------------------------------------------------------------------------------


def pow2_ceil(scale: Tensor) -> Tensor:
    """Elementwise ``2 ** ceil(log2 s)`` for positive finite ``s`` (exact, via frexp).

    Zero, negative and non-finite entries are returned unchanged.
    """
    s = _as_fp32(scale)
    mantissa, exponent = torch.frexp(s)  # s = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    rounded = torch.exp2(exponent.to(s.dtype))
    return torch.where((s > 0) & torch.isfinite(s), rounded, s)


def hw_scales(target: str, fp8_dtype: torch.dtype) -> Tensor | None:
    """The scales ``target`` supports natively for ``fp8_dtype``, ascending float32.

    ``None`` where the hardware takes any scale (``"cpu"``, ``"cuda"``): there "hw" rounding is
    pow2 rounding.
    """
    _check_fp8_dtype(fp8_dtype)
    biases = _GAUDI_EXP_BIASES.get((_check_target(target), fp8_dtype))
    if biases is None:
        return None
    default = FORMATS[fp8_dtype].bias
    return torch.tensor(sorted(2.0 ** (default - b) for b in biases), dtype=torch.float32)


def snap_to_hw(scale: Tensor, target: str, fp8_dtype: torch.dtype) -> Tensor:
    """Round each scale up to the next HW scale of ``target``, clamped to the HW set.

    Gaudi2 E4M3: ``16 ** ceil(log16 s)`` clamped to [1/256, 16]; Gaudi3: ``2 ** ceil(log2 s)``
    clamped to [2^-55, 2^7]; Gaudi2 E5M2: 1. Without a HW set: ``pow2_ceil``.
    """
    allowed = hw_scales(target, fp8_dtype)
    s = pow2_ceil(scale)
    if allowed is None:
        return s
    exps = [round(math.log2(v)) for v in allowed.tolist()]
    lo, hi = exps[0], exps[-1]
    if len(exps) == 1:
        return torch.full_like(s, 2.0**lo)
    step = exps[1] - exps[0]
    e = torch.round(torch.log2(s))  # s is a power of two; round() absorbs any libm ulp
    e = torch.ceil((e - lo) / step) * step + lo
    return torch.exp2(e.clamp(lo, hi))


def _check_backoff(backoff: float) -> None:
    if not (math.isfinite(backoff) and backoff > 0):
        raise ConfigError(f"backoff must be a positive finite number, got {backoff!r}")


def _check_maxabs(amax: Tensor, where: str, what: str) -> None:
    at = f" at {where}" if where else ""
    if not bool(torch.isfinite(amax).all()):
        raise MeasurementError(
            f"non-finite maxabs ({amax.flatten()[~torch.isfinite(amax.flatten())][0].item()}) "
            f"observed{at} in the {what}: the data produced inf/NaN values. Check the model in "
            "high precision on these inputs, drop the offending calibration samples and "
            "measure again, or exclude this node from quantization (blocklist)."
        )
    if bool((amax < 0).any()):
        raise MeasurementError(
            f"negative maxabs observed{at} in the {what}: the measurement is corrupt; measure again"
        )


def scale_from_maxabs(
    amax: Tensor, fp8_max: float, backoff: float, *, where: str = "", what: str = "activation"
) -> Tensor:
    """``amax / (fp8_max * backoff)`` elementwise in float32, floored at ``SCALE_FLOOR``.

    Raises ``MeasurementError`` (naming ``where``) for inf/NaN or negative ``amax``.
    """
    _check_backoff(backoff)
    if not (math.isfinite(fp8_max) and fp8_max > 0):
        raise ConfigError(f"fp8_max must be a positive finite number, got {fp8_max!r}")
    amax = torch.as_tensor(amax).to(torch.float32)
    _check_maxabs(amax, where, what)
    scale = (amax / (fp8_max * backoff)).clamp_min(SCALE_FLOOR)
    if not bool(torch.isfinite(scale).all()):
        raise ConfigError(
            f"scale overflows float32{' at ' + where if where else ''}: maxabs "
            f"{float(amax.max())} / (fp8_max {fp8_max} * backoff {backoff}); use a larger backoff"
        )
    return scale


# --------------------------------------------------------------------------------------------
# Scale methods
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """How one tensor kind (weight or activation) gets its scale under a method."""

    value: str  # "unit" | "single" | "maxabs" | "opt"
    rounding: str = "identity"  # "identity" | "pow2" | "hw"
    per_channel: bool = False
    candidates: tuple[float, ...] | None = None  # opt: absolute scales (per tensor) or multipliers


# INC's candidates for the least-error (opt) weight scales: absolute per-tensor scales, and
# multipliers of the per-channel maxabs-pow2 scale
_OPT_POW2_CANDIDATES = tuple(2.0**e for e in range(-10, 10))
_PCS_OPT_POW2_MULTIPLIERS = tuple(2.0**e for e in range(-3, 5))
_ROUNDING = {"IDENTITY": "identity", "POW2": "pow2", "HW_ALIGNED": "hw"}


def _rule(spec: ScaleSpec) -> _Rule:
    """The computation behind one of INC's (granularity, value type, rounding) triples."""
    if spec.value_type == "FIXED_VALUE":
        return _Rule("unit" if spec.rounding == "SCALE_UNIT" else "single")
    per_channel = spec.granularity == "PCS"
    candidates = None  # opt with HW rounding: the target's HW set
    if spec.value_type == "OPT" and spec.rounding == "POW2":
        candidates = _PCS_OPT_POW2_MULTIPLIERS if per_channel else _OPT_POW2_CANDIDATES
    return _Rule(spec.value_type.lower(), _ROUNDING[spec.rounding], per_channel, candidates)


# method -> (weight rule, activation rule), read off the one method table (fp8fx.scale_methods).
# Methods with per-channel activation scales compute those at run time (dynamic quantization),
# so they have no static activation scale here.
_METHODS: dict[str, tuple[_Rule, _Rule]] = {
    m.value: (_rule(m.weight_spec), _rule(m.activation_spec))
    for m in ScaleMethod
    if not m.dynamic_only
}

SCALE_METHODS: frozenset[str] = frozenset(_METHODS)

# their weight scales are static all the same: dynamic quantization casts weights once, too
_WEIGHT_RULES_OF_DYNAMIC: dict[str, _Rule] = {m.value: _rule(m.weight_spec) for m in ScaleMethod if m.dynamic_only}


def _rules(method: str) -> tuple[_Rule, _Rule]:
    rules = _METHODS.get(method.lower()) if isinstance(method, str) else None
    if rules is None:
        dynamic = isinstance(method, str) and method.lower() in {m.value for m in ScaleMethod}
        what = "computes activation scales at run time, so it has no static scale" if dynamic \
            else "is unknown"
        raise ConfigError(f"scale_method {method!r} {what}: use one of {sorted(SCALE_METHODS)}")
    return rules


def _checked_rule(method: str, kind: int, target: str, fp8_dtype: torch.dtype) -> _Rule:
    """``method``'s rule for weights (``kind`` 0) or activations (1), target and dtype checked."""
    weight_rule = _WEIGHT_RULES_OF_DYNAMIC.get(method.lower()) if kind == 0 and isinstance(method, str) else None
    rule = weight_rule if weight_rule is not None else _rules(method)[kind]
    _check_target(target)
    _check_fp8_dtype(fp8_dtype)
    return rule


def weight_is_per_channel(method: str) -> bool:
    """True when ``method`` gives weights one scale per output channel."""
    return _rules(method)[0].per_channel


def needs_measurement(method: str) -> bool:
    """False for methods whose activation scale is fixed (``unit_scale``, single HW scale)."""
    return _rules(method)[1].value == "maxabs"


def _round(scale: Tensor, rounding: str, target: str, fp8_dtype: torch.dtype) -> Tensor:
    if rounding == "pow2":
        return pow2_ceil(scale)
    if rounding == "hw":
        return snap_to_hw(scale, target, fp8_dtype)
    return scale


def _fixed_scale(rule: _Rule, method: str, target: str, fp8_dtype: torch.dtype) -> Tensor:
    if rule.value == "unit":
        return torch.tensor(1.0, dtype=torch.float32)
    allowed = hw_scales(target, fp8_dtype)
    if allowed is None:
        raise ConfigError(
            f"scale_method {method!r} uses the first hardware-aligned scale, which target "
            f"{target!r} does not have: use a Gaudi target ('gaudi2', 'gaudi3') or another "
            "scale_method (e.g. 'unit_scale' or 'maxabs_pow2')"
        )
    return allowed[-1].clone()  # the largest: exponent bias lowest, INC's first entry


def activation_scale(
    amax: Tensor | None,
    method: str,
    *,
    fp8_dtype: torch.dtype,
    target: str,
    backoff: float = 0.25,
    where: str = "",
) -> Tensor:
    """The 0-d float32 scale of an activation whose measured maxabs is ``amax``.

    ``amax`` may hold several measurements (reduced by max) and may be ``None`` for methods that
    need no measurement (``unit_scale``, ``hw_aligned_single_scale``).
    """
    rule = _checked_rule(method, 1, target, fp8_dtype)
    if rule.value != "maxabs":
        return _fixed_scale(rule, method, target, fp8_dtype)
    at = f" at {where}" if where else ""
    if amax is None or torch.as_tensor(amax).numel() == 0:
        raise MeasurementError(
            f"scale_method {method!r} needs a measured activation maxabs{at}, but none was "
            "given: run calibration (MEASURE) first, or use 'unit_scale'"
        )
    amax = torch.as_tensor(amax, dtype=torch.float32)
    _check_maxabs(amax, where, "activation")  # every entry, before the max hides any
    scale = scale_from_maxabs(amax.amax(), fp8_max(fp8_dtype, target), backoff, where=where)
    return _round(scale, rule.rounding, target, fp8_dtype)


def weight_scale_from_maxabs(
    amax: Tensor,
    method: str,
    *,
    fp8_dtype: torch.dtype,
    target: str,
    backoff: float = 0.5,
    where: str = "",
) -> Tensor:
    """Weight scale from its maxabs alone: 0-d, or ``[C]`` for per-channel methods.

    ``amax`` is 0-d (per tensor) or ``[C]`` (per output channel; reduced by max for per-tensor
    methods). The ``*_opt_*`` methods need the weight itself: use ``weight_scale``.
    """
    rule = _checked_rule(method, 0, target, fp8_dtype)
    if rule.value in ("unit", "single"):
        return _fixed_scale(rule, method, target, fp8_dtype)
    at = f" for {where}" if where else ""
    if rule.value == "opt":
        raise Fp8fxError(
            f"scale_method {method!r} searches the weight itself for the least-error scale, so "
            f"a weight maxabs alone cannot give its scale{at}: pass the weight to weight_scale, "
            "or use the matching maxabs method"
        )
    amax = torch.as_tensor(amax, dtype=torch.float32)
    if rule.per_channel and amax.dim() != 1:
        raise MeasurementError(
            f"scale_method {method!r} needs one weight maxabs per output channel{at}, got shape "
            f"{tuple(amax.shape)}: measure with the per-channel observer or pass the weight to "
            "weight_scale"
        )
    if not rule.per_channel:
        _check_maxabs(amax, where, "weight")
        amax = amax.amax() if amax.numel() else torch.zeros(())
    scale = scale_from_maxabs(amax, fp8_max(fp8_dtype, target), backoff, where=where, what="weight")
    return _round(scale, rule.rounding, target, fp8_dtype)


def weight_scale(
    weight: Tensor,
    method: str,
    *,
    fp8_dtype: torch.dtype,
    target: str,
    backoff: float = 0.5,
    where: str = "",
) -> Tensor:
    """The float32 scale of ``weight`` (``[out, ...]``): 0-d, or ``[out]`` per channel."""
    rule = _checked_rule(method, 0, target, fp8_dtype)
    _check_backoff(backoff)
    if rule.value in ("unit", "single"):
        return _fixed_scale(rule, method, target, fp8_dtype)
    if rule.per_channel and weight.dim() == 0:
        raise QuantizationError(
            f"scale_method {method!r} needs a weight with an output-channel dimension"
            f"{' for ' + where if where else ''}, got a 0-d tensor: use a per-tensor method"
        )
    amax = maxabs(weight, dim=0 if rule.per_channel else None)
    if rule.value == "maxabs":
        return weight_scale_from_maxabs(
            amax, method, fp8_dtype=fp8_dtype, target=target, backoff=backoff, where=where
        )
    _check_maxabs(amax, where, "weight")
    qmax = fp8_max(fp8_dtype, target)
    if rule.per_channel:
        reference = pow2_ceil(scale_from_maxabs(amax, qmax, backoff, where=where, what="weight"))
        return _opt_per_channel(weight, reference, rule.candidates or (), fp8_dtype, qmax)
    candidates = _opt_candidates(rule, amax, target, fp8_dtype, backoff)
    scale = _opt_per_tensor(weight, candidates, fp8_dtype, qmax)
    return _round(scale, rule.rounding, target, fp8_dtype)


# --------------------------------------------------------------------------------------------
# Least-error (opt) weight scales
# --------------------------------------------------------------------------------------------


def _opt_candidates(
    rule: _Rule, amax: Tensor, target: str, fp8_dtype: torch.dtype, backoff: float
) -> list[float]:
    """Per-tensor candidates in search order (on equal error the later one wins).

    HW: the target's HW set, largest first (INC's order, so ties go to the smaller scale).
    pow2: 2^-10..2^9 ascending plus the plain maxabs-pow2 scale (ties go to the larger scale).
    """
    allowed = hw_scales(target, fp8_dtype) if rule.rounding == "hw" else None
    if allowed is not None:
        return sorted(allowed.tolist(), reverse=True)
    plain = pow2_ceil(scale_from_maxabs(amax, fp8_max(fp8_dtype, target), backoff, what="weight"))
    pool = set(rule.candidates or ()) | {float(plain)}
    return sorted(pool)


def _qdq_error(
    x: Tensor, scale: Tensor, fp8_dtype: torch.dtype, qmax: float, dim: int | None
) -> Tensor:
    """Quantize-dequantize error of ``x`` in float32: the L2 norm of all of it (per tensor), or
    the sum of squares along ``dim`` (per channel).

    Accumulating in float32 like INC makes candidates whose errors agree to float32 precision
    tie (scaling by a power of two changes the error only through subnormals), so the tie rule
    of the caller, not rounding noise in a float64 sum, decides between them, as in INC.
    """
    diff = x - dequantize(quantize(x, scale, fp8_dtype, qmax), scale)
    return torch.linalg.vector_norm(diff) if dim is None else diff.square().sum(dim=dim)


def _opt_per_tensor(
    weight: Tensor, candidates: list[float], fp8_dtype: torch.dtype, qmax: float
) -> Tensor:
    x = _as_fp32(weight.detach())
    best, best_err = candidates[0], math.inf
    for c in candidates:
        scale = torch.tensor(c, dtype=torch.float32, device=x.device)
        err = float(_qdq_error(x, scale, fp8_dtype, qmax, None))
        if err <= best_err:
            best, best_err = c, err
    return torch.tensor(best, dtype=torch.float32, device=x.device)


def _opt_per_channel(
    weight: Tensor,
    reference: Tensor,
    multipliers: tuple[float, ...],
    fp8_dtype: torch.dtype,
    qmax: float,
) -> Tensor:
    """Per output channel: ``reference * m`` for the multiplier ``m`` with the least error.

    ``reference`` is the per-channel maxabs-pow2 scale ``[C]``; on equal error the smaller
    multiplier wins. The result stays a power of two.
    """
    x = _as_fp32(weight.detach()).reshape(weight.shape[0], -1)
    ref = reference.reshape(-1, 1)
    best = torch.ones_like(reference)
    best_err = torch.full(reference.shape, math.inf, dtype=torch.float32, device=x.device)
    for m in multipliers:
        err = _qdq_error(x, ref * m, fp8_dtype, qmax, dim=1)
        better = err < best_err
        best = torch.where(better, torch.full_like(best, m), best)
        best_err = torch.where(better, err, best_err)
    return pow2_ceil(best * reference)


__all__ = [
    "E4M3_MAX",
    "E4M3_GAUDI2_MAX",
    "E5M2_MAX",
    "FP8_DTYPES",
    "SCALE_FLOOR",
    "SCALE_METHODS",
    "TARGETS",
    "activation_scale",
    "dequantize",
    "dequantize_weight",
    "fp8_max",
    "hw_scales",
    "maxabs",
    "needs_measurement",
    "pow2_ceil",
    "quantize",
    "quantize_fp32",
    "quantize_weight",
    "saturate_cast",
    "scale_from_maxabs",
    "snap_to_hw",
    "sqnr_db",
    "weight_is_per_channel",
    "weight_scale",
    "weight_scale_from_maxabs",
]


# --------------------------------------------------------------------------------------------
# Weight scales per scheme granularity (per tensor, per channel, per block)
# --------------------------------------------------------------------------------------------


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ConfigError(f"a weight block is two positive integers (rows, cols), got {block!r}")
    return int(block[0]), int(block[1])


def block_maxabs(weight: Tensor, block: tuple[int, int]) -> Tensor:
    """Max |w| of every ``block`` tile of a 2-D ``weight``: ``[ceil(out/rows), ceil(in/cols)]``.

    An edge tile covers what is left of the rows/columns (the weight as if zero-padded)."""
    bn, bk = _check_block(block)
    if weight.dim() != 2:
        raise QuantizationError(f"block scales need a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    nb, kb = -(-n // bn), -(-k // bk)
    a = weight.detach().abs().to(torch.float32)
    if n % bn or k % bk:
        a = torch.nn.functional.pad(a, (0, kb * bk - k, 0, nb * bn - n))
    return a.reshape(nb, bn, kb, bk).amax(dim=(1, 3))


def expand_block_scale(scale: Tensor, shape: tuple[int, int], block: tuple[int, int]) -> Tensor:
    """A ``[ceil(out/rows), ceil(in/cols)]`` block scale as one value per weight element."""
    bn, bk = _check_block(block)
    n, k = shape
    nb, kb = -(-n // bn), -(-k // bk)
    if tuple(scale.shape) != (nb, kb):
        raise QuantizationError(f"block weight scale has shape {tuple(scale.shape)}; a [{n}, {k}] weight in "
                                f"{bn}x{bk} blocks needs [{nb}, {kb}]")
    # reshape/narrow rather than indexing: traceable by Inductor and by fake tensors of any device
    tiles = scale.reshape(nb, 1, kb, 1).expand(nb, bn, kb, bk).reshape(nb * bn, kb * bk)
    return tiles.narrow(0, 0, n).narrow(1, 0, k)


def weight_scale_for(weight: Tensor, method: str, granularity: str, block: tuple[int, int] = (128, 128), *,
                     fp8_dtype: torch.dtype, target: str, backoff: float = 0.5, where: str = "") -> Tensor:
    """The scale of a ``[out, in]`` weight at ``granularity``: ``"tensor"`` (0-d), ``"channel"``
    (``[out]``) or ``"block"`` (``[ceil(out/rows), ceil(in/cols)]``).

    ``method`` gives the value and rounding rule (maxabs, pow2, hw...). A per-channel method
    with ``"channel"`` is :func:`weight_scale` itself; a per-tensor maxabs method applies its
    rule to each channel or tile. The least-error (``*_opt_*``) searches exist per tensor and
    per channel only, and a per-channel method cannot give one scale per tensor."""
    rule = _checked_rule(method, 0, target, fp8_dtype)
    at = f" for {where}" if where else ""
    if granularity == "tensor" and rule.per_channel:
        raise ConfigError(f"scale_method {method!r} gives one weight scale per output channel, but the scheme "
                          f"asks for one per tensor{at}: pick a per-tensor method or 'weights': 'channel'")
    if granularity == "tensor" or (granularity == "channel" and rule.per_channel):
        return weight_scale(weight, method, fp8_dtype=fp8_dtype, target=target, backoff=backoff, where=where)
    if granularity not in ("channel", "block"):
        raise ConfigError(f"unknown weight granularity {granularity!r}{at}: use tensor, channel or block")
    if rule.value == "opt":
        raise ConfigError(f"scale_method {method!r} searches per-tensor scales; it has no {granularity} form{at}: "
                          "use a maxabs method (e.g. 'maxabs_arbitrary' or 'maxabs_pow2') with this scheme")
    _check_backoff(backoff)
    shape = (weight.shape[0],) if granularity == "channel" else \
        tuple(-(-s // b) for s, b in zip(weight.shape, _check_block(block)))
    if rule.value in ("unit", "single"):
        return _fixed_scale(rule, method, target, fp8_dtype).expand(shape).clone()
    amax = maxabs(weight, dim=0) if granularity == "channel" else block_maxabs(weight, block)
    scale = scale_from_maxabs(amax, fp8_max(fp8_dtype, target), backoff, where=where, what="weight")
    return _round(scale, rule.rounding, target, fp8_dtype)


def quantize_weight_blocks(weight: Tensor, scale: Tensor, block: tuple[int, int], fp8_dtype: torch.dtype,
                           max_value: float | None = None) -> Tensor:
    """Quantize a ``[out, in]`` weight with a block scale (:func:`weight_scale_for`)."""
    return quantize(weight, expand_block_scale(scale, tuple(weight.shape), block), fp8_dtype, max_value)


def dequantize_weight_blocks(q: Tensor, scale: Tensor, block: tuple[int, int],
                             dtype: torch.dtype = torch.float32) -> Tensor:
    return dequantize(q, expand_block_scale(scale, tuple(q.shape), block), dtype)
