"""A format-neutral description of a quantized model: which Linears are FP8 in which scheme, which
stay in high precision, and the KV-cache scales.

:func:`plan_of` reads it from a model that :func:`fp8fx.convert` / :func:`fp8fx.quantize` (or
:func:`fp8fx.load_pretrained`) returned, by walking ``named_modules()`` (module identity, never a
parsed name): every :class:`~fp8fx.modules.Fp8Linear` is quantized with its own ``scheme``, every
other ``nn.Linear`` is left in high precision, every MoE experts module (:mod:`.moe`) becomes one
Linear per expert and projection under its checkpoint name (an :class:`~fp8fx.modules.Fp8Experts`
in its one scheme, any other in high precision), and the KV scales come from the model's fp8fx state
(the calibrated ``kv_cache`` nodes) or from the checkpoint it was loaded from. Each format
(:mod:`.compressed_tensors`, :mod:`.vllm`) turns a plan into its ``quantization_config`` and its
tensor names, and a checkpoint's ``quantization_config`` back into a plan.

KV-cache scales are one float per tensor, or one per KV head (a tuple, from calibration with
``observer_params.kv_cache_strategy = "attn_head"``); :func:`kv_strategy` says which a plan holds
(one for the whole model, as every format has one KV-cache scheme), and each format writes
per-head scales only where its consumer reads them (docs/export.md, "Per-head KV-cache scales").

FP8 attention (an fp8fx SDPA, ``fp8fx::sdpa``) becomes an :class:`AttentionScales` per attention
module: the query's scale (what vLLM reads as ``q_scale``), its key and value scales (which must
be the KV cache's, or become them: the consumers hold one key and one value scale per layer), and
the probability and output scales that no checkpoint consumer reads (docs/export.md, "FP8
attention scales"). Which formats write it, and whether the probability and output scales may be
dropped, is decided by :func:`attention_problem` when saving. The matmul/softmax form of FP8
attention (``attn_implementation="eager"``) and per-head query scales are refused here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedError
from ..fp8 import FORMATS
from ..modules import Fp8Linear
from ..schemes import LinearScheme

__all__ = ["QLinear", "KVScales", "AttentionScales", "Plan", "plan_of", "kv_strategy", "attention_problem",
           "ATTENTION_MODES", "LOADED_ATTR"]

#: where :func:`fp8fx.load_pretrained` keeps what the checkpoint said that modules do not hold
LOADED_ATTR = "_fp8fx_checkpoint"


@dataclass(frozen=True)
class QLinear:
    scheme: LinearScheme
    fp8_dtype: torch.dtype


@dataclass(frozen=True)
class KVScales:
    """One attention module's KV-cache scales and the cache's FP8 dtype: ``k`` and ``v`` are a
    float each (per tensor) or a tuple of floats each, one per KV head (per head)."""

    k: float | tuple[float, ...]
    v: float | tuple[float, ...]
    fp8_dtype: torch.dtype

    def __post_init__(self) -> None:
        for key in ("k", "v"):
            value = getattr(self, key)
            object.__setattr__(self, key, tuple(float(x) for x in value) if isinstance(value, (list, tuple))
                               else float(value))
        if isinstance(self.k, tuple) != isinstance(self.v, tuple) or \
                (isinstance(self.k, tuple) and len(self.k) != len(self.v)):
            raise UnsupportedError(f"KV-cache scales per tensor and per head mixed (keys {self.k!r}, values "
                                   f"{self.v!r}): a checkpoint's KV-cache scheme holds both one way")

    @property
    def heads(self) -> int | None:
        """The number of KV heads the scales are for; None for per-tensor scales."""
        return len(self.k) if isinstance(self.k, tuple) else None


@dataclass(frozen=True)
class AttentionScales:
    """One attention module's FP8 attention: ``q`` the query's scale (per tensor, a dequant
    multiplier like every fp8fx scale: ``x ≈ q8 * s``); ``p`` and ``o`` the probabilities' and the
    output's, which fp8fx's SDPA also rounds to FP8 and no checkpoint holds (None when the scales
    were read from a checkpoint, which never has them). The key and value scales are the module's
    :class:`KVScales`."""

    q: float
    p: float | None = None
    o: float | None = None
    module_type: str = ""   # the attention module's class name (compressed-tensors' group target)

    def __post_init__(self) -> None:
        object.__setattr__(self, "q", float(self.q))

    @property
    def dropped(self) -> tuple[str, ...]:
        """The scales fp8fx uses that a checkpoint cannot hold."""
        return tuple(n for n, v in (("probabilities", self.p), ("output", self.o)) if v is not None)


@dataclass
class Plan:
    linears: dict[str, QLinear]                          # quantized Linear module -> scheme
    hp_linears: list[str]                                # Linear modules left in high precision
    kv: dict[str, KVScales] = field(default_factory=dict)  # attention module -> scales
    #: MoE experts modules by checkpoint prefix (:class:`~.moe.Experts`); their per-expert Linears
    #: are in ``linears`` / ``hp_linears`` under their checkpoint names
    experts: dict[str, Any] = field(default_factory=dict)
    #: attention module -> its FP8 attention's scales (an fp8fx SDPA, or read from a checkpoint)
    attention: dict[str, AttentionScales] = field(default_factory=dict)

    def expert_linears(self) -> dict[str, str]:
        """Per-expert Linear name -> its experts module's checkpoint prefix."""
        return {n: ckpt for ckpt, info in self.experts.items() for n in info.all_names()}

    def quantized_experts(self) -> dict[str, LinearScheme]:
        """Experts module (checkpoint prefix) -> scheme, for the FP8 ones."""
        out = {}
        for ckpt, info in self.experts.items():
            q = self.linears.get(info.names(0)[0])
            if q is not None:
                out[ckpt] = q.scheme
        return out

    def schemes(self) -> list[LinearScheme]:
        return list(dict.fromkeys(q.scheme for q in self.linears.values()))


def _attention_from_state(model: nn.Module) -> tuple[dict[str, KVScales], dict[str, AttentionScales]]:
    """The KV-cache scales and the FP8 attention (SDPA) scales of each attention module."""
    from ..passes.match import OpKind
    from ..state import state_of

    state = state_of(model)
    if state is None or state.phase != "converted":
        record = model.__dict__.get(LOADED_ATTR)
        if record is None:
            return {}, {}
        return dict(record.kv), dict(getattr(record, "attention", {}))
    out = _kv_of(state.attention)
    others = {n: q for n, q in state.attention.items() if q.kind is not OpKind.KV_CACHE}
    eager = sorted(n for n, q in others.items() if q.kind is not OpKind.SDPA)
    if eager:
        raise UnsupportedError(
            f"{type(model).__name__} has FP8 attention in matmul/softmax form ({', '.join(eager[:6])}"
            f"{' ...' if len(eager) > 6 else ''}): fp8fx exports FP8 attention from its SDPA op only (which operand "
            "of a matmul is the query is not recorded). Load the model with attn_implementation=\"sdpa\", or "
            "convert with blocklist {\"types\": [\"matmul\", \"softmax\"]} (keeping kv_cache) to export it")
    by_path: dict[str, list[str]] = {}
    for n in sorted(others):
        by_path.setdefault(n.rpartition(".")[0], []).append(n)
    attention: dict[str, AttentionScales] = {}
    for path, names in by_path.items():
        if len(names) > 1:
            raise UnsupportedError(f"{path}: {len(names)} FP8 SDPA calls ({', '.join(names)}); a checkpoint holds one "
                                   "query scale per attention layer. Blocklist all but one by name to export it")
        q = others[names[0]]
        s_q, s_k, s_v, s_p, s_o = q.scales
        if any(isinstance(x, tuple) for x in (s_q, s_k, s_v)):
            raise UnsupportedError(f"{names[0]}: per-head query/key/value scales (observer_params.kv_cache_strategy "
                                   "'attn_head') in FP8 attention are not exported: vLLM reads one q_scale per layer "
                                   "('Only support per-tensor scaling factor for fp8-quantized Q/prob'). Calibrate with "
                                   "kv_cache_strategy 'tensor', or blocklist types ['sdpa']")
        kv = out.get(path)
        if kv is None:  # the consumer stores the cache in FP8 with these: the same rounding as fp8fx's SDPA
            out[path] = KVScales(s_k, s_v, q.fp8_dtype)
        elif (kv.k, kv.v) != (s_k, s_v) or kv.fp8_dtype != q.fp8_dtype:
            raise UnsupportedError(
                f"{path}: its SDPA ({names[0]}) quantizes keys/values with scales {s_k!r}/{s_v!r} ({q.fp8_dtype}) and "
                f"its KV cache with {kv.k!r}/{kv.v!r} ({kv.fp8_dtype}); the consumers hold one key and one value scale "
                "per attention layer (vLLM's FP8 attention reads K and V from the FP8 cache). Calibrate both with one "
                "scale method and backoff, or blocklist types ['sdpa'] (or ['kv_cache'])")
        module = model.get_submodule(path) if path else model
        attention[path] = AttentionScales(s_q, s_p, s_o, type(module).__name__)
    return out, attention


def _kv_of(nodes: dict[str, Any]) -> dict[str, KVScales]:
    """The KV-cache scales of each attention module, from its ``kv_cache_0``/``kv_cache_1`` nodes."""
    from ..passes.match import OpKind

    out: dict[str, KVScales] = {}
    kv = {n: q for n, q in nodes.items() if q.kind is OpKind.KV_CACHE}
    for name, q in kv.items():
        path, _, leaf = name.rpartition(".")
        if leaf != "kv_cache_0":
            continue
        v = kv.get(f"{path}.kv_cache_1")
        if v is None:
            raise UnsupportedError(f"{path}: its keys are in FP8 but its values are not (no {path}.kv_cache_1); "
                                   "a checkpoint holds both scales or neither")
        ks, vs = q.scales[0], v.scales[0]
        if isinstance(ks, tuple) != isinstance(vs, tuple):
            raise UnsupportedError(f"{path}: its keys have {'per-head' if isinstance(ks, tuple) else 'per-tensor'} "
                                   f"scales and its values {'per-head' if isinstance(vs, tuple) else 'per-tensor'} "
                                   "ones; a checkpoint's KV-cache scheme holds both one way. Calibrate both with one "
                                   "observer_params.kv_cache_strategy")
        out[path] = KVScales(ks, vs, q.fp8_dtype)
    if any(n.rpartition(".")[0] not in out for n in kv):
        lone = sorted(n for n in kv if n.rpartition(".")[0] not in out)
        raise UnsupportedError(f"{', '.join(lone)}: values in FP8 without keys; a checkpoint holds both scales or "
                               "neither")
    return out


#: ``save_pretrained(attention=...)``: ``"refuse"`` a model whose FP8 attention uses scales the
#: format cannot hold; ``"qkv"`` writes the query, key and value scales and drops the
#: probabilities' and output's (the consumer then runs them as it always does)
ATTENTION_MODES = ("refuse", "qkv")


def attention_problem(plan: Plan, fmt_name: str, mode: str) -> str | None:
    """Why ``plan``'s FP8 attention cannot be saved with ``save_pretrained(attention=mode)`` in a
    format that holds query scales (``fmt_name``), or None; an unknown ``mode`` raises."""
    if mode not in ATTENTION_MODES:
        from ..errors import ConfigError

        raise ConfigError(f"save_pretrained(attention={mode!r}): choose one of {', '.join(map(repr, ATTENTION_MODES))}")
    if not plan.attention:
        return None
    dropped = [d for d in ("probabilities", "output") if any(d in a.dropped for a in plan.attention.values())]
    if dropped and mode == "refuse":
        first = next(p for p, a in plan.attention.items() if a.dropped)
        return (f"{first} (and {len(plan.attention) - 1} more attention module(s)): fp8fx's FP8 SDPA also rounds the "
                f"{' and '.join(dropped)} to FP8, which no {fmt_name} checkpoint holds (vLLM reads q_scale, k_scale and "
                "v_scale; its prob_scale is used by ROCm's Triton attention only and has no checkpoint name its loader "
                "maps; the attention output has no scale). Save with attention=\"qkv\" (fp8fx quantize --save-attention qkv) "
                "to write the query, key and "
                "value scales (q_scale, k_scale, v_scale) and let the consumer run the "
                "probabilities and the output as it does (docs/export.md, \"FP8 attention scales\"), or convert with "
                "blocklist {\"types\": [\"sdpa\"]} (keeping kv_cache)")
    return None


def kv_strategy(plan: Plan) -> str | None:
    """``"tensor"`` or ``"attn_head"`` (compressed-tensors' strategy names) for the plan's KV-cache
    scales, None without them; raises when attention modules mix the two."""
    kinds = {("attn_head" if kv.heads is not None else "tensor") for kv in plan.kv.values()}
    if len(kinds) > 1:
        per_head = sorted(p for p, kv in plan.kv.items() if kv.heads is not None)
        more = " ..." if len(per_head) > 4 else ""
        raise UnsupportedError(f"KV-cache scales per head in {', '.join(per_head[:4])}{more}"
                               " and per tensor in the other attention modules: a checkpoint has one KV-cache scheme "
                               "for the whole model. Calibrate every layer with one observer_params.kv_cache_strategy")
    return kinds.pop() if kinds else None


def plan_of(model: nn.Module) -> Plan:
    """The plan of a converted fp8fx model (module docstring)."""
    from .moe import find, scheme_of

    linears: dict[str, QLinear] = {}
    hp: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, Fp8Linear):
            fmt = FORMATS.get(m.weight.dtype)
            if fmt is None or m.fp8_max != fmt.max:
                raise UnsupportedError(
                    f"{name}: quantized for an FP8 range of {m.fp8_max} ({m.weight.dtype}, e.g. Gaudi2's 240); the "
                    f"consumers of these checkpoints quantize activations with the format's full range "
                    f"({fmt.max if fmt else '?'}). Quantize for a target with the full range (cpu, cuda, gaudi3)")
            linears[name] = QLinear(m.scheme, m.weight.dtype)
        elif isinstance(m, nn.Linear):
            hp.append(name)
    experts, _ = find(model)
    for info in experts.values():
        module = model.get_submodule(info.path)
        scheme = scheme_of(module, info)
        if scheme is None:
            hp += info.all_names()
            continue
        dtype = getattr(module, "gate_up_proj").dtype
        fmt = FORMATS.get(dtype)
        if fmt is None or module.fp8_max != fmt.max:
            raise UnsupportedError(f"{info.path}: quantized for an FP8 range of {module.fp8_max} ({dtype}); the "
                                   "consumers of these checkpoints quantize activations with the format's full range. "
                                   "Quantize for a target with the full range (cpu, cuda, gaudi3)")
        linears.update({n: QLinear(scheme, dtype) for n in info.all_names()})
    from ..state import state_of

    state = state_of(model)
    if state is not None and state.phase != "converted":
        raise UnsupportedError(f"{type(model).__name__} is in fp8fx phase {state.phase!r}, not converted yet"
                               + (": it converts on its first call; call it once (or pass example_inputs to "
                                  "fp8fx.convert / fp8fx.quantize), then save it" if state.phase == "pending" else
                                  ": finish calibration and call fp8fx.convert, then save it"))
    if not linears:
        raise UnsupportedError(f"{type(model).__name__} holds no Fp8Linear: quantize it first (fp8fx.quantize or "
                               "fp8fx.convert), then save it")
    kv, attention = _attention_from_state(model)
    return Plan(linears, hp, kv, experts, attention)
