"""The NVIDIA ModelOpt FP8 checkpoint (hf_quant_config.json): save, check and load, layouts as vLLM's
ModelOptFp8Config reads them, conversions to and from the other formats, and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import fp8fx
from fp8fx.errors import UnsupportedError
from fp8fx.export import CheckpointError, check_checkpoint, load_pretrained, save_pretrained
from export_helpers import E4M3, IDS, assert_check_names, assert_same_model, calibrated, quantized
from tiny_models import tiny_llama

Q = "model.layers.0.self_attn.q_proj"
ATTN = "model.layers.1.self_attn"


def _block():
    """FP8_BLOCK on a model whose every Linear is a multiple of 128 (FP8_PB_WO needs it): k/v_proj
    are 4 heads x 32 = 128 rows."""
    return quantized("FP8_BLOCK", hidden=128, kv_heads=4)


@pytest.fixture(scope="module")
def static_kv(tmp_path_factory):
    """Static per-tensor FP8 Linears plus an FP8 KV cache, calibrated (other attention ops in hp)."""
    model = calibrated(tiny_llama(layers=2), tmp_path_factory.mktemp("meas") / "m")
    assert fp8fx.report(model)["nodes_quantized"] == {"linear": 14, "kv_cache": 4}
    return model


@pytest.fixture(scope="module")
def dynamic():
    return quantized("FP8_DYNAMIC")


def _header(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape), read from the file header as a consumer reads it."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}


def _json(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


# ------------------------------------------------------------------------- layout as consumers read it
LAYOUTS = [  # scheme, model, quant_algo, weight_scale shape of q_proj [out=64|128, in=64|128]
    ("FP8_DYNAMIC", lambda: quantized("FP8_DYNAMIC"), "FP8_PER_CHANNEL_PER_TOKEN", [64]),
    ("FP8_BLOCK", _block, "FP8_PB_WO", [1, 1, 1, 1]),
]


@pytest.mark.parametrize("scheme,build,algo,ws_shape", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_layout_names_dtypes_shapes_and_json_keys(tmp_path, scheme, build, algo, ws_shape):
    model = build()
    out = save_pretrained(model, tmp_path / "mo", format="modelopt")
    hq = _json(out, "hf_quant_config.json")
    assert set(hq) == {"producer", "quantization"} and hq["producer"]["name"] == "fp8fx"
    assert hq["quantization"] == {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    qc = _json(out, "config.json")["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == algo and qc["ignore"] == ["lm_head"]
    assert "config_groups" not in qc and "kv_cache_scheme" not in qc  # ModelOpt writes them for FP8 / FP8 KV only
    head = _header(out)
    assert head[f"{Q}.weight"] == ("F8_E4M3", [64, 64] if scheme == "FP8_DYNAMIC" else [128, 128])
    assert head[f"{Q}.weight_scale"] == ("F32", ws_shape)
    assert not any(k.endswith("input_scale") for k in head)  # dynamic activations
    assert head["lm_head.weight"][0] == "F32" and "lm_head.weight_scale" not in head
    report = check_checkpoint(out)
    assert report.problems == [] and report.format.NAME == "modelopt"
    assert any("transformers" in n for n in report.notes)


def test_static_fp8_and_kv_cache_scales_round_trip_and_generate(tmp_path, static_kv):
    out = save_pretrained(static_kv, tmp_path / "mo", format="modelopt")
    hq = _json(out, "hf_quant_config.json")["quantization"]
    assert hq["quant_algo"] == "FP8" and hq["kv_cache_quant_algo"] == "FP8"
    qc = _json(out, "config.json")["quantization_config"]
    assert qc["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    head = _header(out)
    # per-tensor scales as ModelOpt writes them: 0-d F32 (vLLM loads 0-d or [1])
    assert head[f"{Q}.weight_scale"] == ("F32", []) and head[f"{Q}.input_scale"] == ("F32", [])
    assert head[f"{ATTN}.k_proj.k_scale"] == ("F32", []) and head[f"{ATTN}.v_proj.v_scale"] == ("F32", [])
    assert f"{ATTN}.k_scale" not in head
    report = check_checkpoint(out)
    assert report.problems == [] and set(report.plan.kv) == {"model.layers.0.self_attn", ATTN}
    loaded = load_pretrained(out)
    assert_same_model(loaded, static_kv, weight_scales=True)
    assert torch.equal(loaded(IDS).logits, static_kv(IDS).logits)
    kw = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    got, ref = loaded.generate(IDS, **kw), static_kv.generate(IDS, **kw)
    assert all(layer.keys.dtype == E4M3 for layer in got.past_key_values.layers)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):  # converted: dynamo graph; loaded: eager (same ops)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the KV scales travel on: modelopt -> vllm -> modelopt
    again = load_pretrained(save_pretrained(loaded, tmp_path / "v", format="vllm"))
    back = save_pretrained(again, tmp_path / "mo2", format="modelopt")
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(_same_bits(a[k], b[k]) for k in a)


@pytest.mark.parametrize("build", [lambda: quantized("FP8_DYNAMIC"), _block], ids=["dynamic", "block"])
def test_round_trip_bit_identical_and_through_compressed_tensors(tmp_path, build):
    model = build()
    ref = model(IDS).logits
    out = save_pretrained(model, tmp_path / "mo", format="modelopt")
    loaded = load_pretrained(out)
    assert_same_model(loaded, model, weight_scales=True)
    assert torch.equal(loaded(IDS).logits, ref)
    ct = save_pretrained(loaded, tmp_path / "ct", format="compressed-tensors")
    assert check_checkpoint(ct).problems == []
    back = save_pretrained(load_pretrained(ct), tmp_path / "mo2", format="modelopt")
    assert torch.equal(load_pretrained(back)(IDS).logits, ref)
    assert _header(back) == _header(out)
    assert _json(back, "hf_quant_config.json") == _json(out, "hf_quant_config.json")


# ------------------------------------------------------------------------------------- refusals
BLOCK32 = {"weights": "block", "activations": "dynamic_group", "block": [32, 32], "group_size": 32}


@pytest.mark.parametrize("scheme,needle", [
    ("FP8_WEIGHT_ONLY", "no FP8 weight-only algorithm"),
    ({"weights": "tensor", "activations": "dynamic_token"}, "compressed-tensors or vllm"),
    (BLOCK32, "FP8_PB_WO is 128x128"),
], ids=["weight_only", "tensor_dynamic", "block32"])
def test_schemes_modelopt_cannot_hold_are_refused_before_writing(tmp_path, scheme, needle):
    model = quantized(scheme)
    with pytest.raises(UnsupportedError, match=needle):
        save_pretrained(model, tmp_path / "m", format="modelopt")
    assert list(tmp_path.iterdir()) == []


def test_mixed_schemes_are_refused_naming_compressed_tensors(tmp_path):
    model = quantized("FP8_DYNAMIC")
    other = quantized("FP8_WEIGHT_ONLY")
    model.model.layers[1].mlp.down_proj = other.model.layers[1].mlp.down_proj  # a model with two schemes
    with pytest.raises(UnsupportedError, match="mixes 2 schemes.*compressed-tensors"):
        save_pretrained(model, tmp_path / "m", format="modelopt")
    assert list(tmp_path.iterdir()) == []


def test_block_layers_that_are_not_multiples_of_128_are_refused(tmp_path):
    model = quantized("FP8_BLOCK", hidden=128)  # k_proj/v_proj: 2 heads x 32 = 64 rows
    with pytest.raises(CheckpointError, match=r"self_attn\.k_proj\.weight: shape \[64, 128\]: FP8_PB_WO"):
        save_pretrained(model, tmp_path / "m", format="modelopt")
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------ the traps
def _edit(folder: Path, config=None, hf=None, tensors=None):
    """``config(q, cfg)`` edits config.json, ``hf(d)`` hf_quant_config.json, ``tensors(d)`` the tensors."""
    from safetensors.torch import load_file, save_file

    if config is not None:
        cfg = _json(folder, "config.json")
        config(cfg.get("quantization_config"), cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    if hf is not None:
        d = _json(folder, "hf_quant_config.json")
        hf(d)
        (folder / "hf_quant_config.json").write_text(json.dumps(d))
    if tensors is not None:
        d = load_file(str(folder / "model.safetensors"))
        tensors(d)
        save_file(d, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _exclude_both(pattern):
    return {"config": lambda q, c: q["ignore"].append(pattern),
            "hf": lambda d: d["quantization"]["exclude_modules"].append(pattern)}


TRAPS = {
    "missing_weight_scale": ("dyn", {"tensors": lambda d: d.pop(f"{Q}.weight_scale")}, f"{Q}.weight_scale: missing"),
    "channel_scale_as_column": ("dyn", {"tensors": lambda d: d.update({f"{Q}.weight_scale":
                                                                       d[f"{Q}.weight_scale"].reshape(-1, 1)})},
                                f"{Q}.weight_scale: shape [64, 1]"),
    "block_scale_2d": ("block", {"tensors": lambda d: d.update({f"{Q}.weight_scale": d[f"{Q}.weight_scale"]
                                                               .reshape(1, 1)})}, f"{Q}.weight_scale: shape [1, 1]"),
    "zero_scale": ("dyn", {"tensors": lambda d: d[f"{Q}.weight_scale"].zero_()}, f"{Q}.weight_scale: 64 of 64"),
    "hp_weight_in_quantized_layer": ("dyn", {"tensors": lambda d: d.update({f"{Q}.weight": d[f"{Q}.weight"].float()})},
                                     f"{Q}.weight: dtype F32"),
    "wildcard_excludes_quantized_layer": ("dyn", _exclude_both("model.layers.0.mlp*"),
                                          "model.layers.0.mlp.down_proj.weight: F8_E4M3, but 'model.layers.0.mlp*' "
                                          "excludes"),
    "substring_excludes_quantized_layer": ("dyn", _exclude_both("self_attn.q_proj"),
                                           f"{Q}.weight: F8_E4M3, but 'self_attn.q_proj' excludes"),
    "exclude_typo": ("dyn", _exclude_both("lm_haed"), "'lm_haed' names no module"),
    "configs_disagree_algo": ("dyn", {"hf": lambda d: d["quantization"].update(quant_algo="FP8")},
                              "quant_algo: 'FP8_PER_CHANNEL_PER_TOKEN', but hf_quant_config.json says 'FP8'"),
    "configs_disagree_exclude": ("dyn", {"hf": lambda d: d["quantization"].update(exclude_modules=[])},
                                 "the consumers would quantize different layers"),
    "unsupported_algo": ("dyn", {"config": lambda q, c: q.update(quant_algo="NVFP4"),
                                 "hf": lambda d: d["quantization"].update(quant_algo="NVFP4")},
                         "'NVFP4'; fp8fx reads the ModelOpt FP8 algorithms"),
    "input_scale_with_dynamic": ("dyn", {"tensors": lambda d: d.update({f"{Q}.input_scale": torch.tensor(0.1)})},
                                 f"{Q}.input_scale: present"),
    "missing_input_scale": ("kv", {"tensors": lambda d: d.pop(f"{Q}.input_scale")}, f"{Q}.input_scale: missing"),
    "kv_scale_missing": ("kv", {"tensors": lambda d: d.pop(f"{ATTN}.v_proj.v_scale")},
                         f"{ATTN}.v_proj.v_scale: missing"),
    "kv_algo_null": ("kv", {"config": lambda q, c: q.pop("kv_cache_scheme"),
                            "hf": lambda d: d["quantization"].update(kv_cache_quant_algo=None)},
                     f"{ATTN}.k_proj.k_scale: present but kv_cache_quant_algo is null"),
    "kv_scale_vllm_name": ("kv", {"tensors": lambda d: d.update({f"{ATTN}.k_scale": d.pop(f"{ATTN}.k_proj.k_scale")})},
                           f"{ATTN}.k_scale: ModelOpt names this scale"),
    "producer_not_modelopt_without_config": ("dyn", {"config": lambda q, c: c.pop("quantization_config")},
                                             "producer.name is 'modelopt'"),
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, static_kv, dynamic):
    root = tmp_path_factory.mktemp("clean")
    return {"dyn": save_pretrained(dynamic, root / "dyn", format="modelopt"),
            "block": save_pretrained(_block(), root / "block", format="modelopt"),
            "kv": save_pretrained(static_kv, root / "kv", format="modelopt")}


@pytest.mark.parametrize("base,edits,needle", list(TRAPS.values()), ids=list(TRAPS))
def test_check_names_the_tensor_or_key_of_every_trap(tmp_path, clean, base, edits, needle):
    folder = tmp_path / "ckpt"
    shutil.copytree(clean[base], folder)
    assert check_checkpoint(folder).problems == []
    _edit(folder, **edits)
    assert_check_names(folder, needle)


def test_reads_checkpoints_the_way_modelopt_writes_them(tmp_path, clean, dynamic):
    """ModelOpt's own files: producer modelopt, a lowercase or prefix-wildcard spelling, and older exports with
    only hf_quant_config.json (config.json without quantization_config)."""
    folder = tmp_path / "m"
    shutil.copytree(clean["dyn"], folder)

    def hf(d):
        d["producer"] = {"name": "modelopt", "version": "0.40.0"}
        d["quantization"].update(quant_algo="fp8_per_channel_per_token", exclude_modules=["lm_head*"])

    _edit(folder, config=lambda q, c: c.pop("quantization_config"), hf=hf)
    report = check_checkpoint(folder)
    assert report.problems == [] and report.format.NAME == "modelopt" and report.plan.hp_linears == ["lm_head"]
    loaded = load_pretrained(folder)
    assert torch.equal(loaded(IDS).logits, dynamic(IDS).logits)


def test_transformers_reads_modelopt_wrong_and_check_says_so(tmp_path, clean, dynamic):
    """transformers has no ModelOpt quantizer: the FP8 codes load cast to float32 without their scales."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(clean["dyn"], dtype=torch.float32).eval()
    w = hf.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.float32 and float(w.detach().abs().max()) == 448.0  # raw E4M3 codes
    assert fp8fx.testing.sqnr(hf(IDS).logits, dynamic(IDS).logits) < fp8fx.testing.default_min_sqnr_db()
    assert any("no ModelOpt quantizer" in n for n in check_checkpoint(clean["dyn"]).notes)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_check_on_a_modelopt_folder(tmp_path, clean, capsys):
    from fp8fx import cli

    assert cli.main(["check", str(clean["kv"])]) == 0
    out = capsys.readouterr().out
    assert "modelopt: 14 FP8 Linear(s)" in out and "KV-cache scales: yes" in out and "no problems found" in out
    folder = tmp_path / "bad"
    shutil.copytree(clean["kv"], folder)
    _edit(folder, tensors=lambda d: d.pop(f"{Q}.weight_scale"))
    assert cli.main(["check", str(folder)]) == 1
    assert f"{Q}.weight_scale: missing" in capsys.readouterr().out


def test_cli_quantize_saves_modelopt(tmp_path, capsys):
    from fp8fx import cli
    from test_data import build_tiny_hf_folder, write_tiny_text

    model = build_tiny_hf_folder(tmp_path / "model")
    text = write_tiny_text(tmp_path / "eval.txt", repeats=2)
    argv = ["quantize", "--model", str(model), "--calib", str(text), "--eval", str(text), "--window", "16",
            "--no-progress", "--scheme", "FP8_DYNAMIC", "--save", str(tmp_path / "q"), "--format", "modelopt"]
    assert cli.main(argv) == 0
    assert f"saved: {tmp_path / 'q'} (modelopt)" in capsys.readouterr().out
    assert _json(tmp_path / "q", "hf_quant_config.json")["quantization"]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    assert check_checkpoint(tmp_path / "q").problems == [] and (tmp_path / "q" / "tokenizer.json").is_file()
