"""Sequential (block-by-block) calibration: the same measurement files as a whole-model calibration."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fp8fx
from fp8fx import FP8Config
from fp8fx.errors import ConfigError, Fp8fxError, UnsupportedError
from fp8fx.sequential import ActivationCache, find_blocks, load_offloaded

from tiny_models import tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from synthetic import llama_config, make_llama_checkpoint  # noqa: E402


def _batches(vocab: int, n: int = 3, seq: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (1, seq + i), generator=g) for i in range(n)]


def _cfg(tmp: Path, tag: str, **kw) -> FP8Config:
    return FP8Config(mode="MEASURE", dump_stats_path=str(tmp / tag / "measure"), **kw)


def _whole(model: nn.Module, cfg: FP8Config, batches, **call) -> list[Path]:
    fp8fx.prepare(model, cfg)
    with torch.no_grad():
        for b in batches:
            model(b, **call)
    return fp8fx.finalize_calibration(model)


def _contents(files: list[Path]) -> dict[str, object]:
    """The files' contents by suffix, without the random id that stamps one write."""
    out: dict[str, object] = {}
    for f in files:
        if f.suffix == ".json":
            obj = json.loads(f.read_text())
            if isinstance(obj, dict):
                obj.pop("WriteId", None)
            out[f.name.split("_hooks_")[1]] = obj
    return out


def _assert_same_files(a: list[Path], b: list[Path]) -> None:
    ca, cb = _contents(a), _contents(b)
    assert ca.keys() == cb.keys() and ca
    for k in ca:
        assert ca[k] == cb[k], k
        if isinstance(ca[k], dict) and "Nodes" in ca[k]:
            assert list(ca[k]["Nodes"]) == list(cb[k]["Nodes"])  # same order too


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tiny_llama_sequential_files_equal_whole_model(tmp_path, attn) -> None:
    batches = _batches(128)
    whole = _whole(tiny_llama(attn=attn), _cfg(tmp_path, "whole"), batches, use_cache=False)
    model = tiny_llama(attn=attn)
    fp8fx.prepare(model, _cfg(tmp_path, "seq"), sequential=True, calibration_data=batches)
    seq = fp8fx.finalize_calibration(model)
    _assert_same_files(whole, seq)
    nodes = _contents(seq)["maxabs.json"]["Nodes"]
    assert "lm_head" in nodes and "model.layers.1.mlp.down_proj" in nodes  # outside and inside the blocks


def test_disk_offloaded_activations_give_the_same_files(tmp_path) -> None:
    batches = _batches(128, n=4)
    model = tiny_llama()
    fp8fx.prepare(model, _cfg(tmp_path, "mem"), sequential=True, calibration_data=batches)
    mem = fp8fx.finalize_calibration(model)
    model = tiny_llama()
    fp8fx.prepare(model, _cfg(tmp_path, "disk"), sequential=True, calibration_data=batches, cache_limit_bytes=0)
    _assert_same_files(mem, fp8fx.finalize_calibration(model))


def test_activation_cache_spills_past_its_limit(tmp_path) -> None:
    cache = ActivationCache(tmp_path / "c", limit_bytes=64 * 4)
    a, b = torch.randn(64), (torch.randn(8), {"x": torch.randn(3)})
    cache.put(0, a)
    cache.put(1, b)  # over the limit: written to a file
    assert cache.bytes_in_memory == 256 and len(cache.files) == 1 and cache.files[0].exists()
    assert cache.get(0) is a
    got = cache.get(1)
    assert torch.equal(got[0], b[0]) and torch.equal(got[1]["x"], b[1]["x"])
    assert not list((tmp_path / "c").glob(".*"))  # no temporary file left behind
    files = cache.files
    cache.close()
    assert not any(f.exists() for f in files) and len(cache) == 0


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x + torch.softmax(self.fc(x) * scale, dim=-1)


class Stack(nn.Module):
    """Ops before the blocks (a Linear, a matmul at the root), blocks, ops after (a head)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(3))
        self.head = nn.Linear(d, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        scale = torch.matmul(x, x.transpose(-1, -2)).mean()
        for layer in self.layers:
            h = layer(h, scale)
        return torch.softmax(self.head(h), dim=-1)


def test_ops_before_and_after_the_blocks_are_observed_in_order(tmp_path) -> None:
    torch.manual_seed(0)
    batches = [torch.randn(2, 5, 16) for _ in range(3)]
    ref = Stack()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    whole = _whole(ref, _cfg(tmp_path, "whole"), batches)
    model = Stack()
    model.load_state_dict(state)
    with pytest.raises(ConfigError, match="blocks="):
        fp8fx.prepare(model, _cfg(tmp_path, "seq"), sequential=True, calibration_data=batches)
    fp8fx.prepare(model, _cfg(tmp_path, "seq"), sequential=True, calibration_data=batches, blocks="layers")
    seq = fp8fx.finalize_calibration(model)
    _assert_same_files(whole, seq)
    nodes = list(_contents(seq)["maxabs.json"]["Nodes"])
    assert nodes[:2] == ["inp", "matmul_0"] and nodes[-2:] == ["head", "softmax_0"]
    assert "layers.2.softmax_0" in nodes


class Rescaled(Stack):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h, torch.ones(())) * 0.5  # changes the hidden states between blocks
        return self.head(h)


def test_ops_between_blocks_are_refused(tmp_path) -> None:
    model = Rescaled()
    with pytest.raises(UnsupportedError, match="between blocks"):
        fp8fx.prepare(model, _cfg(tmp_path, "s"), sequential=True, calibration_data=[torch.randn(1, 3, 16)],
                      blocks="layers")
    assert "_fp8fx" not in model.__dict__  # left as it was given


def test_bad_arguments_are_refused(tmp_path) -> None:
    model = tiny_llama()
    with pytest.raises(ConfigError, match="only apply with sequential=True"):
        fp8fx.prepare(model, _cfg(tmp_path, "a"), calibration_data=_batches(128))
    with pytest.raises(ConfigError, match="needs calibration_data"):
        fp8fx.prepare(model, _cfg(tmp_path, "a"), sequential=True)
    with pytest.raises(ConfigError, match="names no submodule"):
        fp8fx.prepare(model, _cfg(tmp_path, "a"), sequential=True, calibration_data=_batches(128), blocks="nope")
    with pytest.raises(UnsupportedError, match="use_cache=True"):
        fp8fx.prepare(model, _cfg(tmp_path, "a"), sequential=True,
                      calibration_data=[{"input_ids": _batches(128)[0], "use_cache": True}])
    assert find_blocks(model)[0] == "model.layers"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    make_llama_checkpoint(out, llama_config(layers=2, hidden=256, heads=4, kv_heads=2, vocab=512),
                          shard_bytes=1 << 20, dtype=torch.float32)
    return out


def test_offloaded_checkpoint_files_equal_whole_model_and_convert_alike(tmp_path, checkpoint) -> None:
    from transformers import AutoModelForCausalLM

    batches = _batches(512)
    load = lambda: AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()  # noqa: E731
    whole = _whole(load(), _cfg(tmp_path, "whole"), batches, use_cache=False)

    model = load_offloaded(checkpoint, dtype=torch.float32)  # the config says bf16
    assert all(p.is_meta for p in model.model.layers.parameters())
    assert not model.lm_head.weight.is_meta and not model.model.embed_tokens.weight.is_meta
    fp8fx.prepare(model, _cfg(tmp_path, "seq"), sequential=True, calibration_data=batches)
    assert all(p.is_meta for p in model.model.layers.parameters())  # back on disk after each block
    seq = fp8fx.finalize_calibration(model)
    _assert_same_files(whole, seq)

    ids = batches[0]
    logits = []
    for files in ("whole", "seq"):
        qcfg = FP8Config(mode="QUANTIZE", dump_stats_path=str(tmp_path / files / "measure"))
        m = fp8fx.convert(load(), qcfg)
        with torch.no_grad():
            logits.append(m(ids, use_cache=False).logits)  # no KV cache was calibrated
        assert fp8fx.report(m)["converted"]
    assert torch.equal(logits[0], logits[1])


def test_missing_checkpoint_key_is_named(tmp_path, checkpoint) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_offloaded(bad)  # blocks are read later, when calibration gets to them
    with pytest.raises(Fp8fxError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        fp8fx.prepare(model, _cfg(tmp_path, "s"), sequential=True, calibration_data=_batches(512, n=1))
    del index["weight_map"]["lm_head.weight"]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(Fp8fxError, match="lm_head.weight"):
        load_offloaded(bad)


def test_cli_quantize_sequential(tmp_path) -> None:
    from fp8fx import cli
    from test_data import build_tiny_hf_folder, write_tiny_text

    model = build_tiny_hf_folder(tmp_path / "model", tied=True)
    calib, evalf = write_tiny_text(tmp_path / "c.txt", repeats=8), write_tiny_text(tmp_path / "e.txt", repeats=3)
    reports = {}
    for tag, extra in (("whole", []), ("seq", ["--sequential", "--sequential-cache-mb", "0"])):
        rep = tmp_path / f"{tag}.json"
        argv = ["quantize", "--model", str(model), "--calib", str(calib), "--eval", str(evalf), "--window", "16",
                "--calib-tokens", "64", "--no-progress", "--out", str(tmp_path / tag), "--report-json", str(rep),
                *extra]
        assert cli.main(argv) == 0
        reports[tag] = json.loads(rep.read_text())
    assert reports["seq"]["nodes_quantized"] == reports["whole"]["nodes_quantized"] == {"linear": 14}
    nodes = [json.loads((tmp_path / t / "measure_hooks_maxabs.json").read_text())["Nodes"] for t in ("whole", "seq")]
    assert list(nodes[0]) == list(nodes[1])
    for name in nodes[0]:  # the whole-model run calibrates with a KV cache (another mask path): same up to rounding
        got, want = (torch.tensor(n[name]["inputs"], dtype=torch.float64) for n in (nodes[1], nodes[0]))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0, msg=name)
    assert reports["seq"]["ppl_fp8"] == pytest.approx(reports["whole"]["ppl_fp8"], rel=1e-4)
    assert cli.main(["quantize", "--sequential", "--attention", "--model", str(model)]) != 0
