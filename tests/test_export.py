"""Checkpoint export (fp8fx.save_pretrained), validation (fp8fx check) and loading (fp8fx.load_pretrained)
in the compressed-tensors and vLLM "fp8" formats, and transformers as a real consumer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import fp8fx
from fp8fx.errors import ConfigError, Fp8fxError, UnsupportedError
from fp8fx.export import CheckpointError, check_checkpoint, load_pretrained, save_pretrained
from fp8fx.export import core, writer
from export_helpers import E4M3, IDS, assert_check_names, assert_same_model, calibrated, fp8_linears, llama, quantized
from tiny_models import tiny_llama

BLOCK32 = {"weights": "block", "activations": "dynamic_group", "block": [32, 32], "group_size": 32}
TENSOR_TOKEN = {"weights": "tensor", "activations": "dynamic_token"}


@pytest.fixture(scope="module")
def dynamic():
    """An FP8_DYNAMIC model for the tests that only save it (saving never changes the model)."""
    return quantized("FP8_DYNAMIC")


@pytest.fixture(scope="module")
def static_kv(tmp_path_factory):
    """Static FP8 Linears plus an FP8 KV cache, calibrated (attention ops other than the cache in hp)."""
    model = calibrated(tiny_llama(layers=2), tmp_path_factory.mktemp("meas") / "m")
    assert fp8fx.report(model)["nodes_quantized"] == {"linear": 14, "kv_cache": 4}
    return model


# ---------------------------------------------------------------------------------- round trips
CASES = [("FP8_DYNAMIC", 64, "compressed-tensors", None),
         ("FP8_WEIGHT_ONLY", 64, "compressed-tensors", None),
         ("FP8_BLOCK", 128, "compressed-tensors", "vllm"),
         (BLOCK32, 64, "compressed-tensors", None),
         (TENSOR_TOKEN, 64, "vllm", "compressed-tensors")]


@pytest.mark.parametrize("scheme,hidden,fmt,other", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_round_trip_gives_the_same_logits_and_converts_between_formats(tmp_path, scheme, hidden, fmt, other):
    model = quantized(scheme, hidden)
    ref = model(IDS).logits
    out = save_pretrained(model, tmp_path / "ckpt", format=fmt)
    assert check_checkpoint(out).problems == []
    loaded = load_pretrained(out)
    assert_same_model(loaded, model)
    assert torch.equal(loaded(IDS).logits, ref)
    assert isinstance(loaded.lm_head, torch.nn.Linear) and not isinstance(loaded.lm_head, fp8fx.Fp8Linear)
    if other is not None:  # a converter between the tools' formats
        again = load_pretrained(save_pretrained(loaded, tmp_path / "other", format=other))
        assert torch.equal(again(IDS).logits, ref)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "vllm"])
def test_static_scales_and_kv_cache_scales_round_trip_and_generate(tmp_path, static_kv, fmt):
    out = save_pretrained(static_kv, tmp_path / fmt, format=fmt)
    report = check_checkpoint(out)
    assert report.problems == [] and report.plan.kv
    loaded = load_pretrained(out)
    assert_same_model(loaded, static_kv)
    assert torch.equal(loaded(IDS).logits, static_kv(IDS).logits)
    kw = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    got, ref = loaded.generate(IDS, **kw), static_kv.generate(IDS, **kw)
    assert all(layer.keys.dtype == E4M3 for layer in got.past_key_values.layers)
    assert torch.equal(got.sequences, ref.sequences)
    # the converted model runs its KV rewrite as a dynamo graph, the loaded one eagerly: same ops,
    # float32 rounding may differ in the last bit
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    other = {"vllm": "compressed-tensors", "compressed-tensors": "vllm"}[fmt]
    again = load_pretrained(save_pretrained(loaded, tmp_path / "again", format=other))
    assert torch.equal(again.generate(IDS, **kw).logits[-1], got.logits[-1])


def test_files_sharding_generation_config_and_tokenizer(tmp_path):
    from test_data import build_tiny_hf_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = build_tiny_hf_folder(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    fp8fx.quantize(model, "FP8_DYNAMIC", example_inputs=(IDS % 20,))
    out = save_pretrained(model, tmp_path / "q", tokenizer=AutoTokenizer.from_pretrained(src),
                          max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quantization_status"] == "compressed"
    assert cfg["quantization_config"]["ignore"] == ["lm_head"]
    assert torch.equal(load_pretrained(out)(IDS % 20).logits, model(IDS % 20).logits)
    with pytest.raises(ConfigError, match="max_shard_size"):
        save_pretrained(model, tmp_path / "bad", max_shard_size="lots")


# ------------------------------------------------------------------------------- tied embeddings
def test_tied_embeddings_stay_tied_when_lm_head_is_high_precision(tmp_path):
    model = quantized("FP8_DYNAMIC", tied=True)
    out = save_pretrained(model, tmp_path / "t")
    names = set(json.loads((out / "config.json").read_text()))
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    assert "quantization_config" in names
    loaded = load_pretrained(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_a_quantized_tied_lm_head_is_untied_in_the_checkpoint(tmp_path):
    model = llama(tied=True)  # fp8fx keeps a tied lm_head in hp; untied by hand, config still says tied
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    fp8fx.quantize(model, "FP8_DYNAMIC", cfg=fp8fx.FP8Config(blocklist={"types": ["sdpa", "kv_cache"]}),
                   example_inputs=(IDS,))
    assert isinstance(model.lm_head, fp8fx.Fp8Linear)
    out = save_pretrained(model, tmp_path / "t")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = load_pretrained(out)
    loaded.tie_weights()  # what lm-eval's HFLM calls: must not replace the FP8 lm_head
    assert isinstance(loaded.lm_head, fp8fx.Fp8Linear) and loaded.lm_head.weight.dtype == E4M3
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("scheme,needle", [("FP8_DYNAMIC", "not per channel"), ("FP8_WEIGHT_ONLY", "per channel"),
                                           (BLOCK32 | {"group_size": 16}, "group_size 32")])
def test_vllm_format_refuses_schemes_it_cannot_hold_and_writes_nothing(tmp_path, scheme, needle):
    model = quantized(scheme)
    with pytest.raises(UnsupportedError, match=needle):
        save_pretrained(model, tmp_path / "v", format="vllm")
    assert not (tmp_path / "v").exists() and list(tmp_path.iterdir()) == []


def test_save_refuses_a_model_that_is_not_quantized_and_unknown_formats(tmp_path, dynamic):
    with pytest.raises(UnsupportedError, match="no Fp8Linear"):
        save_pretrained(llama(), tmp_path / "a")
    with pytest.raises(ConfigError, match="unknown checkpoint format 'gguf'"):
        save_pretrained(dynamic, tmp_path / "a", format="gguf")


def test_fp8_attention_is_refused_by_default_and_its_query_scale_written_on_request(tmp_path):
    """fp8fx's SDPA also rounds the probabilities and output, which no checkpoint holds: refused
    unless save_pretrained(attention="qkv") (tests/test_export_attention.py has the layouts)."""
    model = tiny_llama(layers=1)
    cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m"), blocklist={"names": ["lm_head"]})
    fp8fx.prepare(model, cfg)
    model.generate(IDS[:1], max_new_tokens=2, do_sample=False)
    fp8fx.finalize_calibration(model)
    fp8fx.convert(model)
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\.self_attn .*probabilities and output"):
        save_pretrained(model, tmp_path / "x")
    out = save_pretrained(model, tmp_path / "x", attention="qkv")
    assert check_checkpoint(out).problems == []


# ------------------------------------------------------------------------------------ atomicity
def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, dynamic):
    out = save_pretrained(dynamic, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = writer.write_tensors

    def interrupted(folder, tensors, max_bytes):
        real(folder, tensors, max_bytes)
        raise KeyboardInterrupt

    monkeypatch.setattr(core, "write_tensors", interrupted)
    weight_only = quantized("FP8_WEIGHT_ONLY")
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(weight_only, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left
    monkeypatch.setattr(core, "write_tensors", real)
    save_pretrained(weight_only, out)  # a complete save replaces it
    assert json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "input_activations"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_folder_that_is_not_a_checkpoint_is_never_replaced(tmp_path, dynamic):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(Fp8fxError, match="not a checkpoint"):
        save_pretrained(dynamic, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# ------------------------------------------------------------------------------------ the traps
def _edit(folder: Path, config=None, tensors=None):
    """Rewrite a single-file checkpoint: ``config(q, cfg)`` edits config.json, ``tensors(d)`` the tensors."""
    from safetensors.torch import load_file, save_file

    if config is not None:
        cfg = json.loads((folder / "config.json").read_text())
        config(cfg["quantization_config"], cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        d = load_file(str(folder / "model.safetensors"))
        tensors(d)
        save_file(d, str(folder / "model.safetensors"), metadata={"format": "pt"})


Q = "model.layers.0.self_attn.q_proj"
ATTN = "model.layers.1.self_attn"

CT_TRAPS = {
    "status_omitted": (lambda q, c: q.pop("quantization_status"), None, "quantization_status"),
    "status_frozen": (lambda q, c: q.update(quantization_status="frozen"), None, "'frozen'"),
    "format_missing": (lambda q, c: q.pop("format"), None, "quantization_config.format"),
    "missing_weight_scale": (None, lambda d: d.pop(f"{Q}.weight_scale"), f"{Q}.weight_scale: missing"),
    "channel_scale_flat": (None, lambda d: d.update({f"{Q}.weight_scale": d[f"{Q}.weight_scale"].reshape(-1)}),
                           f"{Q}.weight_scale: shape [64]"),
    "zero_scale": (None, lambda d: d[f"{Q}.weight_scale"].zero_(), f"{Q}.weight_scale: 64 of 64"),
    "hp_weight_in_quantized_layer": (None, lambda d: d.update({f"{Q}.weight": d[f"{Q}.weight"].float()}),
                                     f"{Q}.weight: dtype F32"),
    "ignore_typo": (lambda q, c: q["ignore"].append("lm_haed"), None, "'lm_haed' names no module"),
    "fp8_weight_in_ignored_layer": (lambda q, c: q["ignore"].append(Q), None, f"{Q}.weight: F8_E4M3, but"),
    "tied_quantized_lm_head": (lambda q, c: (q.update(ignore=[]), c.update(tie_word_embeddings=True)),
                               lambda d: d.update({"lm_head.weight": d["lm_head.weight"].to(E4M3),
                                                   "lm_head.weight_scale": torch.ones(128, 1)}),
                               "tie_word_embeddings"),
    "unknown_tensor": (None, lambda d: d.update({"model.layers.0.mlp.gate_proj.scale": torch.ones(1)}),
                       "model.layers.0.mlp.gate_proj.scale: not a tensor"),
    "missing_param": (None, lambda d: d.pop("model.norm.weight"), "model.norm.weight: missing"),
    "bad_strategy": (lambda q, c: q["config_groups"]["group_0"]["weights"].update(strategy="group"), None,
                     "weights.strategy"),
}
CT_KV_TRAPS = {
    "kv_scale_0d": (None, lambda d: d.update({f"{ATTN}.k_scale": d[f"{ATTN}.k_scale"].reshape(())}),
                    f"{ATTN}.k_scale: shape []"),
    "kv_scheme_null": (lambda q, c: q.update(kv_cache_scheme=None), None, f"{ATTN}.k_scale: present but"),
    "kv_scale_missing": (None, lambda d: d.pop(f"{ATTN}.v_scale"), f"{ATTN}.v_scale: missing"),
    "missing_input_scale": (None, lambda d: d.pop(f"{Q}.input_scale"), f"{Q}.input_scale: missing"),
}
VLLM_TRAPS = {
    "block_scale_named_weight_scale": (None, lambda d: d.update({f"{Q}.weight_scale": d.pop(f"{Q}.weight_scale_inv")}),
                                       f"{Q}.weight_scale_inv: missing"),
    "block_with_static": (lambda q, c: q.update(activation_scheme="static"), None, "activation_scheme"),
    "per_channel_scale": (None, lambda d: d.update({f"{Q}.weight_scale_inv": torch.ones(64, 1)}),
                          f"{Q}.weight_scale_inv: shape [64, 1]"),
    "ignored_layers_typo": (lambda q, c: q["ignored_layers"].append("model.lm_head"), None, "'model.lm_head'"),
}
VLLM_KV_TRAPS = {
    "per_channel_weight_scale": (None, lambda d: d.update({f"{Q}.weight_scale": torch.ones(64, 1)}),
                                 f"{Q}.weight_scale: shape [64, 1]"),
    "kv_scale_one_layer": (None, lambda d: d.pop(f"{ATTN}.k_scale"), f"{ATTN}.k_scale: missing"),
    "dynamic_with_input_scale": (lambda q, c: q.update(activation_scheme="dynamic"), None,
                                 f"{Q}.input_scale: present"),
    "old_kv_scale": (None, lambda d: d.update({f"{ATTN}.kv_scale": torch.ones(1)}), f"{ATTN}.kv_scale"),
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, static_kv, dynamic):
    root = tmp_path_factory.mktemp("clean")
    return {
        "ct": save_pretrained(dynamic, root / "ct"),
        "ct_kv": save_pretrained(static_kv, root / "ct_kv"),
        "vllm": save_pretrained(quantized("FP8_BLOCK"), root / "vllm", format="vllm"),
        "vllm_kv": save_pretrained(static_kv, root / "vllm_kv", format="vllm"),
    }


def _traps():
    for base, table in (("ct", CT_TRAPS), ("ct_kv", CT_KV_TRAPS), ("vllm", VLLM_TRAPS), ("vllm_kv", VLLM_KV_TRAPS)):
        for name, trap in table.items():
            yield pytest.param(base, *trap, id=f"{base}-{name}")


@pytest.mark.parametrize("base,config,tensors,needle", list(_traps()))
def test_check_names_the_tensor_or_key_of_every_trap(tmp_path, clean, base, config, tensors, needle):
    folder = tmp_path / "ckpt"
    shutil.copytree(clean[base], folder)
    assert check_checkpoint(folder).problems == []
    _edit(folder, config, tensors)
    assert_check_names(folder, needle)


def test_check_reads_the_index_and_the_shards(tmp_path, dynamic):
    out = save_pretrained(dynamic, tmp_path / "s", max_shard_size="30KB")
    assert check_checkpoint(out).problems == []
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    problems = [str(p) for p in check_checkpoint(out).problems]
    assert any("model-00099-of-00099.safetensors" in p and "does not exist" in p for p in problems), problems


def test_cli_check_prints_the_problems_and_exits_nonzero(tmp_path, clean, capsys):
    from fp8fx import cli

    assert cli.main(["check", str(clean["ct"])]) == 0
    assert "no problems found" in capsys.readouterr().out
    folder = tmp_path / "bad"
    shutil.copytree(clean["ct"], folder)
    _edit(folder, lambda q, c: q.pop("quantization_status"), lambda d: d.pop(f"{Q}.weight_scale"))
    assert cli.main(["check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "quantization_status" in out and f"{Q}.weight_scale: missing" in out
    assert cli.main(["check", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_cli_quantize_saves_a_checkpoint(tmp_path, capsys):
    from fp8fx import cli
    from test_data import build_tiny_hf_folder, write_tiny_text

    model = build_tiny_hf_folder(tmp_path / "model", tied=True)
    text = write_tiny_text(tmp_path / "eval.txt", repeats=2)
    argv = ["quantize", "--model", str(model), "--calib", str(text), "--eval", str(text), "--window", "16",
            "--no-progress", "--scheme", "FP8_DYNAMIC"]
    assert cli.main([*argv, "--format", "vllm"]) == 2
    assert "--save" in capsys.readouterr().err
    assert cli.main([*argv, "--save", str(tmp_path / "q")]) == 0
    assert f"saved: {tmp_path / 'q'} (compressed-tensors)" in capsys.readouterr().out
    assert check_checkpoint(tmp_path / "q").problems == [] and (tmp_path / "q" / "tokenizer.json").is_file()


# ------------------------------------------------------------------------------ real consumers
def _transformers_load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("scheme,hidden", [("FP8_DYNAMIC", 64), ("FP8_BLOCK", 128), ("FP8_WEIGHT_ONLY", 64),
                                           (BLOCK32, 64)], ids=["dynamic", "block", "weight_only", "block32"])
def test_transformers_loads_the_compressed_tensors_export(tmp_path, scheme, hidden):
    pytest.importorskip("compressed_tensors", reason="transformers needs the compressed-tensors package to load "
                        "compressed-tensors checkpoints (pip install fp8fx[export])")
    model = quantized(scheme, hidden)
    hf = _transformers_load(save_pretrained(model, tmp_path / "ct"))
    assert hf.model.layers[0].mlp.down_proj.weight.dtype == E4M3  # stays FP8; simulated-quantization forward
    # both compute weight * scale and the same activation fake-quantization in float32; a dynamic
    # scale computed in another order can move an activation to the neighbouring FP8 code
    fp8fx.testing.assert_close(hf(IDS).logits, model(IDS).logits)


def test_transformers_loads_static_scales_and_ignores_kv_scales(tmp_path, static_kv):
    """transformers applies compressed-tensors' kv_cache_scheme only to attention modules whose
    forward takes ``past_key_values`` (its ``cache`` argument does not count): the KV scales load
    as unexpected keys and its cache stays in high precision. Its Linears match fp8fx's; the
    KV-cache scales are checked by layout (fp8fx check) and by fp8fx's own load."""
    pytest.importorskip("compressed_tensors", reason="needs the compressed-tensors package")
    out = save_pretrained(static_kv, tmp_path / "ct")
    hf = _transformers_load(out)
    # the same FP8 Linears without the FP8 cache: a forward without a cache object
    fp8fx.testing.assert_close(hf(IDS, use_cache=False).logits, static_kv(IDS, use_cache=False).logits)


def _as_llm_compressor_writes_it(folder: Path) -> None:
    """What llm-compressor's save_pretrained(save_compressed=True) writes beside ours: BF16 scales,
    its observer names and version, kv_cache_scheme null."""
    def config(q, cfg):
        q["version"] = "0.19.0"
        for g in q["config_groups"].values():
            g["weights"].update(observer="memoryless_minmax", observer_kwargs={})
            if g["input_activations"]:
                g["input_activations"].update(observer=None, observer_kwargs={})
        q.pop("kv_cache_scheme")

    def tensors(d):
        for k in list(d):
            if k.endswith("_scale"):
                d[k] = d[k].to(torch.bfloat16)

    _edit(folder, config, tensors)


@pytest.mark.parametrize("scheme,hidden", [("FP8_DYNAMIC", 64), ("FP8_BLOCK", 128)], ids=["dynamic", "block"])
def test_loads_checkpoints_written_the_way_llm_compressor_writes_them(tmp_path, scheme, hidden):
    folder = save_pretrained(quantized(scheme, hidden), tmp_path / "lc")
    _as_llm_compressor_writes_it(folder)
    assert check_checkpoint(folder).problems == []
    ours = load_pretrained(folder)
    assert all(m.weight.dtype == E4M3 for m in fp8_linears(ours).values())
    again = load_pretrained(save_pretrained(ours, tmp_path / "re"))
    assert torch.equal(again(IDS).logits, ours(IDS).logits)
    if pytest.importorskip("compressed_tensors", reason="needs the compressed-tensors package"):
        fp8fx.testing.assert_close(_transformers_load(folder)(IDS).logits, ours(IDS).logits)


def test_transformers_reads_a_per_tensor_vllm_checkpoint_wrong_and_check_says_so(tmp_path, capsys):
    """vLLM's 'fp8' per-tensor layout is right for vLLM; transformers drops its weight_scale tensors
    (it expects the block-wise weight_scale_inv). fp8fx check prints that as a note, not a problem."""
    from fp8fx import cli

    model = quantized(TENSOR_TOKEN)
    out = save_pretrained(model, tmp_path / "v", format="vllm")
    report = check_checkpoint(out)
    assert report.problems == [] and any("weight_scale" in n and "transformers" in n for n in report.notes)
    assert cli.main(["check", str(out)]) == 0
    assert "note: transformers" in capsys.readouterr().out
    ours = load_pretrained(out)
    assert torch.equal(ours(IDS).logits, model(IDS).logits)
    hf = _transformers_load(out)
    assert fp8fx.testing.sqnr(hf(IDS).logits, model(IDS).logits) < fp8fx.testing.default_min_sqnr_db()


@pytest.mark.parametrize("arch", ["qwen2", "gptj"])  # Linear biases; eager attention (not in a checkpoint)
def test_other_architectures_round_trip(tmp_path, arch):
    import arch_zoo

    model = arch_zoo.build(arch).eval()
    fp8fx.quantize(model, "FP8_DYNAMIC", example_inputs=(IDS,))
    out = save_pretrained(model, tmp_path / arch)
    loaded = load_pretrained(out, attn_implementation=model.config._attn_implementation)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_modules_that_are_not_linears_in_the_consumer_model_are_refused(tmp_path):
    import arch_zoo

    model = arch_zoo.build("gpt2").eval()
    fp8fx.quantize(model, "FP8_DYNAMIC", example_inputs=(IDS,))
    with pytest.raises(UnsupportedError, match=r"transformer\.h\.0\.attn\.c_attn \(Conv1D\)"):
        save_pretrained(model, tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_moe_experts_the_consumer_cannot_run_are_refused_naming_the_module(tmp_path):
    """MoE experts are exported (tests/test_export_moe.py); a scheme the format's MoE method does
    not run (weight-only FP8 experts in compressed-tensors) is refused naming the module."""
    import arch_zoo

    model = arch_zoo.build("mixtral").eval()
    fp8fx.quantize(model, "FP8_WEIGHT_ONLY", example_inputs=(IDS,))
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\.mlp\.experts: FP8 experts"):
        save_pretrained(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_check_of_a_high_precision_checkpoint_says_it_is_not_fp8(tmp_path, capsys):
    from fp8fx import cli
    from test_data import build_tiny_hf_folder

    folder = build_tiny_hf_folder(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="quantization_config.quant_method"):
        check_checkpoint(folder)
    assert cli.main(["check", str(folder)]) == 1
    assert "quant_method" in capsys.readouterr().out


def test_a_model_that_converts_on_its_first_call_must_be_called_before_saving(tmp_path):
    model = fp8fx.quantize(llama(), "FP8_DYNAMIC")  # no example inputs: converted on the first call
    with pytest.raises(UnsupportedError, match="first call"):
        save_pretrained(model, tmp_path / "p")
    model(IDS)
    assert torch.equal(load_pretrained(save_pretrained(model, tmp_path / "p"))(IDS).logits, model(IDS).logits)
