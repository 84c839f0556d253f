"""Match: find the nodes fp8fx can quantize. Pure: reads a graph, never mutates it.

Kinds of match (:class:`OpKind`):

=========  ==========================================================================
linear     ``linear(x, W[, b])`` (``nn.Linear`` or ``F.linear``), ``addmm(b, x, W)`` and
           ``mm/matmul(x, W)`` where ``W`` is a parameter of the model (GPT-2's Conv1D)
matmul     ``matmul``/``bmm``/``@`` between two activations (attention's Q·Kᵀ and P·V)
softmax    ``torch.softmax`` / ``F.softmax`` / ``Tensor.softmax``
sdpa       ``F.scaled_dot_product_attention``
kv_cache   a KV-cache write: ``cat([past, new], dim=-2)`` of a 4-D cache tensor
           (DynamicCache) or ``index_copy_``/``index_copy`` into one (StaticCache)
=========  ==========================================================================

Functional matmul/softmax/SDPA inside a stock transformers model are found from the graph
itself; no wrapper modules are needed.

Every match gets a stable *name*, the key used in measurement files:

* a Linear is named after the module that owns its weight (``model.layers.0.mlp.up_proj``),
  exactly as INC names it;
* other ops are named ``{owning module}.{kind}_{i}``, ``i`` counting that kind in graph order
  inside the module (``model.layers.0.self_attn.sdpa_0``). The same code path gives the same
  names in the prefill and the decode graph.
"""

from __future__ import annotations

import operator
import re
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..capture import CapturedGraph, module_path_of

__all__ = ["OpKind", "Match", "INC_TYPE_NAMES", "find_matches", "owner_path"]


class OpKind(str, Enum):
    LINEAR = "linear"
    MATMUL = "matmul"
    SOFTMAX = "softmax"
    SDPA = "sdpa"
    KV_CACHE = "kv_cache"


# INC's type names (its allowlist/blocklist "types" and default allowlist) for each kind.
INC_TYPE_NAMES: dict[OpKind, tuple[str, ...]] = {
    OpKind.LINEAR: (
        "Linear", "FalconLinear", "LoRACompatibleLinear", "LinearLayer", "LinearAllreduce",
        "ScopedLinearAllReduce", "LmHeadLinearAllreduce", "RowParallelLinear",
        "ColumnParallelLinear", "MergedColumnParallelLinear", "QKVParallelLinear",
        "ReplicatedLinear", "ParallelLMHead", "Conv1D",
    ),
    OpKind.MATMUL: ("Matmul", "MoeMatmul"),
    OpKind.SOFTMAX: ("Softmax",),
    OpKind.SDPA: ("ModuleFusedSDPA", "FusedSDPA"),
    OpKind.KV_CACHE: ("KVCache", "VLLMKVCache"),
}


@dataclass(frozen=True)
class Match:
    """One quantization candidate in one graph."""

    node: str                 # FX node name in its graph
    kind: OpKind
    name: str                 # stable key (module path, or module path + ".{kind}_{i}")
    module_path: str          # innermost owning module ("" at the root)
    module_type: str          # that module's class name
    inputs: tuple[str, ...]   # names of the activation input nodes, in INC's input order
    weight: str | None = None           # qualified parameter name of a Linear's weight
    weight_transposed: bool = False     # True when W is [in, out] (addmm / mm / Conv1D)
    bias: str | None = None             # qualified parameter name of a Linear's bias
    weight_uses: int = 1                # graph nodes that read the weight (>1: tied or shared)
    module_is_linear: bool = False      # the owning module (nn_module_stack) is an nn.Linear

    @property
    def type_names(self) -> tuple[str, ...]:
        """Every name an allowlist/blocklist "types" entry may use for this match."""
        return (self.kind.value, self.module_type, *INC_TYPE_NAMES[self.kind])


_LINEAR_FNS = {torch._C._nn.linear, F.linear, torch.ops.aten.linear.default}
_ADDMM_FNS = {torch.addmm, torch.ops.aten.addmm.default}
_MM_FNS = {torch.mm, torch.matmul, operator.matmul, torch.ops.aten.mm.default, torch.ops.aten.matmul.default}
_BMM_FNS = {torch.bmm, torch.ops.aten.bmm.default}
_SOFTMAX_FNS = {torch.softmax, F.softmax, torch._softmax, torch.ops.aten._softmax.default, torch.ops.aten.softmax.int}
_SDPA_FNS = {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}
_CAT_FNS = {torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default}
_INDEX_COPY_FNS = {torch.index_copy, torch.ops.aten.index_copy.default, torch.ops.aten.index_copy_.default}


def _is_fn(node: fx.Node, fns: set, methods: tuple[str, ...] = ()) -> bool:
    if node.op == "call_function":
        try:
            return node.target in fns
        except TypeError:  # unhashable target
            return False
    return node.op == "call_method" and node.target in methods


def _arg(node: fx.Node, i: int, key: str) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key)


def _val(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _ndim(node: Any) -> int | None:
    v = _val(node)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _is_cache_source(node: Any, cg: CapturedGraph) -> bool:
    """A past-KV tensor: a graph input that is not a parameter, or a fresh empty tensor."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "placeholder":
        return cg.param_name(node) is None
    if node.op == "call_function" and node.target in {torch.tensor, torch.empty, torch.zeros}:
        return True
    v = _val(node)
    return isinstance(v, torch.Tensor) and v.numel() == 0


def _classify(node: fx.Node, cg: CapturedGraph) -> tuple[OpKind, dict] | None:
    """(kind, details) if ``node`` is a candidate, else None."""
    if _is_fn(node, _LINEAR_FNS, ("linear",)):
        w = cg.param_name(_arg(node, 1, "weight"))
        if w is not None:
            return OpKind.LINEAR, {"inputs": (_arg(node, 0, "input"),), "weight": w,
                                   "bias": cg.param_name(_arg(node, 2, "bias"))}
        return OpKind.MATMUL, {"inputs": (_arg(node, 0, "input"), _arg(node, 1, "weight"))}
    if _is_fn(node, _ADDMM_FNS, ("addmm",)):
        w = cg.param_name(_arg(node, 2, "mat2"))
        if w is not None:
            return OpKind.LINEAR, {"inputs": (_arg(node, 1, "mat1"),), "weight": w, "transposed": True,
                                   "bias": cg.param_name(_arg(node, 0, "input"))}
        return None
    if _is_fn(node, _MM_FNS | _BMM_FNS, ("matmul", "mm", "bmm", "__matmul__")):
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        w = cg.param_name(b)
        if w is not None and _ndim(b) == 2:
            return OpKind.LINEAR, {"inputs": (a,), "weight": w, "transposed": True}
        if cg.param_name(a) is None and w is None:
            return OpKind.MATMUL, {"inputs": (a, b)}
        return None
    if _is_fn(node, _SOFTMAX_FNS, ("softmax",)):
        return OpKind.SOFTMAX, {"inputs": (node.args[0],)}
    if _is_fn(node, _SDPA_FNS):
        return OpKind.SDPA, {"inputs": tuple(_arg(node, i, k) for i, k in enumerate(("query", "key", "value")))}
    if _is_fn(node, _CAT_FNS, ()):
        tensors = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim")
        dim = 0 if dim is None else dim
        if (isinstance(tensors, (list, tuple)) and len(tensors) == 2 and _ndim(node) == 4
                and dim in (-2, 2) and _is_cache_source(tensors[0], cg)):
            return OpKind.KV_CACHE, {"inputs": (tensors[1],)}
        return None
    if _is_fn(node, _INDEX_COPY_FNS, ("index_copy_", "index_copy")):
        if _ndim(node.args[0]) == 4 and len(node.args) >= 4:
            return OpKind.KV_CACHE, {"inputs": (node.args[3],)}
    return None


_FUNCTIONAL_NAME = re.compile(r"^(?:(?P<path>.*)\.)?(?:matmul|softmax|sdpa|kv_cache)_\d+$")


def owner_path(name: str) -> str:
    """The module path a match name belongs to: itself for a Linear, the prefix for the others."""
    m = _FUNCTIONAL_NAME.match(name)
    return (m.group("path") or "") if m else name


def _owned_by_linear(node: fx.Node) -> bool:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return False
    typ = list(stack.values())[-1][1]
    return isinstance(typ, type) and issubclass(typ, torch.nn.Linear)


def find_matches(cg: CapturedGraph) -> list[Match]:
    """Every quantization candidate of a captured graph, in graph order."""
    counters: dict[tuple[str, OpKind], int] = defaultdict(int)
    out: list[Match] = []
    for node in cg.gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        found = _classify(node, cg)
        if found is None:
            continue
        kind, d = found
        uses = 1
        if d.get("weight") is not None:
            uses = max(len(a.users) for a in node.all_input_nodes if cg.param_name(a) == d["weight"])
        path, type_name = module_path_of(node)
        if kind is OpKind.LINEAR:
            weight = d["weight"]
            owner, _, leaf = weight.rpartition(".")
            # a module's own "weight" is named after the module (INC's key); any other
            # parameter used as a weight keeps its full name so two never collide
            name = owner if leaf == "weight" and owner else weight
        else:
            i = counters[(path, kind)]
            counters[(path, kind)] += 1
            name = f"{path}.{kind.value}_{i}" if path else f"{kind.value}_{i}"
        inputs = tuple(a.name for a in d["inputs"] if isinstance(a, fx.Node))
        out.append(Match(
            node=node.name, kind=kind, name=name, module_path=path, module_type=type_name,
            inputs=inputs, weight=d.get("weight"), weight_transposed=d.get("transposed", False),
            bias=d.get("bias"), weight_uses=uses, module_is_linear=_owned_by_linear(node),
        ))
    return out
