"""Tests of fp8fx.sensitivity: the per-node table, the blocklist search, FLOP shares, the command."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import fp8fx
from fp8fx import cli
from fp8fx import sensitivity as sens
from fp8fx.errors import Fp8fxError
from test_data import build_tiny_hf_folder, write_tiny_text
from tiny_models import tiny_llama

LINEARS_ONLY = {"names": ["lm_head"], "types": ["matmul", "softmax", "sdpa", "kv_cache"]}
PLANTED = "model.layers.0.mlp.gate_proj"


def _planted_model() -> torch.nn.Module:
    """A one-layer random Llama whose gate_proj has an outlier weight column that is harmless in
    high precision (the RMSNorm weight in front of it is shrunk by the same factor) but leaves
    every other weight of that Linear below FP8's smallest step under a per-tensor scale."""
    model = tiny_llama(layers=1)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[5] *= 1e-5
        model.model.layers[0].mlp.gate_proj.weight[:, 5] *= 1e5
    return model


def _windows(n: int, seq: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, seq), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    model = _planted_model()
    calib = _windows(3, 24, seed=1)
    cfg = fp8fx.FP8Config(mode="MEASURE", blocklist=LINEARS_ONLY)
    folder = tmp_path_factory.mktemp("sens")
    table = sens.sensitivity(model, calib, cfg, windows=1, measurements_dir=folder, progress=False)
    return {"model": model, "calib": calib, "cfg": cfg, "table": table}


# --------------------------------------------------------------------------- the table
def test_planted_outlier_is_the_most_sensitive_node(planted) -> None:
    table = planted["table"]
    ranked = table.ranked()
    assert ranked[0].name == PLANTED
    top = table.row(PLANTED)
    others = [r for r in table.rows if r.name != PLANTED]
    assert top.sqnr_db < 10.0 < 20.0 < min(r.sqnr_db for r in others)
    assert top.kl > 10 * max(r.kl for r in others)
    assert all(r.method == "swap" and r.kind == "linear" and r.kl >= 0.0 for r in table.rows)
    assert str(table).splitlines()[2].split()[1] == PLANTED  # printed most sensitive first


def test_rows_are_the_quantized_nodes_and_flops_are_counted(planted) -> None:
    table, model = planted["table"], planted["model"]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {r.name for r in table.rows} == set(linears) - {"lm_head"}
    rows = 23  # one scored window of 24 tokens: every Linear sees 24 rows; 23 are scored
    assert table.tokens == rows
    for r in table.rows:
        m = linears[r.name]
        assert r.flops == 2 * 24 * m.in_features * m.out_features
    total = sum(2 * 24 * m.in_features * m.out_features for m in linears.values())
    assert table.linear_flops == total
    assert math.isclose(sum(r.flop_share for r in table.rows), 1.0)
    assert table.quantized_linear_flops == total - 2 * 24 * 64 * 128  # without lm_head


def test_model_is_left_as_it_was(planted) -> None:
    from fp8fx.state import state_of

    model = planted["model"]
    assert state_of(model) is None
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.model.layers[0].mlp.gate_proj.weight.dtype == torch.float32


def test_table_to_dict_is_json(planted) -> None:
    d = json.loads(json.dumps(planted["table"].to_dict(), allow_nan=False))
    assert d["rows"][0]["name"] == PLANTED and d["windows"] == 1
    assert set(d["rows"][0]) >= {"kl", "nll_delta", "ppl_delta_pct", "sqnr_db", "flops", "flop_share"}


def test_attention_ops_are_measured_by_conversion() -> None:
    model = tiny_llama(layers=1, attn="sdpa")
    # only the SDPA op (each attention op costs one conversion of its own)
    cfg = fp8fx.FP8Config(mode="MEASURE", blocklist={"names": ["lm_head", "_proj$"], "types": ["kv_cache"]})
    table = sens.sensitivity(model, _windows(2, 16, seed=2), cfg, windows=1, progress=False)
    assert [(r.kind, r.method, r.flops, r.sqnr_db) for r in table.rows] == [("sdpa", "convert", None, None)]
    assert table.rows[0].kl > 0.0 and math.isfinite(table.rows[0].nll_delta)


# --------------------------------------------------------------------------- the search
def _recorder(fn):
    calls: list[int] = []

    def delta(k: int) -> float:
        calls.append(k)
        return fn(k)
    return delta, calls


def test_search_stops_at_once_when_all_fp8_meets_the_target() -> None:
    delta, calls = _recorder(lambda k: 0.5)
    assert sens.search_kept([1.0] * 10, delta, 1.0, 8) == {0: 0.5}
    assert calls == [0]


def test_search_finds_the_smallest_passing_k_and_stops() -> None:
    n = 40
    delta, calls = _recorder(lambda k: 4.0 * (n - k) / n)  # passes from k = 30 on
    out = sens.search_kept([1.0] * n, delta, 1.0, 20)
    assert min(k for k, d in out.items() if d <= 1.0) == 30
    assert len(calls) == len(set(calls)) <= 20
    first_pass = next(i for i, k in enumerate(calls) if out[k] <= 1.0)
    passing_so_far = calls[first_pass]
    for k in calls[first_pass + 1:]:  # after a pass, only fewer kept nodes are tried
        assert k < passing_so_far
        if out[k] <= 1.0:
            passing_so_far = k
    assert 29 in out  # the bracket closed: 29 fails, 30 passes, nothing else was measured after


def test_search_follows_the_scores() -> None:
    scores = [100.0] + [0.01] * 20  # one node holds nearly all of the sensitivity
    delta, calls = _recorder(lambda k: 5.0 if k == 0 else 0.2)
    out = sens.search_kept(scores, delta, 1.0, 8)
    assert calls == [0, 1] and out == {0: 5.0, 1: 0.2}


def test_search_respects_the_evaluation_cap() -> None:
    delta, calls = _recorder(lambda k: 0.0 if k == 50 else 3.0)
    out = sens.search_kept([1.0] * 50, delta, 1.0, 2)
    assert len(calls) == 2 and all(d > 1.0 for d in out.values())
    delta, calls = _recorder(lambda k: 0.0 if k == 50 else 3.0)
    assert sens.search_kept([1.0] * 50, delta, 1.0, 30)[50] == 0.0  # enough evaluations: all kept


def test_auto_blocklist_stops_once_the_target_holds(planted) -> None:
    val = _windows(2, 24, seed=3)
    loose = sens.auto_blocklist(planted["model"], planted["calib"], val, 1e6, table=planted["table"],
                                progress=False)
    assert loose.target_met and loose.kept == [] and len(loose.evaluations) == 1
    assert loose.fp8_flop_share == 1.0 and loose.delta_pct == loose.evaluations[0]["delta_pct"]
    messages: list[str] = []
    tight = sens.auto_blocklist(planted["model"], planted["calib"], val, 0.0, table=planted["table"],
                                max_evals=3, progress=False, log=messages.append)
    assert 1 <= len(tight.evaluations) <= 3 and len(messages) == 1 + len(tight.evaluations)
    assert [e["kept"] for e in tight.evaluations][0] == 0
    if tight.kept:
        assert tight.kept[0] == PLANTED
    if tight.target_met:
        assert tight.delta_pct <= 0.0


# --------------------------------------------------------------------------- FLOP shares, blocklists
def _row(name: str, flops: int | None, kind: str = "linear", kl: float = 0.0) -> sens.NodeSensitivity:
    return sens.NodeSensitivity(name=name, kind=kind, module_type="Linear", kl=kl, nll_delta=0.0,
                                sqnr_db=30.0, flops=flops, flop_share=None, method="swap")


def test_flop_share_arithmetic() -> None:
    table = sens.SensitivityTable(
        rows=[_row("a", 100), _row("b", 300), _row("c", 600), _row("attn.sdpa_0", None, kind="sdpa")],
        windows=1, tokens=10, hp_nll=1.0, linear_flops=2000, config=fp8fx.FP8Config())
    found = sens.AutoBlocklist(target_pct=1.0, target_met=True, kept=["c", "attn.sdpa_0"], ppl_hp=10.0,
                               ppl_fp8=10.05, ppl_all_fp8=10.3, evaluations=[], table=table)
    assert found.fp8_flop_share == pytest.approx(400 / 1000)
    assert found.fp8_flop_share_all_linears == pytest.approx(400 / 2000)
    assert found.attention_counts() == {"fp8": 0, "kept": 1}
    assert found.delta_pct == pytest.approx(0.5)
    assert "40.0% of the quantizable Linears, 20.0% of all Linears" in str(found)


def test_exact_names_block_only_that_node() -> None:
    cfg = fp8fx.FP8Config(blocklist={"names": ["lm_head"], "types": ["sdpa"]})
    table = sens.SensitivityTable(rows=[_row("model.layers.1.mlp.up_proj", 1)], windows=1, tokens=1,
                                  hp_nll=0.0, linear_flops=1, config=cfg)
    found = sens.AutoBlocklist(target_pct=1.0, target_met=True, kept=["model.layers.1.mlp.up_proj"],
                               ppl_hp=1.0, ppl_fp8=1.0, ppl_all_fp8=1.0, evaluations=[], table=table)
    blocked = found.apply(cfg)
    assert list(blocked.blocklist.names) == ["lm_head", r"^model\.layers\.1\.mlp\.up_proj$"]
    assert list(blocked.blocklist.types) == ["sdpa"]
    assert blocked.filter_reason("model.layers.1.mlp.up_proj", ["Linear"]) is not None
    assert blocked.filter_reason("model.layers.11.mlp.up_proj", ["Linear"]) is None
    assert re.search(sens.exact_name("a.b"), "aXb") is None


# --------------------------------------------------------------------------- errors, plot
def test_bad_inputs_raise_clear_errors(planted) -> None:
    model, calib = planted["model"], planted["calib"]
    with pytest.raises(Fp8fxError, match="calibration is empty"):
        sens.sensitivity(model, [], progress=False)
    with pytest.raises(Fp8fxError, match=r"calibration\[0\].*\[batch, seq>=2\]"):
        sens.sensitivity(model, [torch.tensor([1, 2, 3])], progress=False)
    with pytest.raises(Fp8fxError, match="target_pct"):
        sens.auto_blocklist(model, calib, calib, -1.0, table=planted["table"], progress=False)
    prepared = fp8fx.prepare(tiny_llama(layers=1), fp8fx.FP8Config(mode="MEASURE"))
    with pytest.raises(Fp8fxError, match="already prepared or converted"):
        sens.sensitivity(prepared, calib, progress=False)


def test_plot_without_matplotlib_names_the_package(planted, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(Fp8fxError, match="matplotlib"):
        sens.plot_sensitivity(planted["table"], tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_plot_writes_a_png(planted, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = sens.plot_sensitivity(planted["table"], tmp_path / "s.png", kept=[PLANTED])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sens_cli")
    return {"model": build_tiny_hf_folder(root / "model", tied=True),
            "calib": write_tiny_text(root / "calib.txt", repeats=12),
            "eval": write_tiny_text(root / "eval.txt", repeats=2), "root": root}


def _cli(job: dict[str, Path], *extra: str) -> list[str]:
    return ["quantize", "--model", str(job["model"]), "--calib", str(job["calib"]), "--eval",
            str(job["eval"]), "--window", "16", "--calib-tokens", "32", "--validation-tokens", "32",
            "--sensitivity-windows", "1", "--no-progress", *extra]


def test_cli_sensitivity_and_auto_blocklist(job, capsys) -> None:
    pytest.importorskip("matplotlib")
    report, plot = job["root"] / "r.json", job["root"] / "plot.png"
    assert cli.main(_cli(job, "--sensitivity", "--sensitivity-plot", str(plot), "--auto-blocklist", "1000",
                         "--report-json", str(report))) == 0
    out = capsys.readouterr().out
    assert "sensitivity: each node alone in FP8" in out and f"sensitivity plot: {plot}" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "auto-blocklist (target 1000% on the validation text): met" in out
    assert "Linear FLOPs in FP8: 100.0% of the quantizable Linears" in out
    entry = json.loads(report.read_text())["sensitivity"]
    assert entry["auto_blocklist"]["kept"] == [] and entry["auto_blocklist"]["fp8_flop_share"] == 1.0
    assert len(entry["auto_blocklist"]["evaluations"]) == 1
    assert len(entry["table"]["rows"]) == 14  # 2 layers x 7 Linears (the tied lm_head is blocklisted)
    assert entry["validation"]["file"] == str(job["calib"]) and entry["plot"] == str(plot)


def test_cli_refuses_validation_equal_to_evaluation(job, capsys) -> None:
    args = _cli(job, "--auto-blocklist", "1")
    args[args.index("--eval") + 1] = str(job["calib"])
    assert cli.main(args) == 2
    assert "must never be the evaluation text" in capsys.readouterr().err


def test_cli_refuses_a_calibration_text_too_short_for_validation(job, capsys) -> None:
    assert cli.main(_cli(job, "--auto-blocklist", "1", "--validation-tokens", "100000")) == 2
    err = capsys.readouterr().err
    assert "--calib" in err and "--validation-tokens" in err


def test_cli_rejects_a_negative_percentage(capsys) -> None:
    assert cli.main(["quantize", "--auto-blocklist", "-1"]) == 2
    assert "percentage" in capsys.readouterr().err
