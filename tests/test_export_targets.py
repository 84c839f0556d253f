"""One calibration, every target (fp8fx.export.targets), the ``inc`` format (fp8fx.export.inc_format)
and ``fp8fx export``: scales derived per target from one set of measurement files, and INC itself
reading the ``inc`` folder."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fp8fx
from fp8fx import cli, numerics
from fp8fx.data import load_model
from fp8fx.errors import ConfigError, MeasurementError, UnsupportedError
from fp8fx.export import inc_format, save_pretrained
from fp8fx.export.targets import convert_from_measurements, export, export_from_measurements
from fp8fx.formats import inc
from test_data import build_tiny_hf_folder

E4M3 = torch.float8_e4m3fn
NO_ATTENTION = {"names": ["lm_head"], "types": ["sdpa", "matmul", "softmax", "kv_cache"]}
GAUDI2_SET = {1 / 256, 1 / 16, 1.0, 16.0}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, measurement prefix): a tiny HF Llama and one fp8fx calibration of it."""
    root = tmp_path_factory.mktemp("targets")
    model_dir = build_tiny_hf_folder(root / "model")
    model, _ = load_model(model_dir)
    prefix = root / "stats" / "fp8fx"
    fp8fx.prepare(model, fp8fx.FP8Config(mode="MEASURE", dump_stats_path=str(prefix), blocklist=NO_ATTENTION))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in (5, 9):
            model(torch.randint(0, model.config.vocab_size, (2, n), generator=g))
    fp8fx.finalize_calibration(model)
    return model_dir, prefix


def _fp8_linears(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, fp8fx.Fp8Linear)}


# ------------------------------------------------------------------------------ per-target numerics
def test_gaudi2_and_cuda_scales_follow_numerics(calibrated) -> None:
    model_dir, prefix = calibrated
    meas = inc.read_measurements(prefix)
    hp = load_file(str(model_dir / "model.safetensors"))
    models = {t: convert_from_measurements(model_dir, prefix, target=t)[0] for t in ("gaudi2", "cuda")}
    lin = {t: _fp8_linears(m) for t, m in models.items()}
    assert set(lin["gaudi2"]) == set(lin["cuda"]) == set(meas.nodes) and len(meas.nodes) == 14
    differ = 0
    for name in meas.nodes:
        w_amax = hp[f"{name}.weight"].abs().max()
        for target, mod in ((t, lin[t][name]) for t in lin):
            assert mod.fp8_max == numerics.fp8_max(E4M3, target) == (240.0 if target == "gaudi2" else 448.0)
            s_in = numerics.activation_scale(torch.tensor(meas.nodes[name].input_maxabs()), "maxabs_hw",
                                             fp8_dtype=E4M3, target=target, backoff=0.25)
            s_w = numerics.weight_scale_from_maxabs(w_amax, "maxabs_hw", fp8_dtype=E4M3, target=target, backoff=0.5)
            assert float(mod.input_scale) == float(s_in), (target, name)
            assert float(mod.weight_scale) == float(s_w), (target, name)
            codes = mod.weight.float().abs().max()
            assert codes <= mod.fp8_max
            if target == "gaudi2":
                assert {float(mod.input_scale), float(mod.weight_scale)} <= GAUDI2_SET
            expect = numerics.quantize_weight(hp[f"{name}.weight"], mod.weight_scale, E4M3, mod.fp8_max)
            assert torch.equal(mod.weight.view(torch.uint8), expect.view(torch.uint8))
        g2, cu = lin["gaudi2"][name], lin["cuda"][name]
        differ += float(g2.input_scale) != float(cu.input_scale) or float(g2.weight_scale) != float(cu.weight_scale)
    assert differ == len(meas.nodes)  # the 240 range and the Gaudi2 set move every scale of this model


def test_cuda_and_gaudi3_checkpoints_hold_their_targets_scales(calibrated, tmp_path) -> None:
    model_dir, prefix = calibrated
    for target, fmt in (("cuda", "compressed-tensors"), ("gaudi3", "vllm")):
        r = export(model_dir, prefix, tmp_path / target, target=target, format=fmt)
        assert r.path == tmp_path / target and len(r.quantized) == 14
        assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(r.files())
        report = fp8fx.check_checkpoint(r.path)
        assert report.problems == [] and len(report.plan.linears) == 14
        stored = load_file(str(r.path / "model.safetensors"))
        model = convert_from_measurements(model_dir, prefix, target=target)[0]
        for name, mod in _fp8_linears(model).items():
            assert stored[f"{name}.weight"].dtype == E4M3
            assert torch.equal(stored[f"{name}.weight"].view(torch.uint8), mod.weight.view(torch.uint8))
            assert float(stored[f"{name}.weight_scale"].reshape(())) == float(mod.weight_scale)
            assert float(stored[f"{name}.input_scale"].reshape(())) == float(mod.input_scale)


# ------------------------------------------------------------------------------------- bad input
def test_bad_target_format_and_gaudi2_in_a_448_format(calibrated, tmp_path) -> None:
    model_dir, prefix = calibrated
    with pytest.raises(ConfigError, match="unknown target 'tpu'"):
        export_from_measurements(model_dir, prefix, tmp_path / "o", target="tpu")
    with pytest.raises(ConfigError, match="unknown checkpoint format 'gguf'.*inc"):
        export_from_measurements(model_dir, prefix, tmp_path / "o", format="gguf")
    for fmt in ("compressed-tensors", "vllm", "modelopt"):
        with pytest.raises(UnsupportedError, match=f"gaudi2.*{fmt}.*240.*'inc'"):
            export_from_measurements(model_dir, prefix, tmp_path / "o", target="gaudi2", format=fmt)
    with pytest.raises(ConfigError, match="max_shard_size.*inc"):
        export_from_measurements(model_dir, prefix, tmp_path / "o", format="inc", max_shard_size="1GB")
    assert not (tmp_path / "o").exists()


def test_missing_files_name_the_prefix_and_what_exists(calibrated, tmp_path) -> None:
    model_dir, prefix = calibrated
    with pytest.raises(MeasurementError, match=r"prefix '.*fp8fy'.*starting with 'fp8fy'|no file in .* starts with"):
        export_from_measurements(model_dir, prefix.with_name("fp8fy"), tmp_path / "o")
    with pytest.raises(MeasurementError, match="fp8fx_hooks_maxabs.json"):  # a near prefix lists the real files
        export_from_measurements(model_dir, prefix.with_name("fp8"), tmp_path / "o")
    with pytest.raises(MeasurementError, match="is a folder"):
        export_from_measurements(model_dir, prefix.parent, tmp_path / "o")
    two = tmp_path / "two" / "m"
    two.parent.mkdir()
    for f in inc.measurement_file_paths(prefix):
        shutil.copyfile(f, inc.measurement_file_paths(two)[f.suffix == ".npz"])
        shutil.copyfile(f, inc.measurement_file_paths(two, "mse")[f.suffix == ".npz"])
    with pytest.raises(MeasurementError, match="several observers.*maxabs, mse"):
        export_from_measurements(model_dir, two, tmp_path / "o")


def test_linears_the_files_do_not_name_fail_naming_the_node(calibrated, tmp_path) -> None:
    model_dir, prefix = calibrated
    with pytest.raises(MeasurementError, match="lack 1 node.*lm_head"):
        export_from_measurements(model_dir, prefix, tmp_path / "o", cfg={"blocklist": {"types": NO_ATTENTION["types"]}})
    with pytest.raises(MeasurementError, match="lm_head"):
        export_from_measurements(model_dir, prefix, tmp_path / "o", format="inc",
                                 cfg={"blocklist": {"types": NO_ATTENTION["types"]}})
    assert not (tmp_path / "o").exists()


def test_per_rank_files_only(calibrated, tmp_path) -> None:
    model_dir, prefix = calibrated
    ranks = tmp_path / "ranks" / "m"
    m = inc.read_measurements(prefix)
    for r in range(2):
        inc.write_measurements(m, ranks, rank=r, world_size=2)
    with pytest.raises(MeasurementError, match="only per-rank.*world 2: ranks \\[0, 1\\].*measurements merge"):
        export_from_measurements(model_dir, ranks, tmp_path / "o")
    r = export(model_dir, ranks, tmp_path / "inc", format="inc")
    assert {f"measure/m_hooks_maxabs_{i}_2.{e}" for i in range(2) for e in ("json", "npz")} <= set(r.files())


# ----------------------------------------------------------------------------------------- inc
def _inc_folder(model_dir: Path, prefix: Path, out: Path, target: str = "cpu",
                scale_method: str = "maxabs_arbitrary") -> Path:
    return export_from_measurements(model_dir, prefix, out, target=target, format="inc",
                                    cfg={"scale_method": scale_method, "blocklist": NO_ATTENTION})


def test_inc_folder_layout_and_config_round_trip(calibrated, tmp_path) -> None:
    model_dir, prefix = calibrated
    out = _inc_folder(model_dir, prefix, tmp_path / "g2", target="gaudi2", scale_method="maxabs_hw")
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "quant_config.json", "quant_config_absolute.json",
                     "measure/fp8fx_hooks_maxabs.json", "measure/fp8fx_hooks_maxabs.npz",
                     "measure/fp8fx_hooks_maxabs_mod_list.json"}
    assert (out / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert (out / "measure/fp8fx_hooks_maxabs.npz").read_bytes() == inc.measurement_file_paths(prefix)[1].read_bytes()
    d = json.loads((out / "quant_config.json").read_text())
    assert d["mode"] == "QUANTIZE" and d["dump_stats_path"] == "./measure/fp8fx"
    assert d["device_for_scales"] == "GAUDI2" and d["scale_method"] == "maxabs_hw" and "target" not in d
    absolute = json.loads((out / "quant_config_absolute.json").read_text())
    assert absolute == dict(d, dump_stats_path=str(out.resolve() / "measure" / "fp8fx"))
    assert fp8fx.FP8Config.from_json_file(out / "quant_config.json").to_dict() == d   # read back unchanged
    # fp8fx converts the hp weights in OUT with the absolute config from any folder: Gaudi2 numerics
    cfg = fp8fx.FP8Config.from_json_file(out / "quant_config_absolute.json")
    model, _ = load_model(out)
    fp8fx.convert(model, cfg, example_inputs=(torch.arange(8).reshape(1, -1),))
    for mod in _fp8_linears(model).values():
        assert mod.fp8_max == 240.0 and float(mod.weight.float().abs().max()) <= 240.0
        assert {float(mod.input_scale), float(mod.weight_scale)} <= GAUDI2_SET


def test_inc_itself_reads_the_inc_folder(calibrated, tmp_path, monkeypatch) -> None:
    """INC's FP8Config + convert, run from OUT on OUT's hp model and quant_config.json, give the
    scales that fp8fx.convert derives from the same file (within INC's bf16 scales)."""
    inc_quant = pytest.importorskip("neural_compressor.torch.quantization",
                                    reason="neural-compressor-pt (INC) is not installed")
    from transformers import AutoModelForCausalLM

    model_dir, prefix = calibrated
    out = _inc_folder(model_dir, prefix, tmp_path / "cpu")   # INC on CPU: QDQ, no HW-aligned scales
    monkeypatch.chdir(out)
    inc_cfg = inc_quant.FP8Config.from_json_file("quant_config.json")
    assert inc_cfg.dump_stats_path == "./measure/fp8fx" and inc_cfg.mode == "QUANTIZE"
    inc_cfg.use_qdq, inc_cfg.json_file = True, None   # CPU needs QDQ; INC then re-serializes its config
    inc_model = inc_quant.convert(AutoModelForCausalLM.from_pretrained(".", dtype=torch.bfloat16).eval(), inc_cfg)
    ours = fp8fx.FP8Config.from_json_file("quant_config.json")
    assert ours.to_dict() == json.loads(Path("quant_config.json").read_text())
    ref = fp8fx.convert(AutoModelForCausalLM.from_pretrained(".", dtype=torch.bfloat16).eval(), ours,
                        example_inputs=(torch.arange(8).reshape(1, -1),))
    seen = {n: m._mod_extra_config.scale for n, m in inc_model.named_modules()
            if getattr(m, "_mod_extra_config", None) is not None}
    lin = _fp8_linears(ref)
    assert set(seen) == set(lin) and len(lin) == 14
    for name, mod in lin.items():
        assert math.isclose(float(seen[name].inputs[0]), float(mod.input_scale), rel_tol=2 ** -7), name
        assert math.isclose(float(seen[name].params["weight"]), float(mod.weight_scale), rel_tol=2 ** -7), name
    assert (out / "measure" / "fp8fx_hooks_maxabs_MAXABS_ARBITRARY.npz").is_file()   # INC's scale cache


def test_save_pretrained_inc(calibrated, tmp_path) -> None:
    model_dir, prefix = calibrated
    cfg = {"scale_method": "maxabs_arbitrary", "blocklist": NO_ATTENTION}
    model, tok, qcfg = convert_from_measurements(model_dir, prefix, target="gaudi3", cfg=cfg)
    out = save_pretrained(model, tmp_path / "saved", format="inc", tokenizer=tok)
    direct = _inc_folder(model_dir, prefix, tmp_path / "direct", target="gaudi3")
    for name in ("quant_config.json", "model.safetensors", "measure/fp8fx_hooks_maxabs.npz"):
        assert (out / name).read_bytes() == (direct / name).read_bytes(), name
    # the folder the model came from no longer holds its weights: refused, naming the tensor
    moved = tmp_path / "moved"
    shutil.copytree(model_dir, moved)
    other = build_tiny_hf_folder(tmp_path / "other", seed=3)
    shutil.copyfile(other / "model.safetensors", moved / "model.safetensors")
    model.name_or_path = str(moved)
    with pytest.raises(UnsupportedError, match="q_proj.weight does not quantize"):
        save_pretrained(model, tmp_path / "bad", format="inc")
    # a model quantized without measurement files
    dyn = fp8fx.quantize(load_model(model_dir)[0], "FP8_DYNAMIC",
                         example_inputs=(torch.arange(8).reshape(1, -1),))
    with pytest.raises(UnsupportedError, match="without measurement files \\(scheme 'FP8_DYNAMIC'\\).*compressed-tensors"):
        save_pretrained(dyn, tmp_path / "dyn", format="inc")
    with pytest.raises(UnsupportedError, match="not quantized by fp8fx"):
        save_pretrained(load_model(model_dir)[0], tmp_path / "hp", format="inc")
    assert not any((tmp_path / n).exists() for n in ("bad", "dyn", "hp"))


# ------------------------------------------------------------------------------------------ CLI
def test_cli_export(calibrated, tmp_path, capsys) -> None:
    model_dir, prefix = calibrated
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"scale_method": "maxabs_pow2", "blocklist": NO_ATTENTION}))
    argv = ["export", "--measurements", str(prefix), "--model", str(model_dir), "--target", "gaudi2",
            "--format", "inc", "--out", str(tmp_path / "out"), "--config", str(config)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "format inc, target gaudi2, 14 quantized Linear(s)" in text
    assert "quant_config.json" in text and "measure/fp8fx_hooks_maxabs.npz" in text
    d = json.loads((tmp_path / "out" / "quant_config.json").read_text())
    assert d["scale_method"] == "maxabs_pow2" and d["device_for_scales"] == "GAUDI2"
    assert cli.main(argv[:8] + ["vllm", "--out", str(tmp_path / "v")]) == 2
    assert "gaudi2" in capsys.readouterr().err and not (tmp_path / "v").exists()
    assert cli.main(["export", "--measurements", str(prefix), "--model", str(model_dir), "--out",
                     str(tmp_path / "ct"), "--max-shard-size", "20KB"]) == 0
    text = capsys.readouterr().out
    assert "format compressed-tensors, target cuda, 14 quantized Linear(s)" in text
    index = json.loads((tmp_path / "ct" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s in text and (tmp_path / "ct" / s).is_file() for s in shards)
