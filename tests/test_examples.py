"""The examples run as documented."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_custom_model_example(capsys):
    runpy.run_path(str(EXAMPLES / "custom_model.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "measure_hooks_maxabs.npz" in out
    assert "quantized: {'linear': 2}" in out
    sqnr = float(out.split("SQNR vs fp32: ")[1].split(" dB")[0])
    assert sqnr > 25
