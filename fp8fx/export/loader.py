"""load_pretrained: an fp8fx model from a compressed-tensors, vLLM "fp8" or ModelOpt FP8 checkpoint.

The model is built as the checkpoint's ``config.json`` names it, with its parameters on the
meta device (:func:`~.checks.skeleton`); the checkpoint is validated first (the same checks as
``fp8fx check``: a checkpoint that would load wrong is refused, listing why); then every
quantized Linear becomes an :class:`~fp8fx.modules.Fp8Linear` holding the stored FP8 weight and
scales as they are, and every other parameter gets the stored tensor. Tensors are read one at a
time from the safetensors files, so the model never exists in high precision: the FP8 weights
stay FP8 in memory. Tied embeddings are tied again by identity (``get_input_embeddings`` /
``get_output_embeddings``). MoE experts stored one Linear per expert (:mod:`.moe`) are stacked
back into one :class:`~fp8fx.modules.Fp8Experts` per experts module, FP8 as FP8.

A checkpoint with KV-cache scales gives every transformers cache passed to the model (by
``generate`` too) FP8 storage with those scales (:func:`fp8fx.kv_cache.fp8_cache`), as a model
that :func:`fp8fx.convert` calibrated does; the scales are kept on the model so that
:func:`fp8fx.save_pretrained` writes them again, in any format that holds them. Per-head scales
(compressed-tensors' ``attn_head``, ``[num_kv_heads, 1, 1]``) become per-head
:class:`~fp8fx.kv_cache.KVQuant` tuples.

A checkpoint with FP8 attention (``q_scale`` per attention module, compressed-tensors' attention
group or vLLM "fp8") keeps the query scales on the model (:class:`LoadedCheckpoint`
``attention``), so that :func:`fp8fx.save_pretrained` writes them again bit for bit; fp8fx's
reloaded model itself runs the query in high precision (its FP8 KV cache as above): rebuilding
fp8fx's FP8 SDPA needs the graph rewrite of :func:`fp8fx.convert`, and the checkpoint lacks the
probability and output scales that op takes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..fp8 import E4M3
from ..kv_cache import KVQuant, fp8_cache, is_cache
from ..modules import Fp8Linear
from ..schemes import WeightGranularity
from . import vllm
from .checks import CheckpointError, Problem, manifest_from_dir, skeleton
from .core import validate
from .moe import fuse
from .plan import LOADED_ATTR, AttentionScales, KVScales

__all__ = ["load_pretrained", "LoadedCheckpoint"]


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What :func:`load_pretrained` read that the modules do not hold."""

    source: str
    format: str
    kv: dict[str, KVScales]
    #: attention module -> its query scale (the model runs the query in high precision)
    attention: dict[str, AttentionScales] = field(default_factory=dict)


def _set_param(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = key.rpartition(".")
    mod = model.get_submodule(owner)
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        mod._buffers[leaf] = tensor


def _install_kv(model: nn.Module, attention: list[str], layers: dict[int, KVQuant]) -> None:
    """A forward pre-hook on each attention module gives the cache it is handed FP8 storage:
    also the caches the model creates inside its own forward (``use_cache`` without one)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        for value in (*args, *kwargs.values()):
            if is_cache(value):
                fp8_cache(value, layers)

    for path in attention:
        model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True)


def _kv_values(t: torch.Tensor, heads: int | None) -> float | tuple[float, ...]:
    """A stored KV-cache scale as :class:`~fp8fx.kv_cache.KVQuant` holds it: one float, or one per
    KV head (the checks made sure the tensor has ``heads`` values)."""
    values = t.float().reshape(-1).tolist()
    return tuple(values) if heads is not None else values[0]


def load_pretrained(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                    attn_implementation: str | None = None) -> nn.Module:
    """Build a runnable fp8fx model from the checkpoint folder ``path`` (module docstring).

    ``attn_implementation`` (``"sdpa"``, ``"eager"``, ...) is passed to the model's config as
    ``from_pretrained`` does: a checkpoint does not record it."""
    m = manifest_from_dir(path)
    model = skeleton(m.config, m.source, attn_implementation)
    report = validate(m, model=model)
    if report.problems:
        raise CheckpointError(f"fp8fx.load_pretrained: {m.source}", report.problems)
    plan, st, fmt = report.plan, report.structure, report.format
    if plan is None:  # validate reports a problem whenever there is no plan; kept explicit
        raise CheckpointError(f"fp8fx.load_pretrained: {m.source}",
                              [Problem("config.json", "no FP8 layout could be read from its quantization_config")])
    e4m3_max = E4M3.max
    done: set[str] = set()

    def scale_key(name: str, scheme) -> str:  # noqa: ANN001
        block = scheme.weights is WeightGranularity.BLOCK
        return f"{name}.weight_scale_inv" if fmt is vllm and block else f"{name}.weight_scale"

    def module_scale(t: torch.Tensor, scheme) -> torch.Tensor:  # noqa: ANN001
        return fmt.module_scale(t, scheme) if hasattr(fmt, "module_scale") else t  # ModelOpt's 4-D blocks

    per_expert = plan.expert_linears()
    for name, q in plan.linears.items():
        if name in per_expert:
            continue
        bias_key = f"{name}.bias"
        xs_key = f"{name}.input_scale"
        weight = m.read(f"{name}.weight").to(device)
        ws = module_scale(m.read(scale_key(name, q.scheme)), q.scheme)
        module = Fp8Linear(weight, ws.to(device), m.read(xs_key).to(device) if q.scheme.static else None,
                           m.read(bias_key).to(device) if bias_key in m.tensors else None, e4m3_max, q.scheme)
        model.set_submodule(name, module)
        done.update({f"{name}.weight", bias_key, scale_key(name, q.scheme), xs_key})
    for info in st.experts.values():  # per-expert Linears stacked into the fused module (moe.py)
        q = plan.linears.get(info.names(0)[0])
        scheme = q.scheme if q is not None else None
        new = fuse(info, model.get_submodule(info.path), scheme, m.read, lambda n, s=scheme: scale_key(n, s),
                   lambda t, s=scheme: module_scale(t, s), e4m3_max, device)
        model.set_submodule(info.path, new)
        done.update(k for k in model.state_dict().keys() if k.startswith(info.path + "."))
    for key in model.state_dict().keys():
        ckpt = st.ckpt_key(key)
        if key in done or ckpt not in m.tensors:
            continue
        _set_param(model, key, m.read(ckpt).to(device))
    if st.tied and st.output_embedding and st.input_embedding and st.output_embedding not in plan.linears:
        out_mod, in_mod = model.get_submodule(st.output_embedding), model.get_submodule(st.input_embedding)
        out_mod.weight = in_mod.weight
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:  # validate reports missing tensors; this is a guard against a model built differently
        raise CheckpointError(f"fp8fx.load_pretrained: {m.source}",
                              [Problem(n, "missing: no tensor in the checkpoint fills it") for n in left])
    kv: dict[str, KVScales] = {}
    layers: dict[int, KVQuant] = {}
    for path_, want in plan.kv.items():
        k_key, v_key = fmt.kv_names(path_) if hasattr(fmt, "kv_names") else (f"{path_}.k_scale", f"{path_}.v_scale")
        k, v = (_kv_values(m.read(key), want.heads) for key in (k_key, v_key))
        kv[path_] = KVScales(k, v, torch.float8_e4m3fn)
        layers[st.attention[path_]] = KVQuant(k, v, torch.float8_e4m3fn, e4m3_max)
    attention = {path_: AttentionScales(float(m.read(f"{path_}.q_scale").float().reshape(-1)[0]),
                                        module_type=want.module_type)
                 for path_, want in plan.attention.items()}
    model.__dict__[LOADED_ATTR] = LoadedCheckpoint(m.source, fmt.NAME, kv, attention)
    if layers:
        _install_kv(model, list(plan.kv), layers)
    gen = Path(path) / "generation_config.json"
    if gen.is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_dict(json.loads(gen.read_text()))
    return model.to(device).eval()
