"""torch.compile(model, backend="fp8fx"): the same passes as prepare/convert, as a backend."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fp8fx
from fp8fx import numerics
from fp8fx.backends import dynamo as fp8fx_dynamo
from fp8fx.errors import ConfigError
from fp8fx.formats.inc import read_measurements
from tiny_models import TwoLinear, tiny_llama



pytestmark = pytest.mark.usefixtures("fresh_dynamo")

def _pair():
    a = TwoLinear()
    b = TwoLinear()
    b.load_state_dict(a.state_dict())
    return a, b


def _calibrate_compiled(tmp_path, model, shapes=(4, 5, 6)):
    cm = torch.compile(model, backend="fp8fx", options={"config": {"mode": "MEASURE", "dump_stats_path": str(tmp_path / "m")}})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in shapes:
            cm(torch.randn(n, 32, generator=g))
    return cm


def test_backend_found_by_name_without_importing_fp8fx():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
        "assert 'fp8fx' not in sys.modules\n"
        "cm = torch.compile(m, backend='fp8fx', options={'config': {'mode': 'MEASURE', 'dump_stats_path': '/nonexistent/x'}})\n"
        "cm(torch.randn(2, 8))\n"
        "assert 'fp8fx.backends.dynamo' in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_measure_through_compile_writes_the_eager_files(tmp_path):
    compiled_model, eager_model = _pair()
    cm = _calibrate_compiled(tmp_path / "c", compiled_model)
    fp8fx.finalize_calibration(cm)
    fp8fx.prepare(eager_model, fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "e" / "m")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in (4, 5, 6):
            eager_model(torch.randn(n, 32, generator=g))
    fp8fx.finalize_calibration(eager_model)
    a, b = read_measurements(tmp_path / "c" / "m"), read_measurements(tmp_path / "e" / "m")
    assert sorted(a.nodes) == sorted(b.nodes) == ["fc1", "fc2", "softmax_0"]
    for name in a.nodes:
        assert a.nodes[name].input_maxabs(0) == b.nodes[name].input_maxabs(0)
    assert float(a.nodes["fc1"].weight_maxabs()[0]) == float(b.nodes["fc1"].weight_maxabs()[0])


def test_quantize_through_compile_equals_eager_convert(tmp_path):
    model, _ = _pair()
    cm = _calibrate_compiled(tmp_path, model)
    fp8fx.finalize_calibration(cm)
    fresh, eager = _pair()
    eager.load_state_dict(model.state_dict())
    fresh.load_state_dict(model.state_dict())
    qcfg = {"mode": "QUANTIZE", "dump_stats_path": str(tmp_path / "m")}
    cq = torch.compile(fresh, backend="fp8fx", options={"config": qcfg, "inductor": False})
    x = torch.randn(7, 32)
    fp8fx.convert(eager, fp8fx.FP8Config(**qcfg), x)
    with torch.no_grad():
        assert torch.equal(cq(x), eager(x))
        # the first call swapped the modules, as convert does; the next ones run the swapped model
        assert isinstance(fresh.fc1, fp8fx.Fp8Linear) and fresh.fc1.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(cq(x), eager(x))
        assert torch.equal(cq(x[:3]), eager(x[:3]))


def test_keep_hp_weights_leaves_the_model_alone(tmp_path):
    model, _ = _pair()
    fp8fx.finalize_calibration(_calibrate_compiled(tmp_path, model))
    fresh, eager = _pair()
    fresh.load_state_dict(model.state_dict())
    eager.load_state_dict(model.state_dict())
    qcfg = {"mode": "QUANTIZE", "dump_stats_path": str(tmp_path / "m")}
    cq = torch.compile(fresh, backend="fp8fx", options={"config": qcfg, "inductor": False, "keep_hp_weights": True})
    x = torch.randn(7, 32)
    fp8fx.convert(eager, fp8fx.FP8Config(**qcfg), x)
    with torch.no_grad():
        assert torch.equal(cq(x), eager(x))
    assert fresh.fc1.weight.dtype == torch.float32 and type(fresh.fc1) is torch.nn.Linear


@pytest.mark.parametrize("change", ["load_state_dict", "copy_"])
def test_weights_changed_in_place_are_never_run_stale(tmp_path, change):
    """keep_hp_weights: the graph's FP8 constants would be stale (with the new bias): it raises."""
    model, other = _pair()
    fp8fx.finalize_calibration(_calibrate_compiled(tmp_path, model))
    qcfg = {"mode": "QUANTIZE", "dump_stats_path": str(tmp_path / "m")}
    cq = torch.compile(model, backend="fp8fx", options={"config": qcfg, "inductor": False, "keep_hp_weights": True})
    x = torch.randn(3, 32)
    with torch.no_grad():
        cq(x)
        if change == "load_state_dict":
            model.load_state_dict(other.state_dict())
        else:
            model.fc2.weight.copy_(other.fc2.weight)
        with pytest.raises(fp8fx.QuantizationError, match="changed in place.*torch._dynamo.reset"):
            cq(x)
        torch._dynamo.reset()  # what the message says: recast from the new weights
        expected = fp8fx.convert(other, fp8fx.FP8Config(**qcfg), x)(x) if change == "load_state_dict" else None
        out = cq(x)
    if expected is not None:
        assert torch.equal(out, expected)


def test_swapped_model_refuses_high_precision_state_dicts(tmp_path):
    """Default mode: the FP8 weights live on the model, so loading a bf16/fp32 checkpoint into them
    would cast without a scale; it is refused, naming the key."""
    model, other = _pair()
    fp8fx.finalize_calibration(_calibrate_compiled(tmp_path, model))
    qcfg = {"mode": "QUANTIZE", "dump_stats_path": str(tmp_path / "m")}
    cq = torch.compile(model, backend="fp8fx", options={"config": qcfg, "inductor": False})
    with torch.no_grad():
        cq(torch.randn(3, 32))
    with pytest.raises(fp8fx.QuantizationError, match="fc1.weight"):
        model.load_state_dict(other.state_dict())


def test_weights_are_cast_once(tmp_path, monkeypatch):
    model, _ = _pair()
    cm = _calibrate_compiled(tmp_path, model)
    fp8fx.finalize_calibration(cm)
    calls = []
    real = numerics.quantize_weight
    monkeypatch.setattr(numerics, "quantize_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    cq = torch.compile(model, backend="fp8fx", dynamic=False,
                       options={"config": {"mode": "QUANTIZE", "dump_stats_path": str(tmp_path / "m")}, "inductor": False,
                                "keep_hp_weights": True})
    with torch.no_grad():
        for n in (2, 3, 4, 2, 3):  # three static shapes: three graphs, five calls
            cq(torch.randn(n, 32))
    assert len(calls) == 2  # fc1 and fc2, once each
    with torch.no_grad():
        model.fc1.weight.mul_(2)  # an in-place change is seen (version counter) on recompile
    torch._dynamo.reset()
    with torch.no_grad():
        cq(torch.randn(2, 32))
    assert len(calls) == 3


def test_generate_prefill_and_decode_through_the_backend(tmp_path):
    model = tiny_llama()
    fp8fx.prepare(model, fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m"),
                                         blocklist={"names": ["lm_head"]}))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (2, 9)))
    fp8fx.finalize_calibration(model)
    fresh = tiny_llama()
    qcfg = {"mode": "QUANTIZE", "dump_stats_path": str(tmp_path / "m"), "blocklist": {"names": ["lm_head"]}}
    fresh.forward = torch.compile(fresh.forward, backend="fp8fx", dynamic=True,
                                  options={"config": qcfg, "inductor": False})
    ids = torch.randint(0, 128, (1, 5))
    out = fresh.generate(ids, max_new_tokens=4, do_sample=False)
    eager = tiny_llama()
    fp8fx.convert(eager, fp8fx.FP8Config(**qcfg), example_kwargs={"input_ids": ids})
    assert torch.equal(out, eager.generate(ids, max_new_tokens=4, do_sample=False))


def test_unknown_option_is_named():
    cm = torch.compile(TwoLinear(), backend="fp8fx", options={"config": {"mode": "MEASURE"}, "inductr": True})
    with pytest.raises(Exception, match="inductr"):
        cm(torch.randn(2, 32))
    with pytest.raises(ConfigError, match="inductr"):
        fp8fx_dynamo._options({"inductr": True})


def test_cache_digest_covers_config_and_scales():
    from fp8fx.passes.rewrite import LinearQuant

    q = LinearQuant(torch.ones(2, 2).to(torch.float8_e4m3fn), torch.tensor(0.5), torch.tensor(0.25))
    q2 = LinearQuant(q.weight, q.weight_scale, torch.tensor(0.125))
    cfg = fp8fx.FP8Config(mode="QUANTIZE")
    d = fp8fx_dynamo._digest(cfg, [q])
    assert d == fp8fx_dynamo._digest(cfg, [q])
    assert d != fp8fx_dynamo._digest(cfg, [q2])
    assert d != fp8fx_dynamo._digest(cfg.replace(input_backoff=0.25), [q])
    assert fp8fx_dynamo._cache_pass(d).uuid() == "fp8fx-" + d


def test_quantize_through_compile_with_inductor_matches_eager(tmp_path):
    model, _ = _pair()
    cm = _calibrate_compiled(tmp_path, model)
    fp8fx.finalize_calibration(cm)
    qcfg = {"mode": "QUANTIZE", "dump_stats_path": str(tmp_path / "m")}
    fresh, eager = _pair()
    fresh.load_state_dict(model.state_dict())
    eager.load_state_dict(model.state_dict())
    cq = torch.compile(fresh, backend="fp8fx", options={"config": qcfg})  # Inductor
    x = torch.randn(7, 32)
    fp8fx.convert(eager, fp8fx.FP8Config(**qcfg), x)
    with torch.no_grad():
        torch.testing.assert_close(cq(x), eager(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep", [False, True])
def test_quantize_graph_refuses_another_models_parameters(tmp_path, keep):
    model, other = _pair()
    cm = _calibrate_compiled(tmp_path, model)
    fp8fx.finalize_calibration(cm)
    qcfg = {"mode": "QUANTIZE", "dump_stats_path": str(tmp_path / "m")}
    fn = torch.compile(lambda m, x: m(x), backend="fp8fx",
                       options={"config": qcfg, "inductor": False, "keep_hp_weights": keep})
    with torch.no_grad():
        fn(model, torch.randn(3, 32))
        with pytest.raises(Exception, match="torch._dynamo.reset"):
            fn(other, torch.randn(3, 32))  # same shapes and dtypes: dynamo would reuse the graph
        torch._dynamo.reset()  # as the message says: the other model then gets its own FP8 weights
        reference = _pair()[0]
        reference.load_state_dict(other.state_dict())
        x = torch.randn(3, 32)
        fp8fx.convert(reference, fp8fx.FP8Config(**qcfg), x)
        assert torch.equal(fn(other, x), reference(x))
        assert torch.equal(fn(other, x), reference(x))


def test_swapped_model_runs_the_fp8_weights_it_holds_now(tmp_path):
    """Default mode: the FP8 weights live on the model, so loading another FP8 state dict (same
    layout) is what the compiled model runs next, Inductor included; nothing is stale."""
    model, _ = _pair()
    fp8fx.finalize_calibration(_calibrate_compiled(tmp_path, model))
    qcfg = {"mode": "QUANTIZE", "dump_stats_path": str(tmp_path / "m")}
    first, second = _pair()
    second.fc1.weight.data.mul_(-2)
    x = torch.randn(5, 32)
    fp8fx.convert(second, fp8fx.FP8Config(**qcfg), x)
    cq = torch.compile(first, backend="fp8fx", options={"config": qcfg})
    with torch.no_grad():
        before = cq(x)
        first.load_state_dict(second.state_dict())
        after = cq(x)
        torch.testing.assert_close(after, second(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before, after)
