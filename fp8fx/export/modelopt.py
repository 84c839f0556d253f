"""NVIDIA ModelOpt's FP8 checkpoint (``hf_quant_config.json``; read by vLLM, SGLang, TensorRT-LLM).

ModelOpt's ``export_hf_checkpoint`` (modelopt/torch/export/unified_export_hf.py) writes two
descriptions of the same quantization, and fp8fx writes both:

``hf_quant_config.json`` (the file TensorRT-LLM and SGLang read; vLLM reads it when config.json
has no ``quantization_config``)::

    {"producer": {"name": "fp8fx", "version": "..."},
     "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" | null,
                      "exclude_modules": ["lm_head", ...]}}

``config.json`` ``quantization_config`` (ModelOpt's ``convert_hf_quant_config_format``; vLLM
reads this one first)::

    {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head", ...],
     "producer": {...}, "kv_cache_scheme": {"dynamic": false, "num_bits": 8, "type": "float"},
     "config_groups": {"group_0": {...}}}          # config_groups for quant_algo FP8 only

The FP8 ``quant_algo`` values and what vLLM's ``ModelOptFp8Config`` (model_executor/layers/
quantization/modelopt.py) allocates for each, per quantized Linear ``L`` — which is what this
module writes and checks:

- ``FP8`` (fp8fx: per-tensor weights, static activations): ``L.weight`` F8_E4M3 ``[out, in]``,
  ``L.weight_scale`` and ``L.input_scale``, one value each (ModelOpt writes 0-d tensors; vLLM
  loads 0-d or ``[1]``). vLLM always allocates ``input_scale``: the activations are static.
- ``FP8_PER_CHANNEL_PER_TOKEN`` (fp8fx ``FP8_DYNAMIC``): ``L.weight_scale`` F32 ``[out]``, no
  ``input_scale`` (dynamic per-token activations).
- ``FP8_PB_WO`` (fp8fx ``FP8_BLOCK``: 128x128 weight blocks, dynamic 1x128 activation groups, which
  is how vLLM runs it): ``L.weight_scale`` ``[out/128, 1, in/128, 1]``; vLLM raises unless
  ``out`` and ``in`` are multiples of 128 (and a fused QKV would share blocks across shards).

Other fp8fx schemes (weight-only, per-tensor dynamic activations, other block sizes, several
schemes in one model, E5M2) have no ModelOpt FP8 algorithm that vLLM reads, and are refused
naming the format that holds them.

``exclude_modules`` / ``ignore`` are matched as vLLM's ``is_layer_excluded`` matches them: the exact
module name, a substring of it, or an ``fnmatch`` wildcard (ModelOpt writes ``prefix*``
wildcards). fp8fx writes the exact names of the high-precision Linears.

KV cache: ``<attention>.k_proj.k_scale`` and ``<attention>.v_proj.v_scale``, one value each, with
``kv_cache_quant_algo: "FP8"`` (ModelOpt's ``postprocess_state_dict`` names them so; vLLM's
``maybe_remap_kv_scale_name`` remaps ``.self_attn.k_proj.k_scale`` onto ``self_attn.attn.k_scale``).
Per-head KV-cache scales have no ModelOpt form: ``kv_cache_quant_algo`` and ``kv_cache_scheme``
carry no strategy, and vLLM's ``ModelOptFp8KVCacheMethod`` is its ``BaseKVCacheMethod`` (one 0-d
scale; anything else raises "Only support per-tensor scaling factor for fp8 KV cache"). Saving a
per-head model in this format is refused; compressed-tensors' ``attn_head`` holds it.

FP8 attention has no ModelOpt form: ModelOpt's HF plugin quantizes the query (``q_bmm_quantizer``),
but its export (``postprocess_state_dict``, modelopt/torch/export/quant_utils.py) renames only the
``k_bmm_quantizer``/``v_bmm_quantizer`` amaxes to ``k_proj.k_scale``/``v_proj.v_scale`` and drops
every other ``_amax``; ``hf_quant_config.json`` has no key for it, and vLLM's loader maps no
ModelOpt-style query-scale name onto its attention layer (``self_attn.q_proj.q_scale`` falls to its
default rule and is not loaded). Saving FP8 attention in this format is refused
(:data:`ATTENTION_REFUSED`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UnsupportedError
from ..modules import Fp8Linear
from ..schemes import ActivationScheme, LinearScheme, WeightGranularity
from . import _common
from .checks import CONFIG, Manifest, Problem, Structure, check_kv_scale, check_scale, fp8_weight_shape
from .moe import collapse
from .plan import KVScales, Plan, QLinear, kv_strategy

NAME = "modelopt"
QUANT_METHOD = "modelopt"
HF_QUANT_CONFIG = "hf_quant_config.json"
_Q = "quantization_config"
PB_BLOCK = 128  # vLLM's ModelOptFp8PbWoLinearMethod fixes 128x128 weight blocks

#: quant_algo -> the fp8fx scheme that computes what vLLM computes for it
ALGOS: dict[str, LinearScheme] = {
    "FP8": LinearScheme(WeightGranularity.TENSOR, ActivationScheme.STATIC),
    "FP8_PER_CHANNEL_PER_TOKEN": LinearScheme(WeightGranularity.CHANNEL, ActivationScheme.DYNAMIC_TOKEN),
    "FP8_PB_WO": LinearScheme(WeightGranularity.BLOCK, ActivationScheme.DYNAMIC_GROUP, (PB_BLOCK, PB_BLOCK), PB_BLOCK),
}
_KV_SCHEME = {"dynamic": False, "num_bits": 8, "type": "float"}
#: substrings for which vLLM keeps a Linear unquantized whatever the config says
_VLLM_ALWAYS_HP = ("vision_tower", "vision_model", "visual")

__all__ = ["NAME", "QUANT_METHOD", "HF_QUANT_CONFIG", "ALGOS", "quant_config", "linear_tensors", "kv_tensors",
           "check", "plan_from", "notes", "extra_names", "extra_files", "module_scale", "kv_names", "detect",
           "excluded_by", "PER_HEAD_REFUSED", "ATTENTION_REFUSED", "expert_scheme_problem"]

#: why a model with FP8 attention (beyond the KV cache) is not saved in this format (module docstring)
ATTENTION_REFUSED = ("FP8 attention (query scales) cannot be written as ModelOpt: ModelOpt's export writes only the KV "
                     "cache's k_proj.k_scale/v_proj.v_scale (postprocess_state_dict drops the q_bmm_quantizer amax), "
                     "hf_quant_config.json has no key for a query scale, and vLLM maps no ModelOpt name onto its "
                     "attention layer's q_scale. Save the model as compressed-tensors or vllm (attention=\"qkv\"), or "
                     "convert with blocklist {\"types\": [\"sdpa\"]} (keeping kv_cache) to save it in this format")

#: why a model with per-head KV-cache scales is not saved in this format (module docstring)
PER_HEAD_REFUSED = ("per-head KV-cache scales (observer_params.kv_cache_strategy 'attn_head') cannot be written as "
                    "ModelOpt: kv_cache_quant_algo 'FP8' is one scale per tensor, and vLLM's ModelOptFp8KVCacheMethod "
                    "reads one k_scale/v_scale per attention layer ('Only support per-tensor scaling factor for fp8 KV "
                    "cache'). Save the model as compressed-tensors (kv_cache_scheme strategy 'attn_head'), or "
                    "calibrate it with kv_cache_strategy 'tensor' to save it in this format")


# ------------------------------------------------------------------------------------ writing
def _algo(plan: Plan) -> str:
    _common.require_e4m3(plan, "ModelOpt FP8 weights are float8_e4m3fn. Quantize with fp8_config E4M3",
                         "the KV cache is stored in E5M2: ModelOpt's kv_cache_quant_algo 'FP8' is E4M3; calibrate "
                         "with kv_cache_dtype fp8_e4m3 to export it")
    if kv_strategy(plan) == "attn_head":
        raise UnsupportedError(PER_HEAD_REFUSED)
    s = _common.one_scheme(plan, "fp8fx writes one ModelOpt quant_algo per model (not MIXED_PRECISION): save it as "
                                 "compressed-tensors, whose config groups hold one scheme each")
    for algo, scheme in ALGOS.items():
        if s == scheme:
            return algo
    if s.weight_only:
        why = ("ModelOpt has no FP8 weight-only algorithm that vLLM reads (its FP8_PB_WO runs with dynamic "
               "activations in vLLM); save it as compressed-tensors")
    elif s.weights is WeightGranularity.BLOCK:
        why = (f"ModelOpt's block algorithm FP8_PB_WO is {PB_BLOCK}x{PB_BLOCK} weight blocks with dynamic 1x{PB_BLOCK} "
               "activation groups in vLLM (fp8fx FP8_BLOCK); save other block layouts as compressed-tensors or vllm")
    elif s.dynamic:
        why = ("ModelOpt's FP8 algorithms take static per-tensor activations (FP8) or per-channel weights with "
               "per-token activations (FP8_PER_CHANNEL_PER_TOKEN); save it as compressed-tensors"
               + (" or vllm" if s.weights is WeightGranularity.TENSOR else ""))
    else:
        why = ("ModelOpt's static FP8 algorithm has per-tensor weight scales; save per-channel static weights as "
               "compressed-tensors")
    raise UnsupportedError(f"scheme '{s.describe()}': {why}")


def _producer() -> dict[str, str]:
    import fp8fx

    return {"name": "fp8fx", "version": fp8fx.__version__}


def quant_config(plan: Plan) -> dict[str, Any]:
    """config.json's ``quantization_config`` (ModelOpt's compressed-tensors-style layout)."""
    algo = _algo(plan)
    out: dict[str, Any] = {"quant_method": QUANT_METHOD, "quant_algo": algo, "ignore": _exclude(plan),
                           "producer": _producer()}
    if algo == "FP8":
        out["config_groups"] = {"group_0": {"input_activations": dict(_KV_SCHEME), "weights": dict(_KV_SCHEME),
                                            "targets": ["Linear"]}}
    if plan.kv:
        out["kv_cache_scheme"] = dict(_KV_SCHEME)
    return out


def hf_quant_config(plan: Plan) -> dict[str, Any]:
    """The content of ``hf_quant_config.json``."""
    return {"producer": _producer(),
            "quantization": {"quant_algo": _algo(plan), "kv_cache_quant_algo": "FP8" if plan.kv else None,
                             "exclude_modules": _exclude(plan)}}


def _exclude(plan: Plan) -> list[str]:
    """The high-precision Linears, an experts module by its prefix (vLLM's ``is_layer_excluded``
    is asked for the FusedMoE layer's prefix)."""
    return collapse(list(plan.hp_linears), plan.experts, str)


def expert_scheme_problem(s: LinearScheme) -> str | None:
    """Why vLLM's ``ModelOptFp8MoEMethod`` cannot run FP8 experts in scheme ``s``, or None: it is
    the MoE method of every ModelOpt FP8 ``quant_algo`` and allocates per-tensor scales only
    (``w13_weight_scale`` [E, 2], ``w2_weight_scale`` [E]) and static input scales (``[E]``, of which it
    keeps the maximum), so only quant_algo ``FP8`` holds MoE experts."""
    if s == ALGOS["FP8"]:
        return None
    return (f"FP8 experts in scheme '{s.describe()}': vLLM's ModelOptFp8MoEMethod runs every ModelOpt FP8 quant_algo's "
            "experts with per-tensor weight scales and static per-tensor input scales (quant_algo FP8) and would "
            "load these scales into that layout. Save the model as compressed-tensors, or quantize the experts "
            "with the FP8 scheme")


def extra_files(plan: Plan) -> dict[str, str]:
    """Files written beside config.json."""
    return {HF_QUANT_CONFIG: json.dumps(hf_quant_config(plan), indent=2, sort_keys=True) + "\n"}


def linear_tensors(name: str, m: Fp8Linear) -> dict[str, Tensor]:
    s = m.scheme
    ws = m.weight_scale
    if s.weights is WeightGranularity.TENSOR:
        ws = ws.reshape(())
    elif s.weights is WeightGranularity.CHANNEL:
        ws = ws.reshape(-1)
    else:
        ws = ws.reshape(ws.shape[0], 1, ws.shape[1], 1)
    return _common.linear_tensors(name, m, "weight_scale", ws, ())


def kv_names(path: str) -> tuple[str, str]:
    return f"{path}.k_proj.k_scale", f"{path}.v_proj.v_scale"


def kv_tensors(path: str, kv: KVScales) -> dict[str, Tensor]:
    if kv.heads is not None:
        raise UnsupportedError(f"{path}: {PER_HEAD_REFUSED}")
    return _common.kv_tensors(*kv_names(path), kv, ())


def extra_names(plan: Plan) -> set[str]:
    """The tensor names this format adds to the model's own state_dict keys."""
    out: set[str] = set()
    for name, q in plan.linears.items():
        out.add(f"{name}.weight_scale")
        if q.scheme.static:
            out.add(f"{name}.input_scale")
    for path in plan.kv:
        out.update(kv_names(path))
    return out


def module_scale(t: Tensor, scheme: LinearScheme) -> Tensor:
    """A stored weight scale in :class:`~fp8fx.modules.Fp8Linear`'s layout."""
    if scheme.weights is WeightGranularity.BLOCK and t.dim() == 4:
        return t.reshape(t.shape[0], t.shape[2])
    return t


# ------------------------------------------------------------------------------------ reading
def detect(m: Manifest) -> bool:
    """Whether the checkpoint folder of ``m`` holds an ``hf_quant_config.json``."""
    root = Path(m.source)
    return root.is_dir() and (root / HF_QUANT_CONFIG).is_file()


@dataclass
class _Config:
    algo: str | None = None
    kv: bool = False
    exclude: list[str] = field(default_factory=list)
    where_exclude: str = ""


def _from_hf_quant_config(root: Path, problems: list[Problem]) -> _Config | None:
    try:
        d = json.loads((root / HF_QUANT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        problems.append(Problem(HF_QUANT_CONFIG, f"not valid JSON ({e})"))
        return None
    q = d.get("quantization") if isinstance(d, dict) else None
    if not isinstance(q, dict):
        problems.append(Problem(f"{HF_QUANT_CONFIG}: quantization", "missing or not an object: vLLM, SGLang and "
                                "TensorRT-LLM read quant_algo, kv_cache_quant_algo and exclude_modules from it"))
        return None
    kv = q.get("kv_cache_quant_algo")
    if kv is not None and (not isinstance(kv, str) or kv.upper() != "FP8"):
        problems.append(Problem(f"{HF_QUANT_CONFIG}: quantization.kv_cache_quant_algo", f"{kv!r}; fp8fx reads an "
                                "FP8 KV cache ('FP8') or none (null)"))
    return _Config(q.get("quant_algo"), isinstance(kv, str) and kv.upper() == "FP8", q.get("exclude_modules") or [],
                   f"{HF_QUANT_CONFIG}: quantization.exclude_modules")


def _from_config_json(q: dict[str, Any], problems: list[Problem]) -> _Config:
    where = f"{CONFIG}: {_Q}"
    if isinstance(q.get("quantization"), dict):  # vLLM also reads the hf_quant_config layout here
        inner = q["quantization"]
        kv = inner.get("kv_cache_quant_algo")
        return _Config(inner.get("quant_algo"), isinstance(kv, str) and kv.upper() == "FP8",
                       inner.get("exclude_modules") or [], f"{where}.quantization.exclude_modules")
    kvs = q.get("kv_cache_scheme")
    fp8_kv = isinstance(kvs, dict) and kvs.get("type") == "float" and kvs.get("num_bits") == 8
    if kvs is not None and not fp8_kv:
        problems.append(Problem(f"{where}.kv_cache_scheme", f"{kvs!r}; vLLM reads an FP8 KV cache only from "
                                "{\"type\": \"float\", \"num_bits\": 8} (anything else: no KV scales)"))
    return _Config(q.get("quant_algo"), fp8_kv, q.get("ignore") or [], f"{where}.ignore")


def _read(m: Manifest, problems: list[Problem]) -> _Config | None:
    """The ModelOpt config of ``m``: config.json's quantization_config and hf_quant_config.json, which
    must agree (vLLM reads the first, SGLang and TensorRT-LLM the second)."""
    q = m.quant
    from_cfg = None
    if q is not None:
        if not str(q.get("quant_method", "")).lower().startswith(QUANT_METHOD):
            problems.append(Problem(f"{CONFIG}: {_Q}.quant_method", f"{q.get('quant_method')!r}, expected "
                                    f"{QUANT_METHOD!r}"))
            return None
        from_cfg = _from_config_json(q, problems)
    from_file = _from_hf_quant_config(Path(m.source), problems) if detect(m) else None
    if from_cfg is None and from_file is None:
        if q is None and not detect(m):
            problems.append(Problem(HF_QUANT_CONFIG, f"missing, and {CONFIG} has no {_Q}: the consumers load the FP8 "
                                    "weights as an unquantized model"))
        return None
    if from_cfg is None and detect(m):
        try:
            producer = json.loads((Path(m.source) / HF_QUANT_CONFIG).read_text()).get("producer") or {}
        except (OSError, json.JSONDecodeError, AttributeError):
            producer = {}
        if not isinstance(producer, dict) or producer.get("name") != "modelopt":
            problems.append(Problem(f"{CONFIG}: {_Q}", f"missing: vLLM then reads {HF_QUANT_CONFIG} only when its "
                                    "producer.name is 'modelopt' (and raises otherwise); write the config.json "
                                    "quantization_config too (fp8fx.save_pretrained does)"))
    if from_cfg is not None and from_file is not None:
        a, b = (str(c.algo).upper() if c.algo is not None else None for c in (from_cfg, from_file))
        if a != b:
            problems.append(Problem(f"{CONFIG}: {_Q}.quant_algo", f"{from_cfg.algo!r}, but {HF_QUANT_CONFIG} says "
                                    f"{from_file.algo!r}: vLLM reads config.json, SGLang and TensorRT-LLM the other"))
        if from_cfg.kv != from_file.kv:
            problems.append(Problem(f"{CONFIG}: {_Q}.kv_cache_scheme", f"{'FP8' if from_cfg.kv else 'none'}, but "
                                    f"{HF_QUANT_CONFIG} kv_cache_quant_algo says {'FP8' if from_file.kv else 'none'}"))
        if isinstance(from_cfg.exclude, list) and isinstance(from_file.exclude, list) and \
                sorted(map(str, from_cfg.exclude)) != sorted(map(str, from_file.exclude)):
            problems.append(Problem(from_cfg.where_exclude, f"{from_cfg.exclude!r}, but {from_file.where_exclude} is "
                                    f"{from_file.exclude!r}: the consumers would quantize different layers"))
    return from_cfg if from_cfg is not None else from_file


def excluded_by(name: str, patterns: list[str]) -> str | None:
    """The ``exclude_modules`` entry (or vLLM's own rule) that keeps Linear ``name`` unquantized in
    vLLM (``ModelOptQuantConfigBase.is_layer_excluded``: exact, substring or fnmatch), else None."""
    for p in patterns:
        if p == name or p in name or fnmatchcase(name, p):
            return repr(p)
    for s in _VLLM_ALWAYS_HP:
        if s in name:
            return f"vLLM's own rule (names containing {s!r} stay unquantized)"
    return None


def plan_from(m: Manifest, st: Structure, problems: list[Problem]) -> Plan | None:
    c = _read(m, problems)
    if c is None:
        return None
    if not isinstance(c.exclude, list) or not all(isinstance(e, str) for e in c.exclude):
        problems.append(Problem(c.where_exclude, f"{c.exclude!r}; expected a list of module names or wildcards"))
        return None
    algo = str(c.algo).upper() if c.algo is not None else None
    scheme = ALGOS.get(algo) if algo is not None else None
    if scheme is None:
        problems.append(Problem(f"{CONFIG}: {_Q}.quant_algo" if m.quant is not None else
                                f"{HF_QUANT_CONFIG}: quantization.quant_algo",
                                f"{c.algo!r}; fp8fx reads the ModelOpt FP8 algorithms {', '.join(ALGOS)}"))
        return None
    for p in c.exclude:
        if not any(p == n or p in n or fnmatchcase(n, p) for n in st.modules if n):
            problems.append(Problem(c.where_exclude, f"{p!r} names no module of this model (a typo keeps the module "
                                    "it meant quantized)"))
    linears = {n: QLinear(scheme, torch.float8_e4m3fn) for n in st.linears if excluded_by(n, c.exclude) is None}
    kv = {p: KVScales(float("nan"), float("nan"), torch.float8_e4m3fn) for p in st.attention} if c.kv else {}
    return Plan(linears, [n for n in st.linears if n not in linears], kv)


def check(m: Manifest, st: Structure, plan: Plan | None, problems: list[Problem]) -> None:
    """Every tensor the plan needs, with the name, dtype and shape vLLM allocates for it."""
    if plan is None:
        return
    c = _read(m, []) or _Config()
    for name, ql in plan.linears.items():
        s = ql.scheme
        shape = fp8_weight_shape(m, name, (f", but no exclude_modules entry names {name}: the consumers allocate a "
                                 "float8_e4m3fn weight for it (list high-precision layers in exclude_modules)"), problems)
        if shape is None:
            continue
        out_f, in_f = shape
        if s.weights is WeightGranularity.BLOCK:
            if out_f % PB_BLOCK or in_f % PB_BLOCK:
                problems.append(Problem(f"{name}.weight", f"shape [{out_f}, {in_f}]: FP8_PB_WO needs out and in "
                                        f"features that are multiples of {PB_BLOCK} (vLLM raises; a fused layer "
                                        "would mix the blocks of its shards). Exclude the layer or save as "
                                        "compressed-tensors"))
            shapes = [(math.ceil(out_f / PB_BLOCK), 1, math.ceil(in_f / PB_BLOCK), 1)]
            what = f"FP8_PB_WO: [out/{PB_BLOCK}, 1, in/{PB_BLOCK}, 1]"
        elif s.weights is WeightGranularity.CHANNEL:
            shapes, what = [(out_f,)], "FP8_PER_CHANNEL_PER_TOKEN: one scale per output channel"
        else:
            shapes, what = [(), (1,)], "FP8: one scale per tensor"
        check_scale(m, f"{name}.weight_scale", shapes, what, problems)
        if s.static:
            check_scale(m, f"{name}.input_scale", [(), (1,)], "FP8's static activation scale", problems)
        elif f"{name}.input_scale" in m.tensors:
            problems.append(Problem(f"{name}.input_scale", "present, but the quant_algo quantizes activations "
                                    "dynamically: the consumers do not load it"))
    for name in plan.hp_linears:
        w = m.tensors.get(f"{name}.weight")
        why = excluded_by(name, c.exclude)
        if w is not None and w.dtype in ("F8_E4M3", "F8_E5M2"):
            problems.append(Problem(f"{name}.weight", f"{w.dtype}, but {why or 'the config'} excludes {name} from "
                                    "quantization: the consumers load it as an unquantized weight (raw FP8 codes "
                                    "without a scale)"))
        if f"{name}.weight_scale" in m.tensors:
            problems.append(Problem(f"{name}.weight_scale", f"present, but {why or 'the config'} excludes {name}: the "
                                    "scale is dropped"))
    for path in st.attention:
        for key, full in zip(("k_scale", "v_scale"), kv_names(path)):
            if plan.kv:
                check_kv_scale(m, full, [(), (1,)], "ModelOpt's kv_cache_quant_algo 'FP8'", problems)
            elif full in m.tensors:
                problems.append(Problem(full, "present but kv_cache_quant_algo is null: SGLang and TensorRT-LLM do not "
                                        "load KV-cache scales then and an FP8 cache runs at scale 1.0"))
            if f"{path}.{key}" in m.tensors:
                problems.append(Problem(f"{path}.{key}", f"ModelOpt names this scale {full} (SGLang and TensorRT-LLM "
                                        "read that name; vLLM remaps both)"))
        for q_name in (f"{path}.q_scale", f"{path}.q_proj.q_scale"):
            if q_name in m.tensors:
                problems.append(Problem(q_name, "a query scale in a ModelOpt checkpoint: the format has none (no "
                                        "hf_quant_config key; ModelOpt's export never writes one) and vLLM does not "
                                        "load this name for ModelOpt models' attention; remove it"))
    if plan.kv and not st.attention:
        problems.append(Problem(f"{CONFIG}: {_Q}.kv_cache_scheme", "set, but the model has no attention module "
                                "with k_proj/v_proj and a layer_idx"))


def notes(plan: Plan) -> list[str]:
    """How consumers other than vLLM read this (valid) file."""
    algos = {a for a, s in ALGOS.items() if s in plan.schemes()}
    out = ["transformers (5.24) has no ModelOpt quantizer: it skips quant_method 'modelopt' and loads the FP8 codes "
           "without their scales. Serve this checkpoint with vLLM, SGLang or TensorRT-LLM; for transformers save the "
           "model as compressed-tensors"]
    if algos & {"FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO"}:
        out.append("SGLang's ModelOptFp8Config (the version read) runs every quant_algo containing 'FP8' as per-tensor "
                   "FP8 and allocates one weight scale per shard, so it cannot load these scales; vLLM reads them")
    if "FP8_PB_WO" in algos:
        out.append("TensorRT-LLM's QuantAlgo has no FP8_PB_WO (its block algorithm is FP8_BLOCK_SCALES); vLLM reads it")
    return out
