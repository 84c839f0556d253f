"""Kernels of ``fp8fx::scaled_linear``: every scheme but static per-tensor/per-channel.

``fp8fx::scaled_linear(x, w, w_scale, x_scale, bias, fp8_max, activations, group_size, block_n,
block_k) -> y`` (registered in :mod:`fp8fx.ops`):

* ``w`` FP8 ``[N, K]``; ``w_scale`` 0-d (per tensor), ``[N]`` (per output channel) or, with
  ``block_n, block_k > 0``, ``[ceil(N/block_n), ceil(K/block_k)]`` (one per weight tile; an edge
  tile covers the remaining rows/columns).
* ``activations``: ``"static"`` (``x_scale`` 0-d, from calibration), ``"tensor"`` (one scale per
  call), ``"token"`` (one per row of ``x``), ``"group"`` (one per row and ``group_size`` columns;
  an edge group covers the remaining columns) or ``"none"`` (``x`` is not quantized:
  weight-only). Dynamic scales are ``max(amax, AMAX_FLOOR) / fp8_max``, unrounded (the peers'
  choice on CUDA and CPU; INC rounds its dynamic scales to powers of two on Gaudi).

Definition (:func:`scaled_linear_reference`): ``x`` quantized to ``w.dtype`` with its scale
(float32 ``x / s``, saturating at ``±fp8_max``), both operands dequantized in float32
(``q * s``), one float32 GEMM, ``+ bias``, cast to ``x.dtype``. A non-finite value in a row of
``x`` makes that row's dynamic scale non-finite and its output NaN: broken inputs stay visible.

The eager kernel (:func:`scaled_linear_fast`) follows :func:`fp8fx.kernels.linear.linear_fast`
(also in its one bfloat16 GEMM case: bfloat16 ``x`` with more than ``_EXACT_MAX_M`` rows on a
CPU with AVX512-BF16/AMX, where both operands are exact in bfloat16):
a few rows (decode) with per-tensor/per-channel weights take the C++ GEMV
(:func:`fp8fx.kernels.gemv.gemv_fp8`) on the quantized activation; otherwise
the weight is converted block by block into reused buffers (integer ops, exact), each block is
multiplied as soon as it is converted, and the scales go into the epilogue where they factor out
of the GEMM (per-tensor, per-channel and per-token scales: ``acc * s_x[m] * s_w[n]``) or into
the operands where they do not (block weight scales multiply the converted block; group
activation scales multiply the quantized activation), so every scheme reads the FP8 bytes once
per call and allocates no weight-sized temporary.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import QuantizationError
from ..fp8 import FORMATS
from ..numerics import expand_block_scale, quantize_fp32
from .linear import _BLOCK_ELEMS, _EXACT_MAX_M, _MIN_GEMM_ROWS, _TO_HALF, _convert_blocks, check_fp8_weight, \
    cpu_has_bf16, gemv_rows, has_nan_codes, _nan_code_rows, quantize_activation_fast

__all__ = ["ACTIVATIONS", "AMAX_FLOOR", "check_scaled_linear", "dynamic_scale", "expand_group_scale", "activation_scale",
           "scaled_linear_reference", "scaled_linear_fast", "dequantized_weight"]

ACTIVATIONS = ("static", "tensor", "token", "group", "none")
#: the activation dtypes of the C++ few-row kernel (``fp8fx.kernels.gemv.qgemv_op``)
_QGEMV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: dynamic scales are floored here so that an all-zero row gets a positive normal scale
AMAX_FLOOR = 1e-12


def check_scaled_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Optional[Tensor],
                        activations: str, group_size: int, block_n: int, block_k: int) -> None:
    """Raise ``QuantizationError`` naming what does not fit the op's contract (module docstring)."""
    check_fp8_weight(weight)
    problems = []
    if weight.dim() != 2:
        problems.append(f"weight must be 2-D [out, in], got {tuple(weight.shape)}")
    n, k = weight.shape[0], weight.shape[-1]
    if activations not in ACTIVATIONS:
        problems.append(f"activations {activations!r} is not one of {ACTIVATIONS}")
    if (activations == "static") != (input_scale is not None):
        problems.append("a static scheme needs input_scale and the other schemes take None, got "
                        f"activations {activations!r} with input_scale {'set' if input_scale is not None else 'None'}")
    if input_scale is not None and input_scale.numel() != 1:
        problems.append(f"input_scale has shape {tuple(input_scale.shape)}; a static scale is one value")
    if (activations == "group") != (group_size > 0):
        problems.append(f"group_size {group_size} goes with activations 'group' only (and must be positive there)")
    if (block_n > 0) != (block_k > 0) or block_n < 0 or block_k < 0:
        problems.append(f"block ({block_n}, {block_k}): give both positive (block weights) or both 0")
    if block_n > 0 and block_k > 0:
        expected = (-(-n // block_n), -(-k // block_k))
        if tuple(weight_scale.shape) != expected:
            problems.append(f"weight_scale has shape {tuple(weight_scale.shape)}; {block_n}x{block_k} blocks of a "
                            f"[{n}, {k}] weight need {list(expected)}")
    elif weight_scale.numel() != 1 and tuple(weight_scale.shape) != (n,):
        problems.append(f"weight_scale has shape {tuple(weight_scale.shape)}; expected () (per tensor) or [{n}]")
    if x.shape[-1] != k:
        problems.append(f"x has {x.shape[-1]} features, the weight {k}")
    if problems:
        raise QuantizationError("fp8fx::scaled_linear: " + "; ".join(problems))


def dynamic_scale(x2d: Tensor, activations: str, group_size: int, fp8_max: float) -> Tensor:
    """The run-time activation scale of ``x2d [M, K]``: ``[1, 1]`` (tensor), ``[M, 1]`` (token) or
    ``[M, ceil(K / group_size)]`` (group), float32."""
    a = x2d.detach().abs()
    if activations == "tensor":
        amax = a.amax().reshape(1, 1) if x2d.numel() else a.new_zeros((1, 1))
    elif activations == "token":
        amax = a.amax(dim=-1, keepdim=True)
    elif activations == "group":
        m, k = x2d.shape
        groups = -(-k // group_size)
        if k % group_size:
            a = torch.nn.functional.pad(a, (0, groups * group_size - k))
        amax = a.reshape(m, groups, group_size).amax(dim=-1)
    else:
        raise QuantizationError(f"fp8fx::scaled_linear: activations {activations!r} has no dynamic scale")
    return amax.to(torch.float32).clamp_min(AMAX_FLOOR) / fp8_max


def expand_group_scale(scale: Tensor, k: int, group_size: int) -> Tensor:
    """A ``[M, G]`` group scale as ``[M, K]`` (views only; ``narrow``/``unsqueeze`` keep it
    traceable with fake tensors of any device)."""
    m, g = scale.shape
    return scale.unsqueeze(-1).expand(m, g, group_size).reshape(m, g * group_size).narrow(1, 0, k)


def activation_scale(x2d: Tensor, input_scale: Optional[Tensor], activations: str, group_size: int,
                     fp8_max: float) -> Tensor:
    """``[1, 1]``, ``[M, 1]`` or ``[M, K]`` float32: the scale each element of ``x2d`` is quantized
    with (not for ``"none"``). The eager kernels and the Inductor decomposition both use it."""
    if activations == "static":
        return input_scale.to(torch.float32).reshape(1, 1)
    s = dynamic_scale(x2d, activations, group_size, fp8_max)
    return expand_group_scale(s, x2d.shape[1], group_size) if activations == "group" else s


def dequantized_weight(weight: Tensor, weight_scale: Tensor, block_n: int, block_k: int) -> Tensor:
    """``q_w * s_w`` in float32 ``[N, K]``."""
    w = weight.to(torch.float32)
    if block_n > 0:
        return w * expand_block_scale(weight_scale.to(torch.float32), tuple(weight.shape), (block_n, block_k))
    s = weight_scale.to(torch.float32)
    return w * (s.reshape(-1, 1) if s.dim() else s)


def scaled_linear_reference(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Optional[Tensor],
                            bias: Optional[Tensor], fp8_max: float, activations: str, group_size: int,
                            block_n: int, block_k: int) -> Tensor:
    """The definition of ``fp8fx::scaled_linear`` (module docstring)."""
    check_scaled_linear(x, weight, weight_scale, input_scale, activations, group_size, block_n, block_k)
    n, k = weight.shape
    x2d = x.reshape(-1, k)
    if activations == "none":
        xd = x2d.to(torch.float32)
    else:
        s = activation_scale(x2d, input_scale, activations, group_size, fp8_max)
        xd = quantize_fp32(x2d, s, weight.dtype, fp8_max).to(torch.float32) * s
    y = xd @ dequantized_weight(weight, weight_scale, block_n, block_k).t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _quantized_rows(x2d: Tensor, scale: Tensor, fp8_dtype: torch.dtype, fp8_max: float, dequantize: bool) -> Tensor:
    """float32 ``q_x`` (or ``q_x * s`` with ``dequantize``) of ``x2d`` with a ``[1, 1]``/``[M, 1]``/
    ``[M, K]`` scale, in row blocks whose temporaries stay in cache."""
    m, k = x2d.shape
    out = torch.empty((m, k), dtype=torch.float32, device=x2d.device)
    rows = max(1, _BLOCK_ELEMS // (4 * k))
    for r0 in range(0, m, rows):
        s = scale if scale.shape[0] == 1 else scale[r0:r0 + rows]
        q = quantize_activation_fast(x2d[r0:r0 + rows], s, fp8_dtype, fp8_max)
        out[r0:r0 + rows] = q.mul_(s) if dequantize else q
    return out


def scaled_linear_fast(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Optional[Tensor],
                       bias: Optional[Tensor], fp8_max: float, activations: str, group_size: int,
                       block_n: int, block_k: int) -> Tensor:
    """The CPU kernel of ``fp8fx::scaled_linear`` (module docstring): the reference's numerics up
    to the summation order and the rounding of where each scale is applied."""
    check_scaled_linear(x, weight, weight_scale, input_scale, activations, group_size, block_n, block_k)
    n, k = weight.shape
    fp8_dtype = weight.dtype
    if x.device.type != "cpu" or x.numel() == 0 or n == 0 or fp8_max > FORMATS[fp8_dtype].max:
        return scaled_linear_reference(x, weight, weight_scale, input_scale, bias, fp8_max, activations,
                                       group_size, block_n, block_k)
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    if block_n <= 0 and activations != "group" and x.dtype in _QGEMV_DTYPES and gemv_rows(m):
        from .gemv import QGEMV_MODES, qgemv_op  # few rows: the whole op in one C++ call

        y = qgemv_op()(x2d, weight, weight_scale, input_scale, bias, fp8_max, QGEMV_MODES[activations], AMAX_FLOOR)
        return y.reshape(*x.shape[:-1], n)
    row_scale = None  # [1, 1] or [M, 1]: factors out of the GEMM into the epilogue
    if activations == "none":
        xa = x2d.to(torch.float32)
    else:
        s = activation_scale(x2d, input_scale, activations, group_size, fp8_max)
        per_element = s.shape[1] != 1
        xa = _quantized_rows(x2d, s, fp8_dtype, fp8_max, dequantize=per_element)
        row_scale = None if per_element else s
    factor = _TO_HALF[fp8_dtype][2]  # _convert_blocks yields w / factor (a power of two)
    blocked = block_n > 0
    ws = weight_scale.to(torch.float32)
    if not blocked and gemv_rows(m):  # few rows: stream the FP8 bytes (NaN codes handled there)
        from .gemv import gemv_fp8

        acc = gemv_fp8(xa, weight.contiguous()).mul_(ws)
        if row_scale is not None:
            acc.mul_(row_scale)
        if bias is not None:
            acc.add_(bias.to(torch.float32))
        return acc.to(x.dtype).reshape(*x.shape[:-1], n)
    col_scale = None if blocked else (ws * factor)
    bias32 = None if bias is None else bias.to(torch.float32)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    rows = max(1, _BLOCK_ELEMS // k)
    if m >= _MIN_GEMM_ROWS:
        rows = max(rows, _MIN_GEMM_ROWS)
    if blocked:  # whole tiles per converted block
        rows = max(block_n, rows // block_n * block_n)
        ws_factor = ws * factor
    # bfloat16 x on a bfloat16 CPU, more than a few rows: when both GEMM operands are exact in
    # bfloat16 (FP8 values, or x itself for weight-only; no block or group scale folded in), a
    # bfloat16 GEMM (float32 accumulation, product rounded to bfloat16) as linear_fast does
    bf16 = (x.dtype == torch.bfloat16 and m > _EXACT_MAX_M and not blocked and activations != "group"
            and cpu_has_bf16())
    block16 = None
    if bf16:
        xa = xa.to(torch.bfloat16)
        block16 = torch.empty((min(rows, n), k), dtype=torch.bfloat16, device=x.device)
    for r0, r1, w32 in _convert_blocks(weight.contiguous(), rows):
        if blocked:  # this block's tiles only: no weight-sized scale tensor
            tiles = ws_factor[r0 // block_n:-(-r1 // block_n)]
            w32.mul_(expand_block_scale(tiles, (r1 - r0, k), (block_n, block_k)))
        rhs = w32
        if block16 is not None:
            rhs = block16[: r1 - r0]
            rhs.copy_(w32)
        acc = torch.mm(xa, rhs.t())
        if acc.dtype != torch.float32:
            acc = acc.float()
        if col_scale is not None:
            acc.mul_(col_scale[r0:r1] if col_scale.dim() else col_scale)
        if row_scale is not None:
            acc.mul_(row_scale)
        if bias32 is not None:
            acc.add_(bias32[r0:r1])
        y[:, r0:r1] = acc
    if has_nan_codes(weight):
        y.masked_fill_(_nan_code_rows(weight), float("nan"))
    return y.reshape(*x.shape[:-1], n)
