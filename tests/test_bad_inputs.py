"""Bad inputs: every case is refused with the exact fp8fx error class and a message naming the
key, file, node or module concerned (bad measurement FILES: test_bad_measurement_files.py).

Sections: config keys and values, config files and QUANT_CONFIG, unsupported modes, hp_dtype,
type spellings in allowlist/blocklist, measurements that do not fit the model, models that
cannot be captured, Fp8Linear given wrong tensors (plus the checkpoint scale layouts it must
accept, checked against a float64 reference), Fp8Linear.load_state_dict, torch.compile options.
Small models only (tests/tiny_models.py), no Inductor compile.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import fp8fx
from fp8fx import FP8Config
from fp8fx.errors import CaptureError, ConfigError, Fp8fxError, MeasurementError, QuantizationError
from fp8fx.modules import Fp8Linear
from tiny_models import GraphBreak, TwoLinear

E4M3 = torch.float8_e4m3fn
X = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))


def _raises(cls, fn, *needles):
    """``fn()`` raises ``cls`` (an Fp8fxError subclass; subclasses of it count, e.g. UnsupportedError
    for ConfigError) whose message contains every needle."""
    pattern = "".join(f"(?=.*{re.escape(str(n))})" for n in needles)
    with pytest.raises(cls, match=re.compile(pattern, re.S)) as ei:
        fn()
    assert isinstance(ei.value, Fp8fxError)
    return str(ei.value)


def _measured(tmp_path, name="measure", **cfg):
    """Calibrate a TwoLinear (MEASURE, one batch) and return the dump_stats_path of its files."""
    prefix = str(tmp_path / name)
    model = fp8fx.prepare(TwoLinear(), FP8Config(mode="MEASURE", dump_stats_path=prefix, **cfg), example_inputs=X)
    with torch.no_grad():
        model(X)
    fp8fx.finalize_calibration(model)
    return prefix


def _quantize_cfg(prefix, **kw):
    return FP8Config(mode="QUANTIZE", dump_stats_path=prefix, **kw)


# ------------------------------------------------------------------------ config keys and values
@pytest.mark.parametrize("key, closest", [("modee", "mode"), ("blocklst", "blocklist"),
                                          ("scale_methd", "scale_method"), ("hp_dtpye", "hp_dtype"),
                                          ("dump_stat_path", "dump_stats_path")])
def test_unknown_key_suggests_the_closest(key, closest):
    _raises(ConfigError, lambda: FP8Config.from_dict({key: "x"}), f"invalid key {key!r}",
            f"Did you mean {closest!r}?")


def test_unknown_keys_in_nested_objects_suggest_the_closest():
    _raises(ConfigError, lambda: FP8Config.from_dict({"scale_params": {"weight_backof": 0.5}}),
            "'weight_backof'", "'scale_params'", "Did you mean 'weight_backoff'?")
    _raises(ConfigError, lambda: FP8Config.from_dict({"allowlist": {"name": ["fc1"]}}),
            "'name'", "'allowlist'", "Did you mean 'names'?")
    _raises(ConfigError, lambda: FP8Config.from_dict({"input_backoff": 0.5}),
            "'input_backoff'", "scale_params")  # misplaced: says where it belongs


@pytest.mark.parametrize("key, value, closest", [
    ("mode", "MEASUR", "MEASURE"), ("mode", "QUANT", "QUANTIZE"), ("fp8_config", "E4M4", "E4M3"),
    ("hp_dtype", "bf15", "bf16"), ("observer", "maxab", "maxabs"), ("target", "cdua", "cuda"),
    ("measure_exclude", "INPUT|OUTPUT", None), ("scale_method", "maxabs_hww", "maxabs_hw"),
    ("kv_cache_dtype", "fp9", None), ("scale_format", "scalr", "scalar"),
])
def test_bad_enum_value_names_key_value_and_choices(key, value, closest):
    msg = _raises(ConfigError, lambda: FP8Config.from_dict({key: value}), f"invalid value {value!r} for {key!r}",
                  "valid choices")
    if closest:
        assert f"Did you mean {closest!r}?" in msg


@pytest.mark.parametrize("key, value, needle", [
    ("mode", 3, "'mode'"), ("hp_dtype", 16, "'hp_dtype'"), ("use_qdq", "yes", "'use_qdq'"),
    ("ignore_modules_wo_measures", 1, "'ignore_modules_wo_measures'"),
    ("dump_stats_path", 3, "'dump_stats_path'"), ("dump_stats_path", "  ", "'dump_stats_path'"),
    ("world_size", 0, "'world_size'"), ("local_rank", -1, "'local_rank'"),
    ("calibration_sample_interval", 1.5, "'calibration_sample_interval'"),
    ("scale_params", [0.5, 0.5], "'scale_params'"), ("allowlist", ["fc1"], "'allowlist'"),
    ("device_for_scales", "GAUDI4", "'device_for_scales'"),
])
def test_wrong_type_names_the_key(key, value, needle):
    _raises(ConfigError, lambda: FP8Config.from_dict({key: value}), needle, repr(value))


@pytest.mark.parametrize("value, needle", [
    ({"default": "maxabs_hw", "modules": {}}, "'modules'"),            # unknown section
    ({"default": "maxabs_hw", "layer_type": {}}, "'layer_type'"),      # typo of a section
    ({"nodes": {"fc1": "maxabs_hw"}}, "'default'"),                     # no default entry
    ({"default": {"wieght": {}}}, "'wieght'"),
    ({"default": {"weight": {"granularity": "PTX"}}}, "scale_method.default.weight.granularity"),
    ({"default": {"activation": {"rounding_method": "ROUND"}}}, "scale_method.default.activation.rounding_method"),
    ({"default": "maxabs_hw", "nodes": {"fc1": "maxabs_hww"}}, "'maxabs_hww'"),
    ({"default": "maxabs_hw", "layers": {"x": "maxabs_pow2"}}, "scale_method.layers"),
    ({"default": {"activation": {"backoff": 2.0}}}, "scale_method.default.activation.backoff"),
    ({"default": {"weight": {"granularity": "PCS"}, "activation": {"granularity": "PTS", "scale_value_type": "OPT"}}},
     "is no known scale method"),
])
def test_bad_scale_method_dict(value, needle):
    _raises(ConfigError, lambda: FP8Config(scale_method=value), needle)


def test_scale_method_dict_unknown_section_suggests_the_closest():
    _raises(ConfigError, lambda: FP8Config.from_dict({"scale_method": {"default": "maxabs_hw", "node": {}}}),
            "'node'", "'scale_method'", "Did you mean 'nodes'?")


@pytest.mark.parametrize("which", ["allowlist", "blocklist"])
@pytest.mark.parametrize("pattern", ["lm_head(", "*proj", "layers.[0"])
def test_bad_regex_names_the_list_and_the_pattern(which, pattern):
    _raises(ConfigError, lambda: FP8Config.from_dict({which: {"names": [pattern]}}), f"{which}:",
            f"invalid regex {pattern!r}", "'names'")


@pytest.mark.parametrize("which", ["allowlist", "blocklist"])
@pytest.mark.parametrize("key, value", [("names", "lm_head"), ("types", "Linear"), ("names", [1]),
                                        ("types", [nn.Linear]), ("names", {"lm_head": 1})])
def test_names_and_types_must_be_lists_of_strings(which, key, value):
    _raises(ConfigError, lambda: FP8Config(**{which: {key: value}}), f"{which}:", f"for {key!r}",
            "list of strings")


@pytest.mark.parametrize("key", ["input_backoff", "weight_backoff"])
@pytest.mark.parametrize("value", [0, -0.25, 1.5, float("nan"), float("inf"), "0.5", True])
def test_backoff_out_of_range(key, value):
    _raises(ConfigError, lambda: FP8Config.from_dict({"scale_params": {key: value}}), f"for {key!r}", "(0, 1]")


def test_local_rank_must_be_below_world_size_and_device_must_agree_with_target():
    _raises(ConfigError, lambda: FP8Config(world_size=2, local_rank=2), "local_rank 2", "world_size 2")
    _raises(ConfigError, lambda: FP8Config.from_dict({"device_for_scales": "GAUDI2", "target": "cpu"}),
            "'device_for_scales'", "'target'")


def test_unsupported_observers_and_measure_exclude_all_are_refused(tmp_path):
    for observer in ("shape", "save"):  # INC names, valid in a file, not implemented here
        cfg = FP8Config(mode="MEASURE", observer=observer, dump_stats_path=str(tmp_path / "m"))
        _raises(ConfigError, lambda: fp8fx.prepare(TwoLinear(), cfg), f"observer {observer!r}")
    cfg = FP8Config(mode="MEASURE", measure_exclude="ALL", dump_stats_path=str(tmp_path / "m"))
    _raises(ConfigError, lambda: fp8fx.prepare(TwoLinear(), cfg), "measure_exclude='ALL'")


def test_config_of_the_wrong_type_is_refused():
    _raises(ConfigError, lambda: fp8fx.prepare(TwoLinear(), 42), "fp8fx.prepare", "int")
    _raises(ConfigError, lambda: fp8fx.convert(TwoLinear(), [("mode", "QUANTIZE")]), "fp8fx.convert", "list")


# ---------------------------------------------------------------------- config files, QUANT_CONFIG
def test_from_json_file_missing_file(tmp_path):
    path = tmp_path / "nope" / "quant.json"
    _raises(ConfigError, lambda: FP8Config.from_json_file(path), str(path), "does not exist")


@pytest.mark.parametrize("text, needle", [('{"mode": "MEASURE",', "not valid JSON"),
                                          ("", "not valid JSON"), ("{'mode': 'MEASURE'}", "not valid JSON"),
                                          ('["mode", "MEASURE"]', "JSON object"), ('"MEASURE"', "JSON object"),
                                          ("null", "JSON object")])
def test_from_json_file_bad_content_names_the_file(tmp_path, text, needle):
    path = tmp_path / "quant.json"
    path.write_text(text)
    _raises(ConfigError, lambda: FP8Config.from_json_file(path), str(path), needle)


def test_from_json_file_bad_key_names_file_and_key(tmp_path):
    path = tmp_path / "quant.json"
    path.write_text(json.dumps({"mode": "QUANTIZE", "blocklsit": {"names": ["lm_head"]}}))
    _raises(ConfigError, lambda: FP8Config.from_json_file(path), str(path), "'blocklsit'", "'blocklist'")
    path.write_text(json.dumps({"mode": "QUANTIZE", "blocklist": {"names": ["lm_head("]}}))
    _raises(ConfigError, lambda: FP8Config.from_json_file(path), str(path), "'lm_head('")


def test_quant_config_env_pointing_at_a_missing_file(tmp_path, monkeypatch):
    path = tmp_path / "missing.json"
    monkeypatch.setenv("QUANT_CONFIG", str(path))
    _raises(ConfigError, FP8Config.from_env, "QUANT_CONFIG", str(path), "does not exist")
    _raises(ConfigError, lambda: fp8fx.prepare(TwoLinear()), "QUANT_CONFIG", str(path))
    _raises(ConfigError, lambda: fp8fx.convert(TwoLinear()), "QUANT_CONFIG", str(path))
    path.write_text("{not json")
    _raises(ConfigError, lambda: fp8fx.prepare(TwoLinear()), "QUANT_CONFIG", str(path), "not valid JSON")
    monkeypatch.delenv("QUANT_CONFIG")
    _raises(ConfigError, lambda: fp8fx.prepare(TwoLinear()), "QUANT_CONFIG is not set")


# --------------------------------------------------------------------------------------- modes
@pytest.mark.parametrize("mode", ["LOAD", "SHAPE", "load"])
@pytest.mark.parametrize("entry", ["prepare", "convert"])
@pytest.mark.parametrize("form", ["FP8Config", "dict", "file"])
def test_load_and_shape_modes_are_refused(tmp_path, mode, entry, form):
    d = {"mode": mode, "dump_stats_path": str(tmp_path / "m")}
    if form == "file":
        cfg = tmp_path / "quant.json"
        cfg.write_text(json.dumps(d))
    else:
        cfg = FP8Config(**d) if form == "FP8Config" else d
    model = TwoLinear()
    _raises(ConfigError, lambda: getattr(fp8fx, entry)(model, cfg, example_inputs=X), f"mode {mode.upper()!r}",
            "not supported")
    assert "_fp8fx" not in model.__dict__ and type(model.fc1) is nn.Linear  # left untouched


def test_measure_config_given_to_convert(tmp_path):
    cfg = FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m"))
    _raises(ConfigError, lambda: fp8fx.convert(TwoLinear(), cfg, example_inputs=X), "fp8fx.convert", "MEASURE")
    prepared = fp8fx.prepare(TwoLinear(), cfg, example_inputs=X)  # a prepared model: same refusal
    prepared(X)
    _raises(ConfigError, lambda: fp8fx.convert(prepared, cfg), "fp8fx.convert", "MEASURE")


# ------------------------------------------------------------------------------------ hp_dtype
def test_hp_dtype_bf16_on_a_float32_model_prepare(tmp_path):
    cfg = FP8Config(mode="MEASURE", hp_dtype="bf16", dump_stats_path=str(tmp_path / "m"))
    model = TwoLinear()
    _raises(ConfigError, lambda: fp8fx.prepare(model, cfg, example_inputs=X), "hp_dtype", "'bf16'",
            "fc1.weight (float32)", "TwoLinear")
    assert "_fp8fx" not in model.__dict__


def test_hp_dtype_bf16_on_a_float32_model_convert(tmp_path):
    prefix = _measured(tmp_path)  # real files: the hp_dtype check is what fails
    model = TwoLinear()
    _raises(ConfigError, lambda: fp8fx.convert(model, _quantize_cfg(prefix, hp_dtype="bf16"), example_inputs=X),
            "hp_dtype", "'bf16'", "fc1.weight (float32)")
    assert type(model.fc1) is nn.Linear and type(model.fc2) is nn.Linear  # nothing changed
    # and the same through a prepared model's own convert
    prepared = fp8fx.prepare(TwoLinear(), FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "p")),
                             example_inputs=X)
    prepared(X)
    _raises(ConfigError, lambda: fp8fx.convert(prepared, _quantize_cfg(str(tmp_path / "p"), hp_dtype="bf16")),
            "hp_dtype", "fc1.weight")


def test_hp_dtype_fp32_on_a_float32_model_works(tmp_path):
    prefix = _measured(tmp_path, hp_dtype="fp32")
    model = fp8fx.convert(TwoLinear(), _quantize_cfg(prefix, hp_dtype="fp32"), example_inputs=X)
    assert type(model.fc1) is Fp8Linear and model(X).dtype == torch.float32


def test_hp_dtype_unset_follows_the_model(tmp_path):
    xb = X.to(torch.bfloat16)
    prefix = str(tmp_path / "m")
    model = fp8fx.prepare(TwoLinear().to(torch.bfloat16), FP8Config(mode="MEASURE", dump_stats_path=prefix),
                          example_inputs=xb)
    model(xb)
    fp8fx.finalize_calibration(model)
    assert FP8Config().hp_dtype is None
    q = fp8fx.convert(TwoLinear().to(torch.bfloat16), _quantize_cfg(prefix), example_inputs=xb)
    assert type(q.fc1) is Fp8Linear and q(xb).dtype == torch.bfloat16
    # a set hp_dtype that disagrees with the bf16 model is refused the other way round too
    _raises(ConfigError, lambda: fp8fx.convert(TwoLinear().to(torch.bfloat16), _quantize_cfg(prefix, hp_dtype="fp32"),
                                               example_inputs=xb), "hp_dtype", "'fp32'", "fc1.weight (bfloat16)")


# ---------------------------------------------------------------------------------- type spellings
def _explain(cfg):
    return fp8fx.explain(TwoLinear(), cfg, example_inputs=X)


def _assert_selects_agrees(cfg, exp):
    for d in exp.rows:
        assert cfg.selects(d.match.name, d.match.type_names) is d.allowed, d.match.name


@pytest.mark.parametrize("spelling", ["torch.nn.Linear", "torch.nn.modules.linear.Linear", "Linear"])
def test_blocklist_type_spellings_block_every_linear(spelling):
    cfg = FP8Config(blocklist={"types": [spelling]})
    exp = _explain(cfg)
    linears = [d for d in exp.rows if d.match.kind.value == "linear"]
    assert sorted(d.match.name for d in linears) == ["fc1", "fc2"]
    assert not any(d.quantize or d.allowed for d in linears)
    assert "linear" not in exp.counts()["quantized"]
    assert all(spelling in d.reason for d in linears)
    _assert_selects_agrees(cfg, exp)
    for other in ("torch.nn.Linear", "torch.nn.modules.linear.Linear", "Linear"):
        assert not cfg.selects("fc1", [other])


def test_allowlist_type_softmax_selects_only_softmax():
    cfg = FP8Config(allowlist={"types": ["Softmax"]})
    exp = _explain(cfg)
    assert {d.match.name for d in exp.rows if d.allowed} == {"softmax_0"}
    assert not any(d.quantize for d in exp.rows if d.match.kind.value == "linear")
    assert all("not in the allowlist" in d.reason for d in exp.rows if not d.allowed)
    _assert_selects_agrees(cfg, exp)


def test_unknown_type_spelling_matches_nothing():
    # documented behaviour: a type name that no node has is not an error, it just matches nothing
    blocked = FP8Config(blocklist={"types": ["Lineer", "torch.nn.Conv2d"]})
    exp = _explain(blocked)
    assert all(d.allowed for d in exp.rows)
    assert exp.counts()["quantized"] == {"linear": 2}
    _assert_selects_agrees(blocked, exp)
    allowed = FP8Config(allowlist={"types": ["Lineer"]})
    exp = _explain(allowed)
    assert not any(d.allowed for d in exp.rows) and exp.counts()["quantized"] == {}
    _assert_selects_agrees(allowed, exp)


# ------------------------------------------------------------------------------------ measurements
class _Other(nn.Module):
    """Same shapes as TwoLinear, other module names."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_measurements_from_another_model_name_the_nodes(tmp_path):
    prefix = _measured(tmp_path)
    model = _Other()
    _raises(MeasurementError, lambda: fp8fx.convert(model, _quantize_cfg(prefix), example_inputs=X),
            "_Other does not have", "fc1", "fc2", "measure_hooks_maxabs")
    assert type(model.up) is nn.Linear


def test_missing_node_without_ignore_modules_wo_measures(tmp_path):
    prefix = _measured(tmp_path, blocklist={"names": ["fc2"]})
    model = TwoLinear()
    _raises(MeasurementError, lambda: fp8fx.convert(model, _quantize_cfg(prefix), example_inputs=X),
            "lack 1 node(s)", "fc2", "ignore_modules_wo_measures")
    assert type(model.fc1) is nn.Linear  # all or nothing
    # with the flag set, fc2 stays in high precision and fc1 is converted
    q = fp8fx.convert(TwoLinear(), _quantize_cfg(prefix, ignore_modules_wo_measures=True), example_inputs=X)
    assert type(q.fc1) is Fp8Linear and type(q.fc2) is nn.Linear


def test_dump_stats_path_in_a_folder_without_files(tmp_path):
    (tmp_path / "empty").mkdir()
    prefix = str(tmp_path / "empty" / "measure")
    _raises(MeasurementError, lambda: fp8fx.convert(TwoLinear(), _quantize_cfg(prefix), example_inputs=X),
            prefix, "measure_hooks_maxabs.npz", "measure_hooks_maxabs.json", "Run calibration")
    # QUANTIZE through prepare (INC style) fails the same way
    _raises(MeasurementError, lambda: fp8fx.prepare(TwoLinear(), _quantize_cfg(prefix)), prefix)


def test_dump_stats_path_naming_the_folder_itself(tmp_path):
    _measured(tmp_path / "stats")  # files are stats/measure_hooks_maxabs.*
    folder = str(tmp_path / "stats")
    _raises(MeasurementError, lambda: fp8fx.convert(TwoLinear(), _quantize_cfg(folder), example_inputs=X),
            folder, "is a directory", "measure_hooks_maxabs.json")


# ------------------------------------------------------------------------- models that cannot be captured
@pytest.mark.parametrize("entry", ["explain", "prepare", "convert"])
def test_graph_break_names_the_model_and_the_break(tmp_path, entry):
    x = torch.randn(2, 4)
    cfg = {"explain": FP8Config(), "prepare": FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m")),
           "convert": _quantize_cfg(str(tmp_path / "m"), scale_method="unit_scale")}[entry]
    model = GraphBreak()
    _raises(CaptureError, lambda: getattr(fp8fx, entry)(model, cfg, example_inputs=x), "GraphBreak.forward",
            "Tensor(2, 4)", "one FX graph", "data-dependent expression", "graph break")
    assert "_fp8fx" not in model.__dict__ and type(model.fc) is nn.Linear


def test_graph_break_on_the_first_call(tmp_path):
    x = torch.randn(2, 4)
    prepared = fp8fx.prepare(GraphBreak(), FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m")))
    _raises(CaptureError, lambda: prepared(x), "GraphBreak.forward", "data-dependent expression")
    pending = fp8fx.convert(GraphBreak(), _quantize_cfg(str(tmp_path / "m"), scale_method="unit_scale"))
    _raises(CaptureError, lambda: pending(x), "GraphBreak.forward", "data-dependent expression")


def test_graph_break_message_names_where_the_break_is():
    _raises(CaptureError, lambda: fp8fx.explain(GraphBreak(), FP8Config(), example_inputs=torch.randn(2, 4)),
            "tiny_models.py")


def test_forward_that_fails_on_the_example_inputs():
    bad = torch.randn(2, 5)  # TwoLinear wants 32 features
    for fn in (lambda: fp8fx.explain(TwoLinear(), FP8Config(), example_inputs=bad),
               lambda: fp8fx.convert(TwoLinear(), FP8Config(mode="QUANTIZE", scale_method="unit_scale"),
                                     example_inputs=bad)):
        _raises(CaptureError, fn, "TwoLinear.forward(Tensor(2, 5):float32)", "fails on these inputs",
                "shapes cannot be multiplied")  # the eager error, not the fake-tensor one


class _Validating(nn.Module):
    """Checks its input and raises, as model code often does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[-1] != 8:
            raise ValueError("_Validating needs 8 features")
        return self.fc(x)


def test_forward_that_raises_on_the_example_inputs_says_so():
    _raises(CaptureError, lambda: fp8fx.explain(_Validating(), FP8Config(), example_inputs=torch.randn(2, 4)),
            "_Validating.forward", "fails on these inputs", "ValueError", "_Validating needs 8 features")


# ---------------------------------------------------------------------------- Fp8Linear: wrong tensors
OUT, IN = 24, 272  # M * IN >= 2**14 at M = 64: the kernel's float activation rounding is exercised


def _fp8_parts(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(OUT, IN, generator=g) * 64).clamp(-448, 448).to(E4M3)
    ws = torch.rand(OUT, generator=g) * 0.02 + 0.001
    xs = torch.tensor(0.01)
    b = torch.randn(OUT, generator=g)
    return w, ws, xs, b


@pytest.mark.parametrize("change, needles", [
    (dict(weight=lambda w: w.float()), ["2-D float8", "torch.float32"]),
    (dict(weight=lambda w: w.to(torch.bfloat16)), ["2-D float8", "torch.bfloat16"]),
    (dict(weight=lambda w: w.reshape(2, OUT // 2, IN)), ["2-D float8", f"(2, {OUT // 2}, {IN})"]),
    (dict(weight=lambda w: w[0]), ["2-D float8", f"({IN},)"]),
    (dict(weight_scale=lambda s: torch.rand(OUT + 1)), ["weight_scale", f"({OUT + 1},)", f"[{OUT}]"]),
    (dict(weight_scale=lambda s: torch.rand(2, OUT)), ["weight_scale", f"(2, {OUT})"]),
    (dict(weight_scale=lambda s: torch.rand(1, OUT)), ["weight_scale", f"(1, {OUT})"]),
    (dict(weight_scale=lambda s: s.to(torch.int32)), ["weight_scale", "floating-point", "int32"]),
    (dict(weight_scale=lambda s: s.to(E4M3)), ["weight_scale", "not float8"]),
    (dict(input_scale=lambda s: torch.rand(2)), ["input_scale", "(2,)", "one value"]),
    (dict(input_scale=lambda s: 0.01), ["input_scale", "float"]),
    (dict(weight_scale=lambda s: torch.full_like(s, float("nan"))), ["finite and positive", "weight_scale min nan"]),
    (dict(weight_scale=lambda s: -s), ["finite and positive", "weight_scale min -"]),
    (dict(weight_scale=lambda s: torch.zeros_like(s)), ["finite and positive", "weight_scale min 0"]),
    (dict(weight_scale=lambda s: torch.full_like(s, float("inf"))), ["finite and positive", "weight_scale min inf"]),
    (dict(input_scale=lambda s: torch.tensor(float("nan"))), ["finite and positive", "input_scale nan"]),
    (dict(input_scale=lambda s: torch.tensor(-0.5)), ["finite and positive", "input_scale -0.5"]),
    (dict(bias=lambda b: torch.randn(OUT + 1)), ["bias", f"({OUT + 1},)", f"[{OUT}]"]),
    (dict(bias=lambda b: b.reshape(1, OUT)), ["bias", f"(1, {OUT})"]),
    (dict(fp8_max=lambda m: 0), ["fp8_max must be positive", "got 0"]),
    (dict(fp8_max=lambda m: -448.0), ["fp8_max must be positive"]),
    (dict(fp8_max=lambda m: float("nan")), ["fp8_max must be positive", "nan"]),
])
def test_fp8linear_refuses_wrong_tensors(change, needles):
    w, ws, xs, b = _fp8_parts()
    parts = {"weight": w, "weight_scale": ws, "input_scale": xs, "bias": b, "fp8_max": 448.0}
    for key, fn in change.items():
        parts[key] = fn(parts[key])
    _raises(QuantizationError, lambda: Fp8Linear(**parts), "Fp8Linear", *needles)


def _reference(x, w, ws, xs, bias):
    """float64 reference: q = clamp(x / s_x, ±448) cast to E4M3 (the division in float32, as the op
    defines it), both operands dequantized, the matmul and the bias in float64."""
    s_x = xs.reshape(()).float()
    q = torch.clamp(x.float() / s_x, -448, 448).to(E4M3)
    xd = q.double() * s_x.double()
    wd = w.double() * ws.double().reshape(-1, 1)  # () / [1] broadcast, [out] / [out, 1] per row
    return xd @ wd.t() + bias.double(), xd.abs() @ wd.abs().t() + bias.double().abs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("layouts", [("[out]", "[out, 1]"), ("()", "[1]")])
def test_fp8linear_accepts_checkpoint_scale_layouts(m, dtype, layouts):
    w, ws, xs, b = _fp8_parts(seed=m)
    if layouts[0] == "()":
        ws = ws[:1].reshape(())
    ws_ckpt = ws.reshape(OUT, 1) if layouts[1] == "[out, 1]" else ws.reshape(1)
    b = b.to(dtype)
    native = Fp8Linear(w, ws.clone(), xs.clone(), b.clone(), 448.0)
    ckpt = Fp8Linear(w, ws_ckpt.clone(), xs.reshape(1).clone(), b.clone(), 448.0)
    assert ckpt.weight_scale.shape == native.weight_scale.shape == ws.shape and ckpt.input_scale.dim() == 0
    x = (torch.randn(m, IN, generator=torch.Generator().manual_seed(100 + m)) * 2).to(dtype)
    x[0, :4] = torch.tensor([1e3, -1e3, 0.0, 1e-6])  # saturates at ±448 · s_x, rounds to 0
    with torch.no_grad():
        y, y_ckpt = native(x), ckpt(x)
    assert y.dtype == dtype and y.shape == (m, OUT)
    assert torch.equal(y, y_ckpt)  # same scales after the reshape, same kernel: bit-identical
    ref, bound = _reference(x, w, ws_ckpt, xs, b)
    # Tolerance. float32 x: the kernel runs a float32 GEMM on exact FP8-valued operands (products
    # exact), so only float32 summation and the epilogue round: K = 272 terms, |error| <=
    # ~K * 2**-24 * sum|terms| ~ 1.6e-5 * bound in the worst case; 3e-5 * bound leaves margin.
    # bfloat16 x: the output is rounded to bfloat16 (half an ulp, 2**-9 of |y|) and, for M > 4
    # on a CPU with AVX512-BF16/AMX (kernels/linear.py: _EXACT_MAX_M = 4), the GEMM result is
    # rounded to bfloat16 before the float32 epilogue (another 2**-9 of |q_x @ q_wᵀ * s|); both
    # are at most 2**-9 * bound, where bound = |x_deq| @ |w_deq|ᵀ + |bias| >= |y| and >= the
    # GEMM term, so 2**-8 * bound (plus the float32 margin) covers both roundings.
    rel = 3e-5 if dtype == torch.float32 else 2.0 ** -8 + 3e-5
    err = (y.double() - ref).abs()
    assert bool((err <= rel * bound + 1e-12).all()), f"max err/bound {float((err / bound).max()):.3g}"


# --------------------------------------------------------------------------- Fp8Linear.load_state_dict
def _named_fp8(seed=0, weight_scale_shape=None):
    w, ws, xs, b = _fp8_parts(seed)
    return nn.ModuleDict({"proj": Fp8Linear(w, ws if weight_scale_shape is None else ws.reshape(weight_scale_shape),
                                            xs, b, 448.0)})


def test_load_state_dict_of_a_float32_weight_names_the_key():
    model = _named_fp8()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    before = model.proj.weight.clone()
    sd["proj.weight"] = sd["proj.weight"].float()
    _raises(QuantizationError, lambda: model.load_state_dict(sd), "proj.weight", "torch.float32",
            "float8_e4m3fn")
    assert torch.equal(model.proj.weight.view(torch.uint8), before.view(torch.uint8))  # not cast in


def test_load_state_dict_of_wrong_scale_shapes_names_the_key():
    model = _named_fp8()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    _raises(QuantizationError, lambda: model.load_state_dict({**sd, "proj.weight_scale": torch.rand(OUT + 1)}),
            "proj.weight_scale", f"({OUT + 1},)")
    _raises(QuantizationError, lambda: model.load_state_dict({**sd, "proj.input_scale": torch.rand(2)}),
            "proj.input_scale", "(2,)")


def test_load_state_dict_of_an_fp8_checkpoint_with_out_1_weight_scale():
    source = _named_fp8(seed=1)
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    sd["proj.weight_scale"] = sd["proj.weight_scale"].reshape(OUT, 1)  # vLLM / compressed-tensors
    sd["proj.input_scale"] = sd["proj.input_scale"].reshape(1)
    target = _named_fp8(seed=2)
    target.load_state_dict(sd)
    assert target.proj.weight_scale.shape == (OUT,) and target.proj.input_scale.shape == ()
    assert torch.equal(target.proj.weight_scale, source.proj.weight_scale)
    x = torch.randn(5, IN)
    assert torch.equal(target.proj(x), source.proj(x))


@pytest.mark.parametrize("key, value", [("weight_scale", -torch.ones(OUT)), ("input_scale", torch.tensor(float("nan"))),
                                        ("input_scale", torch.tensor(0.0))])
def test_load_state_dict_of_a_bad_scale_value_names_the_key(key, value):
    model = _named_fp8()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    _raises(QuantizationError, lambda: model.load_state_dict({**sd, f"proj.{key}": value}), f"proj.{key}")


# ------------------------------------------------------------------------------ torch.compile options
class _Compiled(nn.Module):
    """A class of its own, so that no other test's dynamo cache entries are involved."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(x)


def _backend_direct(options):
    from fp8fx.backends.dynamo import fp8fx_backend

    gm = torch.fx.symbolic_trace(_Compiled())
    return fp8fx_backend(gm, [X], options=options)


@pytest.mark.parametrize("options, needles", [
    ({"config": {"mode": "MEASURE"}, "inductr": True}, ["'inductr'", "unknown torch.compile option"]),
    ({"confg": {"mode": "MEASURE"}}, ["'confg'", "'config'"]),
    ({"config": {"mode": "MEASURE"}, "model": 3}, ["option 'model'", "nn.Module", "int"]),
    ({"config": {"mode": "MEASUR"}}, ["'mode'", "'MEASURE'"]),
])
def test_backend_options_are_checked(tmp_path, options, needles):
    cfg = options.get("config")
    if isinstance(cfg, dict):
        options = {**options, "config": {**cfg, "dump_stats_path": str(tmp_path / "m")}}
    _raises(ConfigError, lambda: _backend_direct(options), *needles)
    # Through torch.compile, dynamo wraps any backend exception in BackendCompilerFailed (torch's
    # OutputGraph._call_user_compiler, not fp8fx's doing): the ConfigError is its inner exception.
    cm = torch.compile(_Compiled(), backend="fp8fx", options=options)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as ei:
        cm(X)
    inner = ei.value.inner_exception
    assert isinstance(inner, ConfigError) and all(n in str(inner) for n in needles)
    assert "ConfigError" in str(ei.value) and needles[0] in str(ei.value)
