"""FP8 MoE experts (Fp8Experts) in the checkpoint formats: save -> check -> load round trips, the
per-expert layout on disk, the validators' MoE problems, and transformers as a consumer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import fp8fx
from fp8fx.errors import UnsupportedError
from fp8fx.export import CheckpointError, check_checkpoint, load_pretrained, save_pretrained
from fp8fx.export.checks import manifest_from_dir
from fp8fx.export.core import validate
from fp8fx.modules import Fp8Experts
from fp8fx.testing import assert_close

E4M3 = torch.float8_e4m3fn
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
NO_ATTENTION = {"types": ["sdpa", "matmul", "softmax", "kv_cache"]}


def _mixtral(inter: int = 64, hidden: int = 32):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
                                            sliding_window=None)).eval()


def _qwen3_moe(inter: int = 64, hidden: int = 32):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=128, hidden_size=hidden, intermediate_size=64,
                                              moe_intermediate_size=inter, num_hidden_layers=1, num_attention_heads=4,
                                              num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=64,
                                              num_experts=4, num_experts_per_tok=2)).eval()


def _qwen2_moe(inter: int = 64, hidden: int = 32):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=128, hidden_size=hidden, intermediate_size=64,
                                              moe_intermediate_size=inter, shared_expert_intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, num_experts=4, num_experts_per_tok=2)).eval()


BUILD = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "qwen2_moe": _qwen2_moe}
# the per-expert projection names on disk (transformers' conversion mapping, vLLM's model files)
NAMES = {"mixtral": ("model.layers.0.block_sparse_moe.experts", ("w1", "w3", "w2")),
         "qwen3_moe": ("model.layers.0.mlp.experts", ("gate_proj", "up_proj", "down_proj")),
         "qwen2_moe": ("model.layers.0.mlp.experts", ("gate_proj", "up_proj", "down_proj"))}


def _static(model, tmp_path):
    cfg = fp8fx.FP8Config(mode="MEASURE", scheme="FP8", dump_stats_path=str(tmp_path / "meas" / "m"),
                          blocklist=NO_ATTENTION)
    fp8fx.prepare(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=torch.randint(0, 128, (2, 16), generator=g))
    fp8fx.finalize_calibration(model)
    return fp8fx.convert(model, cfg.replace(mode="QUANTIZE"), example_inputs=(IDS,))


def _quantized(arch: str, scheme: str, tmp_path):
    """``arch`` with its experts (and Linears) in ``scheme``; FP8_BLOCK's 128x128 blocks and 1x128
    activation groups need I and H of 128 (compressed-tensors and vLLM raise otherwise)."""
    model = BUILD[arch](128, 128) if scheme == "FP8_BLOCK" else BUILD[arch]()
    if scheme == "FP8":
        return _static(model, tmp_path)
    return fp8fx.quantize(model, scheme, example_inputs=(IDS,))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _tensors(folder):
    out = {}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


# (format, scheme) pairs whose consumer runs FP8 experts (docs/export.md, "MoE experts")
CASES = [("compressed-tensors", "FP8"), ("compressed-tensors", "FP8_DYNAMIC"), ("compressed-tensors", "FP8_BLOCK"),
         ("vllm", "FP8"), ("vllm", "FP8_BLOCK"), ("modelopt", "FP8")]


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("fmt,scheme", CASES)
def test_save_check_load_is_bit_identical(arch, fmt, scheme, tmp_path):
    model = _quantized(arch, scheme, tmp_path)
    experts = model.get_submodule("model.layers.0.mlp.experts")
    assert isinstance(experts, Fp8Experts) and experts.gate_up_proj.dtype == E4M3
    out = save_pretrained(model, tmp_path / "ckpt", format=fmt)
    assert check_checkpoint(out).problems == []
    again = load_pretrained(out)
    loaded = again.get_submodule("model.layers.0.mlp.experts")
    assert isinstance(loaded, Fp8Experts)
    for p in Fp8Experts.PROJECTIONS:  # FP8 kept FP8, the very codes and scales
        assert getattr(loaded, p).dtype == E4M3
        assert torch.equal(getattr(loaded, p).view(torch.uint8), getattr(experts, p).view(torch.uint8))
        assert torch.equal(getattr(loaded, f"{p}_weight_scale"), getattr(experts, f"{p}_weight_scale"))
        assert loaded.schemes[p] == experts.schemes[p]
    assert torch.equal(_logits(again), _logits(model))


@pytest.mark.parametrize("arch", list(BUILD))
def test_layout_on_disk_is_one_linear_per_expert(arch, tmp_path):
    model = _quantized(arch, "FP8_DYNAMIC", tmp_path)
    out = save_pretrained(model, tmp_path / "ct")
    t = _tensors(out)
    prefix, (gate, up, down) = NAMES[arch]
    experts = model.get_submodule("model.layers.0.mlp.experts")
    inter = experts.gate_up_proj.shape[1] // 2
    for e in range(4):
        for name, shape in ((gate, (inter, 32)), (up, (inter, 32)), (down, (32, inter))):
            key = f"{prefix}.{e}.{name}"
            assert t[f"{key}.weight"].dtype == E4M3 and tuple(t[f"{key}.weight"].shape) == shape
            assert t[f"{key}.weight_scale"].dtype == torch.float32
            assert tuple(t[f"{key}.weight_scale"].shape) == (shape[0], 1)
            assert f"{key}.input_scale" not in t
        w = t[f"{prefix}.{e}.{gate}.weight"].view(torch.uint8)
        assert torch.equal(w, experts.gate_up_proj[e, :inter].view(torch.uint8))  # gate = the first I rows
        assert torch.equal(t[f"{prefix}.{e}.{up}.weight_scale"].reshape(-1),
                           experts.gate_up_proj_weight_scale[e, inter:])
    assert not any("gate_up_proj" in k or k.endswith("experts.down_proj") for k in t)
    router = "model.layers.0.block_sparse_moe.gate.weight" if arch == "mixtral" else "model.layers.0.mlp.gate.weight"
    assert router in t
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["config_groups"]["group_0"]["targets"] == ["Linear"] and "lm_head" in q["ignore"]


@pytest.mark.parametrize("arch", list(BUILD))
def test_names_are_the_ones_transformers_writes_for_the_same_model(arch, tmp_path):
    """transformers' own save_pretrained (its conversion mapping reverted) writes the expert
    weights under the same names fp8fx writes them."""
    hp = BUILD[arch]()
    hp.save_pretrained(tmp_path / "hf")
    theirs = {k for k in _tensors(tmp_path / "hf") if ".experts." in k or ".gate." in k}
    assert theirs
    ours = {k for k in _tensors(save_pretrained(_quantized(arch, "FP8_DYNAMIC", tmp_path), tmp_path / "fp8"))
            if (".experts." in k or ".gate." in k) and k.endswith(".weight")}
    assert ours == theirs


def test_static_scales_per_expert_and_per_format(tmp_path):
    model = _quantized("mixtral", "FP8", tmp_path)
    experts = model.model.layers[0].mlp.experts
    p = "model.layers.0.block_sparse_moe.experts"
    ct = _tensors(save_pretrained(model, tmp_path / "ct"))
    mo = _tensors(save_pretrained(model, tmp_path / "mo", format="modelopt"))
    for e in range(4):
        for name, proj in (("w1", "gate_up_proj"), ("w3", "gate_up_proj"), ("w2", "down_proj")):
            key = f"{p}.{e}.{name}"
            assert ct[f"{key}.weight_scale"].shape == (1,) and ct[f"{key}.input_scale"].shape == (1,)
            assert mo[f"{key}.weight_scale"].shape == () and mo[f"{key}.input_scale"].shape == ()
            assert float(ct[f"{key}.weight_scale"]) == float(getattr(experts, f"{proj}_weight_scale")[e])
            assert float(ct[f"{key}.input_scale"]) == float(getattr(experts, f"{proj}_input_scale"))
    hf = json.loads((tmp_path / "mo" / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "FP8"


def test_block_scales_are_split_by_block_rows(tmp_path):
    model = _quantized("mixtral", "FP8_BLOCK", tmp_path)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj_weight_scale.shape == (4, 2, 1)
    t = _tensors(save_pretrained(model, tmp_path / "v", format="vllm"))
    key = "model.layers.0.block_sparse_moe.experts.3.w3"
    assert t[f"{key}.weight_scale_inv"].shape == (1, 1) and f"{key}.weight_scale" not in t
    assert float(t[f"{key}.weight_scale_inv"]) == float(experts.gate_up_proj_weight_scale[3, 1, 0])


def test_round_trip_between_formats(tmp_path):
    model = _quantized("qwen3_moe", "FP8", tmp_path)
    ref = _logits(model)
    a = load_pretrained(save_pretrained(model, tmp_path / "ct"))
    b = load_pretrained(save_pretrained(a, tmp_path / "vllm", format="vllm"))
    c = load_pretrained(save_pretrained(b, tmp_path / "mo", format="modelopt"))
    d = load_pretrained(save_pretrained(c, tmp_path / "ct2"))
    for m in (a, b, c, d):
        assert torch.equal(_logits(m), ref)


@pytest.mark.parametrize("fmt,scheme", [("vllm", "FP8_DYNAMIC"), ("modelopt", "FP8_DYNAMIC"),
                                        ("modelopt", "FP8_BLOCK"), ("compressed-tensors", "FP8_WEIGHT_ONLY")])
def test_schemes_the_consumer_cannot_run_for_experts_are_refused(fmt, scheme, tmp_path):
    model = _quantized("mixtral", scheme, tmp_path)
    with pytest.raises(UnsupportedError, match=r"experts|per channel"):
        save_pretrained(model, tmp_path / "x", format=fmt)
    assert not (tmp_path / "x").exists()


def test_block_rows_that_straddle_gate_and_up_are_refused(tmp_path):
    model = fp8fx.quantize(_mixtral(64), {"weights": "block", "activations": "dynamic_group", "block": [128, 128],
                                          "group_size": 128}, example_inputs=(IDS,))
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\.mlp\.experts.*not a multiple"):
        save_pretrained(model, tmp_path / "x")


def test_mixed_high_precision_projection_is_refused(tmp_path):
    model = _mixtral()
    fp8fx.quantize(model, fp8fx.FP8Config(mode="QUANTIZE", scheme="FP8_DYNAMIC", blocklist={"names": [r"down_proj$"], **NO_ATTENTION}),
                   example_inputs=(IDS,))
    assert model.model.layers[0].mlp.experts.down_proj.dtype == torch.float32
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\.mlp\.experts: down_proj in high precision"):
        save_pretrained(model, tmp_path / "x")


def test_high_precision_experts_are_written_per_expert_and_ignored(tmp_path):
    model = _mixtral()
    fp8fx.quantize(model, fp8fx.FP8Config(mode="QUANTIZE", scheme="FP8_DYNAMIC", blocklist={"names": ["experts"], **NO_ATTENTION}),
                   example_inputs=(IDS,))
    assert not isinstance(model.model.layers[0].mlp.experts, Fp8Experts)
    p = "model.layers.0.block_sparse_moe.experts"
    for fmt, entry in (("compressed-tensors", r"re:^model\.layers\.0\.block_sparse_moe\.experts\.\d+\.[^.]+$"),
                       ("modelopt", p)):
        out = save_pretrained(model, tmp_path / fmt, format=fmt)
        q = json.loads((out / "config.json").read_text())["quantization_config"]
        assert entry in q.get("ignore", q.get("ignored_layers"))
        t = _tensors(out)
        assert t[f"{p}.2.w2.weight"].dtype == torch.float32 and f"{p}.2.w2.weight_scale" not in t
        assert check_checkpoint(out).problems == []
        assert torch.equal(_logits(load_pretrained(out)), _logits(model))


# ------------------------------------------------------------------------------- validators
def _saved(tmp_path, scheme="FP8_DYNAMIC", fmt="compressed-tensors"):
    return save_pretrained(_quantized("mixtral", scheme, tmp_path), tmp_path / "ok", format=fmt)


def _problems_after(folder, edit):
    from safetensors.torch import save_file

    t = _tensors(folder)
    edit(t)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return {p.where: p.what for p in validate(manifest_from_dir(folder)).problems}


def test_missing_expert_scale_is_reported_naming_the_tensor(tmp_path):
    folder = _saved(tmp_path)
    key = "model.layers.0.block_sparse_moe.experts.1.w3.weight_scale"
    problems = _problems_after(folder, lambda t: t.pop(key))
    assert key in problems and "missing" in problems[key]
    with pytest.raises(CheckpointError, match=r"experts\.1\.w3\.weight_scale"):
        load_pretrained(folder)


def test_wrong_expert_scale_shape_is_reported_naming_the_tensor(tmp_path):
    folder = _saved(tmp_path, "FP8", "vllm")
    key = "model.layers.0.block_sparse_moe.experts.0.w2.weight_scale"
    problems = _problems_after(folder, lambda t: t.__setitem__(key, torch.ones(32, 1)))
    assert key in problems and "shape [32, 1]" in problems[key]


def test_expert_count_mismatch_is_reported_naming_the_tensor(tmp_path):
    folder = _saved(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_local_experts"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    problems = {p.where: p.what for p in check_checkpoint(folder).problems}
    key = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    assert key in problems and "expert 3" in problems[key] and "3 experts" in problems[key]


def test_one_unquantized_expert_projection_is_reported(tmp_path):
    folder = _saved(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["ignore"].append("model.layers.0.block_sparse_moe.experts.2.w2")
    (folder / "config.json").write_text(json.dumps(cfg))
    problems = {p.where: p.what for p in check_checkpoint(folder).problems}
    assert "one scheme" in problems["model.layers.0.block_sparse_moe.experts"]


# --------------------------------------------------------------------------- transformers
def test_transformers_reads_the_compressed_tensors_moe_checkpoint(tmp_path):
    """transformers 5 loads the per-expert FP8 tensors through compressed-tensors (which
    decompresses each per-expert Linear: FP8 weight x scale) and its Mixtral conversion mapping
    (which stacks them into its fused float experts): its float32 logits are fp8fx's within FP8
    error, and its experts hold exactly fp8fx's dequantized weights."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model = _quantized("mixtral", "FP8_DYNAMIC", tmp_path)
    out = save_pretrained(model, tmp_path / "ct")
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = model.model.layers[0].mlp.experts
    experts = theirs.model.layers[0].mlp.experts
    for p in Fp8Experts.PROJECTIONS:
        dequant = getattr(ours, p).float() * getattr(ours, f"{p}_weight_scale")[..., None]
        assert torch.equal(getattr(experts, p).float(), dequant), p
    with torch.no_grad():
        got = theirs(IDS).logits
    assert_close(got, _logits(model))
