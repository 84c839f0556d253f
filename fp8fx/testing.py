"""Helpers for your own unit tests of models quantized with fp8fx.

Three tools, usable from any pytest test::

    from fp8fx.testing import assert_quantized, assert_close, activations

    assert_quantized(model, expect={"linear": 6})      # what convert did, by kind
    assert_close(qmodel(x), reference(x))              # FP8-aware closeness (SQNR in dB)

    @given(activations(shape=(8, 64), max_abs=(1e-2, 4.0)))
    def test_any_input(x): ...                          # outliers, zeros, wide ranges

``docs/testing.md`` is the guide, with a complete example that the test suite runs.

assert_quantized
----------------
Reads :func:`fp8fx.report` (and the decisions kept on the model) and compares the number of
*quantized* nodes of each kind (``linear``, ``matmul``, ``softmax``, ``sdpa``, ``kv_cache``,
see :class:`fp8fx.passes.match.OpKind`) with what the test expects. The check is the same for
every kind, so it keeps working as more kinds become quantizable. On a mismatch the
``AssertionError`` lists, for each wrong kind, expected and actual counts, the nodes that were
*not* quantized with the reason fp8fx recorded, and, when there are too many, the quantized
ones. Kinds missing from ``expect`` are not checked, unless ``exact=True`` (then they must be 0).
A model that fp8fx did not convert is a usage error (:class:`fp8fx.Fp8fxError`), not a count.

assert_close and the default threshold
--------------------------------------
Closeness is the signal-to-quantization-noise ratio, the measure FP8 error is usually quoted in::

    SQNR = 10 log10( sum(expected^2) / sum((expected - actual)^2) )   [dB]

(``inf`` when the tensors are equal; ``-inf`` when ``expected`` is all zeros and ``actual`` is
not). Shapes, dtypes and devices must match, and a non-finite value in either tensor fails
the check, naming where it is: an FP8 model that overflows must not pass because NaN compares
as "not smaller than" a threshold.

The default ``min_sqnr_db`` comes from the format. A finite FP8 value has ``m`` stored mantissa
bits (E4M3: 3, E5M2: 2): ``x = t * 2^e`` with ``1 <= t < 2``, and the representable values of
that binade are ``2^(e-m)`` apart. Round-to-nearest moves ``x`` by at most half a step,
``|err| <= 2^(e-m-1)``, while ``x^2 >= 2^(2e)``; so for every element, and therefore for the
sums, ::

    SQNR >= 20 log10(2^(m+1)) = 6.02 * (m + 1) dB     E4M3: 24.08 dB    E5M2: 18.06 dB

This is a worst case: it holds for any data that one scaled cast keeps in the normal range
(no saturation; subnormals carry negligible energy once the tensor's maximum is scaled near the
format's maximum). The *typical* cast is better: errors spread uniformly over ``±step/2`` have
power ``step^2 / 12``, giving ``6.02 m + 10.79 + 10 log10(E[t^2])`` dB, i.e. 28.9 to 34.9 dB for
E4M3 (32.5 dB when ``t`` is spread evenly). Measured (2^16 samples, amax scaled to 448, 20
seeds): 31.5 dB Gaussian, 31.9 dB uniform, 31.7 dB log-uniform over 4 decades, for every
scale from 448 down to 7 (floating point: the scale barely matters) — a little below 32.5 dB
because E4M3's top binade stops at 1.75 * 2^8. E5M2 measures 25.5 to 25.8 dB. An FP8 Linear
adds the noise of two casts (activation and weight, about -3 dB: 28.8 dB measured for one
Linear) and a model accumulates more (a two-Linear MLP: about 26 dB), so the default suits
one cast or one layer; pass ``min_sqnr_db`` for a whole model.

Strategies
----------
:func:`activations` and :func:`shapes` are hypothesis strategies. hypothesis is imported
inside them, so ``import fp8fx.testing`` works without it. Values come from a ``torch``
generator seeded by a number hypothesis draws, so every example is reproducible and the
structural choices (shape, outlier channels, zero fraction, scale, range) shrink.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import numerics
from .errors import Fp8fxError
from .fp8 import FP8Format, format_of

__all__ = ["assert_quantized", "assert_close", "sqnr", "default_min_sqnr_db", "KINDS",
           "activations", "shapes"]

#: The op kinds fp8fx matches, as ``expect`` keys (the values of ``OpKind``).
KINDS = ("linear", "matmul", "softmax", "sdpa", "kv_cache")

_LISTED = 20  # nodes listed per kind in a failure message


# ------------------------------------------------------------------------------ assert_quantized
def _kind_name(key: Any) -> str:
    name = getattr(key, "value", key)  # OpKind members are str enums
    if not isinstance(name, str) or name not in KINDS:
        raise Fp8fxError(f"fp8fx.testing.assert_quantized: unknown kind {key!r} in expect; use one "
                         f"of {', '.join(KINDS)}")
    return name


def _expected_counts(expect: Mapping | None) -> dict[str, int]:
    if expect is None:
        return {}
    if not isinstance(expect, Mapping):
        raise Fp8fxError("fp8fx.testing.assert_quantized: expect must be a mapping of kind -> count, "
                         f"e.g. {{'linear': 4}}, got {type(expect).__name__}")
    out: dict[str, int] = {}
    for key, n in expect.items():
        kind = _kind_name(key)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise Fp8fxError(f"fp8fx.testing.assert_quantized: expect[{kind!r}] must be a count >= 0, "
                             f"got {n!r}")
        out[kind] = n
    return out


def _converted_report(model: Any) -> tuple[dict, list]:
    """(fp8fx.report(model), the decisions) of a converted model; a usage error otherwise."""
    from .api import report
    from .state import state_of as _state

    if not isinstance(model, nn.Module):
        raise Fp8fxError("fp8fx.testing.assert_quantized needs the nn.Module returned by fp8fx.convert, "
                         f"got {type(model).__name__}")
    name = type(getattr(model, "_orig_mod", model)).__name__
    state = _state(model)
    if state is None:
        raise Fp8fxError(f"fp8fx.testing.assert_quantized: {name} was not converted by fp8fx; call "
                         "fp8fx.convert(model, ...) (after fp8fx.prepare and calibration) first")
    if state.phase == "measure":
        raise Fp8fxError(f"fp8fx.testing.assert_quantized: {name} is prepared for calibration (MEASURE) "
                         "but not converted; run calibration, then fp8fx.convert(model)")
    if state.phase == "pending":
        raise Fp8fxError(f"fp8fx.testing.assert_quantized: {name} is converted on its first call, which "
                         "has not happened yet; call the model once, or pass example_inputs to "
                         "fp8fx.convert")
    return report(model), list(state.decisions.values())


def _listing(items: list[str], indent: str) -> list[str]:
    lines = [f"{indent}{s}" for s in items[:_LISTED]]
    if len(items) > _LISTED:
        lines.append(f"{indent}... and {len(items) - _LISTED} more")
    return lines


def assert_quantized(model: nn.Module, expect: Mapping[str, int] | None = None, *,
                     exact: bool = False) -> dict[str, int]:
    """Check how many nodes of each kind fp8fx quantized in ``model``.

    ``expect`` maps a kind (``"linear"``, ``"matmul"``, ``"softmax"``, ``"sdpa"``,
    ``"kv_cache"``, or an ``OpKind``) to the number of nodes of that kind that must be
    quantized. Kinds not named are not checked, unless ``exact=True``: then every other kind
    must have no quantized node. Raises ``AssertionError`` listing, per wrong kind, the counts
    and every node left in high precision with its reason. Returns the quantized counts of
    every kind.
    """
    expected = _expected_counts(expect)
    named = set(expected)
    if exact:
        expected = {k: expected.get(k, 0) for k in KINDS}
    elif not expected:
        raise Fp8fxError("fp8fx.testing.assert_quantized: nothing to check; pass expect={'linear': n, "
                         "...} or exact=True")
    rep, decisions = _converted_report(model)
    got = {k: int(rep["nodes_quantized"].get(k, 0)) for k in KINDS}
    skipped = {k: [s for s in rep["skipped"] if s["kind"] == k] for k in KINDS}
    quantized = {k: [d.match.name for d in decisions if d.quantize and d.match.kind.value == k] for k in KINDS}

    wrong = [k for k, n in expected.items() if got[k] != n]
    if not wrong:
        return got
    name = type(getattr(model, "_orig_mod", model)).__name__
    lines = [f"fp8fx.testing.assert_quantized: {name} has {len(wrong)} kind(s) whose count of quantized "
             "nodes differs from expect"]
    for k in wrong:
        why = "" if k in named else " (exact=True)"
        lines.append(f"  {k}: expected {expected[k]}{why}, got {got[k]} quantized, "
                     f"{len(skipped[k])} not quantized")
        if skipped[k]:
            lines.append("    not quantized (name: reason):")
            lines += _listing([f"{s['name']}: {s['reason']}" for s in skipped[k]], "      ")
        if got[k] > expected[k]:
            lines.append("    quantized:")
            lines += _listing(quantized[k], "      ")
        if not skipped[k] and got[k] < expected[k]:
            lines.append(f"    fp8fx found no other {k} node in the graph (see fp8fx.explain(model))")
    lines.append(f"  all kinds: quantized {rep['nodes_quantized']}, skipped {rep['nodes_skipped']}")
    raise AssertionError("\n".join(lines))


# --------------------------------------------------------------------------- sqnr / assert_close
def _fmt(fmt: Any) -> FP8Format:
    found = format_of(fmt)
    if found is None:
        raise Fp8fxError(f"fp8fx.testing: unknown FP8 format {fmt!r}; use 'e4m3' or 'e5m2' (or "
                         "fp8fx.Fp8Format, torch.float8_e4m3fn, torch.float8_e5m2)")
    return found


def default_min_sqnr_db(fmt: Any = "e4m3") -> float:
    """The worst-case SQNR of one round-to-nearest cast to ``fmt``: ``6.02 * (mantissa bits + 1)``
    dB (24.08 dB for E4M3, 18.06 dB for E5M2); the module docstring derives it."""
    return 20.0 * math.log10(2.0) * (_fmt(fmt).mantissa_bits + 1)


def _nonfinite(t: Tensor, what: str) -> str | None:
    bad = ~torch.isfinite(t)
    n = int(bad.sum())
    if n == 0:
        return None
    nan = int(torch.isnan(t).sum())
    idx = [tuple(int(i) for i in row) for row in torch.nonzero(bad)[:5].tolist()] if t.dim() else [()]
    where = ", ".join(f"{i} = {t[i].item()}" for i in idx)
    more = " ..." if n > len(idx) else ""
    return (f"{what} has {n} non-finite value(s) ({nan} NaN, {n - nan} inf) of {t.numel()}: "
            f"{where}{more}")


def _check_pair(actual: Any, expected: Any, check_dtype: bool) -> list[str]:
    """Reasons why the two tensors cannot be compared (empty when they can)."""
    for v, what in ((actual, "actual"), (expected, "expected")):
        if not isinstance(v, Tensor):
            return [f"{what} is a {type(v).__name__}, not a torch.Tensor"]
    problems = []
    if actual.shape != expected.shape:
        problems.append(f"shapes differ: actual {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if check_dtype and actual.dtype != expected.dtype:
        problems.append(f"dtypes differ: actual {actual.dtype}, expected {expected.dtype} (cast one, or "
                        "pass check_dtype=False)")
    if actual.device != expected.device:
        problems.append(f"devices differ: actual {actual.device}, expected {expected.device}")
    for v in (actual, expected):
        if v.is_complex():
            problems.append(f"complex tensors ({v.dtype}) are not supported")
            break
    if not problems:
        problems += [p for p in (_nonfinite(actual.detach(), "actual"), _nonfinite(expected.detach(), "expected")) if p]
    return problems


def _sqnr(actual: Tensor, expected: Tensor) -> float:
    return numerics.sqnr_db(expected, actual)  # the project's one definition (reference first)


def sqnr(actual: Tensor, expected: Tensor) -> float:
    """SQNR of ``actual`` against the reference ``expected``, in dB (float64 sums).

    ``10 log10(sum(expected^2) / sum((expected - actual)^2))``: ``inf`` when equal, ``-inf``
    when ``expected`` is all zeros and ``actual`` is not. The argument order is that of
    :func:`assert_close` (``fp8fx.numerics.sqnr_db`` takes the reference first). Raises
    :class:`fp8fx.Fp8fxError` when shapes differ or a value is not finite.
    """
    problems = _check_pair(actual, expected, check_dtype=False)
    if problems:
        raise Fp8fxError("fp8fx.testing.sqnr: " + "; ".join(problems))
    return _sqnr(actual, expected)


def _leaves(actual: Any, expected: Any, path: str, out: list[tuple[str, Any, Any]]) -> None:
    """Pair up the tensors of two (nested tuple/list/dict) outputs, naming each by its path."""
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        if list(actual.keys()) != list(expected.keys()):
            raise AssertionError(f"fp8fx.testing.assert_close: {path} keys differ: actual "
                                 f"{list(actual.keys())}, expected {list(expected.keys())}")
        for k in expected:
            _leaves(actual[k], expected[k], f"{path}[{k!r}]", out)
    elif isinstance(expected, (tuple, list)) and isinstance(actual, (tuple, list)):
        if len(actual) != len(expected):
            raise AssertionError(f"fp8fx.testing.assert_close: {path} lengths differ: actual "
                                 f"{len(actual)}, expected {len(expected)}")
        for i, (a, e) in enumerate(zip(actual, expected)):
            _leaves(a, e, f"{path}[{i}]", out)
    else:
        out.append((path, actual, expected))


def _worst_element(actual: Tensor, expected: Tensor) -> str:
    if actual.numel() == 0:
        return ""
    err = (actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs()
    flat = int(err.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape)) if err.dim() else ()
    return (f"; largest error {float(err.reshape(-1)[flat]):.4g} at {idx}: actual "
            f"{float(actual.reshape(-1)[flat]):.6g}, expected {float(expected.reshape(-1)[flat]):.6g}")


def assert_close(actual: Any, expected: Any, *, min_sqnr_db: float | None = None, fmt: Any = "e4m3",
                 check_dtype: bool = True, msg: str | None = None) -> float:
    """Assert that ``actual`` (e.g. an FP8 model's output) is within FP8 error of ``expected``.

    Passes when the SQNR (:func:`sqnr`) is at least ``min_sqnr_db``, by default
    :func:`default_min_sqnr_db` of ``fmt`` (24.08 dB for E4M3: the worst case of one cast; a
    whole model loses more, so pass a lower ``min_sqnr_db`` for one). Tensors, or tuples,
    lists and dicts of them (a model's outputs) are compared leaf by leaf. Fails with an
    ``AssertionError`` on a shape, dtype (unless ``check_dtype=False``) or device mismatch and
    on any NaN or inf, naming where. ``msg`` prefixes the failure message. Returns the
    smallest SQNR seen.
    """
    threshold = default_min_sqnr_db(fmt) if min_sqnr_db is None else float(min_sqnr_db)
    if math.isnan(threshold):
        raise Fp8fxError("fp8fx.testing.assert_close: min_sqnr_db is NaN; pass a number of dB")
    pairs: list[tuple[str, Any, Any]] = []
    _leaves(actual, expected, "output", pairs)
    failures, worst = [], math.inf
    for path, a, e in pairs:
        where = "" if len(pairs) == 1 else f"{path}: "
        problems = _check_pair(a, e, check_dtype)
        if problems:
            failures += [where + p for p in problems]
            continue
        value = _sqnr(a, e)
        worst = min(worst, value)
        if value < threshold:
            failures.append(f"{where}SQNR {value:.2f} dB < min_sqnr_db {threshold:.2f} dB"
                            f"{' (default for ' + _fmt(fmt).name + ')' if min_sqnr_db is None else ''}"
                            f"{_worst_element(a, e)}")
    if failures:
        head = (msg + "\n") if msg else ""
        raise AssertionError(head + "fp8fx.testing.assert_close failed:\n" + "\n".join(f"  {f}" for f in failures))
    return worst


# --------------------------------------------------------------------------------- strategies
def _st():
    try:
        from hypothesis import strategies
    except ImportError as exc:  # pragma: no cover - hypothesis is a test dependency
        raise Fp8fxError("fp8fx.testing strategies need hypothesis: pip install hypothesis "
                         "(or pip install 'fp8fx[test]')") from exc
    return strategies


def _bounds(value: Any, name: str, lo: float, hi: float | None = None) -> tuple[float, float]:
    """A number or a (min, max) pair, checked against [lo, hi]."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in pair):
        raise Fp8fxError(f"fp8fx.testing.activations: {name} must be a number or a (min, max) pair, got {value!r}")
    a, b = float(pair[0]), float(pair[1])
    if not (lo <= a <= b) or (hi is not None and b > hi) or math.isinf(b):
        limit = f"[{lo}, {hi}]" if hi is not None else f">= {lo} and finite"
        raise Fp8fxError(f"fp8fx.testing.activations: {name}={value!r} must satisfy min <= max, within {limit}")
    return a, b


def shapes(*, min_dims: int = 1, max_dims: int = 3, min_side: int = 1, max_side: int = 16):
    """Strategy of tensor shapes: tuples of ``min_dims..max_dims`` sides in ``min_side..max_side``."""
    st = _st()
    if not (0 <= min_dims <= max_dims and 0 <= min_side <= max_side):
        raise Fp8fxError(f"fp8fx.testing.shapes: need 0 <= min_dims <= max_dims and 0 <= min_side <= "
                         f"max_side, got dims {min_dims}..{max_dims}, sides {min_side}..{max_side}")
    return st.lists(st.integers(min_side, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


def activations(shape: Any = None, *, dtype: Any = torch.float32, max_abs: Any = (1e-2, 1e2),
                dynamic_range: Any = 4.0, outliers: Any = (0, 2), outlier_ratio: Any = (10.0, 1000.0),
                zeros: Any = (0.0, 0.25)):
    """Strategy of activation-like tensors: outlier channels, exact zeros, a wide dynamic range.

    Each numeric argument is a number or a ``(min, max)`` pair that hypothesis draws from:

    * ``shape``: a tuple, a strategy of tuples, or None for :func:`shapes`;
    * ``dtype``: a floating torch dtype, or a sequence of them to draw from;
    * ``max_abs``: the largest magnitude in the tensor (drawn log-uniformly; before rounding
      to ``dtype``), so a test can stay inside a model's calibrated range;
    * ``dynamic_range``: decades spanned by the magnitudes (log-uniform, random signs):
      values lie in ``[max_abs / ratio * 10^-dynamic_range, max_abs]``;
    * ``outliers``: how many channels (last dimension) hold the largest values; the other
      channels are ``outlier_ratio`` times smaller (a drawn ratio in ``outlier_ratio``);
    * ``zeros``: the fraction of elements set to exactly 0.

    Values below a dtype's smallest subnormal (fp16: 6e-8) round to 0. Every example is
    generated from a seed that hypothesis draws, so it is reproducible and shrinks.
    """
    st = _st()
    if shape is None:
        shape_st = shapes()
    elif isinstance(shape, st.SearchStrategy):
        shape_st = shape
    elif isinstance(shape, (tuple, list)) and all(isinstance(s, int) and s >= 0 for s in shape):
        shape_st = st.just(tuple(shape))
    else:
        raise Fp8fxError(f"fp8fx.testing.activations: shape must be a tuple of sizes >= 0, a strategy of "
                         f"them, or None, got {shape!r}")
    dtypes = [dtype] if isinstance(dtype, torch.dtype) else list(dtype)
    for dt in dtypes:
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point or dt.itemsize < 2:
            raise Fp8fxError(f"fp8fx.testing.activations: dtype must be a float dtype of 16 bits or more "
                             f"(float32, bfloat16, float16, float64), got {dt!r}")
    amax = _bounds(max_abs, "max_abs", 0.0)
    if amax[0] <= 0.0:
        raise Fp8fxError(f"fp8fx.testing.activations: max_abs must be > 0, got {max_abs!r}")
    too_big = [dt for dt in dtypes if amax[1] > torch.finfo(dt).max]
    if too_big:
        raise Fp8fxError(f"fp8fx.testing.activations: max_abs up to {amax[1]} does not fit {too_big[0]} "
                         f"(max {torch.finfo(too_big[0]).max}); lower max_abs")
    decades = _bounds(dynamic_range, "dynamic_range", 0.0, 30.0)
    n_out = _bounds(outliers, "outliers", 0.0)
    if n_out != (int(n_out[0]), int(n_out[1])):
        raise Fp8fxError(f"fp8fx.testing.activations: outliers must be whole numbers, got {outliers!r}")
    ratio = _bounds(outlier_ratio, "outlier_ratio", 1.0)
    zero_frac = _bounds(zeros, "zeros", 0.0, 1.0)

    def log_uniform(lo: float, hi: float):
        return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.0 ** e) if lo < hi else st.just(lo)

    def between(lo: float, hi: float):
        return st.floats(lo, hi) if lo < hi else st.just(lo)

    @st.composite
    def draw_activation(draw) -> Tensor:
        shp = tuple(int(s) for s in draw(shape_st))
        dt = draw(st.sampled_from(dtypes))
        top = min(draw(log_uniform(*amax)), amax[1])   # 10 ** log10(hi) may exceed hi by an ulp
        span = draw(between(*decades))
        channels = shp[-1] if shp else 0
        k = min(draw(st.integers(int(n_out[0]), int(n_out[1]))), channels)
        r = draw(log_uniform(*ratio)) if k else 1.0
        frac = draw(between(*zero_frac))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**63 - 1)))

        mag = 10.0 ** (-span * torch.rand(shp, generator=gen, dtype=torch.float64))    # (10^-span, 1]
        sign = torch.where(torch.rand(shp, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
        x = sign * mag * (top / r)
        if k:
            chosen = torch.randperm(channels, generator=gen)[:k]
            x[..., chosen] *= r
        n_zero = int(round(frac * x.numel()))
        if n_zero:
            x.view(-1)[torch.randperm(x.numel(), generator=gen)[:n_zero]] = 0.0
        return x.to(dt)

    return draw_activation()
