"""Quantization schemes: config, the ``fp8fx::scaled_linear`` kernels against float64, modules,
``fp8fx.quantize`` on the architecture matrix (eager, the fp8fx backend, Inductor), MoE experts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fp8fx
from fp8fx import numerics
from fp8fx.api import QUANTIZE_DEFAULT_BLOCKLIST
from fp8fx.config import FP8Config
from fp8fx.errors import ConfigError, QuantizationError
from fp8fx.kernels.schemes import scaled_linear_fast, scaled_linear_reference
from fp8fx.modules import Fp8Experts, Fp8Linear, grouped_linear
from fp8fx.numerics import sqnr_db
from fp8fx.schemes import PRESETS, LinearScheme, Scheme, WeightGranularity
from arch_zoo import ARCHS, build, eval_ids

E4M3 = torch.float8_e4m3fn
PRESET_NAMES = ["FP8_DYNAMIC", "FP8_BLOCK", "FP8_WEIGHT_ONLY"]


# ------------------------------------------------------------------------------------ config
def test_presets_have_the_peers_meanings():
    assert PRESETS["FP8"].to_dict() == {"weights": "tensor", "activations": "static"}
    assert PRESETS["FP8_DYNAMIC"].to_dict() == {"weights": "channel", "activations": "dynamic_token"}
    assert PRESETS["FP8_BLOCK"].to_dict() == {"weights": "block", "activations": "dynamic_group",
                                              "block": [128, 128], "group_size": 128}
    assert PRESETS["FP8_WEIGHT_ONLY"].to_dict() == {"weights": "channel", "activations": "none"}


@pytest.mark.parametrize("value", ["FP8_DYNAMIC", "fp8_block", {"weights": "block", "block": [64, 32],
                                                                "activations": "dynamic_tensor"},
                                   {"linear": "FP8_DYNAMIC", "experts": {"weights": "channel", "activations": "none"}}])
def test_scheme_round_trips_through_json(value, tmp_path):
    cfg = FP8Config(mode="QUANTIZE", scheme=value)
    path = tmp_path / "q.json"
    cfg.to_json_file(path)
    again = FP8Config.from_json_file(path)
    assert again == cfg and again.scheme == cfg.scheme
    assert json.loads(path.read_text())["scheme"] == cfg.scheme.to_json()


def test_scheme_defaults_follow_the_peers_unless_set():
    dyn = FP8Config(mode="QUANTIZE", scheme="FP8_DYNAMIC")
    assert dyn.resolved_scale_method.value == "maxabs_arbitrary" and dyn.backoffs[1] == 1.0
    assert not dyn.needs_measurement
    own = FP8Config(mode="QUANTIZE", scheme="FP8_DYNAMIC", scale_method="maxabs_pow2", weight_backoff=0.5)
    assert own.resolved_scale_method.value == "maxabs_pow2" and own.backoffs[1] == 0.5
    static = FP8Config(scheme="FP8")
    assert static.needs_measurement and static.resolved_scale_method.value == "maxabs_hw"


def test_inc_dynamic_quantization_maps_onto_a_scheme():
    cfg = FP8Config(mode="QUANTIZE", dynamic_quantization=True, scale_method="maxabs_pcs_pow2")
    s = cfg.scheme_for("fc", "Linear")
    assert (s.weights.value, s.activations.value) == ("channel", "dynamic_token")
    cfg = FP8Config(mode="QUANTIZE", dynamic_quantization=True,
                    scale_method="act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw")
    assert cfg.scheme_for("fc", "Linear").weights.value == "tensor" and not cfg.needs_measurement
    per_channel_static = FP8Config(scale_method="act_maxabs_hw_weights_pcs_maxabs_pow2")
    s = per_channel_static.scheme_for("fc", "Linear")
    assert (s.weights.value, s.activations.value) == ("channel", "static")


@pytest.mark.parametrize("kwargs, needles", [
    ({"mode": "MEASURE", "scheme": "FP8_DYNAMIC"}, ["MEASURE", "FP8_DYNAMIC", "QUANTIZE"]),
    ({"scheme": "FP8", "dynamic_quantization": True}, ["dynamic_quantization", "FP8"]),
    ({"scheme": "FP8", "scale_method": "act_maxabs_hw_weights_pcs_maxabs_pow2"}, ["per channel", "per tensor"]),
    ({"scheme": "FP8_BLOCK", "scale_method": "maxabs_pow2_opt_weight"}, ["maxabs_pow2_opt_weight", "block"]),
    ({"scheme": {"weights": "block", "block": [128, 0]}}, ["block", "positive"]),
    ({"scheme": {"weights": "channel", "activations": "per_token"}}, ["activations", "dynamic_token"]),
    ({"scheme": {"weights": "channel", "group": 64}}, ["group", "group_size"]),
    ({"scheme": {"experts": "FP8_DYNAMIC"}}, ["linear", "experts"]),
    ({"scheme": "FP8_DYNAMIK"}, ["FP8_DYNAMIC"]),
])
def test_nonsense_combinations_raise_naming_the_keys(kwargs, needles):
    with pytest.raises(ConfigError) as info:
        FP8Config(**kwargs)
    for n in needles:
        assert n in str(info.value), str(info.value)


# ------------------------------------------------------------------------------------ kernels
def _float64_reference(x, w, ws, xs, bias, fp8_max, act, group, bn, bk):
    """The op's definition, written independently and in float64 (only the dynamic scale is
    float32, as the op defines it)."""
    x64 = x.double().reshape(-1, x.shape[-1])
    m, k = x64.shape
    n = w.shape[0]
    if bn:
        s = ws.double().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        wd = w.double() * s
    else:
        wd = w.double() * (ws.double().reshape(-1, 1) if ws.dim() else ws.double())
    if act == "none":
        xd = x64
    else:
        if act == "static":
            s = xs.double().reshape(1, 1).expand(m, k)
        else:
            a = x.float().reshape(m, k).abs()
            if act == "tensor":
                amax = a.amax().expand(m, k)
            elif act == "token":
                amax = a.amax(1, keepdim=True).expand(m, k)
            else:
                amax = torch.stack([a[:, j:j + group].amax(1) for j in range(0, k, group)], 1)
                amax = amax.repeat_interleave(group, 1)[:, :k]
            s = (amax.clamp_min(1e-12) / fp8_max).double()  # float32 scale, as defined
        xd = (x64 / s).clamp(-fp8_max, fp8_max).to(w.dtype).double() * s
    y = xd @ wd.t()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], n)


CASES = [  # (weights, activations, block, group)
    ("tensor", "tensor", None, 0), ("tensor", "token", None, 0), ("channel", "token", None, 0),
    ("channel", "none", None, 0), ("tensor", "group", None, 48), ("block", "group", (128, 128), 128),
    ("block", "static", (64, 32), 0), ("block", "token", (50, 70), 0), ("channel", "static", None, 0),
]


def _quantized_weight(w, weights, block, fmt=E4M3):
    scale = numerics.weight_scale_for(w, "maxabs_arbitrary", weights, block or (128, 128), fp8_dtype=fmt,
                                      target="cpu", backoff=1.0)
    if weights == "block":
        return numerics.quantize_weight_blocks(w, scale, block, fmt), scale
    return numerics.quantize_weight(w, scale, fmt), scale


@pytest.mark.parametrize("weights, act, block, group", CASES)
@pytest.mark.parametrize("m", [1, 3, 17, 300])
def test_kernels_match_float64_per_scheme(weights, act, block, group, m):
    torch.manual_seed(m)
    n, k = 200, 260  # neither divides the blocks or the groups: edge tiles and groups are tested
    w = torch.randn(n, k)
    q, ws = _quantized_weight(w, weights, block)
    x = torch.randn(2, m, k) * torch.logspace(-2, 1, k)  # per-column ranges: groups differ
    bias = torch.randn(n)
    xs = torch.tensor(0.02) if act == "static" else None
    bn, bk = block or (0, 0)
    args = (x, q, ws, xs, bias, 448.0, act, group, bn, bk)
    expected = _float64_reference(*args)
    for fn in (scaled_linear_reference, scaled_linear_fast, torch.ops.fp8fx.scaled_linear):
        got = fn(*args).double()
        err = (got - expected).abs().max() / expected.abs().max()
        assert err < 2e-5, (fn, float(err))  # float32 summation order; FP8 rounding is identical


def test_bfloat16_activations_take_one_extra_rounding_at_most():
    torch.manual_seed(0)
    q, ws = _quantized_weight(torch.randn(96, 64), "channel", None)
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    args = (x, q, ws, None, None, 448.0, "token", 0, 0, 0)
    expected = _float64_reference(*args)
    got = scaled_linear_fast(*args).double()
    assert ((got - expected).abs() <= expected.abs() * 2 ** -7 + 1e-6).all()


def test_dynamic_scales_are_per_token_not_per_tensor():
    """A row 30000x larger than the others: per-token keeps the small rows at FP8 precision,
    per-tensor pushes them into E4M3's subnormals."""
    torch.manual_seed(0)
    q, ws = _quantized_weight(torch.randn(32, 64), "channel", None)
    x = torch.randn(4, 64)
    x[0] *= 30000
    ref = x @ numerics.dequantize_weight(q, ws).t()
    tok = torch.ops.fp8fx.scaled_linear(x, q, ws, None, None, 448.0, "token", 0, 0, 0)
    ten = torch.ops.fp8fx.scaled_linear(x, q, ws, None, None, 448.0, "tensor", 0, 0, 0)
    assert sqnr_db(ref[1:], tok[1:]) > 25 > sqnr_db(ref[1:], ten[1:])


def test_zero_rows_give_zero_and_nonfinite_rows_stay_visible():
    q, ws = _quantized_weight(torch.randn(8, 16), "channel", None)
    x = torch.randn(3, 16)
    x[0] = 0
    x[2, 3] = float("inf")
    y = torch.ops.fp8fx.scaled_linear(x, q, ws, None, None, 448.0, "token", 0, 0, 0)
    assert (y[0] == 0).all() and torch.isfinite(y[1]).all() and torch.isnan(y[2]).all()


@pytest.mark.parametrize("bad, needle", [
    (dict(activations="tokens"), "activations"), (dict(input_scale=torch.tensor(1.0)), "input_scale"),
    (dict(group_size=64), "group_size"), (dict(block_n=128), "block"),
    (dict(weight_scale=torch.ones(3)), "weight_scale"),
])
def test_op_contract_violations_raise(bad, needle):
    q, ws = _quantized_weight(torch.randn(8, 16), "channel", None)
    args = dict(x=torch.randn(2, 16), weight=q, weight_scale=ws, input_scale=None, bias=None, fp8_max=448.0,
                activations="token", group_size=0, block_n=0, block_k=0)
    args.update(bad)
    with pytest.raises(QuantizationError, match=needle):
        torch.ops.fp8fx.scaled_linear(**args)


# ------------------------------------------------------------------------------------ modules
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_fp8_linear_state_dict_has_the_checkpoint_names(preset):
    scheme = PRESETS[preset]
    q, ws = _quantized_weight(torch.randn(256, 192), scheme.weights.value, scheme.block)
    layer = Fp8Linear(q, ws, None, torch.randn(256), 448.0, scheme)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"}  # dynamic: no input_scale key
    expected = {"channel": (256,), "block": (2, 2)}[scheme.weights.value]
    assert tuple(sd["weight_scale"].shape) == expected
    other = Fp8Linear(q.clone(), ws * 2, None, None if layer.bias is None else layer.bias.clone(), 448.0, scheme)
    other.load_state_dict(sd)
    x = torch.randn(3, 192)
    torch.testing.assert_close(other(x), layer(x))
    with pytest.raises(QuantizationError, match="weight_scale"):
        other.load_state_dict({**sd, "weight_scale": torch.ones(7)})
    with pytest.raises(QuantizationError, match="input_scale"):
        Fp8Linear(q, ws, torch.tensor(0.1), None, 448.0, scheme)
    assert scheme.describe() in repr(layer)


def _moe(scheme: LinearScheme, e=3, hidden=64, inter=48):
    torch.manual_seed(1)
    w = torch.randn(e, 2 * inter, hidden)
    parts = [_quantized_weight(w[i], scheme.weights.value, scheme.block) for i in range(e)]
    return w, torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "FP8_BLOCK", "FP8_WEIGHT_ONLY"])
def test_grouped_linear_equals_per_expert_scaled_linear(preset):
    s = PRESETS[preset]
    _, q, ws = _moe(s)
    x = torch.randn(10, 64)
    offsets = torch.tensor([4, 4, 10])  # expert 1 gets no rows
    args = (s.activations.op_name, s.op_group, *s.op_block)
    y = grouped_linear(x, q, ws, None, offsets, 448.0, *args)
    for e, (a, b) in enumerate([(0, 4), (4, 4), (4, 10)]):
        if b > a:
            expected = scaled_linear_reference(x[a:b], q[e], ws[e], None, None, 448.0, *args)
            torch.testing.assert_close(y[a:b], expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------- fp8fx.quantize on the architecture matrix
def _cfg(preset: str) -> FP8Config:
    """The preset with the attention kinds left alone but lm_head quantized, so that the count of
    FP8 Linears equals the matrix's (tests/test_architectures.py)."""
    return FP8Config(mode="QUANTIZE", scheme=preset, blocklist={"types": QUANTIZE_DEFAULT_BLOCKLIST["types"]})


def _logits(model, kind):
    with torch.no_grad():
        out = model(input_ids=eval_ids())
    return (out.logits if kind == "causal_lm" else out.last_hidden_state)[0]


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantize_eager_and_backend_on_every_architecture(arch, preset):
    from test_architectures import EXPECTED_LINEARS, MIN_SQNR_DB

    kind = ARCHS[arch][1]
    reference = build(arch)
    expected = _logits(reference, kind)
    model = build(arch)
    fp8fx.quantize(model, _cfg(preset), example_inputs=(eval_ids(),))
    assert fp8fx.report(model)["nodes_quantized"] == {"linear": EXPECTED_LINEARS[arch]}
    scheme = PRESETS[preset]
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            assert m.scheme == scheme and (m.input_scale is None)
        if isinstance(m, Fp8Experts):
            assert all(s == scheme for s in m.schemes.values())
    assert sqnr_db(expected, _logits(model, kind)) >= MIN_SQNR_DB
    if kind == "causal_lm":
        with torch.no_grad():
            model.generate(eval_ids()[:, :4], max_new_tokens=3, do_sample=False)

    torch._dynamo.reset()  # the same scheme through torch.compile(backend="fp8fx"), no Inductor
    compiled = build(arch)
    compiled.forward = torch.compile(compiled.forward, backend="fp8fx",
                                     options={"config": _cfg(preset), "inductor": False})
    assert sqnr_db(expected, _logits(compiled, kind)) >= MIN_SQNR_DB
    torch._dynamo.reset()


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_plain_torch_compile_of_a_quantized_model_lowers_the_op(preset):
    """Inductor decomposes fp8fx::scaled_linear (no call of its eager kernel in the generated
    code); prefill and decode shapes, bfloat16, against eager."""
    from torch._inductor.utils import run_and_get_code

    from fp8fx.kernels import gemv

    torch._dynamo.reset()
    model = build("llama").to(torch.bfloat16)
    fp8fx.quantize(model, preset, example_inputs=(eval_ids(),))
    for ids in (eval_ids(), eval_ids()[:, :1]):
        with torch.no_grad():
            eager = model(input_ids=ids).logits.float()
            fn = torch.compile(model)
            got, code = run_and_get_code(fn, input_ids=ids)
        assert not any("torch.ops.fp8fx." in c for c in code)  # decomposed, not an extern call
        if ids.shape[1] == 1 and gemv.available():  # decode streams the FP8 bytes through the GEMV
            streams = any("fp8fx_cpp.qgemv" in c for c in code)
            assert streams == (Scheme.preset(preset).linear.weights != WeightGranularity.BLOCK)
        assert sqnr_db(eager, got.logits.float()) > 30
    torch._dynamo.reset()


def test_quantize_refuses_a_static_scheme_without_measurements(tmp_path):
    model = build("llama")
    with pytest.raises(ConfigError, match="calibration"):
        fp8fx.quantize(model, "FP8", cfg=FP8Config(dump_stats_path=str(tmp_path / "none")))
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())


def test_quantize_default_keeps_lm_head_and_attention_in_high_precision():
    model = build("llama")
    fp8fx.quantize(model, example_inputs=(eval_ids(),))
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, Fp8Linear)
    assert fp8fx.report(model)["scheme"] == "FP8_DYNAMIC"
    assert "kv_cache" not in fp8fx.report(model)["nodes_quantized"]


def test_scheme_object_and_per_kind_schemes():
    model = build("mixtral")
    scheme = Scheme.coerce({"linear": "FP8_DYNAMIC", "experts": "FP8_WEIGHT_ONLY"})
    fp8fx.quantize(model, scheme, example_inputs=(eval_ids(),))
    experts = [m for m in model.modules() if isinstance(m, Fp8Experts)]
    assert experts and all(s == PRESETS["FP8_WEIGHT_ONLY"] for m in experts for s in m.schemes.values())
    assert all(m.scheme == PRESETS["FP8_DYNAMIC"] for m in model.modules() if isinstance(m, Fp8Linear))


# ------------------------------------------------------------------------------------ the CLI
def test_cli_scheme_skips_calibration_and_says_so(tmp_path, capsys):
    from fp8fx import cli
    from test_data import build_tiny_hf_folder, write_tiny_text

    model = build_tiny_hf_folder(tmp_path / "model", tied=True)
    calib = write_tiny_text(tmp_path / "calib.txt", repeats=8)
    text = write_tiny_text(tmp_path / "eval.txt", repeats=3)
    report = tmp_path / "r.json"
    argv = ["quantize", "--model", str(model), "--calib", str(calib), "--eval", str(text), "--window", "16",
            "--no-progress", "--report-json", str(report)]
    assert cli.main([*argv, "--scheme", "fp8_dynamic"]) == 0
    out = capsys.readouterr().out
    assert "scheme: FP8_DYNAMIC  (calibration skipped" in out
    result = json.loads(report.read_text())
    assert result["calib_tokens"] == 0 and result["calibration"] == "skipped" and result["mode"] == "QUANTIZE"
    assert result["nodes_quantized"] == {"linear": 14} and abs(result["ppl_delta_pct"]) < 5
    assert cli.main([*argv, "--scheme", "FP8"]) == 0  # static: calibrates as the default job does
    assert json.loads(report.read_text())["calibration"] == "run"
    assert cli.main([*argv, "--scheme", "FP9"]) == 2
    assert "--scheme FP9" in capsys.readouterr().err
