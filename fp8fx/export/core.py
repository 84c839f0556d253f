"""save_pretrained and check: one validator per format, run before writing and on any folder.

:func:`validate` is the whole check of a :class:`~.checks.Manifest` in one format: the format's
own rules (its ``check``), then the rules every consumer shares (:func:`_common`): no tensor
that the model does not have and no parameter missing (the consumer would initialize it at
random), no FP8 tensor outside a quantized Linear's weight, and tied embeddings that do not
tie a quantized ``lm_head`` to the embedding; MoE experts are checked as :mod:`.moe` says.
:func:`save_pretrained` builds the manifest of the
tensors it is about to write and refuses (:class:`~.checks.CheckpointError`) when the validator
finds anything; ``fp8fx check DIR`` runs :func:`check_checkpoint` on a folder on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedError
from ..modules import Fp8Linear
from . import compressed_tensors, modelopt, moe, vllm
from .checks import (CONFIG, CheckpointError, Manifest, Problem, Structure, manifest_from_dir,
                     manifest_from_tensors, skeleton, structure)
from .plan import Plan, attention_problem, plan_of
from .writer import parse_size, write_folder, write_tensors

__all__ = ["FORMATS", "format_module", "save_pretrained", "check_checkpoint", "validate", "Report"]

FORMATS: dict[str, ModuleType] = {compressed_tensors.NAME: compressed_tensors, vllm.NAME: vllm,
                                   modelopt.NAME: modelopt}
_BY_METHOD = {compressed_tensors.QUANT_METHOD: compressed_tensors, vllm.QUANT_METHOD: vllm,
              modelopt.QUANT_METHOD: modelopt}


def format_module(name: str) -> ModuleType:
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ConfigError(f"unknown checkpoint format {name!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def format_of(m: Manifest) -> ModuleType:
    q = m.quant
    method = q.get("quant_method") if q is not None else None
    fmt = _BY_METHOD.get(method)
    if fmt is None and q is None and modelopt.detect(m):  # ModelOpt's hf_quant_config.json alone
        fmt = modelopt
    if fmt is None:
        raise CheckpointError(m.source, [Problem(f"{CONFIG}: quantization_config.quant_method",
                                                 f"{method!r}; fp8fx reads {', '.join(repr(k) for k in _BY_METHOD)}")])
    return fmt


class Report:
    """What :func:`validate` found: the format, the plan it read, the model structure, problems."""

    def __init__(self, fmt: ModuleType, plan: Plan | None, st: Structure, problems: list[Problem]) -> None:
        self.format, self.plan, self.structure, self.problems = fmt, plan, st, problems
        #: how consumers other than the format's own engine read this (valid) file
        self.notes: list[str] = fmt.notes(plan) if plan is not None else []

    def summary(self) -> str:
        if self.plan is None:
            return f"{self.format.NAME}: unreadable quantization_config"
        schemes = "; ".join(s.describe() for s in self.plan.schemes()) or "none"
        return (f"{self.format.NAME}: {len(self.plan.linears)} FP8 Linear(s) ({schemes}), "
                f"{len(self.plan.hp_linears)} in high precision, KV-cache scales: "
                f"{'yes' if self.plan.kv else 'no'}, FP8 attention (query scales): "
                f"{'yes' if self.plan.attention else 'no'}")


def _expected_extra(fmt: ModuleType, plan: Plan) -> set[str]:
    """Names the format adds to the model's own state_dict keys."""
    if hasattr(fmt, "extra_names"):
        return fmt.extra_names(plan)
    out: set[str] = set()
    for name, q in plan.linears.items():
        block = q.scheme.weights.value == "block"
        out.add(f"{name}.weight_scale_inv" if fmt is vllm and block else f"{name}.weight_scale")
        if q.scheme.static:
            out.add(f"{name}.input_scale")
    for path in plan.kv:
        out.update({f"{path}.k_scale", f"{path}.v_scale"})
    out.update(f"{path}.q_scale" for path in plan.attention)
    return out


def _common(m: Manifest, model: nn.Module, st: Structure, fmt: ModuleType, plan: Plan,
            problems: list[Problem]) -> None:
    own = st.checkpoint_keys(model.state_dict().keys())
    extra = _expected_extra(fmt, plan)
    tied_out = f"{st.output_embedding}.weight" if st.tied and st.output_embedding else None
    reported = {p.where for p in problems}
    for key in sorted(own & m.tensors.keys() - reported):
        owner, _, leaf = key.rpartition(".")
        if m.tensors[key].dtype in ("F8_E4M3", "F8_E5M2") and not (owner in plan.linears and leaf == "weight"):
            kind = type(st.modules[owner]).__name__ if owner in st.modules else "module"
            problems.append(Problem(key, f"{m.tensors[key].dtype}, but {owner} ({kind}) is not a Linear the config "
                                    "quantizes: the consumer loads the raw FP8 codes without a scale"))
    for key in sorted(m.tensors.keys() - own - extra - reported):
        if m.tensors[key].dtype in ("F8_E4M3", "F8_E5M2"):
            problems.append(Problem(key, f"an FP8 tensor that is no quantized Linear's weight: the consumer ignores "
                                    "it or loads raw FP8 codes"))
        else:
            problems.append(Problem(key, f"not a tensor of {type(model).__name__}: the consumer ignores it (a wrong "
                                    "name?)"))
    for key in sorted(own - m.tensors.keys() - reported):
        if key == tied_out:
            continue
        owner = key.rpartition(".")[0]
        if owner in plan.linears and key.endswith(".weight"):
            continue  # reported by the format's check
        problems.append(Problem(key, "missing: the consumer initializes it at random"))
    if st.tied and st.output_embedding in plan.linears:
        problems.append(Problem(f"{CONFIG}: tie_word_embeddings", f"true, but {st.output_embedding} is quantized: "
                                f"transformers ties {st.output_embedding}.weight to {st.input_embedding}.weight, which "
                                "replaces one of them (set tie_word_embeddings false and store both)"))


def _ct_pydantic(m: Manifest, problems: list[Problem]) -> None:
    """When the compressed-tensors package is installed, its own config model must accept the
    config (transformers and vLLM parse it with it)."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        return
    try:
        QuantizationConfig.model_validate(m.quant)
    except Exception as e:  # pydantic.ValidationError; the message lists the fields
        first = str(e).strip().splitlines()
        problems.append(Problem(f"{CONFIG}: quantization_config", "compressed-tensors' QuantizationConfig rejects it: "
                                + " / ".join(first[:6])))


def validate(m: Manifest, fmt: ModuleType | None = None, model: nn.Module | None = None) -> Report:
    """Every problem of ``m`` in format ``fmt`` (read from its config when None)."""
    fmt = fmt or format_of(m)
    problems = list(m.problems)
    model = model if model is not None else skeleton(m.config, m.source)
    st = structure(model)
    plan = fmt.plan_from(m, st, problems)
    if plan is not None:
        plan.experts = dict(st.experts)
    if fmt is compressed_tensors and plan is not None:
        _ct_pydantic(m, problems)
    fmt.check(m, st, plan, problems)
    if plan is not None:
        moe.check(m, st, plan, fmt, problems)
        _common(m, model, st, fmt, plan, problems)
    return Report(fmt, plan, st, problems)


def check_checkpoint(path: str | os.PathLike[str]) -> Report:
    """Validate the checkpoint folder ``path``; returns the report (``report.problems`` lists
    what would load wrong, empty when nothing)."""
    return validate(manifest_from_dir(path))


# ------------------------------------------------------------------------------------- saving
def _tensors(model: nn.Module, fmt: ModuleType, plan: Plan, drop_tied: str | None,
             renames: dict[str, str]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    seen: dict[int, str] = {}
    experts = {info.path: info for info in plan.experts.values()}
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, Fp8Linear):
            items = fmt.linear_tensors(name, mod).items()
        elif name in experts:  # one Linear per expert and projection, as the checkpoints hold them
            items = []
            for lin, view in moe.split(mod, experts[name]).items():
                items += ([(f"{lin}.weight", view)] if isinstance(view, Tensor) else
                          list(fmt.linear_tensors(lin, view).items()))
        else:
            own = [(k, p) for k, p in mod._parameters.items() if p is not None]
            skip = mod._non_persistent_buffers_set
            own += [(k, b) for k, b in mod._buffers.items() if b is not None and k not in skip]
            items = [(moe.ckpt_key(prefix + k, renames), t) for k, t in own]
        for key, t in items:
            if key == drop_tied:
                continue
            if id(t) in seen:  # shared parameters other than the tied pair: safetensors needs copies
                t = t.clone()
            seen[id(t)] = key
            out[key] = t
    return out


def _config(model: nn.Module, quant: dict[str, Any], untie: bool) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_json_string"):
        raise UnsupportedError(f"{type(model).__name__} has no transformers config: save_pretrained writes "
                               "transformers checkpoints (config.json names the architecture)")
    d = json.loads(cfg.to_json_string(use_diff=True))
    d.pop("quantization_config", None)
    d["architectures"] = [type(model).__name__]
    d["quantization_config"] = quant
    if untie:
        d["tie_word_embeddings"] = False
    return d


def save_pretrained(qmodel: nn.Module, out_dir: str | os.PathLike[str], format: str = "compressed-tensors",
                    tokenizer: Any = None, max_shard_size: int | str = "5GB", attention: str = "refuse") -> Path:
    """Write ``qmodel`` (from :func:`fp8fx.convert`, :func:`fp8fx.quantize` or
    :func:`fp8fx.load_pretrained`) as a ``format`` checkpoint (``"compressed-tensors"``,
    ``"vllm"``, ``"modelopt"``, or ``"inc"``: :mod:`.inc_format`) into ``out_dir``, atomically;
    returns ``out_dir``.

    The format's validator runs on the tensors and config first: a scheme the format cannot
    hold raises :class:`~fp8fx.errors.UnsupportedError`, anything its consumer would load wrong
    raises :class:`~fp8fx.export.CheckpointError` listing every problem; nothing is written then.

    FP8 attention (fp8fx's SDPA): ``attention="refuse"`` (the default) refuses it, since fp8fx
    also rounds the attention probabilities and output to FP8 and no checkpoint holds those
    scales; ``attention="qkv"`` writes the query, key and value scales (``q_scale``,
    ``k_scale``, ``v_scale``) in the formats whose consumers read them (``compressed-tensors``,
    ``vllm``) and leaves the probabilities and the output to the consumer (docs/export.md, "FP8
    attention scales"). ModelOpt holds no query scale and refuses either way.
    """
    from ..state import unwrap

    if format == "inc":  # INC's QUANT_CONFIG + measurements next to the hp weights (inc_format.py)
        from .inc_format import save

        return save(qmodel, out_dir, tokenizer=tokenizer, max_shard_size=max_shard_size)
    fmt = format_module(format)
    max_bytes = parse_size(max_shard_size)
    model = unwrap(qmodel)
    plan = plan_of(model)
    if plan.attention:
        refused = getattr(fmt, "ATTENTION_REFUSED", None)
        why = refused or attention_problem(plan, fmt.NAME, attention)
        if why is not None:
            raise UnsupportedError(why)
    else:
        attention_problem(plan, fmt.NAME, attention)  # an unknown mode raises
    for ckpt, scheme in plan.quantized_experts().items():
        why = fmt.expert_scheme_problem(scheme)
        if why is not None:
            raise UnsupportedError(f"{plan.experts[ckpt].path}: {why}")
    quant = fmt.quant_config(plan)
    base = structure(model)
    lm_head_fp8 = base.tied and base.output_embedding in plan.linears
    drop = f"{base.output_embedding}.weight" if base.tied and not lm_head_fp8 and base.output_embedding else None
    if drop is not None:  # only when the pair really is one tensor; otherwise both are stored
        out_w = model.get_submodule(base.output_embedding).weight
        in_w = model.get_submodule(base.input_embedding).weight if base.input_embedding else None
        if out_w is not in_w:
            drop = None
    tensors = _tensors(model, fmt, plan, drop, base.renames)
    for path, kv in plan.kv.items():
        tensors.update(fmt.kv_tensors(path, kv))
    for path, att in plan.attention.items():
        tensors.update(fmt.attention_tensors(path, att))
    config = _config(model, quant, untie=lm_head_fp8 or (base.tied and drop is None))
    manifest = manifest_from_tensors(config, tensors, f"{type(model).__name__} as {fmt.NAME}")
    consumer = skeleton(config, manifest.source)
    kinds = dict(consumer.named_modules())
    not_linear = {n: type(kinds[n]).__name__ for n in plan.linears
                  if n in kinds and not isinstance(kinds[n], nn.Linear)}
    if not_linear:
        listing = ", ".join(f"{n} ({t})" for n, t in list(not_linear.items())[:6])
        raise UnsupportedError(f"{listing}: fp8fx quantized these as Linears, but {type(model).__name__} holds them as "
                               "other module types (e.g. GPT-2's Conv1D, whose weight is stored [in, out]), which "
                               "these formats do not quantize. Blocklist them to export the model")
    report = validate(manifest, fmt, model=consumer)
    if report.problems:
        raise CheckpointError(f"fp8fx.save_pretrained({fmt.NAME}) refused to write {out_dir}", report.problems)

    def fill(folder: Path) -> None:
        write_tensors(folder, tensors, max_bytes)
        (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, text in (fmt.extra_files(plan) if hasattr(fmt, "extra_files") else {}).items():
            (folder / name).write_text(text)  # e.g. ModelOpt's hf_quant_config.json
        gen = getattr(model, "generation_config", None)
        can = getattr(model, "can_generate", None)
        if gen is not None and (can is None or can()):
            gen.to_json_file(str(folder / "generation_config.json"), use_diff=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))

    return write_folder(out_dir, fill)
