"""Gaudi (HPU) lowering of fp8fx's attention ops: matmul, softmax, SDPA and the KV cache.

:func:`fp8fx.backends.hpu.lower_to_hpu` calls this module after it has planned the Linears: every
``fp8fx::matmul`` / ``qdq`` / ``sdpa`` / ``kv_append`` / ``kv_index_copy_`` / ``dequant`` node
becomes the op sequence Intel Neural Compressor (INC) runs on Gaudi for the same kind, or is kept
(its reference kernel runs) with a one-line reason in ``node.meta["fp8fx_hpu"]``.

Mapping (fp8fx's convention ``x ~= q * s``; every Gaudi scale is a 0-d float32 buffer of the
GraphModule; ``Q(x, s)`` is ``hpu.cast_to_fp8_v2(x, 1/s, False, False, fp8_dtype)[0]``)
-----------------------------------------------------------------------------------------------
==================================  ============================================================
fp8fx                               Gaudi
==================================  ============================================================
``matmul(a, b, s_a, s_b)``          ``hpu.fp8_gemm_v2(Q(a, s_a), False, Q(b, s_b), False, None,
                                    out_dtype, s_a, s_b, None, False)`` (INC's PatchedMatmul:
                                    QuantInput on both operands, QuantizedHpuMatmul)
``qdq(softmax(x), s)`` (bf16 x,     ``hpu.cast_from_fp8(hpu.softmax_fp8(x, dim, 1.0, 1/s, None,
E4M3, the softmax has no other      None), s, out_dtype)`` (INC's PatchedSoftmax: input scale 1,
user)                               output scale 1/s, DequantOutput with s)
any other ``qdq(x, s)`` (a KV-cache ``hpu.cast_from_fp8(Q(x, s), s, x.dtype)`` (INC's
write, a float32 softmax)           QuantInput + DequantOutput pair, PatchedKVCache's write+read)
``sdpa(q, k, v, mask, ...,          ``hpu.fp8_sdpa_recomp_fwd(Q(q, s_q), Q(k, s_k), Q(v, s_v),
s_q, s_k, s_v, s_p, s_o)``          mask', 0.0, scale, is_causal, False, "none", d_scale_q=s_q,
                                    d_scale_k=s_k, d_scale_v=s_v, q_scale_s=1/s_p,
                                    q_scale_o=1/s_o, d_scale_s=s_p, False, False, None, "none")[0]``
                                    then ``hpu.cast_from_fp8(·, s_o, q.dtype)`` (INC's
                                    PatchedModuleFusedSDPA.forward_quant and its DequantOutput)
``kv_append(past, new, s)``         ``aten.cat([past, Q(new, s)], -2)`` (FP8 past) or ``Q(new, s)``
                                    (the empty first-call past)
``kv_index_copy_(cache, d, i,       ``aten.index_copy_`` of ``Q(new, s)`` into the FP8 cache, both
new, s)``                           viewed as uint8 (a byte copy; torch has no FP8 index_copy)
``dequant(x8, s, dtype)``           ``hpu.cast_from_fp8(x8, s, dtype)``
==================================  ============================================================

SDPA details: ``scale=None`` becomes ``1/sqrt(head_dim)`` (what ``hpex.kernels.fp8_fused_sdpa``
computes); a boolean mask becomes an additive one in q's dtype (0 where True, the dtype's lowest
finite value where False: Intel's FP8 SDPA tests use float masks), so a fully masked row gives
uniform probabilities where fp8fx's definition gives zeros; grouped-query attention (``enable_gqa``
with H_kv > 1 KV heads) is reshaped as ``hpex.kernels.fp8_fused_sdpa`` does it (q to
``[B, H_kv, H/H_kv, S, D]``, k and v to ``[B, H_kv, 1, S, D]``, the mask likewise), after the casts;
one KV head (MQA) broadcasts as it is. ``softmax_mode "none"`` and ``seq_padding_type "none"`` are
the lower-cased values the Python wrapper hands the op for INC's arguments.

Kept (the node and its reference kernel stay; reason in ``node.meta["fp8fx_hpu"]``): the ``.heads``
overloads (per-head scales), SDPA or softmax in E5M2 (both Gaudi ops write E4M3 only), SDPA with
both a mask and ``is_causal`` or ``is_causal`` with query and key lengths not known to be equal,
SDPA whose head counts or head dim the graph does not record, and KV ops whose cache dtype the graph
does not record as FP8 (see :data:`KEPT_REASONS`).

Saturation: the Gaudi casts saturate at the hardware range (±240 Gaudi2, ±448 Gaudi3), not at the
node's ``fp8_max``: the same as the Linear lowering, and what INC does.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import attention_ops  # noqa: F401  (registers torch.ops.fp8fx.qdq/matmul/sdpa/...)
from ..errors import QuantizationError
from ..fp8 import E4M3, FP8_DTYPES

__all__ = ["ATTENTION_HPU_OPS", "ATTENTION_OPS", "KEPT_REASONS", "attention_nodes", "plan_attention",
           "emit_attention"]

#: the Gaudi ops the attention lowering may emit (torch.ops.hpu.<name>)
ATTENTION_HPU_OPS = ("cast_to_fp8_v2", "cast_from_fp8", "fp8_gemm_v2", "softmax_fp8", "fp8_sdpa_recomp_fwd")
#: fp8fx ops of the attention path, with their schema argument names
ATTENTION_OPS = {
    "matmul": ("a", "b", "scale_a", "scale_b", "fp8_max", "fp8_dtype"),
    "qdq": ("x", "scale", "fp8_max", "fp8_dtype"),
    "sdpa": ("q", "k", "v", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa", "scale_q", "scale_k",
             "scale_v", "scale_p", "scale_o", "fp8_max", "fp8_dtype"),
    "kv_append": ("past", "new", "scale", "fp8_max", "fp8_dtype"),
    "kv_index_copy_": ("cache", "dim", "index", "new", "scale", "fp8_max", "fp8_dtype"),
    "dequant": ("x", "scale", "dtype"),
}
_SCALE_ARGS = {"matmul": ("scale_a", "scale_b"), "qdq": ("scale",), "kv_append": ("scale",),
               "kv_index_copy_": ("scale",), "dequant": ("scale",),
               "sdpa": ("scale_q", "scale_k", "scale_v", "scale_p", "scale_o")}
#: why a node keeps its fp8fx op (one line each; written into node.meta["fp8fx_hpu"])
KEPT_REASONS = {
    "heads": "per-head scales: the Gaudi casts and fp8_fused_sdpa's d_scale_q/k/v take one scale per tensor "
             "as INC uses them (per-row scales only for 2-D weights); no documented form scales dim -3",
    "sdpa_e5m2": "E5M2 attention: fp8_sdpa_recomp_fwd writes its FP8 probabilities and output as E4M3 only",
    "softmax_e5m2": "handled as a cast round trip: softmax_fp8 writes E4M3 only",
    "sdpa_mask_and_causal": "SDPA with both a mask and is_causal: Gaudi's fused SDPA takes one or the other",
    "sdpa_causal_lengths": "is_causal with query and key lengths not known to be equal: the alignment of "
                           "Gaudi's triangular mask for S_q != S_k is not documented",
    "sdpa_shape": "the graph does not record the head counts / head dim this SDPA needs (static shapes of "
                  "q and k at dims -3 and -1)",
    "sdpa_gqa": "grouped-query attention with a mask that is not 4-D: the 5-D form of fp8_fused_sdpa needs "
                "a [B, H or 1, S_q, S_k] mask",
    "sdpa_dropout": "dropout_p > 0: FP8 attention is lowered for inference only",
    "kv_past": "the first KV-cache write's past tensor is neither FP8 nor known to be empty in the graph",
    "kv_cache_dtype": "the static cache buffer is not recorded as FP8 in the graph",
}
_SOFTMAX_FNS = {torch.softmax, torch.nn.functional.softmax, torch._softmax, torch.ops.aten._softmax.default,
                torch.ops.aten.softmax.int}
_VALUE_META = ("val", "example_value", "tensor_meta")


# ---------------------------------------------------------------------------------------- graph facts
def _fp8fx_attention_op(node: fx.Node) -> tuple[str, bool] | None:
    """``(op name, per-head overload)`` of an fp8fx attention-path node, else None."""
    if node.op != "call_function":
        return None
    for name in ATTENTION_OPS:
        packet = getattr(torch.ops.fp8fx, name)
        if node.target is packet.default:
            return name, False
        if "heads" in packet.overloads() and node.target is packet.heads:
            return name, True
        if node.target is packet:  # a packet call: the overload follows the scale's type
            bound = _bind_args(node, name)
            return name, any(isinstance(bound.get(k), (list, tuple)) for k in _SCALE_ARGS[name])
    return None


def attention_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Every fp8fx attention-path node of ``gm``, in graph order."""
    return [n for n in gm.graph.nodes if _fp8fx_attention_op(n) is not None]


def _bind_args(node: fx.Node, name: str) -> dict[str, Any]:
    names = ATTENTION_OPS[name]
    if len(node.args) > len(names):
        raise QuantizationError(f"node {node.name!r}: fp8fx.{name} takes {len(names)} arguments {names}, got "
                                f"{len(node.args)} positional ones; re-capture the model")
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    missing = [k for k in names if k not in bound]
    if missing:
        raise QuantizationError(f"node {node.name!r}: fp8fx.{name} call lacks arguments {missing}; re-capture "
                                "the model")
    return bound


def _value(arg: Any) -> Any:
    """The example value (fake tensor, SymInt, ...) the capture recorded for ``arg``, or None."""
    if not isinstance(arg, fx.Node):
        return arg
    for key in ("val", "example_value"):
        if key in arg.meta:
            return arg.meta[key]
    return arg.meta.get("tensor_meta")


def _dtype(arg: Any) -> torch.dtype | None:
    v = _value(arg)
    dtype = getattr(v, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _shape(arg: Any) -> tuple | None:
    v = _value(arg)
    shape = getattr(v, "shape", None)
    return tuple(shape) if shape is not None else None


def _static_int(v: Any) -> int | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, torch.SymInt):
        expr = v.node.expr
        return int(expr) if getattr(expr, "is_number", False) else None
    return None


def _device(*args: Any) -> torch.device:
    for a in args:
        dev = getattr(_value(a), "device", None)
        if isinstance(dev, torch.device) and dev.type != "meta":
            return dev
    return torch.device("cpu")


def _is_softmax(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target == "softmax"
    return node.op == "call_function" and node.target in _SOFTMAX_FNS


def _softmax_args(node: fx.Node) -> tuple[Any, Any, torch.dtype | None]:
    """``(input, dim, dtype)`` of a softmax call in any of its spellings (dtype None: the input's)."""
    args, kw = list(node.args), dict(node.kwargs)
    x = args[0] if args else kw.get("input", kw.get("self"))
    dim = args[1] if len(args) > 1 else kw.get("dim")
    if node.target in (torch._softmax, torch.ops.aten._softmax.default):
        half_to_float = args[2] if len(args) > 2 else kw.get("half_to_float", False)
        return x, dim, torch.float32 if half_to_float else None
    if node.target is torch.nn.functional.softmax:
        dtype = args[3] if len(args) > 3 else kw.get("dtype")
    else:
        dtype = args[2] if len(args) > 2 else kw.get("dtype")
    return x, dim, dtype


# ---------------------------------------------------------------------------------------- planning
@dataclass
class _Plan:
    node: fx.Node
    name: str
    args: dict[str, Any]
    form: str                                 # how emit rewrites it
    extra: dict[str, Any] = field(default_factory=dict)


def _scales(node: fx.Node, name: str, args: dict[str, Any]) -> dict[str, float]:
    """The node's scales as floats: constants (the graph rewrite writes them), or floats dynamo
    lifted into graph inputs (an FP8 cache layer's scales, traced from its KVQuant), read from the
    example value dynamo recorded; checked positive and finite."""
    from .hpu import _constant_number

    out = {}
    for key in _SCALE_ARGS[name]:
        s = _constant_number(args[key])
        if s is None or not s > 0 or not math.isfinite(s):
            raise QuantizationError(f"node {node.name!r}: fp8fx.{name} argument {key} must be a positive constant "
                                    f"float (as fp8fx writes it), got {args[key]!r}; re-run fp8fx.convert / the "
                                    "fp8fx backend instead of editing the graph")
        out[key] = s
    if name != "dequant" and args["fp8_dtype"] not in FP8_DTYPES:
        raise QuantizationError(f"node {node.name!r}: fp8fx.{name} has fp8_dtype {args['fp8_dtype']!r}, not an FP8 "
                                "dtype; re-capture the model")
    return out


def _keep(node: fx.Node, name: str, key: str) -> None:
    node.meta["fp8fx_hpu"] = f"kept as fp8fx.{name} (its reference kernel runs): {KEPT_REASONS[key]}"


def _plan_sdpa(node: fx.Node, args: dict[str, Any]) -> _Plan | str:
    if args["fp8_dtype"] != E4M3.dtype:
        return "sdpa_e5m2"
    p = args["dropout_p"]
    if not (isinstance(p, (int, float)) and p == 0):
        return "sdpa_dropout"
    mask, causal = args["attn_mask"], args["is_causal"]
    if not isinstance(causal, bool) or not isinstance(args["enable_gqa"], bool):
        return "sdpa_shape"
    if causal and mask is not None:
        return "sdpa_mask_and_causal"
    qs, ks = _shape(args["q"]), _shape(args["k"])
    if qs is None or ks is None or len(qs) < 3 or len(qs) != len(ks):
        return "sdpa_shape"
    if causal and not statically_known_true(qs[-2] == ks[-2]):
        return "sdpa_causal_lengths"
    head_dim, hq, hkv = _static_int(qs[-1]), _static_int(qs[-3]), _static_int(ks[-3])
    scale = args["scale"]
    if scale is None:
        if head_dim is None:
            return "sdpa_shape"
        scale = 1.0 / math.sqrt(head_dim)
    gqa = None
    if args["enable_gqa"]:
        if hq is None or hkv is None:
            return "sdpa_shape"
        if hq != hkv and hkv != 1:
            if len(qs) != 4 or hq % hkv:
                return "sdpa_shape"
            mshape = _shape(mask) if mask is not None else None
            if mask is not None and (mshape is None or len(mshape) != 4 or _static_int(mshape[1]) not in (1, hq)):
                return "sdpa_gqa"
            gqa = (hkv, hq // hkv, None if mask is None else _static_int(mshape[1]))
    q_dtype = _dtype(args["q"])
    if q_dtype is None:
        return "sdpa_shape"
    return _Plan(node, "sdpa", args, "sdpa", {"scale": scale, "gqa": gqa, "out_dtype": q_dtype,
                                              "bool_mask": mask is not None and _dtype(mask) == torch.bool})


def _plan_qdq(node: fx.Node, args: dict[str, Any], out_dtype: torch.dtype | None) -> _Plan:
    x = args["x"]
    x_dtype = _dtype(x) or out_dtype
    if x_dtype is None:
        raise QuantizationError(f"node {node.name!r}: the dtype of its input {getattr(x, 'name', x)!r} is not "
                                "recorded in the graph, and cast_from_fp8 needs it up front. Capture with dynamo or "
                                "torch.export, run ShapeProp first, or pass out_dtype= to lower_to_hpu")
    if _is_softmax(x) and len(x.users) == 1 and args["fp8_dtype"] == E4M3.dtype:
        inp, dim, _ = _softmax_args(x)
        if isinstance(dim, int) and _dtype(inp) == torch.bfloat16:
            return _Plan(node, "qdq", args, "softmax", {"softmax": x, "dim": dim, "out_dtype": x_dtype})
    note = None
    if _is_softmax(x):
        note = ("softmax_fp8 takes bfloat16 (or E4M3) input and writes E4M3; this softmax "
                f"({_dtype(_softmax_args(x)[0])} input, {args['fp8_dtype']}) keeps its aten softmax and its "
                "output goes through cast_to_fp8_v2 + cast_from_fp8")
    return _Plan(node, "qdq", args, "cast_pair", {"out_dtype": x_dtype, "note": note})


def _plan_one(node: fx.Node, name: str, heads: bool, out_dtype: torch.dtype | None) -> _Plan | str:
    args = _bind_args(node, name)
    if heads:
        return "heads"
    args.update(_scales(node, name, args))
    if name == "matmul":
        da, db = _dtype(args["a"]), _dtype(args["b"])
        dtype = torch.promote_types(da, db) if da is not None and db is not None else out_dtype
        if dtype is None:
            raise QuantizationError(f"node {node.name!r}: the dtypes of fp8fx.matmul's operands are not recorded in "
                                    "the graph, and fp8_gemm_v2 needs its out_dtype up front. Capture with dynamo or "
                                    "torch.export, run ShapeProp first, or pass out_dtype= to lower_to_hpu")
        return _Plan(node, name, args, "matmul", {"out_dtype": dtype})
    if name == "qdq":
        return _plan_qdq(node, args, out_dtype)
    if name == "sdpa":
        return _plan_sdpa(node, args)
    if name == "kv_append":
        past = args["past"]
        if _dtype(past) == args["fp8_dtype"]:
            return _Plan(node, name, args, "kv_cat")
        shape = _shape(past)
        if shape is not None and any(statically_known_true(d == 0) for d in shape):
            return _Plan(node, name, args, "kv_first")
        return "kv_past"
    if name == "kv_index_copy_":
        if _dtype(args["cache"]) != args["fp8_dtype"]:
            return "kv_cache_dtype"
        return _Plan(node, name, args, "kv_copy")
    return _Plan(node, name, args, "dequant")


def plan_attention(gm: fx.GraphModule, out_dtype: torch.dtype | None = None) -> list[_Plan]:
    """Check every fp8fx attention node of ``gm`` and decide its Gaudi form; no graph change except
    the ``node.meta["fp8fx_hpu"]`` reason on nodes that are kept. Raises QuantizationError on a node
    whose arguments fp8fx's rewrite cannot have written."""
    plans = []
    for node in attention_nodes(gm):
        name, heads = _fp8fx_attention_op(node)
        result = _plan_one(node, name, heads, out_dtype)
        if isinstance(result, str):
            _keep(node, name, result)
        else:
            result.extra["scales"] = {k: result.args[k] for k in _SCALE_ARGS[name]}
            plans.append(result)
    return plans


def needed_ops(plans: list[_Plan]) -> set[str]:
    """The Gaudi ops that ``plans`` will emit."""
    ops: set[str] = set()
    for p in plans:
        ops |= {"matmul": {"cast_to_fp8_v2", "fp8_gemm_v2"}, "softmax": {"softmax_fp8", "cast_from_fp8"},
                "cast_pair": {"cast_to_fp8_v2", "cast_from_fp8"},
                "sdpa": {"cast_to_fp8_v2", "fp8_sdpa_recomp_fwd", "cast_from_fp8"},
                "kv_cat": {"cast_to_fp8_v2"}, "kv_first": {"cast_to_fp8_v2"}, "kv_copy": {"cast_to_fp8_v2"},
                "dequant": {"cast_from_fp8"}}[p.form]
    return ops


# ---------------------------------------------------------------------------------------- emission
class _Emitter:
    def __init__(self, gm: fx.GraphModule, hpu_op, new_buffer) -> None:  # noqa: ANN001
        self.gm, self.graph, self.hpu, self.new_buffer = gm, gm.graph, hpu_op, new_buffer
        self.buffers: dict[tuple[float, str], str] = {}

    def call(self, target: Any, args: tuple, like: fx.Node, kwargs: dict | None = None) -> fx.Node:
        new = self.graph.call_function(target, args, kwargs or {})
        for key, value in like.meta.items():
            if key not in _VALUE_META and key != "fp8fx_hpu":
                new.meta.setdefault(key, value)
        return new

    def scale(self, value: float, like: fx.Node, device: torch.device) -> fx.Node:
        """A 0-d float32 buffer holding ``value`` (one per value and device)."""
        key = (float(value), str(device))
        if key not in self.buffers:
            t = torch.tensor(float(value), dtype=torch.float32, device=device)
            self.buffers[key] = self.new_buffer(self.gm, "attn_scale", t)
        node = self.graph.get_attr(self.buffers[key])
        return node

    def inv_scale(self, value: float, like: fx.Node, device: torch.device) -> fx.Node:
        """``1/value`` computed in float32 (as the Linear lowering folds its input scales)."""
        inv = torch.reciprocal(torch.tensor(float(value), dtype=torch.float32)).item()
        return self.scale(inv, like, device)

    def cast(self, x: Any, s: float, fp8_dtype: torch.dtype, like: fx.Node, device: torch.device) -> fx.Node:
        cast = self.call(self.hpu("cast_to_fp8_v2"), (x, self.inv_scale(s, like, device), False, False, fp8_dtype),
                         like)
        return self.call(operator.getitem, (cast, 0), like)

    def emit(self, plan: _Plan) -> None:
        # arguments read again: an earlier rewrite may have replaced a node this one reads
        node, form, x = plan.node, plan.form, plan.extra
        a = {**_bind_args(node, plan.name), **x["scales"]}
        dev = _device(*[v for v in a.values() if isinstance(v, fx.Node)])
        hpu, g = self.hpu, self.graph
        aten = torch.ops.aten
        erase = [node]
        with g.inserting_before(node):
            if form == "matmul":
                qa = self.cast(a["a"], a["scale_a"], a["fp8_dtype"], node, dev)
                qb = self.cast(a["b"], a["scale_b"], a["fp8_dtype"], node, dev)
                out = self.call(hpu("fp8_gemm_v2"), (qa, False, qb, False, None, x["out_dtype"],
                                                     self.scale(a["scale_a"], node, dev),
                                                     self.scale(a["scale_b"], node, dev), None, False), node)
            elif form == "softmax":
                sm = x["softmax"]
                with g.inserting_before(sm):
                    q8 = self.call(hpu("softmax_fp8"), (_softmax_args(sm)[0], x["dim"], self.scale(1.0, node, dev),
                                                        self.inv_scale(a["scale"], node, dev), None, None), sm)
                out = self.call(hpu("cast_from_fp8"), (q8, self.scale(a["scale"], node, dev), x["out_dtype"]), node)
                erase.append(sm)
            elif form == "cast_pair":
                q8 = self.cast(a["x"], a["scale"], a["fp8_dtype"], node, dev)
                out = self.call(hpu("cast_from_fp8"), (q8, self.scale(a["scale"], node, dev), x["out_dtype"]), node)
                if x["note"]:
                    out.meta["fp8fx_hpu"] = x["note"]
            elif form == "sdpa":
                out = self._sdpa(node, a, x, dev)
            elif form in ("kv_cat", "kv_first"):
                q8 = self.cast(a["new"], a["scale"], a["fp8_dtype"], node, dev)
                out = self.call(aten.cat.default, ([a["past"], q8], -2), node) if form == "kv_cat" else q8
            elif form == "kv_copy":
                q8 = self.cast(a["new"], a["scale"], a["fp8_dtype"], node, dev)
                dst = self.call(aten.view.dtype, (a["cache"], torch.uint8), node)
                src = self.call(aten.view.dtype, (q8, torch.uint8), node)
                out = self.call(aten.index_copy_.default, (dst, a["dim"], a["index"], src), node)
            else:  # dequant
                out = self.call(hpu("cast_from_fp8"), (a["x"], self.scale(a["scale"], node, dev), a["dtype"]), node)
        if form != "kv_copy":
            for key in _VALUE_META:
                if key in node.meta:
                    out.meta.setdefault(key, node.meta[key])
            node.replace_all_uses_with(out)
        for n in erase:
            g.erase_node(n)

    def _sdpa(self, node: fx.Node, a: dict, x: dict, dev: torch.device) -> fx.Node:
        hpu, aten, dtype = self.hpu, torch.ops.aten, E4M3.dtype
        qq, qk, qv = (self.cast(a[t], a[f"scale_{t}"], dtype, node, dev) for t in ("q", "k", "v"))
        mask = a["attn_mask"]
        if x["bool_mask"]:  # additive form: 0 where attended, the lowest finite value elsewhere
            zeros = self.call(aten.zeros_like.default, (mask,), node, {"dtype": x["out_dtype"]})
            masked = self.call(aten.logical_not.default, (mask,), node)
            mask = self.call(aten.masked_fill.Scalar, (zeros, masked, torch.finfo(x["out_dtype"]).min), node)
        if x["gqa"] is not None:  # hpex.kernels.fp8_fused_sdpa's grouped-query layout
            hkv, rep, mask_heads = x["gqa"]
            qq = self.call(aten.unflatten.int, (qq, -3, [hkv, rep]), node)
            qk = self.call(aten.unsqueeze.default, (qk, -3), node)
            qv = self.call(aten.unsqueeze.default, (qv, -3), node)
            if mask is not None:
                mask = (self.call(aten.unsqueeze.default, (mask, 1), node) if mask_heads == 1
                        else self.call(aten.unflatten.int, (mask, 1, [hkv, rep]), node))
        sd = self.call(hpu("fp8_sdpa_recomp_fwd"),
                       (qq, qk, qv, mask, 0.0, x["scale"], a["is_causal"], False, "none",
                        self.scale(a["scale_q"], node, dev), self.scale(a["scale_k"], node, dev),
                        self.scale(a["scale_v"], node, dev), self.inv_scale(a["scale_p"], node, dev),
                        self.inv_scale(a["scale_o"], node, dev), self.scale(a["scale_p"], node, dev),
                        False, False, None, "none"), node)
        o8 = self.call(operator.getitem, (sd, 0), node)
        if x["gqa"] is not None:
            o8 = self.call(aten.flatten.using_ints, (o8, -4, -3), node)
        return self.call(hpu("cast_from_fp8"), (o8, self.scale(a["scale_o"], node, dev), x["out_dtype"]), node)


def emit_attention(gm: fx.GraphModule, plans: list[_Plan], hpu_op, new_buffer) -> int:  # noqa: ANN001
    """Rewrite the planned nodes (``hpu_op(name)`` resolves a Gaudi op, ``new_buffer(gm, base,
    tensor)`` registers a constant); returns how many were rewritten."""
    emitter = _Emitter(gm, hpu_op, new_buffer)
    for plan in plans:
        emitter.emit(plan)
    return len(plans)
