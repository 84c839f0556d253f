"""Property and example tests for fp8fx.numerics (casts, scale methods, HW scale sets)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fp8fx import numerics as nx
from fp8fx.errors import ConfigError, Fp8fxError, MeasurementError, QuantizationError
from fp8fx.fp8 import FORMATS as FORMAT_TABLE
from fp8fx.fp8 import FP8_DTYPES, format_of

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (dtype, mantissa bits, smallest normal, half the subnormal spacing)
FORMATS = {
    E4M3: (3, 2.0**-6, 2.0**-10),
    E5M2: (2, 2.0**-14, 2.0**-17),
}
GAUDI = ("gaudi2", "gaudi3")
MAXABS_METHODS = sorted(
    m for m in nx.SCALE_METHODS if m not in ("unit_scale", "hw_aligned_single_scale")
)


def is_pow2(t: torch.Tensor) -> bool:
    mantissa, _ = torch.frexp(t)
    return bool((mantissa == 0.5).all())


def in_set(t: torch.Tensor, allowed: torch.Tensor) -> bool:
    return bool(torch.isin(t.flatten(), allowed).all())


def qdq(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, qmax: float | None = None):
    return nx.dequantize(nx.quantize(x, scale, dtype, qmax), scale)


finite_f32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
pos_amax = st.floats(
    min_value=0.0, max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32
)
scales = st.builds(
    lambda e, m: m * 2.0**e, st.integers(-40, 40), st.floats(1.0, 1.9990234375, width=32)
)


# ---------------------------------------------------------------------------------- formats


def test_fp8_max_per_target():
    assert nx.fp8_max(E4M3) == nx.E4M3_MAX == 448.0
    assert nx.fp8_max(E4M3, "gaudi2") == nx.E4M3_GAUDI2_MAX == 240.0
    assert nx.fp8_max(E4M3, "gaudi3") == 448.0
    assert nx.fp8_max(E5M2, "gaudi2") == nx.E5M2_MAX == 57344.0
    with pytest.raises(ConfigError, match="gaudi2"):
        nx.fp8_max(E4M3, "hpu")
    with pytest.raises(ConfigError, match="float8_e4m3fn"):
        nx.fp8_max(torch.bfloat16)


@pytest.mark.parametrize("fmt", list(FORMAT_TABLE.values()), ids=lambda f: f.name)
def test_format_table_matches_torch_over_all_256_codes(fmt):
    """Every fact of the one format table (fp8fx.fp8) against torch's decoding of each code."""
    values = torch.arange(256, dtype=torch.uint8).view(fmt.dtype).to(torch.float32)
    finfo = torch.finfo(fmt.dtype)
    assert fmt.dtype in FP8_DTYPES and fmt.exponent_bits + fmt.mantissa_bits == 7
    assert fmt.max == finfo.max == float(values[values.isfinite()].max())
    assert fmt.smallest_normal == finfo.smallest_normal == 2.0 ** (1 - fmt.bias)
    assert finfo.eps == 2.0 ** -fmt.mantissa_bits
    assert 2.0 ** fmt.max_exponent <= fmt.max < 2.0 ** (fmt.max_exponent + 1)
    assert fmt.nan_codes == tuple(torch.nonzero(values.isnan()).flatten().tolist())
    assert fmt.inf_codes == tuple(torch.nonzero(values.isinf()).flatten().tolist())
    assert fmt.has_inf == bool(fmt.inf_codes)
    magnitudes = torch.arange(128)
    assert bool((values[:128].isnan() == (magnitudes >= fmt.nan_magnitude)).all())
    if fmt.has_inf:
        assert bool(values[fmt.inf_magnitude].isinf())
    assert format_of(fmt.dtype) is format_of(fmt.name.upper()) is fmt
    assert nx.fp8_max(fmt.dtype, "gaudi2") == fmt.gaudi2_max <= fmt.max


def test_one_fp8_dtypes_and_one_scale_method_table():
    from fp8fx import attention_ops, ops
    from fp8fx.scale_methods import ScaleMethod

    assert nx.FP8_DTYPES is ops.FP8_DTYPES is attention_ops.FP8_DTYPES is FP8_DTYPES
    assert format_of(torch.bfloat16) is None and format_of("e3m4") is None
    static = {m.value for m in ScaleMethod if not m.dynamic_only}
    assert nx.SCALE_METHODS == static and len(static) == 11
    for m in ScaleMethod:
        if m.value in static:
            assert nx.weight_is_per_channel(m.value) == m.weight_per_channel
            assert nx.needs_measurement(m.value) == m.needs_measurement
        else:
            with pytest.raises(ConfigError, match="run time"):
                nx.needs_measurement(m.value)


# ------------------------------------------------------------------------------------ casts


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@SETTINGS
@given(
    scale=scales,
    values=st.lists(st.floats(-1.0, 1.0, width=32), min_size=1, max_size=32),
    data=st.data(),
)
def test_round_trip_error_bound(dtype, scale, values, data):
    mbits, min_normal, half_subnormal = FORMATS[dtype]
    qmax = nx.fp8_max(dtype)
    magnitude = data.draw(st.sampled_from([qmax, 1.0, min_normal * 4, min_normal]))
    s = torch.tensor(scale, dtype=torch.float32)
    x = torch.tensor(values, dtype=torch.float32) * magnitude * s
    y = x / s  # what the cast sees
    err = (qdq(x, s, dtype) - x).abs()
    rel_bound = 2.0 ** -(mbits + 1) * x.abs() * (1 + 1e-6)
    abs_bound = half_subnormal * s * (1 + 1e-6)
    normal = y.abs() >= min_normal
    assert bool((err[normal] <= rel_bound[normal]).all())
    assert bool((err[~normal] <= abs_bound).all())


@pytest.mark.parametrize("dtype,target", [(E4M3, "cpu"), (E4M3, "gaudi2"), (E5M2, "cpu")])
@SETTINGS
@given(values=st.lists(finite_f32, min_size=1, max_size=32))
def test_saturation_never_overflows(dtype, target, values):
    qmax = nx.fp8_max(dtype, target)
    x = torch.tensor(values + [math.inf, -math.inf, qmax * 1.5, -qmax * 1.03])
    q = nx.saturate_cast(x, dtype, qmax).to(torch.float32)
    assert bool(torch.isfinite(q).all())
    assert float(q.abs().max()) <= qmax
    beyond = x.abs() >= qmax
    assert torch.equal(q[beyond], torch.sign(x[beyond]) * qmax)


def test_saturate_cast_keeps_nan_and_upcasts_bf16():
    q = nx.saturate_cast(torch.tensor([math.nan, 1.0]), E4M3).to(torch.float32)
    assert math.isnan(q[0]) and q[1] == 1.0
    # a 0-d fp32 scale must not leave a bf16 division in bf16
    x = torch.tensor([300.0, 1.0], dtype=torch.bfloat16)
    q = nx.quantize(x, torch.tensor(2.0**-3), E4M3).to(torch.float32)
    assert q.tolist() == [448.0, 8.0]


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@SETTINGS
@given(scale=scales, values=st.lists(finite_f32, min_size=1, max_size=32))
def test_quantize_is_idempotent(dtype, scale, values):
    s = torch.tensor(scale, dtype=torch.float32)
    q = nx.quantize(torch.tensor(values), s, dtype)
    again = nx.quantize(nx.dequantize(q, s), s, dtype)
    assert torch.equal(q.view(torch.uint8), again.view(torch.uint8))


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@SETTINGS
@given(
    scale=scales,
    values=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=32),
    hp=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    qmax=st.sampled_from([None, 240.0, 3.0]),
)
def test_quantize_family_is_one_computation(dtype, scale, values, hp, qmax):
    """The ops' float32 form, a Python-float scale and the attention ops' argument order are the
    same quantization (bit for bit) as ``quantize``; float64 ``x`` is divided in float32 there."""
    from fp8fx import attention_ops
    from fp8fx.kernels import linear

    x = torch.tensor(values, dtype=torch.float32).to(hp)
    s = torch.tensor(scale, dtype=torch.float32)
    want = nx.quantize(x.float(), s, dtype, qmax).view(torch.uint8)
    assert torch.equal(nx.quantize_fp32(x, s, dtype, qmax).view(torch.uint8), want)
    assert linear.quantize_activation is nx.quantize_fp32
    limit = qmax or nx.fp8_max(dtype)
    as_float = float(s)  # exactly the float32 scale
    assert torch.equal(attention_ops.quantize(x, as_float, limit, dtype).view(torch.uint8), want)
    if hp != torch.float64:
        assert torch.equal(nx.quantize(x, s, dtype, qmax).view(torch.uint8), want)
    deq = attention_ops.qdq(x, as_float, limit, dtype)
    assert bool(((deq == nx.dequantize(want.view(dtype), s)) | deq.isnan()).all())


def test_dequantize_dtype_and_per_channel_weight_round_trip():
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3) * torch.logspace(-3, 2, 6).reshape(6, 1, 1, 1)
    for method in ("act_maxabs_hw_weights_pcs_maxabs_pow2", "act_maxabs_pow2_weights_pcs_opt_pow2"):
        s = nx.weight_scale(w, method, fp8_dtype=E4M3, target="cpu")
        assert s.shape == (6,) and s.dtype == torch.float32
        q = nx.quantize_weight(w, s, E4M3)
        assert q.shape == w.shape and q.dtype == E4M3
        back = nx.dequantize_weight(q, s, torch.bfloat16)
        assert back.dtype == torch.bfloat16
        assert nx.sqnr_db(w, back.float()) > 25
        # per-channel scaling keeps the small channels as accurate as the large ones
        assert nx.sqnr_db(w[0], back[0].float()) > 25
    assert nx.quantize_weight(w, s.reshape(6, 1), E4M3).shape == w.shape
    with pytest.raises(QuantizationError, match=r"\[6\]"):
        nx.quantize_weight(w, torch.ones(5), E4M3)


# --------------------------------------------------------------------------------- maxabs


def test_maxabs_per_tensor_and_per_channel():
    x = torch.tensor([[1.0, -3.0], [0.5, 2.0], [-7.0, 0.0]], dtype=torch.bfloat16)
    assert nx.maxabs(x).dtype == torch.float32 and nx.maxabs(x).dim() == 0
    assert float(nx.maxabs(x)) == 7.0
    assert nx.maxabs(x, dim=0).tolist() == [3.0, 2.0, 7.0]
    assert nx.maxabs(x, dim=1).tolist() == [7.0, 3.0]
    assert float(nx.maxabs(torch.empty(0))) == 0.0


def test_sqnr_db():
    x = torch.tensor([3.0, 4.0])
    assert nx.sqnr_db(x, x.clone()) == math.inf
    assert nx.sqnr_db(x, x + torch.tensor([0.5, 0.0])) == pytest.approx(10 * math.log10(25 / 0.25))
    with pytest.raises(Fp8fxError, match="shape"):
        nx.sqnr_db(x, torch.zeros(3))


# ------------------------------------------------------------------------ HW scale sets


def test_hw_scale_sets():
    assert nx.hw_scales("gaudi2", E4M3).tolist() == [1 / 256, 1 / 16, 1.0, 16.0]
    g3 = nx.hw_scales("gaudi3", E4M3)
    assert g3.tolist() == [2.0**e for e in range(-55, 8)]
    assert nx.hw_scales("gaudi2", E5M2).tolist() == [1.0]
    assert nx.hw_scales("cpu", E4M3) is None and nx.hw_scales("cuda", E5M2) is None


def test_reference_worked_example():
    s = torch.tensor([3e-5, 0.03, 30.0, 300.0])
    assert nx.snap_to_hw(s, "gaudi2", E4M3).tolist() == [1 / 256, 1 / 16, 16.0, 16.0]
    assert nx.snap_to_hw(s, "gaudi3", E4M3).tolist() == [2.0**-15, 1 / 32, 32.0, 128.0]
    assert nx.snap_to_hw(s, "gaudi2", E5M2).tolist() == [1.0] * 4
    assert nx.snap_to_hw(s, "cpu", E4M3).tolist() == [2.0**-15, 1 / 32, 32.0, 512.0]


def test_hw_aligned_single_scale():
    for target, expected in (("gaudi2", 16.0), ("gaudi3", 128.0)):
        assert (
            float(
                nx.activation_scale(None, "hw_aligned_single_scale", fp8_dtype=E4M3, target=target)
            )
            == expected
        )
        w = torch.randn(4, 4)
        assert (
            float(nx.weight_scale(w, "hw_aligned_single_scale", fp8_dtype=E4M3, target=target))
            == expected
        )
    assert (
        float(nx.activation_scale(None, "hw_aligned_single_scale", fp8_dtype=E5M2, target="gaudi2"))
        == 1.0
    )
    with pytest.raises(ConfigError, match="gaudi"):
        nx.activation_scale(None, "hw_aligned_single_scale", fp8_dtype=E4M3, target="cpu")
    assert float(nx.activation_scale(None, "unit_scale", fp8_dtype=E4M3, target="cpu")) == 1.0


@SETTINGS
@given(values=st.lists(st.floats(2.0**-100, 2.0**100, width=32), min_size=1, max_size=16))
def test_pow2_ceil_is_smallest_power_of_two_not_below(values):
    s = torch.tensor(values)
    p = nx.pow2_ceil(s)
    assert is_pow2(p)
    assert bool((p >= s).all()) and bool((p / 2 < s).all())


@pytest.mark.parametrize("target", GAUDI)
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@SETTINGS
@given(amax=pos_amax)
def test_hw_methods_stay_in_hw_set(target, dtype, amax):
    allowed = nx.hw_scales(target, dtype)
    a = torch.tensor(amax)
    for method in (
        "maxabs_hw",
        "maxabs_hw_opt_weight",
        "act_maxabs_hw_weights_pcs_opt_pow2",
        "hw_aligned_single_scale",
    ):
        assert in_set(nx.activation_scale(a, method, fp8_dtype=dtype, target=target), allowed)
    assert in_set(
        nx.weight_scale_from_maxabs(a, "maxabs_hw", fp8_dtype=dtype, target=target), allowed
    )
    w = torch.linspace(-1, 1, 64).reshape(8, 8) * amax
    assert in_set(
        nx.weight_scale(w, "maxabs_hw_opt_weight", fp8_dtype=dtype, target=target), allowed
    )


@pytest.mark.parametrize("target", ["cpu", "gaudi3"])
@SETTINGS
@given(amax=pos_amax)
def test_pow2_methods_give_powers_of_two(target, amax):
    a = torch.tensor(amax)
    for method in ("maxabs_pow2", "maxabs_pow2_opt_weight", "maxabs_hw"):
        assert is_pow2(nx.activation_scale(a, method, fp8_dtype=E4M3, target=target))
    w = torch.linspace(-1, 1, 48).reshape(6, 8) * amax
    for method in (
        "maxabs_pow2",
        "maxabs_pow2_opt_weight",
        "act_maxabs_pow2_weights_pcs_maxabs_pow2",
        "act_maxabs_hw_weights_pcs_opt_pow2",
    ):
        assert is_pow2(nx.weight_scale(w, method, fp8_dtype=E4M3, target=target))


def test_arbitrary_uses_backoff_and_no_rounding():
    a = torch.tensor(3.0)
    s = nx.activation_scale(a, "maxabs_arbitrary", fp8_dtype=E4M3, target="cpu")
    assert float(s) == pytest.approx(3.0 / (448 * 0.25))
    s = nx.weight_scale_from_maxabs(
        a, "maxabs_arbitrary", fp8_dtype=E4M3, target="gaudi2", backoff=1.0
    )
    assert float(s) == pytest.approx(3.0 / 240)


@pytest.mark.parametrize("target", ["cpu", "gaudi2", "gaudi3"])
@SETTINGS
@given(a=pos_amax, b=pos_amax)
def test_scales_are_monotone_in_amax(target, a, b):
    lo, hi = sorted((a, b))
    for method in MAXABS_METHODS:
        s_lo = nx.activation_scale(torch.tensor(lo), method, fp8_dtype=E4M3, target=target)
        s_hi = nx.activation_scale(torch.tensor(hi), method, fp8_dtype=E4M3, target=target)
        assert float(s_lo) <= float(s_hi), method
    for method in ("maxabs_hw", "maxabs_pow2", "maxabs_arbitrary"):
        w_lo = nx.weight_scale_from_maxabs(torch.tensor(lo), method, fp8_dtype=E4M3, target=target)
        w_hi = nx.weight_scale_from_maxabs(torch.tensor(hi), method, fp8_dtype=E4M3, target=target)
        assert float(w_lo) <= float(w_hi), method


# --------------------------------------------------------------------------- weight scales


def test_weight_scale_shapes_and_maxabs_equivalence():
    torch.manual_seed(1)
    w = torch.randn(7, 12)
    for method in sorted(nx.SCALE_METHODS):
        s = nx.weight_scale(w, method, fp8_dtype=E4M3, target="gaudi3")
        assert s.dtype == torch.float32
        assert s.shape == ((7,) if nx.weight_is_per_channel(method) else ())
        if "opt" not in method:
            per_channel = nx.weight_is_per_channel(method)
            amax = nx.maxabs(w, dim=0 if per_channel else None)
            from_amax = nx.weight_scale_from_maxabs(amax, method, fp8_dtype=E4M3, target="gaudi3")
            assert torch.equal(s, from_amax), method
    with pytest.raises(Fp8fxError, match="weight_scale"):
        nx.weight_scale_from_maxabs(
            torch.tensor(1.0), "maxabs_pow2_opt_weight", fp8_dtype=E4M3, target="cpu"
        )
    with pytest.raises(MeasurementError, match="per output channel"):
        nx.weight_scale_from_maxabs(
            torch.tensor(1.0), "act_maxabs_hw_weights_pcs_maxabs_pow2", fp8_dtype=E4M3, target="cpu"
        )
    # a per-channel measurement reduces to its max for per-tensor methods
    amax = torch.tensor([0.5, 3.0, 1.0])
    assert torch.equal(
        nx.weight_scale_from_maxabs(amax, "maxabs_pow2", fp8_dtype=E4M3, target="cpu"),
        nx.weight_scale_from_maxabs(torch.tensor(3.0), "maxabs_pow2", fp8_dtype=E4M3, target="cpu"),
    )


def weight_error(w, s, dtype, qmax):
    return float(
        (nx.dequantize_weight(nx.quantize_weight(w, s, dtype, qmax), s) - w).square().sum()
    )


def not_worse(err_opt: float, err_plain: float) -> bool:
    """The search compares errors in float32 (as INC does): equal up to float32 rounding ties."""
    return err_opt <= err_plain * (1 + 1e-5)


@SETTINGS
@given(seed=st.integers(0, 2**16), log_mag=st.integers(-30, 12), heavy=st.booleans())
def test_opt_weight_never_worse_than_maxabs(seed, log_mag, heavy):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 32, generator=g) * 2.0**log_mag
    if heavy:  # a few outliers, where clipping pays off
        w[0, 0] *= 50
    for target, opt, plain in (
        ("cpu", "maxabs_pow2_opt_weight", "maxabs_pow2"),
        ("gaudi3", "maxabs_pow2_opt_weight", "maxabs_pow2"),
        ("gaudi2", "maxabs_hw_opt_weight", "maxabs_hw"),
        ("gaudi3", "maxabs_hw_opt_weight", "maxabs_hw"),
        ("cpu", "act_maxabs_pow2_weights_pcs_opt_pow2", "act_maxabs_pow2_weights_pcs_maxabs_pow2"),
        ("gaudi2", "act_maxabs_hw_weights_pcs_opt_pow2", "act_maxabs_hw_weights_pcs_maxabs_pow2"),
    ):
        qmax = nx.fp8_max(E4M3, target)
        s_opt = nx.weight_scale(w, opt, fp8_dtype=E4M3, target=target)
        s_plain = nx.weight_scale(w, plain, fp8_dtype=E4M3, target=target)
        if s_opt.dim() == 1:  # per channel: never worse channel by channel
            for c in range(w.shape[0]):
                assert not_worse(
                    weight_error(w[c], s_opt[c], E4M3, qmax),
                    weight_error(w[c], s_plain[c], E4M3, qmax),
                )
        else:
            assert not_worse(
                weight_error(w, s_opt, E4M3, qmax), weight_error(w, s_plain, E4M3, qmax)
            ), (target, opt)


def test_opt_weight_is_the_least_error_candidate():
    torch.manual_seed(2)
    w = torch.randn(4, 64) * 0.05
    w[0, 0] = 3.0  # an outlier, where a clipping scale can win
    s_opt = nx.weight_scale(w, "maxabs_pow2_opt_weight", fp8_dtype=E4M3, target="cpu")
    errors = {
        c: weight_error(w, torch.tensor(c), E4M3, 448.0) for c in [2.0**e for e in range(-10, 10)]
    }
    assert all(not_worse(weight_error(w, s_opt, E4M3, 448.0), e) for e in errors.values())
    g2 = nx.weight_scale(w, "maxabs_hw_opt_weight", fp8_dtype=E4M3, target="gaudi2")
    assert all(
        not_worse(weight_error(w, g2, E4M3, 240.0), weight_error(w, torch.tensor(c), E4M3, 240.0))
        for c in nx.hw_scales("gaudi2", E4M3).tolist()
    )


def test_opt_weight_reaches_below_the_fixed_range_for_tiny_weights():
    w = torch.linspace(-1, 1, 256).reshape(4, 64) * 1e-5
    s_opt = nx.weight_scale(w, "maxabs_pow2_opt_weight", fp8_dtype=E4M3, target="cpu")
    assert float(s_opt) < 2.0**-10
    assert weight_error(w, s_opt, E4M3, 448.0) < weight_error(
        w, torch.tensor(2.0**-10), E4M3, 448.0
    )


# -------------------------------------------------------------------- zero and non-finite


@pytest.mark.parametrize("target", ["cpu", "gaudi2", "gaudi3"])
def test_zero_amax_gives_finite_scale(target):
    zero = torch.tensor(0.0)
    expected = {"cpu": 2.0**-126, "gaudi2": 1 / 256, "gaudi3": 2.0**-55}[target]
    assert float(nx.activation_scale(zero, "maxabs_hw", fp8_dtype=E4M3, target=target)) == expected
    for method in MAXABS_METHODS:
        s = nx.activation_scale(zero, method, fp8_dtype=E4M3, target=target)
        assert math.isfinite(float(s)) and float(s) > 0 and math.isfinite(1 / float(s))
        w = nx.weight_scale(torch.zeros(3, 4), method, fp8_dtype=E4M3, target=target)
        assert bool(torch.isfinite(w).all()) and bool((w > 0).all())
        q = nx.quantize_weight(torch.zeros(3, 4), w, E4M3)
        assert not bool(q.float().isnan().any())
    assert float(nx.scale_from_maxabs(zero, 448.0, 0.25)) == nx.SCALE_FLOOR


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_amax_raises_with_location(bad):
    where = "model.layers.0.self_attn.q_proj"
    with pytest.raises(MeasurementError, match=r"non-finite.*q_proj"):
        nx.activation_scale(
            torch.tensor([1.0, bad]), "maxabs_hw", fp8_dtype=E4M3, target="cpu", where=where
        )
    with pytest.raises(MeasurementError, match="non-finite"):
        nx.scale_from_maxabs(torch.tensor(bad), 448.0, 0.5, where=where)
    w = torch.ones(2, 2)
    w[1, 1] = bad
    for method in ("maxabs_pow2", "maxabs_pow2_opt_weight", "act_maxabs_pow2_weights_pcs_opt_pow2"):
        with pytest.raises(MeasurementError, match=r"non-finite.*weight"):
            nx.weight_scale(w, method, fp8_dtype=E4M3, target="cpu", where=where)


def test_other_invalid_inputs():
    with pytest.raises(MeasurementError, match="negative"):
        nx.activation_scale(torch.tensor(-1.0), "maxabs_pow2", fp8_dtype=E4M3, target="cpu")
    with pytest.raises(MeasurementError, match="calibration"):
        nx.activation_scale(None, "maxabs_hw", fp8_dtype=E4M3, target="cpu", where="fc1")
    with pytest.raises(ConfigError, match="backoff"):
        nx.scale_from_maxabs(torch.tensor(1.0), 448.0, 0.0)
    with pytest.raises(ConfigError, match="larger backoff"):
        nx.scale_from_maxabs(torch.tensor(3e38), 448.0, 1e-3)


def test_unknown_method_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        nx.activation_scale(torch.tensor(1.0), "maxabs_pow3", fp8_dtype=E4M3, target="cpu")
    assert "maxabs_pow2" in str(info.value) and "unit_scale" in str(info.value)
    with pytest.raises(ConfigError, match="maxabs_hw"):
        nx.weight_scale(torch.ones(2, 2), "nope", fp8_dtype=E4M3, target="cpu")
    assert (
        float(nx.activation_scale(torch.tensor(1.0), "MAXABS_POW2", fp8_dtype=E4M3, target="cpu"))
        > 0
    )
    assert nx.needs_measurement("maxabs_hw") and not nx.needs_measurement("unit_scale")
