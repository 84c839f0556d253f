"""Rewrite (QUANTIZE): measurements -> scales -> FP8 modules in place of the matched Linears.

Scales come from pure functions in :mod:`fp8fx.numerics`; this pass only looks up the right
measurement for each decision, checks it, and swaps the module. An ``nn.Linear`` whose
``linear`` node was decided ``quantize`` is replaced (on its parent module) by an
:class:`~fp8fx.modules.Fp8Linear` holding the FP8 weight, cast once, here.

Nothing is guessed: a quantized node without a measurement, or with a non-finite one, raises
:class:`~fp8fx.errors.MeasurementError` naming the node and the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from .. import numerics
from ..capture import CapturedGraph
from ..config import FP8Config
from ..errors import MeasurementError
from ..formats.inc import Measurements
from ..modules import Fp8Linear
from .annotate import Decision
from .match import Match, OpKind

__all__ = ["LinearQuant", "weight_quant", "input_scale", "linear_quant", "quantize_linears",
           "rewrite_linears_in_graph"]


@dataclass
class LinearQuant:
    weight: torch.Tensor        # FP8 [out, in]
    weight_scale: torch.Tensor  # 0-d or [out], float32
    input_scale: torch.Tensor   # 0-d, float32


def _source(meas: Measurements | None) -> str:
    return f" in {meas.source}" if meas is not None and meas.source else ""


def _input_amax(name: str, meas: Measurements | None) -> torch.Tensor:
    if meas is None or name not in meas.nodes:
        raise MeasurementError(
            f"no measurement for node {name!r}{_source(meas)}. Run calibration (MEASURE mode, then "
            "fp8fx.finalize_calibration) on this model with this allowlist/blocklist, or blocklist "
            "the node, or use scale_method 'unit_scale' which needs no measurement.")
    try:
        amax = meas.nodes[name].input_maxabs(0)
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise MeasurementError(f"measurement of node {name!r}{_source(meas)} has no usable input 0 "
                               f"({exc}); re-run calibration.") from exc
    t = torch.tensor(float(amax), dtype=torch.float32)
    if not bool(torch.isfinite(t)):
        raise MeasurementError(f"measurement of node {name!r}{_source(meas)} is not finite ({amax}); "
                               "re-run calibration on finite inputs or blocklist the node.")
    return t


def weight_quant(weight: torch.Tensor, name: str, type_name: str, cfg: FP8Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, float32 weight scale) of one Linear weight ``[out, in]``."""
    method = cfg.scale_method_for(name, type_name).value
    _, weight_backoff = cfg.backoffs_for(name, type_name)
    w = weight.detach()
    w_scale = numerics.weight_scale(w, method, fp8_dtype=cfg.fp8_dtype, target=cfg.target.value,
                                    backoff=weight_backoff, where=f"node {name!r}")
    w_q = numerics.quantize_weight(w, w_scale, cfg.fp8_dtype, cfg.fp8_max)
    return w_q, w_scale.to(device=w.device, dtype=torch.float32)


def input_scale(name: str, type_name: str, cfg: FP8Config, meas: Measurements | None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """The static activation scale (0-d float32) of one Linear, from its measured input maxabs."""
    sm = cfg.scale_method_for(name, type_name)
    amax = _input_amax(name, meas) if sm.needs_measurement else torch.ones((), dtype=torch.float32)
    input_backoff, _ = cfg.backoffs_for(name, type_name)
    x_scale = numerics.activation_scale(amax, sm.value, fp8_dtype=cfg.fp8_dtype, target=cfg.target.value,
                                        backoff=input_backoff, where=f"node {name!r}")
    return x_scale.to(device=device, dtype=torch.float32).reshape(())


def linear_quant(weight: torch.Tensor, name: str, type_name: str, cfg: FP8Config,
                 meas: Measurements | None) -> LinearQuant:
    """FP8 weight and scales of one Linear, from its weight ``[out, in]`` and its measured input
    maxabs."""
    x_scale = input_scale(name, type_name, cfg, meas, weight.device)  # first: a missing measurement
    w_q, w_scale = weight_quant(weight, name, type_name, cfg)          # fails before the costly part
    return LinearQuant(weight=w_q, weight_scale=w_scale, input_scale=x_scale)


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def quantize_linears(model: nn.Module, decisions: list[Decision], cfg: FP8Config,
                     meas: Measurements | None) -> list[str]:
    """Swap every Linear decided ``quantize`` for an Fp8Linear. Returns the swapped names.

    All-or-nothing: every scale and FP8 weight is computed first (any error raises here, with the
    model untouched), then the modules are swapped.
    """
    planned: dict[str, tuple[nn.Linear, LinearQuant]] = {}
    for d in decisions:
        m = d.match
        if not d.quantize or m.kind is not OpKind.LINEAR or m.name in planned:
            continue
        module = model.get_submodule(m.name)
        if isinstance(module, Fp8Linear):
            continue
        planned[m.name] = (module, linear_quant(module.weight, m.name, m.module_type, cfg, meas))
    for name, (module, q) in planned.items():
        bias = None if module.bias is None else module.bias.detach()
        _set_submodule(model, name, Fp8Linear(q.weight, q.weight_scale, q.input_scale, bias, cfg.fp8_max))
    return list(planned)


def _declare_constant(gm: fx.GraphModule, name: str) -> None:
    """Tell AOTAutograd where a new graph attribute comes from: a dynamo graph lists the source
    of every lifted parameter/buffer (``_param_name_to_source``) and refuses unknown ones."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        from torch._dynamo.source import ConstantSource

        sources[name] = ConstantSource(f"fp8fx.{name}")


def rewrite_linears_in_graph(cg: CapturedGraph, decisions: list[Decision], cfg: FP8Config,
                             meas: Measurements | None,
                             quantize: Callable[[torch.Tensor, Match], LinearQuant] | None = None) -> int:
    """The graph form of :func:`quantize_linears`, for ``torch.compile(backend="fp8fx")``.

    Each ``linear(x, W, b)`` decided ``quantize`` becomes ``fp8fx.linear(x, W8, s_w, s_x, b)``
    where ``W8``, ``s_w`` and ``s_x`` are attributes of the GraphModule (constants to the
    compiler); the high-precision weight input is left unused. ``quantize(weight, match)``
    lets the caller cache FP8 weights across graphs (default: :func:`linear_quant`). Returns
    the number of nodes rewritten; all of them are computed before the graph changes.
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
        w_node = next(a for a in node.all_input_nodes if cg.param_name(a) == m.weight)
        weight = values[w_node.name] if w_node.op == "placeholder" else gm.get_parameter(str(w_node.target))
        q = quantize(weight, m) if quantize is not None else linear_quant(weight, m.name, m.module_type, cfg, meas)
        planned.append((node, m, q))
    for i, (node, m, q) in enumerate(planned):
        prefix = f"fp8fx_q{i}_"
        for suffix, t in (("weight", q.weight), ("weight_scale", q.weight_scale), ("input_scale", q.input_scale)):
            gm.register_buffer(prefix + suffix, t)
            _declare_constant(gm, prefix + suffix)
        x = nodes[m.inputs[0]]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with gm.graph.inserting_before(node):
            attrs = [gm.graph.get_attr(prefix + s) for s in ("weight", "weight_scale", "input_scale")]
            new = gm.graph.call_function(torch.ops.fp8fx.linear.default, (x, *attrs, bias, cfg.fp8_max))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value", "val")})
        new.meta["fp8fx"] = {**node.meta.get("fp8fx", {}), "rewritten": True}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return len(planned)
