"""Tests for fp8fx.formats.inc (INC measurement / scale files) and fp8fx.fileio."""

from __future__ import annotations

import json
import os
import stat
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8fx import fileio
from fp8fx.errors import ConfigError, MeasurementError
from fp8fx.formats import inc
from fp8fx.formats.inc import Measurements, NodeMeasurement


def _sample() -> Measurements:
    return Measurements(nodes={
        "model.layers.0.self_attn.q_proj": NodeMeasurement(
            inputs=[[[4.71875]]], params={"weight": [[0.091796875]]}),
        "model.layers.0.self_attn.matmul_qk": NodeMeasurement(
            inputs=[np.array([[3.5]]), np.array([[2.25]])], outputs=[np.array([[11.0]])]),
        "model.layers.0.mlp.down_proj": NodeMeasurement(   # per channel
            inputs=[np.array([[1.0], [2.0], [0.5]])],
            params={"weight": np.array([[0.25], [0.125], [0.5], [1.0]])}),
    })


def _assert_same(a: Measurements, b: Measurements) -> None:
    assert list(a.nodes) == list(b.nodes)
    for name in a.nodes:
        x, y = a.nodes[name], b.nodes[name]
        assert len(x.inputs) == len(y.inputs)
        for p, q in zip(x.inputs, y.inputs):
            assert p.dtype == np.float32 and p.shape == q.shape
            np.testing.assert_array_equal(p, q)
        assert (x.outputs is None) == (y.outputs is None)
        for p, q in zip(x.outputs or [], y.outputs or []):
            np.testing.assert_array_equal(p, q)
        assert x.params.keys() == y.params.keys()
        for k in x.params:
            np.testing.assert_array_equal(x.params[k], y.params[k])


# -------------------------------------------------------------------------- round trips
def test_round_trip_prefix_json_and_npz(tmp_path):
    m = _sample()
    prefix = tmp_path / "hqt" / "measure"                     # parent dir created on write
    paths = inc.write_measurements(m, prefix)
    assert [p.name for p in paths] == ["measure_hooks_maxabs.json", "measure_hooks_maxabs.npz",
                                       "measure_hooks_maxabs_mod_list.json"]
    by_prefix = inc.read_measurements(prefix)
    assert by_prefix.source.endswith(".npz")                  # INC's QUANTIZE mode reads the npz
    _assert_same(m, by_prefix)
    for p in paths[:2]:
        r = inc.read_measurements(p)
        assert r.source == str(p) and r.observer == "maxabs"
        _assert_same(m, r)
    assert json.loads(paths[2].read_text()) == list(m.nodes)


def test_json_and_npz_layout_is_inc_layout(tmp_path):
    paths = inc.write_measurements(_sample(), tmp_path / "measure")
    doc = json.loads(paths[0].read_text())
    assert list(doc) == ["GlobalRank", "LocalRank", "Mode", "WriteId", "Nodes"]
    assert doc["Mode"] == "DynamicRange" and doc["GlobalRank"] is None and doc["LocalRank"] is None
    uid, digest = doc["WriteId"].split("-")                   # one write id, stamped in both files
    assert len(uid) == 32 and len(digest) == 16
    assert doc["Nodes"]["model.layers.0.self_attn.q_proj"] == {
        "inputs": [[[4.71875]]], "params": {"weight": [[0.091796875]]}}
    assert doc["Nodes"]["model.layers.0.self_attn.matmul_qk"] == {
        "inputs": [[[3.5]], [[2.25]]], "outputs": [[[11.0]]]}
    assert doc["Nodes"]["model.layers.0.mlp.down_proj"]["params"]["weight"] == [
        [0.25], [0.125], [0.5], [1.0]]
    # the npz is the same dict pickled as a 0-d object array 'arr_0' (how INC loads it)
    d = np.load(paths[1], allow_pickle=True)["arr_0"].item()
    assert d["Mode"] == "DynamicRange" and set(d["Nodes"]) == set(doc["Nodes"])
    assert d["WriteId"] == doc["WriteId"]
    assert inc.write_measurements(_sample(), tmp_path / "again")[0].read_text().count(
        doc["WriteId"].split("-")[1]) == 1                    # same content: same digest, new uuid
    assert json.loads((tmp_path / "again_hooks_maxabs.json").read_text())["WriteId"] != doc["WriteId"]
    w = d["Nodes"]["model.layers.0.mlp.down_proj"]["params"]["weight"]
    assert isinstance(w, np.ndarray) and w.dtype == np.float32 and w.shape == (4, 1)


def test_json_fallback_when_npz_missing(tmp_path):
    json_path, npz_path, _ = inc.write_measurements(_sample(), tmp_path / "measure")
    npz_path.unlink()
    r = inc.read_measurements(tmp_path / "measure")
    assert r.source == str(json_path)
    _assert_same(_sample(), r)


def test_per_channel_accessors():
    node = _sample().nodes["model.layers.0.mlp.down_proj"]
    np.testing.assert_array_equal(node.weight_maxabs(), [0.25, 0.125, 0.5, 1.0])
    assert node.weight_maxabs().ndim == 1
    assert node.input_maxabs() == 2.0
    per_tensor = _sample().nodes["model.layers.0.self_attn.q_proj"]
    assert per_tensor.weight_maxabs().shape == (1,)
    assert per_tensor.input_maxabs(0) == 4.71875
    mm = _sample().nodes["model.layers.0.self_attn.matmul_qk"]
    assert (mm.input_maxabs(1), mm.output_maxabs()) == (2.25, 11.0)
    with pytest.raises(MeasurementError, match="input 2 was not measured"):
        mm.input_maxabs(2)
    with pytest.raises(MeasurementError, match="measure_exclude"):
        per_tensor.output_maxabs()
    with pytest.raises(MeasurementError, match="no 'weight'"):
        mm.weight_maxabs()


def test_num_samples_and_ranks_round_trip(tmp_path):
    m = _sample()
    m.num_samples, m.global_rank = 64, 3
    json_path, _, _ = inc.write_measurements(m, tmp_path / "measure", rank=1, world_size=4)
    doc = json.loads(json_path.read_text())
    assert list(doc)[0] == "NumSamples" and doc["LocalRank"] == 1 and doc["GlobalRank"] == 3
    r = inc.read_measurements(tmp_path / "measure", rank=1, world_size=4)
    assert (r.num_samples, r.local_rank, r.global_rank) == (64, 1, 3)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(0, 2.0 ** 100, width=32), min_size=1, max_size=8),
       st.floats(0, 1e4, width=32))
def test_round_trip_property(tmp_path_factory, channels, act):
    d = tmp_path_factory.mktemp("prop")
    m = Measurements(nodes={"l": NodeMeasurement(inputs=[[[act]]],
                                                  params={"weight": [[c] for c in channels]})})
    json_path, npz_path, _ = inc.write_measurements(m, d / "p")
    for p in (json_path, npz_path):
        r = inc.read_measurements(p).nodes["l"]
        assert r.input_maxabs() == np.float32(act)
        np.testing.assert_array_equal(r.weight_maxabs(), np.asarray(channels, np.float32))


# -------------------------------------------------------------------------- names
@pytest.mark.parametrize("kw, expected", [
    ({}, "measure_hooks_maxabs"),
    ({"rank": 0, "world_size": 8}, "measure_hooks_maxabs_0_8"),
    ({"observer": "maxabs_per_channel", "rank": 3, "world_size": 4},
     "measure_hooks_maxabs_per_channel_3_4"),
    ({"scale_method": "maxabs_hw", "rank": 0, "world_size": 8},
     "measure_hooks_maxabs_MAXABS_HW_0_8"),
    ({"scale_method": "MAXABS_POW2"}, "measure_hooks_maxabs_MAXABS_POW2"),
])
def test_file_names(kw, expected):
    j, n = inc.measurement_file_paths("out/measure", **kw)
    assert (j, n) == (Path(f"out/{expected}.json"), Path(f"out/{expected}.npz"))


def test_mod_list_name_and_bad_worker_args():
    assert inc.mod_list_path("o/m", rank=0, world_size=2) == Path("o/m_hooks_maxabs_0_2_mod_list.json")
    with pytest.raises(ConfigError, match="pass both or neither"):
        inc.measurement_file_paths("m", rank=0)
    with pytest.raises(ConfigError, match="0 <= rank < world_size"):
        inc.measurement_file_paths("m", rank=2, world_size=2)


def test_worker_files_written_and_read(tmp_path):
    m = _sample()
    for r in range(2):
        names = [p.name for p in inc.write_measurements(m, tmp_path / "measure", rank=r, world_size=2)]
        assert names[0] == f"measure_hooks_maxabs_{r}_2.json"
    _assert_same(m, inc.read_measurements(tmp_path / "measure", rank=1, world_size=2))


# -------------------------------------------------------------------------- atomicity
def test_interrupted_write_keeps_previous_files(tmp_path, monkeypatch):
    prefix = tmp_path / "measure"
    paths = inc.write_measurements(_sample(), prefix)
    before = {p: p.read_bytes() for p in paths}
    changed = _sample()
    changed.nodes["model.layers.0.self_attn.q_proj"].inputs[0][...] = 99.0

    def failing_savez(f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")                       # half a zip, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(MeasurementError, match="could not write .*No space left") as ei:
        inc.write_measurements(changed, prefix)
    assert isinstance(ei.value.__cause__, OSError)
    assert {p: p.read_bytes() for p in paths} == before      # json, npz, mod_list all intact
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)   # no temp files left
    _assert_same(_sample(), inc.read_measurements(prefix))


def test_atomic_path_helpers(tmp_path):
    target = tmp_path / "a" / "b" / "x.json"
    fileio.atomic_write_json(target, {"k": [1, 2]})
    assert json.loads(target.read_text()) == {"k": [1, 2]}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.suffix == ".json"
            tmp.write_text("garbage")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"k": [1, 2]}
    assert os.listdir(target.parent) == ["x.json"]
    with pytest.raises(ValueError):
        fileio.atomic_write_json(target, {"k": float("nan")})
    assert fileio.atomic_write_text(target, "hi") == target and target.read_text() == "hi"
    fileio.atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_write_refuses_bad_values_before_touching_disk(tmp_path):
    m = _sample()
    m.nodes["model.layers.0.self_attn.q_proj"].params["weight"][0, 0] = np.inf
    with pytest.raises(MeasurementError, match=r"q_proj' key 'params.weight'.*non-finite"):
        inc.write_measurements(m, tmp_path / "measure")
    assert os.listdir(tmp_path) == []
    with pytest.raises(MeasurementError, match="non-finite"):
        NodeMeasurement(inputs=[[[float("nan")]]])


# -------------------------------------------------------------------------- read errors
def test_missing_file_lists_what_exists(tmp_path):
    inc.write_measurements(_sample(), tmp_path / "measure", rank=0, world_size=2)
    other = Measurements(nodes=_sample().nodes, observer="maxabs_per_channel")
    inc.write_measurements(other, tmp_path / "measure")
    with pytest.raises(MeasurementError) as ei:
        inc.read_measurements(tmp_path / "measure")
    msg = str(ei.value)
    assert "measure_hooks_maxabs.npz" in msg and str(tmp_path) in msg
    assert "measure_hooks_maxabs_0_2.npz" in msg and "measure_hooks_maxabs_per_channel.npz" in msg
    assert "rank=" in msg and "merge_measurements" in msg and "MEASURE" in msg
    with pytest.raises(MeasurementError, match="no file in .* starts with 'nothing'"):
        inc.read_measurements(tmp_path / "nothing")
    with pytest.raises(MeasurementError, match=r"is a directory.*measure_hooks_maxabs_0_2.json"):
        inc.read_measurements(tmp_path)
    with pytest.raises(MeasurementError, match=r"measure_hooks_maxabs_1_2.json: file not found"):
        inc.read_measurements(tmp_path / "measure_hooks_maxabs_1_2.json")


def _write_json(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))                           # json.dumps writes NaN as NaN
    return path


def _doc(nodes, mode="DynamicRange"):
    return {"GlobalRank": None, "LocalRank": None, "Mode": mode, "Nodes": nodes}


def test_truncated_json_and_npz(tmp_path):
    json_path, npz_path, _ = inc.write_measurements(_sample(), tmp_path / "measure")
    json_path.write_bytes(json_path.read_bytes()[:40])
    with pytest.raises(MeasurementError, match=r"measure_hooks_maxabs.json: not valid JSON"):
        inc.read_measurements(json_path)
    npz_path.write_bytes(npz_path.read_bytes()[:100])
    with pytest.raises(MeasurementError, match=r"measure_hooks_maxabs.npz: not a readable INC .npz"):
        inc.read_measurements(tmp_path / "measure")
    npz_path.write_bytes(b"not a zip at all")
    with pytest.raises(MeasurementError, match="truncated or corrupt"):
        inc.read_measurements(npz_path)


def test_npz_with_foreign_pickle_is_refused(tmp_path):
    arr = np.empty((), dtype=object)
    arr[()] = OrderedDict(Mode="DynamicRange", Nodes={})
    path = tmp_path / "measure_hooks_maxabs.npz"
    with open(path, "wb") as f:
        np.savez(f, arr)
    with pytest.raises(MeasurementError, match=r"refusing to unpickle 'collections.OrderedDict'"):
        inc.read_measurements(path)
    with open(path, "wb") as f:
        np.savez(f, np.zeros(3))
    with pytest.raises(MeasurementError, match="plain float64 array"):
        inc.read_measurements(path)


@pytest.mark.parametrize("doc, match", [
    (_doc({}, mode="Scale"), r"'Mode' is 'Scale' \(scales.*read_scales"),
    (_doc({}, mode="Shape"), r"'Mode' is 'Shape' \(tensor shapes"),
    ({"Nodes": {}}, r"'Mode' is None"),
    ([1, 2], "expected an object with 'Mode' and 'Nodes'"),
    (_doc([]), "'Nodes' must map module names"),
    (_doc({"fc1": [[1.0]]}), "node 'fc1' must be an object"),
    (_doc({"fc1": {"params": {}}}), "node 'fc1' has no 'inputs' key"),
    (_doc({"fc1": {"inputs": 3.0}}), "node 'fc1' key 'inputs' must be a list"),
    (_doc({"fc1": {"inputs": [], "scale": 1}}), "node 'fc1' has unknown key 'scale'"),
    (_doc({"fc1": {"inputs": [], "params": [1]}}), "node 'fc1' key 'params' must map"),
    (_doc({"fc1": {"inputs": [[[1.0], [2.0, 3.0]]]}}), r"node 'fc1' key 'inputs\[0\]': expected"),
    (_doc({"fc1": {"inputs": ["big"]}}), r"node 'fc1' key 'inputs\[0\]': expected a number"),
    (_doc({"fc1": {"inputs": [[]]}}), r"node 'fc1' key 'inputs\[0\]': the value is empty"),
    (_doc({"fc1": {"inputs": [[[float("nan")]]]}}), r"node 'fc1' key 'inputs\[0\]': non-finite"),
    (_doc({"fc1": {"inputs": [[[1.0]]], "params": {"weight": [[float("inf")]]}}}),
     r"node 'fc1' key 'params.weight': non-finite"),
    (_doc({"fc1": {"inputs": [[[1.0]]], "outputs": [[[1e39]]]}}),
     r"node 'fc1' key 'outputs\[0\]': non-finite"),
    (_doc({"fc1": {"inputs": [[[-1.0]]]}}), r"node 'fc1' key 'inputs\[0\]': negative"),
    (_doc({"fc1": {"inputs": [], "params": {"weight": None}}}), r"'params.weight': null"),
    ({**_doc({}), "LocalRank": "zero"}, "'LocalRank' must be an integer"),
])
def test_bad_contents(tmp_path, doc, match):
    path = _write_json(tmp_path / "measure_hooks_maxabs.json", doc)
    with pytest.raises(MeasurementError, match=match) as ei:
        inc.read_measurements(tmp_path / "measure")
    assert str(path) in str(ei.value)


def test_legacy_keys_and_mod_list_file(tmp_path):
    _write_json(tmp_path / "m_hooks_maxabs.json",
                _doc({"fc1": {"input": [[[2.0]]], "output": [[[3.0]]]}}))
    node = inc.read_measurements(tmp_path / "m").nodes["fc1"]
    assert (node.input_maxabs(), node.output_maxabs()) == (2.0, 3.0)
    mod_list = _write_json(tmp_path / "m_hooks_maxabs_mod_list.json", ["fc1"])
    with pytest.raises(MeasurementError, match="module list"):
        inc.read_measurements(mod_list)


# -------------------------------------------------------------------------- merge
def test_merge_is_elementwise_max(tmp_path):
    a, b = _sample(), _sample()
    b.nodes["model.layers.0.self_attn.q_proj"].inputs[0][...] = 9.0
    b.nodes["model.layers.0.mlp.down_proj"].params["weight"][:] = [[0.125], [0.875], [0.125], [0.125]]
    b.nodes["model.layers.0.self_attn.matmul_qk"].outputs[0][...] = 1.0
    for r, part in enumerate((a, b)):
        inc.write_measurements(part, tmp_path / "measure", rank=r, world_size=2)
    parts = [inc.read_measurements(tmp_path / "measure", rank=r, world_size=2) for r in range(2)]
    merged = inc.merge_measurements(parts)
    assert merged.nodes["model.layers.0.self_attn.q_proj"].input_maxabs() == 9.0
    np.testing.assert_array_equal(merged.nodes["model.layers.0.mlp.down_proj"].weight_maxabs(),
                                  [0.25, 0.875, 0.5, 1.0])
    assert merged.nodes["model.layers.0.self_attn.matmul_qk"].output_maxabs() == 11.0
    assert "measure_hooks_maxabs_1_2.npz" in merged.source and merged.local_rank is None
    _assert_same(merged, inc.read_measurements(inc.write_measurements(merged, tmp_path / "m")[1]))


def test_merge_errors():
    a = _sample()
    b = _sample()
    del b.nodes["model.layers.0.self_attn.q_proj"]
    b.source = "rank1.npz"
    with pytest.raises(MeasurementError, match=r"node sets differ.*rank1.npz.*q_proj"):
        inc.merge_measurements([a, b])
    c = _sample()
    c.nodes["model.layers.0.mlp.down_proj"].params["weight"] = np.ones((2, 1))
    with pytest.raises(MeasurementError, match=r"down_proj.*'params.weight'.*shapes differ"):
        inc.merge_measurements([a, c])
    d = _sample()
    d.nodes["model.layers.0.self_attn.matmul_qk"].outputs = None
    with pytest.raises(MeasurementError, match=r"matmul_qk.*'outputs'"):
        inc.merge_measurements([a, d])
    e = Measurements(nodes=_sample().nodes, observer="maxabs_per_channel")
    with pytest.raises(MeasurementError, match="observer"):
        inc.merge_measurements([a, e])
    with pytest.raises(MeasurementError, match="at least one"):
        inc.merge_measurements([])
    _assert_same(a, inc.merge_measurements([a]))


# -------------------------------------------------------------------------- scales
def test_scales_round_trip_and_layout(tmp_path):
    scales = {
        "model.layers.0.self_attn.q_proj": {"inputs": [0.0625], "outputs": [3.0517578125e-05],
                                            "params": {"weight": 0.00048828125}},
        "fc_pc": {"inputs": [np.float32(0.125)], "outputs": [np.full(3, 2.0 ** -12)],
                  "params": {"weight": {0: [0.5, 0.25, 0.125], 1: [1.0, 1.0]}}},
    }
    json_path, npz_path = inc.write_scales(scales, tmp_path / "measure", scale_method="maxabs_pow2",
                                           rank=0, world_size=2)
    assert json_path.name == "measure_hooks_maxabs_MAXABS_POW2_0_2.json"
    doc = json.loads(json_path.read_text())
    assert doc["Mode"] == "Scale" and doc["LocalRank"] == 0
    assert doc["Nodes"]["model.layers.0.self_attn.q_proj"] == {
        "inputs": [0.0625], "outputs": [3.0517578125e-05], "params": {"weight": 0.00048828125}}
    assert doc["Nodes"]["fc_pc"]["params"]["weight"] == {"0": [0.5, 0.25, 0.125], "1": [1.0, 1.0]}
    raw = np.load(npz_path, allow_pickle=True)["arr_0"].item()
    assert set(raw["Nodes"]["fc_pc"]["params"]["weight"]) == {0, 1}       # int keys, as INC
    for path in (json_path, npz_path):
        s = inc.read_scales(path)
        q = s["model.layers.0.self_attn.q_proj"]
        assert q["inputs"][0].shape == () and float(q["inputs"][0]) == 0.0625
        assert float(q["params"]["weight"]) == 0.00048828125
        w = s["fc_pc"]["params"]["weight"]
        assert set(w) == {0, 1}
        np.testing.assert_array_equal(w[0], [0.5, 0.25, 0.125])
    with pytest.raises(MeasurementError, match="'Mode' is 'Scale'"):
        inc.read_measurements(json_path)
    meas = inc.write_measurements(_sample(), tmp_path / "measure")[0]
    with pytest.raises(MeasurementError, match="'Mode' is 'DynamicRange'.*read_scales"):
        inc.read_scales(meas)
    with pytest.raises(MeasurementError, match="needs the .json or .npz"):
        inc.read_scales(tmp_path / "measure")


def test_scales_bad_values(tmp_path):
    with pytest.raises(MeasurementError, match=r"node 'x' key 'params.weight\[a\]'|axis numbers"):
        inc.write_scales({"x": {"inputs": [1.0], "params": {"weight": {"a": [1.0]}}}},
                         tmp_path / "m", scale_method="maxabs_pow2")
    with pytest.raises(MeasurementError, match=r"node 'x' key 'inputs\[0\]': non-finite"):
        inc.write_scales({"x": {"inputs": [float("nan")]}}, tmp_path / "m",
                         scale_method="maxabs_pow2")
    assert os.listdir(tmp_path) == []


def test_atomic_paths_rolls_back_an_interrupted_renaming(tmp_path, monkeypatch):
    a, b, c = tmp_path / "a.json", tmp_path / "b.npz", tmp_path / "c.json"
    a.write_text("old a")                                     # b and c do not exist yet
    real_replace = os.replace

    def third_fails(src, dst):
        if Path(dst) == c:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")          # a file system without hard links

    monkeypatch.setattr(os, "replace", third_fails)
    monkeypatch.setattr(os, "link", no_links)
    with pytest.raises(OSError, match="Input/output"):
        with fileio.atomic_paths(a, b, c) as tmps:
            for t in tmps:
                t.write_text("new")
    assert a.read_text() == "old a"                           # restored from its (copied) backup
    assert sorted(os.listdir(tmp_path)) == ["a.json"]         # b removed, no temp/backup left
    monkeypatch.undo()
    with fileio.atomic_paths(a, b) as (ta, tb):
        ta.write_text("A")
        tb.write_text("B")
    assert (a.read_text(), b.read_text()) == ("A", "B") and len(os.listdir(tmp_path)) == 2
