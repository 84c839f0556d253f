"""fp8fx: quantize PyTorch models to FP8 with graph passes.

Walkthrough (INC's workflow, INC's files)::

    import fp8fx
    cfg = fp8fx.FP8Config(mode="MEASURE", dump_stats_path="./stats/measure",
                          blocklist={"names": ["lm_head"]})
    model = fp8fx.prepare(model, cfg)          # graph captured on the first call
    for batch in calibration:
        model(**batch)                         # observer nodes record max |x|
    fp8fx.finalize_calibration(model)          # ./stats/measure_hooks_maxabs.json/.npz
    qmodel = fp8fx.convert(model)              # FP8 Linears; same model object

    # in another process: QUANTIZE config (or QUANT_CONFIG=quant.json), files read back
    qmodel = fp8fx.convert(model, fp8fx.FP8Config.from_json_file("quant.json"))
    print(fp8fx.explain(model, cfg, example_inputs=ids))   # what is quantized, and why

    # what each node costs, and a blocklist that keeps validation perplexity within 1%
    print(fp8fx.sensitivity(model, calibration_ids))        # hp model; it is copied, not changed
    found = fp8fx.auto_blocklist(model, calibration_ids, validation_ids, 1.0, cfg)
    qmodel = fp8fx.convert(model, found.apply(quantize_cfg))

The returned model keeps its Python interface (``generate``, ``config``, output types) and
runs any batch size and sequence length. See docs/ for the design and the file formats.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names -> the module that defines them. Imported on first use (PEP 562), so that
# ``import fp8fx`` stays cheap and each submodule can be used on its own.
_EXPORTS = {
    "FP8Config": "config", "Mode": "config", "Fp8Format": "config", "ScaleMethod": "config",
    "Target": "config",
    "prepare": "api", "finalize_calibration": "api", "convert": "api", "explain": "api",
    "report": "api", "Explanation": "api", "fp8_kv_cache": "api", "quantize": "api",
    "Scheme": "schemes", "LinearScheme": "schemes",
    "Fp8Linear": "modules", "Fp8Experts": "modules",
    "auto_blocklist": "sensitivity",
    "save_pretrained": "export", "load_pretrained": "export", "check_checkpoint": "export",
    "quantize_checkpoint": "export", "export_from_measurements": "export",
    "Fp8fxError": "errors", "ConfigError": "errors", "MeasurementError": "errors",
    "CaptureError": "errors", "QuantizationError": "errors", "UnsupportedError": "errors",
    "CheckpointError": "errors",
}

__all__ = [*_EXPORTS, "sensitivity", "__version__"]

# Submodules reachable as attributes (``fp8fx.testing``), imported on first use as well.
# ``fp8fx.sensitivity`` is the submodule, and calling it calls ``fp8fx.sensitivity.sensitivity``
# (the module object is callable), so it means the same whichever way it was first imported.
_SUBMODULES = ("testing", "sensitivity")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fp8fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *_SUBMODULES})
