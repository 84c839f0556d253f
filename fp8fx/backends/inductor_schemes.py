"""Lower ``fp8fx::scaled_linear`` (and the schemes' MoE GEMMs) to Inductor.

The decomposition writes the op's definition (:mod:`fp8fx.kernels.schemes`) in aten ops that
Inductor fuses: the dynamic scale (an ``amax`` reduction per tensor, row or group), the
quantization (one pointwise kernel), the weight conversion by integer ops (never an FP8 cast;
:func:`fp8fx.backends.inductor._fp8_to_float32`) and the GEMM, with the scales that factor out
of the GEMM in the epilogue. The GEMM takes the same forms as ``fp8fx::linear``'s lowering:

* CPU, per-tensor/per-channel weights: ``fp8fx::linear``'s forms, the scales in the epilogue:
  for a few static rows (decode) one call of the C++ kernel of :mod:`fp8fx.kernels.gemv`
  (``qgemv``: quantization, GEMV and epilogue), which streams the FP8 bytes on AVX2 and AVX512
  alike (group activations: the GEMV on the quantized activation); more rows, the weight
  converted into row groups (the C++ conversion op where built), each multiplied as soon as it
  is converted (no weight-sized temporary), in bfloat16 where both operands are exact in it.
* CPU, block weights: one row, ``(q_x * w).sum(-1)``, a reduction that reads the FP8 bytes
  once with the block scales multiplying the converted weight inside it (group scales
  multiply the quantized activation, computed once, ``_materialized``); more rows, float32 row
  groups of whole tiles.
* CUDA (compute capability 8.9+, E4M3, ``K, N % 16 == 0``): per-token x per-channel scales go
  to ``torch._scaled_mm``'s row-wise form (``scale_a [M, 1]``, ``scale_b [1, N]``, bfloat16
  output, which that form requires; float32 and float16 models take the dequantized ``mm``);
  per-tensor dynamic scales to its tensor-wise form. FP8_BLOCK's exact layout (1x128 groups,
  128x128 tiles, E4M3, bfloat16 model, ``N % 128 == 0``, ``K % 512 == 0``) on sm90 goes to its
  block-wise form (:func:`_cuda_block_gemm`: ``scale_a [M, K/128]`` outer-dim-major,
  ``scale_b`` the transposed view of the stored ``[N/128, K/128]`` scale); torch 2.11 and 2.13
  pick that recipe from the scales' shapes and strides in ``_scaled_mm``, and cuBLAS on
  Blackwell takes no 2-D block scales, so other GPUs, block sizes and shapes, and group-only
  activations take the float32 dequantize-and-``mm`` path, which Inductor compiles to Triton
  kernels and cuBLAS. These paths are checked with fake CUDA tensors on CPU
  (``tests/test_cuda_paths.py``, which also holds the GPU tests that ``benchmarks/gpu.sh`` runs).
  On a CPU-only torch build, fake CUDA tensors cannot be sliced or made contiguous through the
  Python methods under ``make_fx``, so this file uses ``narrow`` / ``reshape`` /
  ``clone(memory_format=...)``, which trace the same aten ops.

Numerics: the activation is quantized exactly as the reference does; products differ from the
reference by float32 summation order and by where a scale is multiplied (before or after the
GEMM), both far below the FP8 rounding.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fp8fx import ops  # noqa: F401  (registers torch.ops.fp8fx.scaled_linear)
from fp8fx.errors import QuantizationError
from fp8fx.kernels.schemes import activation_scale, check_scaled_linear, dynamic_scale, expand_group_scale
from fp8fx.numerics import expand_block_scale, quantize_fp32

from fp8fx.kernels.linear import cpu_has_bf16

from .inductor import (_GROUP_ELEMS, _MIN_CUDA_CAPABILITY, _SCALED_MM_ALIGNMENT, _cpu_dequant_mm, _cpu_gemv, _cpu_qgemv,
                       _cpu_codes, _epilogue, _fp8_to_float32, _is_one, _materialized, _reduction_parts)

__all__ = ["register_scheme_lowerings", "decompose_scaled_linear"]


def _activation(x2d: Tensor, input_scale: Optional[Tensor], activations: str, group_size: int,
                fp8_max: float, fp8_dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """``(a, row_scale)``: ``a`` float32 ``[M, K]`` (``q_x``, or ``q_x * s`` for group scales, or
    ``x`` itself for weight-only) and the ``[1, 1]``/``[M, 1]`` scale left for the epilogue."""
    if activations == "none":
        return x2d.to(torch.float32), None
    s = activation_scale(x2d, input_scale, activations, group_size, fp8_max)
    q = _cpu_codes(x2d, s, fp8_dtype, fp8_max) if activations != "group" else None
    if q is None:
        q = quantize_fp32(x2d, s, fp8_dtype, fp8_max).to(torch.float32)
    return (q * s, None) if activations == "group" else (q, s)


def _weight32(weight: Tensor, weight_scale: Tensor, block_n: int, block_k: int) -> tuple[Tensor, Optional[Tensor]]:
    """``(w, col_scale)``: the float32 weight (times its block scales) and the 0-d/``[N]`` scale
    left for the epilogue."""
    w = _fp8_to_float32(weight)
    if block_n <= 0:
        return w, weight_scale.to(torch.float32)
    return w * expand_block_scale(weight_scale.to(torch.float32), tuple(weight.shape), (block_n, block_k)), None


def _cpu_gemm(a: Tensor, weight: Tensor, weight_scale: Tensor, block_n: int, block_k: int,
              gemm_dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """``(acc, col_scale)`` on the CPU: per-tensor/per-channel weights take ``fp8fx::linear``'s
    GEMM forms (the C++ GEMV for a few static rows, else the converted row groups in
    ``gemm_dtype``); block weights, whose scales multiply the converted weight, the reduction
    (one row) or float32 row groups."""
    n, k = weight.shape
    if block_n <= 0:
        acc = _cpu_gemv(a, weight)
        if acc is None and not _is_one(a.shape[0]):
            acc = _cpu_dequant_mm(a, weight, gemm_dtype)
        if acc is not None:
            return acc, weight_scale.to(torch.float32)
    if _is_one(a.shape[0]):
        a32 = _materialized(a)
        w, col = _weight32(weight, weight_scale, block_n, block_k)
        parts = _reduction_parts(k)
        acc = (a32.reshape(1, parts, k // parts) * w.reshape(n, parts, -1)).sum(dim=-1).sum(dim=-1).unsqueeze(0)
        return acc, col
    static = isinstance(n, int) and isinstance(k, int)
    groups = max(1, -(-n * k // _GROUP_ELEMS)) if static else 1
    rows = -(-n // groups)
    rows = -(-rows // block_n) * block_n  # whole tiles per group
    out, col = [], None
    for r0 in range(0, n, rows):
        ws = weight_scale[r0 // block_n:(r0 + rows) // block_n]
        w, col = _weight32(weight[r0:r0 + rows], ws, block_n, block_k)
        out.append(torch.mm(a, _materialized(w).t()))
    return (out[0] if len(out) == 1 else torch.cat(out, dim=1)), col


def _cuda_gemm(a_q: Tensor, row_scale: Optional[Tensor], weight: Tensor, weight_scale: Tensor, block_n: int,
               out_dtype: torch.dtype) -> Optional[Tensor]:
    """``torch._scaled_mm`` where one of its forms computes the op; None where none does."""
    n, k = weight.shape
    if (row_scale is None or block_n > 0 or weight.dtype != torch.float8_e4m3fn
            or k % _SCALED_MM_ALIGNMENT or n % _SCALED_MM_ALIGNMENT):
        return None
    q = a_q.to(weight.dtype)  # exact: a_q holds FP8 values
    wt = weight.contiguous().t()
    if row_scale.numel() == 1 and weight_scale.numel() == 1:
        acc = torch._scaled_mm(q, wt, scale_a=row_scale.reshape(()), scale_b=weight_scale.reshape(()),
                               out_dtype=torch.float32)
        return acc
    if out_dtype != torch.bfloat16:
        return None
    scale_a = row_scale.expand(q.shape[0], 1).clone(memory_format=torch.contiguous_format)
    scale_b = weight_scale.to(torch.float32).reshape(-1).expand(n).reshape(1, n).clone(memory_format=torch.contiguous_format)
    return torch._scaled_mm(q, wt, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)


#: the one block layout ``torch._scaled_mm`` takes: 1x128 activation groups x 128x128 weight tiles
_CUDA_BLOCK = 128
#: compute capability of the block-scaled cuBLASLt GEMM (Hopper); Blackwell's cuBLAS takes no 2-D
#: block scales, so other GPUs dequantize
_CUDA_BLOCK_CAPABILITY = (9, 0)


def _cuda_block_gemm(x2d: Tensor, weight: Tensor, weight_scale: Tensor, fp8_max: float, activations: str,
                     group_size: int, block_n: int, block_k: int, out_dtype: torch.dtype,
                     capability: tuple[int, int]) -> Optional[Tensor]:
    """FP8_BLOCK (1x128 groups x 128x128 tiles) through ``torch._scaled_mm``'s block-wise form on
    sm90; None where that form does not apply (the caller dequantizes then).

    ``_scaled_mm(a [M, K], b [K, N] column-major, scale_a, scale_b)`` picks the block recipe from
    the scales' shapes and strides (``aten/src/ATen/native/cuda/Blas.cpp``, ``get_joint_scaling``):
    ``scale_a`` ``[M, K/128]`` float32 outer-dim-major (strides ``(1, M)``), and ``scale_b.t()``
    ``[N/128, K/128]`` row-major, which is the weight scale as stored (``scale_b`` is its
    transposed view). Some releases want that row stride rounded up to a multiple of 4, so
    ``K/128 % 4 == 0`` is required here (both layouts agree then). bfloat16 output only (the
    row-wise rule; cuBLASLt's block-scaled GEMM rounds its float32 sum to the output dtype).
    """
    n, k = weight.shape
    kb = k // _CUDA_BLOCK if isinstance(k, int) else 0
    if (capability != _CUDA_BLOCK_CAPABILITY or activations != "group" or group_size != _CUDA_BLOCK
            or (block_n, block_k) != (_CUDA_BLOCK, _CUDA_BLOCK) or weight.dtype != torch.float8_e4m3fn
            or out_dtype != torch.bfloat16 or not isinstance(n, int) or n % _CUDA_BLOCK
            or k % _CUDA_BLOCK or kb % 4):
        return None
    m = x2d.shape[0]
    g = dynamic_scale(x2d, "group", _CUDA_BLOCK, fp8_max)  # [M, K/128]
    full = expand_group_scale(g, k, _CUDA_BLOCK)
    q = quantize_fp32(x2d, full, weight.dtype, fp8_max)
    scale_a = g.t().clone(memory_format=torch.contiguous_format).t()  # outer-dim-major: strides (1, M)
    scale_b = weight_scale.to(torch.float32).contiguous().t()  # [K/128, N/128]; .t() is [N/128, K/128] row-major
    return torch._scaled_mm(q, weight.contiguous().t(), scale_a=scale_a, scale_b=scale_b,
                            out_dtype=torch.bfloat16)


def decompose_scaled_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Optional[Tensor],
                            bias: Optional[Tensor], fp8_max: float, activations: str, group_size: int,
                            block_n: int, block_k: int) -> Tensor:
    """``fp8fx::scaled_linear`` in aten ops (module docstring)."""
    check_scaled_linear(x, weight, weight_scale, input_scale, activations, group_size, block_n, block_k)
    n, k = weight.shape
    x2d = x.reshape(-1, k)
    if x.device.type == "cpu" and block_n <= 0:
        fused = _cpu_qgemv(x2d, weight, weight_scale, input_scale, bias, fp8_max, activations)
        if fused is not None:
            return fused.reshape(*x.shape[:-1], n)
    a, row_scale = _activation(x2d, input_scale, activations, group_size, fp8_max, weight.dtype)
    if x.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(x.device)
        if (major, minor) < _MIN_CUDA_CAPABILITY and activations != "none":
            raise QuantizationError(
                f"fp8fx::scaled_linear cannot run on {x.device} (compute capability {major}.{minor}): FP8 GEMMs "
                "need compute capability 8.9 or newer; run the converted model on such a GPU or on CPU")
        acc = _cuda_block_gemm(x2d, weight, weight_scale, fp8_max, activations, group_size, block_n, block_k,
                               x.dtype, (major, minor))
        if acc is None and activations != "none":
            acc = _cuda_gemm(a, row_scale, weight, weight_scale, block_n, x.dtype)
        if acc is not None:  # both of _scaled_mm's forms apply the scales
            return _epilogue(acc, None, bias, x.dtype).reshape(*x.shape[:-1], n)
        w, col = _weight32(weight, weight_scale, block_n, block_k)
        acc = torch.mm(a, w.t())
    else:
        # bfloat16 GEMM where both operands are exact in bfloat16 (as fp8fx::linear's lowering)
        exact16 = x.dtype == torch.bfloat16 and activations != "group" and cpu_has_bf16()
        acc, col = _cpu_gemm(a, weight, weight_scale, block_n, block_k,
                             torch.bfloat16 if exact16 else torch.float32)
    scale = col
    if row_scale is not None:
        scale = row_scale if scale is None else row_scale * scale
    return _epilogue(acc, scale, bias, x.dtype).reshape(*x.shape[:-1], n)


def register_scheme_lowerings(tables: list[dict]) -> None:
    """Put the decomposition into Inductor's decomposition ``tables`` (called by
    :func:`fp8fx.backends.inductor.register_lowering`)."""
    for table in tables:
        table[torch.ops.fp8fx.scaled_linear.default] = decompose_scaled_linear
