"""vLLM's own FP8 checkpoint (``quant_method: "fp8"``, AutoFP8's format).

``config.json``::

    "quantization_config": {"quant_method": "fp8", "activation_scheme": "static" | "dynamic",
                            "ignored_layers": ["lm_head", ...],
                            "weight_block_size": [bn, bk]}          # block-wise only

What vLLM's ``Fp8Config`` / ``Fp8LinearMethod.create_weights`` (model_executor/layers/
quantization/fp8.py) allocate and therefore what this module writes and checks, per quantized
Linear ``L``:

- ``L.weight`` float8_e4m3fn ``[out, in]``;
- per-tensor weights: ``L.weight_scale`` F32 with one value per fused shard, ``[1]`` for a
  Linear of the checkpoint (a ``PerTensorScaleParameter``): this format has no per-channel weight
  scale, so per-channel schemes (FP8_DYNAMIC, FP8_WEIGHT_ONLY) are refused: use compressed-tensors;
- block weights: ``L.weight_scale_inv`` ``[ceil(out/bn), ceil(in/bk)]`` (the name is vLLM's, kept
  from DeepSeek-V3; a ``weight_scale`` there is never loaded) and ``activation_scheme`` must be
  ``"dynamic"`` (vLLM raises otherwise); vLLM quantizes activations in 1 x bk groups, so fp8fx's
  ``group_size`` must equal ``bk``;
- static activations: ``L.input_scale`` F32 ``[1]``; dynamic: none. One ``activation_scheme`` holds
  for the whole model, so every quantized Linear shares one scheme. ``"dynamic"`` does not say
  per tensor or per token: vLLM picks per token where its CUTLASS kernels run, and
  :func:`plan_from` reads it as per token.

KV cache: ``<attention>.k_scale`` / ``v_scale``, one value each (vLLM remaps
``self_attn.k_scale`` onto its ``Attention`` layer's ``attn.k_scale``); they are used when vLLM
runs with ``kv_cache_dtype="fp8"``. Per-head KV-cache scales cannot be said in this format:
``Fp8Config``'s KV method is vLLM's ``BaseKVCacheMethod`` (quantization/kv_cache.py), which
allocates one 0-d ``k_scale``/``v_scale`` and raises "Only support per-tensor scaling factor for
fp8 KV cache" for anything else, and the config has no KV-cache scheme to say "per head". Saving
a per-head model in this format is refused; compressed-tensors' ``attn_head`` holds it.

FP8 attention: ``<attention>.q_scale``, one value (``[1]``), the query's dequant multiplier.
``BaseKVCacheMethod.create_weights`` allocates ``q_scale`` and ``prob_scale`` (0-d, -1 meaning
"not in the checkpoint") next to ``k_scale``/``v_scale``; ``maybe_remap_kv_scale_name`` maps
``.self_attn.q_scale`` onto ``.self_attn.attn.q_scale``; ``process_weights_after_loading`` raises
for anything but one value, and without a ``q_scale`` uses ``k_scale`` for the query. Backends
that run attention in FP8 with an FP8 KV cache (FlashAttention: ``ops.scaled_fp8_quant(query,
layer._q_scale)`` when ``kv_cache_dtype`` is fp8; FlashInfer with an FP8 query; MLA) quantize the
query with it, dividing by it as fp8fx does. ``prob_scale`` is not written: only ROCm's Triton attention reads it, and the
loader maps no checkpoint name onto ``attn.prob_scale``. A ``q_scale`` needs the layer's
``k_scale``/``v_scale`` (vLLM's FP8 attention reads keys and values from the FP8 cache), and one
layer with a ``q_scale`` means every layer needs one (a missing one runs the query at ``k_scale``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import UnsupportedError
from ..modules import Fp8Linear
from ..schemes import ActivationScheme, LinearScheme, WeightGranularity
from . import _common
from .checks import CONFIG, Manifest, Problem, Structure, block_shape, check_kv_scale, check_scale, fp8_weight_shape
from .moe import collapse
from .plan import AttentionScales, KVScales, Plan, QLinear, kv_strategy

NAME = "vllm"
QUANT_METHOD = "fp8"
_Q = "quantization_config"

__all__ = ["NAME", "quant_config", "linear_tensors", "kv_tensors", "attention_tensors", "check", "plan_from", "notes",
           "PER_HEAD_REFUSED", "expert_scheme_problem"]

#: why a model with per-head KV-cache scales is not saved in this format (module docstring)
PER_HEAD_REFUSED = ("per-head KV-cache scales (observer_params.kv_cache_strategy 'attn_head') cannot be written as "
                    "vLLM 'fp8': vLLM's Fp8Config reads one k_scale/v_scale per attention layer (BaseKVCacheMethod "
                    "raises 'Only support per-tensor scaling factor for fp8 KV cache'). Save the model as "
                    "compressed-tensors (kv_cache_scheme strategy 'attn_head'), or calibrate it with "
                    "kv_cache_strategy 'tensor' to save it in this format")


def _one_scheme(plan: Plan) -> LinearScheme:
    s = _common.one_scheme(plan, "vLLM's 'fp8' format has one activation_scheme and one weight layout for the whole "
                                 "model: save it as compressed-tensors, whose config groups hold one scheme each")
    if s.weights is WeightGranularity.CHANNEL:
        raise UnsupportedError(f"scheme '{s.describe()}': vLLM's 'fp8' format holds one weight scale per tensor (or "
                               "per block), not per channel; save FP8_DYNAMIC / FP8_WEIGHT_ONLY models as "
                               "compressed-tensors")
    if s.weight_only:
        raise UnsupportedError(f"scheme '{s.describe()}': vLLM's 'fp8' format always quantizes activations "
                               "(activation_scheme static or dynamic); save weight-only models as compressed-tensors")
    if s.weights is WeightGranularity.BLOCK:
        if s.static:
            raise UnsupportedError("block weights with static activations: vLLM's 'fp8' format runs block weights "
                                   "with dynamic activations only")
        if s.activations is not ActivationScheme.DYNAMIC_GROUP or s.group_size != s.block[1]:
            raise UnsupportedError(f"scheme '{s.describe()}': vLLM quantizes the activations of block-wise weights in "
                                   f"1x{s.block[1]} groups (the block's columns); use activations dynamic_group with "
                                   f"group_size {s.block[1]}, or save as compressed-tensors")
    return s


def quant_config(plan: Plan) -> dict[str, Any]:
    _common.require_e4m3(plan, "vLLM's 'fp8' weights are float8_e4m3fn",
                         "the KV cache is stored in E5M2: vLLM's kv_cache_dtype fp8_e5m2 takes no scales, so the "
                         "calibrated ones would be dropped; calibrate with kv_cache_dtype fp8_e4m3")
    if kv_strategy(plan) == "attn_head":
        raise UnsupportedError(PER_HEAD_REFUSED)
    s = _one_scheme(plan)
    out: dict[str, Any] = {"quant_method": QUANT_METHOD, "activation_scheme": "static" if s.static else "dynamic",
                           "ignored_layers": collapse(list(plan.hp_linears), plan.experts, str)}
    if s.weights is WeightGranularity.BLOCK:
        out["weight_block_size"] = list(s.block)
    return out


def expert_scheme_problem(s: LinearScheme) -> str | None:
    """Why vLLM's ``Fp8MoEMethod`` (quantization/fp8.py) cannot run FP8 experts in scheme ``s``, or
    None: it allocates the Linear layouts of this format per expert (``w13_weight_scale`` [E, 2] and
    ``w2_weight_scale`` [E] per tensor, static ``w13_input_scale`` / ``w2_input_scale`` [E] of which it
    keeps the maximum, or ``*_weight_scale_inv`` blocks), so every scheme this format holds runs."""
    return None


def linear_tensors(name: str, m: Fp8Linear) -> dict[str, Tensor]:
    if m.scheme.weights is WeightGranularity.BLOCK:
        return _common.linear_tensors(name, m, "weight_scale_inv", m.weight_scale, (1,))
    return _common.linear_tensors(name, m, "weight_scale", m.weight_scale.reshape(1), (1,))


def kv_tensors(path: str, kv: KVScales) -> dict[str, Tensor]:
    if kv.heads is not None:
        raise UnsupportedError(f"{path}: {PER_HEAD_REFUSED}")
    return _common.kv_tensors(f"{path}.k_scale", f"{path}.v_scale", kv, (1,))


def attention_tensors(path: str, a: AttentionScales) -> dict[str, Tensor]:
    return {f"{path}.q_scale": torch.tensor([a.q], dtype=torch.float32)}


def plan_from(m: Manifest, st: Structure, problems: list[Problem]) -> Plan | None:
    q = m.quant
    where = f"{CONFIG}: {_Q}"
    if q is None:
        problems.append(Problem(where, "missing: vLLM would load the FP8 weights as an unquantized model"))
        return None
    if q.get("quant_method") != QUANT_METHOD:
        problems.append(Problem(f"{where}.quant_method", f"{q.get('quant_method')!r}, expected {QUANT_METHOD!r}"))
        return None
    act = q.get("activation_scheme")
    if act not in ("static", "dynamic"):
        problems.append(Problem(f"{where}.activation_scheme", f"{act!r}; vLLM accepts 'static' or 'dynamic' "
                                "(and raises on anything else)"))
        return None
    wbs = q.get("weight_block_size")
    ignored = q.get("ignored_layers") or []
    if not isinstance(ignored, list) or not all(isinstance(i, str) for i in ignored):
        problems.append(Problem(f"{where}.ignored_layers", f"{ignored!r}; expected a list of module names"))
        return None
    if wbs is not None:
        if not (isinstance(wbs, list) and len(wbs) == 2 and all(isinstance(b, int) and b > 0 for b in wbs)):
            problems.append(Problem(f"{where}.weight_block_size", f"{wbs!r}; expected [rows, cols] of positive "
                                    "integers"))
            return None
        if act != "dynamic":
            problems.append(Problem(f"{where}.activation_scheme", f"{act!r} with weight_block_size: vLLM runs block "
                                    "weights with dynamic activations only (and raises)"))
            return None
        scheme = LinearScheme(WeightGranularity.BLOCK, ActivationScheme.DYNAMIC_GROUP, tuple(wbs), wbs[1])
    else:
        scheme = LinearScheme(WeightGranularity.TENSOR,
                              ActivationScheme.STATIC if act == "static" else ActivationScheme.DYNAMIC_TOKEN)
    # vLLM skips a layer whose prefix is in ignored_layers (quant_utils.is_layer_skipped: exact names)
    for i in ignored:
        if i not in st.modules:
            problems.append(Problem(f"{where}.ignored_layers", f"{i!r} names no module of this model (a typo keeps "
                                    "the module it meant quantized)"))
    skip = set(ignored)
    for ckpt, info in st.experts.items():  # vLLM skips a FusedMoE layer named by its prefix
        if ckpt in skip:
            skip.update(info.all_names())
    linears = {n: QLinear(scheme, torch.float8_e4m3fn) for n in st.linears if n not in skip}
    has_kv = any(f"{p}.k_scale" in m.tensors or f"{p}.v_scale" in m.tensors for p in st.attention)
    kv = {p: KVScales(float("nan"), float("nan"), torch.float8_e4m3fn) for p in st.attention} if has_kv else {}
    has_q = any(f"{p}.q_scale" in m.tensors for p in st.attention)
    attention = {p: AttentionScales(float("nan"), module_type=type(st.modules[p]).__name__)
                 for p in st.attention} if has_q else {}  # values read on load
    return Plan(linears, [n for n in st.linears if n in skip], kv, attention=attention)


def check(m: Manifest, st: Structure, plan: Plan | None, problems: list[Problem]) -> None:
    if plan is None:
        return
    for name, ql in plan.linears.items():
        s = ql.scheme
        shape = fp8_weight_shape(m, name, (f", but {name} is not in ignored_layers: vLLM allocates a float8_e4m3fn "
                                 "weight for it (list high-precision layers in ignored_layers)"), problems)
        if shape is None:
            continue
        out_f, in_f = shape
        if s.weights is WeightGranularity.BLOCK:
            check_scale(m, f"{name}.weight_scale_inv", [block_shape(out_f, in_f, s.block)],
                        f"weight_block_size {list(s.block)}", problems)
            if f"{name}.weight_scale" in m.tensors:
                problems.append(Problem(f"{name}.weight_scale", "present in a block-wise checkpoint: vLLM reads "
                                        "block scales from weight_scale_inv and never loads this one"))
        else:
            info = m.tensors.get(f"{name}.weight_scale")
            if info is not None and info.shape not in ((), (1,)):
                problems.append(Problem(f"{name}.weight_scale", f"shape {list(info.shape)}: vLLM's 'fp8' format holds "
                                        "one weight scale per tensor ([1]); per-channel scales belong in a "
                                        "compressed-tensors checkpoint"))
            else:
                check_scale(m, f"{name}.weight_scale", [(), (1,)], "per-tensor weights", problems)
        if s.static:
            check_scale(m, f"{name}.input_scale", [(), (1,)], "activation_scheme 'static'", problems)
        elif f"{name}.input_scale" in m.tensors:
            problems.append(Problem(f"{name}.input_scale", "present, but activation_scheme is 'dynamic': vLLM does "
                                    "not load it (was the checkpoint meant to be static?)"))
    for name in plan.hp_linears:
        w = m.tensors.get(f"{name}.weight")
        if w is not None and w.dtype in ("F8_E4M3", "F8_E5M2"):
            problems.append(Problem(f"{name}.weight", f"{w.dtype}, but {name} is in ignored_layers: vLLM loads it as "
                                    "an unquantized weight (raw FP8 codes without a scale)"))
    for path in st.attention:
        if plan.kv:  # one layer with scales means every layer needs them: a missing one runs at 1.0
            for key in ("k_scale", "v_scale"):
                check_kv_scale(m, f"{path}.{key}", [(), (1,)], "vLLM's 'fp8' format (BaseKVCacheMethod)", problems)
        if plan.attention:  # one layer with a q_scale means every layer needs one: a missing one runs at k_scale
            check_scale(m, f"{path}.q_scale", [(), (1,)], "vLLM's FP8 query scale (BaseKVCacheMethod: one value)",
                        problems)
            if not plan.kv:
                problems.append(Problem(f"{path}.q_scale", "present without k_scale/v_scale: vLLM quantizes the query "
                                        "only in FP8 attention over an FP8 KV cache, whose scales the checkpoint must "
                                        "hold (or it runs them at 1.0)"))
        if f"{path}.prob_scale" in m.tensors:
            problems.append(Problem(f"{path}.prob_scale", "vLLM's loader maps no checkpoint name onto attn.prob_scale "
                                    "and only ROCm's Triton attention reads it: remove it"))
        if f"{path}.kv_scale" in m.tensors:
            problems.append(Problem(f"{path}.kv_scale", "the old single KV scale: write k_scale and v_scale (vLLM "
                                    "uses one value for both only through a deprecated remapping)"))


def notes(plan: Plan) -> list[str]:
    """Consumers other than vLLM that read this file differently (the file is right for vLLM)."""
    out = []
    if any(q.scheme.weights is WeightGranularity.TENSOR for q in plan.linears.values()):
        out.append("transformers (seen with 5.24 on CPU) reads quant_method 'fp8' as block-wise only: it drops "
                   "per-tensor 'weight_scale' tensors as unexpected keys and runs the FP8 weights unscaled. Serve this "
                   "checkpoint with vLLM; for transformers save the model as compressed-tensors")
    if plan.attention:
        out.append("q_scale (FP8 attention): vLLM uses it only with kv_cache_dtype fp8 on a backend that runs "
                   "attention in FP8 (FlashAttention, FlashInfer with an FP8 query, MLA); fp8fx.load_pretrained keeps "
                   "it for the next save but runs the query in high precision")
    return out
