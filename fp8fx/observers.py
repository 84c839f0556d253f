"""Observers: the modules that MEASURE-mode graphs call to record activation statistics.

An observer is an ``nn.Module`` (state_dict-able) called from an FX node. One
:class:`NodeObserver` exists per matched name; every graph that contains that name (the
prefill graph and the decode graph, say) calls the same observer objects, so statistics
accumulate across graphs and calls.

Non-finite values are never folded into a maximum: they are counted, and
``finalize_calibration`` refuses to write measurements for a node that saw them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MaxAbsObserver", "NodeObserver"]


class MaxAbsObserver(nn.Module):
    """Running max of ``|x|`` over every call (per tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("amax", torch.zeros((), dtype=torch.float32))
        self.calls = 0
        self.nonfinite_calls = 0

    def forward(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            return
        self.calls += 1
        if x.numel() == 0:
            return
        a = x.detach().abs().amax().float()
        if not bool(torch.isfinite(a)):
            self.nonfinite_calls += 1
            return
        torch.maximum(self.amax, a.to(self.amax.device), out=self.amax)

    def extra_repr(self) -> str:
        return f"amax={self.amax.item():.6g}, calls={self.calls}"


class NodeObserver(nn.Module):
    """The observers of one matched node: one per activation input, one per output."""

    def __init__(self, name: str, kind: str, n_inputs: int, n_outputs: int) -> None:
        super().__init__()
        self.name = name
        self.kind = kind
        self.inputs = nn.ModuleList(MaxAbsObserver() for _ in range(n_inputs))
        self.outputs = nn.ModuleList(MaxAbsObserver() for _ in range(n_outputs))

    def all(self) -> list[MaxAbsObserver]:
        return [*self.inputs, *self.outputs]

    @property
    def calls(self) -> int:
        return max((o.calls for o in self.all()), default=0)

    @property
    def nonfinite_calls(self) -> int:
        return sum(o.nonfinite_calls for o in self.all())
