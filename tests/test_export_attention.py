"""FP8 attention (fp8fx's SDPA, beyond the KV cache) in the exported checkpoints: the query scale as
``q_scale`` in compressed-tensors (an ``attention`` config group) and vLLM "fp8", refused in ModelOpt;
the probabilities' and output's scales refused unless ``save_pretrained(attention="qkv")`` drops them;
validator traps; save -> load -> save bit for bit."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import fp8fx
from fp8fx import cli
from fp8fx.errors import ConfigError, UnsupportedError
from fp8fx.export import check_checkpoint, load_pretrained, save_pretrained
from fp8fx.export.plan import AttentionScales, plan_of
from fp8fx.passes.rewrite_attention import AttentionQuant
from fp8fx.state import state_of
from tiny_models import tiny_llama

IDS = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
LAYERS = ("model.layers.0.self_attn", "model.layers.1.self_attn")
A0 = LAYERS[0]
ATTN_ARGS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}


def _calibrated(tmp: Path, attn: str = "sdpa", blocklist_types=(), **observer):
    model = tiny_llama(layers=2, attn=attn)
    cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp / "m"),
                          blocklist={"names": ["lm_head"], "types": list(blocklist_types)},
                          **({"observer_params": observer} if observer else {}))
    fp8fx.prepare(model, cfg)
    model.generate(IDS, max_new_tokens=2, do_sample=False)
    fp8fx.finalize_calibration(model)
    fp8fx.convert(model)
    return model


@pytest.fixture(scope="module")
def fp8_attention(tmp_path_factory):
    """Static FP8 Linears, FP8 SDPA and an FP8 KV cache in both layers."""
    model = _calibrated(tmp_path_factory.mktemp("meas"))
    assert fp8fx.report(model)["nodes_quantized"] == {"linear": 14, "sdpa": 2, "kv_cache": 4}
    return model


@pytest.fixture(scope="module")
def saved(fp8_attention, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    return {fmt: save_pretrained(fp8_attention, root / fmt, format=fmt, attention="qkv")
            for fmt in ("compressed-tensors", "vllm")}


def _sdpa_scales(model, path: str) -> tuple:
    return state_of(model).attention[f"{path}.sdpa_0"].scales


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _edit(folder: Path, config=None, tensors=None) -> None:
    from safetensors.torch import save_file

    if config is not None:
        cfg = json.loads((folder / "config.json").read_text())
        config(cfg["quantization_config"])
        (folder / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        d = _tensors(folder)
        tensors(d)
        save_file(d, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("fmt", ["compressed-tensors", "vllm"])
def test_by_default_the_probability_and_output_scales_are_refused(tmp_path, fp8_attention, fmt):
    with pytest.raises(UnsupportedError, match=rf"{A0}.*probabilities and output.*attention=\"qkv\""):
        save_pretrained(fp8_attention, tmp_path / "x", format=fmt)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("mode", ["refuse", "qkv"])
def test_modelopt_holds_no_query_scale(tmp_path, fp8_attention, mode):
    with pytest.raises(UnsupportedError, match="cannot be written as ModelOpt.*postprocess_state_dict"):
        save_pretrained(fp8_attention, tmp_path / "x", format="modelopt", attention=mode)


def test_an_unknown_attention_mode_is_a_config_error(tmp_path, fp8_attention):
    with pytest.raises(ConfigError, match="attention='all'.*'refuse', 'qkv'"):
        save_pretrained(fp8_attention, tmp_path / "x", attention="all")


def test_attention_in_matmul_softmax_form_is_refused(tmp_path):
    model = _calibrated(tmp_path, attn="eager")
    with pytest.raises(UnsupportedError, match=r"matmul/softmax form \(model\.layers\.0\.self_attn\.matmul_0.*sdpa"):
        save_pretrained(model, tmp_path / "x", attention="qkv")


def test_per_head_query_scales_are_refused(tmp_path):
    model = _calibrated(tmp_path, kv_cache_strategy="attn_head")
    with pytest.raises(UnsupportedError, match=rf"{A0}\.sdpa_0: per-head query/key/value scales"):
        save_pretrained(model, tmp_path / "x", attention="qkv")


def test_sdpa_key_scales_other_than_the_caches_are_refused(tmp_path, fp8_attention):
    nodes = state_of(fp8_attention).attention
    name = f"{A0}.sdpa_0"
    real = nodes[name]
    s_q, s_k, s_v, s_p, s_o = real.scales
    nodes[name] = AttentionQuant(real.kind, (s_q, 2 * s_k, s_v, s_p, s_o), real.fp8_dtype, real.fp8_max)
    try:
        with pytest.raises(UnsupportedError, match=rf"{A0}: its SDPA .* one key and one value scale"):
            save_pretrained(fp8_attention, tmp_path / "x", attention="qkv")
    finally:
        nodes[name] = real


def test_fp8_attention_in_some_layers_only_is_refused_naming_the_missing_scale(tmp_path, fp8_attention):
    nodes = state_of(fp8_attention).attention
    name = f"{LAYERS[1]}.sdpa_0"
    real = nodes.pop(name)
    try:
        for fmt in ("compressed-tensors", "vllm"):
            with pytest.raises(fp8fx.export.CheckpointError, match=rf"{LAYERS[1]}\.q_scale: missing"):
                save_pretrained(fp8_attention, tmp_path / fmt, format=fmt, attention="qkv")
    finally:
        nodes[name] = real


# ------------------------------------------------------------------------------------- layouts
def test_compressed_tensors_layout(fp8_attention, saved):
    folder = saved["compressed-tensors"]
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert q["config_groups"]["attention"] == {"targets": ["LlamaAttention"], "weights": None,
                                               "input_activations": ATTN_ARGS, "output_activations": None}
    assert q["kv_cache_scheme"] == ATTN_ARGS
    d = _tensors(folder)
    for path in LAYERS:
        s_q, s_k, s_v, _, _ = _sdpa_scales(fp8_attention, path)
        for key, want in (("q_scale", s_q), ("k_scale", s_k), ("v_scale", s_v)):
            t = d[f"{path}.{key}"]
            assert (t.dtype, tuple(t.shape)) == (torch.float32, (1,)) and t.item() == want
        assert f"{path}.prob_scale" not in d
    report = check_checkpoint(folder)
    assert report.problems == [] and "FP8 attention (query scales): yes" in report.summary()
    assert any("q_scale loads as an unexpected key" in n for n in report.notes)


def test_vllm_layout(fp8_attention, saved):
    folder = saved["vllm"]
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert q == {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
    d = _tensors(folder)
    for path in LAYERS:
        s_q = _sdpa_scales(fp8_attention, path)[0]
        t = d[f"{path}.q_scale"]
        assert (t.dtype, tuple(t.shape), t.item()) == (torch.float32, (1,), s_q)
        assert f"{path}.prob_scale" not in d and f"{path}.k_scale" in d
    assert check_checkpoint(folder).problems == []


def test_without_an_fp8_kv_cache_the_sdpa_key_and_value_scales_become_the_caches(tmp_path):
    model = _calibrated(tmp_path, blocklist_types=["kv_cache"])
    folder = save_pretrained(model, tmp_path / "ct", attention="qkv")
    d = _tensors(folder)
    s_q, s_k, s_v, _, _ = _sdpa_scales(model, A0)
    assert (d[f"{A0}.q_scale"].item(), d[f"{A0}.k_scale"].item(), d[f"{A0}.v_scale"].item()) == (s_q, s_k, s_v)
    assert check_checkpoint(folder).problems == []


# ---------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("fmt", ["compressed-tensors", "vllm"])
def test_save_load_save_keeps_the_query_scales_bit_for_bit(tmp_path, saved, fmt):
    ours = load_pretrained(saved[fmt])
    plan = plan_of(ours)
    assert set(plan.attention) == set(LAYERS)
    assert all(isinstance(a, AttentionScales) and a.dropped == () for a in plan.attention.values())
    again = save_pretrained(ours, tmp_path / "again", format=fmt)  # nothing to drop: the default mode saves it
    assert (again / "model.safetensors").read_bytes() == (saved[fmt] / "model.safetensors").read_bytes()
    assert json.loads((again / "config.json").read_text())["quantization_config"] == \
        json.loads((saved[fmt] / "config.json").read_text())["quantization_config"]
    out = ours.generate(IDS, max_new_tokens=2, do_sample=False)  # FP8 KV cache, the query in high precision
    assert out.shape == (1, IDS.shape[1] + 2)


def test_the_loaded_query_scales_are_refused_by_modelopt(tmp_path, saved):
    with pytest.raises(UnsupportedError, match="cannot be written as ModelOpt"):
        save_pretrained(load_pretrained(saved["vllm"]), tmp_path / "mo", format="modelopt")


def test_transformers_loads_the_export_and_ignores_the_query_scale(saved):
    """transformers 5.24 with compressed-tensors 0.20 applies neither the kv_cache_scheme nor the
    attention group to its attention modules (the note says so): q_scale is an unexpected key."""
    pytest.importorskip("compressed_tensors", reason="needs the compressed-tensors package")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(saved["compressed-tensors"], dtype=torch.float32).eval()
    assert not hasattr(hf.get_submodule(A0), "q_scale")
    assert torch.isfinite(hf(IDS, use_cache=False).logits).all()


# ------------------------------------------------------------------------------- validator traps
CT_TRAPS = {
    "q_scale_missing": (None, lambda d: d.pop(f"{A0}.q_scale"), f"{A0}.q_scale: missing"),
    "q_scale_zero": (None, lambda d: d.update({f"{A0}.q_scale": torch.zeros(1)}), f"{A0}.q_scale: 1 of 1"),
    "q_scale_per_head": (None, lambda d: d.update({f"{A0}.q_scale": torch.ones(4, 1, 1)}),
                         rf"{A0}.q_scale: shape \[4, 1, 1\]"),
    "q_scale_int": (None, lambda d: d.update({f"{A0}.q_scale": torch.ones(1, dtype=torch.int32)}),
                    f"{A0}.q_scale: dtype I32"),
    "group_per_head": (lambda q: q["config_groups"]["attention"]["input_activations"].update(strategy="attn_head"),
                       None, "config_groups.attention.input_activations"),
    "group_with_weights": (lambda q: q["config_groups"]["attention"].update(weights=dict(ATTN_ARGS)), None,
                           "config_groups.attention.weights"),
    "group_by_name": (lambda q: q["config_groups"]["attention"].update(targets=["re:.*self_attn$"]), None,
                      "config_groups.attention.targets.*'Attention' class name"),
    "no_kv_cache_scheme": (lambda q: q.update(kv_cache_scheme=None), None,
                           "kv_cache_scheme: null, but a config group quantizes attention"),
    "no_attention_group": (lambda q: q["config_groups"].pop("attention"), None,
                           f"{A0}.q_scale: present, but no config group quantizes"),
}


@pytest.mark.parametrize("trap", list(CT_TRAPS))
def test_compressed_tensors_traps_name_the_tensor_or_key(tmp_path, saved, trap):
    config, tensors, want = CT_TRAPS[trap]
    folder = _copy(saved["compressed-tensors"], tmp_path / "ct")
    _edit(folder, config, tensors)
    problems = [str(p) for p in check_checkpoint(folder).problems]
    assert any(re.search(want, p) for p in problems), problems


VLLM_TRAPS = {
    "q_scale_missing_in_one_layer": (lambda d: d.pop(f"{A0}.q_scale"), f"{A0}.q_scale: missing"),
    "q_scale_negative": (lambda d: d.update({f"{A0}.q_scale": -torch.ones(1)}), f"{A0}.q_scale: 1 of 1"),
    "q_scale_per_head": (lambda d: d.update({f"{A0}.q_scale": torch.ones(4)}), rf"{A0}.q_scale: shape \[4\]"),
    "prob_scale": (lambda d: d.update({f"{A0}.prob_scale": torch.ones(1)}), f"{A0}.prob_scale: vLLM's loader maps"),
    "q_scale_without_kv": (lambda d: [d.pop(f"{p}.{k}") for p in LAYERS for k in ("k_scale", "v_scale")],
                           f"{A0}.q_scale: present without k_scale/v_scale"),
}


@pytest.mark.parametrize("trap", list(VLLM_TRAPS))
def test_vllm_traps_name_the_tensor(tmp_path, saved, trap):
    tensors, want = VLLM_TRAPS[trap]
    folder = _copy(saved["vllm"], tmp_path / "v")
    _edit(folder, tensors=tensors)
    problems = [str(p) for p in check_checkpoint(folder).problems]
    assert any(re.search(want, p) for p in problems), problems


def test_fp8fx_check_reports_a_trap(tmp_path, saved, capsys):
    assert cli.main(["check", str(saved["compressed-tensors"])]) == 0
    folder = _copy(saved["compressed-tensors"], tmp_path / "ct")
    _edit(folder, tensors=lambda d: d.update({f"{A0}.q_scale": torch.zeros(1)}))
    assert cli.main(["check", str(folder)]) == 1
    assert f"{A0}.q_scale" in capsys.readouterr().out


def test_a_query_scale_in_a_modelopt_checkpoint_is_reported(tmp_path, fp8_attention):
    """A ModelOpt save of the same calibration without FP8 SDPA, then a q_scale added by hand."""
    from fp8fx.passes.match import OpKind

    nodes = state_of(fp8_attention).attention
    sdpa = {n: q for n, q in nodes.items() if q.kind is OpKind.SDPA}
    for n in sdpa:
        del nodes[n]
    try:
        folder = save_pretrained(fp8_attention, tmp_path / "mo", format="modelopt")
    finally:
        nodes.update(sdpa)
    assert check_checkpoint(folder).problems == []
    _edit(folder, tensors=lambda d: d.update({f"{A0}.q_proj.q_scale": torch.ones(())}))
    problems = [str(p) for p in check_checkpoint(folder).problems]
    assert any(p.startswith(f"{A0}.q_proj.q_scale: a query scale in a ModelOpt checkpoint") for p in problems), problems


def test_cli_quantize_attention_saves_the_query_scale_only_when_asked(tmp_path, capsys):
    from test_data import build_tiny_hf_folder, write_tiny_text

    model = build_tiny_hf_folder(tmp_path / "model")
    text = write_tiny_text(tmp_path / "eval.txt", repeats=2)
    argv = ["quantize", "--model", str(model), "--calib", str(text), "--eval", str(text), "--window", "16",
            "--no-progress", "--attention"]
    assert cli.main([*argv, "--save-attention", "qkv"]) == 2 and "--save" in capsys.readouterr().err
    assert cli.main([*argv, "--save", str(tmp_path / "no")]) == 2
    assert 'attention="qkv"' in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert cli.main([*argv, "--save", str(tmp_path / "q"), "--save-attention", "qkv"]) == 0
    assert check_checkpoint(tmp_path / "q").problems == []
    assert _has_q_scale(tmp_path / "q")


def _has_q_scale(folder) -> bool:
    from safetensors import safe_open

    keys = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys.update(st.keys())
    return any(k.endswith("self_attn.q_scale") for k in keys)
