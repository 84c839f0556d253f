"""fp8fx.testing: assert_quantized, assert_close / sqnr, the hypothesis strategies, and the guide.

The attention kinds may or may not be quantizable in a given version, so the count checks
read what ``fp8fx.report`` says instead of hard-coding it; the failures that must list a
reason use a blocklisted node, which is skipped in every version.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fp8fx
from fp8fx.numerics import dequantize, quantize
from fp8fx.passes.match import OpKind
from fp8fx.testing import (KINDS, activations, assert_close, assert_quantized, default_min_sqnr_db, shapes,
                           sqnr)
from tiny_models import EagerAttention, TwoLinear, tiny_llama

ROOT = Path(__file__).resolve().parent.parent


def _calibrate_convert(model, tmp_path, example, **cfg_kwargs):
    cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "measure"), **cfg_kwargs)
    fp8fx.prepare(model, cfg)
    with torch.no_grad():
        for _ in range(2):
            model(**example) if isinstance(example, dict) else model(example)
    fp8fx.finalize_calibration(model)
    return fp8fx.convert(model), cfg


@pytest.fixture(scope="module")
def attention(tmp_path_factory):
    """EagerAttention converted with its output projection blocklisted."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("attn")
    model, cfg = _calibrate_convert(EagerAttention(), tmp, torch.randn(2, 8, 32), blocklist={"names": ["^out$"]})
    return model, cfg


def _counts(model) -> dict[str, int]:
    return {k: fp8fx.report(model)["nodes_quantized"].get(k, 0) for k in KINDS}


# ------------------------------------------------------------------------------ assert_quantized
def test_assert_quantized_passes_and_returns_every_kind(attention):
    model, _ = attention
    counts = _counts(model)
    assert counts["linear"] == 1                    # qkv; out is blocklisted
    assert assert_quantized(model, expect={"linear": 1}) == counts
    assert assert_quantized(model, expect={OpKind.LINEAR: 1}) == counts   # OpKind keys work too
    assert assert_quantized(torch.compile(model), expect={"linear": 1}) == counts  # a compile wrapper


def test_wrong_count_lists_skipped_nodes_with_reasons(attention):
    model, _ = attention
    with pytest.raises(AssertionError) as info:
        assert_quantized(model, expect={"linear": 2})
    msg = str(info.value)
    assert "EagerAttention" in msg
    assert "linear: expected 2, got 1 quantized, 1 not quantized" in msg
    assert "out: blocklist names: '^out$' matches 'out'" in msg
    assert "all kinds: quantized" in msg
    for kind in ("matmul", "softmax"):              # kinds that were not asked about are not reported
        assert f"  {kind}: expected" not in msg


def test_every_kind_is_checked_the_same_way(attention):
    """Whatever this version does with matmul/softmax: the true count passes, any other fails
    and the message lists the kind's unquantized nodes with their reasons."""
    model, _ = attention
    rep = fp8fx.report(model)
    for kind in ("matmul", "softmax"):
        n = rep["nodes_quantized"].get(kind, 0)
        assert_quantized(model, expect={kind: n})
        with pytest.raises(AssertionError) as info:
            assert_quantized(model, expect={kind: n + 1})
        msg = str(info.value)
        assert f"{kind}: expected {n + 1}, got {n} quantized" in msg
        skipped = [s for s in rep["skipped"] if s["kind"] == kind]
        for s in skipped:
            assert f"{s['name']}: {s['reason']}" in msg
        if not skipped:
            assert f"fp8fx found no other {kind} node" in msg


def test_too_many_quantized_lists_them(attention):
    model, _ = attention
    with pytest.raises(AssertionError, match=r"linear: expected 0, got 1 quantized(.|\n)*quantized:\n      qkv"):
        assert_quantized(model, expect={"linear": 0})


def test_exact_requires_zero_for_kinds_not_named(attention):
    model, _ = attention
    counts = _counts(model)
    assert_quantized(model, expect={k: n for k, n in counts.items() if n}, exact=True)
    with pytest.raises(AssertionError, match=r"linear: expected 0 \(exact=True\), got 1 quantized"):
        assert_quantized(model, expect={k: n for k, n in counts.items() if n and k != "linear"}, exact=True)
    with pytest.raises(AssertionError, match=r"linear: expected 2, got 1 quantized") as info:
        assert_quantized(model, expect={OpKind.LINEAR: 2}, exact=True)
    assert "linear: expected 2 (exact=True)" not in str(info.value)   # linear was named, as an OpKind


def test_sdpa_and_kv_cache_kinds_on_tiny_llama(tmp_path):
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    _calibrate_convert(model, tmp_path, {"input_ids": ids}, blocklist={"types": ["sdpa"]})
    counts = assert_quantized(model, expect={"linear": 8, "sdpa": 0})   # 7 projections + lm_head
    with pytest.raises(AssertionError) as info:
        assert_quantized(model, expect={"sdpa": 1, "kv_cache": counts["kv_cache"]})
    msg = str(info.value)
    assert "sdpa: expected 1, got 0 quantized, 1 not quantized" in msg
    assert "model.layers.0.self_attn.sdpa_0: blocklist types contains 'sdpa'" in msg
    assert "kv_cache: expected" not in msg


def test_model_not_converted_is_a_clear_error(tmp_path, attention):
    with pytest.raises(fp8fx.Fp8fxError, match="TwoLinear was not converted by fp8fx; call fp8fx.convert"):
        assert_quantized(TwoLinear(), expect={"linear": 2})
    prepared = fp8fx.prepare(TwoLinear(), fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m")))
    with pytest.raises(fp8fx.Fp8fxError, match=r"prepared for calibration \(MEASURE\) but not converted"):
        assert_quantized(prepared, expect={"linear": 2})
    _, cfg = attention  # its measurement files: a fresh model converts on its first call
    pending = fp8fx.convert(EagerAttention(), cfg.replace(mode="QUANTIZE"))
    with pytest.raises(fp8fx.Fp8fxError, match="converted on its first call"):
        assert_quantized(pending, expect={"linear": 1})
    with pytest.raises(fp8fx.Fp8fxError, match="needs the nn.Module"):
        assert_quantized(torch.zeros(1), expect={"linear": 1})


def test_bad_expectations_are_usage_errors(attention):
    model, _ = attention
    with pytest.raises(fp8fx.Fp8fxError, match="unknown kind 'attention'.*linear, matmul, softmax, sdpa, kv_cache"):
        assert_quantized(model, expect={"attention": 1})
    for bad in (-1, 1.5, True):
        with pytest.raises(fp8fx.Fp8fxError, match=r"expect\['linear'\] must be a count"):
            assert_quantized(model, expect={"linear": bad})
    with pytest.raises(fp8fx.Fp8fxError, match="nothing to check"):
        assert_quantized(model)


# --------------------------------------------------------------------------- sqnr / assert_close
def test_default_threshold_is_the_one_cast_worst_case():
    assert default_min_sqnr_db() == pytest.approx(6.0206 * 4, abs=1e-3)          # E4M3: 24.08 dB
    assert default_min_sqnr_db("e5m2") == pytest.approx(6.0206 * 3, abs=1e-3)    # E5M2: 18.06 dB
    assert default_min_sqnr_db(torch.float8_e5m2) == default_min_sqnr_db(fp8fx.Fp8Format.E5M2)
    with pytest.raises(fp8fx.Fp8fxError, match="unknown FP8 format 'e3m4'"):
        default_min_sqnr_db("e3m4")


def test_sqnr_values():
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert sqnr(x * 1.1, x) == pytest.approx(20.0)           # noise power = 1% of the signal
    assert sqnr(x, x) == math.inf
    assert sqnr(torch.zeros(3), torch.zeros(3)) == math.inf
    assert sqnr(torch.ones(3), torch.zeros(3)) == -math.inf
    with pytest.raises(fp8fx.Fp8fxError, match=r"shapes differ: actual \(2,\), expected \(3,\)"):
        sqnr(torch.zeros(2), torch.zeros(3))
    with pytest.raises(fp8fx.Fp8fxError, match="expected has 1 non-finite value"):
        sqnr(torch.zeros(2), torch.tensor([0.0, float("inf")]))


def test_assert_close_passes_one_fp8_cast_and_fails_low_sqnr():
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    s = x.abs().max() / 448
    value = assert_close(dequantize(quantize(x, s, torch.float8_e4m3fn), s), x)
    assert 28 < value < 35                                   # a typical cast: about 31.5 dB
    noisy = x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))   # ~14 dB
    with pytest.raises(AssertionError, match=r"SQNR 1\d\.\d\d dB < min_sqnr_db 24\.08 dB \(default for e4m3\); "
                                             r"largest error .* at \(\d+, \d+\)"):
        assert_close(noisy, x)
    assert_close(noisy, x, min_sqnr_db=10)
    with pytest.raises(AssertionError, match="my layer"):
        assert_close(noisy, x, min_sqnr_db=20, msg="my layer")


def test_assert_close_fails_on_nonfinite_naming_them():
    x = torch.ones(3, 4)
    bad = x.clone()
    bad[1, 2] = float("nan")
    bad[2, 0] = float("inf")
    with pytest.raises(AssertionError, match=r"actual has 2 non-finite value\(s\) \(1 NaN, 1 inf\) of 12: "
                                             r"\(1, 2\) = nan, \(2, 0\) = inf"):
        assert_close(bad, x)
    with pytest.raises(AssertionError, match=r"expected has 4 non-finite value\(s\) \(4 NaN, 0 inf\) of 12: "
                                             r"\(0, 0\) = nan, \(0, 1\) = nan, \(0, 2\) = nan, \(0, 3\) = nan$"):
        assert_close(x, torch.tensor([[float("nan")] * 4, [1.0] * 4, [1.0] * 4]))
    with pytest.raises(AssertionError, match="non-finite"):                 # NaN == NaN is no pass
        assert_close(bad, bad)


def test_assert_close_fails_on_shape_dtype_and_zero_reference():
    x = torch.randn(4, 4)
    with pytest.raises(AssertionError, match=r"shapes differ: actual \(4,\), expected \(4, 4\)"):
        assert_close(x[0], x)
    with pytest.raises(AssertionError, match="dtypes differ: actual torch.bfloat16, expected torch.float32"):
        assert_close(x.bfloat16(), x)
    assert assert_close(x.bfloat16(), x, check_dtype=False) > 40
    with pytest.raises(AssertionError, match="SQNR -inf dB"):
        assert_close(torch.ones(3), torch.zeros(3))
    assert assert_close(torch.zeros(3), torch.zeros(3)) == math.inf
    with pytest.raises(AssertionError, match="actual is a list, not a torch.Tensor"):
        assert_close([1.0], torch.ones(1))


def test_assert_close_on_nested_outputs():
    x = torch.randn(8, 8)
    assert assert_close((x, {"a": x * 2}), (x, {"a": x * 2})) == math.inf
    with pytest.raises(AssertionError, match=r"output\[1\]\['a'\]: SQNR"):
        assert_close((x, {"a": x}), (x, {"a": x + 1}))
    with pytest.raises(AssertionError, match="lengths differ"):
        assert_close((x,), (x, x))
    with pytest.raises(AssertionError, match="keys differ"):
        assert_close({"a": x}, {"b": x})


def test_e5m2_threshold():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    s = x.abs().max() / 57344
    q = dequantize(quantize(x, s, torch.float8_e5m2), s)
    assert 22 < assert_close(q, x, fmt="e5m2") < 30          # about 25.6 dB, above 18.06 dB
    assert assert_close(x * 1.1, x, fmt="e5m2") == pytest.approx(20.0)   # 20 dB passes E5M2 ...
    with pytest.raises(AssertionError, match=r"SQNR 20\.00 dB < min_sqnr_db 24\.08 dB \(default for e4m3\)"):
        assert_close(x * 1.1, x)                             # ... but not E4M3
    with pytest.raises(AssertionError, match=r"min_sqnr_db 18\.06 dB \(default for e5m2\)"):
        assert_close(x * 1.2, x, fmt=torch.float8_e5m2)      # 15.6 dB


# --------------------------------------------------------------------------------- strategies
@settings(max_examples=60, deadline=None)
@given(x=activations(dtype=(torch.float32, torch.bfloat16, torch.float16)))
def test_one_fp8_cast_of_any_activation_passes_the_default(x):
    """The default threshold is a worst case: one scaled cast never misses it."""
    ref = x.float()
    s = ref.abs().max().clamp(min=2.0**-126) / 448
    assert_close(dequantize(quantize(ref, s, torch.float8_e4m3fn), s), ref)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), shape=shapes(min_dims=2, max_dims=3, max_side=12),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_activations_respect_their_arguments(data, shape, dtype):
    rng = torch.get_rng_state()
    x = data.draw(activations(shape=shape, dtype=dtype, max_abs=(0.5, 8.0), zeros=(0.25, 0.5)))
    assert torch.equal(torch.get_rng_state(), rng)           # seeded by hypothesis, not torch's RNG
    assert x.shape == shape and x.dtype == dtype
    assert torch.isfinite(x).all()
    assert x.abs().max().item() <= 8.0 * (1 + 2**-7)         # max_abs, up to rounding to dtype
    assert int((x == 0).sum()) >= round(0.25 * x.numel())   # exact zeros


@settings(max_examples=20, deadline=None)
@given(x=activations(shape=(64, 16), max_abs=100.0, dynamic_range=4.0, outliers=1, outlier_ratio=1000.0,
                     zeros=0.0))
def test_activations_have_outlier_channels_and_several_decades(x):
    channel_max = x.abs().amax(dim=0)
    assert channel_max.max().item() > 10.0                   # the outlier channel ...
    assert int((channel_max > 1.0).sum()) == 1               # ... and only one; the rest <= 0.1
    bulk = x[:, channel_max <= 1.0].abs()
    assert (bulk.max() / bulk[bulk > 0].min()).item() > 1e3  # more than three decades


def test_strategy_arguments_are_checked():
    with pytest.raises(fp8fx.Fp8fxError, match="max_abs up to 1000000.0 does not fit torch.float16"):
        activations(dtype=torch.float16, max_abs=1e6)
    with pytest.raises(fp8fx.Fp8fxError, match="dtype must be a float dtype"):
        activations(dtype=torch.int32)
    with pytest.raises(fp8fx.Fp8fxError, match="zeros=.* must satisfy"):
        activations(zeros=(0.5, 2.0))
    with pytest.raises(fp8fx.Fp8fxError, match="outliers must be whole numbers"):
        activations(outliers=1.5)
    with pytest.raises(fp8fx.Fp8fxError, match="shape must be a tuple of sizes"):
        activations(shape=8)


def test_import_needs_neither_hypothesis_nor_transformers():
    code = ("import sys, fp8fx; t = fp8fx.testing; import fp8fx.testing as t2; assert t is t2; "
            "assert 'testing' in dir(fp8fx); "
            "print(sorted(m for m in ('hypothesis', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------- the guide
def test_testing_guide_example_runs(tmp_path):
    """The python blocks of docs/testing.md, joined, are a pytest file whose tests all pass."""
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "docs" / "testing.md").read_text(), re.M | re.S)
    code = "\n".join(blocks)
    tests = re.findall(r"^def (test_\w+)", code, re.M)
    assert blocks and len(tests) >= 3, "docs/testing.md lost its example"
    (tmp_path / "test_guide_example.py").write_text(code)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_guide_example.py"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         timeout=300)
    assert out.returncode == 0, f"the example of docs/testing.md fails:\n{out.stdout[-4000:]}\n{out.stderr[-2000:]}"
    assert re.search(rf"\b{len(tests)} passed\b", out.stdout), out.stdout[-2000:]
