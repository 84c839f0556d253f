"""Annotate: config + matches -> a decision per match, written into ``node.meta["fp8fx"]``.

A decision is plain data: whether the node is measured in MEASURE mode, whether it is
rewritten in QUANTIZE mode, and why not when it is not. ``fp8fx.explain`` prints these.

Allowlist/blocklist follow INC's rule exactly: a match is allowed when its type is not in
``blocklist.types``, its name matches no ``blocklist.names`` regex, and the allowlist is
empty or names its type or matches its name. "Types" accept fp8fx kinds (``linear``), INC
type names (``Linear``, ``Matmul``, ``Softmax``, ``KVCache``, ``ModuleFusedSDPA``...) and the
owning module's class name (``LlamaAttention``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import FP8Config
from .match import Match, OpKind

__all__ = ["Decision", "QUANTIZABLE_KINDS", "decide", "annotate"]

# Kinds that convert rewrites into fp8fx ops (Linears as modules, the others in the graph).
QUANTIZABLE_KINDS = frozenset(OpKind)


@dataclass(frozen=True)
class Decision:
    match: Match
    allowed: bool   # passes allowlist/blocklist
    measure: bool   # gets observers in MEASURE mode
    quantize: bool  # is rewritten in QUANTIZE mode
    reason: str     # why (always set; "quantized" when it is)

    def to_meta(self) -> dict:
        return {"name": self.match.name, "kind": self.match.kind.value, "allowed": self.allowed,
                "measure": self.measure, "quantize": self.quantize, "reason": self.reason}


def _filter_reason(match: Match, cfg: FP8Config) -> str | None:
    """None when allowed, else why not (the config's one implementation of INC's rule)."""
    return cfg.filter_reason(match.name, match.type_names)


def _unsupported_reason(match: Match, model: torch.nn.Module | None) -> str | None:
    """None when this version can rewrite the match, else why not."""
    if match.kind not in QUANTIZABLE_KINDS:
        return (f"{match.kind.value} is matched and measured; quantizing {match.kind.value} is not "
                "supported in this version, it stays in high precision")
    if match.kind in (OpKind.MATMUL, OpKind.SOFTMAX) and not match.attention:
        return (f"{match.kind.value} outside an attention pattern (Q·Kᵀ -> softmax -> ·V): only "
                "attention's matmuls and softmax are quantized (as INC does); it stays in high precision")
    if match.weight is None:
        return None
    router = _router_reason(match)
    if router is not None:
        return router
    if match.weight_uses > 1:
        return (f"weight {match.weight!r} is also read by {match.weight_uses - 1} other op(s) in the "
                "graph (tied or shared, e.g. an lm_head tied to the embedding): quantizing it would "
                "change those ops too, so it stays in high precision")
    owner_name, _, leaf = match.weight.rpartition(".")
    if model is None:  # a torch.compile backend: judge from the graph alone
        return _graph_weight_reason(match, leaf)
    aliases = _aliases(model).get(match.weight, ())
    if aliases:
        return (f"weight {match.weight!r} is the same tensor as {', '.join(aliases)} (tied): it stays "
                "in high precision; untie it (e.g. tie_word_embeddings=False) to quantize it")
    if not owner_name and isinstance(model, torch.nn.Linear):
        return ("the model itself is the Linear: fp8fx replaces a Linear on its parent module, so "
                "wrap it in a parent nn.Module to quantize it")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        owner = None
    return _module_weight_reason(match, owner, leaf)


# A Linear that routes tokens to MoE experts: tiny (hidden x experts), and a small error can
# flip its top-k choice, so it stays in high precision (INC and vLLM leave it alone too). It is
# recognised by its module's class (``MixtralTopKRouter``...) or its name (``mlp.gate``).
_ROUTER_LEAVES = frozenset({"gate", "router", "shared_expert_gate"})


def _router_reason(match: Match) -> str | None:
    leaf = match.name.rpartition(".")[2]
    if "router" not in match.module_type.lower() and leaf not in _ROUTER_LEAVES:
        return None
    return (f"MoE router: {match.name!r} ({match.module_type}) picks each token's experts; a small "
            "error can change that choice and the layer is tiny, so it stays in high precision")


def _is_conv1d(module: torch.nn.Module | None) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear whose weight is stored ``[in, out]``."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and getattr(module, "nf", None) == w.shape[1])


def _graph_weight_reason(match: Match, leaf: str) -> str | None:
    """The torch.compile backend's rule (no model, the graph only)."""
    if match.experts:
        if match.weight_transposed:
            return (f"MoE experts weight {match.weight!r} is stored [experts, in, out]: only "
                    "[experts, out, in] stacks are rewritten in this version, it stays in high precision")
        return None
    if leaf == "weight" and ((match.module_is_linear and not match.weight_transposed)
                             or (match.module_type == "Conv1D" and match.weight_transposed)):
        return None
    return (f"linear whose weight {match.weight!r} does not belong to an nn.Linear or a Conv1D: only "
            "their weights and MoE expert stacks are rewritten in this version, it stays in high precision")


def _module_weight_reason(match: Match, owner: torch.nn.Module | None, leaf: str) -> str | None:
    """prepare/convert's rule: the module that owns the weight must be one convert can replace."""
    if match.experts:
        from ..modules import Fp8Experts

        return Fp8Experts.unsupported_reason(owner, leaf, match)
    if leaf == "weight" and ((isinstance(owner, torch.nn.Linear) and not match.weight_transposed)
                             or (_is_conv1d(owner) and match.weight_transposed)):
        return None
    owner_type = type(owner).__name__ if owner is not None else "?"
    return (f"linear whose weight {match.weight!r} belongs to a {owner_type}, not an nn.Linear or a "
            "Conv1D: only their weights and MoE expert stacks are rewritten in this version, it stays "
            "in high precision")


def _aliases(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Parameter name -> the other names of the same tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: tuple(o for o in names if o != n) for names in by_id.values() if len(names) > 1 for n in names}


def decide(match: Match, cfg: FP8Config, model: torch.nn.Module | None = None) -> Decision:
    blocked = _filter_reason(match, cfg)
    if blocked is not None:
        return Decision(match, allowed=False, measure=False, quantize=False, reason=blocked)
    unsupported = _unsupported_reason(match, model)
    if unsupported is not None:
        return Decision(match, allowed=True, measure=True, quantize=False, reason=unsupported)
    return Decision(match, allowed=True, measure=True, quantize=True, reason="quantized")


def annotate(gm: torch.fx.GraphModule, matches: list[Match], cfg: FP8Config,
             model: torch.nn.Module | None = None) -> list[Decision]:
    """Decide every match and record the decision on its node (``node.meta["fp8fx"]``)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    decisions = [decide(m, cfg, model) for m in matches]
    for d in decisions:
        nodes[d.match.node].meta["fp8fx"] = d.to_meta()
    return decisions
