"""Rewrite (QUANTIZE): measurements -> scales -> FP8 modules in place of the matched Linears.

Scales come from pure functions in :mod:`fp8fx.numerics`; this pass only looks up the right
measurement for each decision, checks it, and swaps the module. What each match becomes:

==========================================  ===========================================================
owner of the weight                         eager ``convert`` (module swap)  /  compile backend (graph)
==========================================  ===========================================================
``nn.Linear`` (also FalconLinear)           :class:`~fp8fx.modules.Fp8Linear`  /  ``fp8fx.linear``
GPT-2 ``Conv1D`` (weight ``[in, out]``)     ``Fp8Linear`` holding the transposed FP8 weight ``[out, in]``
                                            /  ``addmm``/``mm`` -> ``fp8fx.linear``
MoE experts (stacked ``[E, out, in]``)      :class:`~fp8fx.modules.Fp8Experts`  /  each grouped GEMM
                                            -> ``fp8fx.grouped_linear``
==========================================  ===========================================================

Weights are always cast in the ``[out, in]`` orientation (``[E, out, in]`` for expert stacks,
with one scale per expert), so per-channel scales are per *output* channel whatever the storage.

Nothing is guessed: a quantized node without a measurement, or with a non-finite one, raises
:class:`~fp8fx.errors.MeasurementError` naming the node and the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .. import numerics
from ..capture import CapturedGraph
from ..config import FP8Config
from ..errors import MeasurementError, QuantizationError
from ..formats.inc import Measurements
from ..modules import Fp8Experts, Fp8Linear
from ..schemes import LinearScheme, WeightGranularity
from .annotate import Decision
from .match import _ADDMM_FNS, _LINEAR_FNS, Match, OpKind, _is_fn

__all__ = ["LinearQuant", "LinearSwap", "plan_linears", "measured_amax", "weight_quant", "input_scale", "linear_quant", "quantize_linears",
           "rewrite_linears_in_graph", "oriented_weight"]


@dataclass
class LinearQuant:
    weight: torch.Tensor              # FP8 [out, in] (or [E, out, in] for MoE experts)
    weight_scale: torch.Tensor        # 0-d, [out] or [out/bn, in/bk] (with a leading [E] for experts), float32
    input_scale: torch.Tensor | None  # 0-d float32 (static activations), else None
    scheme: LinearScheme = LinearScheme()


def _source(meas: Measurements | None) -> str:
    return f" in {meas.source}" if meas is not None and meas.source else ""


def measured_amax(name: str, meas: Measurements | None, role: str = "inputs", i: int = 0) -> torch.Tensor:
    """The measured max-abs of ``inputs[i]`` or ``outputs[i]`` of a node, as a 0-d float32 tensor;
    a missing, unusable or non-finite measurement raises naming the node and the file."""
    if meas is None or name not in meas.nodes:
        raise MeasurementError(
            f"no measurement for node {name!r}{_source(meas)}. Run calibration (MEASURE mode, then "
            "fp8fx.finalize_calibration) on this model with this allowlist/blocklist, or blocklist "
            "the node, or use scale_method 'unit_scale' which needs no measurement.")
    node = meas.nodes[name]
    try:
        amax = node.input_maxabs(i) if role == "inputs" else node.output_maxabs(i)
    except (IndexError, KeyError, TypeError, ValueError, MeasurementError) as exc:
        raise MeasurementError(f"measurement of node {name!r}{_source(meas)} has no usable {role}[{i}] "
                               f"({exc}); re-run calibration.") from exc
    t = torch.tensor(float(amax), dtype=torch.float32)
    if not bool(torch.isfinite(t)):
        raise MeasurementError(f"measurement of node {name!r}{_source(meas)} {role}[{i}] is not finite "
                               f"({amax}); re-run calibration on finite inputs or blocklist the node.")
    return t


def oriented_weight(weight: torch.Tensor, match: Match) -> torch.Tensor:
    """A matched Linear's weight as ``[out, in]`` (``[E, out, in]``), whatever its storage."""
    return weight.transpose(-2, -1) if match.weight_transposed else weight


def _weight_quant_2d(w: torch.Tensor, method: str, cfg: FP8Config, backoff: float, where: str,
                     scheme: LinearScheme):
    w_scale = numerics.weight_scale_for(w, method, scheme.weights.value, scheme.block, fp8_dtype=cfg.fp8_dtype,
                                        target=cfg.target.value, backoff=backoff, where=where)
    if scheme.weights is WeightGranularity.BLOCK:
        w_q = numerics.quantize_weight_blocks(w, w_scale, scheme.block, cfg.fp8_dtype, cfg.fp8_max)
    else:
        w_q = numerics.quantize_weight(w, w_scale, cfg.fp8_dtype, cfg.fp8_max)
    return w_q.contiguous(), w_scale


def weight_quant(weight: torch.Tensor, name: str, type_name: str, cfg: FP8Config,
                 scheme: LinearScheme | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, float32 weight scale) of one Linear weight ``[out, in]`` in ``scheme``
    (default: ``cfg.scheme_for`` the node).

    A stacked MoE experts weight ``[E, out, in]`` gets one scale (or row of scales) per expert:
    ``[E]``, ``[E, out]`` or ``[E, out blocks, in blocks]``, each expert scaled as its own Linear.
    """
    method = cfg.scale_method_for(name, type_name).value
    _, weight_backoff = cfg.backoffs_for(name, type_name)
    w = weight.detach()
    if scheme is None:
        scheme = cfg.scheme_for(name, type_name, experts=w.dim() == 3)
    if w.dim() == 3:
        parts = [_weight_quant_2d(w[e], method, cfg, weight_backoff, f"node {name!r} expert {e}", scheme)
                 for e in range(w.shape[0])]
        w_q = torch.stack([p[0] for p in parts])
        w_scale = torch.stack([p[1] for p in parts])
    else:
        w_q, w_scale = _weight_quant_2d(w, method, cfg, weight_backoff, f"node {name!r}", scheme)
    return w_q, w_scale.to(device=w.device, dtype=torch.float32)


def input_scale(name: str, type_name: str, cfg: FP8Config, meas: Measurements | None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """The static activation scale (0-d float32) of one Linear, from its measured input maxabs."""
    sm = cfg.scale_method_for(name, type_name)
    amax = measured_amax(name, meas) if sm.needs_measurement else torch.ones((), dtype=torch.float32)
    input_backoff, _ = cfg.backoffs_for(name, type_name)
    x_scale = numerics.activation_scale(amax, sm.value, fp8_dtype=cfg.fp8_dtype, target=cfg.target.value,
                                        backoff=input_backoff, where=f"node {name!r}")
    return x_scale.to(device=device, dtype=torch.float32).reshape(())


def linear_quant(weight: torch.Tensor, name: str, type_name: str, cfg: FP8Config,
                 meas: Measurements | None) -> LinearQuant:
    """FP8 weight and scales of one Linear, from its weight ``[out, in]`` (or an experts stack
    ``[E, out, in]``) and, for static activations, its measured input maxabs."""
    scheme = cfg.scheme_for(name, type_name, experts=weight.dim() == 3)
    x_scale = None
    if scheme.static:  # first: a missing measurement fails before the costly part
        x_scale = input_scale(name, type_name, cfg, meas, weight.device)
    w_q, w_scale = weight_quant(weight, name, type_name, cfg, scheme)
    return LinearQuant(weight=w_q, weight_scale=w_scale, input_scale=x_scale, scheme=scheme)


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


@dataclass
class LinearSwap:
    """The FP8 modules that will replace a model's decided Linears, computed but not yet put in.

    ``quants`` holds each match's ``[out, in]`` FP8 weight and scales: the very tensors the new
    modules hold once :meth:`apply` has swapped them in.
    """

    model: nn.Module
    linears: dict[str, tuple[nn.Module, LinearQuant]]
    experts: dict[str, tuple[nn.Module, dict[str, LinearQuant]]]
    done: list[str]
    fp8_max: float

    def quant(self, m: Match) -> LinearQuant:
        if m.experts:
            path, _, leaf = m.weight.rpartition(".")
            return self.experts[path][1][leaf]
        return self.linears[m.name][1]

    def apply(self) -> list[str]:
        """Swap the modules in (once); returns the names of the matches done."""
        for name, (module, q) in self.linears.items():
            bias = None if module.bias is None else module.bias.detach()
            new = Fp8Linear(q.weight, q.weight_scale, q.input_scale, bias, self.fp8_max, q.scheme)
            _set_submodule(self.model, name, new)
        for path, (module, quants) in self.experts.items():
            parts = {leaf: (q.weight, q.weight_scale, q.input_scale, q.scheme) for leaf, q in quants.items()}
            _set_submodule(self.model, path, Fp8Experts(module, parts, self.fp8_max))
        self.linears, self.experts = {}, {}
        return self.done


def plan_linears(model: nn.Module, decisions: list[Decision], cfg: FP8Config,
                 meas: Measurements | None) -> LinearSwap:
    """Every scale and FP8 weight of the Linears decided ``quantize`` (any error raises here, with
    the model untouched); :meth:`LinearSwap.apply` then swaps the modules."""
    linears: dict[str, tuple[nn.Module, LinearQuant]] = {}
    experts: dict[str, tuple[nn.Module, dict[str, LinearQuant]]] = {}
    done: list[str] = []
    for d in decisions:
        m = d.match
        if not d.quantize or m.kind is not OpKind.LINEAR or m.name in done:
            continue
        if m.experts:
            path, _, leaf = m.weight.rpartition(".")
            module = model.get_submodule(path)
            if isinstance(module, Fp8Experts):
                continue
            q = linear_quant(getattr(module, leaf), m.name, m.module_type, cfg, meas)
            experts.setdefault(path, (module, {}))[1][leaf] = q
        else:
            module = model.get_submodule(m.name)
            if isinstance(module, Fp8Linear):
                continue
            linears[m.name] = (module, linear_quant(oriented_weight(module.weight, m), m.name, m.module_type, cfg, meas))
        done.append(m.name)
    return LinearSwap(model, linears, experts, done, cfg.fp8_max)


def quantize_linears(model: nn.Module, decisions: list[Decision], cfg: FP8Config,
                     meas: Measurements | None) -> list[str]:
    """Swap every Linear decided ``quantize`` for an Fp8Linear (every MoE experts module with a
    projection decided ``quantize`` for an Fp8Experts). Returns the names of the matches done.

    All-or-nothing: every scale and FP8 weight is computed first (any error raises here, with the
    model untouched), then the modules are swapped.
    """
    return plan_linears(model, decisions, cfg, meas).apply()


def _declare_constant(gm: fx.GraphModule, name: str) -> None:
    """Tell AOTAutograd where a new graph attribute comes from: a dynamo graph lists the source
    of every lifted parameter/buffer (``_param_name_to_source``) and refuses unknown ones."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        from torch._dynamo.source import ConstantSource

        sources[name] = ConstantSource(f"fp8fx.{name}")


def _weight_node(node: fx.Node, cg: CapturedGraph, weight: str) -> fx.Node:
    """The parameter input of a matched node: an operand, or the input of a transposed operand."""
    for a in node.all_input_nodes:
        for cand in (a, *a.all_input_nodes):
            if cg.param_name(cand) == weight:
                return cand
    raise QuantizationError(f"node {node.name!r}: its weight {weight!r} is not an input of the graph, so it "
                            f"cannot be rewritten; leave it in high precision with blocklist names [{weight.rsplit('.', 1)[0]!r}]")


# FP8 [in, out] casts (cached by the caller) -> their [out, in] copy, made once per cast
_TRANSPOSED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _graph_quant(param: torch.Tensor, m: Match, cfg: FP8Config, meas: Measurements | None,
                 quantize: Callable[[torch.Tensor, Match], LinearQuant] | None, oriented: bool) -> LinearQuant:
    if quantize is None:
        return linear_quant(oriented_weight(param, m), m.name, m.module_type, cfg, meas)
    q = quantize(param, m)  # the caller casts the parameter as stored (and caches it per parameter)
    if oriented or not m.weight_transposed:
        return q
    if q.weight_scale.dim() == 0:  # a per-tensor scale does not depend on the orientation
        w = _TRANSPOSED.get(q.weight)
        if w is None:
            w = _TRANSPOSED[q.weight] = q.weight.transpose(-2, -1).contiguous()
        return LinearQuant(w, q.weight_scale, q.input_scale, q.scheme)
    w_q, w_scale = weight_quant(oriented_weight(param, m), m.name, m.module_type, cfg, q.scheme)  # per channel/block
    return LinearQuant(w_q, w_scale, q.input_scale, q.scheme)


def _scheme_args(s: LinearScheme) -> tuple[str, int, int, int]:
    """``(activations, group_size, block_n, block_k)``: the scheme arguments of the FP8 ops."""
    return (s.activations.op_name, s.op_group, *s.op_block)


def _bias_arg(node: fx.Node):  # noqa: ANN202
    if _is_fn(node, _LINEAR_FNS, ("linear",)):
        return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if _is_fn(node, _ADDMM_FNS, ("addmm",)):
        return node.args[0] if node.args else node.kwargs.get("input")
    return None  # mm / matmul (x @ W, x @ W.T)


def rewrite_linears_in_graph(cg: CapturedGraph, decisions: list[Decision], cfg: FP8Config,
                             meas: Measurements | None,
                             quantize: Callable[[torch.Tensor, Match], LinearQuant] | None = None,
                             oriented: bool = False) -> int:
    """The graph form of :func:`quantize_linears`, for ``torch.compile(backend="fp8fx")``.

    Each ``linear(x, W, b)`` / ``addmm(b, x, W)`` / ``x @ W`` decided ``quantize`` becomes
    ``fp8fx.linear(x, W8, s_w, s_x, b)``, and each grouped experts GEMM becomes
    ``fp8fx.grouped_linear(x, W8, s_w, s_x, offsets)``, where ``W8``, ``s_w`` and ``s_x`` are
    attributes of the GraphModule (constants to the compiler); the high-precision weight input
    is left unused. ``quantize(parameter, match)`` lets the caller cache casts across graphs
    (default: :func:`linear_quant`): it gets the parameter *as stored* and returns its cast in
    that layout; a Conv1D weight (``[in, out]``) is then transposed here (per-tensor scales) or
    re-cast per output channel; with ``oriented`` it returns the ``[out, in]`` cast (the FP8
    module that replaced the Linear holds it) and nothing is recast. Returns the number of nodes
    rewritten; all of them are computed before the graph changes.
    """
    gm = cg.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    values = dict(zip((n.name for n in gm.graph.nodes if n.op == "placeholder"), cg.example_inputs))
    planned: list[tuple[fx.Node, Match, LinearQuant]] = []
    for d in decisions:
        m = d.match
        if not d.quantize or m.kind is not OpKind.LINEAR:
            continue
        node = nodes[m.node]
        w_node = _weight_node(node, cg, m.weight)
        param = values[w_node.name] if w_node.op == "placeholder" else gm.get_parameter(str(w_node.target))
        planned.append((node, m, _graph_quant(param, m, cfg, meas, quantize, oriented)))
    for i, (node, m, q) in enumerate(planned):
        prefix = f"fp8fx_q{i}_"
        tensors = (("weight", q.weight), ("weight_scale", q.weight_scale), ("input_scale", q.input_scale))
        for suffix, t in tensors:
            if t is not None:
                gm.register_buffer(prefix + suffix, t)
                _declare_constant(gm, prefix + suffix)
        x = nodes[m.inputs[0]]
        s = q.scheme
        with gm.graph.inserting_before(node):
            w_attr, ws_attr, xs_attr = (None if t is None else gm.graph.get_attr(prefix + k) for k, t in tensors)
            if m.experts:
                offsets = node.kwargs["offs"] if "offs" in node.kwargs else node.args[2]
                new = gm.graph.call_function(torch.ops.fp8fx.grouped_linear.default,
                                             (x, w_attr, ws_attr, xs_attr, offsets, cfg.fp8_max, *_scheme_args(s)))
            elif s.uses_linear_op:
                new = gm.graph.call_function(torch.ops.fp8fx.linear.default,
                                             (x, w_attr, ws_attr, xs_attr, _bias_arg(node), cfg.fp8_max))
            else:
                new = gm.graph.call_function(torch.ops.fp8fx.scaled_linear.default,
                                             (x, w_attr, ws_attr, xs_attr, _bias_arg(node), cfg.fp8_max, *_scheme_args(s)))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value", "val")})
        new.meta["fp8fx"] = {**node.meta.get("fp8fx", {}), "rewritten": True}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return len(planned)
