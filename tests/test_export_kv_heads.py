"""Per-head KV-cache scales (observer_params.kv_cache_strategy "attn_head") in the exported checkpoints:
compressed-tensors' kv_cache_scheme strategy "attn_head" ([num_kv_heads, 1, 1] scales) round-trips bit for
bit; vLLM "fp8" and ModelOpt, which hold one KV scale per tensor, refuse the model and write nothing; the
checks name every KV scale whose shape does not match the scheme or the model's KV heads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import fp8fx
from fp8fx.errors import UnsupportedError
from fp8fx.export import CheckpointError, check_checkpoint, load_pretrained, save_pretrained
from fp8fx.export.plan import KVScales, Plan, kv_strategy
from export_helpers import E4M3, IDS, assert_check_names, calibrated
from tiny_models import tiny_llama

ATTN = "model.layers.1.self_attn"
GEN = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}


def _per_head_model(path: Path):
    """Static FP8 Linears plus an FP8 KV cache with one scale per KV head, calibrated (attention ops
    other than the cache in high precision). The keys of KV head 1 are made 20x smaller (and the
    queries of its group 20x larger: the scores do not change), so the two heads get different scales."""
    model = tiny_llama(layers=2)
    d = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight[d:2 * d] *= 0.05
            layer.self_attn.q_proj.weight[2 * d:] *= 20.0
    calibrated(model, path, observer_params={"kv_cache_strategy": "attn_head"})
    assert fp8fx.report(model)["nodes_quantized"] == {"linear": 14, "kv_cache": 4}
    return model


@pytest.fixture(scope="module")
def per_head(tmp_path_factory):
    return _per_head_model(tmp_path_factory.mktemp("meas") / "m")


@pytest.fixture(scope="module")
def saved(per_head, tmp_path_factory):
    return save_pretrained(per_head, tmp_path_factory.mktemp("ckpt") / "ct")


def _model_scales(model) -> dict[str, tuple]:
    """{attention path: (keys' scales, values' scales)} as the converted model holds them."""
    out = {}
    for name, q in model._fp8fx.attention.items():
        path, _, leaf = name.rpartition(".")
        out.setdefault(path, [None, None])[int(leaf[-1])] = q.scales[0]
    return {p: tuple(s) for p, s in out.items()}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_compressed_tensors_writes_attn_head_scales_as_compressed_tensors_allocates_them(per_head, saved):
    scales = _model_scales(per_head)
    assert len(scales) == 2
    for ks, vs in scales.values():
        assert isinstance(ks, tuple) and len(ks) == 2 and isinstance(vs, tuple) and len(vs) == 2
    assert any(ks[0] != ks[1] for ks, _ in scales.values())  # the skewed head has its own scale
    q = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert q["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "attn_head",
                                    "dynamic": False}
    tensors = _tensors(saved)
    for path, (ks, vs) in scales.items():
        for key, want in (("k_scale", ks), ("v_scale", vs)):
            t = tensors[f"{path}.{key}"]
            assert t.dtype == torch.float32 and t.shape == (2, 1, 1)  # initialize_qparams' (num_kv_heads, 1, 1)
            assert t.reshape(-1).tolist() == list(want)
    from compressed_tensors.quantization import QuantizationConfig  # the consumer's own config model

    assert QuantizationConfig.model_validate(q).kv_cache_scheme.strategy == "attn_head"
    report = check_checkpoint(saved)
    assert report.problems == [] and all(kv.heads == 2 for kv in report.plan.kv.values())
    assert any("attn_head" in n and "FLASH_ATTN" in n for n in report.notes)


def test_round_trip_gives_the_same_logits_generate_output_and_fp8_cache(per_head, saved, tmp_path):
    loaded = load_pretrained(saved)
    scales = _model_scales(per_head)
    got = loaded.generate(IDS, **GEN)
    for i, layer in enumerate(got.past_key_values.layers):
        assert layer.keys.dtype == E4M3 and layer.values.dtype == E4M3
        assert (layer.fp8fx.scale_k, layer.fp8fx.scale_v) == scales[f"model.layers.{i}.self_attn"]
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, per_head(IDS).logits)
    ref = per_head.generate(IDS, **GEN)
    assert torch.equal(got.sequences, ref.sequences)
    # the converted model runs its KV rewrite as a dynamo graph, the loaded one eagerly: the same ops,
    # float32 rounding may differ in the last bit
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # saved again from the loaded model: the same file content, the same outputs bit for bit
    again_dir = save_pretrained(loaded, tmp_path / "again")
    first, second = _tensors(saved), _tensors(again_dir)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k].view(torch.uint8), second[k].view(torch.uint8)) for k in first)
    again = load_pretrained(again_dir).generate(IDS, **GEN)
    assert torch.equal(again.sequences, got.sequences)
    assert all(torch.equal(a, b) for a, b in zip(again.logits, got.logits))


def test_bf16_per_head_scales_load_as_llm_compressor_writes_them(per_head, saved, tmp_path):
    """compressed-tensors allocates the scales in the model's dtype (bf16 for a bf16 model); these
    power-of-two scales are exact in bf16, so the model is the same."""
    from safetensors.torch import save_file

    folder = tmp_path / "bf16"
    shutil.copytree(saved, folder)
    d = _tensors(folder)
    for k in [k for k in d if k.endswith(("k_scale", "v_scale"))]:
        d[k] = d[k].to(torch.bfloat16)
    save_file(d, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert check_checkpoint(folder).problems == []
    with torch.no_grad():
        assert torch.equal(load_pretrained(folder)(IDS).logits, per_head(IDS).logits)


@pytest.mark.parametrize("fmt,needle", [("vllm", "vLLM 'fp8'.*BaseKVCacheMethod"),
                                        ("modelopt", "ModelOpt.*ModelOptFp8KVCacheMethod")])
def test_formats_with_one_kv_scale_per_tensor_refuse_per_head_and_write_nothing(tmp_path, per_head, fmt, needle):
    out = tmp_path / fmt
    with pytest.raises(UnsupportedError, match=f"per-head KV-cache scales.*{needle}.*compressed-tensors.*'attn_head'"
                                                ".*kv_cache_strategy 'tensor'"):
        save_pretrained(per_head, out, format=fmt)
    assert not out.exists()


def test_a_plan_mixing_per_head_and_per_tensor_scales_is_refused():
    with pytest.raises(UnsupportedError, match="per tensor and per head mixed"):
        KVScales(0.1, (0.1, 0.2), E4M3)
    plan = Plan({}, [], {"a": KVScales((0.1, 0.2), (0.1, 0.2), E4M3), "b": KVScales(0.1, 0.1, E4M3)})
    with pytest.raises(UnsupportedError, match="per head in a and per tensor"):
        kv_strategy(plan)
    assert kv_strategy(Plan({}, [], {"a": KVScales([0.1, 0.2], (0.3, 0.4), E4M3)})) == "attn_head"
    assert kv_strategy(Plan({}, [], {})) is None


# ------------------------------------------------------------------------------------ the traps
def _edit(folder: Path, config=None, tensors=None):
    from safetensors.torch import save_file

    if config is not None:
        cfg = json.loads((folder / "config.json").read_text())
        config(cfg["quantization_config"])
        (folder / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        d = _tensors(folder)
        tensors(d)
        save_file(d, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _set(key: str, value):
    return lambda d: d.update({key: value(d[key])})


PER_HEAD_TRAPS = {
    "three_heads": (None, _set(f"{ATTN}.k_scale", lambda t: torch.cat([t, t[:1]])),
                    f"{ATTN}.k_scale: shape [3, 1, 1]: 3 value(s), but the model has 2 KV heads"),
    "one_value": (None, _set(f"{ATTN}.v_scale", lambda t: t[:1].reshape(1)),
                  f"{ATTN}.v_scale: shape [1]: 1 value(s), but the model has 2 KV heads"),
    "flat": (None, _set(f"{ATTN}.k_scale", lambda t: t.reshape(-1)), f"{ATTN}.k_scale: shape [2], the consumer reads "
             "[2, 1, 1]"),
    "zero_head": (None, _set(f"{ATTN}.k_scale", lambda t: t * torch.tensor([1.0, 0.0]).reshape(2, 1, 1)),
                  f"{ATTN}.k_scale: 1 of 2 value(s) are not finite and positive"),
    "scheme_says_tensor": (lambda q: q["kv_cache_scheme"].update(strategy="tensor"), None,
                           f"{ATTN}.k_scale: shape [2, 1, 1]: 2 values (per-head scales?), but kv_cache_scheme "
                           "strategy 'tensor' is one KV-cache scale per tensor"),
    "unknown_strategy": (lambda q: q["kv_cache_scheme"].update(strategy="channel"), None,
                         "kv_cache_scheme.strategy: 'channel'"),
}


@pytest.mark.parametrize("config,tensors,needle", list(PER_HEAD_TRAPS.values()), ids=list(PER_HEAD_TRAPS))
def test_check_names_the_kv_scale_of_every_per_head_trap(tmp_path, saved, config, tensors, needle):
    folder = tmp_path / "ckpt"
    shutil.copytree(saved, folder)
    _edit(folder, config, tensors)
    assert_check_names(folder, needle)


@pytest.fixture(scope="module")
def per_tensor_folders(tmp_path_factory):
    """A per-tensor KV model (the same calibration, kv_cache_strategy 'tensor') saved as vllm and modelopt."""
    model = calibrated(tiny_llama(layers=2), tmp_path_factory.mktemp("meas_t") / "m", lengths=(9,))
    root = tmp_path_factory.mktemp("per_tensor")
    return {fmt: save_pretrained(model, root / fmt, format=fmt) for fmt in ("vllm", "modelopt")}


@pytest.mark.parametrize("fmt,key", [("vllm", f"{ATTN}.k_scale"), ("modelopt", f"{ATTN}.v_proj.v_scale")])
def test_per_head_scales_in_a_per_tensor_format_are_named(tmp_path, per_tensor_folders, fmt, key):
    folder = tmp_path / fmt
    shutil.copytree(per_tensor_folders[fmt], folder)
    assert check_checkpoint(folder).problems == []
    _edit(folder, tensors=_set(key, lambda t: t.reshape(1).repeat(2)))
    problems = [str(p) for p in check_checkpoint(folder).problems]
    assert any(p.startswith(f"{key}: shape [2]: 2 values (per-head scales?)") and "one KV-cache scale per tensor" in p
               for p in problems), problems
    with pytest.raises(CheckpointError, match="would load wrong"):
        load_pretrained(folder)
