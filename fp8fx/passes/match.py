"""Match: find the nodes fp8fx can quantize. Pure: reads a graph, never mutates it.

Kinds of match (:class:`OpKind`):

=========  ==========================================================================
linear     ``linear(x, W[, b])`` (``nn.Linear`` or ``F.linear``), ``addmm(b, x, W)`` and
           ``mm/matmul(x, W)`` where ``W`` is a parameter of the model (GPT-2's Conv1D),
           ``x @ W.T`` (FalconLinear), and grouped MoE expert GEMMs
           ``grouped_mm(x, W.transpose(-2, -1), offs)`` over a stacked ``[E, out, in]``
           parameter (transformers' ``grouped_mm`` experts implementation)
matmul     ``matmul``/``bmm``/``@`` between two activations (attention's Q·Kᵀ and P·V), and
           ``baddbmm``'s product (Bloom's Q·Kᵀ with ALiBi)
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

from ..capture import CapturedGraph

__all__ = ["OpKind", "Match", "INC_TYPE_NAMES", "find_matches", "check_same_op", "owner_path", "sdpa_arguments"]


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
    experts: int = 0                    # >0: a grouped MoE expert GEMM over a stacked [E, out, in] weight
    attention: bool = False             # matmul/softmax inside an attention pattern (see below)
    # what a functional op (matmul, softmax, SDPA, KV write) computes from: the Linears whose
    # outputs reach its inputs. Its name counts ops of its kind in its module in graph order, so
    # two graphs whose control flow differs could give one name to two different ops: a name
    # whose sources differ between graphs is refused (:func:`check_same_op`).
    sources: tuple[str, ...] = ()

    @property
    def type_names(self) -> tuple[str, ...]:
        """Every name an allowlist/blocklist "types" entry may use for this match."""
        return (self.kind.value, self.module_type, *INC_TYPE_NAMES[self.kind])


_LINEAR_FNS = {torch._C._nn.linear, F.linear, torch.ops.aten.linear.default}
_ADDMM_FNS = {torch.addmm, torch.ops.aten.addmm.default}
_MM_FNS = {torch.mm, torch.matmul, operator.matmul, torch.ops.aten.mm.default, torch.ops.aten.matmul.default}
_BMM_FNS = {torch.bmm, torch.ops.aten.bmm.default}
_BADDBMM_FNS = {torch.baddbmm, torch.ops.aten.baddbmm.default}
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


_TRANSPOSE_FNS = {torch.transpose, torch.swapaxes, torch.ops.aten.transpose.int}
_T_FNS = {torch.t, torch.ops.aten.t.default}
_PERMUTE_FNS = {torch.permute, torch.ops.aten.permute.default}
# grouped (MoE experts) GEMMs: x [S, in] times one [in, out] matrix per expert, rows split by offsets
_GROUPED_MM_FNS = {f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) if f is not None}
_GROUPED_MM_OPS = ("aten::_grouped_mm", "transformers::grouped_mm_fallback")


def _is_grouped_mm(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if _is_fn(node, _GROUPED_MM_FNS):
        return True
    target = node.target
    name = getattr(target, "_qualified_op_name", None)  # an OpOverloadPacket
    if name is None and isinstance(target, torch._ops.OpOverload):
        name = target.name()
    return name in _GROUPED_MM_OPS


def _swaps_last_two(node: fx.Node, ndim: int) -> bool:
    """``node`` swaps the last two dimensions of its first argument (and does nothing else)."""
    if node.op == "call_function" and node.target is getattr:
        return (node.args[1] == "T" and ndim == 2) or node.args[1] == "mT"
    if _is_fn(node, _T_FNS, ("t",)):
        return ndim == 2
    if _is_fn(node, _TRANSPOSE_FNS, ("transpose", "swapaxes")):
        dims = node.args[1:3]
        return len(dims) == 2 and all(isinstance(d, int) for d in dims) and {d % ndim for d in dims} == {ndim - 2, ndim - 1}
    if _is_fn(node, _PERMUTE_FNS, ("permute",)):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        want = list(range(ndim - 2)) + [ndim - 1, ndim - 2]
        return all(isinstance(d, int) for d in dims) and [d % ndim for d in dims] == want
    return False


def _param_operand(arg: Any, cg: CapturedGraph) -> tuple[str, bool, int, tuple[int, ...]] | None:
    """A GEMM operand that is a model parameter, read as it is or with its last two dimensions
    swapped (``W.T``, ``W.t()``, ``W.mT``, ``W.transpose(-2, -1)``; FalconLinear, MoE experts).

    Returns (parameter name, swapped, graph uses of the parameter, its shape) or None.
    """
    if not isinstance(arg, fx.Node):
        return None
    name = cg.param_name(arg)
    if name is not None:
        shape = _param_shape(arg, cg)
        return (name, False, len(arg.users), shape) if shape is not None else None
    src = arg.args[0] if arg.op in ("call_function", "call_method") and arg.args else None
    name = cg.param_name(src)
    shape = _param_shape(src, cg) if name is not None else None
    if shape is None or len(shape) < 2 or not _swaps_last_two(arg, len(shape)):
        return None
    return name, True, len(src.users) - 1 + len(arg.users), shape


def _param_shape(node: fx.Node, cg: CapturedGraph) -> tuple[int, ...] | None:
    v = _val(node)
    if v is None and node.op == "get_attr":  # a symbolically traced graph: read the attribute
        v = cg.gm
        for part in str(node.target).split("."):
            v = getattr(v, part, None)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _default_scalar(node: fx.Node, *keys: str) -> bool:
    return all(node.kwargs.get(k, 1) == 1 for k in keys)


def _classify(node: fx.Node, cg: CapturedGraph) -> tuple[OpKind, dict] | None:
    """(kind, details) if ``node`` is a candidate, else None.

    A Linear's ``transposed`` says how its weight parameter is *stored*: False for ``[out, in]``
    (``nn.Linear``; ``x @ W.T`` in FalconLinear), True for ``[in, out]`` (GPT-2's Conv1D,
    ``addmm(b, x, W)``). ``experts`` > 0 marks a grouped MoE GEMM over a stacked 3-D weight.
    """
    if _is_fn(node, _LINEAR_FNS, ("linear",)):  # linear(x, W[out, in])
        w = _param_operand(_arg(node, 1, "weight"), cg)
        if w is not None and len(w[3]) == 2:
            return OpKind.LINEAR, {"inputs": (_arg(node, 0, "input"),), "weight": w[0], "transposed": w[1],
                                   "uses": w[2], "bias": cg.param_name(_arg(node, 2, "bias"))}
        if w is not None:
            return None
        return OpKind.MATMUL, {"inputs": (_arg(node, 0, "input"), _arg(node, 1, "weight"))}
    if _is_fn(node, _ADDMM_FNS, ("addmm",)):  # addmm(b, x, W[in, out])
        w = _param_operand(_arg(node, 2, "mat2"), cg)
        if w is not None and len(w[3]) == 2 and _default_scalar(node, "alpha", "beta"):
            return OpKind.LINEAR, {"inputs": (_arg(node, 1, "mat1"),), "weight": w[0], "transposed": not w[1],
                                   "uses": w[2], "bias": cg.param_name(_arg(node, 0, "input"))}
        return None
    if _is_grouped_mm(node):  # grouped_mm(x[S, in], W[E, in, out], offs)
        w = _param_operand(_arg(node, 1, "mat_b" if node.target in _GROUPED_MM_FNS else "weight"), cg)
        plain = node.kwargs.get("bias") is None and node.kwargs.get("out_dtype") is None and all(
            a is None for a in node.args[3:])  # no bias, no output dtype
        if w is not None and len(w[3]) == 3 and plain:
            return OpKind.LINEAR, {"inputs": (node.args[0],), "weight": w[0], "transposed": not w[1],
                                   "uses": w[2], "experts": int(w[3][0])}
        return None
    if _is_fn(node, _MM_FNS | _BMM_FNS, ("matmul", "mm", "bmm", "__matmul__")):
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        w = _param_operand(b, cg)
        if w is not None and len(w[3]) == 2:  # x @ W[in, out], or x @ W[out, in].T
            return OpKind.LINEAR, {"inputs": (a,), "weight": w[0], "transposed": not w[1], "uses": w[2]}
        if cg.param_name(a) is None and w is None:
            return OpKind.MATMUL, {"inputs": (a, b)}
        return None
    if _is_fn(node, _BADDBMM_FNS, ("baddbmm",)):  # beta * input + alpha * (b1 @ b2): Bloom's Q·Kᵀ
        a, b = _arg(node, 1, "batch1"), _arg(node, 2, "batch2")
        if cg.param_name(a) is None and cg.param_name(b) is None:
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


_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def sdpa_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of a ``scaled_dot_product_attention`` node by name, defaults filled in."""
    out = dict(_SDPA_DEFAULTS)
    out.update(zip(_SDPA_PARAMS, node.args))
    out.update(node.kwargs)
    return out


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


_ATTENTION_HOPS = 6  # scaling, mask add, dtype casts, dropout, views between the attention ops


def _near(start: fx.Node, pred, forward: bool) -> bool:
    """Whether a node satisfying ``pred`` lies within a few data-flow hops of ``start``."""
    frontier, seen = [start], {start}
    for _ in range(_ATTENTION_HOPS):
        nxt = []
        for n in frontier:
            for m in (n.users if forward else n.all_input_nodes):
                if m in seen or m.op not in ("call_function", "call_method"):
                    continue
                if pred(m):
                    return True
                seen.add(m)
                nxt.append(m)
        frontier = nxt
    return False


def _attention_roles(kinds: dict[fx.Node, OpKind]) -> set[fx.Node]:
    """The matmuls and softmaxes that form attention: ``Q·Kᵀ`` (a matmul whose output reaches a
    softmax), ``P·V`` (a matmul whose first input comes from a softmax) and their softmax.

    Other activation matmuls (a rotary-frequency outer product, a custom model's bilinear term)
    and other softmaxes (a classifier's output) are matched but are not attention: INC, whose
    semantics fp8fx follows, quantizes only attention's Matmul and Softmax modules.
    """
    is_softmax = lambda n: kinds.get(n) is OpKind.SOFTMAX  # noqa: E731
    out: set[fx.Node] = set()
    for node, kind in kinds.items():
        if kind is OpKind.MATMUL:
            first = node.args[0] if node.args else None
            if _near(node, is_softmax, True) or (
                    isinstance(first, fx.Node) and (is_softmax(first) or _near(first, is_softmax, False))):
                out.add(node)
    matmuls = set(out)
    for node, kind in kinds.items():
        if kind is OpKind.SOFTMAX and (_near(node, matmuls.__contains__, True)
                                       or _near(node, matmuls.__contains__, False)):
            out.add(node)
    return out


def _linear_name(weight: str) -> str:
    """A Linear's node name: a module's own "weight" is named after the module (INC's key); any
    other parameter used as a weight keeps its full name, so that two never collide."""
    owner, _, leaf = weight.rpartition(".")
    return owner if leaf == "weight" and owner else weight


_SOURCE_SEARCH_LIMIT = 400  # nodes visited backwards from one functional op


def _linear_sources(node: fx.Node, linear_names: dict[fx.Node, str]) -> tuple[str, ...]:
    """Names of the Linear matches whose outputs reach ``node`` without passing another Linear."""
    found: set[str] = set()
    frontier, seen = list(node.all_input_nodes), set()
    while frontier and len(seen) < _SOURCE_SEARCH_LIMIT:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in linear_names:
            found.add(linear_names[n])
        else:
            frontier.extend(n.all_input_nodes)
    return tuple(sorted(found))


def check_same_op(known: Match, new: Match) -> None:
    """Refuse one name for two different ops: a functional op named by its order in its module
    must compute from the same Linears in every graph of a model (prefill, decode, a new shape).
    """
    if known.kind is OpKind.LINEAR or (known.kind, known.sources) == (new.kind, new.sources):
        return
    from ..errors import CaptureError

    raise CaptureError(
        f"node name {new.name!r} stands for two different ops in two graphs of this model: one "
        f"computes from {list(known.sources) or 'no Linear'}, the other from {list(new.sources) or 'no Linear'}. "
        f"fp8fx names functional ops by their order within {new.module_path or 'the model'!r}, and "
        "these graphs differ in that order (data-dependent control flow), so a scale could land on "
        "the wrong op. Calibrate and run with inputs that take the same path, or blocklist "
        f"{new.kind.value!r} ops of that module (blocklist names [{new.module_path!r}]).")


def find_matches(cg: CapturedGraph) -> list[Match]:
    """Every quantization candidate of a captured graph, in graph order."""
    counters: dict[tuple[str, OpKind], int] = defaultdict(int)
    out: list[Match] = []
    found_at = {node: _classify(node, cg) for node in cg.gm.graph.nodes
                if node.op in ("call_function", "call_method")}
    found_at = {n: f for n, f in found_at.items() if f is not None}
    attention = _attention_roles({n: f[0] for n, f in found_at.items()})
    linear_names: dict[fx.Node, str] = {}
    for node, (kind, d) in found_at.items():
        if kind is OpKind.LINEAR:
            linear_names[node] = _linear_name(d["weight"])
    for node, (kind, d) in found_at.items():
        uses = 1
        if d.get("weight") is not None:
            uses = d["uses"]
        path, type_name = cg.module_path_of(node)
        if kind is OpKind.LINEAR:
            name = linear_names[node]
        else:
            i = counters[(path, kind)]
            counters[(path, kind)] += 1
            name = f"{path}.{kind.value}_{i}" if path else f"{kind.value}_{i}"
        inputs = tuple(a.name for a in d["inputs"] if isinstance(a, fx.Node))
        out.append(Match(
            node=node.name, kind=kind, name=name, module_path=path, module_type=type_name,
            inputs=inputs, weight=d.get("weight"), weight_transposed=d.get("transposed", False),
            bias=d.get("bias"), weight_uses=uses, module_is_linear=_owned_by_linear(node), experts=d.get("experts", 0),
            attention=node in attention,
            sources=() if kind is OpKind.LINEAR else _linear_sources(node, linear_names),
        ))
    return out
