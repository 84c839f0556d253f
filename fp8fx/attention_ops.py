"""fp8fx operators of the attention path: FP8 matmul between activations, FP8 softmax output,
FP8 scaled-dot-product attention and the FP8 KV cache.

Each op is defined in the ``fp8fx`` namespace with a ``CompositeImplicitAutograd`` kernel made of
plain torch ops. Eager code (the converted model's graph, run as Python) calls the kernel;
AOTAutograd decomposes it into those torch ops, so Inductor fuses the scaling and casting with the
surrounding code on every device without a lowering of its own; dynamo graphs keep the op as one
node, which is what the passes and the tests look for.

Scale convention (as everywhere in fp8fx): ``x ≈ q * s``; quantizing divides by ``s``,
saturates at ``±fp8_max`` and casts to the FP8 dtype. Scales are Python floats: they are
constants of the graph (so they are part of Inductor's cache key like any other constant).

=====================================================  ===============================================
``qdq(x, s, fp8_max, fp8_dtype)``                      FP8 round trip in float32, back in ``x.dtype``
                                                       (a softmax's output: INC's softmax semantics)
``matmul(a, b, s_a, s_b, fp8_max, fp8_dtype)``         ``(q_a @ q_b) * s_a * s_b``, float32 accumulation
``sdpa(q, k, v, mask, dropout_p, is_causal, scale,     INC's fused-SDPA semantics: q, k, v quantized with
enable_gqa, s_q, s_k, s_v, s_p, s_o, ...)``            their scales, the probabilities with ``s_p``, the
                                                       output with ``s_o``
``kv_append(past, new, s, fp8_max, fp8_dtype)``        DynamicCache write: ``cat([past, q(new)], -2)`` in
                                                       FP8 (``past`` is FP8, or empty on the first call)
``kv_index_copy_(cache, dim, index, new, s, ...)``     StaticCache write into an FP8 buffer, in place
``dequant(x8, s, dtype)``                              a cache read: ``x8 * s`` in ``dtype``
=====================================================  ===============================================

Per-head scales (``observer_params.kv_cache_strategy = "attn_head"``): the overloads
``qdq.heads``, ``kv_append.heads``, ``kv_index_copy_.heads``, ``dequant.heads`` and ``sdpa.heads``
take ``float[]`` scales in place of ``float`` ones (for ``sdpa``: ``scale_q``, ``scale_k``,
``scale_v``; the probabilities and the output keep one scale), one per head: index ``h`` scales
``x[..., h, :, :]`` (dim -3 of ``[B, H, S, D]``), so the list has as many entries as the tensor
has heads there (vLLM's and compressed-tensors' per-head ``k_scale``/``v_scale`` of shape
``[num_kv_heads]``). A tensor whose KV heads were repeated for grouped-query attention (``H`` a
multiple of the list's length) uses each KV head's scale for its copies. The scales stay graph
constants (lists of floats); any other length raises.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import numerics
from .errors import QuantizationError
from .fp8 import FP8_DTYPES  # noqa: F401  (re-exported: fp8fx.attention_ops.FP8_DTYPES)

__all__ = ["FP8_DTYPES", "attention_probs", "masked_softmax", "quantize", "qdq", "qdq_heads", "head_scale"]


def quantize(x: Tensor, scale: float, fp8_max: float, fp8_dtype: torch.dtype) -> Tensor:
    """``saturate(x / scale)`` cast to ``fp8_dtype`` (computed in float32): the ops' argument
    order for :func:`fp8fx.numerics.quantize_fp32`."""
    return numerics.quantize_fp32(x, scale, fp8_dtype, fp8_max)


def qdq(x: Tensor, scale: float, fp8_max: float, fp8_dtype: torch.dtype) -> Tensor:
    """The float32 value of ``x`` after an FP8 round trip."""
    return numerics.dequantize(quantize(x, scale, fp8_max, fp8_dtype), scale)


_lib = torch.library.Library("fp8fx", "FRAGMENT")


def _define(schema: str, fn) -> None:  # noqa: ANN001
    _lib.define(schema)
    _lib.impl(schema.split("(", 1)[0], fn, "CompositeImplicitAutograd")


def _qdq_op(x: Tensor, scale: float, fp8_max: float, fp8_dtype: torch.dtype) -> Tensor:
    return qdq(x, scale, fp8_max, fp8_dtype).to(x.dtype)


def _matmul_op(a: Tensor, b: Tensor, scale_a: float, scale_b: float, fp8_max: float,
               fp8_dtype: torch.dtype) -> Tensor:
    qa = quantize(a, scale_a, fp8_max, fp8_dtype).float()
    qb = quantize(b, scale_b, fp8_max, fp8_dtype).float()
    return (torch.matmul(qa, qb) * (scale_a * scale_b)).to(torch.result_type(a, b))


def _repeat_kv(q: Tensor, kv: Tensor, enable_gqa: bool) -> Tensor:
    if enable_gqa and kv.shape[-3] != q.shape[-3]:
        return kv.repeat_interleave(q.shape[-3] // kv.shape[-3], dim=-3)
    return kv


def attention_probs(q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float | None,
                    enable_gqa: bool) -> Tensor:
    """``softmax(q @ kᵀ * scale + mask)`` in float32, as ``F.scaled_dot_product_attention`` defines it
    (a fully masked row gives zeros). Also what calibration observes for an SDPA's probabilities."""
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), _repeat_kv(q, k, enable_gqa).float().transpose(-2, -1)) * sm_scale
    return masked_softmax(scores, attn_mask, is_causal)


def masked_softmax(scores: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
    """The masking (causal, boolean, additive) and softmax of float32 ``scores`` ``[..., S, S_k]``
    as ``F.scaled_dot_product_attention`` defines them; a fully masked row gives zeros."""
    if is_causal:
        keep = torch.ones(scores.shape[-2], scores.shape[-1], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)


def _sdpa_op(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float, is_causal: bool,
             scale: float | None, enable_gqa: bool, scale_q: float, scale_k: float, scale_v: float,
             scale_p: float, scale_o: float, fp8_max: float, fp8_dtype: torch.dtype) -> Tensor:
    qf, kf, vf = (qdq(t, s, fp8_max, fp8_dtype) for t, s in ((q, scale_q), (k, scale_k), (v, scale_v)))
    p = attention_probs(qf, kf, attn_mask, is_causal, scale, enable_gqa)
    out = torch.matmul(qdq(p, scale_p, fp8_max, fp8_dtype), _repeat_kv(qf, vf, enable_gqa))
    return qdq(out, scale_o, fp8_max, fp8_dtype).to(q.dtype)


def _kv_append_op(past: Tensor, new: Tensor, scale: float, fp8_max: float, fp8_dtype: torch.dtype) -> Tensor:
    q_new = quantize(new, scale, fp8_max, fp8_dtype)
    if past.dtype == fp8_dtype:
        return torch.cat([past, q_new], dim=-2)
    if past.numel() == 0:  # contiguous like every later cat, so the graphs see one stride
        return q_new.contiguous()
    raise QuantizationError(
        f"the KV cache holds {past.dtype} values, but this model writes FP8 ({fp8_dtype}) to it: the "
        "cache was filled by a run without fp8fx (or before convert). Start generation with a fresh "
        "cache object.")


def _kv_index_copy_op(cache: Tensor, dim: int, index: Tensor, new: Tensor, scale: float, fp8_max: float,
                      fp8_dtype: torch.dtype) -> None:
    if cache.dtype != fp8_dtype:
        raise QuantizationError(
            f"the static KV cache buffer is {cache.dtype}, but this model writes FP8 ({fp8_dtype}) to "
            "it: it was allocated by a run without fp8fx. Start generation with a fresh cache object.")
    q_new = quantize(new, scale, fp8_max, fp8_dtype)
    cache.view(torch.uint8).index_copy_(dim, index, q_new.view(torch.uint8))  # no FP8 index_copy kernel


def _dequant_op(x: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    return numerics.dequantize(x, scale, dtype)


_define("qdq(Tensor x, float scale, float fp8_max, ScalarType fp8_dtype) -> Tensor", _qdq_op)
_define("matmul(Tensor a, Tensor b, float scale_a, float scale_b, float fp8_max, ScalarType fp8_dtype) -> Tensor",
        _matmul_op)
_define("sdpa(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, bool is_causal, float? scale, "
        "bool enable_gqa, float scale_q, float scale_k, float scale_v, float scale_p, float scale_o, "
        "float fp8_max, ScalarType fp8_dtype) -> Tensor", _sdpa_op)
_define("kv_append(Tensor past, Tensor new, float scale, float fp8_max, ScalarType fp8_dtype) -> Tensor",
        _kv_append_op)
_define("kv_index_copy_(Tensor(a!) cache, int dim, Tensor index, Tensor new, float scale, float fp8_max, "
        "ScalarType fp8_dtype) -> ()", _kv_index_copy_op)
_define("dequant(Tensor x, float scale, ScalarType dtype) -> Tensor", _dequant_op)


# ------------------------------------------------------------------------------ per-head scales
def head_repeats(shape: tuple, scale: list[float] | tuple[float, ...], what: str = "tensor") -> int:
    """How many heads of a ``[..., H, S, D]`` tensor of ``shape`` each scale of a per-head list
    covers (``H / len``: grouped-query heads repeated by ``repeat_kv``); a list whose length does
    not divide ``H`` raises."""
    if len(shape) < 3 or not scale or shape[-3] % len(scale):
        raise QuantizationError(
            f"per-head scales: {len(scale)} scale(s) for a {what} of shape {tuple(shape)}, which has "
            f"{shape[-3] if len(shape) >= 3 else 'no'} heads at dim -3: the scales were calibrated on another "
            "head count (another model?); calibrate this model again")
    return shape[-3] // len(scale)


def head_scale(x: Tensor, scale: list[float] | tuple[float, ...], what: str = "tensor") -> Tensor:
    """A per-head scale list as a float32 ``[H, 1, 1]`` tensor that broadcasts over ``x``
    (``[..., H, S, D]``). ``H`` a multiple of the list's length is a grouped-query tensor whose KV
    heads were repeated (``repeat_kv``: each KV head ``H / len`` times in a row), and each scale
    covers its copies; any other length raises."""
    rep = head_repeats(tuple(x.shape), scale, what)
    return torch.tensor([float(v) for v in scale for _ in range(rep)], dtype=torch.float32,
                        device=x.device).reshape(-1, 1, 1)


def qdq_heads(x: Tensor, scale: list[float] | tuple[float, ...], fp8_max: float, fp8_dtype: torch.dtype) -> Tensor:
    """The float32 value of ``x`` after an FP8 round trip with one scale per head."""
    s = head_scale(x, scale)
    return numerics.dequantize(numerics.quantize_fp32(x, s, fp8_dtype, fp8_max), s)


def _qdq_heads_op(x: Tensor, scale: list[float], fp8_max: float, fp8_dtype: torch.dtype) -> Tensor:
    return qdq_heads(x, scale, fp8_max, fp8_dtype).to(x.dtype)


def _sdpa_heads_op(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float, is_causal: bool,
                   scale: float | None, enable_gqa: bool, scale_q: list[float], scale_k: list[float],
                   scale_v: list[float], scale_p: float, scale_o: float, fp8_max: float,
                   fp8_dtype: torch.dtype) -> Tensor:
    qf, kf, vf = (qdq_heads(t, s, fp8_max, fp8_dtype) for t, s in ((q, scale_q), (k, scale_k), (v, scale_v)))
    p = attention_probs(qf, kf, attn_mask, is_causal, scale, enable_gqa)
    out = torch.matmul(qdq(p, scale_p, fp8_max, fp8_dtype), _repeat_kv(qf, vf, enable_gqa))
    return qdq(out, scale_o, fp8_max, fp8_dtype).to(q.dtype)


def _kv_append_heads_op(past: Tensor, new: Tensor, scale: list[float], fp8_max: float,
                        fp8_dtype: torch.dtype) -> Tensor:
    return _kv_append_op(past, new, head_scale(new, scale, "KV-cache write"), fp8_max, fp8_dtype)


def _kv_index_copy_heads_op(cache: Tensor, dim: int, index: Tensor, new: Tensor, scale: list[float],
                            fp8_max: float, fp8_dtype: torch.dtype) -> None:
    _kv_index_copy_op(cache, dim, index, new, head_scale(new, scale, "KV-cache write"), fp8_max, fp8_dtype)


def _dequant_heads_op(x: Tensor, scale: list[float], dtype: torch.dtype) -> Tensor:
    return numerics.dequantize(x, head_scale(x, scale, "KV-cache read"), dtype)


_define("qdq.heads(Tensor x, float[] scale, float fp8_max, ScalarType fp8_dtype) -> Tensor", _qdq_heads_op)
_define("sdpa.heads(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, bool is_causal, float? scale, "
        "bool enable_gqa, float[] scale_q, float[] scale_k, float[] scale_v, float scale_p, float scale_o, "
        "float fp8_max, ScalarType fp8_dtype) -> Tensor", _sdpa_heads_op)
_define("kv_append.heads(Tensor past, Tensor new, float[] scale, float fp8_max, ScalarType fp8_dtype) -> Tensor",
        _kv_append_heads_op)
_define("kv_index_copy_.heads(Tensor(a!) cache, int dim, Tensor index, Tensor new, float[] scale, float fp8_max, "
        "ScalarType fp8_dtype) -> ()", _kv_index_copy_heads_op)
_define("dequant.heads(Tensor x, float[] scale, ScalarType dtype) -> Tensor", _dequant_heads_op)
