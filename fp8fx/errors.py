"""Exceptions raised by fp8fx.

Every fp8fx error says *what* went wrong, *where* (node name, module path, file, config key)
and *what to do*. User-facing checks raise these, never ``assert``.
"""

from __future__ import annotations


class Fp8fxError(Exception):
    """Base class of every error fp8fx raises on purpose."""


class ConfigError(Fp8fxError, ValueError):
    """An FP8Config key or value is unknown or invalid."""


class MeasurementError(Fp8fxError):
    """Measurements are missing, incomplete, corrupt or non-finite."""


class CaptureError(Fp8fxError):
    """The model could not be captured into one FX graph (graph break, unsupported input)."""


class QuantizationError(Fp8fxError):
    """A matched node cannot be quantized as configured (shape, dtype, missing scale)."""


class UnsupportedError(ConfigError, QuantizationError, NotImplementedError):
    """The config asks for something valid that this version of fp8fx cannot do yet (mode LOAD or
    SHAPE, dynamic quantization, an observer kind): refused instead of silently doing something
    else; the message says what to use instead.

    It is a ``NotImplementedError`` (a limitation, not bad input) and, so that callers written
    before it existed keep working, both a ``ConfigError`` and a ``QuantizationError`` (these
    refusals used to raise one or the other).
    """


class CheckpointError(Fp8fxError, ValueError):
    """A checkpoint (on disk or about to be written) that its consumer would load wrong; the
    message lists every problem found, each naming the tensor or config key."""

    def __init__(self, where: str, problems: list) -> None:
        self.where, self.problems = where, list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{where}: {len(self.problems)} problem(s) that would load wrong:\n{lines}")


__all__ = ["Fp8fxError", "ConfigError", "MeasurementError", "CaptureError", "QuantizationError",
           "UnsupportedError", "CheckpointError"]
