"""Observers: the modules that MEASURE-mode graphs call to record activation statistics.

An observer is an ``nn.Module`` (state_dict-able) called from an FX node. One
:class:`NodeObserver` exists per matched name; every graph that contains that name (the
prefill graph and the decode graph, say) calls the same observer objects, so statistics
accumulate across graphs and calls.

Observer kinds (the ``observer`` config key; parameters in ``observer_params``, see
:class:`ObserverParams` and docs/observers.md):

==================  ==========================================  ===========================================
observer            statistic                                   value written where INC reads the maxabs
==================  ==========================================  ===========================================
maxabs              running max of ``|x|``                      the max
maxabs_per_channel  same for activations (weights per channel)  the max
percentile          max of ``|x|`` and a histogram of ``|x|``   the ``percentile``-th percentile of ``|x|``
mse                 same                                        the clip value ``c`` (from a grid below the
                                                                max) whose scale gives the least FP8
                                                                quantize-dequantize error ``Σ|x - qdq(x)|^norm``
==================  ==========================================  ===========================================

The histogram (:class:`HistogramObserver`) has fixed log-spaced bins: :data:`BINS_PER_OCTAVE`
bins per power of two from ``2**LOW_EXP`` to ``2**HIGH_EXP`` (every finite float32 above it),
plus bin 0 for smaller values (zeros). Fixed bins need no re-binning when the range grows, and
their relative width (2.2 %) is the same at every magnitude, far below E4M3's 12.5 % step, which
is what FP8's floating-point grid needs: what matters is which values fall below the normal
range, and that is a question of ratios.

Per-head statistics (``observer_params.kv_cache_strategy = "attn_head"``): an observer built
with ``per_head=True`` keeps one statistic per index of dim -3 (the heads of a ``[B, H, S, D]``
tensor): ``amax`` has shape ``[H]`` and the histogram ``[H, bins]``.

Non-finite values are never folded into a statistic: a call whose tensor holds inf/NaN is
counted in ``nonfinite_calls`` and otherwise ignored, and ``finalize_calibration`` refuses to
write measurements for a node that saw one. A call with ``calls == 0`` starts the statistics
afresh (``prepare`` resets ``calls`` after its capture call, whose data is not calibration).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import numerics
from .errors import ConfigError, MeasurementError

__all__ = ["MaxAbsObserver", "HistogramObserver", "NodeObserver", "ObserverParams", "KV_STRATEGIES",
           "HISTOGRAM_OBSERVERS", "ClipTarget", "BINS_PER_OCTAVE", "LOW_EXP", "HIGH_EXP", "percentile_clip", "mse_clip",
           "make_observer"]

BINS_PER_OCTAVE = 32
LOW_EXP = -64
HIGH_EXP = 128
NUM_BINS = (HIGH_EXP - LOW_EXP) * BINS_PER_OCTAVE + 1  # + bin 0: |x| < 2**LOW_EXP

#: observers that keep a histogram, and the parameters each one reads
HISTOGRAM_OBSERVERS = {"percentile": ("percentile",), "mse": ("maxshrink", "grid", "norm")}
#: kv_cache_strategy values (compressed-tensors' strategy names)
KV_STRATEGIES = ("tensor", "attn_head")


# ------------------------------------------------------------------------------ parameters
def _number(value: Any, key: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
            integer: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"invalid value {value!r} for 'observer_params.{key}': expected {kind} in {lo}, {hi}")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class ObserverParams:
    """Parameters of the observers (the ``observer_params`` config key).

    ``percentile``      observer "percentile": the percentile of ``|x|`` kept, in (0, 100]
                        (ModelOpt's histogram calibrator's name and default, 99.99)
    ``maxshrink``       observer "mse": the clip values tried are ``amax * (1 - i / grid)`` for
    ``grid``            ``i = 0 .. floor(maxshrink * grid)`` (llm-compressor's MSE observer's
                        names; maxshrink in [0, 1), default 0.8: FP8 needs deeper shrinks than the
                        integer formats llm-compressor's 0.2 was chosen for; grid >= 1, default 100)
    ``norm``            observer "mse": the exponent of the error ``Σ |x - qdq(x)|^norm`` (default 2,
                        the mean squared error; llm-compressor's default is 2.4)
    ``kv_cache_strategy``  "tensor" (default: one scale per KV-cache tensor) or "attn_head" (one
                        per KV head: the KV cache and the q/k/v inputs of SDPA, compressed-tensors'
                        strategy name); applies to every observer kind

    A field left None takes the default; :meth:`to_dict` writes only the fields that were set, so
    a config round-trips exactly.
    """

    percentile: float | None = None
    maxshrink: float | None = None
    grid: int | None = None
    norm: float | None = None
    kv_cache_strategy: str | None = None

    DEFAULTS = {"percentile": 99.99, "maxshrink": 0.8, "grid": 100, "norm": 2.0, "kv_cache_strategy": "tensor"}

    def __post_init__(self) -> None:
        put = object.__setattr__.__get__(self)
        checks = {"percentile": lambda v: _number(v, "percentile", 0, 100, low_open=True),
                  "maxshrink": lambda v: _number(v, "maxshrink", 0, 1, high_open=True),
                  "grid": lambda v: _number(v, "grid", 1, 1e6, integer=True),
                  "norm": lambda v: _number(v, "norm", 0, 16, low_open=True)}
        for key, check in checks.items():
            if getattr(self, key) is not None:
                put(key, check(getattr(self, key)))
        kv = self.kv_cache_strategy
        if kv is not None:
            if not isinstance(kv, str) or kv.strip().lower() not in KV_STRATEGIES:
                raise ConfigError(f"invalid value {kv!r} for 'observer_params.kv_cache_strategy'; valid "
                                  f"choices: {', '.join(KV_STRATEGIES)}")
            put("kv_cache_strategy", kv.strip().lower())

    @classmethod
    def coerce(cls, value: Any, key: str = "observer_params") -> ObserverParams:
        if value is None or isinstance(value, ObserverParams):
            return value or cls()
        if not isinstance(value, Mapping):
            raise ConfigError(f"invalid value {value!r} for {key!r}: expected an object such as "
                              "{\"percentile\": 99.9} or {\"kv_cache_strategy\": \"attn_head\"}")
        unknown = [k for k in value if k not in cls.DEFAULTS]
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in {key!r}; valid keys: {', '.join(cls.DEFAULTS)}")
        return cls(**value)

    def get(self, key: str) -> Any:
        """The value of ``key``, or its default when unset."""
        value = getattr(self, key)
        return self.DEFAULTS[key] if value is None else value

    @property
    def per_head(self) -> bool:
        return self.get("kv_cache_strategy") == "attn_head"

    def check_observer(self, observer: str) -> None:
        """Refuse parameters that the configured observer does not read (never ignored silently)."""
        reads = set(HISTOGRAM_OBSERVERS.get(observer, ())) | {"kv_cache_strategy"}
        unused = [k for k in self.DEFAULTS if getattr(self, k) is not None and k not in reads]
        if unused:
            owner = next(o for o, keys in HISTOGRAM_OBSERVERS.items() if unused[0] in keys)
            raise ConfigError(f"'observer_params.{unused[0]}' is a parameter of observer {owner!r}, but "
                              f"'observer' is {observer!r}: set \"observer\": {owner!r} or remove it")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.DEFAULTS if getattr(self, k) is not None}

    def resolved(self) -> dict[str, Any]:
        """Every parameter with its default filled in (what the measurement files record)."""
        return {k: self.get(k) for k in self.DEFAULTS}


@dataclass(frozen=True)
class ClipTarget:
    """How QUANTIZE turns a measured value into a scale (``scale``: value -> 0-d scale, the node's
    scale method and backoff) and the FP8 format it quantizes to: what the MSE search scores."""

    scale: Callable[[Tensor], Tensor]
    fp8_dtype: torch.dtype
    fp8_max: float


# ------------------------------------------------------------------------------- observers
class MaxAbsObserver(nn.Module):
    """Running max of ``|x|`` over every call: per tensor, or per head (dim -3) with ``per_head``."""

    def __init__(self, per_head: bool = False, where: str = "") -> None:
        super().__init__()
        self.per_head = per_head
        self.where = where
        self.register_buffer("amax", torch.zeros((), dtype=torch.float32))
        self.calls = 0
        self.nonfinite_calls = 0

    def _reduce(self, a: Tensor) -> Tensor:
        """``|x|`` reduced to the statistic's shape: () per tensor, [H] per head."""
        if not self.per_head:
            return a.amax()
        if a.dim() < 3:
            raise MeasurementError(
                f"{self.where or 'observer'}: per-head statistics (kv_cache_strategy 'attn_head') need a "
                f"[..., heads, seq, head_dim] tensor, got shape {tuple(a.shape)}; use kv_cache_strategy "
                "'tensor' or blocklist the node")
        return a.transpose(-3, 0).reshape(a.shape[-3], -1).amax(dim=1)

    def _fresh(self, like: Tensor) -> None:
        """Start the statistics afresh, shaped like ``like`` (first call after a reset)."""
        self.amax = torch.zeros(like.shape, dtype=torch.float32, device=like.device)

    def forward(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            return
        if x.numel() == 0:
            self.calls += 1
            return
        a = x.detach().abs().float()
        m = self._reduce(a)
        if not bool(torch.isfinite(m).all()):
            self.calls += 1
            self.nonfinite_calls += 1
            return
        if self.calls == 0:
            self._fresh(m)
        elif m.shape != self.amax.shape:
            raise MeasurementError(
                f"{self.where or 'observer'}: a per-head tensor with {m.numel()} heads after calls with "
                f"{self.amax.numel()}; one node must keep its number of heads")
        self.calls += 1
        torch.maximum(self.amax, m.to(self.amax.device), out=self.amax)
        self._accumulate(a)

    def _accumulate(self, a: Tensor) -> None:
        """More statistics of ``|x|`` (finite); none for a plain maxabs observer."""

    def value(self, observer: str, params: ObserverParams, target: ClipTarget | None) -> Tensor:
        """The value written where INC reads the maxabs: the maxabs itself."""
        return self.amax.clone()

    def extra_repr(self) -> str:
        return f"amax={self.amax.max().item():.6g}, calls={self.calls}, per_head={self.per_head}"


def _bin_index(a: Tensor) -> Tensor:
    """Histogram bin of each ``|x|`` (finite, >= 0): 0 below ``2**LOW_EXP``, else 1 + octave fraction."""
    pos = (torch.log2(a) - LOW_EXP) * BINS_PER_OCTAVE
    idx = torch.floor(pos).clamp(min=-1, max=NUM_BINS - 2).long() + 1
    return idx.clamp_(min=0)


def _bin_upper(i: Tensor) -> Tensor:
    """Upper edge of bins ``i`` (float64): ``2**(LOW_EXP + i / BINS_PER_OCTAVE)``."""
    return torch.exp2(LOW_EXP + i.double() / BINS_PER_OCTAVE)


def _bin_center(i: Tensor) -> Tensor:
    """A bin's representative value (its geometric center; 0 for bin 0)."""
    c = torch.exp2(LOW_EXP + (i.double() - 0.5) / BINS_PER_OCTAVE)
    return torch.where(i == 0, torch.zeros_like(c), c)


class HistogramObserver(MaxAbsObserver):
    """Max of ``|x|`` plus a histogram of ``|x|`` (fixed log-spaced bins, module docstring)."""

    def __init__(self, per_head: bool = False, where: str = "") -> None:
        super().__init__(per_head, where)
        self.register_buffer("hist", torch.zeros(NUM_BINS, dtype=torch.int64))

    def _fresh(self, like: Tensor) -> None:
        super()._fresh(like)
        shape = (like.numel(), NUM_BINS) if self.per_head else (NUM_BINS,)
        self.hist = torch.zeros(shape, dtype=torch.int64, device=like.device)

    def _accumulate(self, a: Tensor) -> None:
        idx = _bin_index(a)
        if self.per_head:
            heads = a.shape[-3]
            idx = idx.transpose(-3, 0).reshape(heads, -1)
            idx = idx + torch.arange(heads, device=idx.device).unsqueeze(1) * NUM_BINS
            counts = torch.bincount(idx.reshape(-1), minlength=heads * NUM_BINS).reshape(heads, NUM_BINS)
        else:
            counts = torch.bincount(idx.reshape(-1), minlength=NUM_BINS)
        self.hist += counts.to(self.hist.device)

    def value(self, observer: str, params: ObserverParams, target: ClipTarget | None) -> Tensor:
        """The clipped value of each tensor (head): the percentile, or the MSE-optimal clip for the
        scale rule ``target`` (None when the scale does not depend on a measurement)."""
        hists = self.hist.reshape(-1, NUM_BINS)
        amaxes = self.amax.reshape(-1)
        if observer == "percentile":
            out = [percentile_clip(h, a, params.get("percentile")) for h, a in zip(hists, amaxes)]
        elif observer == "mse":
            if target is None:  # the scale does not depend on the measurement: nothing to optimize
                return self.amax.clone()
            out = [mse_clip(h, a, target, params.get("maxshrink"), params.get("grid"), params.get("norm"))
                   for h, a in zip(hists, amaxes)]
        else:
            return self.amax.clone()
        return torch.stack(out).reshape(self.amax.shape).float()


def percentile_clip(hist: Tensor, amax: Tensor, percentile: float) -> Tensor:
    """The ``percentile``-th percentile of ``|x|`` from its histogram: the upper edge of the bin
    where the cumulative count reaches ``percentile`` % of all values, never above ``amax``."""
    total = int(hist.sum())
    if total == 0 or float(amax) == 0.0:
        return amax.clone().float()
    cum = torch.cumsum(hist, 0)
    need = math.ceil(total * percentile / 100.0)
    b = int(torch.searchsorted(cum, torch.tensor([need], dtype=cum.dtype, device=cum.device)).item())
    return torch.minimum(_bin_upper(torch.tensor(b)), amax.double().cpu()).float()


def mse_clip(hist: Tensor, amax: Tensor, target: ClipTarget, maxshrink: float, grid: int, norm: float) -> Tensor:
    """The clip value ``c = amax * (1 - i / grid)``, ``i = 0 .. floor(maxshrink * grid)``, whose
    scale ``target.scale(c)`` gives the least ``Σ count * |v - qdq(v)|^norm`` over the histogram's
    bins (``v`` the bins' centers, the FP8 round trip of :mod:`fp8fx.numerics`); ties keep the
    larger ``c`` (``i = 0`` is the maxabs itself).
    """
    fp8_dtype, fp8_max = target.fp8_dtype, target.fp8_max
    if float(amax) == 0.0 or int(hist.sum()) == 0:
        return amax.clone().float()
    nz = torch.nonzero(hist.cpu()).reshape(-1)
    counts = hist.cpu()[nz].double()
    v = torch.minimum(_bin_center(nz), amax.double().cpu())
    best, best_err = amax.clone().float(), math.inf
    for i in range(int(math.floor(maxshrink * grid + 1e-9)) + 1):
        c = amax.float() * (1.0 - i / grid)
        if float(c) <= 0.0:
            break
        s = target.scale(c).double().reshape(())
        q = numerics.dequantize(numerics.quantize(v, s, fp8_dtype, fp8_max), s, torch.float64)
        err = float((counts * (v - q).abs().pow(norm)).sum())
        if err < best_err:
            best, best_err = c.clone(), err
    return best


def make_observer(observer: str, per_head: bool = False, where: str = "") -> MaxAbsObserver:
    """The observer module for one tensor of a node measured with ``observer``."""
    cls = HistogramObserver if observer in HISTOGRAM_OBSERVERS else MaxAbsObserver
    return cls(per_head=per_head, where=where)


class NodeObserver(nn.Module):
    """The observers of one matched node: one per activation input, one per output.

    ``per_head_inputs`` lists the inputs observed per head (the KV cache's written keys/values,
    an SDPA's q, k, v under kv_cache_strategy 'attn_head').
    """

    def __init__(self, name: str, kind: str, n_inputs: int, n_outputs: int, observer: str = "maxabs",
                 per_head_inputs: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.name = name
        self.kind = kind
        self.observer = observer
        self.per_head_inputs = tuple(per_head_inputs)
        self.inputs = nn.ModuleList(make_observer(observer, i in self.per_head_inputs, f"node {name!r} inputs[{i}]")
                                    for i in range(n_inputs))
        self.outputs = nn.ModuleList(make_observer(observer, False, f"node {name!r} outputs[{i}]")
                                     for i in range(n_outputs))

    def all(self) -> list[MaxAbsObserver]:
        return [*self.inputs, *self.outputs]

    @property
    def calls(self) -> int:
        return max((o.calls for o in self.all()), default=0)

    @property
    def nonfinite_calls(self) -> int:
        return sum(o.nonfinite_calls for o in self.all())
