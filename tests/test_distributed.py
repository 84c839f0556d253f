"""Multi-process calibration (fp8fx.distributed) and per-rank measurement files (fp8fx.formats.ranks,
``fp8fx measurements merge/regroup``).

The distributed tests start 2 CPU processes with torch.multiprocessing.spawn and the gloo backend,
as torchrun would (MASTER_ADDR/PORT, RANK, LOCAL_RANK, WORLD_SIZE), each with a process-group
timeout and a join deadline, so a hang fails the test instead of blocking the run.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fp8fx
from fp8fx.errors import ConfigError, MeasurementError
from fp8fx.formats import inc, ranks
from tiny_models import TwoLinear

WORLD = 2
BATCHES = [(4, 32)] * 4  # rank r calibrates batches r, r + WORLD, ... (one shape: one graph)
JOIN_TIMEOUT_S = 180
PG_TIMEOUT_S = 60


class Branchy(nn.Module):
    """fc1 -> (fc2 when ``use_fc2``): a Python flag changes the captured graph."""

    def __init__(self, use_fc2: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.use_fc2 = use_fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.fc1(x))
        return self.fc2(y) if self.use_fc2 else y


def _batches(indices) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    data = [torch.randn(*s, generator=g) * (1 + 3 * i) for i, s in enumerate(BATCHES)]
    return [data[i] for i in indices]


def _model(kind: str = "two", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TwoLinear() if kind == "two" else Branchy()


def _calibrate(model: nn.Module, cfg: dict, batches: list[torch.Tensor], compiled: bool = False) -> list[Path]:
    if compiled:
        runner = torch.compile(model, backend="fp8fx", options={"config": cfg})
    else:
        runner = fp8fx.prepare(model, fp8fx.FP8Config(**cfg))
    with torch.no_grad():
        for x in batches:
            runner(x)
    return fp8fx.finalize_calibration(runner)


# ------------------------------------------------------------------------------ process launch
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, scenario: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=PG_TIMEOUT_S))
    result: dict = {}
    try:
        SCENARIOS[scenario](rank, world, Path(out), result)
    except BaseException:
        result["error"] = traceback.format_exc()
        raise
    finally:
        (Path(out) / f"result_{rank}.json").write_text(json.dumps(result))
        torch.distributed.destroy_process_group()


def _spawn(scenario: str, out: Path) -> list[dict]:
    ctx = torch.multiprocessing.spawn(_worker, args=(WORLD, _free_port(), scenario, str(out)), nprocs=WORLD,
                                      join=False)
    import time

    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"scenario {scenario!r}: the {WORLD} processes did not finish within {JOIN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [json.loads((out / f"result_{r}.json").read_text()) for r in range(WORLD)]


DP_RUNS = (("eager", "maxabs"), ("eager", "percentile"), ("compiled", "maxabs"))


def _data_parallel(rank, world, out, result):
    for how, observer in DP_RUNS:
        cfg = {"mode": "MEASURE", "dump_stats_path": str(out / f"{how}-{observer}" / "measure"),
               **_observer_cfg(observer)}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # replicas: no warning
            files = _calibrate(_model(), cfg, _batches(range(rank, len(BATCHES), world)), how == "compiled")
        result[f"{how}-{observer}"] = {"files": [str(p) for p in files], "exist": all(Path(p).is_file() for p in files)}


def _mismatch(rank, world, out, result):
    batches = _batches(range(rank, len(BATCHES), world))
    for mode in ("data", "auto"):
        model = Branchy(use_fc2=rank == 0)
        torch.manual_seed(0)
        model.load_state_dict(_model("branchy").state_dict())
        cfg = {"mode": "MEASURE", "dump_stats_path": str(out / mode / "measure"), "calibration_parallel": mode}
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                result[mode] = [str(p) for p in _calibrate(model, cfg, batches)]
            except MeasurementError as e:
                result[mode] = "MeasurementError: " + str(e)
        result[mode + "_warnings"] = [str(w.message) for w in seen if issubclass(w.category, UserWarning)]


def _errors(rank, world, out, result):
    for name, scenario in (("mismatch", _mismatch), ("sharded", _sharded), ("nonfinite", _nonfinite)):
        result[name] = {}
        scenario(rank, world, out / name, result[name])


def _sharded(rank, world, out, result):
    batches = _batches(range(rank, len(BATCHES), world))
    for mode in ("data", "auto"):
        cfg = {"mode": "MEASURE", "dump_stats_path": str(out / mode / "measure"), "calibration_parallel": mode}
        try:  # a different seed per rank: different weights, as shards of one model would be
            result[mode] = [str(p) for p in _calibrate(_model(seed=rank), cfg, batches)]
        except MeasurementError as e:
            result[mode] = "MeasurementError: " + str(e)


def _nonfinite(rank, world, out, result):
    batches = _batches(range(rank, len(BATCHES), world))
    if rank == 1:
        batches[0] = batches[0].clone()
        batches[0][0, 0] = float("inf")
    cfg = {"mode": "MEASURE", "dump_stats_path": str(out / "nf" / "measure")}
    try:
        _calibrate(_model(), cfg, batches)
        result["raised"] = None
    except MeasurementError as e:
        result["raised"] = str(e)


SCENARIOS = {
    "dp": _data_parallel,
    "errors": _errors,
}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Each scenario runs once per test module, in its own pair of processes."""
    runs: dict[str, tuple[Path, list[dict]]] = {}

    def get(scenario: str) -> tuple[Path, list[dict]]:
        if scenario not in runs:
            out = tmp_path_factory.mktemp(scenario)
            runs[scenario] = (out, _spawn(scenario, out))
        return runs[scenario]

    return get


def _observer_cfg(observer: str) -> dict:
    params = {"observer_params": {"percentile": 99.0}} if observer == "percentile" else {}
    return {"observer": observer, "measure_exclude": "NONE", **params}


def _doc(path: Path) -> dict:
    doc = json.loads(path.read_text())
    doc.pop(inc.WRITE_ID_KEY)
    return doc


def _reference(tmp_path: Path, observer: str = "maxabs", compiled: bool = False) -> list[Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker processes
    try:
        cfg = {"mode": "MEASURE", "dump_stats_path": str(tmp_path / "ref" / "measure"), **_observer_cfg(observer)}
        return _calibrate(_model(), cfg, _batches(range(len(BATCHES))), compiled)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------- data-parallel tests
@pytest.mark.parametrize("how,observer", DP_RUNS)
def test_data_parallel_files_equal_one_process_on_all_data(spawned, tmp_path, how, observer):
    out, results = spawned("dp")
    ref = _reference(tmp_path, observer, compiled=how == "compiled")
    names = [Path(p).name for p in ref]
    assert names == [f"measure_hooks_{observer}.json", f"measure_hooks_{observer}.npz",
                     f"measure_hooks_{observer}_mod_list.json"]
    for r in results:  # every rank returns the paths of the one shared set, which exists on return
        run = r[f"{how}-{observer}"]
        assert "error" not in r and run["exist"] and [Path(p).name for p in run["files"]] == names
    dp_dir = out / f"{how}-{observer}"
    assert sorted(p.name for p in dp_dir.iterdir()) == sorted(names)  # rank 0 wrote it, nothing per rank
    assert _doc(dp_dir / names[0]) == _doc(ref[0])  # the .json, exactly (floats as written)
    a = inc.read_measurements(dp_dir / "measure", observer=observer)
    b = inc.read_measurements(tmp_path / "ref" / "measure", observer=observer)
    assert sorted(a.nodes) == sorted(b.nodes) == ["fc1", "fc2", "softmax_0"]
    for name in a.nodes:
        for x, y in zip([*a.nodes[name].inputs, *(a.nodes[name].outputs or [])],
                        [*b.nodes[name].inputs, *(b.nodes[name].outputs or [])]):
            assert np.array_equal(x, y)
    if observer == "percentile":  # the clipped value comes from the summed histograms
        assert a.maxabs is not None and a.observer_params == b.observer_params
        assert all(a.nodes[n].input_maxabs() < a.maxabs[n].input_maxabs() for n in ("fc1", "fc2"))


def test_per_rank_files_merged_differ_from_the_reduced_histograms(spawned, tmp_path):
    """What the reduction buys: a percentile of all the data is not the max of each rank's
    percentile (what merging per-rank files gives); it equals the one-process value above."""
    out, _ = spawned("dp")
    cfg = {"mode": "MEASURE", **_observer_cfg("percentile")}
    halves = []
    for r in range(WORLD):
        _calibrate(_model(), {**cfg, "dump_stats_path": str(tmp_path / f"h{r}" / "m")},
                   _batches(range(r, len(BATCHES), WORLD)))
        halves.append(inc.read_measurements(tmp_path / f"h{r}" / "m", observer="percentile"))
    merged = inc.merge_measurements(halves)
    reduced = inc.read_measurements(out / "eager-percentile" / "measure", observer="percentile")
    assert any(not np.array_equal(merged.nodes[n].inputs[0], reduced.nodes[n].inputs[0]) for n in reduced.nodes)
    for n in reduced.nodes:  # the maxabs itself is the same either way
        assert np.array_equal(merged.maxabs[n].inputs[0], reduced.maxabs[n].inputs[0])


def test_mismatched_node_sets_raise_on_every_rank_under_data_and_warn_under_auto(spawned):
    out, results = spawned("errors")
    for r in results:
        msg = r["mismatch"]["data"]
        assert msg.startswith("MeasurementError: calibration_parallel 'data'")
        assert "node 'fc2' is measured on rank 0 but not on rank 1" in msg and "nothing was reduced" in msg
    assert not (out / "mismatch" / "data").exists()  # nothing written
    # auto: each rank writes its own per-rank files, with a warning that names the difference
    assert [Path(r["mismatch"]["auto"][0]).name for r in results] == ["measure_hooks_maxabs_0_2.json",
                                                                      "measure_hooks_maxabs_1_2.json"]
    for r in results:
        assert any("node 'fc2' is measured on rank 0 but not on rank 1" in w for w in r["mismatch"]["auto_warnings"])


def test_different_weights_mean_tensor_parallel(spawned):
    out, results = spawned("errors")
    for r in results:
        msg = r["sharded"]["data"]
        assert msg.startswith("MeasurementError: ") and "the weight of node 'fc1' differs" in msg
        assert "calibration_parallel 'tensor'" in msg
    names = [Path(r["sharded"]["auto"][0]).name for r in results]
    assert names == ["measure_hooks_maxabs_0_2.json", "measure_hooks_maxabs_1_2.json"]
    m0 = inc.read_measurements(out / "sharded" / "auto" / "measure", rank=0, world_size=2)
    m1 = inc.read_measurements(out / "sharded" / "auto" / "measure", rank=1, world_size=2)
    assert m0.nodes["fc1"].weight_maxabs()[0] != m1.nodes["fc1"].weight_maxabs()[0]  # each its own


def test_a_non_finite_value_on_one_rank_fails_every_rank(spawned):
    out, results = spawned("errors")
    for r in results:
        raised = r["nonfinite"]["raised"]
        assert raised is not None and "non-finite" in raised and "fc1" in raised
    assert not (out / "nonfinite" / "nf").exists()


# ------------------------------------------------------------------- single-process behaviour
def test_data_without_a_process_group_is_refused_when_the_environment_has_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    model = fp8fx.prepare(_model(), fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(tmp_path / "m"),
                                                    calibration_parallel="data"))
    with torch.no_grad():
        model(_batches([0])[0])
    with pytest.raises(ConfigError, match="no torch.distributed process group is initialized"):
        fp8fx.finalize_calibration(model)


def test_data_in_one_process_writes_the_shared_set_and_quantize_reads_it_under_torchrun(tmp_path, monkeypatch):
    prefix = tmp_path / "m"
    files = _calibrate(_model(), {"mode": "MEASURE", "dump_stats_path": str(prefix), "calibration_parallel": "data"},
                       _batches([0, 1]))
    assert [p.name for p in files][:2] == ["m_hooks_maxabs.json", "m_hooks_maxabs.npz"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    from fp8fx.state import load_measurements, worker

    for mode in ("data", "auto"):  # auto: no per-rank file for rank 1, the shared set exists
        cfg = fp8fx.FP8Config(mode="QUANTIZE", dump_stats_path=str(prefix), calibration_parallel=mode)
        assert worker(cfg) == (None, None)
        assert load_measurements(cfg).source == str(files[1])
    cfg = fp8fx.FP8Config(mode="QUANTIZE", dump_stats_path=str(prefix), calibration_parallel="tensor")
    assert worker(cfg) == (1, 2)
    with pytest.raises(MeasurementError, match="m_hooks_maxabs_1_2"):
        load_measurements(cfg)


def test_auto_reads_the_rank_files_when_they_exist(tmp_path, monkeypatch):
    prefix = tmp_path / "m"
    m = inc.Measurements(nodes={"fc1": inc.NodeMeasurement(inputs=[[[1.0]]])})
    inc.write_measurements(m, prefix)
    inc.write_measurements(m, prefix, rank=1, world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    from fp8fx.state import worker

    assert worker(fp8fx.FP8Config(dump_stats_path=str(prefix))) == (1, 2)


def test_the_config_key_round_trips_and_contradictions_are_refused():
    cfg = fp8fx.FP8Config(calibration_parallel="DATA")
    assert cfg.to_dict()["calibration_parallel"] == "data"
    assert fp8fx.FP8Config.from_dict(cfg.to_dict()) == cfg
    assert "calibration_parallel" not in fp8fx.FP8Config().to_dict()  # not an INC key: default unwritten
    with pytest.raises(ConfigError, match="valid choices: auto, data, tensor"):
        fp8fx.FP8Config(calibration_parallel="dp")
    with pytest.raises(ConfigError, match="world_size/local_rank name per-rank files"):
        fp8fx.FP8Config(calibration_parallel="data", world_size=2, local_rank=0)


# ------------------------------------------------------------------ per-rank files: merge / regroup
def _rank_meas(r: int, *, channels: int = 1, heads: bool = False, observer: str = "maxabs") -> inc.Measurements:
    """Rank ``r``'s measurements: values that differ per rank, per tensor (or per channel)."""
    w = [[0.1 * (r + 1) + 0.01 * c] for c in range(channels)]
    nodes = {"fc1": inc.NodeMeasurement(inputs=[[[1.0 + r]]], params={"weight": w}),
             "attn": inc.NodeMeasurement(inputs=[[[2.0 * (r % 2) + 0.5]], [[3.0 - r * 0.25]]],
                                         outputs=[[[0.5 + r]]] if heads else None)}
    return inc.Measurements(nodes=nodes, observer=observer)


def _write_ranks(prefix: Path, world: int, **kw) -> None:
    for r in range(world):
        inc.write_measurements(_rank_meas(r, **kw), prefix, rank=r, world_size=world)


def test_merge_writes_the_elementwise_max_as_one_shared_set(tmp_path, capsys):
    prefix = tmp_path / "measure"
    _write_ranks(prefix, 4, channels=3)
    from fp8fx.cli import main

    assert main(["measurements", "merge", str(prefix), "--world", "4", "--out", str(tmp_path / "out" / "m")]) == 0
    assert "merged 4 ranks" in capsys.readouterr().out
    m = inc.read_measurements(tmp_path / "out" / "m")  # the name a single process reads
    assert m.nodes["fc1"].input_maxabs() == 4.0
    assert m.nodes["attn"].inputs[0].item() == 2.5 and m.nodes["attn"].inputs[1].item() == 3.0
    np.testing.assert_array_equal(m.nodes["fc1"].weight_maxabs(), np.float32([0.4, 0.41, 0.42]))
    assert m.local_rank is None


def test_regroup_down_groups_consecutive_ranks_by_default(tmp_path, capsys):
    prefix = tmp_path / "measure"
    _write_ranks(prefix, 4)
    from fp8fx.cli import main

    assert main(["measurements", "regroup", str(prefix), "--world", "4", "--to", "2"]) == 0
    printed = capsys.readouterr().out
    assert "rank 0 of 2 from rank(s) 0,1 of 4" in printed and "rank 1 of 2 from rank(s) 2,3 of 4" in printed
    new = [inc.read_measurements(prefix, rank=i, world_size=2) for i in range(2)]
    assert [m.nodes["fc1"].input_maxabs() for m in new] == [2.0, 4.0]
    assert [m.local_rank for m in new] == [0, 1]
    # explicit groups, vllm-hpu-extension's syntax (a TP16 run over two nodes reduced to TP8 pairs r and r+8)
    assert ranks.parse_groups("0,8--1,9--2,10--3,11--4,12--5,13--6,14--7,15", 16)[1] == [1, 9]
    assert main(["measurements", "regroup", str(prefix), "--world", "4", "--to", "2", "--groups", "0,2--1,3",
                 "--out", str(tmp_path / "g" / "m")]) == 0
    new = [inc.read_measurements(tmp_path / "g" / "m", rank=i, world_size=2) for i in range(2)]
    assert [m.nodes["fc1"].input_maxabs() for m in new] == [3.0, 4.0]
    assert [m.nodes["attn"].inputs[0].item() for m in new] == [0.5, 2.5]


def test_regroup_up_copies_each_rank_to_its_sub_ranks(tmp_path):
    prefix = tmp_path / "measure"
    _write_ranks(prefix, 2)
    paths = ranks.regroup_ranks(prefix, 2, 4)
    assert [p[0].name for p in paths] == [f"measure_hooks_maxabs_{j}_4.json" for j in range(4)]
    new = [inc.read_measurements(prefix, rank=j, world_size=4) for j in range(4)]
    assert [m.nodes["fc1"].input_maxabs() for m in new] == [1.0, 1.0, 2.0, 2.0]


def test_per_channel_arrays_need_an_explicit_rule(tmp_path):
    prefix = tmp_path / "measure"
    _write_ranks(prefix, 2, channels=4)
    with pytest.raises(MeasurementError, match=r"node 'fc1' key 'params.weight' holds 4 values .*--arrays max"):
        ranks.regroup_ranks(prefix, 2, 1)
    assert not list(tmp_path.glob("*_0_1.*"))  # nothing written
    [down] = ranks.regroup(ranks.read_ranks(prefix, 2), 1, arrays="concat")
    np.testing.assert_array_equal(down.nodes["fc1"].weight_maxabs(), np.float32([.1, .11, .12, .13, .2, .21, .22, .23]))
    [down] = ranks.regroup(ranks.read_ranks(prefix, 2), 1, arrays="max")
    np.testing.assert_array_equal(down.nodes["fc1"].weight_maxabs(), np.float32([.2, .21, .22, .23]))
    up = ranks.regroup(ranks.read_ranks(prefix, 2), 4, arrays="concat")
    np.testing.assert_array_equal(up[1].nodes["fc1"].weight_maxabs(), np.float32([.12, .13]))
    np.testing.assert_array_equal(up[2].nodes["fc1"].weight_maxabs(), np.float32([.2, .21]))
    with pytest.raises(MeasurementError, match="cannot be split into 8 equal parts"):
        ranks.regroup(ranks.read_ranks(prefix, 2), 16, arrays="concat")


def test_a_missing_rank_names_its_file_and_the_ranks_found(tmp_path):
    prefix = tmp_path / "measure"
    _write_ranks(prefix, 4)
    inc.write_measurements(_rank_meas(0), prefix, rank=0, world_size=8)
    for p in inc.measurement_file_paths(prefix, rank=2, world_size=4):
        p.unlink()
    with pytest.raises(MeasurementError) as e:
        ranks.merge_ranks(prefix, 4)
    msg = str(e.value)
    assert "rank 2 of 4" in msg and "measure_hooks_maxabs_2_4.npz" in msg and "ranks found for world 4: [0, 1, 3]" in msg
    assert "world 8: ranks [0]" in msg
    with pytest.raises(MeasurementError, match="no per-rank measurement file.*world 4 ranks \\[0, 1, 3\\]"):
        ranks.merge_ranks(prefix, 3)


def test_mismatched_nodes_and_shapes_name_the_node_and_both_files(tmp_path):
    prefix = tmp_path / "measure"
    _write_ranks(prefix, 2)
    other = _rank_meas(1)
    other.nodes["fc9"] = other.nodes.pop("fc1")
    inc.write_measurements(other, prefix, rank=1, world_size=2)
    with pytest.raises(MeasurementError, match=r"node 'fc1' is in .*_0_2.npz but not in .*_1_2.npz"):
        ranks.regroup_ranks(prefix, 2, 1)
    with pytest.raises(MeasurementError, match=r"node sets differ .*fc1"):
        ranks.merge_ranks(prefix, 2)
    inc.write_measurements(_rank_meas(1, channels=3), prefix, rank=1, world_size=2)
    with pytest.raises(MeasurementError, match=r"node 'fc1' key 'params.weight': shape \(1, 1\) in .*_0_2.npz but "
                                               r"\(3, 1\) in .*_1_2.npz"):
        ranks.regroup_ranks(prefix, 2, 1, arrays="max")


def test_world_sizes_that_do_not_divide_are_refused(tmp_path, capsys):
    prefix = tmp_path / "measure"
    _write_ranks(prefix, 4)
    from fp8fx.cli import main

    assert main(["measurements", "regroup", str(prefix), "--world", "4", "--to", "3"]) == 2
    assert "cannot group 4 ranks into 3: --to must divide --world" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="cannot expand 4 ranks to 6"):
        ranks.regroup_ranks(prefix, 4, 6)
    with pytest.raises(ConfigError, match="every rank 0..3 must appear exactly once"):
        ranks.parse_groups("0,1--1,2", 4)
    with pytest.raises(ConfigError, match="nothing to regroup"):
        ranks.regroup_ranks(prefix, 4, 4)


def test_histogram_observer_files_keep_their_maxabs_and_parameters(tmp_path, capsys):
    prefix = tmp_path / "measure"
    for r in range(2):
        m = _rank_meas(r, observer="percentile")
        m.maxabs = {n: inc.NodeMeasurement(inputs=[x * 2 for x in node.inputs], outputs=node.outputs)
                    for n, node in m.nodes.items()}
        m.observer_params = {"percentile": 99.0}
        inc.write_measurements(m, prefix, rank=r, world_size=2)
    from fp8fx.cli import main

    assert main(["measurements", "merge", str(prefix), "--world", "2"]) == 0
    assert "note: observer 'percentile'" in capsys.readouterr().err
    merged = inc.read_measurements(prefix, observer="percentile")
    assert merged.maxabs["fc1"].input_maxabs() == 4.0 and merged.observer_params == {"percentile": 99.0}
    [down] = ranks.regroup(ranks.read_ranks(prefix, 2), 1)
    assert down.maxabs["fc1"].input_maxabs() == 4.0 and down.nodes["fc1"].input_maxabs() == 2.0
