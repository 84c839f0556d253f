"""Kernels of ``fp8fx::linear``: the reference (its definition) and the fast CPU kernel.

``linear(x, w, w_scale, x_scale, bias, fp8_max)`` (op semantics: :mod:`fp8fx.ops`) quantizes
``x`` to ``w.dtype`` saturating at ``±fp8_max`` and computes
``y = (q_x @ q_wᵀ) * x_scale * w_scale + bias`` in float32, returned in ``x.dtype``.

Reference and fast kernel
-------------------------
:func:`linear_reference` is the definition: ``q_x`` by :func:`fp8fx.numerics.quantize_fp32` (a
float32 division, clamp and round-to-nearest-even cast), a float32 ``matmul`` of ``q_x.float()``
and ``w.float()``, then the float32 epilogue. :func:`linear_fast` (the op's CPU kernel) computes
the same quantities without torch's FP8 casts, which are slow on CPU (an order of magnitude
more than an integer pass over the same bytes; figures in ``benchmarks/README.md``):

* **Weight**: the FP8 bytes become float16 bit patterns by integer ops, and F16C converts
  those to float32. E5M2 is the top byte of a float16 (``code << 8``: zeros, subnormals, inf
  and NaN included). E4M3 ``s.eeee.mmm`` becomes ``s.0eeee.mmm0000000``
  (``(int16(int8(code)) << 7) & 0xBF80``), the float16 whose value is the E4M3 value times
  ``2**-8``, subnormal codes included; the ``2**8`` goes into the epilogue's scale (exact, a
  power of two). Shift, mask and factor follow from the format table (:mod:`fp8fx.fp8`:
  mantissa bits and bias against float16's 10 and 15). Only float16 -> float32 conversion
  touches subnormals, and it is exact whatever the denormal mode
  (``torch.set_flush_denormal(True)`` or a library built with ``-ffast-math`` would make the
  shorter bfloat16 bit trick flush E4M3's subnormal codes to 0). E4M3's NaN codes
  (``0x7F``/``0xFF``) would come out as ``±480``: two byte reductions per weight (``int8``
  max == 127, ``uint8`` max == 255, remembered until the weight changes) find them, and the
  output columns of rows holding one become NaN, which is what the reference gives
  (``NaN * q = NaN`` for every ``q``).
* **Activation**: the float32 ``x / s_x``, clamped, is rounded to the FP8 grid in float32
  without an FP8 tensor: adding and subtracting ``C = 1.5 * 2**23 * quantum`` rounds to the
  quantum (round to nearest even, in hardware), where the quantum is ``2**(e - mantissa
  bits)`` from the value's exponent ``e`` (integer ops on its bits), floored at the subnormal
  quantum; ``C`` takes the value's sign, so ``|v|`` rounds the same way for both signs, and a
  last ``copysign`` keeps the sign of values that round to zero. Exact for every float32
  (tests sweep all FP8 midpoints and hypothesis draws floats); used from
  ``_FAST_QUANT_MIN_NUMEL`` elements on, in row blocks; below that the two native casts are
  cheaper than the eight ops.
* **Few rows** (decode, decode with a batch): up to ``_GEMV_MAX_M`` rows, ``q_x`` in float32
  goes to
  :func:`fp8fx.kernels.gemv.gemv_fp8`, a C++ kernel that converts the FP8 bytes in registers
  as it streams them (float32 accumulation, NaN codes' columns NaN), then the float32
  epilogue: the reference's numerics up to summation order, reading one byte per weight.
  Where that kernel is not built (no compiler, no AVX2, ``FP8FX_CPP_KERNELS=0``) the blocks
  below do the same product (:func:`gemv_rows` decides).
* **GEMM**: the weight is converted in row blocks of ``_BLOCK_ELEMS`` elements (at least
  ``_MIN_GEMM_ROWS`` rows when ``x`` has that many, for the GEMM's sake), each handed to the
  GEMM while it is in cache, and the epilogue writes those columns of ``y``: no weight-sized
  temporary (fresh buffers of tens of MB come from ``mmap`` and page-fault on every call).
  Up to ``_EXACT_MAX_M`` rows (decode), float32 ``x``, or a CPU without bfloat16 instructions:
  float32 GEMM, the reference's numerics except the summation order inside the GEMM. More
  rows of bfloat16 ``x`` on a CPU with AVX512-BF16 or AMX: the converted block and ``q_x``
  (both exact in bfloat16) go to a bfloat16 GEMM (float32 accumulation) whose output is
  rounded to bfloat16 before the float32 epilogue: one extra rounding, at most half a
  bfloat16 ulp of ``q_x @ q_wᵀ * s_x * s_w`` before the bias is added, the same numerics as
  the Inductor lowering's bfloat16 GEMM. ``_EXACT_MAX_M`` is where the bfloat16 GEMM starts
  to win (measured: ``benchmarks/README.md``).

Above the few-row path the kernel stays slower than a bfloat16 ``F.linear`` because every
call converts the whole weight. :func:`cpu_has_bf16` follows ATen's CPU capability and
oneDNN's ISA cap, so ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` makes an AVX512 CPU
take the paths of an AVX2 one (float32 GEMMs); figures per CPU class in
``benchmarks/README.md``.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import QuantizationError
from ..fp8 import E4M3, FORMATS, FP8Format
from ..numerics import quantize_fp32

__all__ = ["check_fp8_weight", "quantize_activation", "linear_reference", "fp8_to_half_bits",
           "has_nan_codes", "fp8_to_float32", "quantize_activation_fast", "linear_fast",
           "cpu_has_bf16", "gemv_rows"]

_BLOCK_ELEMS = 1 << 20  # weight elements converted per block: 2 MiB int16 + 4 MiB float32
_EXACT_MAX_M = 4  # rows up to which bfloat16 x still takes the exact float32 GEMM
_GEMV_MAX_M = 16  # rows up to which the C++ GEMV beats block conversion + a GEMM
_MIN_GEMM_ROWS = 256  # weight rows per block at least, for x with at least as many rows
_FAST_QUANT_MIN_NUMEL = 1 << 14  # activations this large round by float ops, not casts


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def check_fp8_weight(weight: Tensor) -> None:
    """Raise ``QuantizationError`` unless ``weight`` has an FP8 dtype of the format table."""
    if weight.dtype not in FORMATS:
        raise QuantizationError(
            f"fp8fx::linear got a {weight.dtype} weight; it needs float8_e4m3fn or float8_e5m2. "
            "The FP8 weight was replaced after convert (e.g. model.tie_weights() re-tied it to an "
            "embedding, or it was cast); convert again from the high-precision model")


#: ``saturate(x / scale)`` cast to ``fp8_dtype``, computed in float32: the ops' activation
#: quantization, :func:`fp8fx.numerics.quantize_fp32` itself.
quantize_activation = quantize_fp32


def linear_reference(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Tensor,
                     bias: Optional[Tensor], fp8_max: float) -> Tensor:
    """The definition of ``fp8fx::linear``: FP8 operands, float32 GEMM and epilogue."""
    check_fp8_weight(weight)
    qx = quantize_activation(x, input_scale, weight.dtype, fp8_max)
    y = torch.matmul(qx.float(), weight.float().t())
    y = y * (input_scale * weight_scale)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Fast conversions (pure tensor functions)
# --------------------------------------------------------------------------------------------

_MAGNITUDE = 0x7F  # a code's bits below the sign bit
_HALF_MANTISSA_BITS, _HALF_BIAS, _HALF_EXPONENT_BITS = 10, 15, 5
_EXP_BITS = 0x7F800000  # float32's exponent field


def _half_layout(fmt: FP8Format) -> tuple[int, Optional[int], float]:
    """``(shift, int16 mask or None, factor)``: ``int16(int8(code)) << shift`` (``& mask``) is a
    float16 whose value times ``factor`` is the code's value (module docstring)."""
    shift = _HALF_MANTISSA_BITS - fmt.mantissa_bits
    mask = None
    if fmt.exponent_bits < _HALF_EXPONENT_BITS:  # clear the sign copies in the exponent's top
        mask = (0x8000 | (_MAGNITUDE << shift)) - 0x10000  # as an int16 (E4M3: 0xBF80)
    return shift, mask, 2.0 ** (_HALF_BIAS - fmt.bias)


_TO_HALF = {dtype: _half_layout(fmt) for dtype, fmt in FORMATS.items()}


def fp8_to_half_bits(weight: Tensor, out: Optional[Tensor] = None) -> tuple[Tensor, float]:
    """``(h, factor)``: a float16 view ``h`` with ``h * factor == weight`` (exactly).

    Integer ops only (module docstring). E4M3's NaN codes give ``±1.875`` (``±480 / factor``);
    every other code, and every E5M2 code, is exact. ``out`` is an optional int16 buffer of
    ``weight``'s shape.
    """
    shift, mask, factor = _TO_HALF[weight.dtype]
    bits = out if out is not None else torch.empty(weight.shape, dtype=torch.int16,
                                                    device=weight.device)
    bits.copy_(weight.view(torch.int8))  # sign-extends: the sign lands in bit 15 after the shift
    bits.bitwise_left_shift_(shift)
    if mask is not None:
        bits.bitwise_and_(mask)
    return bits.view(torch.float16), factor


# weight -> (its _version when scanned, whether it holds a NaN code): a weight is read once for
# this, not on every call (identity keys: tensors compare elementwise)
_NAN_SCANS: WeakIdKeyDictionary = WeakIdKeyDictionary()
# E4M3's two NaN codes are the largest int8 (0x7F) and the largest uint8 (0xFF)
_E4M3_NAN_INT8, _E4M3_NAN_UINT8 = E4M3.nan_codes


def has_nan_codes(weight: Tensor) -> bool:
    """Whether an E4M3 ``weight`` holds a NaN code (``0x7F`` is int8's max, ``0xFF`` uint8's).
    Remembered per weight tensor until it changes in place (its version counter moves)."""
    if weight.dtype != E4M3.dtype or weight.numel() == 0:
        return False
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor has no version counter: scan it every time
        version = None
    seen = _NAN_SCANS.get(weight) if version is not None else None
    if seen is not None and seen[0] == version:
        return seen[1]
    found = (bool(weight.view(torch.int8).amax() == _E4M3_NAN_INT8)
             or bool(weight.view(torch.uint8).amax() == _E4M3_NAN_UINT8))
    if version is not None:
        _NAN_SCANS[weight] = (version, found)
    return found


def _nan_code_mask(weight: Tensor) -> Tensor:
    """Elementwise bool: the codes of an E4M3 weight that are NaN."""
    return (weight.view(torch.uint8) & _MAGNITUDE).eq(E4M3.nan_magnitude)


def _nan_code_rows(weight: Tensor) -> Tensor:
    """``[out]`` bool: rows of an E4M3 weight that hold a NaN code."""
    return _nan_code_mask(weight).any(dim=-1)


def fp8_to_float32(weight: Tensor) -> Tensor:
    """``weight.to(torch.float32)`` by integer ops and float16 -> float32: exact, NaN codes NaN."""
    check_fp8_weight(weight)
    half, factor = fp8_to_half_bits(weight)
    out = half.to(torch.float32)
    if factor != 1.0:
        out.mul_(factor)
    if has_nan_codes(weight):
        out.masked_fill_(_nan_code_mask(weight), float("nan"))
    return out


def quantize_activation_fast(x: Tensor, scale: Tensor, fp8_dtype: torch.dtype,
                             fp8_max: float) -> Tensor:
    """Float32 tensor of the values of ``quantize_activation(x, scale, ...)``, without casts.

    Needs ``fp8_max`` <= the format's largest finite value (the clamp then keeps every value on
    the grid's finite part); module docstring for the rounding. Two fresh buffers, the rest in
    place (fresh tensors of tens of MB page-fault on every call).
    """
    fmt = FORMATS[fp8_dtype]
    emin, emax = fmt.min_normal_exponent, fmt.max_exponent
    if x.dtype == torch.float32:
        v = x / scale
    else:
        v = x.float().div_(scale)
    v.clamp_(-fp8_max, fp8_max)
    c = torch.bitwise_and(v.view(torch.int32), _EXP_BITS)  # 2**floor(log2|v|) as bits
    # the quantum's exponent (NaN's all-ones exponent is clamped too: NaN + C stays NaN)
    c.clamp_((127 + emin) << 23, (127 + emax) << 23)
    c.add_(((23 - fmt.mantissa_bits) << 23) | 0x400000)  # C = 1.5 * 2**23 * quantum
    c = c.view(torch.float32).copysign_(v)  # ±C: v + C rounds |v| symmetrically
    return v.add_(c).sub_(c).copysign_(c)  # the sign also for values that round to zero


# --------------------------------------------------------------------------------------------
# Fast kernel
# --------------------------------------------------------------------------------------------


# oneDNN's ISA names up to AVX512 without BF16 (``ONEDNN_MAX_CPU_ISA``, documented by oneDNN):
# with one of these, its bfloat16 GEMM has no bfloat16 instructions to use
_ONEDNN_ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2",
                                       "AVX512_CORE", "AVX512_CORE_VNNI"})


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether bfloat16 GEMMs run on bfloat16 instructions here (AVX512-BF16 or AMX): the CPU
    has them, ATen's CPU capability is AVX512 (``ATEN_CPU_CAPABILITY=avx2`` caps it) and
    ``ONEDNN_MAX_CPU_ISA`` does not cap oneDNN below AVX512-BF16."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if not any(bool(getattr(cpu, name, lambda: False)()) for name in probes):
        return False
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() not in _ONEDNN_ISAS_WITHOUT_BF16


def gemv_rows(m: int) -> bool:
    """Whether ``m`` activation rows take :func:`fp8fx.kernels.gemv.gemv_fp8` (where its C++
    kernel is built) instead of block conversion + a GEMM: up to ``_GEMV_MAX_M`` rows, where
    it beat both the float32 and the bfloat16 GEMM path (``benchmarks/README.md``)."""
    from . import gemv

    return 0 < m <= _GEMV_MAX_M and gemv.available()


def _quantized_x(x2d: Tensor, input_scale: Tensor, fp8_dtype: torch.dtype, fp8_max: float,
                 dtype: torch.dtype) -> Tensor:
    """The FP8 values of ``q_x`` in ``dtype`` (float32 or bfloat16: exact either way), large
    activations in row blocks whose temporaries stay in cache."""
    m, k = x2d.shape
    if x2d.numel() < _FAST_QUANT_MIN_NUMEL:
        return quantize_activation(x2d, input_scale, fp8_dtype, fp8_max).to(dtype)
    out = torch.empty((m, k), dtype=dtype, device=x2d.device)
    rows = max(1, _BLOCK_ELEMS // (4 * k))
    for r0 in range(0, m, rows):
        out[r0:r0 + rows] = quantize_activation_fast(x2d[r0:r0 + rows], input_scale, fp8_dtype,
                                                     fp8_max)
    return out


def _convert_blocks(weight: Tensor, rows: int):
    """Yield ``(r0, r1, w32)``: rows ``r0:r1`` of ``weight / factor`` in float32, converted block
    by block into two reused buffers (an int16 and a float32 block that stay in cache)."""
    n, k = weight.shape
    bits = torch.empty((min(rows, n), k), dtype=torch.int16, device=weight.device)
    block = torch.empty((min(rows, n), k), dtype=torch.float32, device=weight.device)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        half, _ = fp8_to_half_bits(weight[r0:r1], bits[: r1 - r0])
        w32 = block[: r1 - r0]
        w32.copy_(half)
        yield r0, r1, w32


def linear_fast(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Tensor,
                bias: Optional[Tensor], fp8_max: float) -> Tensor:
    """The CPU kernel of ``fp8fx::linear`` (module docstring): the reference's numerics up to
    GEMM summation order, or one extra bfloat16 rounding for bfloat16 ``x`` with ``M`` rows
    above ``_EXACT_MAX_M`` on a bfloat16-capable CPU.

    Block by block: convert rows ``r0:r1`` of the weight, GEMM, epilogue (``* s_x * s_w``,
    ``+ bias``, cast) into those columns of ``y``; the only large fresh tensors are ``q_x``
    and ``y`` (fresh tensors of tens of MB page-fault on every call).
    """
    check_fp8_weight(weight)
    n, k = weight.shape
    fp8_dtype = weight.dtype
    if (x.device.type != "cpu" or x.numel() == 0 or n == 0
            or fp8_max > FORMATS[fp8_dtype].max or x.shape[-1] != k):
        return linear_reference(x, weight, weight_scale, input_scale, bias, fp8_max)
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    use_gemv = gemv_rows(m)
    if use_gemv and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        from .gemv import QGEMV_MODES, qgemv_op  # quantization, GEMV and epilogue in one call

        y = qgemv_op()(x2d, weight, weight_scale, input_scale, bias, fp8_max, QGEMV_MODES["static"], 0.0)
        return y.reshape(*x.shape[:-1], n)
    gemm_dtype = (torch.bfloat16 if not use_gemv and x.dtype == torch.bfloat16
                  and m > _EXACT_MAX_M and cpu_has_bf16() else torch.float32)
    qx = _quantized_x(x2d, input_scale, fp8_dtype, fp8_max, gemm_dtype)
    weight = weight.contiguous()
    if use_gemv:  # few rows: stream the FP8 bytes (NaN codes handled there)
        from .gemv import gemv_fp8

        acc = gemv_fp8(qx, weight).mul_(input_scale * weight_scale)
        if bias is not None:
            acc.add_(bias.float())
        return acc.to(x.dtype).reshape(*x.shape[:-1], n)
    scale = (input_scale * weight_scale) * _TO_HALF[fp8_dtype][2]  # a power of two: exact
    per_channel = scale.dim() > 0
    bias32 = None if bias is None else bias.float()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    rows = max(1, _BLOCK_ELEMS // k)
    if m >= _MIN_GEMM_ROWS:  # the GEMM dominates: blocks wide enough for it to run well
        rows = max(rows, _MIN_GEMM_ROWS)
    block16 = (torch.empty((min(rows, n), k), dtype=gemm_dtype, device=x.device)
               if gemm_dtype != torch.float32 else None)
    for r0, r1, w32 in _convert_blocks(weight, rows):
        rhs = w32
        if block16 is not None:  # float16 -> bfloat16 has no vectorized path: via float32
            rhs = block16[: r1 - r0]
            rhs.copy_(w32)
        acc = torch.mm(qx, rhs.t())
        if acc.dtype != torch.float32:
            acc = acc.float()
        acc.mul_(scale[r0:r1] if per_channel else scale)
        if bias32 is not None:
            acc.add_(bias32[r0:r1])
        y[:, r0:r1] = acc
    if has_nan_codes(weight):
        y.masked_fill_(_nan_code_rows(weight), float("nan"))
    return y.reshape(*x.shape[:-1], n)
