"""The FP8 formats: one table, imported wherever a format fact is needed.

Every fact about a format (torch dtype, field widths, exponent bias, largest finite value, the
byte codes that are NaN or inf, the smaller range Gaudi2 saturates E4M3 at) is written here
once; :mod:`fp8fx.numerics`, the kernels (:mod:`fp8fx.kernels`), the backends and the test
helpers read it from :data:`FORMATS`. ``tests/test_numerics.py`` checks every entry against
torch's own decoding of all 256 codes, so the table cannot drift from the dtypes it describes.

A byte is ``s.e...e.m...m``: a sign bit, ``exponent_bits`` exponent bits and
``mantissa_bits`` mantissa bits, its value ``(-1)^s * 2^(e - bias) * 1.m`` (subnormal when the
exponent field is 0: ``2^(1 - bias) * 0.m``).

======  =====  ======================  ==========================================  ===========
format  bias   largest finite          specials                                    Gaudi2 max
======  =====  ======================  ==========================================  ===========
E4M3fn  7      448 = 1.75 * 2^8        NaN 0x7F, 0xFF; no inf (``fn``: finite)      240
E5M2    15     57344 = 1.75 * 2^15     inf 0x7C, 0xFC; NaN 0x7D-0x7F, 0xFD-0xFF     57344
======  =====  ======================  ==========================================  ===========

Gaudi2 implements E4M3 with IEEE-style specials (the top exponent is reserved), so its E4M3
saturates at 1.875 * 2^7 = 240; Gaudi3, CPUs and GPUs use E4M3fn's 448. Everything else that
depends on the target (its hardware scale sets) lives in :mod:`fp8fx.numerics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FP8Format", "FORMATS", "FP8_DTYPES", "E4M3", "E5M2", "format_of"]

_MAGNITUDE = 0x7F  # the bits of a code below its sign bit


@dataclass(frozen=True)
class FP8Format:
    """One FP8 format; see the module docstring for the layout."""

    name: str  # "e4m3" | "e5m2": fp8fx's (and INC's, lower-cased) name of the format
    dtype: torch.dtype
    exponent_bits: int
    mantissa_bits: int
    bias: int  # exponent bias: a code's value is 2^(exponent field - bias) * 1.mantissa
    max: float  # largest finite value
    nan_codes: tuple[int, ...]  # byte codes that decode to NaN, ascending
    inf_codes: tuple[int, ...]  # byte codes that decode to +inf / -inf (none for E4M3fn)
    gaudi2_max: float  # the saturation of this format on Gaudi2

    @property
    def min_normal_exponent(self) -> int:
        """Exponent of the smallest normal value (``2 ** (1 - bias)``)."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """Exponent of the largest finite value's binade (``max = 1.m * 2 ** max_exponent``)."""
        return math.frexp(self.max)[1] - 1

    @property
    def smallest_normal(self) -> float:
        return 2.0 ** self.min_normal_exponent

    @property
    def has_inf(self) -> bool:
        return bool(self.inf_codes)

    @property
    def nan_magnitude(self) -> int:
        """The smallest magnitude (code without its sign bit) that is NaN; every larger one is."""
        return min(code & _MAGNITUDE for code in self.nan_codes)

    @property
    def inf_magnitude(self) -> int | None:
        """The magnitude of the inf codes (the exponent field all ones), or None."""
        return self.inf_codes[0] & _MAGNITUDE if self.inf_codes else None


E4M3 = FP8Format("e4m3", torch.float8_e4m3fn, exponent_bits=4, mantissa_bits=3, bias=7,
                 max=448.0, nan_codes=(0x7F, 0xFF), inf_codes=(), gaudi2_max=240.0)
E5M2 = FP8Format("e5m2", torch.float8_e5m2, exponent_bits=5, mantissa_bits=2, bias=15,
                 max=57344.0, nan_codes=(0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF),
                 inf_codes=(0x7C, 0xFC), gaudi2_max=57344.0)

FORMATS: dict[torch.dtype, FP8Format] = {f.dtype: f for f in (E4M3, E5M2)}
FP8_DTYPES: tuple[torch.dtype, ...] = tuple(FORMATS)


def format_of(key: object) -> FP8Format | None:
    """The format of a torch dtype or a name (``"e4m3"``, ``"E5M2"``, an enum whose value is
    one), or None when ``key`` names no FP8 format."""
    if isinstance(key, torch.dtype):
        return FORMATS.get(key)
    name = str(getattr(key, "value", key)).lower()
    return next((f for f in FORMATS.values() if f.name == name), None)
