"""CUDA lowering of fp8fx's attention ops: FP8 GEMMs for ``fp8fx::matmul``, the rest explained.

The ``fp8fx`` compile backend calls :func:`lower_attention_for_cuda` on the rewritten graph before
it goes to Inductor (or runs eagerly with ``inductor=False``). Every attention node whose tensors
the graph records on a CUDA device gets a one-line note in ``node.meta["fp8fx_cuda"]``: what it
became, or why it keeps its ``fp8fx::`` op (whose ``CompositeImplicitAutograd`` kernel AOTAutograd
decomposes into plain torch ops: FP8-rounded operands, float32 arithmetic). Nodes on other devices
are not touched. All nodes are planned (and bad arguments refused) before the graph changes.

What torch 2.13 offers for FP8 attention on CUDA, and what fp8fx takes
-----------------------------------------------------------------------
* ``torch._scaled_mm``: 2-D only, row-major ``A [M, K]``, column-major ``B [K, N]``, ``K`` and ``N``
  multiples of 16, E4M3/E5M2 operands except E5M2 x E5M2, 0-d float32 scales (tensor-wise) and a
  float32 output; sm89+. **Used** for a ``matmul`` whose right operand has no batch (2-D, or batch
  dims all 1): flattening the left operand's batch into ``M`` is exact there (each row of the
  product only reads its own row). A batched right operand is not flattened: a block-diagonal
  product would be a different (and larger) GEMM.
* ``torch._scaled_grouped_mm``: 3-D x 3-D (one GEMM per batch entry, no offsets), E4M3 only,
  row-wise float32 scales ``[G, M]`` / ``[G, N]``, a **bfloat16 output only**; FP8 grouped GEMM
  is built for sm90 and not sm100 (``PLATFORM_SUPPORTS_FP8_GROUPED_GEMM``). **Used** for the
  batched ``matmul`` (``Q·Kᵀ``, ``P·V``, ``[B, H, S, D]``) on sm90 when the op's result is bfloat16
  (its definition rounds to bfloat16 once, as the kernel's epilogue does); a float32/float16
  result, sm89 or sm100+ keep the emulation.
* FP8 SDPA: ``aten._scaled_dot_product_flash_attention.quantized`` (with
  ``torch.nn.attention.experimental._scaled_dot_product_attention_quantized``) takes E4M3 q/k/v
  and per-head ``(B, H_kv)`` descales, but only after FlashAttention-3 from the separate
  ``flash_attn_interface`` package is activated (``torch.nn.attention.activate_flash_attention_impl
  ("FA3")``), sm90 only, forward only, no attention mask, a bfloat16 output, and its FP8
  probabilities are the un-normalized ``exp(s - max)`` cast without a scale; FlexAttention takes
  FP8 q/k/v (it fixes their layouts for sm89-sm9x) but has no descale arguments, rounds its
  probabilities the same unscaled way and writes the output in q's FP8 dtype. Neither computes
  ``fp8fx::sdpa`` (probabilities quantized with ``s_p`` after normalization, the output with
  ``s_o``), and ``_scaled_grouped_mm`` would round the float32 scores to bfloat16 before the
  softmax. **Kept**: ``fp8fx::sdpa`` stays the emulation (reason ``sdpa``).
* ``qdq`` (a softmax's output, a KV write) is a pointwise FP8 round trip: Inductor generates one
  fused kernel for it; no FP8 GEMM is involved. **Kept** (it is compiled, not emulated op by op).
* KV cache (``kv_append`` / ``kv_index_copy_`` / ``dequant``): the cache layers of
  :mod:`fp8fx.kv_cache` allocate and keep FP8 tensors on the cache's device, and these ops'
  decompositions keep the stored tensor FP8 (a cat of FP8 tensors, a byte copy into the FP8
  buffer); the read dequantizes. **Kept** (nothing to lower: the memory is FP8 already).

Numerics of the lowered ``matmul`` (fp8fx's definition: ``(q(a) @ q(b)) * (s_a * s_b)`` in
float32, then cast to the result dtype): the operands are quantized by the same function as the
reference kernel, the scale is folded into one float32 factor (``float32(s_a * s_b)``, as torch
converts the reference's Python-float product) passed as ``scale_a`` with ``scale_b = 1``, so the
kernel's epilogue computes ``acc * s * 1``: equal to the definition up to the GEMM's accumulation
order. Shapes the kernels refuse are padded with zeros (``K`` and ``N`` to multiples of 16) before
quantization: zero codes add nothing to the sums and the padded columns are sliced off.

The lowered forms are the plain functions :func:`scaled_matmul_2d` and
:func:`scaled_matmul_grouped`, called from the graph: AOTAutograd traces them into aten ops
(Inductor's ``_scaled_mm`` / ``_scaled_grouped_mm`` lowerings take it from there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import attention_ops
from ..errors import QuantizationError
from ..fp8 import E4M3
from .hpu_attention import _bind_args, _fp8fx_attention_op, _scales, _value, attention_nodes

__all__ = ["KEPT_REASONS", "LOWERED", "META_KEY", "lower_attention_for_cuda", "plan_cuda_attention",
           "scaled_matmul_2d", "scaled_matmul_grouped", "explain_notes", "lowered_nodes"]

META_KEY = "fp8fx_cuda"
_MIN_CAPABILITY = (8, 9)
_ALIGN = 16  # _scaled_mm: K and N multiples of 16; grouped: 16-byte aligned leading dims

#: what a lowered node became (one line each; written into node.meta["fp8fx_cuda"])
LOWERED = {
    "mm": "lowered to torch._scaled_mm (tensor-wise scales, float32 output): the right operand has no "
          "batch, so the left operand's batch is flattened into M",
    "grouped": "lowered to torch._scaled_grouped_mm (one FP8 GEMM per batch entry, row-wise scales, "
               "bfloat16 output)",
}
#: why a CUDA node keeps its fp8fx op (its decomposition is compiled: FP8-rounded operands, float32 math)
KEPT_REASONS = {
    "capability": "compute capability below 8.9: no FP8 GEMM on this GPU",
    "rocm": "a ROCm build: its FP8 GEMM paths (float8_e4m3fnuz on MI300) were not checked for this lowering",
    "matmul_e5m2": "E5M2 operands: torch._scaled_mm refuses E5M2 x E5M2 and _scaled_grouped_mm takes E4M3 only",
    "matmul_shape": "the graph does not record both operands as tensors of 2 or more dims",
    "matmul_dtype": "batched matmul with a non-bfloat16 result: _scaled_grouped_mm writes bfloat16 only, an "
                    "extra rounding the op's definition does not have",
    "matmul_arch": "batched matmul off sm90: torch 2.13 builds its FP8 grouped GEMM (_scaled_grouped_mm) for "
                   "sm90 only, and _scaled_mm is 2-D",
    "sdpa": "torch 2.13 has no FP8 SDPA kernel on CUDA that computes fp8fx.sdpa: the FA3 FP8 path "
            "(_scaled_dot_product_flash_attention.quantized) needs the external flash_attn_interface package, "
            "takes no mask and quantizes un-normalized probabilities without a scale, FlexAttention has no "
            "descales, and _scaled_grouped_mm would round the float32 scores to bfloat16",
    "heads": "per-head scales: kept like fp8fx.sdpa (no FP8 attention kernel with per-head scales applies)",
    "qdq": "a pointwise FP8 round trip: Inductor compiles it into one fused kernel (no FP8 GEMM involved)",
    "kv": "FP8 KV-cache storage: the decomposition keeps the stored tensor FP8 (cat / byte copy / dequantizing "
          "read), nothing to lower",
}
_KIND_NOTES = {  # what explain can say before any graph exists (per matched kind)
    "matmul": "CUDA: torch._scaled_grouped_mm on sm90 for a bfloat16 batched matmul, torch._scaled_mm when the "
              "right operand has no batch; otherwise emulated (per-node reason in node.meta['fp8fx_cuda'])",
    "softmax": f"CUDA: {KEPT_REASONS['qdq']}",
    "sdpa": f"CUDA: emulated (FP8-rounded operands, float32 math): {KEPT_REASONS['sdpa']}",
    "kv_cache": "CUDA: FP8 storage in the cache layers (fp8fx.fp8_kv_cache); the write's round trip is fused",
}


# ---------------------------------------------------------------------------------------- lowered forms
def _pad_to(size: Any) -> Any:
    """How much to add to ``size`` for a multiple of 16 (a SymInt stays symbolic)."""
    return (-size) % _ALIGN


def _folded_scale(scale_a: float, scale_b: float) -> float:
    """``s_a * s_b`` as the float32 number torch multiplies the reference's float32 product by."""
    return float(np.float32(scale_a * scale_b))  # round to nearest even, as torch's scalar conversion


def _quantize(x: Tensor, scale: float, fp8_max: float, fp8_dtype: torch.dtype) -> Tensor:
    return attention_ops.quantize(x, scale, fp8_max, fp8_dtype)


def _contiguous(t: Tensor) -> Tensor:
    """``t`` in row-major order: a copy (``aten.clone``, which fake CUDA tensors trace on a CPU-only
    build, where ``Tensor.contiguous``'s device guard cannot) only when it is not already."""
    return t if t.is_contiguous() else torch.ops.aten.clone.default(t, memory_format=torch.contiguous_format)


def scaled_matmul_2d(a: Tensor, b: Tensor, scale_a: float, scale_b: float, fp8_max: float,
                     fp8_dtype: torch.dtype, out_dtype: torch.dtype) -> Tensor:
    """``fp8fx::matmul`` for a right operand without batch (``b`` 2-D, or its batch dims all 1) as
    one ``torch._scaled_mm``: ``q(a)`` flattened to row-major ``[M', K]``, ``q(b)`` column-major
    ``[K, N]``, both zero-padded to multiples of 16, ``scale_a = float32(s_a * s_b)``, ``scale_b = 1``."""
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    m, k = a.shape[-2], a.shape[-1]
    n = b.shape[-1]
    pk, pn = _pad_to(k), _pad_to(n)
    a2 = a.expand(*batch, m, k).reshape(-1, k)
    bt = b.reshape(k, n).transpose(0, 1)  # [N, K]: its contiguous copy is B column-major
    if not statically_known_true(pk == 0) or not statically_known_true(pn == 0):
        a2 = F.pad(a2, (0, pk))
        bt = F.pad(bt, (0, pk, 0, pn))
    qa = _contiguous(_quantize(a2, scale_a, fp8_max, fp8_dtype))
    qbt = _contiguous(_quantize(bt, scale_b, fp8_max, fp8_dtype))
    s = torch.full((), _folded_scale(scale_a, scale_b), dtype=torch.float32, device=a.device)
    one = torch.ones((), dtype=torch.float32, device=a.device)
    acc = torch._scaled_mm(qa, qbt.t(), scale_a=s, scale_b=one, out_dtype=torch.float32)
    return acc.narrow(-1, 0, n).to(out_dtype).reshape(*batch, m, n)


def scaled_matmul_grouped(a: Tensor, b: Tensor, scale_a: float, scale_b: float, fp8_max: float,
                          fp8_dtype: torch.dtype, out_dtype: torch.dtype) -> Tensor:
    """Batched ``fp8fx::matmul`` as one ``torch._scaled_grouped_mm`` (3-D x 3-D): the broadcast batch
    flattened into ``G`` groups, ``q(a)`` row-major ``[G, M, K]``, ``q(b)`` column-major
    ``[G, K, N]``, ``K`` and ``N`` zero-padded to multiples of 16, row-wise scales
    ``float32(s_a * s_b)`` for every row of ``a`` and 1 for every column of ``b``; bfloat16 result."""
    if out_dtype != torch.bfloat16:
        raise QuantizationError(f"scaled_matmul_grouped writes bfloat16, asked for {out_dtype}: use the "
                                "emulation (fp8fx.matmul) for other result dtypes")
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    m, k = a.shape[-2], a.shape[-1]
    n = b.shape[-1]
    pk, pn = _pad_to(k), _pad_to(n)
    bt = b.transpose(-2, -1)  # [..., N, K]: its contiguous copy is B column-major (k itself for Q·Kᵀ)
    if not statically_known_true(pk == 0) or not statically_known_true(pn == 0):
        a = F.pad(a, (0, pk))
        bt = F.pad(bt, (0, pk, 0, pn))
    kp, np_ = k + pk, n + pn
    qa = _contiguous(_quantize(a.expand(*batch, m, kp).reshape(-1, m, kp), scale_a, fp8_max, fp8_dtype))
    qbt = _contiguous(_quantize(bt.expand(*batch, np_, kp).reshape(-1, np_, kp), scale_b, fp8_max, fp8_dtype))
    g = qa.shape[0]
    sa = torch.full((g, m), _folded_scale(scale_a, scale_b), dtype=torch.float32, device=a.device)
    sb = torch.ones((g, np_), dtype=torch.float32, device=a.device)
    out = torch._scaled_grouped_mm(qa, qbt.transpose(-2, -1), sa, sb, out_dtype=torch.bfloat16)
    return out.narrow(-1, 0, n).unflatten(0, batch)  # a view: no guard on whether N was padded


_FORMS = {"mm": scaled_matmul_2d, "grouped": scaled_matmul_grouped}


# ---------------------------------------------------------------------------------------- planning
@dataclass
class _CudaPlan:
    node: fx.Node
    form: str                   # "mm" | "grouped"
    args: tuple


def _recorded(arg: Any) -> Any:
    """The example value the graph records for ``arg``; for an ``fp8fx::qdq`` node the rewrite
    inserted (which has none), its input's: a round trip keeps shape, dtype and device."""
    value = _value(arg)
    if value is None and isinstance(arg, fx.Node):
        op = _fp8fx_attention_op(arg)
        if op is not None and op[0] == "qdq":
            return _recorded(_bind_args(arg, "qdq")["x"])
    return value


def _shape(arg: Any) -> tuple | None:
    shape = getattr(_recorded(arg), "shape", None)
    return tuple(shape) if shape is not None else None


def _dtype(arg: Any) -> torch.dtype | None:
    dtype = getattr(_recorded(arg), "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _cuda_device(*args: Any) -> torch.device | None:
    """The CUDA device the graph records for any of ``args``, else None (not a CUDA node)."""
    for a in args:
        dev = getattr(_recorded(a), "device", None)
        if isinstance(dev, torch.device) and dev.type == "cuda":
            return dev
    return None


def _capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def _batch_is_one(shape: tuple) -> bool:
    return all(statically_known_true(d == 1) for d in shape[:-2])


def _plan_matmul(node: fx.Node, args: dict[str, Any], device: torch.device) -> _CudaPlan | str:
    if torch.version.hip is not None:
        return "rocm"
    if _capability(device) < _MIN_CAPABILITY:
        return "capability"
    if args["fp8_dtype"] != E4M3.dtype:
        return "matmul_e5m2"
    sa, sb = _shape(args["a"]), _shape(args["b"])
    da, db = _dtype(args["a"]), _dtype(args["b"])
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2 or da is None or db is None:
        return "matmul_shape"
    out_dtype = torch.promote_types(da, db)
    call = (args["a"], args["b"], args["scale_a"], args["scale_b"], args["fp8_max"], args["fp8_dtype"], out_dtype)
    if _batch_is_one(sb):
        return _CudaPlan(node, "mm", call)
    if _capability(device)[0] != 9:
        return "matmul_arch"
    if out_dtype != torch.bfloat16:
        return "matmul_dtype"
    return _CudaPlan(node, "grouped", call)


def _kept(name: str, key: str) -> str:
    return f"kept as fp8fx.{name} (its decomposition is compiled): {KEPT_REASONS[key]}"


def plan_cuda_attention(gm: fx.GraphModule) -> list[_CudaPlan]:
    """Decide every CUDA attention node of ``gm``; writes ``node.meta["fp8fx_cuda"]`` and changes
    nothing else. Raises QuantizationError on arguments fp8fx's rewrite cannot have written."""
    plans = []
    for node in attention_nodes(gm):
        device = _cuda_device(*node.args, *node.kwargs.values())
        if device is None:  # not a CUDA node: left as it is, unchecked
            continue
        name, heads = _fp8fx_attention_op(node)
        args = _bind_args(node, name)
        if heads:
            node.meta[META_KEY] = _kept(name, "heads")
            continue
        if name == "matmul":  # the one op lowered: its scales become constants of the GEMM
            args.update(_scales(node, name, args))  # constants, positive and finite, or raise
            fp8_max = args["fp8_max"]
            if not isinstance(fp8_max, (int, float)) or isinstance(fp8_max, bool) or not math.isfinite(fp8_max):
                raise QuantizationError(f"node {node.name!r}: fp8fx.matmul's fp8_max must be a constant number, "
                                        f"got {fp8_max!r}; re-run the fp8fx backend instead of editing the graph")
            result = _plan_matmul(node, args, device)
        else:
            result = {"sdpa": "sdpa", "qdq": "qdq"}.get(name, "kv")
        if isinstance(result, str):
            node.meta[META_KEY] = _kept(name, result)
        else:
            node.meta[META_KEY] = LOWERED[result.form]
            plans.append(result)
    return plans


def lower_attention_for_cuda(gm: fx.GraphModule) -> dict[str, str]:
    """Lower the CUDA attention nodes of ``gm`` in place (module docstring); returns
    ``{node name: note}`` for every CUDA attention node (lowered or kept). A graph without CUDA
    attention nodes is returned unchanged (``{}``)."""
    plans = plan_cuda_attention(gm)  # every check before any change
    for plan in plans:
        node = plan.node
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(_FORMS[plan.form], plan.args)
        new.meta.update(node.meta)  # example value, module stack, the note
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    if plans:
        gm.graph.lint()
        gm.recompile()
    return lowered_nodes(gm)


def lowered_nodes(gm: fx.GraphModule) -> dict[str, str]:
    """``{node name: note}`` of every node that :func:`lower_attention_for_cuda` decided."""
    return {n.name: n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta}


def explain_notes(decisions: list, target: str) -> dict[str, str]:
    """What the CUDA lowering will do with each quantized attention-path decision, by kind (for
    ``fp8fx.explain`` with target ``cuda``; the per-node outcome is in the compiled graph)."""
    if target != "cuda":
        return {}
    return {d.match.name: _KIND_NOTES[d.match.kind.value] for d in decisions
            if d.quantize and d.match.kind.value in _KIND_NOTES}
