"""Per-head KV-cache and attention scales (observer_params.kv_cache_strategy = "attn_head"): the
ops' .heads overloads against a float64 reference, the per-head observers, and a model whose KV
heads have very different ranges, where per-head scales beat one scale per tensor."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fp8fx
from fp8fx import numerics
from fp8fx.attention_ops import attention_probs
from fp8fx.errors import MeasurementError, QuantizationError
from fp8fx.observers import MaxAbsObserver
from tiny_models import tiny_llama
from transformers import DynamicCache

E4M3 = torch.float8_e4m3fn
SCALES = [0.01, 0.0005]  # two heads, very different ranges


def ref_qdq(x: torch.Tensor, scales: list[float]) -> torch.Tensor:
    """Float64 reference: per-head division, saturation at 448, E4M3 rounding, multiply back (the
    scales are float32 numbers, as the ops keep them)."""
    s = torch.tensor(scales, dtype=torch.float32).double().reshape(-1, 1, 1)
    q = (x.double() / s).clamp(-448, 448).to(E4M3)
    return q.double() * s


def _kv(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 5, 8, generator=g)
    x[:, 1] *= 0.05  # head 1 is 20x smaller
    return x


# --------------------------------------------------------------------------------- ops
def test_qdq_and_kv_ops_match_a_float64_reference():
    x = _kv()
    want = ref_qdq(x, SCALES)
    # the same FP8 value everywhere; the float32 product q * s rounds once (2^-24 relative)
    torch.testing.assert_close(torch.ops.fp8fx.qdq(x, SCALES, 448.0, E4M3).double(), want, rtol=2 ** -23, atol=0)
    first = torch.ops.fp8fx.kv_append(torch.tensor([]), x, SCALES, 448.0, E4M3)
    both = torch.ops.fp8fx.kv_append(first, x, SCALES, 448.0, E4M3)
    assert first.dtype == E4M3 and both.shape == (2, 2, 10, 8)
    back = torch.ops.fp8fx.dequant(both, SCALES, torch.float32)
    torch.testing.assert_close(back.double(), torch.cat([want, want], dim=-2), rtol=2 ** -23, atol=0)
    codes = (x.double() / torch.tensor(SCALES).float().double().reshape(-1, 1, 1)).clamp(-448, 448).to(E4M3)
    assert torch.equal(first.view(torch.uint8), codes.view(torch.uint8))  # the stored bytes, exactly
    buf = torch.zeros(2, 2, 9, 8, dtype=E4M3)
    torch.ops.fp8fx.kv_index_copy_(buf, 2, torch.arange(3, 8), x, SCALES, 448.0, E4M3)
    assert torch.equal(buf[:, :, 3:8].view(torch.uint8), first.view(torch.uint8))
    # one scale per head: head 1 alone changes when its scale does
    other = torch.ops.fp8fx.qdq(x, [0.01, 0.01], 448.0, E4M3)
    assert torch.equal(other[:, 0], torch.ops.fp8fx.qdq(x, SCALES, 448.0, E4M3)[:, 0])


def test_sdpa_heads_matches_a_float64_reference():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 6, 8, generator=g), _kv(2)[:1, :, :6], _kv(3)[:1, :, :6]
    sq, sk, sv = [0.004, 0.006, 0.008, 0.01], SCALES, [0.008, 0.0004]
    sp, so = 1 / 448, 0.01
    got = torch.ops.fp8fx.sdpa(q, k, v, None, 0.0, True, None, True, sq, sk, sv, sp, so, 448.0, E4M3)
    qf, kf, vf = ref_qdq(q, sq), ref_qdq(k, sk), ref_qdq(v, sv)
    p = attention_probs(qf, kf, None, True, None, True).double()
    pq = (p / sp).clamp(-448, 448).to(E4M3).double() * sp
    out = pq @ vf.repeat_interleave(2, dim=-3)
    want = (out / so).clamp(-448, 448).to(E4M3).double() * so
    # float32 arithmetic inside the op: at most one FP8 step apart from the float64 reference
    assert (got.double() - want).abs().max() <= so * 32
    assert numerics.sqnr_db(want.float(), got) > 35


def test_a_scale_list_of_the_wrong_length_is_refused():
    x = _kv()  # GQA: 2 KV heads repeated to 4 query heads take each KV head's scale for its copies
    torch.testing.assert_close(torch.ops.fp8fx.qdq(x.repeat_interleave(2, dim=1), SCALES, 448.0, E4M3),
                               torch.ops.fp8fx.qdq(x, SCALES, 448.0, E4M3).repeat_interleave(2, dim=1), rtol=0, atol=0)
    with pytest.raises(QuantizationError, match="3 scale.*2 heads"):
        torch.ops.fp8fx.kv_append(torch.tensor([]), _kv(), [0.1, 0.1, 0.1], 448.0, E4M3)
    with pytest.raises(QuantizationError, match="heads at dim -3"):
        torch.ops.fp8fx.qdq(torch.randn(4, 4), [0.1], 448.0, E4M3)


def test_per_head_observer_records_one_maxabs_per_head():
    obs = MaxAbsObserver(per_head=True, where="node 'x'")
    a, b = _kv(0), _kv(1)
    obs(a), obs(b)
    want = torch.maximum(a.abs().amax(dim=(0, 2, 3)), b.abs().amax(dim=(0, 2, 3)))
    torch.testing.assert_close(obs.amax, want, rtol=0, atol=0)
    with pytest.raises(MeasurementError, match="node 'x'.*3 heads"):
        obs(torch.randn(1, 3, 2, 8))


# ------------------------------------------------------------------------------ models
def _skewed_llama():
    """A tiny Llama whose key head 1 is 10^4 times smaller than head 0, with the same function:
    the keys of KV head 1 are scaled by 1e-4 and the queries of its group by 1e4 (RoPE is linear
    per head, so the scores do not change). The values are left alone: the SDPA output keeps one
    scale per tensor, which skewed values would ruin whatever the KV scales."""
    model = tiny_llama(layers=1)
    d = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            a.k_proj.weight[d:2 * d] *= 1e-4
            a.q_proj.weight[2 * d:] *= 1e4
    return model


def _calibrate(model, path, strategy):
    cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(path), observer_params={"kv_cache_strategy": strategy},
                          blocklist={"types": ["linear"]})  # attention and KV cache only: their scales decide
    fp8fx.prepare(model, cfg)
    g = torch.Generator().manual_seed(0)
    for n in (9, 14):
        model.generate(torch.randint(0, 128, (1, n), generator=g), max_new_tokens=3, do_sample=False)
    fp8fx.finalize_calibration(model)
    return cfg


def test_per_head_scales_beat_per_tensor_when_heads_have_very_different_ranges(tmp_path):
    base = _skewed_llama()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = base(ids, use_cache=True)
    ref_keys = ref.past_key_values.layers[0].keys  # float32 [1, 2, 12, d]
    results = {}
    for strategy in ("tensor", "attn_head"):
        model = copy.deepcopy(base)
        _calibrate(model, tmp_path / strategy, strategy)
        fp8fx.convert(model)
        with torch.no_grad():  # a cache passed to a converted model gets FP8 storage
            out = model(ids, use_cache=True, past_key_values=DynamicCache(config=model.config))
        layer = out.past_key_values.layers[0]
        assert layer.keys.dtype == E4M3
        q = layer.fp8fx
        keys = (torch.ops.fp8fx.dequant(layer.keys, list(q.scale_k), torch.float32) if isinstance(q.scale_k, tuple)
                else torch.ops.fp8fx.dequant(layer.keys, q.scale_k, torch.float32))
        results[strategy] = [numerics.sqnr_db(ref_keys[:, h], keys[:, h]) for h in range(2)]
        results[strategy + " logits"] = numerics.sqnr_db(ref.logits, out.logits)
        if strategy == "attn_head":
            assert isinstance(q.scale_k, tuple) and len(q.scale_k) == 2 and q.scale_k[0] / q.scale_k[1] > 1000
            ops = {str(n.target) for g in model._fp8fx.compiled.graphs for n in g.gm.graph.nodes}
            assert {"fp8fx.sdpa.heads", "fp8fx.kv_append.heads", "fp8fx.dequant.heads"} <= ops
        else:
            assert isinstance(q.scale_k, float)
    # the small head: per tensor its keys fall below E4M3's normal range; per head they do not
    assert results["attn_head"][1] > 25 and results["attn_head"][1] > results["tensor"][1] + 10, results
    assert results["attn_head"][0] >= results["tensor"][0] - 0.5, results   # the large head loses nothing
    assert results["attn_head logits"] >= results["tensor logits"] - 0.5, results


def test_per_head_measurements_and_their_record(tmp_path):
    model = tiny_llama(layers=1)
    _calibrate(model, tmp_path / "m", "attn_head")
    doc = json.loads((tmp_path / "m_hooks_maxabs.json").read_text())
    assert doc["ObserverParams"]["kv_cache_strategy"] == "attn_head"
    nodes = doc["Nodes"]
    assert len(nodes["model.layers.0.self_attn.kv_cache_0"]["inputs"][0]) == 2   # (H_kv, 1)
    sdpa = nodes["model.layers.0.self_attn.sdpa_0"]
    assert [len(x) for x in sdpa["inputs"]] == [4, 2, 2] and [len(x) for x in sdpa["outputs"]] == [1, 1]


def test_per_head_config_refuses_per_tensor_measurements(tmp_path):
    model = tiny_llama(layers=1)
    reference = copy.deepcopy(model)
    cfg = _calibrate(model, tmp_path / "m", "tensor")
    qcfg = cfg.replace(mode="QUANTIZE", observer_params={"kv_cache_strategy": "attn_head"})
    with pytest.raises(MeasurementError, match=r"model\.layers\.0\.self_attn\.(kv_cache|sdpa)_\d.*'tensor'"):
        fp8fx.convert(reference, qcfg, example_kwargs={"input_ids": torch.randint(0, 128, (1, 5))})


def test_compile_backend_matches_the_converted_model_with_per_head_scales(tmp_path, fresh_dynamo):
    base = _skewed_llama()
    cfg = _calibrate(copy.deepcopy(base), tmp_path / "m", "attn_head")
    qcfg = cfg.replace(mode="QUANTIZE")
    converted = fp8fx.convert(copy.deepcopy(base), qcfg, example_kwargs={"input_ids": torch.randint(0, 128, (1, 5))})
    compiled = copy.deepcopy(base)
    compiled.forward = torch.compile(compiled.forward, backend="fp8fx", dynamic=True,
                                     options={"config": qcfg, "inductor": False})
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = converted(ids, use_cache=False).logits, compiled(ids, use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    cache = fp8fx.fp8_kv_cache(__import__("transformers").DynamicCache(config=compiled.config), compiled, qcfg)
    out = compiled.generate(ids, max_new_tokens=3, do_sample=False, past_key_values=cache)
    assert isinstance(cache.layers[0].fp8fx.scale_v, tuple) and cache.layers[0].keys.dtype == E4M3
    assert torch.equal(out, converted.generate(ids, max_new_tokens=3, do_sample=False))
