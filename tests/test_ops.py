"""fp8fx.ops and fp8fx.kernels.linear: the fast CPU kernel of ``fp8fx::linear`` against its
reference.

The conversions are exact by construction, so they are compared bit for bit: every one of the
256 codes of both FP8 formats (hypothesis draws tensors of them too, in any layout), every FP8
rounding midpoint and its float32 neighbours for the activation quantization. The GEMM may sum
in another order (float32 GEMM) or round once more (bfloat16 GEMM, more than
``_EXACT_MAX_M`` rows of bfloat16 ``x``); those comparisons use the bound the module docstring
states.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from fp8fx import ops  # registers torch.ops.fp8fx.linear
from fp8fx.kernels import linear as K

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FORMATS = (E4M3, E5M2)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def all_codes(fmt: torch.dtype) -> Tensor:
    return torch.arange(256, dtype=torch.uint8).view(fmt)


def same_bits(got: Tensor, want: Tensor) -> Tensor:
    """Elementwise: identical float32 bit patterns, or both NaN."""
    got, want = got.float(), want.float()
    return (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())


@contextlib.contextmanager
def flush_denormal():
    """Denormals flushed to zero (FTZ/DAZ), as some libraries leave the process."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


# ---- weight conversion ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("flush", [False, True])
def test_fp8_to_float32_is_exact_for_all_256_codes(fmt, flush) -> None:
    codes = all_codes(fmt)
    with flush_denormal() if flush else contextlib.nullcontext():
        got = K.fp8_to_float32(codes)
    want = codes.to(torch.float32)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert bool(same_bits(got, want).all())
    assert int(got.isnan().sum()) == (2 if fmt == E4M3 else 6)  # E5M2: 0x7D-0x7F, 0xFD-0xFF
    # subnormal codes are part of the sweep: the tests above would fail if any were flushed
    sub = want[(want != 0) & (want.abs() < torch.finfo(fmt).smallest_normal)]
    assert sub.numel() == (14 if fmt == E4M3 else 6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_half_bits_times_factor_is_the_value(fmt) -> None:
    """The kernel's own conversion: exact for every non-NaN code; E4M3's NaN codes -> ±1.875."""
    codes = all_codes(fmt)
    half, factor = K.fp8_to_half_bits(codes)
    got = half.to(torch.float32) * factor
    want = codes.to(torch.float32)
    finite_or_inf = ~want.isnan()
    assert bool(same_bits(got[finite_or_inf], want[finite_or_inf]).all())
    if fmt == E4M3:
        assert half[want.isnan()].float().abs().eq(1.875).all()
        assert K.has_nan_codes(codes)
    else:
        assert half[want.isnan()].isnan().all()


@SETTINGS
@given(data=st.data(), fmt=st.sampled_from(FORMATS), rows=st.integers(1, 9),
       cols=st.integers(1, 40), transposed=st.booleans())
def test_fp8_to_float32_property(data, fmt, rows, cols, transposed) -> None:
    raw = data.draw(st.lists(st.integers(0, 255), min_size=rows * cols, max_size=rows * cols))
    w = torch.tensor(raw, dtype=torch.uint8).view(fmt).reshape(rows, cols)
    if transposed:
        w = w.t()
    got = K.fp8_to_float32(w)
    assert bool(same_bits(got, w.to(torch.float32)).all())
    has_nan = bool(w.to(torch.float32).isnan().any()) and fmt == E4M3
    assert K.has_nan_codes(w) is has_nan


def test_nan_scan_is_remembered_until_the_weight_changes() -> None:
    w = torch.zeros(4, 8, dtype=E4M3)
    assert K.has_nan_codes(w) is False and K.has_nan_codes(w) is False
    w.view(torch.uint8)[2, 3] = 0x7F  # an in-place write bumps the version counter
    assert K.has_nan_codes(w) is True


@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_nan_code_rows(code) -> None:
    w = torch.zeros(5, 7, dtype=torch.uint8)
    w[3, 6] = code
    assert K._nan_code_rows(w.view(E4M3)).tolist() == [False, False, False, True, False]


# ---- activation quantization ---------------------------------------------------------------


def _grid_probe(fmt: torch.dtype) -> Tensor:
    """Every finite code, every midpoint between neighbours and the float32 values around each."""
    vals = all_codes(fmt).to(torch.float32)
    vals = vals[vals.isfinite()].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-45, -1e-45,
                            1e-40, 3e38, -3e38])
    return torch.cat([vals, mids, mids.nextafter(up), mids.nextafter(down), special])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fp8_max", [None, 240.0, 3.0])
def test_quantize_activation_fast_hits_every_midpoint(fmt, fp8_max) -> None:
    fp8_max = fp8_max or float(torch.finfo(fmt).max)
    x = _grid_probe(fmt)
    for scale in (1.0, 0.75, 2.0**-20):
        s = torch.tensor(scale)
        want = K.quantize_activation(x * scale, s, fmt, fp8_max).to(torch.float32)
        got = K.quantize_activation_fast(x * scale, s, fmt, fp8_max)
        bad = ~same_bits(got, want)
        assert not bool(bad.any()), (scale, x[bad][:5].tolist(), got[bad][:5].tolist())


@SETTINGS
@given(fmt=st.sampled_from(FORMATS),
       xs=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
                   min_size=1, max_size=64),
       scale=st.floats(2.0**-27, 2.0**13, width=32), bf16=st.booleans())
def test_quantize_activation_fast_property(fmt, xs, scale, bf16) -> None:
    x = torch.tensor(xs, dtype=torch.float32)
    if bf16:
        x = x.to(torch.bfloat16)
    s = torch.tensor(scale, dtype=torch.float32)
    fp8_max = float(torch.finfo(fmt).max)
    want = K.quantize_activation(x, s, fmt, fp8_max).to(torch.float32)
    assert bool(same_bits(K.quantize_activation_fast(x, s, fmt, fp8_max), want).all())


# ---- the linear kernel ---------------------------------------------------------------------


def _layer(fmt, n, k, per_channel, bias_dtype, seed, special=()):
    g = torch.Generator().manual_seed(seed)
    fp8_max = float(torch.finfo(fmt).max)
    w = (torch.randn(n, k, generator=g) * fp8_max / 4).clamp(-fp8_max, fp8_max).to(fmt)
    for (r, c), code in special:  # raw codes: NaN, inf, subnormals
        w.view(torch.uint8)[r, c] = code
    ws = (torch.rand(n, generator=g) + 0.5) * 1e-3 if per_channel else torch.tensor(7e-4)
    b = None if bias_dtype is None else torch.randn(n, generator=g).to(bias_dtype)
    return w, ws, torch.tensor(3.0 / fp8_max), b, fp8_max


def _check(got: Tensor, want: Tensor, x: Tensor, w, ws, xs, rows: int) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    assert bool((got.isnan() == want.isnan()).all())
    ok = ~want.isnan()
    if x.dtype == torch.bfloat16 and rows > K._EXACT_MAX_M and K.cpu_has_bf16():
        # one extra rounding of acc * s to bfloat16 (half an ulp: <= 2**-8 relative) before
        # the bias; the final roundings of both results add up to one ulp of y
        acc = K.linear_reference(x.float(), w, ws, xs, None, float(torch.finfo(w.dtype).max))
        bound = 2.0**-8 * acc.abs() + 2.0**-7 * want.float().abs()
        assert bool(((got.float() - want.float()).abs()[ok] <= bound[ok] + 1e-30).all())
    elif want.dtype == torch.float32:  # float32 GEMM: only the summation order differs
        atol = 1e-6 * float(want[ok].abs().max())
        torch.testing.assert_close(got[ok], want[ok], rtol=1e-5, atol=atol)
    else:  # float32 GEMM, output rounded to bfloat16: at most one bfloat16 ulp apart
        torch.testing.assert_close(got[ok].float(), want[ok].float(), rtol=2.0**-7, atol=0.0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 96])
def test_linear_fast_matches_reference(fmt, dtype, rows) -> None:
    # k, n not multiples of anything; blocks of 8 weight rows: 5 blocks, the last one short
    k, n = 70, 37
    for per_channel, bias in ((False, None), (True, dtype)):
        w, ws, xs, b, fp8_max = _layer(fmt, n, k, per_channel, bias, seed=rows)
        x = (torch.randn(rows, k) * 2).to(dtype)  # |x| above 3 saturates
        with mock.patch.object(K, "_BLOCK_ELEMS", 8 * k), \
                mock.patch.object(K, "_MIN_GEMM_ROWS", 8):
            got = K.linear_fast(x, w, ws, xs, b, fp8_max)
        want = K.linear_reference(x, w, ws, xs, b, fp8_max)
        _check(got, want, x, w, ws, xs, rows)


def test_linear_fast_3d_input_and_fast_activation_path() -> None:
    w, ws, xs, b, fp8_max = _layer(E4M3, 24, 64, True, torch.float32, seed=1)
    x = torch.randn(2, K._FAST_QUANT_MIN_NUMEL // 64 + 5, 64)
    with mock.patch.object(K, "_BLOCK_ELEMS", 4 * 64 * 100):  # activation blocks of 100 rows
        got = K.linear_fast(x, w, ws, xs, b, fp8_max)
    want = K.linear_reference(x, w, ws, xs, b, fp8_max)
    _check(got, want, x, w, ws, xs, rows=x.shape[0] * x.shape[1])


@pytest.mark.parametrize("rows", [1, 9])
def test_nan_codes_give_nan_output_columns(rows) -> None:
    special = [((2, 5), 0x7F), ((6, 0), 0xFF)]
    w, ws, xs, b, fp8_max = _layer(E4M3, 8, 16, False, None, seed=2, special=special)
    x = torch.randn(rows, 16).to(torch.bfloat16)
    got = K.linear_fast(x, w, ws, xs, b, fp8_max)
    want = K.linear_reference(x, w, ws, xs, b, fp8_max)
    assert got.isnan().any(0).tolist() == want.isnan().any(0).tolist()
    assert got.isnan().any(0).tolist() == [i in (2, 6) for i in range(8)]
    _check(got, want, x, w, ws, xs, rows)


def test_e5m2_inf_and_nan_codes_follow_the_reference() -> None:
    special = [((1, 3), 0x7C), ((4, 4), 0xFC), ((5, 2), 0x7E)]  # +inf, -inf, NaN
    w, ws, xs, b, fp8_max = _layer(E5M2, 6, 8, False, None, seed=3, special=special)
    x = torch.randn(2, 8)
    got = K.linear_fast(x, w, ws, xs, b, fp8_max)
    want = K.linear_reference(x, w, ws, xs, b, fp8_max)
    assert bool(((got == want) | (got.isnan() & want.isnan())).all()) or bool(
        torch.isclose(got, want, rtol=1e-5, equal_nan=True).all())
    assert not bool(want[:, [1, 4, 5]].isfinite().any())


@pytest.mark.parametrize("fmt", FORMATS)
def test_subnormal_codes_survive_flushed_denormals(fmt) -> None:
    sub = [((r, r), code) for r, code in enumerate((0x01, 0x07, 0x81, 0x03))]
    w, ws, xs, b, fp8_max = _layer(fmt, 4, 8, False, None, seed=4, special=sub)
    w.view(torch.uint8)[:, 4:] = 0
    x = torch.randn(1, 8)
    want = K.linear_reference(x, w, ws, xs, b, fp8_max)
    with flush_denormal():
        got = K.linear_fast(x, w, ws, xs, b, fp8_max)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)


def test_op_runs_the_fast_kernel_and_falls_back_where_it_must() -> None:
    w, ws, xs, b, fp8_max = _layer(E4M3, 5, 12, False, None, seed=5)
    x = torch.randn(3, 12)
    with mock.patch.object(K, "linear_reference", wraps=K.linear_reference) as ref:
        torch.ops.fp8fx.linear(x, w, ws, xs, b, fp8_max)
        assert ref.call_count == 0
        # fp8_max above the format's max: the reference's own cast decides what 460 becomes
        got = torch.ops.fp8fx.linear(x * 1e3, w, ws, xs, b, 460.0)
        empty = torch.ops.fp8fx.linear(x[:0], w, ws, xs, b, fp8_max)
        assert ref.call_count == 2
    assert empty.shape == (0, 5)
    want = K.linear_reference(x * 1e3, w, ws, xs, b, 460.0)
    assert bool(same_bits(got, want).all())


def test_weight_must_be_fp8() -> None:
    from fp8fx.errors import QuantizationError

    with pytest.raises(QuantizationError, match="float8_e4m3fn or float8_e5m2"):
        K.linear_fast(torch.randn(1, 4), torch.randn(2, 4), torch.tensor(1.0),
                        torch.tensor(1.0), None, 448.0)


def test_ops_registers_and_reexports_the_kernels() -> None:
    """fp8fx.ops only registers the op; the kernels it names are fp8fx.kernels.linear's."""
    for name in ("linear_reference", "linear_fast", "quantize_activation",
                 "quantize_activation_fast", "fp8_to_float32", "fp8_to_half_bits", "has_nan_codes"):
        assert getattr(ops, name) is getattr(K, name), name
    assert ops._cpu_has_bf16 is K.cpu_has_bf16  # benchmarks/linear.py reads it here


def test_nan_code_mask_is_exactly_the_nan_codes() -> None:
    codes = all_codes(E4M3)
    assert torch.equal(K._nan_code_mask(codes), codes.to(torch.float32).isnan())


# ---- the few-row GEMV (fp8fx.kernels.gemv): C++ kernel and torch fallback -------------------

from fp8fx.errors import QuantizationError  # noqa: E402
from fp8fx.kernels import gemv as G  # noqa: E402
from fp8fx.fp8 import FORMATS as FP8_FORMATS  # noqa: E402
from fp8fx.numerics import quantize_fp32  # noqa: E402


@contextlib.contextmanager
def _isa_body(level: int):
    """The C++ kernel with one ISA body forced (1: AVX2, 2: AVX512), restored afterwards."""
    if not G.available():
        pytest.skip(f"C++ GEMV not in use: {G.status()}")
    if level == 2 and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the AVX512 body needs an AVX512 CPU")
    torch.ops.fp8fx_cpp.set_level(level)
    try:
        yield G.gemv_fp8
    finally:
        torch.ops.fp8fx_cpp.set_level(G._isa_level()[0])


@contextlib.contextmanager
def _gemv_path(path: str):
    if path == "torch":
        yield G.gemv_fp8_torch
    else:
        with _isa_body(2 if path == "cpp_avx512" else 1) as fn:
            yield fn


GEMV_PATHS = ["cpp_avx512", "cpp_avx2", "torch"]


def _exact_product(x: Tensor, w: Tensor) -> Tensor:
    """float64 product of the exact values, NaN where the reference's float32 product is NaN."""
    y = x.double() @ w.to(torch.float32).double().t()
    ref = x @ w.to(torch.float32).t()
    return torch.where(ref.isnan(), float("nan"), y)


@pytest.mark.parametrize("path", GEMV_PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 2, 4, 5, 17])
def test_gemv_all_codes_and_tails(path, fmt, m) -> None:
    """Every code of the format in the weight (NaN, inf, subnormals included), K and N off every
    vector and tile width, M off the row tiles: NaN exactly where the float32 product has it,
    the rest within float32 summation error of the exact sum."""
    n, k = 11, 256 + 21
    w = torch.zeros(n * k, dtype=torch.uint8)
    w[torch.randperm(n * k, generator=torch.Generator().manual_seed(m))[:256]] = torch.arange(
        256, dtype=torch.uint8)
    w = w.view(fmt).reshape(n, k)
    if fmt == E5M2:  # inf codes meeting x of both signs would give NaN anyway: keep them finite
        w.view(torch.uint8)[(w.view(torch.uint8) & 0x7F) >= 0x7C] = 0x3C
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(100 + m)).to(fmt).float()
    with _gemv_path(path) as fn:
        got = fn(x, w)
    want = _exact_product(x, w)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert got.isnan().tolist() == want.isnan().tolist()
    ok = ~want.isnan()
    bound = 1e-6 * (x.abs().double() @ w.float().abs().double().t())[ok] + 1e-30
    assert bool(((got.double()[ok] - want[ok]).abs() <= bound).all())
    if fmt == E4M3:  # the codes were spread over every row: each NaN code makes its column NaN
        rows = ((w.view(torch.uint8) & 0x7F) == 0x7F).any(1)
        assert got.isnan().all(0).tolist() == rows.tolist()


@pytest.mark.parametrize("path", GEMV_PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemv_subnormal_codes_survive_flushed_denormals(path, fmt) -> None:
    codes = torch.tensor([[0x01, 0x02, 0x07, 0x81, 0x03, 0x85, 0, 0x06] * 3], dtype=torch.uint8)
    w = codes.view(fmt)
    x = torch.ones(1, w.shape[1])
    want = _exact_product(x, w).float()
    with _gemv_path(path) as fn, flush_denormal():
        got = fn(x, w)
    assert bool(same_bits(got, want).all()) and float(want.abs().max()) > 0


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("flush", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_dequant_is_exact_for_all_256_codes(level, fmt, flush, dtype) -> None:
    """The C++ conversion ops (Inductor's M > 16 path, float32 and bfloat16 output), each ISA
    body: bit for bit the FP8 cast, NaN codes NaN, subnormal codes exact with denormals
    flushed; rows off the vector width (a tail) and longer than the bfloat16 op's 512-value
    chunk too."""
    with _isa_body(level):
        op = G.cpp_dequant_op(dtype)
        long_row = all_codes(fmt).repeat(3)[None, :700]
        for codes in [all_codes(fmt).reshape(shape) for shape in ((16, 16), (8, 32), (32, 8), (256, 1))] + [long_row]:
            with flush_denormal() if flush else contextlib.nullcontext():
                got = op(codes)
            assert got.dtype == dtype and got.shape == codes.shape
            assert bool(same_bits(got, codes.to(dtype)).all()), codes.shape


def test_cpp_dequant_takes_float32_or_bfloat16_only() -> None:
    with pytest.raises(QuantizationError, match="float32 or bfloat16"):
        G.cpp_dequant_op(torch.float16)


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
def test_cpp_codes_are_the_fp8_cast_bit_for_bit(level, fmt) -> None:
    """``fp8fx_cpp::fp8_codes`` (the prefill activation quantization), each ISA body, against
    ``quantize_fp32(...).float()``: every FP8 value, every midpoint between neighbours and one
    float32 ulp either side of both (ties to even), random values at nine scales, zeros of both
    signs, NaN, inf and a tiny value; one scale per tensor and one per row; E4M3 at Gaudi2's 240."""
    finite = all_codes(fmt).float()
    finite = finite[torch.isfinite(finite)].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    parts = [torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -3e-39])]
    for t in (finite, mids):
        parts += [t, torch.nextafter(t, torch.full_like(t, 1e9)), torch.nextafter(t, torch.full_like(t, -1e9))]
    g = torch.Generator().manual_seed(0)
    parts += [torch.randn(4096, generator=g) * 10.0**e for e in range(-5, 4)]
    x = torch.cat(parts)
    x = torch.cat([x, torch.zeros(-x.numel() % 64)]).reshape(-1, 64)  # rows of 64 (vector tails too below)
    with _isa_body(level):
        for fp8_max in {FP8_FORMATS[fmt].max, 240.0 if fmt == E4M3 else FP8_FORMATS[fmt].max}:
            for scale in (torch.tensor(1.0), torch.tensor(0.37), torch.rand(x.shape[0], 1, generator=g) + 0.01):
                for xs in (x, x[:, :61], x.bfloat16()):
                    got = G.codes(xs, scale, fmt, fp8_max)
                    want = quantize_fp32(xs, scale, fmt, fp8_max).float()
                    assert got.dtype == torch.float32 and bool(same_bits(got, want).all()), (fp8_max, scale.shape)


@pytest.mark.parametrize("path", GEMV_PATHS)
@pytest.mark.parametrize("k", [1, 15, 16, 48, 63, 64, 65, 80, 127, 128, 200])
def test_gemv_one_row_every_width(path, k) -> None:
    """One activation row (the address-order read: 64-weight steps, then 16-weight chunks, then a
    zero-padded tail): every split of K between the three, a NaN code in the last weight of a
    row, within float32 summation error of the exact sum elsewhere."""
    g = torch.Generator().manual_seed(k)
    w = (torch.randn(5, k, generator=g) * 30).to(E4M3)
    w.view(torch.uint8)[3, k - 1] = 0x7F  # NaN code at the very end: found after the tail
    x = torch.randn(1, k, generator=g).to(E4M3).float()
    with _gemv_path(path) as fn:
        got = fn(x, w)
    want = _exact_product(x, w)
    assert got.isnan().tolist() == want.isnan().tolist() == [[False, False, False, True, False]]
    ok = ~want.isnan()
    bound = 1e-6 * (x.abs().double() @ w.float().abs().double().t())[ok] + 1e-30
    assert bool(((got.double()[ok] - want[ok]).abs() <= bound).all())


@pytest.mark.parametrize("path", GEMV_PATHS)
def test_gemv_empty_and_per_row_results(path) -> None:
    w = torch.randn(6, 33).to(E4M3)
    with _gemv_path(path) as fn:
        assert fn(torch.randn(0, 33), w).shape == (0, 6)
        assert fn(torch.randn(2, 33), w[:0]).shape == (2, 0)
        assert bool((fn(torch.randn(3, 0), w[:, :0]) == 0).all())
        x = torch.randn(3, 33)
        torch.testing.assert_close(fn(x, w)[1:2], fn(x[1:2], w), rtol=1e-6, atol=1e-6)


def test_gemv_checks_its_inputs() -> None:
    w = torch.randn(4, 8).to(E4M3)
    with pytest.raises(QuantizationError, match="float8_e4m3fn or float8_e5m2"):
        G.gemv_fp8(torch.randn(1, 8), w.float())
    with pytest.raises(QuantizationError, match="float32 x"):
        G.gemv_fp8(torch.randn(1, 8).bfloat16(), w)
    with pytest.raises(QuantizationError, match=r"\(1, 9\)"):
        G.gemv_fp8(torch.randn(1, 9), w)


def test_gemv_status_names_the_path() -> None:
    assert G.status().startswith("C++ kernel" if G.available() else "torch fallback")
    if G.available():
        assert G.cpp_op() is torch.ops.fp8fx_cpp.gemv_fp8


def test_gemv_env_switch_turns_the_cpp_kernel_off() -> None:
    script = ("import os; os.environ['FP8FX_CPP_KERNELS'] = '0'\n"
              "from fp8fx.kernels import gemv\n"
              "assert not gemv.available() and 'FP8FX_CPP_KERNELS=0' in gemv.status()\n")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("available", [True, False])
@pytest.mark.parametrize("rows", [1, 4, 16, 17])
def test_linear_fast_few_rows_with_and_without_the_cpp_gemv(available, rows) -> None:
    """The eager kernel's few-row path (the C++ ``qgemv``) and its fallback agree with the
    reference; per-channel scale, bias and NaN codes included."""
    if available and not G.available():
        pytest.skip(f"C++ GEMV not in use: {G.status()}")
    special = [((3, 7), 0x7F)]
    w, ws, xs, b, fp8_max = _layer(E4M3, 21, 50, True, torch.float32, seed=rows, special=special)
    x = torch.randn(rows, 50) * 2
    with mock.patch.object(G, "available", lambda: available), \
            mock.patch.object(G, "qgemv_op", wraps=G.qgemv_op) as spy:
        got = K.linear_fast(x, w, ws, xs, b, fp8_max)
    assert spy.call_count == int(available and rows <= K._GEMV_MAX_M)
    want = K.linear_reference(x, w, ws, xs, b, fp8_max)
    _check(got, want, x, w, ws, xs, rows)
    assert got.isnan().all(0).tolist() == [i == 3 for i in range(21)]


def test_cpu_has_bf16_follows_the_capability_cap() -> None:
    K.cpu_has_bf16.cache_clear()
    try:
        with mock.patch.object(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2"):
            assert K.cpu_has_bf16() is False
        K.cpu_has_bf16.cache_clear()
        with mock.patch.dict("os.environ", {"ONEDNN_MAX_CPU_ISA": "AVX2"}):
            assert K.cpu_has_bf16() is False
    finally:
        K.cpu_has_bf16.cache_clear()


def _qgemv_in_torch(x, w, ws, xs, b, fp8_max, mode):
    """``qgemv``'s definition in torch ops, in its order of float32 operations."""
    from fp8fx.kernels.schemes import AMAX_FLOOR
    from fp8fx.numerics import saturate_cast

    x32 = x.float()
    if mode == "none":
        q, s = x32, None
    else:
        if mode == "static":
            s = xs.float().reshape(1, 1)
        else:
            a = x32.abs()
            amax = a.amax(-1, keepdim=True) if mode == "token" else a.amax().reshape(1, 1)
            s = amax.clamp_min(AMAX_FLOOR) / fp8_max
        q = saturate_cast(x32 / s, w.dtype, fp8_max).float()
    acc = G.gemv_fp8(q, w)
    wsr = ws.float().reshape(1, -1)
    if mode == "static":
        acc = acc * (s * wsr)
    elif mode == "none":
        acc = acc * wsr
    else:
        acc = (acc * wsr) * s
    if b is not None:
        acc = acc + b.float()
    return acc.to(x.dtype)


@pytest.mark.parametrize("mode", ["static", "token", "tensor", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", [E4M3, torch.float8_e5m2])
def test_qgemv_is_its_torch_definition_bit_for_bit(mode, dtype, fmt) -> None:
    """The fused few-row kernel (quantization + GEMV + epilogue in C++) gives exactly what the
    same float32 operations in torch give: same FP8 codes (c10's rounding, saturation), same
    scales, same epilogue order; NaN and inf rows, an all-zero row, a K no vector divides."""
    if not G.available():
        pytest.skip(f"C++ kernel not in use: {G.status()}")
    g = torch.Generator().manual_seed(5)
    n, k = 37, 45
    w = (torch.randn(n, k, generator=g) * 3).to(fmt)
    ws = torch.rand(n, generator=g) * 0.1 + 0.01
    b = torch.randn(n, generator=g).to(dtype)
    x = (torch.randn(5, k, generator=g) * 40).to(dtype)
    x[1] = 0
    if mode != "tensor":  # one non-finite row poisons every row of a per-tensor scale
        x[2, 3] = float("nan")
        x[3, 7] = float("inf")
    fp8_max = float(torch.finfo(fmt).max)
    xs = torch.tensor(0.25) if mode == "static" else None
    for scale in (ws, ws[:1].reshape(())):
        for bias in (b, None):
            got = G.qgemv_op()(x, w, scale, xs, bias, fp8_max, G.QGEMV_MODES[mode], 1e-12)
            want = _qgemv_in_torch(x, w, scale, xs, bias, fp8_max, mode)
            assert got.dtype == dtype
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_qgemv_checks_its_inputs() -> None:
    if not G.available():
        pytest.skip(f"C++ kernel not in use: {G.status()}")
    w = torch.zeros(4, 8).to(E4M3)
    op = G.qgemv_op()
    with pytest.raises(RuntimeError, match="x_scale goes with mode 0"):
        op(torch.randn(1, 8), w, torch.ones(4), None, None, 448.0, 0, 1e-12)
    with pytest.raises(RuntimeError, match="w_scale must be one value or"):
        op(torch.randn(1, 8), w, torch.ones(3), None, None, 448.0, 1, 1e-12)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        op(torch.randn(1, 8).double(), w, torch.ones(4), None, None, 448.0, 1, 1e-12)
