"""What the checkpoint formats (:mod:`.compressed_tensors`, :mod:`.vllm`, :mod:`.modelopt`) do the same
way when they write a model. Each format passes its own tensor names, shapes and messages: the
ones its consumer's source gives (see each format's module docstring)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UnsupportedError
from ..modules import Fp8Linear
from ..schemes import LinearScheme
from .plan import KVScales, Plan

__all__ = ["require_e4m3", "one_scheme", "linear_tensors", "kv_tensors"]


def require_e4m3(plan: Plan, weights: str, kv_cache: str) -> None:
    """Refuse a plan whose Linear weights or KV cache are not float8_e4m3fn: the Linears' message
    names the first ones and their dtype and ends with ``weights``; ``kv_cache`` is the KV cache's."""
    bad = sorted(n for n, q in plan.linears.items() if q.fp8_dtype != torch.float8_e4m3fn)
    if bad:
        raise UnsupportedError(f"{', '.join(bad[:6])}: weights in {plan.linears[bad[0]].fp8_dtype}; {weights}")
    if any(k.fp8_dtype != torch.float8_e4m3fn for k in plan.kv.values()):
        raise UnsupportedError(kv_cache)


def one_scheme(plan: Plan, why: str) -> LinearScheme:
    """The one scheme of a plan, for a format with one scheme per model; a plan with several is
    refused, listing them, with ``why`` (what the format holds and which format to use)."""
    schemes = plan.schemes()
    if len(schemes) != 1:
        listing = "; ".join(s.describe() for s in schemes)
        raise UnsupportedError(f"the model mixes {len(schemes)} schemes ({listing}); {why}")
    return schemes[0]


def linear_tensors(name: str, m: Fp8Linear, scale_key: str, weight_scale: Tensor,
                   input_shape: tuple[int, ...]) -> dict[str, Tensor]:
    """The tensors of quantized Linear ``name`` (an :class:`~fp8fx.modules.Fp8Linear` or an expert's
    projection with its attributes): ``weight``, ``weight_scale`` (in the format's layout) as
    ``<name>.<scale_key>``, ``input_scale`` of shape ``input_shape`` when the activations are
    static, and ``bias`` when there is one."""
    out = {f"{name}.weight": m.weight, f"{name}.{scale_key}": weight_scale}
    if m.input_scale is not None:
        out[f"{name}.input_scale"] = m.input_scale.reshape(input_shape)
    if m.bias is not None:
        out[f"{name}.bias"] = m.bias
    return out


def kv_tensors(k_name: str, v_name: str, kv: KVScales, shape: tuple[int, ...]) -> dict[str, Tensor]:
    """The KV-cache scales of ``kv`` (one value each, or one per KV head) as float32 tensors of
    ``shape``, named ``k_name`` and ``v_name``."""
    return {k_name: torch.tensor(kv.k, dtype=torch.float32).reshape(shape),
            v_name: torch.tensor(kv.v, dtype=torch.float32).reshape(shape)}
