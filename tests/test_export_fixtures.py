"""Checkpoints that llm-compressor itself wrote (tests/fixtures/llmcompressor, made by
scripts/make_llmcompressor_fixtures.py in an environment of its own) load in fp8fx with their FP8
bytes and scales as written, give the outputs transformers gives for them (both in float32), and
save again in fp8fx's formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import fp8fx
from fp8fx.export import check_checkpoint, load_pretrained, save_pretrained
from fp8fx.export.plan import LOADED_ATTR
from fp8fx.schemes import ActivationScheme, WeightGranularity

FIXTURES = Path(__file__).parent / "fixtures" / "llmcompressor"
IDS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
E4M3 = torch.float8_e4m3fn
# fixture -> (weight granularity, activation scheme) that llm-compressor's preset means
EXPECTED = {
    "fp8_dynamic": (WeightGranularity.CHANNEL, ActivationScheme.DYNAMIC_TOKEN),
    "fp8_block": (WeightGranularity.BLOCK, ActivationScheme.DYNAMIC_GROUP),
    "fp8_static": (WeightGranularity.TENSOR, ActivationScheme.STATIC),
    "fp8_static_kv": (WeightGranularity.TENSOR, ActivationScheme.STATIC),
}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _fp8_linears(model) -> dict[str, fp8fx.Fp8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, fp8fx.Fp8Linear)}


def test_the_fixtures_are_what_the_script_says():
    versions = json.loads((FIXTURES / "versions.json").read_text())
    assert versions["llmcompressor"].startswith("0.14")
    for name in [*EXPECTED, "fp8_block_partial"]:
        q = json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]
        assert q["quant_method"] == "compressed-tensors" and q["quantization_status"] == "compressed"
        assert q["ignore"] == ["lm_head"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_llm_compressor_checkpoints_load_as_written(name):
    folder = FIXTURES / name
    assert check_checkpoint(folder).problems == []
    model = load_pretrained(folder)
    file = _tensors(folder)
    linears = _fp8_linears(model)
    quantized = {k[: -len(".weight")] for k, t in file.items() if t.dtype == E4M3}
    assert set(linears) == quantized and len(quantized) == 14  # 7 Linears a layer, lm_head ignored
    weights, activations = EXPECTED[name]
    for path, m in linears.items():
        assert m.weight.dtype == E4M3  # never materialized in high precision
        assert torch.equal(m.weight.view(torch.uint8), file[f"{path}.weight"].view(torch.uint8)), path
        assert torch.equal(m.weight_scale.float().reshape(-1), file[f"{path}.weight_scale"].float().reshape(-1)), path
        assert m.scheme.weights is weights and m.scheme.activations is activations, (path, m.scheme)
        if activations is ActivationScheme.STATIC:
            assert float(m.input_scale) == float(file[f"{path}.input_scale"].float()), path
    assert type(model.lm_head) is torch.nn.Linear


@pytest.mark.parametrize("name", list(EXPECTED))
def test_llm_compressor_checkpoints_give_the_outputs_transformers_gives(name):
    """transformers (with compressed-tensors) decompresses the FP8 weights and fake-quantizes the
    activations; fp8fx runs its FP8 kernels. Both in float32 (the checkpoints are bf16: in bf16,
    transformers rounds scales and activations to bf16, which alone moves the logits)."""
    pytest.importorskip("compressed_tensors", reason="transformers needs the compressed-tensors package")
    from transformers import AutoModelForCausalLM

    folder = FIXTURES / name
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_pretrained(folder).float()
    assert all(m.weight.dtype == E4M3 for m in _fp8_linears(ours).values())  # .float() leaves FP8 weights FP8
    with torch.no_grad():
        fp8fx.testing.assert_close(hf(IDS, use_cache=False).logits, ours(IDS, use_cache=False).logits)


@pytest.mark.parametrize("name,fmt", [("fp8_dynamic", "compressed-tensors"), ("fp8_block", "vllm"),
                                      ("fp8_static", "vllm")])
def test_llm_compressor_checkpoints_save_again_in_fp8fx_formats(tmp_path, name, fmt):
    ours = load_pretrained(FIXTURES / name)
    again = load_pretrained(save_pretrained(ours, tmp_path / fmt, format=fmt))
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, ours(IDS).logits)


def test_the_kv_cache_scales_llm_compressor_wrote_are_the_ones_fp8fx_runs_with():
    """transformers drops these (it loads them as unexpected keys); fp8fx's cache stores FP8 with them."""
    from transformers import DynamicCache

    folder = FIXTURES / "fp8_static_kv"
    file = _tensors(folder)
    model = load_pretrained(folder)
    assert set(model.__dict__[LOADED_ATTR].kv) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    cache = DynamicCache(config=model.config)
    out = model.generate(IDS[:1, :8], max_new_tokens=4, do_sample=False, cache=cache)
    assert out.shape == (1, 12)
    for i, layer in enumerate(cache.layers):
        path = f"model.layers.{i}.self_attn"
        assert layer.keys.dtype == E4M3 and layer.values.dtype == E4M3 and layer.keys.shape[-2] == 11
        assert layer.fp8fx.scale_k == float(file[f"{path}.k_scale"].float()) > 0
        assert layer.fp8fx.scale_v == float(file[f"{path}.v_scale"].float()) > 0


def test_check_says_which_layers_of_a_partial_block_checkpoint_compressed_tensors_cannot_run():
    """llm-compressor writes FP8_BLOCK for a 320-wide down_proj (128 does not divide it) with only
    a warning; compressed-tensors' forward then raises on that layer's input (its 1x128
    activation groups must divide K). fp8fx check names both layers."""
    report = check_checkpoint(FIXTURES / "fp8_block_partial")
    where = sorted(p.where for p in report.problems)
    assert where == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert all("group_size 128" in p.what for p in report.problems)
