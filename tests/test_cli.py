"""Tests of the ``fp8fx`` command (fp8fx.cli): arguments, errors, wiring and the report."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import fp8fx
from fp8fx import cli
from test_data import build_tiny_hf_folder, write_tiny_text

REPORT_KEYS = {
    "model", "ppl_hp", "ppl_fp8", "ppl_delta_pct", "weight_bytes_hp", "weight_bytes_fp8",
    "nodes_quantized", "nodes_skipped", "seconds",
}


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    return {
        "model": build_tiny_hf_folder(root / "model", tied=True),
        "calib": write_tiny_text(root / "calib.txt", repeats=8),
        "eval": write_tiny_text(root / "eval.txt", repeats=3),
        "root": root,
    }


def _args(job: dict[str, Path], *extra: str) -> list[str]:
    return [
        "quantize", "--model", str(job["model"]), "--calib", str(job["calib"]),
        "--eval", str(job["eval"]), "--window", "16", "--calib-tokens", "64", "--no-progress",
        *extra,
    ]


# --------------------------------------------------------------------------- arguments


def test_quantize_defaults() -> None:
    args = cli.build_parser().parse_args(["quantize"])
    assert args.command == "quantize"
    assert (args.model, args.calib, args.eval_file, args.config, args.out) == (None,) * 5
    assert (args.calib_tokens, args.window, args.dtype, args.seed) == (8192, 512, None, 0)
    assert args.no_progress is False and args.report_json is None


def test_no_arguments_prints_help(capsys) -> None:
    assert cli.main([]) == 0
    assert "quantize" in capsys.readouterr().out


def test_quantize_help(capsys) -> None:
    assert cli.main(["quantize", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--model", "--calib", "--eval", "--config", "--out", "--report-json",
                   "--calib-tokens", "--window", "--dtype", "--no-progress", "--seed"):
        assert option in out


@pytest.mark.parametrize("bad", [["quantize", "--window", "0"], ["quantize", "--dtype", "int4"],
                                 ["frobnicate"]])
def test_usage_errors_exit_2(bad, capsys) -> None:
    assert cli.main(bad) == 2
    assert "usage:" in capsys.readouterr().err


def test_python_dash_m_runs_the_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "fp8fx", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "quantize" in proc.stdout


# --------------------------------------------------------------------------- errors


def test_missing_model_folder_is_a_one_line_error(tiny_job, tmp_path, capsys) -> None:
    missing = tmp_path / "no_such_model"
    argv = _args(tiny_job)
    argv[argv.index("--model") + 1] = str(missing)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fp8fx: error: ") and str(missing) in err
    assert "Traceback" not in capsys.readouterr().err


def test_non_model_folder_and_debug_traceback(tiny_job, tmp_path, capsys, monkeypatch) -> None:
    argv = _args(tiny_job)
    argv[argv.index("--model") + 1] = str(tmp_path)
    monkeypatch.setenv("FP8FX_DEBUG", "1")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and f"fp8fx: error: --model: {tmp_path} is not a Hugging Face" in err


def test_missing_text_file_is_named(tiny_job, tmp_path, capsys) -> None:
    argv = _args(tiny_job)
    argv[argv.index("--eval") + 1] = str(tmp_path / "gone.cor")
    assert cli.main(argv) == 2
    assert "gone.cor" in capsys.readouterr().err


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("fp8fx: error: ")
    return line


def _set(argv: list[str], option: str, value: str) -> list[str]:
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    return argv


def _bad_inputs(tmp: Path) -> dict[str, tuple[str, Path]]:
    """name -> (option, path) of an input that must be refused, naming both."""
    folder = tmp / "a_folder"
    folder.mkdir()
    empty = tmp / "empty.txt"
    empty.write_text("")
    blank = tmp / "blank.txt"
    blank.write_text("   \n\n  \t\n")  # not empty, but no token
    broken = tmp / "broken.json"
    broken.write_text('{"mode": "MEASURE",')
    typo = tmp / "typo.json"
    typo.write_text(json.dumps({"mode": "MEASURE", "scale_metod": "maxabs_hw"}))
    not_object = tmp / "list.json"
    not_object.write_text("[1, 2]")
    a_file = tmp / "a_file.txt"
    a_file.write_text("x")
    return {
        "calib_is_folder": ("--calib", folder),
        "eval_is_folder": ("--eval", folder),
        "calib_empty": ("--calib", empty),
        "eval_empty": ("--eval", empty),
        "calib_without_tokens": ("--calib", blank),
        "eval_without_tokens": ("--eval", blank),
        "config_is_folder": ("--config", folder),
        "config_missing": ("--config", tmp / "missing.json"),
        "config_invalid_json": ("--config", broken),
        "config_unknown_key": ("--config", typo),
        "config_not_an_object": ("--config", not_object),
        "model_is_a_file": ("--model", a_file),
        "report_json_is_folder": ("--report-json", folder),
        "report_json_under_a_file": ("--report-json", a_file / "r.json"),
    }


BAD_INPUTS = [  # the keys of _bad_inputs
    "calib_is_folder", "eval_is_folder", "calib_empty", "eval_empty", "calib_without_tokens",
    "eval_without_tokens", "config_is_folder", "config_missing", "config_invalid_json",
    "config_unknown_key", "config_not_an_object", "model_is_a_file", "report_json_is_folder",
    "report_json_under_a_file",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_names_the_option_and_the_file(case, tiny_job, tmp_path, capsys) -> None:
    option, path = _bad_inputs(tmp_path)[case]
    assert cli.main(_set(_args(tiny_job), option, str(path))) == 2
    line = _error_line(capsys)
    assert option in line and str(path) in line, line
    if case == "config_invalid_json":
        assert "not valid JSON" in line
    if case == "config_unknown_key":
        assert "scale_metod" in line and "scale_method" in line  # the key and the closest one
    if case.endswith("_empty"):
        assert "empty" in line


def test_cheap_checks_run_before_the_model_loads(tiny_job, tmp_path, capsys, monkeypatch) -> None:
    from fp8fx import data

    monkeypatch.setattr(data, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    cases = _bad_inputs(tmp_path)
    for case in ("calib_is_folder", "calib_empty", "eval_empty", "config_invalid_json",
                 "config_unknown_key", "report_json_is_folder"):
        option, path = cases[case]
        assert cli.main(_set(_args(tiny_job), option, str(path))) == 2
        assert str(path) in _error_line(capsys)


@pytest.mark.parametrize("option", ["--window", "--calib-tokens", "--eval-tokens"])
def test_one_token_is_a_usage_error_naming_the_option(option, capsys) -> None:
    assert cli.main(["quantize", option, "1"]) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and option in err and "at least 2" in err


def test_calibration_default_is_the_data_module_s() -> None:
    from fp8fx import data

    assert cli.DEFAULT_CALIB_TOKENS == data.DEFAULT_CALIB_TOKENS


# --------------------------------------------------------------------------- wiring (fakes)


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    mode: str = "MEASURE"
    dump_stats_path: str = "./hqt_output/measure"
    blocklist: Any = None
    target: str = "cpu"
    hp_dtype: str = "bf16"

    def replace(self, **changes: Any) -> FakeConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_json_file(cls, path: Any) -> FakeConfig:
        return cls(**json.loads(Path(path).read_text()))


@pytest.fixture
def fake_api(monkeypatch) -> list[tuple]:
    """Replace the quantization API with fakes that record what the command calls."""
    calls: list[tuple] = []

    hooks = []

    def prepare(model, cfg):
        calls.append(("prepare", cfg))
        hooks.append(model.register_forward_pre_hook(
            lambda m, a: calls.append(("forward", a[0].shape[1]))))
        return model

    def finalize_calibration(model):
        calls.append(("finalize",))

    def convert(model, cfg=None):
        calls.append(("convert", cfg))
        while hooks:
            hooks.pop().remove()
        return model

    def report(model):
        return {"nodes_quantized": {"linear": 14}, "nodes_skipped": {"linear": 1}}

    for name, fn in [("FP8Config", FakeConfig), ("prepare", prepare),
                     ("finalize_calibration", finalize_calibration), ("convert", convert),
                     ("report", report)]:
        monkeypatch.setattr(fp8fx, name, fn, raising=False)
    return calls


def test_measure_flow_and_report_json(tiny_job, tmp_path, fake_api, capsys) -> None:
    report = tmp_path / "sub" / "report.json"
    assert cli.main(_args(tiny_job, "--report-json", str(report))) == 0
    kinds = [c[0] for c in fake_api]
    assert kinds == ["prepare"] + ["forward"] * 4 + ["finalize", "convert"]  # 64 / 16 windows
    cfg = fake_api[0][1]
    assert (cfg.mode, cfg.target, cfg.blocklist, cfg.hp_dtype) == (
        "MEASURE", "cpu", {"names": ["lm_head"], "types": ["matmul", "softmax", "sdpa", "kv_cache"]}, "fp32")
    assert not Path(cfg.dump_stats_path).parent.exists()  # the temporary folder is removed

    result = json.loads(report.read_text())
    assert REPORT_KEYS <= set(result)
    assert result["model"] == str(tiny_job["model"])
    assert result["ppl_fp8"] == pytest.approx(result["ppl_hp"])  # the fake converts nothing
    assert math.isfinite(result["ppl_hp"]) and result["ppl_delta_pct"] == pytest.approx(0.0)
    # 2 layers of fp32 q, k, v, o, gate, up, down; the tied lm_head is left out
    per_layer = 32 * 32 + 2 * (16 * 32) + 32 * 32 + 3 * (32 * 64)
    assert result["weight_bytes_hp"] == result["weight_bytes_fp8"] == 2 * 4 * per_layer
    assert result["weight_bytes_excluded"] == ["lm_head"]
    assert result["nodes_quantized"] == {"linear": 14}
    assert result["nodes_skipped"] == {"linear": 1}
    assert {"load", "calibrate", "convert", "total"} <= set(result["seconds"])
    assert list(report.parent.iterdir()) == [report]  # no temporary file left behind

    out = capsys.readouterr().out
    assert "perplexity" in out and "lm_head" in out and "linear 14" in out


RSS_KEYS = ("rss_bytes_after_load", "rss_bytes_before_convert", "rss_bytes_after_convert")


@pytest.mark.parametrize("quantize_config", [False, True])
def test_report_has_the_process_rss(quantize_config, tiny_job, tmp_path, fake_api, capsys) -> None:
    extra = []
    if quantize_config:
        config = tmp_path / "quant.json"
        config.write_text(json.dumps({"mode": "QUANTIZE", "dump_stats_path": "stats/measure"}))
        extra = ["--config", str(config)]
    report = tmp_path / "report.json"
    assert cli.main(_args(tiny_job, "--report-json", str(report), *extra)) == 0
    result = json.loads(report.read_text())
    for key in RSS_KEYS:  # measured, not thresholded: only that they are there and positive
        assert isinstance(result[key], int) and result[key] > 0, key
    assert result["rss_source"] in ("/proc/self/statm", "psutil")
    out = capsys.readouterr().out
    assert "process RSS, before/after convert **" in out and "whole process" in out
    assert "after load" in out


def test_rss_unknown_is_reported_as_n_a(tiny_job, tmp_path, fake_api, capsys, monkeypatch) -> None:
    from fp8fx import evaluate

    monkeypatch.setattr(evaluate, "resident_bytes", lambda: (None, "n/a"))
    report = tmp_path / "report.json"
    assert cli.main(_args(tiny_job, "--report-json", str(report))) == 0
    result = json.loads(report.read_text())
    assert [result[k] for k in RSS_KEYS] == [None, None, None] and result["rss_source"] == "n/a"
    row = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("process RSS"))
    assert row.split()[-3:] == ["n/a", "n/a", "n/a"]


def test_out_keeps_the_measurement_prefix(tiny_job, tmp_path, fake_api) -> None:
    assert cli.main(_args(tiny_job, "--out", str(tmp_path / "meas"), "--dtype", "bf16")) == 0
    cfg = fake_api[0][1]
    assert cfg.dump_stats_path == str(tmp_path / "meas" / "measure") and cfg.hp_dtype == "bf16"
    assert (tmp_path / "meas").is_dir()


def test_quantize_config_skips_calibration(tiny_job, tmp_path, fake_api) -> None:
    config = tmp_path / "quant.json"
    config.write_text(json.dumps({"mode": "QUANTIZE", "dump_stats_path": "stats/measure"}))
    assert cli.main(_args(tiny_job, "--config", str(config))) == 0
    assert [c[0] for c in fake_api] == ["convert"]
    convert_cfg = fake_api[0][1]
    assert (convert_cfg.mode, convert_cfg.dump_stats_path) == ("QUANTIZE", "stats/measure")
    assert convert_cfg.hp_dtype == "fp32"  # the dtype saved in the model folder


def test_attention_flag_keeps_attention_kinds_and_refuses_a_config(tiny_job, tmp_path, fake_api, capsys) -> None:
    assert cli.main(_args(tiny_job, "--attention")) == 0
    assert fake_api[0][1].blocklist == {"names": ["lm_head"]}
    config = tmp_path / "measure.json"
    config.write_text(json.dumps({"mode": "MEASURE"}))
    assert cli.main(_args(tiny_job, "--attention", "--config", str(config))) != 0
    assert "--attention" in capsys.readouterr().err


def test_dtype_follows_config_then_flag(tiny_job, tmp_path, fake_api) -> None:
    config = tmp_path / "measure.json"
    config.write_text(json.dumps({"mode": "MEASURE", "hp_dtype": "bfloat16"}))
    report = tmp_path / "r.json"
    assert cli.main(_args(tiny_job, "--config", str(config), "--report-json", str(report))) == 0
    assert json.loads(report.read_text())["hp_dtype"] == "bf16"
    assert fake_api[0][1].hp_dtype == "bf16"
    assert not Path(fake_api[0][1].dump_stats_path).parent.exists()  # no path named: temporary
    fake_api.clear()
    assert cli.main(_args(tiny_job, "--config", str(config), "--dtype", "fp32")) == 0
    assert fake_api[0][1].hp_dtype == "fp32"


# --------------------------------------------------------------------------- end to end


needs_api = pytest.mark.skipif(not hasattr(fp8fx, "convert"), reason="fp8fx.convert missing")


@needs_api
def test_end_to_end_measure_then_quantize(tiny_job, tmp_path, capsys) -> None:
    out = tmp_path / "meas"
    report = tmp_path / "report.json"
    assert cli.main(_args(tiny_job, "--out", str(out), "--report-json", str(report))) == 0
    first = json.loads(report.read_text())
    assert REPORT_KEYS <= set(first)
    assert first["nodes_quantized"] == {"linear": 14}
    assert first["weight_bytes_fp8"] < first["weight_bytes_hp"] / 3  # fp32 -> fp8 + scales
    assert math.isfinite(first["ppl_fp8"]) and abs(first["ppl_delta_pct"]) < 5
    assert list(out.glob("measure*"))

    config = tmp_path / "quant.json"
    config.write_text(json.dumps({"mode": "QUANTIZE", "dump_stats_path": str(out / "measure"),
                                  "blocklist": {"names": ["lm_head"], "types": list(cli.ATTENTION_KINDS)},
                                  "hp_dtype": "fp32"}))
    assert cli.main(_args(tiny_job, "--config", str(config), "--report-json", str(report))) == 0
    second = json.loads(report.read_text())
    assert second["calib_tokens"] == 0
    assert second["ppl_fp8"] == pytest.approx(first["ppl_fp8"], rel=1e-4)
    assert second["weight_bytes_fp8"] == first["weight_bytes_fp8"]
