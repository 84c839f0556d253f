"""Bad INC measurement files: every problem is an fp8fx error naming the file, node and key.

Each case builds a broken file (or a broken set: json + npz + mod_list) on disk and checks the
error class and that the message names what is wrong and where. The mixed-writes cases
simulate a write interrupted between two renames, which a set of files cannot avoid by itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fp8fx.errors import Fp8fxError, MeasurementError
from fp8fx.formats import inc
from fp8fx.formats.inc import Measurements, NodeMeasurement

NODE = "model.layers.0.self_attn.q_proj"


def _meas(act: float = 4.5, extra: bool = False) -> Measurements:
    nodes = {NODE: NodeMeasurement(inputs=[[[act]]], params={"weight": [[0.25]]}),
             "model.layers.0.mlp.down_proj": NodeMeasurement(inputs=[[[1.0], [2.0]]])}
    if extra:
        nodes["lm_head"] = NodeMeasurement(inputs=[[[7.0]]], params={"weight": [[0.5]]})
    return Measurements(nodes=nodes)


def _raises(fn, *needles: str, cls: type[Exception] = MeasurementError) -> str:
    """Call ``fn``; it must raise ``cls``, and the message must contain every needle."""
    with pytest.raises(cls) as ei:
        fn()
    msg = str(ei.value)
    assert isinstance(ei.value, Fp8fxError)
    for needle in needles:
        assert str(needle) in msg, f"{needle!r} not in {msg!r}"
    return msg


def _inc_style(prefix: Path, value: float) -> tuple[Path, Path]:
    """A pair as INC writes it: no write id, np.savez of the dict, json of nested lists."""
    json_path, npz_path = inc.measurement_file_paths(prefix)
    head = {"GlobalRank": None, "LocalRank": None, "Mode": "DynamicRange"}
    arr = np.empty((), dtype=object)
    arr[()] = {**head, "Nodes": {NODE: {"inputs": [np.array([[value]], np.float32)]}}}
    np.savez(str(npz_path), arr)
    json_path.write_text(json.dumps({**head, "Nodes": {NODE: {"inputs": [[[value]]]}}}))
    return json_path, npz_path


def _json_only(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "measure_hooks_maxabs.json"
    path.write_text(text)
    return path


def _doc(nodes) -> str:
    return json.dumps({"GlobalRank": None, "LocalRank": None, "Mode": "DynamicRange",
                       "Nodes": nodes})


# -------------------------------------------------------------------------- broken single files
def test_truncated_json(tmp_path):
    json_path, npz_path, _ = inc.write_measurements(_meas(), tmp_path / "measure")
    npz_path.unlink()
    json_path.write_bytes(json_path.read_bytes()[:50])
    _raises(lambda: inc.read_measurements(tmp_path / "measure"), json_path, "not valid JSON",
            "Re-run calibration")


def test_truncated_npz(tmp_path):
    _, npz_path, _ = inc.write_measurements(_meas(), tmp_path / "measure")
    npz_path.write_bytes(npz_path.read_bytes()[:120])
    _raises(lambda: inc.read_measurements(tmp_path / "measure"), npz_path,
            "not a readable INC .npz", "truncated or corrupt")


def test_npz_that_is_not_a_zip(tmp_path):
    path = tmp_path / "measure_hooks_maxabs.npz"
    path.write_bytes(b"\x93NUMPY but not a zip archive")
    _raises(lambda: inc.read_measurements(path), path, "BadZipFile")


@pytest.mark.parametrize("text, needle", [
    ("[1, 2, 3]", "got list"),
    ('"DynamicRange"', "got str"),
    ('{"GlobalRank": null, "Mode": "DynamicRange"}', "no 'Nodes' key"),
], ids=["list", "string", "no-Nodes"])
def test_json_that_is_not_an_inc_object(tmp_path, text, needle):
    path = _json_only(tmp_path, text)
    _raises(lambda: inc.read_measurements(tmp_path / "measure"), path, needle, "'Nodes'")


def test_npz_holding_a_non_dict_pickle(tmp_path):
    path = tmp_path / "measure_hooks_maxabs.npz"
    arr = np.empty((), dtype=object)
    arr[()] = ["Nodes", NODE]
    np.savez(str(path), arr)
    _raises(lambda: inc.read_measurements(tmp_path / "measure"), path, "got list",
            "is this an INC file?")


class _Evil:
    def __init__(self, victim: str) -> None:
        self.victim = victim

    def __reduce__(self):
        return (os.remove, (self.victim,))


def test_npz_holding_a_forbidden_pickle_runs_nothing(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    path = tmp_path / "measure_hooks_maxabs.npz"
    arr = np.empty((), dtype=object)
    arr[()] = {"Mode": "DynamicRange", "Nodes": {NODE: _Evil(str(victim))}}
    np.savez(str(path), arr)
    _raises(lambda: inc.read_measurements(path), path, "refusing to unpickle", "remove")
    assert victim.read_text() == "still here"


@pytest.mark.parametrize("text, needle", [
    ('{"Mode": "DynamicRange", "Nodes": {"fc1": {"inputs": [[[1' + "0" * 400 + ']]]}}}',
     "'inputs[0]'"),                                          # int too large for a float
    ('{"Mode": "DynamicRange", "Nodes": {"fc1": {"inputs": [[[' + "7" * 5000 + ']]]}}}',
     "not valid JSON"),                                       # beyond Python's int-digit limit
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),        # nested too deep to parse
], ids=["int-overflow", "int-digit-limit", "deep-nesting"])
def test_json_values_python_cannot_convert(tmp_path, text, needle):
    path = _json_only(tmp_path, text)
    _raises(lambda: inc.read_measurements(tmp_path / "measure"), path, needle)


# -------------------------------------------------------------------------- broken values
@pytest.mark.parametrize("nodes, key", [
    ({"fc1": {"inputs": [[[float("nan")]]]}}, "'inputs[0]': non-finite"),
    ({"fc1": {"inputs": [[[1.0]]], "params": {"weight": [[float("-inf")]]}}},
     "'params.weight': non-finite"),
])
def test_node_with_non_finite_value(tmp_path, nodes, key):
    path = _json_only(tmp_path, _doc(nodes))
    _raises(lambda: inc.read_measurements(tmp_path / "measure"), path, "node 'fc1'", key,
            "measure again")


def test_non_finite_value_in_npz(tmp_path):
    path = tmp_path / "measure_hooks_maxabs.npz"
    arr = np.empty((), dtype=object)
    arr[()] = {"Mode": "DynamicRange", "Nodes": {NODE: {"inputs": [np.array([[np.inf]])]}}}
    np.savez(str(path), arr)
    _raises(lambda: inc.read_measurements(path), path, f"node '{NODE}'", "'inputs[0]'",
            "non-finite")


@pytest.mark.parametrize("inputs, shape", [
    ([4.5], "()"),                       # a scale file's bare number in a measurement file
    ([[4.5, 1.0]], "(2,)"),              # a flat list of channels
    ([[[4.5, 1.0]]], "(1, 2)"),          # one row of two, not a column
    ([[[[4.5]]]], "(1, 1, 1)"),          # one nesting level too many
    ([[[1.0, 2.0], [3.0, 4.0]]], "(2, 2)"),
])
def test_wrong_nesting_or_shape_of_inputs(tmp_path, inputs, shape):
    path = _json_only(tmp_path, _doc({"fc1": {"inputs": inputs}}))
    _raises(lambda: inc.read_measurements(tmp_path / "measure"), path, "node 'fc1'",
            "'inputs[0]'", f"shape {shape}", "one column")


def test_wrong_shape_is_refused_before_writing(tmp_path):
    m = Measurements(nodes={"fc1": NodeMeasurement(inputs=[[1.0, 2.0]])})
    _raises(lambda: inc.write_measurements(m, tmp_path / "measure"), "node 'fc1'",
            "'inputs[0]'", "shape (2,)")
    assert os.listdir(tmp_path) == []


def test_inputs_not_a_list_and_missing(tmp_path):
    path = _json_only(tmp_path, _doc({"fc1": {"inputs": {"0": [[1.0]]}}}))
    _raises(lambda: inc.read_measurements(tmp_path / "measure"), path, "node 'fc1'",
            "key 'inputs' must be a list")
    _json_only(tmp_path, _doc({"fc1": {"outputs": [[[1.0]]]}}))
    _raises(lambda: inc.read_measurements(tmp_path / "measure"), path, "node 'fc1'",
            "no 'inputs' key")


# -------------------------------------------------------------------------- sets that disagree
def test_json_and_npz_from_different_writes(tmp_path):
    """A crash between the renames of a rewrite: the old .npz beside the new .json."""
    prefix = tmp_path / "measure"
    json_path, npz_path, _ = inc.write_measurements(_meas(1.0), prefix)
    old_npz, old_id = npz_path.read_bytes(), json.loads(json_path.read_text())["WriteId"]
    inc.write_measurements(_meas(2.0), prefix)
    new_id = json.loads(json_path.read_text())["WriteId"]
    npz_path.write_bytes(old_npz)
    _raises(lambda: inc.read_measurements(prefix), json_path, npz_path, "different writes",
            new_id, old_id, "finalize_calibration")
    # each file alone is still readable by name, to recover by hand
    assert inc.read_measurements(npz_path).nodes[NODE].input_maxabs() == 1.0
    assert inc.read_measurements(json_path).nodes[NODE].input_maxabs() == 2.0


def test_json_older_than_npz(tmp_path):
    prefix = tmp_path / "measure"
    json_path, npz_path, _ = inc.write_measurements(_meas(1.0), prefix)
    old_json = json_path.read_bytes()
    inc.write_measurements(_meas(2.0), prefix)
    json_path.write_bytes(old_json)
    _raises(lambda: inc.read_measurements(prefix), json_path, npz_path, "different writes")


def test_hard_crash_between_renames(tmp_path):
    """A real process killed (os._exit) right after the first rename of a rewrite."""
    prefix = tmp_path / "measure"
    json_path, npz_path, _ = inc.write_measurements(_meas(1.0), prefix)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from fp8fx.formats import inc
        from fp8fx.formats.inc import Measurements, NodeMeasurement
        real_replace = os.replace
        def replace_then_die(src, dst):
            real_replace(src, dst)
            os._exit(3)
        os.replace = replace_then_die
        inc.write_measurements(Measurements(nodes={{{NODE!r}: NodeMeasurement(
            inputs=[[[9.0]]], params={{"weight": [[0.25]]}})}}), {str(prefix)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == 3, proc.stderr.decode()[-2000:]
    _raises(lambda: inc.read_measurements(prefix), json_path, npz_path, "different writes")


@pytest.mark.parametrize("stamped", ["json", "npz"])
def test_only_one_of_the_pair_has_a_write_id(tmp_path, stamped):
    """One file rewritten by INC (no write id) beside fp8fx's: different writes."""
    prefix = tmp_path / "measure"
    json_path, npz_path, _ = inc.write_measurements(_meas(1.0), prefix)
    keep = (json_path if stamped == "json" else npz_path).read_bytes()
    _inc_style(prefix, 2.0)
    (json_path if stamped == "json" else npz_path).write_bytes(keep)
    _raises(lambda: inc.read_measurements(prefix), json_path, npz_path, "different writes",
            "none (not written by this fp8fx")


def test_inc_written_pair_is_read_as_before(tmp_path):
    """No write id at all: the .npz is read and the .json is not compared (INC's behaviour)."""
    prefix = tmp_path / "measure"
    json_path, npz_path = _inc_style(prefix, 3.0)
    json_path.write_text(json_path.read_text().replace("3.0", "5.0"))    # a different value
    (tmp_path / "measure_hooks_maxabs_mod_list.json").write_text('["something.else"]')
    m = inc.read_measurements(prefix)
    assert m.source == str(npz_path) and m.nodes[NODE].input_maxabs() == 3.0
    json_path.write_text("{ truncated")                      # a broken .json is not consulted
    assert inc.read_measurements(prefix).nodes[NODE].input_maxabs() == 3.0


def test_json_edited_after_the_write(tmp_path):
    """Same write id, but the .json was edited: it would otherwise be ignored for the .npz."""
    prefix = tmp_path / "measure"
    json_path, npz_path, _ = inc.write_measurements(_meas(4.5), prefix)
    doc = json.loads(json_path.read_text())
    doc["Nodes"][NODE]["inputs"] = [[[6.0]]]
    json_path.write_text(json.dumps(doc))
    _raises(lambda: inc.read_measurements(prefix), json_path, "no longer matches its WriteId",
            npz_path.name, "write_measurements")
    assert inc.read_measurements(json_path).nodes[NODE].input_maxabs() == 6.0


def test_malformed_write_id(tmp_path):
    prefix = tmp_path / "measure"
    json_path, npz_path, _ = inc.write_measurements(_meas(), prefix)
    npz_path.unlink()
    doc = json.loads(json_path.read_text())
    doc["WriteId"] = 12
    json_path.write_text(json.dumps(doc))
    _raises(lambda: inc.read_measurements(prefix), json_path, "malformed 'WriteId'",
            "finalize_calibration")


def test_mod_list_that_disagrees(tmp_path):
    prefix = tmp_path / "measure"
    _, npz_path, list_path = inc.write_measurements(_meas(), prefix)
    list_path.write_text(json.dumps([NODE, "model.layers.9.mlp.up_proj"]))
    _raises(lambda: inc.read_measurements(prefix), list_path, npz_path,
            "model.layers.0.mlp.down_proj", "model.layers.9.mlp.up_proj", "different writes")


@pytest.mark.parametrize("text, needle", [("[\"a\", ", "unreadable module list"),
                                          ('{"names": []}', "must be a JSON list")])
def test_mod_list_that_is_broken(tmp_path, text, needle):
    prefix = tmp_path / "measure"
    _, _, list_path = inc.write_measurements(_meas(), prefix)
    list_path.write_text(text)
    _raises(lambda: inc.read_measurements(prefix), list_path, needle, "finalize_calibration")


def test_per_rank_set_with_one_rank_missing(tmp_path):
    prefix = tmp_path / "measure"
    for rank in (0, 2):                                      # rank 1 of 3 never wrote its files
        inc.write_measurements(_meas(), prefix, rank=rank, world_size=3)
    inc.read_measurements(prefix, rank=2, world_size=3)
    _raises(lambda: inc.read_measurements(prefix, rank=1, world_size=3),
            "measure_hooks_maxabs_1_3.npz", "measure_hooks_maxabs_1_3.json",
            "measure_hooks_maxabs_0_3.npz", "measure_hooks_maxabs_2_3.npz",
            "not this rank's", "every rank")


def test_per_rank_files_mixed_between_ranks(tmp_path):
    """Rank 0's .npz copied over rank 1's: the pair of rank 1 comes from two writes."""
    prefix = tmp_path / "measure"
    paths = [inc.write_measurements(_meas(r + 1.0), prefix, rank=r, world_size=2)
             for r in range(2)]
    paths[1][1].write_bytes(paths[0][1].read_bytes())
    _raises(lambda: inc.read_measurements(prefix, rank=1, world_size=2), paths[1][0],
            paths[1][1], "different writes")


# -------------------------------------------------------------------------- interrupted writes
@pytest.mark.parametrize("failure", [OSError(5, "Input/output error"), KeyboardInterrupt()])
def test_write_interrupted_between_renames_keeps_previous_set(tmp_path, monkeypatch, failure):
    prefix = tmp_path / "measure"
    paths = inc.write_measurements(_meas(1.0), prefix)
    before = {p: p.read_bytes() for p in paths}
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise failure
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    if isinstance(failure, OSError):
        _raises(lambda: inc.write_measurements(_meas(2.0, extra=True), prefix),
                paths[0], paths[1], "could not write", "Input/output error")
    else:
        with pytest.raises(KeyboardInterrupt):
            inc.write_measurements(_meas(2.0, extra=True), prefix)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in paths} == before       # all three files as before
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)   # nothing left over
    assert inc.read_measurements(prefix).nodes[NODE].input_maxabs() == 1.0
