"""Memory that is real: after convert (or a QUANTIZE compile), no high-precision weight of a
quantized Linear stays alive anywhere in fp8fx or in the dynamo caches it fills."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import fp8fx
from tiny_models import tiny_llama

BLOCK = {"names": ["lm_head"]}



pytestmark = pytest.mark.usefixtures("fresh_dynamo")

def _hp_weights(model) -> dict[str, weakref.ref]:
    return {n: weakref.ref(m.weight) for n, m in model.named_modules()
            if type(m) is torch.nn.Linear and n != "lm_head"}


def _alive(refs) -> list[str]:
    gc.collect()
    return [n for n, r in refs.items() if r() is not None]


def _calibrate(tmp_path):
    model = tiny_llama()
    fp8fx.prepare(model, fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m"), blocklist=BLOCK))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (2, 9)))
    fp8fx.finalize_calibration(model)
    return model


def _fp8_bytes(model) -> tuple[int, int]:
    """(bytes of float8 tensors, bytes of every other floating tensor of quantized modules)."""
    fp8 = other = 0
    for m in model.modules():
        if isinstance(m, fp8fx.Fp8Linear):
            fp8 += m.weight.numel() * m.weight.element_size()
    for t in model.state_dict().values():
        if t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            other += t.numel() * t.element_size()
    return fp8, other


def test_prepare_then_convert_frees_the_hp_weights(tmp_path):
    model = _calibrate(tmp_path)
    refs = _hp_weights(model)
    assert len(refs) == 14
    fp8fx.convert(model)
    assert _alive(refs) == []
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (1, 4)))
    assert _alive(refs) == []


@pytest.mark.parametrize("capture", ["example_inputs", "first_call"])
def test_convert_from_files_frees_the_hp_weights(tmp_path, capture):
    _calibrate(tmp_path)
    model = tiny_llama()
    refs = _hp_weights(model)
    qcfg = fp8fx.FP8Config(mode="QUANTIZE", dump_stats_path=str(tmp_path / "m"), blocklist=BLOCK)
    ids = torch.randint(0, 128, (1, 6))
    if capture == "example_inputs":
        fp8fx.convert(model, qcfg, example_kwargs={"input_ids": ids})
    else:
        fp8fx.convert(model, qcfg)
        with torch.no_grad():
            model(input_ids=ids)
    assert _alive(refs) == []


def test_quantize_compile_holds_each_weight_once_in_fp8(tmp_path):
    _calibrate(tmp_path)
    model = tiny_llama()
    hp_bytes = sum(r().numel() * r().element_size() for r in _hp_weights(model).values())
    refs = _hp_weights(model)
    qcfg = {"mode": "QUANTIZE", "dump_stats_path": str(tmp_path / "m"), "blocklist": BLOCK}
    cm = torch.compile(model, backend="fp8fx", options={"config": qcfg, "inductor": False})
    with torch.no_grad():
        a = cm(input_ids=torch.randint(0, 128, (1, 6))).logits
        cm(input_ids=torch.randint(0, 128, (2, 3)))
    assert _alive(refs) == []
    fp8, _ = _fp8_bytes(model)
    assert fp8 * 4 == hp_bytes  # float32 -> float8: a quarter of the bytes, held on the model
    assert torch.isfinite(a).all()


def test_keep_hp_weights_keeps_them(tmp_path):
    _calibrate(tmp_path)
    model = tiny_llama()
    refs = _hp_weights(model)
    qcfg = {"mode": "QUANTIZE", "dump_stats_path": str(tmp_path / "m"), "blocklist": BLOCK}
    cm = torch.compile(model, backend="fp8fx", options={"config": qcfg, "inductor": False, "keep_hp_weights": True})
    with torch.no_grad():
        cm(input_ids=torch.randint(0, 128, (1, 6)))
    assert len(_alive(refs)) == 14
