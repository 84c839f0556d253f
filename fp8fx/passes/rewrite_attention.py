"""Rewrite (QUANTIZE) of the attention path: matmul, softmax, SDPA and KV-cache writes.

These ops have no module of their own in a transformers model (they are functional calls
inside an attention module's forward), so they are rewritten in the captured graph, by the same
code for both entry points: the converted eager model runs the rewritten graph (see
``fp8fx.convert``), ``torch.compile(backend="fp8fx")`` hands it on to Inductor.

Scales follow INC's semantics for each kind (all from the measurement file; ``s`` is a dequant
multiplier, ``x ≈ q * s``):

==========  =================================================  ==================================
kind        scales                                             rewrite
==========  =================================================  ==================================
matmul      inputs 0 and 1; the output scale is ``s0 * s1``    ``fp8fx.matmul(a, b, s0, s1)``
softmax     output 0 (input scale 1: the input stays as is)    ``fp8fx.qdq(softmax(x), s_out)``
sdpa        inputs q, k, v; outputs[1] (max probability) for   ``fp8fx.sdpa(q, k, v, ..., s_q,
            the probabilities; outputs[0] for the output       s_k, s_v, s_p, s_o)``
kv_cache    input 0 (the written keys/values), one scale       ``qdq`` on the written values; FP8
            shared by the write and every read                 storage: :mod:`fp8fx.kv_cache`
==========  =================================================  ==================================

Per-head scales (``observer_params.kv_cache_strategy = "attn_head"``): a kv_cache node's scale
and an SDPA's q, k and v scales are one per head (dim -3), from per-head measurements ((H, 1)
arrays, written by a calibration with the same strategy: a file without that record is refused),
and the rewrite uses the ``.heads`` overloads of ``fp8fx.qdq``/``fp8fx.sdpa``; the probabilities,
the output and the matmul/softmax scales stay per tensor.

The KV cache uses ``kv_cache_dtype`` (E4M3 by default, E5M2 as an option). All scales are computed before the graph changes: a missing
measurement raises :class:`~fp8fx.errors.MeasurementError` naming the node and leaves the graph
as it was.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import attention_ops  # noqa: F401  (registers torch.ops.fp8fx.qdq/matmul/sdpa/...)
from .. import numerics
from ..config import FP8Config
from ..errors import MeasurementError, QuantizationError
from ..formats.inc import Measurements
from .annotate import Decision
from .match import OpKind, sdpa_arguments
from .observe import per_head_inputs
from .rewrite import measured_amax

__all__ = ["GRAPH_KINDS", "AttentionQuant", "attention_quant", "plan_attention", "rewrite_attention_in_graph"]

#: kinds rewritten in the graph (a Linear is swapped as a module instead)
GRAPH_KINDS = frozenset({OpKind.MATMUL, OpKind.SOFTMAX, OpKind.SDPA, OpKind.KV_CACHE})


@dataclass(frozen=True)
class AttentionQuant:
    """The static scales of one attention-path node, in the order its fp8fx op takes them; an
    entry is a tuple of floats (one per head) for per-head scales."""

    kind: OpKind
    scales: tuple[float | tuple[float, ...], ...]
    fp8_dtype: torch.dtype
    fp8_max: float


def attention_quant(name: str, kind: OpKind, type_name: str, cfg: FP8Config,
                    meas: Measurements | None) -> AttentionQuant:
    """Scales of one matmul/softmax/sdpa/kv_cache node from its measurement (INC semantics)."""
    method = cfg.scale_method_for(name, type_name)
    backoff, _ = cfg.backoffs_for(name, type_name)
    fp8_dtype, fp8_max = (cfg.kv_fp8_dtype, cfg.kv_fp8_max) if kind is OpKind.KV_CACHE else (cfg.fp8_dtype, cfg.fp8_max)
    entries = {OpKind.MATMUL: [("inputs", 0), ("inputs", 1)], OpKind.SOFTMAX: [("outputs", 0)],
               OpKind.SDPA: [("inputs", 0), ("inputs", 1), ("inputs", 2), ("outputs", 1), ("outputs", 0)],
               OpKind.KV_CACHE: [("inputs", 0)]}[kind]
    heads = per_head_inputs(kind, cfg.observer_params) if method.needs_measurement else ()
    scales: list[float | tuple[float, ...]] = []
    for role, i in entries:
        where = f"node {name!r} {role}[{i}]"
        if role == "inputs" and i in heads:
            scales.append(tuple(float(numerics.activation_scale(a, method.value, fp8_dtype=fp8_dtype,
                                                                target=cfg.target.value, backoff=backoff,
                                                                where=f"{where} head {h}"))
                                for h, a in enumerate(_head_amax(name, meas, i))))
            continue
        amax = measured_amax(name, meas, role, i) if method.needs_measurement else None
        s = numerics.activation_scale(amax, method.value, fp8_dtype=fp8_dtype, target=cfg.target.value,
                                      backoff=backoff, where=where)
        scales.append(float(s))
    return AttentionQuant(kind, tuple(scales), fp8_dtype, fp8_max)


def _head_amax(name: str, meas: Measurements | None, i: int) -> torch.Tensor:
    """The per-head maxabs ``[H]`` of ``inputs[i]``; refuses measurements not made per head."""
    measured_amax(name, meas, "inputs", i)  # missing node/entry, non-finite: its errors
    strategy = (meas.observer_params or {}).get("kv_cache_strategy", "tensor")
    if strategy != "attn_head":
        raise MeasurementError(
            f"node {name!r}: the config asks for per-head scales (observer_params.kv_cache_strategy "
            f"'attn_head'), but the measurements{' in ' + meas.source if meas.source else ''} were made "
            f"with kv_cache_strategy {strategy!r} (one value per tensor). Calibrate again with "
            "kv_cache_strategy 'attn_head', or convert with 'tensor'")
    return torch.as_tensor(meas.nodes[name].inputs[i], dtype=torch.float32).reshape(-1)


def _args(scales: tuple) -> tuple:  # noqa: ANN001
    """Scales as op arguments: per-head tuples as lists (``float[]``)."""
    return tuple(list(s) if isinstance(s, tuple) else s for s in scales)


def _overload(packet, scales: tuple):  # noqa: ANN001, ANN202
    return packet.heads if any(isinstance(s, tuple) for s in scales) else packet.default


def plan_attention(decisions: list[Decision], cfg: FP8Config, meas: Measurements | None) -> dict[str, AttentionQuant]:
    """Scales of every graph-level node decided ``quantize`` (raises before anything changes)."""
    return {d.match.name: attention_quant(d.match.name, d.match.kind, d.match.module_type, cfg, meas)
            for d in decisions if d.quantize and d.match.kind in GRAPH_KINDS}


def _call(graph: fx.Graph, op, args: tuple, like: fx.Node) -> fx.Node:  # noqa: ANN001
    new = graph.call_function(op, args)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            new.meta[key] = like.meta[key]
    return new


def _baddbmm(gm: fx.GraphModule, node: fx.Node, q: AttentionQuant) -> None:
    """``beta * input + alpha * (b1 @ b2)`` with the product in FP8."""
    args = dict(zip(("input", "batch1", "batch2"), node.args))
    args.update(node.kwargs)
    with gm.graph.inserting_before(node):
        new = _call(gm.graph, torch.ops.fp8fx.matmul.default,
                    (args["batch1"], args["batch2"], *q.scales, q.fp8_max, q.fp8_dtype), node)
        if args.get("alpha", 1) != 1:
            new = _call(gm.graph, operator.mul, (new, args["alpha"]), node)
        base = args["input"]
        if args.get("beta", 1) != 1:
            base = _call(gm.graph, operator.mul, (base, args["beta"]), node)
        new = _call(gm.graph, operator.add, (base, new), node)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _is_baddbmm(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "baddbmm") or node.target in (
        torch.baddbmm, torch.ops.aten.baddbmm.default)


def _matmul(gm: fx.GraphModule, node: fx.Node, q: AttentionQuant) -> None:
    if _is_baddbmm(node):
        return _baddbmm(gm, node, q)
    a = node.args[0]
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other", node.kwargs.get("mat2"))
    is_linear = node.target in (torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default) \
        or (node.op == "call_method" and node.target == "linear")
    bias = (node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")) if is_linear else None
    with gm.graph.inserting_before(node):
        if is_linear:  # linear(x, W) between activations: x @ Wᵀ (+ b)
            b = gm.graph.call_method("transpose", (b, -2, -1))
        new = _call(gm.graph, torch.ops.fp8fx.matmul.default, (a, b, *q.scales, q.fp8_max, q.fp8_dtype), node)
        if bias is not None:
            new = _call(gm.graph, operator.add, (new, bias), node)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _softmax(gm: fx.GraphModule, node: fx.Node, q: AttentionQuant) -> None:
    with gm.graph.inserting_after(node):
        new = _call(gm.graph, torch.ops.fp8fx.qdq.default, (node, *q.scales, q.fp8_max, q.fp8_dtype), node)
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)


_CAT = (torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default)


def _is_index_copy_(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "index_copy_") or node.target is torch.ops.aten.index_copy_.default


def _check(node: fx.Node, kind: OpKind, name: str) -> None:
    if kind is OpKind.SDPA:
        p = sdpa_arguments(node)["dropout_p"]
        if not (p is None or (isinstance(p, (int, float)) and p == 0)):
            raise QuantizationError(f"node {name!r}: scaled_dot_product_attention with dropout_p={p!r}; FP8 "
                                    "attention is for inference: call model.eval() before fp8fx")
    if kind is OpKind.KV_CACHE and not (_is_index_copy_(node) or (node.op == "call_function" and node.target in _CAT)):
        raise QuantizationError(f"node {name!r}: KV-cache write {node.target!r} has no FP8 rewrite (only "
                                "torch.cat and in-place index_copy_ have); blocklist it with blocklist "
                                f"names [{name!r}] or types ['kv_cache']")


def _sdpa(gm: fx.GraphModule, node: fx.Node, q: AttentionQuant) -> None:
    a = sdpa_arguments(node)
    with gm.graph.inserting_before(node):
        new = _call(gm.graph, _overload(torch.ops.fp8fx.sdpa, q.scales),
                    (a["query"], a["key"], a["value"], a["attn_mask"], 0.0, bool(a["is_causal"]), a["scale"],
                     bool(a["enable_gqa"]), *_args(q.scales), q.fp8_max, q.fp8_dtype), node)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _kv_cache(gm: fx.GraphModule, node: fx.Node, q: AttentionQuant) -> None:
    """The written keys/values go through an FP8 round trip with the cache's scale, so what the
    cache holds is exactly what an FP8 cache would return. The cache tensors keep the model's
    dtype here (the model's own code, traced by dynamo, decides their dtype); FP8 *storage* comes
    from fp8fx's cache layers (:mod:`fp8fx.kv_cache`), whose writes never reach this pass."""
    if _is_index_copy_(node):
        new = node.args[3]
    else:
        new = (node.args[0] if node.args else node.kwargs["tensors"])[1]
    with gm.graph.inserting_before(node):
        rounded = _call(gm.graph, _overload(torch.ops.fp8fx.qdq, q.scales),
                        (new, *_args(q.scales), q.fp8_max, q.fp8_dtype), node)
    node.replace_input_with(new, rounded)


def rewrite_attention_in_graph(gm: fx.GraphModule, decisions: list[Decision], plan: dict[str, AttentionQuant]) -> int:
    """Rewrite every graph-level node decided ``quantize`` with the scales in ``plan``; returns the
    number of nodes rewritten. A decided node missing from ``plan`` raises."""
    nodes = {n.name: n for n in gm.graph.nodes}
    todo = [d for d in decisions if d.quantize and d.match.kind in GRAPH_KINDS]
    missing = [d.match.name for d in todo if d.match.name not in plan]
    if missing:
        raise MeasurementError(f"no FP8 scales for {', '.join(missing[:10])}: these nodes appeared in a "
                               "graph that convert did not see; calibrate on inputs that reach them")
    for d in todo:  # refuse before changing anything
        _check(nodes[d.match.node], d.match.kind, d.match.name)
    for d in todo:
        node, q = nodes[d.match.node], plan[d.match.name]
        if d.match.kind is OpKind.MATMUL:
            _matmul(gm, node, q)
        elif d.match.kind is OpKind.SOFTMAX:
            _softmax(gm, node, q)
        elif d.match.kind is OpKind.SDPA:
            _sdpa(gm, node, q)
        else:
            _kv_cache(gm, node, q)
    gm.graph.lint()
    gm.recompile()
    return len(todo)
