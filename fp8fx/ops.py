"""fp8fx operators, registered with ``torch.library`` in the ``fp8fx`` namespace.

Each op has a reference kernel (eager, any device: it emulates the FP8 GEMM exactly, FP8
operands and FP32 accumulation) and a fake kernel (shapes and dtypes only), so graphs that
contain them can be traced by dynamo/AOTAutograd and lowered by a backend later.

Scale convention (one, everywhere): a scale ``s`` is a dequant multiplier, ``x ≈ q * s``.

``fp8fx::linear(x, w, w_scale, x_scale, bias, fp8_max) -> y``
    ``w`` is the FP8 weight ``[out, in]`` (its dtype is the FP8 format), ``w_scale`` a 0-d
    (per tensor) or ``[out]`` (per output channel) float32 scale, ``x_scale`` the 0-d static
    activation scale. ``x`` is quantized to ``w.dtype`` saturating at ``±fp8_max``, then
    ``y = (q_x @ q_wᵀ) * x_scale * w_scale + bias`` in float32, returned in ``x.dtype``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .errors import QuantizationError

__all__ = ["linear", "quantize_activation"]


def quantize_activation(x: Tensor, scale: Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> Tensor:
    """``saturate(x / scale)`` cast to ``fp8_dtype`` (computed in float32)."""
    return (x.float() / scale).clamp_(-fp8_max, fp8_max).to(fp8_dtype)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _check_weight(weight: Tensor) -> None:
    if weight.dtype not in FP8_DTYPES:
        raise QuantizationError(
            f"fp8fx::linear got a {weight.dtype} weight; it needs float8_e4m3fn or float8_e5m2. "
            "The FP8 weight was replaced after convert (e.g. model.tie_weights() re-tied it to an "
            "embedding, or it was cast); convert again from the high-precision model")


@torch.library.custom_op("fp8fx::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Tensor,
           bias: Optional[Tensor], fp8_max: float) -> Tensor:
    _check_weight(weight)
    qx = quantize_activation(x, input_scale, weight.dtype, fp8_max)
    y = torch.matmul(qx.float(), weight.float().t())
    y = y * (input_scale * weight_scale)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@linear.register_fake
def _linear_fake(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Tensor,
                 bias: Optional[Tensor], fp8_max: float) -> Tensor:
    _check_weight(weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
