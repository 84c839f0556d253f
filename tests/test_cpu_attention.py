"""The CPU Inductor lowering of ``fp8fx::sdpa`` (fp8fx/backends/cpu_attention.py): the same values
as the op's definition, and generated code without float32 copies of K/V per query head."""

from __future__ import annotations

import re

import pytest
import torch

import fp8fx
from arch_zoo import build, calibration_batches, eval_ids, main_output
from fp8fx import numerics
from fp8fx.backends.cpu_attention import lower_cpu_attention, sdpa_cpu, sdpa_cpu_kv
from fp8fx.kernels import attention_cpp, gemv
from tiny_models import tiny_llama

E4M3 = torch.float8_e4m3fn
POW2 = (2.0**-5, 2.0**-5, 2.0**-6, 2.0**-8, 2.0**-6)  # q, k, v, probabilities, output
ARBITRARY = (0.0123, 0.0171, 0.0093, 0.00213, 0.0051)


def _inputs(b, h, hk, s, sk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, m, d, generator=g).to(torch.bfloat16) for n, m in ((h, s), (hk, sk), (hk, sk))]


def _mask(kind, b, s, sk):
    g = torch.Generator().manual_seed(7)
    if kind == "bool":
        return torch.rand(b, 1, s, sk, generator=g) > 0.3
    if kind == "float":
        return torch.randn(b, 1, s, sk, generator=g).to(torch.bfloat16)
    return None


def _call(fn, q, k, v, mask, causal, scales):
    op = torch.ops.fp8fx.sdpa.heads if isinstance(scales[0], list) else torch.ops.fp8fx.sdpa.default
    return (fn or op)(q, k, v, mask, 0.0, causal, None, True, *scales, 448.0, E4M3)


@pytest.mark.parametrize("shape", [(1, 9, 3, 7, 7, 64), (2, 4, 2, 1, 13, 16), (1, 4, 4, 5, 5, 16), (2, 4, 1, 3, 6, 8)],
                         ids=["gqa-prefill", "gqa-decode", "mha", "one-kv-head"])
@pytest.mark.parametrize("mask", ["causal", "bool", "float"])
@pytest.mark.parametrize("scales", ["pow2", "arbitrary", "heads"])
@pytest.mark.parametrize("path", ["cpp", "torch"])
def test_sdpa_cpu_equals_the_op_definition(shape, mask, scales, path, monkeypatch):
    if path == "torch":
        monkeypatch.setattr(gemv, "sdpa_op", lambda: None)
    elif not gemv.available():
        pytest.skip(f"C++ kernels not in use: {gemv.status()}")
    b, h, hk, s, sk, d = shape
    q, k, v = _inputs(*shape)
    sc = _scales(scales, h, hk)
    causal = mask == "causal" and s == sk
    m = None if mask == "causal" else _mask(mask, b, s, sk)
    want = _call(None, q, k, v, m, causal, sc)
    got = _call(sdpa_cpu, q, k, v, m, causal, sc)
    # every element equal: the GEMMs on codes (scales in the epilogue) reorder nothing at these sizes
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _scales(kind, h, hk):
    return {"pow2": POW2, "arbitrary": ARBITRARY,
            "heads": ([2.0**-5] * h, [2.0**-5 * 2 ** (i % 2) for i in range(hk)], [2.0**-6] * hk, 2.0**-8,
                      2.0**-6)}[kind]


def _bits_equal(a, b):
    a, b = a.float(), b.float()
    return bool(((a == b) | (a.isnan() & b.isnan())).all()) and a.shape == b.shape


@pytest.mark.parametrize("shape", [(1, 9, 3, 70, 70, 64), (2, 6, 2, 33, 45, 32), (1, 2, 2, 65, 65, 8)],
                         ids=["gqa-3-blocks", "keys-past-queries", "mha-block-edge"])
@pytest.mark.parametrize("dtype,fp8", [(torch.bfloat16, E4M3), (torch.float32, torch.float8_e5m2)], ids=["bf16-e4m3", "fp32-e5m2"])
def test_cpp_prefill_kernel_is_the_torch_lowering_bit_for_bit(shape, dtype, fp8, monkeypatch):
    """The C++ kernel (blocks of 32 positions, causal keys skipped, its own FP8 rounding) against
    the torch ops of the lowering on sizes that span several blocks, with every mask kind, a fully
    masked row, a NaN input, and per-tensor, arbitrary and per-head scales."""
    if not gemv.available():
        pytest.skip(f"C++ kernels not in use: {gemv.status()}")
    b, h, hk, s, sk, d = shape
    g = torch.Generator().manual_seed(1)
    q = (3 * torch.randn(b, h, s, d, generator=g)).to(dtype)
    k, v = (torch.randn(b, hk, sk, d, generator=g).to(dtype) for _ in range(2))
    q[0, 0, 5, 3] = float("nan")
    fmax = 448.0 if fp8 == E4M3 else 57344.0
    bool4 = torch.rand(b, 1, s, sk, generator=g) > 0.3
    bool4[0, 0, 2] = False  # a fully masked row: zeros
    masks = {"causal": None, "bool": bool4, "float": torch.randn(b, 1, s, sk, generator=g).to(dtype),
             "2d": torch.rand(s, sk, generator=g) > 0.5}
    heads = ([2.0**-5 * (1 + i % 3) for i in range(h)], [0.017 * (1 + i) for i in range(hk)], [0.0093] * hk,
             2.0**-8, 0.0051)
    for name, m in masks.items():
        for sc in (POW2, ARBITRARY, heads):
            op = torch.ops.fp8fx.sdpa.heads if isinstance(sc[0], list) else torch.ops.fp8fx.sdpa.default
            args = (q, k, v, m, 0.0, name == "causal", None, True, *sc, fmax, fp8)
            got = sdpa_cpu(*args)
            with monkeypatch.context() as mp:
                mp.setattr(gemv, "sdpa_op", lambda: None)
                want = sdpa_cpu(*args)
            assert _bits_equal(got, want), (name, sc)
            if sc is POW2:  # and against the definition: power-of-two scales make every product exact
                assert _bits_equal(got, op(*args)), name
    nan_row = sdpa_cpu(q, k, v, None, 0.0, True, None, True, *POW2, fmax, fp8)[0, 0, 5]
    assert not nan_row.isnan().any() and not nan_row.any()  # NaN scores: the definition's nan_to_num, zeros


@pytest.mark.parametrize("path", ["cpp", "torch"])
@pytest.mark.parametrize("which", ["query", "key", "value"])
def test_per_head_scales_of_another_head_count_raise_naming_the_tensor(which, path, monkeypatch):
    if path == "torch":
        monkeypatch.setattr(gemv, "sdpa_op", lambda: None)
    elif not gemv.available():
        pytest.skip(f"C++ kernels not in use: {gemv.status()}")
    q, k, v = _inputs(1, 6, 3, 5, 5, 16)  # 6 query heads, 3 KV heads: lists of 6 / 3 (or 1) fit
    good = {"query": [2.0**-5] * 6, "key": [2.0**-5] * 3, "value": [2.0**-6] * 3}
    good[which] = [2.0**-5] * 4  # calibrated on a 4-head model
    sc = (good["query"], good["key"], good["value"], 2.0**-8, 2.0**-6)
    with pytest.raises(fp8fx.QuantizationError, match=rf"4 scale\(s\) for a {which}.*calibrate this model again"):
        _call(sdpa_cpu, q, k, v, None, True, sc)


def test_cpp_prefill_kernel_without_keys_gives_zeros():
    if not gemv.available():
        pytest.skip(f"C++ kernels not in use: {gemv.status()}")
    q, k, v = _inputs(1, 4, 2, 3, 0, 16)
    got = attention_cpp.call(gemv.sdpa_op(), q, k, v, None, False, 0.25, *POW2, 448.0, E4M3)
    assert got.shape == q.shape and not got.float().any()
    torch.testing.assert_close(got, _call(None, q, k, v, None, False, POW2), rtol=0, atol=0)


@pytest.mark.parametrize("s", [6, 1], ids=["prefill", "decode"])
def test_compiled_sdpa_cpu_equals_the_op_definition(s):
    q, k, v = _inputs(1, 4, 2, s, 6, 16, seed=3)
    want = _call(None, q, k, v, None, s == 6, POW2)
    torch._dynamo.reset()
    got = torch.compile(lambda *a: _call(sdpa_cpu, *a), dynamic=False)(q, k, v, None, s == 6, POW2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sdpa_cpu_keeps_the_reference_where_it_does_not_apply():
    q, k, v = (t[0] for t in _inputs(1, 4, 2, 5, 5, 16))  # 3-D: not lowered
    want = _call(None, q, k, v, None, True, POW2)
    torch.testing.assert_close(_call(sdpa_cpu, q, k, v, None, True, POW2), want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- models
def _calibrated(arch, tmp_path):
    model = build(arch)
    cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m"))
    fp8fx.prepare(model, cfg)
    with torch.no_grad():
        for ids in calibration_batches():
            model(input_ids=ids)
    fp8fx.finalize_calibration(model)
    return build(arch), cfg.replace(mode="QUANTIZE")


def _compiled(model, qcfg, inductor):
    import copy

    m = copy.deepcopy(model)
    m.forward = torch.compile(m.forward, backend="fp8fx", dynamic=True, options={"config": qcfg, "inductor": inductor})
    return m


@pytest.mark.parametrize("arch,lowered", [("llama", 1), ("gpt2", 1), ("bloom", 0)])
def test_compiled_model_equals_the_rewritten_graph(arch, lowered, tmp_path, monkeypatch):
    """Inductor (this lowering for SDPA, AOTAutograd's decomposition of the other fp8fx ops)
    against the rewritten graph run eagerly (``inductor=False``: the ops' reference kernels).
    Bloom's attention is fp8fx::matmul/qdq (no SDPA node to lower)."""
    from fp8fx.backends import cpu_attention

    counts = []
    monkeypatch.setattr(cpu_attention, "lower_cpu_attention",
                        lambda gm: counts.append(lower_cpu_attention(gm)) or counts[-1])
    base, qcfg = _calibrated(arch, tmp_path)
    ids = eval_ids()
    torch._dynamo.reset()
    with torch.no_grad():
        want = main_output(_compiled(base, qcfg, False)(input_ids=ids, use_cache=False))
        torch._dynamo.reset()
        fast = _compiled(base, qcfg, True)
        got = main_output(fast(input_ids=ids, use_cache=False))
    torch._dynamo.reset()
    # Inductor fuses bf16/float32 casts and orders reductions its own way (Linears, norms, softmax):
    # an FP8 code can move by one step now and then, so compare as FP8 results are compared
    assert counts and all(c == lowered for c in counts)  # one SDPA per layer, in every compiled graph
    assert numerics.sqnr_db(want, got) > 35
    assert torch.equal(want.argmax(-1), got.argmax(-1))


_FP32_BUF = re.compile(r"empty_strided_cpu\(\(([^)]*)\), \([^)]*\), torch\.float32\)")


def _fp32_buffers(code: str) -> list[list[str]]:
    return [[d.strip() for d in m.group(1).split(",") if d.strip()] for m in _FP32_BUF.finditer(code)]


def test_generated_code_has_no_float32_kv_copies_per_query_head(tmp_path):
    """A tiny Llama (4 query heads, 2 KV heads, head_dim 16), bf16, FP8 KV cache: prefill runs the
    C++ attention kernel (or, without it, two ``bmm`` per layer on the KV heads' codes; no
    repeated K/V either way), decode reads the FP8 cache in its
    reductions (no ``bmm``, no float32 buffer of the cache's length)."""
    from torch._inductor.utils import run_and_get_code
    from transformers import DynamicCache

    model = tiny_llama(layers=1, dtype=torch.bfloat16)
    base = tiny_llama(layers=1, dtype=torch.bfloat16)
    cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m"))
    fp8fx.prepare(model, cfg)
    g = torch.Generator().manual_seed(0)
    for n in (9, 14):
        model.generate(torch.randint(0, 128, (1, n), generator=g), max_new_tokens=3, do_sample=False)
    fp8fx.finalize_calibration(model)
    qcfg = cfg.replace(mode="QUANTIZE")
    torch._dynamo.reset()
    fast = _compiled(base, qcfg, True)
    cache = fp8fx.fp8_kv_cache(DynamicCache(config=fast.config), fast, qcfg)
    ids = torch.randint(0, 128, (1, 9), generator=g)
    with torch.no_grad():
        _, (prefill,) = run_and_get_code(lambda: fast(ids, past_key_values=cache, use_cache=True))
        _, (decode,) = run_and_get_code(lambda: fast(ids[:, :1], past_key_values=cache, use_cache=True))
    torch._dynamo.reset()
    assert cache.layers[0].keys.dtype == E4M3
    if gemv.available():  # prefill and decode: one call of the C++ kernel on the FP8 caches
        for code in (prefill, decode):
            assert code.count("torch.ops.fp8fx_cpp.sdpa_fp8_kv.default(") == 1
            assert "extern_kernels.bmm" not in code
    else:  # the two products are bmm over the 2 KV heads
        bmm_first = re.findall(r"extern_kernels\.bmm\((?:reinterpret_tensor\()?(buf\d+)", prefill)
        assert len(bmm_first) == 2
        shapes = dict(re.findall(r"(buf\d+) = empty_strided_cpu\(\(([^)]*)\)", prefill))
        assert all(shapes[b].split(",")[0].strip() == "2" for b in bmm_first if b in shapes)
    assert not [s for s in _fp32_buffers(prefill) if len(s) == 5]  # no 5-D (repeated) float32 buffer
    # decode: no GEMM call for attention, and no float32 buffer of [.., S_k, head_dim]
    assert "extern_kernels.bmm" not in decode
    assert not [s for s in _fp32_buffers(decode) if s[-1] == "16" and any(re.search(r"s\d", d) for d in s)]


def test_lower_cpu_attention_points_sdpa_nodes_at_the_lowering():
    gm = torch.fx.symbolic_trace(lambda q, k, v: torch.ops.fp8fx.sdpa.default(
        q, k, v, None, 0.0, True, None, True, *POW2, 448.0, E4M3) + 1)
    assert lower_cpu_attention(gm) == 1
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"][0] is sdpa_cpu
    q, k, v = _inputs(1, 4, 2, 5, 5, 16)
    torch.testing.assert_close(gm(q, k, v), _call(None, q, k, v, None, True, POW2) + 1, rtol=0, atol=0)


# ------------------------------------------------------------------ FP8 cache read in the kernel
_KV_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@pytest.mark.parametrize("level", [1, 2], ids=["avx2", "avx512"])
@pytest.mark.parametrize("fmt", [E4M3, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_kv_floats_is_the_cache_read_bit_for_bit(level, fmt, dtype):
    """``fp8fx_cpp::kv_floats``: every FP8 code (NaN codes included) times per-head scales that
    round, overflow float16 and reach float32's subnormals, rounded to the read's dtype, equals
    ``fp8fx::dequant``'s ``(x8 · s).to(dtype)`` bit for bit, in both ISA bodies."""
    if not gemv.available():
        pytest.skip(f"C++ kernels not in use: {gemv.status()}")
    if level == 2 and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the AVX512 body needs an AVX512 CPU")
    scales = [0.0078125, 0.0123, 1.7, 2.5e4, 1e-30]
    x8 = torch.arange(256, dtype=torch.uint8).view(fmt).repeat(len(scales) * 3).reshape(1, len(scales), 3, 256)
    x8 = x8[..., :253]  # a row length with vector tails
    torch.ops.fp8fx_cpp.set_level(level)
    try:
        got = torch.ops.fp8fx_cpp.kv_floats(x8, scales, _KV_CODES[dtype])
    finally:
        torch.ops.fp8fx_cpp.set_level(gemv._isa_level()[0])
    want = numerics.dequantize(x8, torch.tensor(scales).reshape(-1, 1, 1), dtype).float()
    assert _bits_equal(got, want)


def _caches(b, hk, sk, d, fmt, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, hk, sk, d, generator=g) * 40).clamp(-400, 400).to(fmt) for _ in range(2)]


@pytest.mark.parametrize("shape", [(1, 9, 3, 7, 7, 64), (2, 4, 2, 1, 13, 16), (2, 4, 1, 1, 40, 8)],
                         ids=["gqa-prefill", "gqa-decode", "one-kv-head-decode"])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
@pytest.mark.parametrize("scales", ["arbitrary", "heads"])
@pytest.mark.parametrize("read", ["same", "other"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", ["cpp", "torch"])
def test_sdpa_cpu_kv_equals_the_cache_reads_then_the_op(shape, mask, scales, read, dtype, path, monkeypatch):
    """``sdpa_cpu_kv`` (the C++ kernel reading the FP8 caches; without it the reads, then
    ``sdpa_cpu``) equals ``fp8fx::sdpa`` on ``fp8fx::dequant`` of the caches, every element: with
    the read's scale equal to the op's key/value scale (an FP8 cache calibrated as the attention
    reads it) and with another one (a requantization)."""
    if path == "torch":
        monkeypatch.setattr(gemv, "sdpa_kv_op", lambda: None)
    elif not gemv.available():
        pytest.skip(f"C++ kernels not in use: {gemv.status()}")
    b, h, hk, s, sk, d = shape
    q = _inputs(*shape)[0].to(dtype)
    k8, v8 = _caches(b, hk, sk, d, E4M3)
    sc = _scales(scales, h, hk)
    per_head = isinstance(sc[0], list)
    if read == "same":
        k_read, v_read = sc[1], sc[2]
    else:
        k_read, v_read = ([0.0071 * (i + 1) for i in range(hk)], [0.0113] * hk) if per_head else (0.0071, 0.0113)
    op = torch.ops.fp8fx.dequant.heads if per_head else torch.ops.fp8fx.dequant.default
    k, v = op(k8, k_read, dtype), op(v8, v_read, dtype)
    m = None if mask == "none" else _mask(mask, b, s, sk)
    want = _call(None, q, k, v, m, False, sc)
    got = sdpa_cpu_kv(q, k8, v8, k_read, v_read, dtype, m, 0.0, False, None, True, *sc, 448.0, E4M3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("heads", [False, True], ids=["per-tensor", "per-head"])
def test_lower_cpu_attention_hands_fp8_caches_to_the_kernel(heads):
    """An ``fp8fx::sdpa`` whose K and V are ``fp8fx::dequant`` reads of FP8 caches becomes one
    ``sdpa_cpu_kv`` node on the FP8 tensors (the reads leave the graph), same values; a read
    whose scale is not a constant keeps the plain lowering."""
    sc = _scales("heads" if heads else "pow2", 4, 2)
    read = [2.0**-5, 2.0**-4] if heads else 2.0**-5
    dq = torch.ops.fp8fx.dequant.heads if heads else torch.ops.fp8fx.dequant.default
    sdpa = torch.ops.fp8fx.sdpa.heads if heads else torch.ops.fp8fx.sdpa.default

    def f(q, k8, v8):
        k, v = dq(k8, read, torch.bfloat16), dq(v8, read, torch.bfloat16)
        return sdpa(q, k, v, None, 0.0, True, None, True, *sc, 448.0, E4M3)

    gm = torch.fx.symbolic_trace(f)
    assert lower_cpu_attention(gm) == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [sdpa_cpu_kv]
    q = _inputs(1, 4, 2, 5, 5, 16)[0]
    k8, v8 = _caches(1, 2, 5, 16, E4M3)
    torch.testing.assert_close(gm(q, k8, v8), f(q, k8, v8), rtol=0, atol=0)

    def g(q, k8, v8, s):  # a traced scale (a graph input): not a constant read
        return torch.ops.fp8fx.sdpa.default(q, torch.ops.fp8fx.dequant.default(k8, s, torch.bfloat16),
                                            torch.ops.fp8fx.dequant.default(v8, s, torch.bfloat16), None, 0.0,
                                            True, None, True, *POW2, 448.0, E4M3)

    gm = torch.fx.symbolic_trace(g)
    assert lower_cpu_attention(gm) == 1
    assert sdpa_cpu in [n.target for n in gm.graph.nodes] and sdpa_cpu_kv not in [n.target for n in gm.graph.nodes]
