"""Streaming checkpoint quantization (fp8fx.quantize_checkpoint / fp8fx quantize-checkpoint) against
the whole-model path (load, fp8fx.quantize, fp8fx.save_pretrained), on small generated checkpoints."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import fp8fx
from fp8fx.errors import ConfigError, Fp8fxError, UnsupportedError
from fp8fx.export import CheckpointError, load_pretrained, save_pretrained, streaming
from fp8fx.export.checks import INDEX

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from synthetic import llama_config, make_llama_checkpoint  # noqa: E402

IDS = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(3))
SHARD = 600_000  # bytes: several input shards for the small model


def _make(path: Path, tied: bool = False) -> Path:
    cfg = llama_config(layers=2, hidden=256, vocab=512, heads=4, kv_heads=2)
    cfg.tie_word_embeddings = tied
    make_llama_checkpoint(path, cfg, shard_bytes=SHARD)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": 2}))
    (path / "pytorch_model.bin").write_bytes(b"not copied")
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _make(tmp_path_factory.mktemp("hp") / "llama")


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory) -> Path:
    return _make(tmp_path_factory.mktemp("hp") / "tied", tied=True)


def _shards(path: Path) -> int:
    return len(set(json.loads((path / INDEX).read_text())["weight_map"].values()))


def _hp(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                assert k not in out, k
                out[k] = st.get_tensor(k)
    return out


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k, t in ta.items():
        u = tb[k]
        assert t.dtype == u.dtype and t.shape == u.shape, k
        assert torch.equal(t.reshape(-1).view(torch.uint8), u.reshape(-1).view(torch.uint8)), k


def _logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_pretrained(path)(IDS).logits


def _whole(ckpt: Path, out: Path, scheme, fmt: str, cfg=None) -> Path:
    q = fp8fx.quantize(_hp(ckpt), scheme, cfg=cfg, example_inputs=(IDS,))
    return save_pretrained(q, out, format=fmt)


# ------------------------------------------------------------------ same output as the whole-model path
@pytest.mark.parametrize("scheme,fmt", [("FP8_DYNAMIC", "compressed-tensors"), ("FP8_BLOCK", "compressed-tensors"),
                                        ("FP8_BLOCK", "vllm"), ("FP8_DYNAMIC", "modelopt")])
def test_streaming_equals_whole_model_path(ckpt, tmp_path, scheme, fmt):
    r = fp8fx.quantize_checkpoint(ckpt, tmp_path / "s", scheme, format=fmt)
    whole = _whole(ckpt, tmp_path / "w", scheme, fmt)
    assert r.report.problems == [] and r.shards_in == r.files_out == _shards(ckpt) > 1
    assert len(r.quantized) == 14 and r.hp_linears == ["lm_head"]
    _assert_same_tensors(r.path, whole)
    a, b = json.loads((r.path / "config.json").read_text()), json.loads((whole / "config.json").read_text())
    assert a["quantization_config"] == b["quantization_config"]
    for f in whole.iterdir():  # a format's own files (ModelOpt's hf_quant_config.json)
        if f.name not in ("config.json", INDEX, "generation_config.json") and f.suffix != ".safetensors":
            assert (r.path / f.name).read_text() == f.read_text(), f.name
    out = _logits(r.path)
    assert torch.isfinite(out).all() and torch.equal(out, _logits(whole))
    # the other files came along; weights of other formats did not
    assert (r.path / "tokenizer_config.json").read_text() == (ckpt / "tokenizer_config.json").read_text()
    assert (r.path / "generation_config.json").is_file() and not (r.path / "pytorch_model.bin").exists()
    assert not [p for p in r.path.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_tied_embeddings_match_the_whole_model_path(tied_ckpt, tmp_path):
    r = fp8fx.quantize_checkpoint(tied_ckpt, tmp_path / "s", "FP8_DYNAMIC")
    whole = _whole(tied_ckpt, tmp_path / "w", "FP8_DYNAMIC", "compressed-tensors")
    _assert_same_tensors(r.path, whole)
    assert "lm_head.weight" not in _tensors(r.path)
    assert torch.equal(_logits(r.path), _logits(whole))


def test_cfg_blocklist_is_the_same_rule(ckpt, tmp_path):
    cfg = {"blocklist": {"names": ["lm_head", r"layers\.1\.mlp"], "types": ["matmul", "softmax", "sdpa", "kv_cache"]}}
    r = fp8fx.quantize_checkpoint(ckpt, tmp_path / "s", "FP8_DYNAMIC", cfg=cfg)
    whole = _whole(ckpt, tmp_path / "w", "FP8_DYNAMIC", "compressed-tensors", cfg=cfg)
    assert sorted(r.hp_linears) == ["lm_head", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj",
                                    "model.layers.1.mlp.up_proj"]
    _assert_same_tensors(r.path, whole)


@pytest.fixture(scope="module")
def measured(ckpt, tmp_path_factory) -> str:
    """INC measurement files of a small calibration of the checkpoint's model."""
    from fp8fx.api import QUANTIZE_DEFAULT_BLOCKLIST

    prefix = str(tmp_path_factory.mktemp("meas") / "measure")
    model = fp8fx.prepare(_hp(ckpt), fp8fx.FP8Config(mode="MEASURE", dump_stats_path=prefix,
                                                     blocklist=QUANTIZE_DEFAULT_BLOCKLIST))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in (7, 13):
            model(torch.randint(0, 512, (2, n), generator=g))
    fp8fx.finalize_calibration(model)
    return prefix


@pytest.mark.parametrize("fmt", ["compressed-tensors", "vllm"])
def test_static_scheme_with_measurements(ckpt, measured, tmp_path, fmt):
    from fp8fx.api import QUANTIZE_DEFAULT_BLOCKLIST

    r = fp8fx.quantize_checkpoint(ckpt, tmp_path / "s", "FP8", format=fmt, measurements=measured)
    cfg = fp8fx.FP8Config(blocklist=QUANTIZE_DEFAULT_BLOCKLIST, dump_stats_path=measured)
    whole = _whole(ckpt, tmp_path / "w", "FP8", fmt, cfg=cfg)
    tensors = _tensors(r.path)
    assert sum(k.endswith(".input_scale") for k in tensors) == 14
    _assert_same_tensors(r.path, whole)
    assert torch.equal(_logits(r.path), _logits(whole))


def test_static_scheme_without_measurements_names_the_option(ckpt, tmp_path, monkeypatch):
    from fp8fx.api import QUANTIZE_DEFAULT_BLOCKLIST

    monkeypatch.chdir(tmp_path)  # no files at the default dump_stats_path either
    with pytest.raises(ConfigError, match="pass measurements="):
        fp8fx.quantize_checkpoint(ckpt, tmp_path / "s", "FP8")
    cfg = {"dump_stats_path": str(tmp_path / "none"), "blocklist": QUANTIZE_DEFAULT_BLOCKLIST}
    with pytest.raises(ConfigError, match="none at dump_stats_path"):
        fp8fx.quantize_checkpoint(ckpt, tmp_path / "s", "FP8", cfg=cfg)
    assert not (tmp_path / "s").exists()


def test_measurements_of_another_model_are_refused(ckpt, measured, tmp_path):
    other = make_llama_checkpoint(tmp_path / "other", llama_config(layers=1, hidden=256, vocab=512, heads=4,
                                                                   kv_heads=2), shard_bytes=SHARD)["dir"]
    with pytest.raises(fp8fx.MeasurementError, match="model.layers.1"):
        fp8fx.quantize_checkpoint(other, tmp_path / "s", "FP8", measurements=measured)


# ------------------------------------------------------------------------ workers, sharding, atomicity
def test_two_workers_equal_one_and_resharding(ckpt, tmp_path):
    one = fp8fx.quantize_checkpoint(ckpt, tmp_path / "one", "FP8_BLOCK", workers=1)
    two = fp8fx.quantize_checkpoint(ckpt, tmp_path / "two", "FP8_BLOCK", workers=2)
    assert sorted(p.name for p in one.path.iterdir()) == sorted(p.name for p in two.path.iterdir())
    assert json.loads((one.path / INDEX).read_text()) == json.loads((two.path / INDEX).read_text())
    _assert_same_tensors(one.path, two.path)
    assert len(two.peak_rss) >= 1 and all(v > 0 for v in two.peak_rss.values())
    small = fp8fx.quantize_checkpoint(ckpt, tmp_path / "small", "FP8_BLOCK", max_shard_size=200_000)
    assert small.files_out > one.files_out and small.report.problems == []
    _assert_same_tensors(one.path, small.path)
    for f in small.path.glob("*.safetensors"):  # a file over the size holds one Linear group or tensor
        keys = [k for k, v in json.loads((small.path / INDEX).read_text())["weight_map"].items() if v == f.name]
        size = sum(t.numel() * t.element_size() for k, t in _tensors(small.path).items() if k in keys)
        assert size <= 200_000 or len({k.rsplit(".", 1)[0] for k in keys}) == 1


def test_a_failing_task_leaves_no_folder(ckpt, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")  # a previous checkpoint, kept on failure
    real = streaming.linear_quant

    def failing(weight, name, *a, **k):
        if name == "model.layers.1.mlp.up_proj":
            raise fp8fx.QuantizationError(f"{name}: injected failure")
        return real(weight, name, *a, **k)

    monkeypatch.setattr(streaming, "linear_quant", failing)
    with pytest.raises(fp8fx.QuantizationError, match=r"model-\d{5}-of-\d{5}.safetensors: .*up_proj"):
        fp8fx.quantize_checkpoint(ckpt, tmp_path / "out", "FP8_DYNAMIC")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json"]


def test_a_checkpoint_the_validator_refuses_is_not_written(ckpt, tmp_path, monkeypatch):
    from fp8fx.export.checks import Problem
    from fp8fx.export.core import Report

    def refusing(m, fmt=None, model=None):
        return Report(fmt, None, None, [Problem("x.weight", "refused for the test")])

    monkeypatch.setattr(streaming, "validate", refusing)
    with pytest.raises(CheckpointError, match="refused for the test"):
        fp8fx.quantize_checkpoint(ckpt, tmp_path / "out", "FP8_DYNAMIC")
    assert list(tmp_path.iterdir()) == []


def test_stream_writer_header_larger_than_its_room(tmp_path):
    from safetensors import safe_open

    tensors = {f"layer.{i}.a_rather_long_parameter_name": torch.randn(3, i + 1).to(torch.bfloat16) for i in range(40)}
    tensors["fp8"] = torch.randn(4, 4).to(torch.float8_e4m3fn)
    tensors["scalar"] = torch.tensor(2.5)
    for reserve in (64, 1 << 16):  # the header moves the data once, or fits its room
        w = streaming._StreamWriter(tmp_path / f"r{reserve}.safetensors", reserve)
        for k, t in tensors.items():
            w.add(k, t)
        w.close()
        with safe_open(str(tmp_path / f"r{reserve}.safetensors"), framework="pt") as f:
            assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(tensors)
            for k, t in tensors.items():
                u = f.get_tensor(k)
                assert u.dtype == t.dtype and u.shape == t.shape
                assert torch.equal(u.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k


# -------------------------------------------------------------------------------------- bad input
def test_missing_index_is_refused(ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / INDEX).unlink()
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        fp8fx.quantize_checkpoint(bad, tmp_path / "out", "FP8_DYNAMIC")


def test_key_the_architecture_lacks_is_refused(ckpt, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    save_file({"model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4, dtype=torch.bfloat16)},
              str(bad / "extra.safetensors"), metadata={"format": "pt"})
    index = json.loads((bad / INDEX).read_text())
    index["weight_map"]["model.layers.0.mlp.extra_proj.weight"] = "extra.safetensors"
    (bad / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.extra_proj\.weight: not a parameter"):
        fp8fx.quantize_checkpoint(bad, tmp_path / "out", "FP8_DYNAMIC")


def test_missing_tensor_is_refused(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    index = json.loads((bad / INDEX).read_text())
    shard = index["weight_map"].pop("model.norm.weight")
    tensors = load_file(str(bad / shard))
    del tensors["model.norm.weight"]
    save_file(tensors, str(bad / shard), metadata={"format": "pt"})
    (bad / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight: missing"):
        fp8fx.quantize_checkpoint(bad, tmp_path / "out", "FP8_DYNAMIC")


@pytest.mark.parametrize("kw,err,match", [
    ({"scheme": "FP9_FAST"}, ConfigError, "FP9_FAST"),
    ({"scheme": "FP8_DYNAMIC", "format": "vllm"}, UnsupportedError, "per channel"),
    ({"scheme": "FP8_DYNAMIC", "format": "onnx"}, ConfigError, "unknown checkpoint format"),
    ({"scheme": "FP8_DYNAMIC", "workers": 0}, ConfigError, "workers"),
    ({"scheme": "FP8_DYNAMIC", "cfg": {"blocklist": {"names": ["lm_head"]}}}, UnsupportedError, "attention ops"),
    ({"scheme": "FP8_DYNAMIC", "cfg": {"hp_dtype": "fp16"}}, ConfigError, "hp_dtype"),
])
def test_bad_arguments(ckpt, tmp_path, kw, err, match):
    with pytest.raises(err, match=match):
        fp8fx.quantize_checkpoint(ckpt, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_refuses_an_fp8_input_and_an_output_inside_the_input(ckpt, tmp_path):
    q = fp8fx.quantize_checkpoint(ckpt, tmp_path / "q", "FP8_DYNAMIC")
    with pytest.raises(UnsupportedError, match="already quantized"):
        fp8fx.quantize_checkpoint(q.path, tmp_path / "again", "FP8_DYNAMIC")
    with pytest.raises(ConfigError, match="out_dir"):
        fp8fx.quantize_checkpoint(ckpt, ckpt / "fp8", "FP8_DYNAMIC")


# ------------------------------------------------------------------------------------------------ CLI
def test_cli(ckpt, tmp_path, capsys):
    from fp8fx.cli import main

    report = tmp_path / "r.json"
    assert main(["quantize-checkpoint", str(ckpt), str(tmp_path / "o"), "--scheme", "fp8_block", "--format", "vllm",
                 "--workers", "1", "--no-progress", "--report-json", str(report)]) == 0
    d = json.loads(report.read_text())
    assert d["format"] == "vllm" and d["quantized"] == 14 and d["shards_in"] == _shards(ckpt)
    assert "vllm: 14 FP8 Linear(s)" in capsys.readouterr().out
    assert main(["quantize-checkpoint", str(ckpt), str(tmp_path / "p"), "--scheme", "FP8"]) == 2
    assert "--measurements" in capsys.readouterr().err
