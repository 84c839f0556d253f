"""Interoperability with Intel Neural Compressor (INC) FP8 files, using INC itself.

INC (neural-compressor-pt) runs its FP8 MEASURE and QUANTIZE modes on CPU when ``use_qdq=True``
(without it INC raises "For FP8 quantization, only QDQ mode is supported on CPU device").
These tests check, against INC's own writer and loader:
  a) files INC writes are read by fp8fx with INC's in-memory values and the true max-abs;
  b) files fp8fx writes are loaded by INC's loader (``_core.common.load_file``, which INC's
     QUANTIZE mode calls on the ``.npz``) and drive INC's scale computation;
  c) fp8fx converts a model from INC-written measurements.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

inc_quant = pytest.importorskip("neural_compressor.torch.quantization",
                                reason="neural-compressor-pt (INC) is not installed")
inc_common = pytest.importorskip("neural_compressor.torch.algorithms.fp8_quant._core.common")
inc_rank = pytest.importorskip("neural_compressor.torch.algorithms.fp8_quant.prepare_quant.prepare_model")

import fp8fx  # noqa: E402
from fp8fx.formats import inc  # noqa: E402
from fp8fx.numerics import sqnr_db  # noqa: E402

E4M3_MAX = 448.0
ACT_BACKOFF = 0.25


class TwoLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _model() -> TwoLinear:
    torch.manual_seed(0)
    return TwoLinear().to(torch.bfloat16).eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 16, generator=g) * (i + 1)).to(torch.bfloat16) for i in range(3)]


def _true_input_maxabs(model: torch.nn.Module, batches) -> dict[str, float]:
    seen: dict[str, float] = {}
    hooks = []
    for name in ("fc1", "fc2"):
        def hook(mod, args, name=name):
            seen[name] = max(seen.get(name, 0.0), float(args[0].detach().abs().max()))
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return seen


def _inc_measure(prefix, rank=None, world_size=None):
    """Run INC's MEASURE mode; returns INC's in-memory view {node: {key: np.ndarray}}."""
    with pytest.MonkeyPatch.context() as mp:   # INC caches LOCAL_RANK/WORLD_SIZE in globals
        if rank is not None:
            mp.setattr(inc_rank, "_local_rank", rank)
            mp.setattr(inc_rank, "_local_rank_initialized", True)
            mp.setattr(inc_rank, "_world_size", world_size)
            mp.setattr(inc_rank, "_world_size_initialized", True)
        cfg = inc_quant.FP8Config(mode="MEASURE", dump_stats_path=str(prefix), use_qdq=True)
        model = inc_quant.prepare(_model(), cfg)
        with torch.no_grad():
            for x in _batches():
                model(x)
        inc_quant.finalize_calibration(model)
    view = {}
    for name, mod in model.named_modules():
        extra = getattr(mod, "_mod_extra_config", None)
        if extra:
            view[name] = {"inputs": [o.state.float().numpy() for o in extra.inputs],
                          "weight": extra.params["weight"].state.float().numpy()}
    return view


@pytest.fixture(scope="module")
def inc_files(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("inc") / "measure"
    return prefix, _inc_measure(prefix)


# -------------------------------------------------------------------------- a) INC -> fp8fx
def test_inc_written_measurements_read_by_fp8fx(inc_files):
    prefix, view = inc_files
    json_path, npz_path = inc.measurement_file_paths(prefix)
    assert json_path.is_file() and npz_path.is_file() and inc.mod_list_path(prefix).is_file()
    true = _true_input_maxabs(_model(), _batches())
    weights = {n: float(p.detach().abs().max()) for n, p in
               ((n, _model().get_submodule(n).weight) for n in ("fc1", "fc2"))}
    for source in (prefix, json_path, npz_path):
        m = inc.read_measurements(source)
        assert set(m.nodes) == set(view) == {"fc1", "fc2"}
        for name, node in m.nodes.items():
            assert node.inputs[0].shape == (1, 1) and node.outputs is None   # INC per-tensor layout
            np.testing.assert_array_equal(node.inputs[0], view[name]["inputs"][0])
            np.testing.assert_array_equal(node.params["weight"], view[name]["weight"])
            assert node.input_maxabs() == true[name]
            assert node.weight_maxabs().tolist() == [weights[name]]


def test_inc_worker_suffix_read_by_fp8fx(tmp_path):
    view = _inc_measure(tmp_path / "measure", rank=1, world_size=2)
    json_path, npz_path = inc.measurement_file_paths(tmp_path / "measure", rank=1, world_size=2)
    assert json_path.name == "measure_hooks_maxabs_1_2.json" and npz_path.is_file()
    assert json.loads(json_path.read_text())["LocalRank"] == 1
    m = inc.read_measurements(tmp_path / "measure", rank=1, world_size=2)
    assert m.local_rank == 1
    assert m.nodes["fc2"].input_maxabs() == float(view["fc2"]["inputs"][0].max())
    with pytest.raises(fp8fx.errors.MeasurementError, match="measure_hooks_maxabs_1_2.npz"):
        inc.read_measurements(tmp_path / "measure")


# -------------------------------------------------------------------------- b) fp8fx -> INC
def _fp8fx_measurements() -> inc.Measurements:
    return inc.Measurements(nodes={
        "fc1": inc.NodeMeasurement(inputs=[[[10.0]]], params={"weight": [[0.5]]}),
        "fc2": inc.NodeMeasurement(inputs=[[[4.0]]], params={"weight": [[0.25]]}),
        "mm": inc.NodeMeasurement(inputs=[[[3.0]], [[2.0]]], outputs=[[[6.0]]]),
        "pc": inc.NodeMeasurement(inputs=[[[1.0], [2.0]]],
                                  params={"weight": [[0.5], [0.25], [0.125]]}),
    })


def test_fp8fx_written_measurements_load_in_inc(tmp_path):
    m = _fp8fx_measurements()
    json_path, npz_path, _ = inc.write_measurements(m, tmp_path / "measure", rank=0, world_size=2)
    for path in (npz_path, json_path):
        loaded = inc_common.load_file(str(path), np.ndarray, True)
        assert set(loaded) == set(m.nodes)
        for name, node in m.nodes.items():
            cfg = loaded[name]
            assert len(cfg.inputs) == len(node.inputs)
            for a, b in zip(cfg.inputs, node.inputs):
                np.testing.assert_array_equal(np.asarray(a, np.float32), b)
            for k, v in node.params.items():
                np.testing.assert_array_equal(np.asarray(cfg.params[k], np.float32), v)
            if node.outputs is not None:
                np.testing.assert_array_equal(np.asarray(cfg.outputs[0], np.float32),
                                              node.outputs[0])


def test_inc_quantize_uses_fp8fx_files(tmp_path):
    """INC's QUANTIZE mode derives its activation scales from fp8fx-written measurements, caches
    them (read back by fp8fx), and uses fp8fx-written cached scales as they are."""
    prefix = tmp_path / "measure"
    m = _fp8fx_measurements()
    del m.nodes["mm"], m.nodes["pc"]
    inc.write_measurements(m, prefix)
    cfg = dict(mode="QUANTIZE", dump_stats_path=str(prefix), use_qdq=True,
               scale_method="maxabs_arbitrary")
    q = inc_quant.convert(_model(), inc_quant.FP8Config(**cfg))
    cached = inc.read_scales(inc.measurement_file_paths(prefix, scale_method="maxabs_arbitrary")[1])
    for name, maxabs in (("fc1", 10.0), ("fc2", 4.0)):
        expected = maxabs / (E4M3_MAX * ACT_BACKOFF)
        got = float(q.get_submodule(name)._mod_extra_config.scale.inputs[0])
        assert math.isclose(got, expected, rel_tol=2 ** -7)          # INC keeps scales in bf16
        assert float(cached[name]["inputs"][0]) == got
    # fp8fx-written scale cache: INC loads it instead of computing
    ours = {"fc1": {"inputs": [0.5], "outputs": [0.25], "params": {"weight": 0.5}},
            "fc2": {"inputs": [0.125], "outputs": [0.25], "params": {"weight": 0.5}}}
    inc.write_scales(ours, prefix, scale_method="maxabs_arbitrary")
    q = inc_quant.convert(_model(), inc_quant.FP8Config(**cfg))
    for name in ours:
        s = q.get_submodule(name)._mod_extra_config.scale
        assert float(s.inputs[0]) == ours[name]["inputs"][0]
        assert float(s.params["weight"]) == 0.5


# -------------------------------------------------------------------------- c) INC -> fp8fx.convert
def test_fp8fx_converts_from_inc_measurements(inc_files):
    prefix, view = inc_files
    ref_model = _model()
    cfg = fp8fx.FP8Config(mode="QUANTIZE", dump_stats_path=str(prefix),
                          scale_method="maxabs_arbitrary", input_backoff=ACT_BACKOFF)
    converted = fp8fx.convert(copy.deepcopy(ref_model), cfg)
    x = _batches()[1]
    with torch.no_grad():
        ref, out = ref_model(x), converted(x)
    assert sqnr_db(ref, out) > 20.0
    state = converted.state_dict()
    for name in ("fc1", "fc2"):
        expected = float(view[name]["inputs"][0].max()) / (E4M3_MAX * ACT_BACKOFF)
        got = float(state[f"{name}.input_scale"])
        assert math.isclose(got, expected, rel_tol=1e-6), (name, got, expected)
