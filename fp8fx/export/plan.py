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

__all__ = ["QLinear", "KVScales", "Plan", "plan_of", "kv_strategy", "LOADED_ATTR"]

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


@dataclass
class Plan:
    linears: dict[str, QLinear]                          # quantized Linear module -> scheme
    hp_linears: list[str]                                # Linear modules left in high precision
    kv: dict[str, KVScales] = field(default_factory=dict)  # attention module -> scales
    #: MoE experts modules by checkpoint prefix (:class:`~.moe.Experts`); their per-expert Linears
    #: are in ``linears`` / ``hp_linears`` under their checkpoint names
    experts: dict[str, Any] = field(default_factory=dict)

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


def _kv_from_state(model: nn.Module) -> dict[str, KVScales]:
    from ..passes.match import OpKind
    from ..state import state_of

    state = state_of(model)
    if state is None or state.phase != "converted":
        record = model.__dict__.get(LOADED_ATTR)
        return dict(record.kv) if record is not None else {}
    out: dict[str, KVScales] = {}
    kv = {n: q for n, q in state.attention.items() if q.kind is OpKind.KV_CACHE}
    others = sorted(n for n, q in state.attention.items() if q.kind is not OpKind.KV_CACHE)
    if others:
        raise UnsupportedError(
            f"{type(model).__name__} has FP8 attention ops that no checkpoint format holds ({', '.join(others[:6])}"
            f"{' ...' if len(others) > 6 else ''}): vLLM and compressed-tensors store KV-cache scales only. Convert "
            "with blocklist {\"types\": [\"matmul\", \"softmax\", \"sdpa\"]} (keeping kv_cache) to export this model")
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
    return Plan(linears, hp, _kv_from_state(model), experts)
