"""Tests for fp8fx.scale_methods: the method table, INC's dict form, and its use by FP8Config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import fp8fx.config
import fp8fx.scale_methods
from fp8fx.config import FP8Config
from fp8fx.errors import ConfigError
from fp8fx.scale_methods import (
    ScaleMethod, ScaleMethodOverrides, ScaleRule, ScaleSpec, coerce_scale_method,
)

# ------------------------------------------------------------------------------ module layout


def test_config_re_exports_the_same_objects():
    for name in ("ScaleSpec", "ScaleMethod", "ScaleRule", "ScaleMethodOverrides"):
        assert getattr(fp8fx.config, name) is getattr(fp8fx.scale_methods, name)
        assert name in fp8fx.config.__all__


def test_scale_methods_imports_neither_config_nor_torch():
    code = ("import sys, fp8fx.scale_methods; "
            "print(sorted(m for m in ('fp8fx.config', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------- method table


def test_scale_method_properties():
    no_measure = {m for m in ScaleMethod if not m.needs_measurement}
    assert no_measure == {ScaleMethod.UNIT_SCALE, ScaleMethod.HW_ALIGNED_SINGLE_SCALE,
                          ScaleMethod.MAXABS_PCS_POW2, ScaleMethod.ACT_MAXABS_PCS_POW2_WEIGHT_MAXABS_PTS_POW2_HW}
    pcs = {m for m in ScaleMethod if m.weight_per_channel}
    assert pcs == {m for m in ScaleMethod if "_weights_pcs_" in m.value} | {ScaleMethod.MAXABS_PCS_POW2}
    assert {m for m in ScaleMethod if m.dynamic_only} == {
        ScaleMethod.MAXABS_PCS_POW2, ScaleMethod.ACT_MAXABS_PCS_POW2_WEIGHT_MAXABS_PTS_POW2_HW}
    assert ScaleMethod.MAXABS_HW.uses_hw_scales and not ScaleMethod.MAXABS_POW2.uses_hw_scales
    assert ScaleMethod.coerce("ACT_MAXABS_HW_WEIGHTS_PCS_OPT_POW2", "k").value == "act_maxabs_hw_weights_pcs_opt_pow2"

def test_every_rule_round_trips_through_inc_form():
    for method in ScaleMethod:
        for ib, wb in ((None, None), (0.125, None), (None, 1.0), (0.5, 0.25)):
            rule = ScaleRule(method, ib, wb)
            assert ScaleRule.parse(json.loads(json.dumps(rule.to_inc())), "k") == rule
        spec = rule.to_inc()["weight"]
        assert ScaleSpec(spec["granularity"], spec["scale_value_type"], spec["rounding_method"]) == method.weight_spec


def test_coerce_scale_method():
    assert coerce_scale_method(None) is None
    assert coerce_scale_method("MAXABS_HW") is ScaleMethod.MAXABS_HW
    assert coerce_scale_method(ScaleRule("unit_scale")) is ScaleMethod.UNIT_SCALE  # no backoffs: a method
    with_backoff = coerce_scale_method(ScaleRule("unit_scale", input_backoff=0.5))
    assert with_backoff == ScaleMethodOverrides(ScaleRule(ScaleMethod.UNIT_SCALE, 0.5))
    assert coerce_scale_method(with_backoff) is with_backoff
    assert coerce_scale_method({"default": "maxabs_pow2"}).default.method is ScaleMethod.MAXABS_POW2
    with pytest.raises(ConfigError, match="'scale_method'.*valid choices"):
        coerce_scale_method(3.0)


def test_overrides_are_sorted_and_hashable():
    a = ScaleMethodOverrides("maxabs_hw", nodes={"b": "unit_scale", "a": "maxabs_pow2"},
                             layers={"10": "maxabs_pow2", 2: "unit_scale"})
    assert [k for k, _ in a.nodes] == ["a", "b"] and [k for k, _ in a.layers] == [2, 10]
    b = ScaleMethodOverrides(ScaleRule(ScaleMethod.MAXABS_HW), nodes=(("a", "maxabs_pow2"), ("b", "unit_scale")),
                             layers=[(10, "maxabs_pow2"), ("2", "unit_scale")])
    assert a == b and hash(a) == hash(b) and len(a.rules()) == 5
    assert a.method_for("m.layers.10.mlp", "Linear") is ScaleMethod.MAXABS_POW2
    with pytest.raises(ConfigError, match="'scale_method.nodes' must map names"):
        ScaleMethodOverrides("maxabs_hw", nodes=[("a",)])
    with pytest.raises(ConfigError, match="invalid key 1 in 'scale_method.layer_types'"):
        ScaleMethodOverrides("maxabs_hw", layer_types={1: "unit_scale"})


# --------------------------------------------------------------------- scale_method dict form


def _inc_entry(w: str, a: str, wb: float | None = None) -> dict:
    g, v, r = w.split()
    ag, av, ar = a.split()
    weight = {"granularity": g, "scale_value_type": v, "rounding_method": r}
    if wb is not None:
        weight["backoff"] = wb
    return {"weight": weight, "activation": {"granularity": ag, "scale_value_type": av, "rounding_method": ar}}


def test_scale_method_dict_precedence():
    cfg = FP8Config.from_dict({"scale_method": {
        "default": "maxabs_hw",
        "nodes": {"model.layers.1.mlp.down_proj": "unit_scale"},
        "layers": {"1": "maxabs_pow2", "2": "maxabs_arbitrary"},
        "layer_types": {"Matmul": "maxabs_hw_opt_weight", "torch.nn.Softmax": "hw_aligned_single_scale"},
    }})
    f = cfg.scale_method_for
    assert f("model.layers.1.mlp.down_proj", "Linear") is ScaleMethod.UNIT_SCALE      # node beats layer
    assert f("model.layers.1.mlp.up_proj", "Linear") is ScaleMethod.MAXABS_POW2       # layer index
    assert f("model.layers.1.self_attn.matmul_qk", "Matmul") is ScaleMethod.MAXABS_POW2  # layer beats type
    assert f("model/layers/2/mlp", "Linear") is ScaleMethod.MAXABS_ARBITRARY          # slash pattern
    assert f("model.layers.12.mlp", "Linear") is ScaleMethod.MAXABS_HW                # 12 is not 1 or 2
    assert f("model.layers.7.self_attn.matmul_qk", "Matmul") is ScaleMethod.MAXABS_HW_OPT_WEIGHT
    assert f("model.layers.7.softmax", "torch.nn.modules.activation.Softmax") is ScaleMethod.HW_ALIGNED_SINGLE_SCALE
    assert f("lm_head", "Linear") is ScaleMethod.MAXABS_HW and cfg.resolved_scale_method is ScaleMethod.MAXABS_HW


def test_scale_method_inc_dict_entries_and_inheritance():
    sm = {"default": _inc_entry("PCS MAXABS POW2", "PTS MAXABS HW_ALIGNED", wb=0.4),
          "nodes": {"a": {"activation": {"rounding_method": "POW2", "backoff": 0.1}}},
          "layer_types": {"Matmul": {"weight": {"granularity": "PTS", "rounding_method": "IDENTITY"},
                                     "activation": {"rounding_method": "IDENTITY"}}}}
    cfg = FP8Config.from_dict({"scale_method": sm, "scale_params": {"input_backoff": 0.2}})
    assert cfg.resolved_scale_method is ScaleMethod.ACT_MAXABS_HW_WEIGHTS_PCS_MAXABS_POW2
    assert cfg.scale_method_for("a", "Linear") is ScaleMethod.ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2
    assert cfg.backoffs_for("a", "Linear") == (0.1, 0.4)        # weight backoff inherited from default
    assert cfg.scale_method_for("b", "Matmul") is ScaleMethod.MAXABS_ARBITRARY
    assert cfg.backoffs_for("b", "Matmul") == (0.2, 0.4)        # no entry backoff: scale_params
    assert FP8Config(scale_method="maxabs_pow2", target="gaudi3").backoffs_for("b", "Linear") == (0.25, 0.5)
    assert FP8Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_scale_method_dict_errors():
    with pytest.raises(ConfigError, match="needs a 'default' entry"):
        FP8Config(scale_method={"nodes": {"a": "maxabs_hw"}})
    with pytest.raises(ConfigError, match="Did you mean 'nodes'"):
        FP8Config(scale_method={"default": "maxabs_hw", "node": {}})
    with pytest.raises(ConfigError, match="no known scale method.*maxabs_hw: weight PTS MAXABS HW_ALIGNED"):
        FP8Config(scale_method={"default": {"weight": {"rounding_method": "POW2"}}})
    with pytest.raises(ConfigError, match=r"'scale_method.default.weight.granularity'.*PTS, PCS"):
        FP8Config(scale_method={"default": {"weight": {"granularity": "PER_TENSOR"}}})
    with pytest.raises(ConfigError, match="layer index"):
        FP8Config(scale_method={"default": "maxabs_hw", "layers": {"first": "unit_scale"}})
    with pytest.raises(ConfigError, match=r"scale_method\.nodes\.a"):
        FP8Config(scale_method={"default": "maxabs_hw", "nodes": {"a": "maxabs_hww"}})
    with pytest.warns(UserWarning, match="params is ignored"):
        FP8Config(scale_method={"default": {"weight": {"params": {"weight_scales": [1.0]}}}})


def test_scale_methods_match_inc_table():
    mod = pytest.importorskip(
        "neural_compressor.torch.algorithms.fp8_quant._core.scale_methods.scale_method_config")
    ours = {m.name: m for m in ScaleMethod}
    assert set(ours) == {m.name for m in mod.ScaleMethodString}
    for inc_method, cfgs in mod.scale_method_config_mapping.items():
        for spec, key in ((ours[inc_method.name].weight_spec, mod.CfgStr.WEIGHT),
                          (ours[inc_method.name].activation_spec, mod.CfgStr.ACTIVATION)):
            c = cfgs[key]
            assert spec == (c.granularity.name, c.scale_value_type.name, c.rounding_method.name), inc_method
