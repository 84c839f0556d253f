"""FP8 attention path: matmul, softmax, SDPA and the KV cache (ops, passes, eager and compiled)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import fp8fx
from fp8fx import numerics
from fp8fx.attention_ops import attention_probs, qdq
from fp8fx.errors import MeasurementError, QuantizationError
from tiny_models import EagerAttention, TwoLinear, tiny_llama

E4M3 = torch.float8_e4m3fn
ATTN_KINDS = ["matmul", "softmax", "sdpa", "kv_cache"]


def s(t: torch.Tensor) -> float:
    return t.abs().max().item() / 448


# ----------------------------------------------------------------------------------- ops
def test_matmul_op_is_the_fp8_gemm_of_quantized_inputs():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 5, 16, generator=g), torch.randn(3, 4, 16, 6, generator=g)
    got = torch.ops.fp8fx.matmul(a, b, s(a), s(b), 448.0, E4M3)
    qa, qb = (a / s(a)).to(E4M3).float(), (b / s(b)).to(E4M3).float()
    torch.testing.assert_close(got, (qa @ qb) * (s(a) * s(b)), rtol=1e-6, atol=1e-6)
    assert numerics.sqnr_db(a @ b, got) > 25


def test_qdq_keeps_values_on_the_fp8_grid_and_saturates():
    grid = torch.tensor([0.0, 0.5, -1.75, 448.0, -448.0]) * 0.25
    assert torch.equal(torch.ops.fp8fx.qdq(grid, 0.25, 448.0, E4M3), grid)
    assert torch.ops.fp8fx.qdq(torch.tensor([1e6]), 1.0, 448.0, E4M3).item() == 448.0
    x = torch.randn(64, dtype=torch.bfloat16)
    assert torch.ops.fp8fx.qdq(x, s(x.float()), 448.0, E4M3).dtype == torch.bfloat16


@pytest.mark.parametrize("variant", ["causal_gqa", "bool_mask", "float_mask"])
def test_sdpa_op_follows_torch_sdpa(variant):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    kw = {"is_causal": False, "enable_gqa": True, "attn_mask": None}
    if variant == "causal_gqa":
        kw["is_causal"] = True
    elif variant == "bool_mask":
        kw["attn_mask"] = torch.rand(7, 7, generator=g) > 0.3
        kw["attn_mask"][:, 0] = True
    else:
        kw["attn_mask"] = torch.randn(2, 1, 7, 7, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    p = attention_probs(q, k, kw["attn_mask"], kw["is_causal"], None, True)
    scales = (s(q), s(k), s(v), p.max().item() / 448, s(ref))
    got = torch.ops.fp8fx.sdpa(q, k, v, kw["attn_mask"], 0.0, kw["is_causal"], None, True, *scales, 448.0, E4M3)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert numerics.sqnr_db(ref, got) > 20
    # exactly INC's recipe: quantized q, k, v, probabilities and output, float32 in between
    qf, kf, vf = (qdq(t, sc, 448.0, E4M3) for t, sc in zip((q, k, v), scales))
    pq = qdq(attention_probs(qf, kf, kw["attn_mask"], kw["is_causal"], None, True), scales[3], 448.0, E4M3)
    want = qdq(pq @ vf.repeat_interleave(2, dim=-3), scales[4], 448.0, E4M3)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_kv_ops_store_fp8_and_refuse_a_high_precision_cache():
    new = torch.randn(1, 2, 3, 4)
    first = torch.ops.fp8fx.kv_append(torch.tensor([]), new, 0.01, 448.0, E4M3)
    both = torch.ops.fp8fx.kv_append(first, new, 0.01, 448.0, E4M3)
    assert first.dtype == E4M3 and both.shape == (1, 2, 6, 4)
    back = torch.ops.fp8fx.dequant(both, 0.01, torch.float32)
    torch.testing.assert_close(back[:, :, 3:], qdq(new, 0.01, 448.0, E4M3))
    with pytest.raises(QuantizationError, match="fresh cache"):
        torch.ops.fp8fx.kv_append(torch.randn(1, 2, 3, 4), new, 0.01, 448.0, E4M3)
    buf = torch.zeros(1, 2, 8, 4, dtype=E4M3)
    torch.ops.fp8fx.kv_index_copy_(buf, 2, torch.tensor([5, 6, 7]), new, 0.01, 448.0, E4M3)
    assert torch.equal(buf[:, :, 5:].view(torch.uint8), first.view(torch.uint8))
    assert not buf[:, :, :5].float().any()


# ------------------------------------------------------------------------------- passes
def _capture_decisions(model, x, cfg=None):
    return {d.match.name: d for d in fp8fx.explain(model, cfg or fp8fx.FP8Config(mode="MEASURE"), example_inputs=x).rows}


def test_attention_pattern_decides_which_matmuls_and_softmaxes_are_quantized():
    rows = _capture_decisions(EagerAttention(), torch.randn(2, 5, 32))
    assert {n for n, d in rows.items() if d.quantize} == {"qkv", "out", "matmul_0", "softmax_0", "matmul_1"}
    rows = _capture_decisions(TwoLinear(), torch.randn(2, 32))
    assert not rows["softmax_0"].quantize
    assert "outside an attention pattern" in rows["softmax_0"].reason


def _calibrated_llama(tmp_path, attn="sdpa", dtype=torch.float32, cache="dynamic", **cfg_kw):
    model = tiny_llama(layers=2, attn=attn, dtype=dtype)
    reference = copy.deepcopy(model)
    cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m"), **cfg_kw)
    fp8fx.prepare(model, cfg)
    g = torch.Generator().manual_seed(0)
    for n in (9, 14):
        model.generate(torch.randint(0, 128, (1, n), generator=g), max_new_tokens=3, do_sample=False,
                       cache_implementation=cache)
    fp8fx.finalize_calibration(model)
    return model, reference, cfg


def test_measurement_files_hold_inc_layout_for_attention_nodes(tmp_path):
    model, _, cfg = _calibrated_llama(tmp_path)
    nodes = json.loads((tmp_path / "m_hooks_maxabs.json").read_text())["Nodes"]
    sdpa = nodes["model.layers.0.self_attn.sdpa_0"]
    assert len(sdpa["inputs"]) == 3 and len(sdpa["outputs"]) == 2  # outputs[1]: max probability
    assert 0 < sdpa["outputs"][1][0][0] <= 1.0
    kv = nodes["model.layers.1.self_attn.kv_cache_1"]
    assert len(kv["inputs"]) == 1 and "outputs" not in kv  # measure_exclude OUTPUT


@pytest.mark.parametrize("attn,kinds", [("sdpa", {"sdpa": 2, "kv_cache": 4}),
                                        ("eager", {"matmul": 4, "softmax": 2, "kv_cache": 4})])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_converted_llama_generates_with_an_fp8_kv_cache(tmp_path, attn, kinds, cache):
    model, reference, _ = _calibrated_llama(tmp_path, attn=attn, cache=cache)
    fp8fx.convert(model)
    assert fp8fx.report(model)["nodes_quantized"] == {"linear": 15, **kinds}
    ids = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(3))
    out = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation=cache,
                         return_dict_in_generate=True, output_logits=True)
    ref = reference.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation=cache,
                             return_dict_in_generate=True, output_logits=True)
    layers = out.past_key_values.layers
    assert all(layer.keys.dtype == E4M3 and layer.values.dtype == E4M3 for layer in layers)
    assert type(layers[0]).__name__ == ("Fp8DynamicLayer" if cache == "dynamic" else "Fp8StaticLayer")
    assert numerics.sqnr_db(ref.logits[0], out.logits[0]) > 15  # the prefill's last position
    ops = {str(n.target) for g in model._fp8fx.compiled.graphs for n in g.gm.graph.nodes}
    assert "fp8fx.kv_append" in ops or "fp8fx.kv_index_copy_" in ops


def test_kv_cache_memory_is_half_of_bf16_and_e5m2_is_an_option(tmp_path):
    model, reference, _ = _calibrated_llama(tmp_path, dtype=torch.bfloat16, kv_cache_dtype="fp8_e5m2")
    fp8fx.convert(model)
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(4))

    def cache_bytes(m):
        pkv = m.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True).past_key_values
        return sum(t.numel() * t.element_size() for layer in pkv.layers for t in (layer.keys, layer.values)), pkv

    fp8_bytes, pkv = cache_bytes(model)
    bf16_bytes, _ = cache_bytes(reference)
    assert pkv.layers[0].keys.dtype == torch.float8_e5m2
    assert fp8_bytes / bf16_bytes <= 0.55


def test_missing_attention_measurement_names_the_node(tmp_path):
    model, reference, cfg = _calibrated_llama(tmp_path)
    path = tmp_path / "m_hooks_maxabs.json"
    data = json.loads(path.read_text())
    del data["Nodes"]["model.layers.1.self_attn.sdpa_0"]
    data.pop("WriteId", None)  # a file as INC (or a script) writes it: no write id, no module list
    path.write_text(json.dumps(data))
    (tmp_path / "m_hooks_maxabs.npz").unlink()
    for extra in tmp_path.glob("m_hooks_maxabs*mod_list*.json"):
        extra.unlink()
    qcfg = cfg.replace(mode="QUANTIZE")
    with pytest.raises(MeasurementError, match=r"model\.layers\.1\.self_attn\.sdpa_0"):
        fp8fx.convert(reference, qcfg, example_kwargs={"input_ids": torch.randint(0, 128, (1, 5))})
    # blocklisting the unmeasured kind converts the rest
    blocked = fp8fx.report(fp8fx.convert(reference, qcfg.replace(blocklist={"types": ["sdpa"]}),
                                         example_kwargs={"input_ids": torch.randint(0, 128, (1, 5))}))
    assert "sdpa" not in blocked["nodes_quantized"] and blocked["nodes_skipped"]["sdpa"] == 2
    assert blocked["nodes_quantized"]["kv_cache"] == 4


def test_compiled_backend_matches_the_converted_model(tmp_path):
    model, reference, cfg = _calibrated_llama(tmp_path)
    qcfg = cfg.replace(mode="QUANTIZE")
    converted = fp8fx.convert(copy.deepcopy(reference), qcfg, example_kwargs={"input_ids": torch.randint(0, 128, (1, 5))})
    torch._dynamo.reset()
    compiled = copy.deepcopy(reference)
    compiled.forward = torch.compile(compiled.forward, backend="fp8fx", dynamic=True,
                                     options={"config": qcfg, "inductor": False})
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = converted(ids, use_cache=False).logits, compiled(ids, use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # generate through the compiled forward with FP8 cache storage
    cache = fp8fx.fp8_kv_cache(__import__("transformers").DynamicCache(config=compiled.config), compiled, qcfg)
    out = compiled.generate(ids[:1], max_new_tokens=3, do_sample=False, past_key_values=cache,
                            return_dict_in_generate=True)
    assert out.past_key_values.layers[0].keys.dtype == E4M3
    ref = converted.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(out.sequences, ref)
    torch._dynamo.reset()


def test_torch_compile_of_a_converted_model_keeps_the_fp8_attention(tmp_path):
    model = EagerAttention()
    reference = copy.deepcopy(model)
    fp8fx.prepare(model, fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m")))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(torch.randn(2, 6, 32, generator=g))
    fp8fx.finalize_calibration(model)
    fp8fx.convert(model)
    x = torch.randn(2, 6, 32, generator=g)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend="eager")(x)  # the outer compile must not drop the rewrite
        blocked = fp8fx.convert(copy.deepcopy(reference), fp8fx.FP8Config(
            mode="QUANTIZE", dump_stats_path=str(tmp_path / "m"), blocklist={"types": ATTN_KINDS}), x)(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(want, blocked)  # the attention ops are quantized, not only the Linears
    assert numerics.sqnr_db(reference(x), want) > 20


def test_sdpa_with_dropout_in_training_is_refused(tmp_path):
    class Drop(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)

    m = Drop()
    fp8fx.prepare(m, fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m")))
    q = torch.randn(1, 2, 4, 8)
    m(q, q, q)
    fp8fx.finalize_calibration(m)
    with pytest.raises(QuantizationError, match="dropout_p"):
        fp8fx.convert(m)
        m(q, q, q)
