"""Save and load FP8 checkpoints that serving engines and transformers read.

::

    qmodel = fp8fx.quantize(model, "FP8_DYNAMIC")
    fp8fx.save_pretrained(qmodel, "out", format="compressed-tensors", tokenizer=tok)
    report = fp8fx.check_checkpoint("out")       # also: fp8fx check out
    again = fp8fx.load_pretrained("out")         # Fp8Linear modules, FP8 weights in memory
    fp8fx.save_pretrained(again, "out-vllm", format="vllm")   # when the scheme fits that format

Formats (one module each, with its layout and the consumer source it follows in its docstring):
:mod:`.compressed_tensors` (llm-compressor's; vLLM and transformers read it) and :mod:`.vllm`
(vLLM's / AutoFP8's ``"fp8"``). :mod:`.plan` describes a quantized model independently of the
format, :mod:`.checks` reads checkpoints and holds the shared checks, :mod:`.core` saves and
validates, :mod:`.loader` loads, :mod:`.writer` shards and replaces folders atomically, and
:mod:`.streaming` quantizes a checkpoint on disk shard by shard (docs/streaming.md).
:mod:`.targets` writes a checkpoint for any target from one calibration's measurement files;
:mod:`.inc_format` writes INC's ``inc`` folder (QUANT_CONFIG plus measurements).
docs/export.md has the formats x schemes x consumers table.
"""

from __future__ import annotations

from .checks import CheckpointError, Problem
from .core import FORMATS, Report, check_checkpoint, save_pretrained, validate
from .loader import load_pretrained
from .streaming import StreamResult, quantize_checkpoint
from .targets import export_from_measurements

__all__ = ["save_pretrained", "load_pretrained", "check_checkpoint", "validate", "CheckpointError", "Problem",
           "Report", "FORMATS", "quantize_checkpoint", "StreamResult", "export_from_measurements"]
