"""The compressed-tensors checkpoint (llm-compressor's format; read by vLLM and transformers).

``config.json``::

    "quantization_config": {
      "quant_method": "compressed-tensors", "format": "float-quantized",
      "quantization_status": "compressed",
      "config_groups": {"group_0": {"targets": ["Linear"],
          "weights": {"num_bits": 8, "type": "float", "symmetric": true, "dynamic": false,
                      "strategy": "tensor" | "channel" | "block", "block_structure": [bo, bi]},
          "input_activations": null | {"num_bits": 8, "type": "float", "symmetric": true,
                      "strategy": "tensor" | "token" | "group", "dynamic": bool, "group_size": g}}},
      "ignore": ["lm_head", ...],
      "kv_cache_scheme": null | {"num_bits": 8, "type": "float", "symmetric": true,
                                 "strategy": "tensor" | "attn_head", "dynamic": false}}

Tensors per quantized Linear ``L``: ``L.weight`` F8_E4M3 ``[out, in]``; ``L.weight_scale``
``[1]`` (tensor), ``[out, 1]`` (channel) or ``[ceil(out/bo), ceil(in/bi)]`` (block); static
activations add ``L.input_scale`` ``[1]``. An FP8 KV cache adds ``<attention>.k_scale`` and
``v_scale``, ``[1]`` each, or ``[num_kv_heads, 1, 1]`` each with strategy ``"attn_head"`` (per-head
scales; vLLM reads them only on some attention backends, see :func:`notes`). The scale shapes are
the ones compressed-tensors' ``initialize_qparams`` allocates (quantization/lifecycle/initialize.py):
transformers loads the checkpoint into those parameters, so any other shape fails or, for a 0-d
scale, does not load.

One config group per distinct scheme: a model with one scheme targets the class ``Linear`` and
lists the high-precision Linears in ``ignore``; several schemes target their modules by exact name.
Targets match as compressed-tensors matches them (``utils/match.py``): an exact module name, a
``re:`` regular expression (``re.match``), or the name of a class in the module's MRO.

FP8 attention: one more config group, ``"attention"``, that targets the attention modules' class
(``["LlamaAttention"]``, as llm-compressor's attention examples write it) with
``input_activations`` ``{num_bits: 8, type: float, symmetric: true, strategy: "tensor", dynamic:
false}`` and no weights, and ``<attention>.q_scale`` ``[1]`` next to ``k_scale``/``v_scale``.
compressed-tensors (quantization/lifecycle/apply.py, modeling/attention.py) gives such a module a
``QuantizedAttentionImpl`` that rounds the query (after RoPE) to FP8 with ``q_scale`` and
registers ``q_scale``/``k_scale``/``v_scale`` with the ``initialize_qparams`` shapes; the attention
itself then runs in high precision. vLLM drops config groups whose first target names an
``Attention`` class (``CompressedTensorsConfig.from_config``, vllm-project/vllm pull 30141) and
reads ``self_attn.q_scale`` through its KV-cache method (``BaseKVCacheMethod``, one value) when the
checkpoint has a ``kv_cache_scheme``, which fp8fx therefore always writes with the attention group.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedError
from ..modules import Fp8Linear
from ..schemes import ActivationScheme, LinearScheme, WeightGranularity
from . import _common
from .checks import (CONFIG, Manifest, Problem, Structure, block_shape, check_kv_scale, check_scale,
                     fp8_weight_shape)
from .moe import collapse, ignore_pattern
from .plan import AttentionScales, KVScales, Plan, QLinear, kv_strategy

NAME = "compressed-tensors"
QUANT_METHOD = "compressed-tensors"
FORMAT = "float-quantized"
STATUS = "compressed"
_Q = "quantization_config"

__all__ = ["NAME", "quant_config", "linear_tensors", "kv_tensors", "attention_tensors", "check", "plan_from", "notes",
           "expert_scheme_problem"]


# ------------------------------------------------------------------------------------ writing
def _weights(s: LinearScheme) -> dict[str, Any]:
    out: dict[str, Any] = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                           "strategy": s.weights.value}
    if s.weights is WeightGranularity.BLOCK:
        out["block_structure"] = list(s.block)
    return out


def _activations(s: LinearScheme) -> dict[str, Any] | None:
    a = s.activations
    if a is ActivationScheme.NONE:
        return None
    strategy = {ActivationScheme.STATIC: "tensor", ActivationScheme.DYNAMIC_TENSOR: "tensor",
                ActivationScheme.DYNAMIC_TOKEN: "token", ActivationScheme.DYNAMIC_GROUP: "group"}[a]
    out: dict[str, Any] = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy,
                           "dynamic": a is not ActivationScheme.STATIC}
    if a is ActivationScheme.DYNAMIC_GROUP:
        out["group_size"] = s.group_size
    return out


def quant_config(plan: Plan) -> dict[str, Any]:
    _common.require_e4m3(plan, "compressed-tensors 'float' 8-bit means E4M3 (float8_e4m3fn). Quantize with "
                         "fp8_config E4M3",
                         "the KV cache is stored in E5M2, which compressed-tensors' kv_cache_scheme (8-bit 'float' = "
                         "E4M3) cannot say: calibrate with kv_cache_dtype fp8_e4m3 to export it")
    schemes = plan.schemes()
    groups: dict[str, Any] = {}
    for i, s in enumerate(schemes):
        members = collapse([n for n, q in plan.linears.items() if q.scheme == s], plan.experts, ignore_pattern)
        groups[f"group_{i}"] = {"targets": ["Linear"] if len(schemes) == 1 else members,
                                "weights": _weights(s), "input_activations": _activations(s),
                                "output_activations": None}
    strategy = kv_strategy(plan)
    kv = ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False}
          if strategy is not None else None)
    if plan.attention:
        kinds = sorted({a.module_type for a in plan.attention.values()})
        if len(kinds) != 1 or "Attention" not in kinds[0]:
            raise UnsupportedError(f"attention module class(es) {', '.join(kinds)}: compressed-tensors' attention group "
                                   "targets one class, and vLLM recognizes it as attention (and drops it) only when the "
                                   "name holds 'Attention'; save this model as vLLM 'fp8'")
        groups[ATTENTION_GROUP] = {"targets": kinds, "weights": None, "input_activations": dict(_ATTN_ARGS),
                                   "output_activations": None}
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": STATUS,
            "config_groups": groups, "ignore": collapse(list(plan.hp_linears), plan.experts, ignore_pattern),
            "kv_cache_scheme": kv}


#: the config group of FP8 attention, and its activation arguments (module docstring)
ATTENTION_GROUP = "attention"
_ATTN_ARGS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}


def attention_tensors(path: str, a: AttentionScales) -> dict[str, Tensor]:
    return {f"{path}.q_scale": torch.tensor([a.q], dtype=torch.float32)}


def expert_scheme_problem(s: LinearScheme) -> str | None:
    """Why vLLM's ``CompressedTensorsW8A8Fp8MoEMethod`` (compressed_tensors_moe_w8a8_fp8.py) cannot
    run FP8 experts in scheme ``s``, or None. It takes weights 'tensor' with activations 'tensor'
    (static: one input scale per expert, of which it keeps the maximum), weights 'channel' with
    dynamic 'token' activations, and 'block' weights, whose activations it always quantizes in
    dynamic 1x128 groups. Weight-only FP8 experts go to its WNA16 method, which raises for any
    format but 'pack-quantized'."""
    w, a = s.weights, s.activations
    if (w, a) in ((WeightGranularity.TENSOR, ActivationScheme.STATIC),
                  (WeightGranularity.CHANNEL, ActivationScheme.DYNAMIC_TOKEN)):
        return None
    if w is WeightGranularity.BLOCK and a is ActivationScheme.DYNAMIC_GROUP and s.group_size == 128:
        return None
    return (f"FP8 experts in scheme '{s.describe()}': vLLM's compressed-tensors FP8 MoE method runs per-tensor weights "
            "with static per-tensor activations (FP8), per-channel weights with dynamic per-token activations "
            "(FP8_DYNAMIC), or block weights with dynamic 1x128 activation groups (FP8_BLOCK); it raises on weight-only "
            "FP8 experts and on other pairs. Quantize the experts in one of those (scheme {\"linear\": ..., "
            "\"experts\": ...}) or blocklist them")


def linear_tensors(name: str, m: Fp8Linear) -> dict[str, Tensor]:
    s = m.scheme
    ws = m.weight_scale
    if s.weights is WeightGranularity.TENSOR:
        ws = ws.reshape(1)
    elif s.weights is WeightGranularity.CHANNEL:
        ws = ws.reshape(-1, 1)
    return _common.linear_tensors(name, m, "weight_scale", ws, (1,))


def kv_tensors(path: str, kv: KVScales) -> dict[str, Tensor]:
    """``[1]`` per tensor; ``[num_kv_heads, 1, 1]`` per head (compressed-tensors' ``attn_head``)."""
    return _common.kv_tensors(f"{path}.k_scale", f"{path}.v_scale", kv, (1,) if kv.heads is None else (kv.heads, 1, 1))


# ------------------------------------------------------------------------------------ reading
def _matches(name: str, module: nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or any(c.__name__ == target for c in type(module).__mro__ if issubclass(c, nn.Module))


def _scheme(group: str, g: dict[str, Any], problems: list[Problem]) -> LinearScheme | None:
    """The fp8fx scheme of one config group, or None (with problems) when fp8fx cannot run it."""
    where = f"{CONFIG}: {_Q}.config_groups.{group}"
    w = g.get("weights")
    if not isinstance(w, dict):
        problems.append(Problem(f"{where}.weights", "missing: the group quantizes no weights"))
        return None
    bad = [f"{k}={w.get(k)!r}" for k, v in (("num_bits", 8), ("type", "float")) if w.get(k) != v]
    if w.get("symmetric", True) is not True:
        bad.append("symmetric=false")
    if w.get("dynamic", False):
        bad.append(f"dynamic={w.get('dynamic')!r}")
    if bad:
        problems.append(Problem(f"{where}.weights", f"{', '.join(bad)}: not an FP8 (8-bit float, symmetric, static) "
                                "weight scheme"))
        return None
    strategy, block = w.get("strategy"), None
    if strategy not in ("tensor", "channel", "block"):
        problems.append(Problem(f"{where}.weights.strategy", f"{strategy!r}; FP8 weights are 'tensor', 'channel' or "
                                "'block'"))
        return None
    if strategy == "block":
        block = w.get("block_structure")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            problems.append(Problem(f"{where}.weights.block_structure", f"{block!r}; strategy 'block' needs "
                                    "[rows, cols] of positive integers"))
            return None
    a = g.get("input_activations")
    group_size = None
    if a is None:
        act = ActivationScheme.NONE
    elif not isinstance(a, dict) or a.get("num_bits") != 8 or a.get("type") != "float" or \
            a.get("symmetric", True) is not True:
        problems.append(Problem(f"{where}.input_activations", f"{a!r}: not an FP8 (8-bit float, symmetric) "
                                "activation scheme"))
        return None
    else:
        dyn, st = a.get("dynamic", False), a.get("strategy")
        if dyn not in (True, False):
            problems.append(Problem(f"{where}.input_activations.dynamic", f"{dyn!r}; expected true or false"))
            return None
        table = {(False, "tensor"): ActivationScheme.STATIC, (True, "tensor"): ActivationScheme.DYNAMIC_TENSOR,
                 (True, "token"): ActivationScheme.DYNAMIC_TOKEN, (True, "group"): ActivationScheme.DYNAMIC_GROUP}
        act = table.get((dyn, st))
        if act is None:
            problems.append(Problem(f"{where}.input_activations", f"strategy {st!r} with dynamic={dyn}; FP8 "
                                    "activations are static 'tensor', or dynamic 'tensor', 'token' or 'group'"))
            return None
        if act is ActivationScheme.DYNAMIC_GROUP:
            group_size = a.get("group_size")
            if not (isinstance(group_size, int) and group_size > 0):
                problems.append(Problem(f"{where}.input_activations.group_size", f"{group_size!r}; strategy "
                                        "'group' needs a positive group_size"))
                return None
    kwargs: dict[str, Any] = {"weights": strategy, "activations": act}
    if block is not None:
        kwargs["block"] = tuple(block)
    if group_size is not None:
        kwargs["group_size"] = group_size
    if a is not None and g.get("output_activations"):
        problems.append(Problem(f"{where}.output_activations", "fp8fx does not quantize Linear outputs"))
        return None
    return LinearScheme(**kwargs)


def _header(q: dict[str, Any] | None, problems: list[Problem]) -> bool:
    if q is None:
        problems.append(Problem(f"{CONFIG}: {_Q}", "missing: the consumer loads the FP8 weights as high-precision "
                                "parameters, without their scales"))
        return False
    if q.get("quant_method") != QUANT_METHOD:
        problems.append(Problem(f"{CONFIG}: {_Q}.quant_method", f"{q.get('quant_method')!r}, expected "
                                f"{QUANT_METHOD!r}"))
        return False
    if q.get("format") not in (FORMAT, "naive-quantized"):
        problems.append(Problem(f"{CONFIG}: {_Q}.format", f"{q.get('format')!r}; FP8 weights are stored "
                                f"{FORMAT!r} (missing means 'dense': the FP8 weights are not recognized)"))
    if q.get("quantization_status") != STATUS:
        problems.append(Problem(f"{CONFIG}: {_Q}.quantization_status", f"{q.get('quantization_status')!r}; a "
                                f"checkpoint with FP8 weights must say {STATUS!r}: transformers then treats the stored "
                                "weights as already quantized (omitted or 'frozen' loads, and gives wrong outputs)"))
    if not isinstance(q.get("config_groups"), dict) or not q["config_groups"]:
        problems.append(Problem(f"{CONFIG}: {_Q}.config_groups", "missing or empty: no module is quantized"))
        return False
    return True


def plan_from(m: Manifest, st: Structure, problems: list[Problem]) -> Plan | None:
    """The plan a compressed-tensors ``quantization_config`` describes for the model ``st``;
    problems (config keys) are appended; None when the config cannot be read."""
    q = m.quant
    if not _header(q, problems):
        return None
    ignore = q.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        problems.append(Problem(f"{CONFIG}: {_Q}.ignore", f"{ignore!r}; expected a list of module names"))
        return None
    modules = dict(st.linears)
    linears: dict[str, QLinear] = {}
    attention: dict[str, AttentionScales] = {}
    for gname, g in q["config_groups"].items():
        if not isinstance(g, dict) or not isinstance(g.get("targets"), list):
            problems.append(Problem(f"{CONFIG}: {_Q}.config_groups.{gname}.targets", "missing: list the module names "
                                    "or classes the group quantizes"))
            continue
        attn = [p for p in st.attention if any(_matches(p, st.modules[p], t) for t in g["targets"])]
        if attn and not any(_matches(n, mod, t) for n, mod in modules.items() for t in g["targets"]):
            attention.update(_attention_group(gname, g, attn, st, problems))
            continue
        scheme = _scheme(gname, g, problems)
        matched = [n for n, mod in modules.items() if any(_matches(n, mod, t) for t in g["targets"])
                   and not any(_matches(n, mod, i) for i in ignore)]
        if not matched:
            problems.append(Problem(f"{CONFIG}: {_Q}.config_groups.{gname}.targets",
                                    f"{g['targets']!r} match no Linear module of this model"))
        for n in matched:
            if n in linears:
                problems.append(Problem(f"{CONFIG}: {_Q}.config_groups.{gname}", f"{n} is also targeted by another "
                                        "group: which scheme applies is ambiguous"))
            elif scheme is not None:
                linears[n] = QLinear(scheme, torch.float8_e4m3fn)
    for i in ignore:
        if not i.startswith("re:") and not any(_matches(n, mod, i) for n, mod in st.modules.items()):
            problems.append(Problem(f"{CONFIG}: {_Q}.ignore", f"{i!r} names no module of this model (a typo keeps "
                                    "the module it meant quantized)"))
    kv: dict[str, KVScales] = {}
    kvs = q.get("kv_cache_scheme")
    if kvs is not None:
        where = f"{CONFIG}: {_Q}.kv_cache_scheme"
        if not isinstance(kvs, dict) or kvs.get("num_bits") != 8 or kvs.get("type") != "float" or \
                kvs.get("symmetric", True) is not True or kvs.get("dynamic", False) is not False:
            problems.append(Problem(where, f"{kvs!r}: an FP8 KV cache is 8-bit float, symmetric, static"))
        elif kvs.get("strategy") not in ("tensor", "attn_head"):
            problems.append(Problem(f"{where}.strategy", f"{kvs.get('strategy')!r}; FP8 KV-cache scales are per "
                                    "tensor ('tensor') or per KV head ('attn_head'), the strategies vLLM's "
                                    "compressed-tensors KV method accepts"))
        else:
            per_head = kvs["strategy"] == "attn_head"
            for path in st.attention:
                heads = st.kv_heads(path) if per_head else None
                if per_head and heads is None:
                    problems.append(Problem(f"{where}.strategy", f"'attn_head', but {path} does not say how many KV "
                                            "heads it has (k_proj and head_dim, or num_key_value_heads)"))
                    continue
                nan = float("nan") if heads is None else (float("nan"),) * heads
                kv[path] = KVScales(nan, nan, torch.float8_e4m3fn)  # values read on load
    if attention and kvs is None:
        problems.append(Problem(f"{CONFIG}: {_Q}.kv_cache_scheme", "null, but a config group quantizes attention: vLLM "
                                "drops attention groups and reads q_scale only through its KV-cache method, which a "
                                "kv_cache_scheme enables (set it, strategy 'tensor')"))
    return Plan(linears, [n for n in modules if n not in linears], kv, attention=attention)


def _attention_group(gname: str, g: dict[str, Any], paths: list[str], st: Structure,
                     problems: list[Problem]) -> dict[str, AttentionScales]:
    """The attention modules an attention config group quantizes (per-tensor FP8 only)."""
    where = f"{CONFIG}: {_Q}.config_groups.{gname}"
    targets = g["targets"]
    if not (targets and isinstance(targets[0], str) and "Attention" in targets[0]):
        problems.append(Problem(f"{where}.targets", f"{targets!r} match attention modules, but vLLM recognizes an "
                                "attention group only by an 'Attention' class name as its first target and otherwise "
                                "reads it as a Linear group"))
    if g.get("weights") is not None:
        problems.append(Problem(f"{where}.weights", "set on an attention group: compressed-tensors refuses weight "
                                "quantization of attention modules (target their projections instead)"))
    a = g.get("input_activations")
    if not isinstance(a, dict) or any(a.get(k, d) != v for k, v, d in (
            ("num_bits", 8, None), ("type", "float", None), ("symmetric", True, True), ("strategy", "tensor", None),
            ("dynamic", False, False))):
        problems.append(Problem(f"{where}.input_activations", f"{a!r}: fp8fx reads FP8 attention as 8-bit float, "
                                "symmetric, static, strategy 'tensor' (vLLM reads one q_scale per layer)"))
        return {}
    if g.get("output_activations"):
        problems.append(Problem(f"{where}.output_activations", "set on an attention group: no consumer reads it"))
    return {p: AttentionScales(float("nan"), module_type=type(st.modules[p]).__name__) for p in paths}


def check(m: Manifest, st: Structure, plan: Plan | None, problems: list[Problem]) -> None:
    """Every tensor the plan needs, with the name, dtype and shape compressed-tensors allocates."""
    if plan is None:
        return
    for name, ql in plan.linears.items():
        s = ql.scheme
        shape = fp8_weight_shape(m, name, ("; a quantized Linear's weight is F8_E4M3 (a high-precision weight "
                                 "would be treated as FP8 codes)"), problems)
        if shape is None:
            continue
        out_f, in_f = shape
        shapes = {WeightGranularity.TENSOR: [(1,)], WeightGranularity.CHANNEL: [(out_f, 1)],
                  WeightGranularity.BLOCK: [block_shape(out_f, in_f, s.block)]}[s.weights]
        check_scale(m, f"{name}.weight_scale", shapes, f"weights strategy {s.weights.value!r}", problems)
        if s.static:
            check_scale(m, f"{name}.input_scale", [(1,)], "static input activations", problems)
        elif f"{name}.input_scale" in m.tensors:
            problems.append(Problem(f"{name}.input_scale", f"present, but the scheme's activations are "
                                    f"{s.activations.value!r}: the consumer ignores it (was the scheme meant to be "
                                    "static?)"))
        if s.activations is ActivationScheme.DYNAMIC_GROUP and in_f % s.group_size:
            problems.append(Problem(f"{name}.weight", f"in_features {in_f} is not a multiple of the activation "
                                    f"group_size {s.group_size}: compressed-tensors' dynamic group quantization "
                                    "raises on this layer's input (ignore the layer or pick a group_size that "
                                    "divides it)"))
    for name in plan.hp_linears:
        w = m.tensors.get(f"{name}.weight")
        if w is not None and w.dtype in ("F8_E4M3", "F8_E5M2"):
            problems.append(Problem(f"{name}.weight", f"{w.dtype}, but the config leaves {name} unquantized (ignored "
                                    "or untargeted): it would load as raw FP8 codes without a scale"))
        if f"{name}.weight_scale" in m.tensors:
            problems.append(Problem(f"{name}.weight_scale", f"present, but the config leaves {name} unquantized: the "
                                    "scale is dropped"))
    per_head = any(kv.heads is not None for kv in plan.kv.values())
    for path in st.attention:  # the kv_cache_scheme applies to every attention module
        heads = st.kv_heads(path) if per_head else None
        for key in ("k_scale", "v_scale"):
            full = f"{path}.{key}"
            if per_head and heads is not None:
                check_kv_scale(m, full, [(heads, 1, 1)], "kv_cache_scheme strategy 'attn_head'", problems, heads)
            elif plan.kv and not per_head:
                check_kv_scale(m, full, [(1,)], "kv_cache_scheme strategy 'tensor'", problems)
            elif plan.kv:
                pass  # no head count: reported by plan_from
            elif full in m.tensors and (m.quant or {}).get("kv_cache_scheme") is not None:
                pass  # the kv_cache_scheme itself is reported (plan_from)
            elif full in m.tensors:
                problems.append(Problem(full, f"present but {_Q}.kv_cache_scheme is null: the KV-cache scale is "
                                        "silently dropped and an FP8 cache runs at scale 1.0"))
    for path in st.attention:
        full = f"{path}.q_scale"
        if path in plan.attention:
            check_scale(m, full, [(1,)], "the attention group's per-tensor query scale", problems)
        elif full in m.tensors:
            problems.append(Problem(full, "present, but no config group quantizes this attention module: the consumer "
                                    "drops it and runs the query in high precision"))
    if plan.attention and len(plan.attention) != len(st.attention):
        left = sorted(set(st.attention) - set(plan.attention))
        problems.append(Problem(f"{CONFIG}: {_Q}.config_groups.{ATTENTION_GROUP}", f"targets {len(plan.attention)} of "
                                f"{len(st.attention)} attention modules (not {', '.join(left[:4])}): vLLM ignores the "
                                "group and quantizes every layer's query, using k_scale where q_scale is missing"))
    if plan.kv and not st.attention:
        problems.append(Problem(f"{CONFIG}: {_Q}.kv_cache_scheme", "set, but the model has no attention module "
                                "with k_proj/v_proj and a layer_idx"))


def notes(plan: Plan) -> list[str]:
    """Consumers that read this file differently from vLLM (the file itself is right)."""
    if not plan.kv:
        return []
    out = ["transformers (seen with 5.24 and compressed-tensors 0.20) applies kv_cache_scheme only to attention "
           "modules whose forward takes 'past_key_values': the k_scale/v_scale tensors load as unexpected keys and "
           "its KV cache stays in high precision (vLLM and fp8fx.load_pretrained use them)"]
    if plan.attention:
        out.append("FP8 attention (the 'attention' config group, q_scale): transformers (seen with 5.24 and "
                   "compressed-tensors 0.20) does not apply the group either, so q_scale loads as an unexpected key and "
                   "its attention runs in high precision; vLLM quantizes the query with q_scale in its FP8 attention "
                   "backends (with kv_cache_dtype fp8), and fp8fx.load_pretrained keeps the scales for the next save but "
                   "runs the query in high precision")
    if any(kv.heads is not None for kv in plan.kv.values()):
        out.append("per-head KV-cache scales (kv_cache_scheme strategy 'attn_head'): vLLM runs them only on its "
                   "FLASH_ATTN backend with FlashAttention 3 (Hopper GPUs); with any other attention backend it "
                   "refuses to start ('per-head quant scales not supported'), and vLLM releases older than the "
                   "support (vllm-project/vllm pull 30141) refuse the strategy. For other backends save a model "
                   "calibrated with kv_cache_strategy 'tensor'")
    return out
