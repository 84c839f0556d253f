"""Observe (MEASURE): insert observer nodes on the edges of every measured match.

For a decision with ``measure=True`` the pass inserts, before the matched node, one
``call_module`` node per activation input, and after it one per output when the config
measures outputs. The observer modules come from a shared registry (name -> NodeObserver),
so a name seen in several graphs is observed by the same module. Returns how many observer
nodes were inserted, so tests can assert exact counts.
"""

from __future__ import annotations

import re

import torch.fx as fx

from ..observers import NodeObserver
from .annotate import Decision

__all__ = ["insert_observers"]


def _attr_name(name: str, role: str, i: int) -> str:
    return "fp8fx_obs__" + re.sub(r"\W", "_", name) + f"__{role}{i}"


def insert_observers(gm: fx.GraphModule, decisions: list[Decision], registry: dict[str, NodeObserver],
                     *, measure_inputs: bool = True, measure_outputs: bool = False) -> int:
    nodes = {n.name: n for n in gm.graph.nodes}
    inserted = 0
    for d in decisions:
        if not d.measure:
            continue
        m = d.match
        obs = registry.get(m.name)
        if obs is None:
            obs = registry[m.name] = NodeObserver(m.name, m.kind.value, len(m.inputs), 1)
        elif len(obs.inputs) != len(m.inputs):
            raise ValueError(f"node {m.name!r} has {len(m.inputs)} inputs here and {len(obs.inputs)} elsewhere")
        node = nodes[m.node]
        if measure_inputs:
            for i, inp in enumerate(m.inputs):
                target = _attr_name(m.name, "in", i)
                if not hasattr(gm, target):
                    gm.add_submodule(target, obs.inputs[i])
                with gm.graph.inserting_before(node):
                    gm.graph.call_module(target, (nodes[inp],))
                inserted += 1
        if measure_outputs:
            target = _attr_name(m.name, "out", 0)
            if not hasattr(gm, target):
                gm.add_submodule(target, obs.outputs[0])
            with gm.graph.inserting_after(node):
                gm.graph.call_module(target, (node,))
            inserted += 1
    gm.recompile()
    return inserted
