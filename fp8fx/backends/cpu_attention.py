"""Inductor lowering of ``fp8fx::sdpa`` on the CPU: FP8 codes into Inductor's own GEMMs and reductions.

What Inductor got before: the attention ops are ``CompositeImplicitAutograd`` (see
:mod:`fp8fx.attention_ops`), so AOTAutograd traces their reference kernels into aten ops before
any decomposition table is looked at (an entry for them in Inductor's table, or a
``py_impl``, is never consulted: AOTAutograd decomposes them below the Python dispatcher).
There is no fallback kernel per op; what runs is the reference's arithmetic, fused where
Inductor can: q, k and v dequantized to float32 values (``q8 * s``), the keys and values
*repeated per query head* for grouped-query attention (``repeat_interleave``: a float32
``[B, H, S_k, D]`` copy of K and of V per call, three times the KV cache for SmolLM2's 9/3
heads), a float32 ``bmm`` for ``Q·Kᵀ`` and for ``P·V``.

What this module does instead: :func:`lower_cpu_attention` replaces each ``fp8fx::sdpa`` node
(both overloads) of a QUANTIZE graph by :func:`sdpa_cpu`, which AOTAutograd traces instead of
the reference. On a CPU tensor it computes the same definition in another order:

* **Scales leave the GEMMs.** The operands are the FP8 codes (``saturate(x / s)`` cast to FP8
  and back, exact in float32), so ``Q·Kᵀ = (q8·k8ᵀ) · s_q·s_k`` and ``P·V = (p8·v8) · s_p·s_v``
  with the scales in the pointwise epilogue (the softmax kernel, the output quantization).
  With power-of-two scales (``maxabs_hw``, ``maxabs_pow2``) every product is exact, so this is
  the reference's arithmetic up to the summation order; with arbitrary scales the scaled
  operands of the reference are rounded once more, and the two differ in the last float32 bit.
* **No repeated K/V.** The ``H = H_kv · r`` query heads are viewed as ``[B, H_kv, r·S, D]``
  (a view of contiguous q), so each KV head's codes are multiplied once against its ``r``
  query heads: no per-query-head copy of the keys or values.
* **One C++ call.** Where the C++ extension is built (:func:`fp8fx.kernels.gemv.status`), the
  whole op is ``fp8fx_cpp::sdpa_fp8``
  (:mod:`fp8fx.kernels.attention_cpp`): the same float32 operations in the same order, one
  block of 32 query positions at a time (the block's scores in cache through the mask, the
  softmax and the probabilities' FP8 rounding; no ``[B, H, S, S_k]`` float32 tensor), and a
  causal prefill never multiplies the keys past a block's last row. Bit-identical to the torch
  ops below (``tests/test_cpu_attention.py``); Inductor calls it as one extern kernel.
* **The kernel reads the FP8 cache.** Where K and V are reads of FP8 caches (``fp8fx::dequant``
  nodes with constant scales, what the FP8 KV-cache layers of :mod:`fp8fx.kv_cache` return),
  :func:`lower_cpu_attention` points the node at :func:`sdpa_cpu_kv` on the FP8 tensors and
  the reads' scales, and the reads leave the graph: ``fp8fx_cpp::sdpa_fp8_kv`` does the read
  (bit for bit ``dequant``: ``x8 · s`` in float32, rounded to the read's dtype) and the
  re-quantization row by row, at a prompt and at decode (one query row) alike.
* **Without the C++ extension**, decode (``S == 1``, static in a decode graph) writes the two
  products as broadcast-multiply-and-sum, which Inductor generates as reductions that load the
  cache's FP8 bytes through the read and the re-quantization; Inductor inlines the query's
  producers (the rotary embedding, the quantization) into them and recomputes them for every
  key, which is why the C++ kernel takes decode too where it is built (29 ms per layer and
  step at 2040 keys under AVX2 in the reductions, about 1.0 ms in the kernel). More rows
  (prefill) are ``bmm`` (float32, MKL/oneDNN) on float32 codes: the GEMM needs its operands in
  memory, and float32 keeps the reference's precision (a bfloat16 GEMM on CPU returns
  bfloat16, which would round the scores; ``bmm`` with ``out_dtype`` is CUDA-only).

The softmax, the masks (causal, boolean, additive), the fully-masked-row rule and the two FP8
roundings (probabilities with ``s_p``, output with ``s_o``) are the reference's ops, in the
same order. Tensors not on the CPU, fewer than 4 dims, or K/V with a batch shape other than
q's keep the reference kernel (the node's original op).

Only ``fp8fx::sdpa`` is lowered here: ``fp8fx::matmul`` already multiplies the codes and scales
after, ``qdq``/``dequant``/``kv_append`` are pointwise (plus a ``cat``) and fuse as they are;
:func:`lower_cpu_attention` leaves them to AOTAutograd's decomposition.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import Tensor

from fp8fx import attention_ops, numerics
from fp8fx.fp8 import FORMATS
from fp8fx.kernels import attention_cpp, gemv

__all__ = ["lower_cpu_attention", "register_cpu_attention", "sdpa_cpu", "sdpa_cpu_kv"]

Scale = Union[float, Sequence[float]]


def _codes(x: Tensor, scale: Scale, fp8_max: float, fp8_dtype: torch.dtype, what: str = "tensor") -> Tensor:
    """The FP8 codes of ``x`` as float32 values (exact): the reference's quantization."""
    s = attention_ops.head_scale(x, scale, what) if isinstance(scale, (list, tuple)) else scale
    return numerics.quantize_fp32(x, s, fp8_dtype, fp8_max).to(torch.float32)


def _factor(like: Tensor, scale: Scale) -> Union[float, Tensor]:
    """A scale as a multiplier of ``like`` (``[B, H, ...]``): the float, or ``[H, 1, 1]``."""
    return attention_ops.head_scale(like, scale) if isinstance(scale, (list, tuple)) else float(scale)


def _one_row(size: object) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(size == 1))


def _lowerable(q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool) -> bool:
    if q.device.type != "cpu" or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    if tuple(k.shape[:-3]) != tuple(q.shape[:-3]) or tuple(v.shape[:-3]) != tuple(q.shape[:-3]):
        return False
    h, hk = q.shape[-3], k.shape[-3]
    if hk != v.shape[-3] or not isinstance(h, int) or not isinstance(hk, int) or h % hk:
        return False
    return hk == h or enable_gqa or hk == 1  # the reference broadcasts one KV head even without gqa


def _grouped(x: Tensor, hk: int) -> Tensor:
    """``[B, H, S, D]`` as ``[B, H_kv, r·S, D]`` (the ``r`` query heads of each KV head in a row)."""
    b, h, s, d = x.shape
    return x.reshape(b, hk, (h // hk) * s, d)


def _scores(cq: Tensor, ck: Tensor) -> Tensor:
    """``cq · ckᵀ`` as ``[B, H, S, S_k]`` float32, per KV head group."""
    b, h, s, d = cq.shape
    hk = ck.shape[-3]
    if _one_row(s):  # decode: a reduction over D that reads the keys where they are
        qg = cq.reshape(b, hk, h // hk, 1, d)
        out = (qg * ck.unsqueeze(-3)).sum(-1)  # [B, H_kv, r, S_k]
        return out.reshape(b, h, 1, ck.shape[-2])
    return torch.matmul(_grouped(cq, hk), ck.transpose(-2, -1)).reshape(b, h, s, ck.shape[-2])


def _apply(cp: Tensor, cv: Tensor) -> Tensor:
    """``cp · cv`` as ``[B, H, S, D]`` float32, per KV head group."""
    b, h, s, sk = cp.shape
    hk, d = cv.shape[-3], cv.shape[-1]
    if _one_row(s):  # decode: a reduction over S_k
        pg = cp.reshape(b, hk, h // hk, sk, 1)
        out = (pg * cv.unsqueeze(-3)).sum(-2)  # [B, H_kv, r, D]
        return out.reshape(b, h, 1, d)
    return torch.matmul(_grouped(cp, hk), cv).reshape(b, h, s, d)


def sdpa_cpu(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool,
             scale: Optional[float], enable_gqa: bool, scale_q: Scale, scale_k: Scale, scale_v: Scale,
             scale_p: float, scale_o: float, fp8_max: float, fp8_dtype: torch.dtype) -> Tensor:
    """``fp8fx::sdpa`` (or ``.heads``, by the scales' type) as the module docstring describes."""
    args = (q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, scale_q, scale_k, scale_v, scale_p,
            scale_o, fp8_max, fp8_dtype)
    if not _lowerable(q, k, v, enable_gqa):
        op = torch.ops.fp8fx.sdpa.heads if isinstance(scale_q, (list, tuple)) else torch.ops.fp8fx.sdpa.default
        return op(*args)
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    op = gemv.sdpa_op()
    if op is not None:
        return attention_cpp.call(op, q, k, v, attn_mask, is_causal, sm_scale, scale_q, scale_k, scale_v,
                                  scale_p, scale_o, fp8_max, fp8_dtype)
    cq, ck, cv = (_codes(t, s, fp8_max, fp8_dtype, what)
                  for t, s, what in ((q, scale_q, "query"), (k, scale_k, "key"), (v, scale_v, "value")))
    qk = _factor(q, scale_q) * _factor(q, scale_k)  # [H, 1, 1] for per-head scales (KV heads repeated)
    scores = _scores(cq, ck) * qk * sm_scale
    probs = attention_ops.masked_softmax(scores, attn_mask, is_causal)
    cp = _codes(probs, scale_p, fp8_max, fp8_dtype)
    out = _apply(cp, cv) * (float(scale_p) * _factor(q, scale_v))
    return numerics.dequantize(_codes(out, scale_o, fp8_max, fp8_dtype), scale_o).to(q.dtype)


def _dequant(x8: Tensor, read: Scale, dtype: torch.dtype) -> Tensor:
    """The cache read the graph had: ``fp8fx::dequant`` (``.heads`` for a per-head list)."""
    if isinstance(read, (list, tuple)):
        return torch.ops.fp8fx.dequant.heads(x8, list(read), dtype)
    return torch.ops.fp8fx.dequant.default(x8, read, dtype)


def sdpa_cpu_kv(q: Tensor, k8: Tensor, v8: Tensor, k_read: Scale, v_read: Scale, kv_dtype: torch.dtype,
                attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool, scale: Optional[float],
                enable_gqa: bool, scale_q: Scale, scale_k: Scale, scale_v: Scale, scale_p: float, scale_o: float,
                fp8_max: float, fp8_dtype: torch.dtype) -> Tensor:
    """:func:`sdpa_cpu` on ``fp8fx::dequant(k8, k_read, kv_dtype)`` and ``(v8, v_read, ...)``:
    where the C++ kernel applies, it reads the FP8 caches itself (``fp8fx_cpp::sdpa_fp8_kv``), so
    no dequantized copy of the cache is made in the graph; elsewhere the two reads, then
    :func:`sdpa_cpu`."""
    op = gemv.sdpa_kv_op()
    if (op is not None and _lowerable(q, k8, v8, enable_gqa) and kv_dtype in attention_cpp.KV_DTYPES
            and k8.dtype in FORMATS and v8.dtype in FORMATS):
        sm_scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        return attention_cpp.call_kv(op, q, k8, v8, k_read, v_read, kv_dtype, attn_mask, is_causal, sm_scale,
                                     scale_q, scale_k, scale_v, scale_p, scale_o, fp8_max, fp8_dtype)
    return sdpa_cpu(q, _dequant(k8, k_read, kv_dtype), _dequant(v8, v_read, kv_dtype), attn_mask, dropout_p,
                    is_causal, scale, enable_gqa, scale_q, scale_k, scale_v, scale_p, scale_o, fp8_max, fp8_dtype)


def _targets() -> dict:
    return {torch.ops.fp8fx.sdpa.default: sdpa_cpu, torch.ops.fp8fx.sdpa.heads: sdpa_cpu}


def _cache_read(node: object) -> Optional[tuple]:
    """``(x8, scale, dtype)`` of a ``fp8fx::dequant`` node whose scale is a constant (a float, or
    a list of floats for ``.heads``); None for anything else."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and not node.kwargs
            and node.target in (torch.ops.fp8fx.dequant, torch.ops.fp8fx.dequant.default,
                                torch.ops.fp8fx.dequant.heads)):
        return None
    if len(node.args) != 3:
        return None
    x8, read, dtype = node.args
    heads = isinstance(read, (list, tuple))
    if node.target is not torch.ops.fp8fx.dequant and heads != (node.target is torch.ops.fp8fx.dequant.heads):
        return None
    constant = all(isinstance(v, float) for v in read) if heads else isinstance(read, float)
    return (x8, read, dtype) if constant and isinstance(dtype, torch.dtype) else None


def lower_cpu_attention(gm: fx.GraphModule) -> int:
    """Point every ``fp8fx::sdpa`` node of ``gm`` at :func:`sdpa_cpu` (which keeps the reference
    kernel off the CPU); returns how many. Run it on a QUANTIZE graph right before Inductor."""
    table = _targets()
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in table:
            reads = [_cache_read(a) for a in node.args[1:3]] if not node.kwargs else [None]
            if all(r is not None for r in reads) and reads[0][2] == reads[1][2]:
                # K and V read from FP8 caches: the kernel takes the FP8 bytes and the reads' scales
                (k8, k_read, dtype), (v8, v_read, _) = reads
                old = node.args[1:3]
                node.args = (node.args[0], k8, v8, k_read, v_read, dtype, *node.args[3:])
                node.target = sdpa_cpu_kv
                node.meta["fp8fx_cpu_attention"] = "sdpa_cpu_kv"
                for read in old:
                    if not read.users:
                        gm.graph.erase_node(read)
            else:
                node.target = table[node.target]
                node.meta["fp8fx_cpu_attention"] = "sdpa_cpu"
            count += 1
    if count:
        gm.recompile()
    return count


def _cache_tag() -> str:
    digest = hashlib.sha256()
    for module in (__file__, attention_ops.__file__, numerics.__file__, attention_cpp.__file__):
        try:
            digest.update(Path(module).read_bytes())
        except (OSError, TypeError):  # not plain files: the function's bytecode
            digest.update(sdpa_cpu.__code__.co_code)
    return f"fp8fx-cpu-attention-{digest.hexdigest()[:16]}"


def register_cpu_attention() -> None:
    """Put this lowering's source hash into ``torch.compiler.config.cache_key_tag`` (idempotent),
    as :func:`fp8fx.backends.inductor.register_lowering` does for its own: AOTAutograd's cache
    keys on the graph before tracing, which names :func:`sdpa_cpu` but not its code."""
    from torch.compiler import config as compiler_config

    tag = _cache_tag()
    current = compiler_config.cache_key_tag
    if tag not in current.split("|"):
        compiler_config.cache_key_tag = f"{current}|{tag}" if current else tag
