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
"""

from __future__ import annotations

import re

import torch.fx as fx
from torch import Tensor, nn

from ..attention_ops import attention_probs
from ..errors import MeasurementError
from ..observers import MaxAbsObserver, NodeObserver
from .annotate import Decision
from .match import OpKind, sdpa_arguments

__all__ = ["REQUIRED_OUTPUTS", "insert_observers"]

#: kinds whose outputs are always measured -> number of output entries in the measurement
REQUIRED_OUTPUTS = {OpKind.SOFTMAX: 1, OpKind.SDPA: 2}


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
                     *, measure_inputs: bool = True, measure_outputs: bool = False) -> int:
    nodes = {n.name: n for n in gm.graph.nodes}
    inserted = 0
    for d in decisions:
        if not d.measure:
            continue
        m = d.match
        n_out = REQUIRED_OUTPUTS.get(m.kind, 1)
        obs = registry.get(m.name)
        if obs is None:
            obs = registry[m.name] = NodeObserver(m.name, m.kind.value, len(m.inputs), n_out)
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
