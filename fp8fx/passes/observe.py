"""Observe (MEASURE): insert observer nodes on the edges of every measured match.

For a decision with ``measure=True`` the pass inserts, before the matched node, one
``call_module`` node per activation input, and after it one per output when the config
measures outputs. The observer modules come from a shared registry (name -> NodeObserver),
so a name seen in several graphs is observed by the same module. Returns how many observer
nodes were inserted, so tests can assert exact counts.

Some kinds need outputs whatever ``measure_exclude`` says, because their scales come from them
(INC measures them the same way): a softmax's output (its FP8 output scale), and an SDPA's
output plus, as its second output entry, the maximum of its attention probabilities (the scale
of the probabilities inside the fused op), which an extra observer recomputes from q and k.

The config (``cfg``) picks the observer kind (``observer``: maxabs, percentile, mse, ...; see
:mod:`fp8fx.observers`) and, with ``observer_params.kv_cache_strategy = "attn_head"``, which
inputs are observed per head: a KV-cache write's input (keys or values ``[B, H_kv, S, D]``) and
an SDPA's q, k and v (each per its own heads, dim -3). Without ``cfg``: maxabs, per tensor.
"""

from __future__ import annotations

import re

import numpy as np
import torch.fx as fx
from torch import Tensor, nn

from .. import numerics

from ..attention_ops import attention_probs
from ..errors import MeasurementError
from ..observers import ClipTarget, MaxAbsObserver, NodeObserver
from ..observers import ObserverParams
from .annotate import Decision
from .match import OpKind, sdpa_arguments

__all__ = ["REQUIRED_OUTPUTS", "PER_HEAD_INPUTS", "per_head_inputs", "insert_observers", "clip_target",
           "observed_values"]

#: kinds whose outputs are always measured -> number of output entries in the measurement
REQUIRED_OUTPUTS = {OpKind.SOFTMAX: 1, OpKind.SDPA: 2}

#: inputs observed per head under kv_cache_strategy "attn_head", by kind
PER_HEAD_INPUTS = {OpKind.KV_CACHE: (0,), OpKind.SDPA: (0, 1, 2)}


def per_head_inputs(kind: OpKind, params: ObserverParams | None) -> tuple[int, ...]:
    """The inputs of a node of ``kind`` that get one statistic (and one scale) per head."""
    return PER_HEAD_INPUTS.get(kind, ()) if params is not None and params.per_head else ()


class SdpaProbsObserver(nn.Module):
    """Feeds the attention probabilities of an SDPA call to an observer (calibration only)."""

    def __init__(self, observer: MaxAbsObserver) -> None:
        super().__init__()
        self.observer = observer

    def forward(self, q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float | None,
                enable_gqa: bool) -> None:
        self.observer(attention_probs(q.detach(), k.detach(), attn_mask, is_causal, scale, enable_gqa))


def _attr_name(name: str, role: str, i: int) -> str:
    return "fp8fx_obs__" + re.sub(r"\W", "_", name) + f"__{role}{i}"


def _add(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    if not hasattr(gm, target):
        gm.add_submodule(target, module)


def insert_observers(gm: fx.GraphModule, decisions: list[Decision], registry: dict[str, NodeObserver],
                     *, measure_inputs: bool = True, measure_outputs: bool = False, cfg=None) -> int:
    nodes = {n.name: n for n in gm.graph.nodes}
    observer = cfg.observer.value if cfg is not None else "maxabs"
    params = cfg.observer_params if cfg is not None else None
    inserted = 0
    for d in decisions:
        if not d.measure:
            continue
        m = d.match
        n_out = REQUIRED_OUTPUTS.get(m.kind, 1)
        obs = registry.get(m.name)
        if obs is None:
            obs = registry[m.name] = NodeObserver(m.name, m.kind.value, len(m.inputs), n_out, observer,
                                                  per_head_inputs(m.kind, params))
        elif len(obs.inputs) != len(m.inputs):
            raise MeasurementError(
                f"node {m.name!r} ({m.kind.value}, graph node {m.node!r}) has {len(m.inputs)} observed input(s) in "
                f"this graph but {len(obs.inputs)} in an earlier graph of the same model, so one set of "
                f"observers cannot measure both; leave it in high precision (blocklist={{'names': [{m.name!r}]}}) "
                "or calibrate with calls that take the same path through it")
        node = nodes[m.node]
        if measure_inputs:
            for i, inp in enumerate(m.inputs):
                target = _attr_name(m.name, "in", i)
                _add(gm, target, obs.inputs[i])
                with gm.graph.inserting_before(node):
                    gm.graph.call_module(target, (nodes[inp],))
                inserted += 1
        if measure_outputs or m.kind in REQUIRED_OUTPUTS:
            target = _attr_name(m.name, "out", 0)
            _add(gm, target, obs.outputs[0])
            with gm.graph.inserting_after(node):
                gm.graph.call_module(target, (node,))
            inserted += 1
        if m.kind is OpKind.SDPA:
            a = sdpa_arguments(node)
            target = _attr_name(m.name, "out", 1)
            _add(gm, target, SdpaProbsObserver(obs.outputs[1]))
            with gm.graph.inserting_after(node):
                gm.graph.call_module(target, (a["query"], a["key"], a["attn_mask"], a["is_causal"], a["scale"],
                                              a["enable_gqa"]))
            inserted += 1
    gm.recompile()
    return inserted


# ------------------------------------------------------------------------------ finalize
def clip_target(cfg, match) -> ClipTarget | None:  # noqa: ANN001  (FP8Config, Match)
    """The scale rule QUANTIZE applies to a value measured at ``match`` under ``cfg`` (its scale
    method and input backoff; the KV cache's FP8 format for a kv_cache node), which the mse
    observer optimizes for; None when the node's scale needs no measurement."""
    method = cfg.scale_method_for(match.name, match.module_type)
    if not method.needs_measurement:
        return None
    backoff, _ = cfg.backoffs_for(match.name, match.module_type)
    kv = match.kind is OpKind.KV_CACHE
    fp8_dtype, fp8_max = (cfg.kv_fp8_dtype, cfg.kv_fp8_max) if kv else (cfg.fp8_dtype, cfg.fp8_max)
    where = f"node {match.name!r}"

    def scale(value: Tensor) -> Tensor:
        return numerics.activation_scale(value, method.value, fp8_dtype=fp8_dtype, target=cfg.target.value,
                                         backoff=backoff, where=where)

    return ClipTarget(scale, fp8_dtype, fp8_max)


def observed_values(observers, cfg, match) -> tuple[list[np.ndarray], list[np.ndarray]]:  # noqa: ANN001
    """``(values, maxabs)`` of each observer of a node, in INC's (C, 1) float64 layout: the value
    written where INC reads the maxabs (the observer's statistic) and the true maxabs."""
    target = clip_target(cfg, match) if cfg.observer.value == "mse" else None
    values, maxabs = [], []
    for o in observers:
        v = o.value(cfg.observer.value, cfg.observer_params, target)
        values.append(v.reshape(-1, 1).cpu().numpy().astype(np.float64))
        maxabs.append(o.amax.reshape(-1, 1).cpu().numpy().astype(np.float64))
    return values, maxabs
