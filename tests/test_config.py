"""Tests for fp8fx.config: coercion, validation, INC key compatibility, round trips."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from fp8fx.config import (
    DEFAULT_BACKOFFS, DEFAULT_SCALE_METHOD, FP8Config, Fp8Format, HpDtype, MeasureExclude, Mode, ObserverKind,
    OpFilter, ScaleFormat, ScaleMethod, ScaleMethodOverrides, ScaleRule, Target,
)
from fp8fx.errors import ConfigError

# --------------------------------------------------------------------------- defaults, coercion


def test_defaults_match_inc():
    cfg = FP8Config()
    assert cfg.mode is Mode.AUTO and cfg.fp8_config is Fp8Format.E4M3 and cfg.hp_dtype is None  # follows the model
    assert cfg.observer is ObserverKind.MAXABS and cfg.measure_exclude is MeasureExclude.OUTPUT
    assert cfg.dump_stats_path == "./hqt_output/measure"
    assert cfg.scale_format is ScaleFormat.SCALAR and cfg.scale_format == "scalar"
    assert (cfg.input_backoff, cfg.weight_backoff) == (None, None)  # target default
    assert cfg.backoffs == DEFAULT_BACKOFFS[Target.CPU] == (0.25, 0.5)  # INC's, picked on validation text
    assert FP8Config(target="gaudi2").backoffs == (0.25, 0.5)  # INC's on Gaudi
    assert FP8Config(target="gaudi3", input_backoff=0.125).backoffs == (0.125, 0.5)
    assert cfg.allowlist.is_empty() and cfg.blocklist.is_empty()
    assert cfg.scale_method is None and cfg.resolved_scale_method is DEFAULT_SCALE_METHOD[Target.CPU] is ScaleMethod.MAXABS_HW
    assert FP8Config(hp_dtype="bf16").hp_dtype is HpDtype.BF16
    assert (cfg.measure_inputs, cfg.measure_outputs, cfg.measure_params) == (True, False, True)


def test_plain_values_are_coerced():
    cfg = FP8Config(mode="measure", fp8_config="e5m2", hp_dtype=torch.float16, observer="MAXABS",
                    blocklist={"names": ["lm_head"]}, allowlist={"types": ["Linear"]},
                    scale_method="MAXABS_POW2", measure_exclude="none", scale_format="CONST",
                    use_qdq="True", fake_quant="false", target="GAUDI3", dump_stats_path=Path("x/m"))
    assert cfg.mode is Mode.MEASURE and cfg.fp8_config is Fp8Format.E5M2 and cfg.hp_dtype is HpDtype.FP16
    assert cfg.observer is ObserverKind.MAXABS and cfg.scale_method is ScaleMethod.MAXABS_POW2
    assert cfg.blocklist == OpFilter(("lm_head",)) and cfg.allowlist == OpFilter(types=("Linear",))
    assert cfg.measure_exclude is MeasureExclude.NONE and cfg.scale_format is ScaleFormat.CONST
    assert cfg.use_qdq is True and cfg.fake_quant is False and cfg.target is Target.GAUDI3
    assert cfg.dump_stats_path == os.path.join("x", "m")
    assert FP8Config(hp_dtype="bfloat16").hp_dtype is HpDtype.BF16
    assert FP8Config(fp8_config=torch.float8_e5m2).fp8_config is Fp8Format.E5M2


@pytest.mark.parametrize("key,value", [
    ("mode", "MEASUR"), ("mode", 1), ("fp8_config", "E4M4"), ("fp8_config", torch.int8),
    ("hp_dtype", "bf61"), ("observer", "maxab"), ("measure_exclude", "INPUT|OUTPUT"),
    ("scale_format", "scalars"), ("target", "hpu"), ("scale_method", "maxabs_hww"),
])
def test_bad_enum_value_names_key_value_and_choices(key, value):
    with pytest.raises(ConfigError) as e:
        FP8Config(**{key: value})
    msg = str(e.value)
    assert repr(key) in msg and repr(value) in msg and "valid choices" in msg


def test_error_suggests_closest_choice():
    with pytest.raises(ConfigError, match=r"Did you mean 'MEASURE'\?"):
        FP8Config(mode="MEASUR")
    with pytest.raises(ConfigError, match=r"Did you mean 'maxabs_hw'\?"):
        FP8Config(scale_method="maxabs_hww")


@pytest.mark.parametrize("key,value", [
    ("use_qdq", 1), ("fake_quant", "yes"), ("dynamic_quantization", None),
    ("input_backoff", 0), ("input_backoff", 1.5), ("weight_backoff", -0.5), ("weight_backoff", True),
    ("weight_backoff", float("nan")), ("input_backoff", "0.25"),
    ("calibration_sample_interval", -1), ("calibration_sample_interval", 1.5),
    ("world_size", 0), ("local_rank", -1), ("dump_stats_path", ""), ("dump_stats_path", 3),
    ("allowlist", ["Linear"]), ("blocklist", {"names": "lm_head"}), ("blocklist", {"name": ["x"]}),
    ("blocklist", {"names": [1]}), ("scale_method", 3), ("scale_method", {"nodes": {}}),
])
def test_invalid_values_raise_naming_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        FP8Config(**{key: value})
    msg = str(e.value)
    assert repr(key) in msg or msg.startswith(f"{key}: "), msg
    assert "invalid" in msg or "needs" in msg


@pytest.mark.parametrize("key,value", [
    ("input_backoff", 1), ("weight_backoff", 1e-3), ("calibration_sample_interval", "4"),
    ("world_size", 8), ("local_rank", 0), ("fake_quant", True), ("recalc_scales", "TRUE"),
    ("ignore_modules_wo_measures", True), ("seperate_measure_files", False),
    ("scale_method", "hw_aligned_single_scale"), ("fp8_config", "E5M2"),
])
def test_valid_values_accepted(key, value):
    cfg = FP8Config(**{key: value})
    assert FP8Config.from_dict(cfg.to_dict()) == cfg


def test_rank_must_be_below_world_size():
    with pytest.raises(ConfigError, match="local_rank 4 must be below world_size 4"):
        FP8Config(world_size=4, local_rank=4)


def test_hw_methods_and_e5m2_allowed_anywhere():
    for target in Target:
        for method in ("maxabs_hw", "hw_aligned_single_scale", "maxabs_hw_opt_weight"):
            assert FP8Config(target=target, scale_method=method).resolved_scale_method.value == method
    assert FP8Config(fp8_config="E5M2", target="gaudi2").fp8_max == 57344.0


def test_frozen_and_hashable():
    cfg = FP8Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mode = Mode.MEASURE  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.blocklist.names = ("x",)  # type: ignore[misc]
    assert hash(cfg) == hash(FP8Config(mode="auto")) and cfg == FP8Config(mode="auto")


def test_replace_revalidates():
    cfg = FP8Config().replace(mode="QUANTIZE", blocklist={"names": ["lm_head"]})
    assert cfg.mode is Mode.QUANTIZE and cfg.blocklist.names == ("lm_head",)
    with pytest.raises(ConfigError, match="'input_backoff'"):
        cfg.replace(input_backoff=2.0)
    with pytest.raises(ConfigError, match="Did you mean 'blocklist'"):
        cfg.replace(blocklst={})


# ----------------------------------------------------------------------------- derived values


@pytest.mark.parametrize("fmt,target,expected", [
    ("E4M3", "cpu", 448.0), ("E4M3", "cuda", 448.0), ("E4M3", "gaudi3", 448.0),
    ("E4M3", "gaudi2", 240.0), ("E5M2", "cpu", 57344.0), ("E5M2", "gaudi2", 57344.0),
])
def test_fp8_max_per_target_and_format(fmt, target, expected):
    cfg = FP8Config(fp8_config=fmt, target=target)
    assert cfg.fp8_max == expected
    assert cfg.fp8_dtype == (torch.float8_e4m3fn if fmt == "E4M3" else torch.float8_e5m2)
    assert torch.finfo(cfg.fp8_dtype).max >= cfg.fp8_max


def test_hp_torch_dtype():
    assert [FP8Config(hp_dtype=h).hp_torch_dtype for h in ("bf16", "fp16", "fp32")] == \
        [torch.bfloat16, torch.float16, torch.float32]


def test_target_default_scale_methods():
    assert FP8Config(target="gaudi2").resolved_scale_method is ScaleMethod.MAXABS_HW
    assert FP8Config(target="gaudi3").resolved_scale_method is ScaleMethod.MAXABS_HW
    assert FP8Config(target="cuda").scale_method_for("x", "Linear") is DEFAULT_SCALE_METHOD[Target.CUDA]
    assert FP8Config(target="cpu", scale_method="unit_scale").resolved_scale_method is ScaleMethod.UNIT_SCALE


@pytest.mark.parametrize("exclude,inputs,outputs,params", [
    ("NONE", True, True, True), ("OUTPUT", True, False, True), ("INPUT", False, True, True),
    ("PARAMS", True, True, False), ("ALL", False, False, False),
])
def test_measure_exclude(exclude, inputs, outputs, params):
    cfg = FP8Config(measure_exclude=exclude)
    assert (cfg.measure_inputs, cfg.measure_outputs, cfg.measure_params) == (inputs, outputs, params)


def test_dynamic_quantization_rules():
    cfg = FP8Config(dynamic_quantization=True, mode="QUANTIZE", scale_method="maxabs_pcs_pow2")
    assert cfg.scale_method_for("a", "Linear") is ScaleMethod.MAXABS_PCS_POW2
    with pytest.raises(ConfigError, match="dynamic_quantization"):
        FP8Config(scale_method="maxabs_pcs_pow2")
    with pytest.raises(ConfigError, match="'MEASURE'"):
        FP8Config(dynamic_quantization=True, mode="MEASURE")
    with pytest.raises(ConfigError, match="'unit_scale'"):
        FP8Config(dynamic_quantization=True, scale_method={"default": "maxabs_hw", "nodes": {"a": "unit_scale"}})


# ---------------------------------------------------------------------------------- OpFilter


def test_op_filter_matching():
    f = OpFilter(names=(r"lm_head", r"layers\.1\."), types=("Softmax", "torch.nn.Linear"))
    assert f.matches_name("model.lm_head") and f.matches_name("model.layers.1.mlp")
    assert not f.matches_name("model.layers.11.mlp")
    assert f.matches_type(["Softmax"]) and f.matches_type("torch.nn.modules.linear.Linear")
    assert f.matches_type(["Foo", "Linear"]) and not f.matches_type(["Matmul"])
    assert not f.is_empty() and OpFilter().is_empty()
    assert OpFilter(names=["a"]) == OpFilter(names=("a",))


def test_op_filter_invalid_regex_is_named():
    with pytest.raises(ConfigError, match=r"blocklist: invalid regex '\(lm_head'"):
        FP8Config(blocklist={"names": ["(lm_head"]})


def test_selects_follows_inc_allow_block_rules():
    cfg = FP8Config(allowlist={"types": ["Linear"], "names": ["attn"]}, blocklist={"names": ["lm_head"]})
    assert cfg.selects("model.layers.0.mlp.up_proj", ["Linear"])
    assert cfg.selects("model.layers.0.self_attn.matmul", ["Matmul"])  # allowed by name
    assert not cfg.selects("lm_head", ["Linear"])
    assert not cfg.selects("model.layers.0.softmax", "Softmax")
    assert FP8Config().selects("anything", ["Whatever"])


# ------------------------------------------------------------------------ from_dict / to_dict


def test_from_dict_unknown_key_names_key_source_and_suggestion():
    with pytest.raises(ConfigError) as e:
        FP8Config.from_dict({"scale_methd": "maxabs_hw"}, source="quant.json")
    msg = str(e.value)
    assert msg.startswith("quant.json:") and "'scale_methd'" in msg and "Did you mean 'scale_method'" in msg
    assert "dump_stats_path" in msg  # lists the valid keys


def test_from_dict_rejects_non_mapping_and_misplaced_backoff():
    with pytest.raises(ConfigError, match="JSON object"):
        FP8Config.from_dict(["mode"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="belongs under 'scale_params'"):
        FP8Config.from_dict({"input_backoff": 0.5})
    with pytest.raises(ConfigError, match="'scale_params'.*Did you mean 'input_backoff'"):
        FP8Config.from_dict({"scale_params": {"input_backof": 0.5}})


def test_scale_params_and_device_for_scales():
    cfg = FP8Config.from_dict({"scale_params": {"input_backoff": 0.5, "weight_backoff": 1.0},
                               "device_for_scales": "GAUDI2"})
    assert (cfg.input_backoff, cfg.weight_backoff, cfg.target) == (0.5, 1.0, Target.GAUDI2)
    assert cfg.to_dict()["device_for_scales"] == "GAUDI2" and "target" not in cfg.to_dict()
    assert FP8Config.from_dict({"device_for_scales": "gaudi3", "target": "gaudi3"}).target is Target.GAUDI3
    with pytest.raises(ConfigError, match="contradicts"):
        FP8Config.from_dict({"device_for_scales": "GAUDI3", "target": "cuda"})
    with pytest.raises(ConfigError, match="'device_for_scales'.*GAUDI2, GAUDI3"):
        FP8Config.from_dict({"device_for_scales": "CPU"})
    assert FP8Config.from_dict({"target": "cuda"}).to_dict()["target"] == "cuda"


def test_legacy_keys_warn_and_are_ignored():
    with pytest.warns(FutureWarning, match="'method'"):
        cfg = FP8Config.from_dict({"method": "HOOKS", "mode": "MEASURE"})
    assert cfg == FP8Config(mode="MEASURE")
    with pytest.warns(FutureWarning, match="'quantize_weight'"):
        FP8Config.from_dict({"quantize_weight": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = FP8Config.from_dict({"whitelist": {"types": ["Linear"]}, "blacklist": {"names": ["lm_head"]},
                                   "blocklist": {"types": ["Softmax"]}})
    assert sorted(str(w.message).split()[2] for w in caught) == ["'blacklist'", "'whitelist'"]
    assert all(w.category is FutureWarning for w in caught)
    assert cfg.allowlist.types == ("Linear",) and cfg.blocklist == OpFilter(("lm_head",), ("Softmax",))
    with pytest.warns(UserWarning, match="measure_on_hpu"):
        FP8Config.from_dict({"measure_on_hpu": False})


def test_to_dict_is_inc_shaped_json():
    cfg = FP8Config(mode="QUANTIZE", scale_method="maxabs_hw", blocklist={"names": ["lm_head"]})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["mode"] == "QUANTIZE" and d["scale_method"] == "maxabs_hw" and d["fp8_config"] == "E4M3"
    assert d["blocklist"] == {"names": ["lm_head"], "types": []} and "hp_dtype" not in d  # unset: the model's
    assert FP8Config(hp_dtype="bf16").to_dict()["hp_dtype"] == "bf16"
    assert "scale_params" not in d  # unset: the target's default
    assert cfg.replace(input_backoff=0.25).to_dict()["scale_params"] == {"input_backoff": 0.25}
    assert "scale_method" not in FP8Config().to_dict()  # None: the target's default


# hypothesis round trip --------------------------------------------------------------------
_names = st.text(alphabet="abcxyz._0123456789", min_size=1, max_size=12)
_types = st.sampled_from(["Linear", "Matmul", "Softmax", "KVCache", "ModuleFusedSDPA", "torch.nn.Linear"])
_backoffs = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False, allow_infinity=False)
_methods = st.sampled_from(list(ScaleMethod))
_rules = st.builds(ScaleRule, _methods, st.none() | _backoffs, st.none() | _backoffs)
_overrides = st.builds(ScaleMethodOverrides, _rules, st.dictionaries(_names, _rules, max_size=3),
                       st.dictionaries(st.integers(0, 99), _rules, max_size=3),
                       st.dictionaries(_types, _rules, max_size=2))


@st.composite
def configs(draw):
    world = draw(st.none() | st.integers(1, 16))
    kwargs = dict(
        mode=draw(st.sampled_from(Mode)), fp8_config=draw(st.sampled_from(Fp8Format)),
        hp_dtype=draw(st.sampled_from(HpDtype)), observer=draw(st.sampled_from(ObserverKind)),
        allowlist=OpFilter(tuple(draw(st.lists(_names, max_size=3))), tuple(draw(st.lists(_types, max_size=3)))),
        blocklist=OpFilter(tuple(draw(st.lists(_names, max_size=3))), tuple(draw(st.lists(_types, max_size=3)))),
        dump_stats_path=draw(st.text(min_size=1, max_size=20).filter(str.strip)),
        scale_method=draw(st.none() | _methods | _overrides),
        measure_exclude=draw(st.sampled_from(MeasureExclude)), scale_format=draw(st.sampled_from(ScaleFormat)),
        use_qdq=draw(st.booleans()), fake_quant=draw(st.booleans()), target=draw(st.sampled_from(Target)),
        input_backoff=draw(_backoffs), weight_backoff=draw(_backoffs),
        dynamic_quantization=draw(st.sampled_from([False, False, True])),
        ignore_modules_wo_measures=draw(st.booleans()), recalc_scales=draw(st.booleans()),
        calibration_sample_interval=draw(st.integers(0, 1000)), world_size=world,
        local_rank=None if world is None else draw(st.none() | st.integers(0, world - 1)),
        seperate_measure_files=draw(st.booleans()),
    )
    try:
        return FP8Config(**kwargs)
    except ConfigError:  # dynamic_quantization with a static-only method or MEASURE mode
        reject()


@settings(max_examples=150, deadline=None)
@given(configs())
def test_round_trip_through_json(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # to_dict never writes legacy or ignored keys
        again = FP8Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.scale_method_for("model.layers.3.mlp", "Linear") is cfg.scale_method_for("model.layers.3.mlp", "Linear")


# -------------------------------------------------------------------------- files, environment


def test_json_file_round_trip_is_atomic(tmp_path):
    cfg = FP8Config(mode="QUANTIZE", blocklist={"names": ["lm_head"]}, target="gaudi2", world_size=2, local_rank=1)
    path = tmp_path / "sub" / "quant.json"
    cfg.to_json_file(path)
    assert FP8Config.from_json_file(path) == cfg
    assert os.listdir(path.parent) == ["quant.json"]  # no temporary file left behind
    FP8Config().to_json_file(path)  # overwrite in place
    assert FP8Config.from_json_file(str(path)) == FP8Config()


def test_json_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="nope.json.*does not exist"):
        FP8Config.from_json_file(missing)
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "mode": "MEASURE",\n  "observer": maxabs\n}')
    with pytest.raises(ConfigError, match=r"bad.json.*not valid JSON.*line 3, column 15"):
        FP8Config.from_json_file(bad)
    arr = tmp_path / "arr.json"
    arr.write_text('["mode"]')
    with pytest.raises(ConfigError, match="arr.json.*JSON object.*list"):
        FP8Config.from_json_file(arr)
    typo = tmp_path / "typo.json"
    typo.write_text('{"mode": "MESURE"}')
    with pytest.raises(ConfigError, match=r"typo.json.*'mode'.*Did you mean 'MEASURE'"):
        FP8Config.from_json_file(typo)


def test_from_env(tmp_path, monkeypatch):
    monkeypatch.delenv("QUANT_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="QUANT_CONFIG is not set"):
        FP8Config.from_env()
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"mode": "QUANTIZE", "scale_method": "maxabs_pow2"}))
    monkeypatch.setenv("QUANT_CONFIG", str(path))
    cfg = FP8Config.from_env()
    assert cfg.mode is Mode.QUANTIZE and cfg.scale_method is ScaleMethod.MAXABS_POW2
    monkeypatch.setenv("MY_CFG", str(tmp_path / "gone.json"))
    with pytest.raises(ConfigError, match="MY_CFG: .*gone.json.*does not exist"):
        FP8Config.from_env("MY_CFG")


def _inc_custom_configs() -> list[Path]:
    spec = importlib.util.find_spec("neural_compressor")  # locate only; never import INC here
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    return sorted((root / "torch/algorithms/fp8_quant/custom_config").glob("*.json"))


@pytest.mark.parametrize("path", _inc_custom_configs(), ids=lambda p: p.name)
def test_inc_shipped_configs_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # some still carry "quantize_weight"
        cfg = FP8Config.from_json_file(path)
    assert cfg.mode in (Mode.MEASURE, Mode.QUANTIZE)
    assert FP8Config.from_dict(cfg.to_dict()) == cfg
