"""CUDA lowering of the attention path (fp8fx.backends.cuda_attention), with and without a GPU.

Without a GPU: the lowered forms are traced with fake CUDA tensors (``FakeTensorMode``: shapes,
dtypes, strides and torch's own meta checks of ``aten._scaled_mm`` / ``aten._scaled_grouped_mm``),
graphs whose values are fake CUDA tensors are lowered with a mocked compute capability (which op
each node becomes, and why the others are kept), and the lowered forms run on CPU tensors against
the ops' reference kernels: ``torch._scaled_mm`` with its own CPU kernel, and both kernels through
exact CPU emulations (float32 GEMM of the FP8 values, then the scales) that also assert the
layouts the CUDA kernels require. The ``gpu`` tests run the real kernels and skip without one.

All tests carry the ``cuda`` marker (``benchmarks/gpu.sh`` runs them on a GPU machine).
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import fp8fx
from fp8fx.attention_ops import quantize
from fp8fx.backends import cuda_attention as ca
from fp8fx.errors import QuantizationError
from fp8fx.kv_cache import KVQuant, fp8_cache
from fp8fx.numerics import sqnr_db
from tiny_models import EagerAttention

pytestmark = pytest.mark.cuda

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
BF16 = torch.bfloat16
_HAS_CUDA = torch.cuda.is_available()


def _capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability(0) if _HAS_CUDA else (0, 0)


sm89 = pytest.mark.skipif(not _HAS_CUDA or _capability() < (8, 9),
                          reason="needs a CUDA device with compute capability >= 8.9")
sm90 = pytest.mark.skipif(not _HAS_CUDA or _capability()[0] != 9,
                          reason="needs a CUDA device with compute capability 9.x (FP8 grouped GEMM)")
SA, SB = 2.0 ** -5, 2.0 ** -6


def rand(*shape, seed=0, scale=1.0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def on_fake_cuda(*tensors):
    """Fake CUDA tensors with the shapes, dtypes and strides of ``tensors``."""
    mode = FakeTensorMode()
    with mode:
        return mode, tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda") for t in tensors)


def trace(fn, *args, capability=(9, 0)):
    with mock.patch.object(torch.cuda, "get_device_capability", return_value=capability):
        return make_fx(fn, tracing_mode="fake")(*args)


def one(gm, target) -> fx.Node:
    nodes = [n for n in gm.graph.nodes if n.target is target]
    assert len(nodes) == 1, gm.code
    return nodes[0]


def outputs(gm) -> list:
    """The example values of ``gm``'s outputs."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return [o.meta["val"] for o in (out if isinstance(out, (list, tuple)) else [out])]


def reference(a, b, sa=SA, sb=SB, dtype=E4M3):
    return torch.ops.fp8fx.matmul(a, b, sa, sb, 448.0, dtype)


# ------------------------------------------------------------------ exact CPU emulations of the kernels
def _row_major(t):
    return t.stride(-1) == 1 and t.stride(-2) >= t.shape[-1]


def _col_major(t):
    return t.stride(-2) == 1 and t.stride(-1) >= t.shape[-2]


def emulated_scaled_mm(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
    """``torch._scaled_mm`` (tensor-wise) on CPU: the CUDA kernel's checks, then float32 math."""
    assert a.dim() == 2 and b.dim() == 2 and a.dtype in (E4M3, E5M2) and b.dtype in (E4M3, E5M2)
    assert _row_major(a) and _col_major(b), (a.stride(), b.stride())
    assert a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0, (a.shape, b.shape)
    assert scale_a.numel() == 1 and scale_b.numel() == 1
    assert scale_a.dtype == scale_b.dtype == torch.float32
    assert bias is None and scale_result is None and not use_fast_accum
    acc = torch.mm(a.float(), b.float())
    return (acc * scale_a * scale_b).to(out_dtype or a.dtype)


def emulated_scaled_grouped_mm(a, b, scale_a, scale_b, offs=None, bias=None, scale_result=None, out_dtype=None,
                               use_fast_accum=False):
    """``torch._scaled_grouped_mm`` 3-D x 3-D on CPU: the kernel's checks, then float32 math, bfloat16 out."""
    assert a.dim() == 3 and b.dim() == 3 and a.dtype == b.dtype == E4M3 and offs is None
    assert _row_major(a) and _col_major(b), (a.stride(), b.stride())
    assert a.shape[-1] % 16 == 0 and b.stride(-1) % 16 == 0
    g, m, _ = a.shape
    n = b.shape[-1]
    assert scale_a.shape == (g, m) and scale_b.shape == (g, n)
    assert scale_a.dtype == scale_b.dtype == torch.float32
    assert bias is None and scale_result is None and out_dtype in (None, BF16)
    acc = torch.bmm(a.float(), b.float())
    return (acc * scale_a[:, :, None] * scale_b[:, None, :]).to(BF16)


@pytest.fixture
def emulated():
    with mock.patch.object(torch, "_scaled_mm", emulated_scaled_mm), \
            mock.patch.object(torch, "_scaled_grouped_mm", emulated_scaled_grouped_mm):
        yield


def integer_valued(*shape, seed=0, dtype=BF16):
    """Values whose FP8 codes (scale ``SA``/``SB``) are small integers: every product and sum is
    exact in float32, so the lowered form must equal the reference bit for bit."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-8, 9, shape, generator=g).float()).to(dtype)


# ------------------------------------------------------------------ the lowered forms, traced on fake CUDA
@pytest.mark.parametrize("case", ["qk_prefill", "pv_prefill", "qk_decode", "pv_decode", "gqa_broadcast"])
def test_batched_matmul_traces_to_one_scaled_grouped_mm(case):
    b_, h, s, sk, d = 2, 4, 6, 17, 64
    q_len = 1 if "decode" in case else s
    if case.startswith("pv"):
        a, b = rand(b_, h, q_len, sk, dtype=BF16), rand(b_, h, sk, d, seed=1, dtype=BF16)
    else:
        kv_heads = 1 if case == "gqa_broadcast" else h
        a, b = rand(b_, h, q_len, d, dtype=BF16), rand(b_, kv_heads, sk, d, seed=1, dtype=BF16).transpose(-1, -2)
    _, fake = on_fake_cuda(a, b)
    gm = trace(lambda x, y: ca.scaled_matmul_grouped(x, y, SA, SB, 448.0, E4M3, BF16), *fake)
    mm = one(gm, torch.ops.aten._scaled_grouped_mm.default)
    qa, qb, scale_a, scale_b = (x.meta["val"] for x in mm.args[:4])
    g, m, n, k = b_ * h, q_len, b.shape[-1], a.shape[-1]
    kp, np_ = -(-k // 16) * 16, -(-n // 16) * 16
    assert qa.dtype == qb.dtype == E4M3 and qa.device.type == "cuda"
    assert qa.shape == (g, m, kp) and qa.stride() == (m * kp, kp, 1)          # row-major, K padded to 16
    assert qb.shape == (g, kp, np_) and qb.stride() == (np_ * kp, 1, kp)      # column-major
    assert scale_a.shape == (g, m) and scale_b.shape == (g, np_) and scale_a.dtype == torch.float32
    assert mm.args[7] == BF16
    (out,) = outputs(gm)
    assert out.shape == reference(a, b).shape and out.dtype == BF16
    assert not any(n.target is torch.ops.aten.bmm.default for n in gm.graph.nodes)


@pytest.mark.parametrize("shape_b", [(24, 40), (1, 1, 24, 40), (64, 48)])
def test_unbatched_right_operand_traces_to_one_scaled_mm(shape_b):
    a, b = rand(2, 3, 5, shape_b[-2], dtype=BF16), rand(*shape_b, seed=1, dtype=BF16)
    _, fake = on_fake_cuda(a, b)
    gm = trace(lambda x, y: ca.scaled_matmul_2d(x, y, SA, SB, 448.0, E4M3, BF16), *fake, capability=(8, 9))
    mm = one(gm, torch.ops.aten._scaled_mm.default)
    qa, qb, scale_a, scale_b = (x.meta["val"] for x in mm.args[:4])
    k, n = shape_b[-2], shape_b[-1]
    kp, np_ = -(-k // 16) * 16, -(-n // 16) * 16
    assert qa.shape == (2 * 3 * 5, kp) and qa.stride() == (kp, 1)
    assert qb.shape == (kp, np_) and qb.stride() == (1, kp)
    assert scale_a.shape == scale_b.shape == () and scale_a.dtype == torch.float32
    assert mm.args[6] == torch.float32  # float32 output: the epilogue casts once, as the definition does
    (out,) = outputs(gm)
    assert out.shape == reference(a, b).shape and out.dtype == BF16


@pytest.mark.parametrize("form, shapes", [("grouped", ((2, 4, 1, 17), (2, 4, 17, 64))),
                                          ("grouped", ((2, 4, 1, 64), (2, 4, 64, 23))),
                                          ("mm", ((2, 5, 24), (24, 40)))])
def test_dynamic_lengths_trace_without_pinning_a_length(form, shapes):
    """Under symbolic shapes (``dynamic=True``) the padding stays symbolic: the only guards are on
    whether a padded size is a multiple of 16, never on a length itself (no recompile per token)."""
    a, b = rand(*shapes[0], dtype=BF16), rand(*shapes[1], seed=1, dtype=BF16)
    gm = make_fx(lambda x, y: ca._FORMS[form](x, y, SA, SB, 448.0, E4M3, BF16), tracing_mode="symbolic")(a, b)
    kernel = torch.ops.aten._scaled_grouped_mm.default if form == "grouped" else torch.ops.aten._scaled_mm.default
    qa = one(gm, kernel).args[0].meta["val"]
    assert not isinstance(qa.shape[-1], int)  # K (the padded length) is symbolic
    guards = [str(g.expr) for g in gm.shape_env.guards]
    assert all("Mod" in g for g in guards), guards


def test_folded_scale_is_the_float32_product_the_reference_multiplies_by():
    for sa, sb in [(0.1, 0.3), (1 / 3, 1 / 7), (2.0 ** -5, 2.0 ** -9), (0.0123, 456.0)]:
        assert ca._folded_scale(sa, sb) == (torch.ones(()) * (sa * sb)).item()


# ------------------------------------------------------------------ numerics on CPU
@pytest.mark.parametrize("form, shapes", [
    ("grouped", ((2, 4, 6, 64), (2, 4, 64, 17))),     # Q·Kᵀ, N padded
    ("grouped", ((2, 4, 1, 17), (2, 4, 17, 64))),     # P·V at decode: K padded
    ("grouped", ((2, 4, 6, 32), (2, 1, 32, 6))),      # a broadcast batch
    ("mm", ((2, 3, 5, 24), (24, 40))),
    ("mm", ((7, 32), (32, 16))),
])
def test_lowered_forms_equal_the_definition_bit_for_bit(form, shapes, emulated):
    a, b = integer_valued(*shapes[0]), integer_valued(*shapes[1], seed=1)
    a, b = a * SA, b * SB  # FP8 codes are the integers themselves
    got = ca._FORMS[form](a, b, SA, SB, 448.0, E4M3, BF16)
    want = reference(a, b)
    assert got.shape == want.shape and got.dtype == want.dtype == BF16
    assert torch.equal(got, want)


@pytest.mark.parametrize("form", ["grouped", "mm"])
def test_lowered_forms_on_random_data_match_the_definition(form, emulated):
    a = rand(2, 4, 9, 48, scale=3.0, dtype=BF16)
    b = rand(48, 20, seed=1, dtype=BF16) if form == "mm" else rand(2, 4, 48, 20, seed=1, dtype=BF16)
    sa, sb = a.float().abs().max().item() / 448, b.float().abs().max().item() / 448  # arbitrary scales
    got = ca._FORMS[form](a, b, sa, sb, 448.0, E4M3, BF16)
    want = reference(a, b, sa, sb)
    # float32 sums in another order, then one bfloat16 rounding: at most one bfloat16 step apart
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=0)


def test_scaled_mm_form_with_torchs_own_cpu_kernel():
    """``torch._scaled_mm`` runs on CPU too (oneDNN): the 2-D form with it, not the emulation."""
    a, b = rand(3, 5, 32, scale=2.0), rand(32, 24, seed=1)
    sa, sb = a.abs().max().item() / 448, b.abs().max().item() / 448
    got = ca.scaled_matmul_2d(a, b, sa, sb, 448.0, E4M3, torch.float32)
    torch.testing.assert_close(got, reference(a, b, sa, sb), rtol=1e-5, atol=1e-5)


def test_grouped_form_refuses_other_result_dtypes():
    with pytest.raises(QuantizationError, match="bfloat16"):
        ca.scaled_matmul_grouped(rand(2, 3, 16), rand(2, 16, 16), SA, SB, 448.0, E4M3, torch.float32)


# ------------------------------------------------------------------ lowering graphs
class Attention(nn.Module):
    """Eager attention with the fp8fx ops written in (what rewrite_attention produces), an SDPA and
    FP8 KV-cache ops."""

    def __init__(self, fp8_dtype=E4M3):
        super().__init__()
        self.fp8_dtype = fp8_dtype

    def forward(self, q, k, v, past):
        dt = self.fp8_dtype
        cache = torch.ops.fp8fx.kv_append(past, k, SA, 448.0, E4M3)
        keys = torch.ops.fp8fx.dequant(cache, SA, q.dtype)
        scores = torch.ops.fp8fx.matmul(q, keys.transpose(-2, -1), SA, SA, 448.0, dt)
        p = torch.ops.fp8fx.qdq(torch.softmax(scores.float(), dim=-1).to(q.dtype), 2.0 ** -8, 448.0, dt)
        o = torch.ops.fp8fx.matmul(p, v, 2.0 ** -8, SB, 448.0, dt)
        o2 = torch.ops.fp8fx.sdpa(q, keys, v, None, 0.0, False, None, False, SA, SA, SB, 2.0 ** -8, SB, 448.0, dt)
        return o + o2, cache


def attention_inputs(dtype=BF16, s=6, past=5):
    q = rand(1, 4, s, 16, dtype=dtype)
    k = rand(1, 4, s, 16, seed=1, dtype=dtype)
    v = rand(1, 4, past + s, 16, seed=2, dtype=dtype)
    return q, k, v, quantize(rand(1, 4, past, 16, seed=3), SA, 448.0, E4M3)


def graph_on(device: str, model=None, inputs=None):
    """``model`` traced, its values propagated as fake tensors on ``device`` (what dynamo records)."""
    model = model or Attention()
    inputs = inputs or attention_inputs()
    gm = fx.symbolic_trace(model)
    mode, fake = on_fake_cuda(*inputs) if device == "cuda" else (FakeTensorMode(), None)
    if fake is None:
        fake = tuple(mode.from_tensor(t) for t in inputs)
    FakeTensorProp(gm, mode).propagate(*fake)
    return gm


def lower(gm, capability=(9, 0)):
    with mock.patch.object(torch.cuda, "get_device_capability", return_value=capability):
        return ca.lower_attention_for_cuda(gm)


def fp8fx_nodes(gm, name):
    packet = getattr(torch.ops.fp8fx, name)
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and (n.target is packet or getattr(n.target, "overloadpacket", None) is packet)]


def test_sm90_graph_lowers_both_matmuls_and_keeps_the_rest_with_reasons():
    gm = graph_on("cuda")
    notes = lower(gm)
    assert not fp8fx_nodes(gm, "matmul")
    lowered = [n for n in gm.graph.nodes if n.target is ca.scaled_matmul_grouped]
    assert len(lowered) == 2 and all(n.meta[ca.META_KEY] == ca.LOWERED["grouped"] for n in lowered)
    assert lowered[0].args[2:] == (SA, SA, 448.0, E4M3, BF16) and lowered[1].args[2:] == (2.0 ** -8, SB, 448.0, E4M3, BF16)
    kept = {name: n.meta[ca.META_KEY] for name in ("kv_append", "dequant", "qdq", "sdpa")
            for n in fp8fx_nodes(gm, name)}
    assert ca.KEPT_REASONS["sdpa"] in kept["sdpa"] and "torch 2.13 has no FP8 SDPA kernel" in kept["sdpa"]
    assert ca.KEPT_REASONS["qdq"] in kept["qdq"]
    assert ca.KEPT_REASONS["kv"] in kept["kv_append"] and ca.KEPT_REASONS["kv"] in kept["dequant"]
    assert notes == ca.lowered_nodes(gm) and len(notes) == 6


@pytest.mark.parametrize("capability, dtype, fp8_dtype, reason", [
    ((8, 9), BF16, E4M3, "matmul_arch"),          # Ada: _scaled_mm only, and it is 2-D
    ((10, 0), BF16, E4M3, "matmul_arch"),         # Blackwell: no FP8 grouped GEMM in this release
    ((8, 0), BF16, E4M3, "capability"),
    ((9, 0), torch.float32, E4M3, "matmul_dtype"),
    ((9, 0), torch.float16, E4M3, "matmul_dtype"),
    ((9, 0), BF16, E5M2, "matmul_e5m2"),
])
def test_matmuls_without_a_kernel_are_kept_with_reason(capability, dtype, fp8_dtype, reason):
    gm = graph_on("cuda", Attention(fp8_dtype), attention_inputs(dtype))
    lower(gm, capability)
    matmuls = fp8fx_nodes(gm, "matmul")
    assert len(matmuls) == 2
    assert all(ca.KEPT_REASONS[reason] in n.meta[ca.META_KEY] for n in matmuls)


def test_rocm_builds_keep_the_matmuls():
    gm = graph_on("cuda")
    with mock.patch.object(torch.version, "hip", "6.4"):
        lower(gm)
    assert all(ca.KEPT_REASONS["rocm"] in n.meta[ca.META_KEY] for n in fp8fx_nodes(gm, "matmul"))


def test_unbatched_right_operand_lowers_to_scaled_mm_on_sm89():
    class Proj(nn.Module):
        def forward(self, x, w):
            return torch.ops.fp8fx.matmul(x, w, SA, SB, 448.0, E4M3)

    gm = graph_on("cuda", Proj(), (rand(2, 5, 32, dtype=BF16), rand(32, 48, dtype=BF16)))
    lower(gm, (8, 9))
    (node,) = [n for n in gm.graph.nodes if n.target is ca.scaled_matmul_2d]
    assert node.meta[ca.META_KEY] == ca.LOWERED["mm"]


def test_cpu_graph_is_not_touched():
    gm = graph_on("cpu")
    code = gm.code
    assert lower(gm) == {}
    assert gm.code == code and not any(ca.META_KEY in n.meta for n in gm.graph.nodes)


def test_per_head_overloads_are_kept_with_reason():
    class Heads(nn.Module):
        def forward(self, x):
            return torch.ops.fp8fx.qdq.heads(x, [SA, SB], 448.0, E4M3)

    gm = graph_on("cuda", Heads(), (rand(1, 2, 3, 16, dtype=BF16),))
    lower(gm)
    (node,) = fp8fx_nodes(gm, "qdq")
    assert ca.KEPT_REASONS["heads"] in node.meta[ca.META_KEY]


def test_bad_scale_is_refused_before_any_change():
    class Bad(nn.Module):
        def forward(self, a, b):
            x = torch.ops.fp8fx.matmul(a, b, SA, SB, 448.0, E4M3)
            return torch.ops.fp8fx.matmul(x, b, -1.0, SB, 448.0, E4M3)

    gm = graph_on("cuda", Bad(), (rand(1, 2, 16, 16, dtype=BF16), rand(1, 2, 16, 16, dtype=BF16)))
    code = gm.code
    with pytest.raises(QuantizationError, match="scale_a must be a positive constant"):
        lower(gm)
    assert gm.code == code


def test_lowered_graph_runs_on_cpu_like_the_graph_before(emulated):
    """The sm90 lowering of the whole graph, run with CPU tensors through the emulated kernels,
    gives the graph's own outputs (integer-valued data: bit for bit)."""
    q, k, v, past = attention_inputs()
    q, k, v = (integer_valued(*t.shape, seed=i) * SA for i, t in enumerate((q, k, v)))
    inputs = (q, k, v, past)
    before = graph_on("cuda", inputs=inputs)
    after = copy.deepcopy(before)
    lower(after)
    assert [n for n in after.graph.nodes if n.target is ca.scaled_matmul_grouped]
    for got, want in zip(after(*inputs), before(*inputs)):
        assert got.dtype == want.dtype
        assert torch.equal(got.view(torch.uint8) if got.dtype == E4M3 else got,
                           want.view(torch.uint8) if want.dtype == E4M3 else want)


# ------------------------------------------------------------------ the compile backend and explain
def test_backend_calls_the_cuda_lowering_and_it_lowers_the_real_graph(emulated):
    """``backend="fp8fx"`` hands its rewritten graph to lower_attention_for_cuda. On this CPU the
    graph's values are CPU tensors (nothing is lowered); the same dynamo graph with its values
    moved to fake CUDA tensors gets both attention matmuls lowered."""
    seen, returned = [], []
    real = ca.lower_attention_for_cuda

    def spy(gm):
        seen.append(copy.deepcopy(gm))
        returned.append(real(gm))
        return returned[-1]

    torch._dynamo.reset()
    model = EagerAttention(d=32, heads=2).to(BF16)
    x = rand(2, 5, 32, dtype=BF16)
    cfg = fp8fx.FP8Config(mode="QUANTIZE", scale_method="unit_scale", target="cuda")
    compiled = torch.compile(model, backend="fp8fx", options={"config": cfg, "inductor": False,
                                                            "keep_hp_weights": True})
    with mock.patch.object(ca, "lower_attention_for_cuda", spy), torch.no_grad():
        got = compiled(x)
    torch._dynamo.reset()
    (gm,) = seen
    assert returned == [{}]  # CPU values: nothing lowered, nothing noted
    assert len(fp8fx_nodes(gm, "matmul")) == 2
    mode = FakeTensorMode()
    for n in gm.graph.nodes:  # what dynamo records on a GPU: the same values on a CUDA device
        val = n.meta.get("example_value")
        if isinstance(val, torch.Tensor):
            with mode:
                n.meta["example_value"] = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype,
                                                              device="cuda")
    notes = lower(gm)
    assert not fp8fx_nodes(gm, "matmul")
    assert sum(note == ca.LOWERED["grouped"] for note in notes.values()) == 2
    assert got.dtype == BF16 and got.shape == x.shape


def test_explain_reports_the_cuda_lowering_per_kind():
    model = EagerAttention(d=32, heads=2)
    x = torch.randn(2, 5, 32)
    exp = fp8fx.explain(model, fp8fx.FP8Config(mode="MEASURE", target="cuda"), example_inputs=x)
    rows = {r["name"]: r for r in exp.to_dict()}
    assert "_scaled_grouped_mm" in rows["matmul_0"]["lowering"] and "lowering" not in rows["qkv"]
    assert "Inductor compiles it" in rows["softmax_0"]["lowering"]
    assert "_scaled_grouped_mm" in str(exp)
    cpu = fp8fx.explain(model, fp8fx.FP8Config(mode="MEASURE"), example_inputs=x)
    assert cpu.lowering == {} and all("lowering" not in r for r in cpu.to_dict())


def test_explain_names_the_missing_fp8_sdpa_kernel():
    from tiny_models import tiny_llama

    model = tiny_llama(layers=1)
    exp = fp8fx.explain(model, fp8fx.FP8Config(mode="MEASURE", target="cuda"),
                        example_inputs=torch.randint(0, 128, (1, 6)))
    sdpa = [r for r in exp.to_dict() if r["kind"] == "sdpa"]
    assert sdpa and all("torch 2.13 has no FP8 SDPA kernel on CUDA" in r["lowering"] for r in sdpa)


# ------------------------------------------------------------------ the FP8 KV cache on CUDA
def test_fp8_cache_layers_keep_fp8_storage_on_the_cuda_device():
    from transformers import DynamicCache, LlamaConfig, StaticCache

    q = KVQuant(SA, SB, E4M3, 448.0)
    with FakeTensorMode():
        k = torch.empty(1, 2, 5, 8, dtype=BF16, device="cuda")
        dyn = fp8_cache(DynamicCache(), {0: q})
        keys, values = dyn.update(k, k, 0)
        keys, values = dyn.update(k.narrow(2, 0, 1), k.narrow(2, 0, 1), 0)  # a decode step
        layer = dyn.layers[0]
        assert layer.keys.dtype == layer.values.dtype == E4M3 and layer.keys.device.type == "cuda"
        assert layer.keys.shape == (1, 2, 6, 8) and keys.dtype == BF16 and keys.device.type == "cuda"
        cfg = LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1)
        static = fp8_cache(StaticCache(config=cfg, max_cache_len=32), {0: q})
        keys, _ = static.update(k, k, 0)
        layer = static.layers[0]
        assert layer.keys.dtype == layer.values.dtype == E4M3 and layer.keys.device.type == "cuda"
        assert layer.keys.shape == (1, 2, 32, 8) and keys.dtype == BF16


def test_kv_ops_decompose_with_fp8_storage_on_cuda():
    """What AOTAutograd hands Inductor for the cache ops: the write is a cat of FP8 tensors (or a
    byte copy into the FP8 buffer); the stored tensor is never widened."""
    past, new = quantize(rand(1, 2, 4, 16), SA, 448.0, E4M3), rand(1, 2, 1, 16, seed=1, dtype=BF16)
    buf, index = torch.zeros(1, 2, 8, 16, dtype=E4M3), torch.tensor([3])
    _, (past, new, buf, index) = on_fake_cuda(past, new, buf, index)

    def step(past, new, buf, index):
        cache = torch.ops.fp8fx.kv_append(past, new, SA, 448.0, E4M3)
        torch.ops.fp8fx.kv_index_copy_(buf, 2, index, new, SA, 448.0, E4M3)
        return cache, torch.ops.fp8fx.dequant(cache, SA, BF16)

    gm = trace(step, past, new, buf, index)
    cat = one(gm, torch.ops.aten.cat.default)
    assert all(t.meta["val"].dtype == E4M3 for t in cat.args[0]) and cat.meta["val"].device.type == "cuda"
    copy_ = one(gm, torch.ops.aten.index_copy_.default)
    assert copy_.args[0].meta["val"].dtype == torch.uint8  # a byte copy into the FP8 buffer
    cache, read = outputs(gm)
    assert cache.dtype == E4M3 and read.dtype == BF16


# ------------------------------------------------------------------ on a GPU
@sm90
@pytest.mark.parametrize("shapes", [((2, 4, 6, 64), (2, 4, 64, 17)), ((2, 4, 1, 17), (2, 4, 17, 64)),
                                    ((1, 9, 128, 64), (1, 9, 64, 128))])
def test_gpu_grouped_matmul_matches_the_definition(shapes):
    a, b = rand(*shapes[0], scale=2.0, dtype=BF16, device="cuda"), rand(*shapes[1], seed=1, dtype=BF16, device="cuda")
    sa, sb = 2.0 ** -6, 2.0 ** -7
    got = ca.scaled_matmul_grouped(a, b, sa, sb, 448.0, E4M3, BF16)
    want = reference(a, b, sa, sb)
    assert got.dtype == BF16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-3)


@sm89
def test_gpu_scaled_mm_form_matches_the_definition():
    a, b = rand(3, 5, 40, scale=2.0, dtype=BF16, device="cuda"), rand(40, 24, seed=1, dtype=BF16, device="cuda")
    got = ca.scaled_matmul_2d(a, b, 2.0 ** -6, 2.0 ** -7, 448.0, E4M3, BF16)
    torch.testing.assert_close(got.float(), reference(a, b, 2.0 ** -6, 2.0 ** -7).float(), rtol=2 ** -7, atol=1e-3)


@sm90
def test_gpu_compiled_attention_uses_grouped_fp8_gemms():
    """``backend="fp8fx"`` on an H100/H200: both attention matmuls of a bf16 eager-attention model
    run as _scaled_grouped_mm in the Inductor-compiled code, and the output is the same model's
    emulated FP8 output up to accumulation order."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = EagerAttention(d=256, heads=4).to(BF16).cuda()
    x = rand(2, 64, 256, dtype=BF16, device="cuda")
    cfg = fp8fx.FP8Config(mode="QUANTIZE", scale_method="unit_scale", target="cuda")
    opts = {"config": cfg, "keep_hp_weights": True}
    with torch.no_grad():
        got, code = run_and_get_code(torch.compile(model, backend="fp8fx", options=opts), x)
        torch._dynamo.reset()
        with mock.patch.object(ca, "lower_attention_for_cuda", lambda gm: {}):
            want = torch.compile(model, backend="fp8fx", options=opts)(x)
    torch._dynamo.reset()
    assert sum(c.count("_scaled_grouped_mm") for c in code) >= 2
    assert sqnr_db(want.float(), got.float()) > 30
