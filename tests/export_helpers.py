"""Models, calibration and comparisons shared by the checkpoint-export tests
(tests/test_export*.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import fp8fx
from fp8fx.export import CheckpointError, check_checkpoint, load_pretrained

E4M3 = torch.float8_e4m3fn
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def llama(hidden: int = 64, kv_heads: int = 2, tied: bool = False, seed: int = 0):
    """A two-layer Llama of 4 attention heads (``kv_heads`` of them for keys and values)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def quantized(scheme, hidden: int = 64, **kw):
    """:func:`llama` (``kw``: its other arguments) quantized to ``scheme``, converted on :data:`IDS`."""
    return fp8fx.quantize(llama(hidden, **kw), scheme, example_inputs=(IDS,))


def calibrated(model, path: Path, lengths: tuple[int, ...] = (9, 14), **fields: Any):
    """``model`` with static FP8 Linears plus an FP8 KV cache (lm_head and the attention ops other
    than the cache in high precision), measured into ``path`` on greedy generations from random
    prompts of ``lengths`` tokens, then converted. ``fields``: more FP8Config fields."""
    cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(path),
                          blocklist={"names": ["lm_head"], "types": ["sdpa", "matmul", "softmax"]}, **fields)
    fp8fx.prepare(model, cfg)
    g = torch.Generator().manual_seed(0)
    for n in lengths:
        model.generate(torch.randint(0, 128, (1, n), generator=g), max_new_tokens=3, do_sample=False)
    fp8fx.finalize_calibration(model)
    fp8fx.convert(model)
    return model


def fp8_linears(model) -> dict[str, fp8fx.Fp8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, fp8fx.Fp8Linear)}


def assert_same_model(loaded, saved, weight_scales: bool = False):
    """The same FP8 Linears, schemes and FP8 weight bits (and, with ``weight_scales``, weight scales)."""
    a, b = fp8_linears(loaded), fp8_linears(saved)
    assert a.keys() == b.keys() and a
    for name, m in a.items():
        assert m.weight.dtype == E4M3 and m.scheme == b[name].scheme, name
        assert torch.equal(m.weight.view(torch.uint8), b[name].weight.view(torch.uint8)), name
        if weight_scales:
            assert torch.equal(m.weight_scale, b[name].weight_scale), name


def assert_check_names(folder: Path, needle: str) -> None:
    """``fp8fx check`` of ``folder`` reports a problem containing ``needle``, and loading it is refused."""
    problems = [str(p) for p in check_checkpoint(folder).problems]
    assert any(needle in p for p in problems), problems
    with pytest.raises(CheckpointError, match="would load wrong"):
        load_pretrained(folder)
