"""fp8fx operators, registered with ``torch.library`` in the ``fp8fx`` namespace.

This module only defines the ops: schema, eager kernel (a dispatch to :mod:`fp8fx.kernels`) and
fake kernel (shapes and dtypes only), so graphs that contain them can be traced by
dynamo/AOTAutograd and lowered by a backend later. The attention-path ops are defined in
:mod:`fp8fx.attention_ops`.

Scale convention (one, everywhere): a scale ``s`` is a dequant multiplier, ``x ≈ q * s``.

``fp8fx::linear(x, w, w_scale, x_scale, bias, fp8_max) -> y``
    ``w`` is the FP8 weight ``[out, in]`` (its dtype is the FP8 format), ``w_scale`` a 0-d
    (per tensor) or ``[out]`` (per output channel) float32 scale, ``x_scale`` the 0-d static
    activation scale. ``x`` is quantized to ``w.dtype`` saturating at ``±fp8_max``, then
    ``y = (q_x @ q_wᵀ) * x_scale * w_scale + bias`` in float32, returned in ``x.dtype``.
    Definition: :func:`fp8fx.kernels.linear.linear_reference`; eager kernel:
    :func:`fp8fx.kernels.linear.linear_fast` (its design and numerics are documented there);
    Inductor lowering: :mod:`fp8fx.backends.inductor`; Gaudi: :mod:`fp8fx.backends.hpu`.

``fp8fx::scaled_linear(x, w, w_scale, x_scale, bias, fp8_max, activations, group_size, block_n, block_k)``
    Every other scheme (:mod:`fp8fx.schemes`): dynamic per-tensor / per-token / per-group
    activations, weight-only, block weight scales. Contract, definition and eager kernel:
    :mod:`fp8fx.kernels.schemes`; Inductor lowering: :mod:`fp8fx.backends.inductor_schemes`.

The kernels' names are re-exported here for existing callers (``fp8fx.ops.linear_reference``
and friends); the functions themselves live in :mod:`fp8fx.kernels.linear`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .fp8 import FP8_DTYPES
from .kernels.linear import (  # noqa: F401  (re-exports: fp8fx.ops.<kernel> keeps working)
    check_fp8_weight as _check_weight,
    cpu_has_bf16 as _cpu_has_bf16,
    fp8_to_float32,
    fp8_to_half_bits,
    has_nan_codes,
    linear_fast,
    linear_reference,
    quantize_activation,
    quantize_activation_fast,
)
from .kernels.schemes import check_scaled_linear, scaled_linear_fast, scaled_linear_reference  # noqa: F401

__all__ = ["linear", "scaled_linear", "scaled_linear_reference", "scaled_linear_fast", "linear_reference", "linear_fast", "quantize_activation",
           "quantize_activation_fast", "fp8_to_float32", "fp8_to_half_bits", "has_nan_codes",
           "FP8_DTYPES"]


def _not_a_view(y: Tensor) -> Tensor:
    """``y`` as a tensor of its own (same storage, no copy) when the kernel returned a view.

    Under grad mode an op's output that is a view (the kernels' final ``reshape``) is marked by
    autograd as created inside a custom Function, and an in-place update of it then raises
    (Falcon adds to its Linear outputs in place). The op owns that storage: nothing else sees it."""
    if y._base is None:
        return y
    return torch.empty((0,), dtype=y.dtype, device=y.device).set_(y.untyped_storage(), y.storage_offset(),
                                                                   y.shape, y.stride())


@torch.library.custom_op("fp8fx::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Tensor,
           bias: Optional[Tensor], fp8_max: float) -> Tensor:
    # looked up here at call time: patching ``fp8fx.ops.linear_fast`` swaps the eager kernel
    return _not_a_view(linear_fast(x, weight, weight_scale, input_scale, bias, fp8_max))


@linear.register_fake
def _linear_fake(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Tensor,
                 bias: Optional[Tensor], fp8_max: float) -> Tensor:
    _check_weight(weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("fp8fx::scaled_linear", mutates_args=())
def scaled_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Optional[Tensor],
                  bias: Optional[Tensor], fp8_max: float, activations: str, group_size: int,
                  block_n: int, block_k: int) -> Tensor:
    return _not_a_view(scaled_linear_fast(x, weight, weight_scale, input_scale, bias, fp8_max, activations,
                                          group_size, block_n, block_k))


@scaled_linear.register_fake
def _scaled_linear_fake(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Optional[Tensor],
                        bias: Optional[Tensor], fp8_max: float, activations: str, group_size: int,
                        block_n: int, block_k: int) -> Tensor:
    check_scaled_linear(x, weight, weight_scale, input_scale, activations, group_size, block_n, block_k)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
