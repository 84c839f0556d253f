"""MoE experts in checkpoints: fp8fx's fused FP8 stacks <-> the per-expert Linears on disk.

transformers 5 holds a Mixtral / Qwen2-MoE / Qwen3-MoE experts module as two fused stacks,
``gate_up_proj [E, 2·I, H]`` and ``down_proj [E, H, I]`` (:class:`~fp8fx.modules.Fp8Experts` keeps
them so, in FP8), but every checkpoint of these models, and every consumer's loader, has one
Linear per expert and projection. transformers converts at load time (``conversion_mapping.py``:
``MergeModulelist`` + ``Concatenate`` of ``experts.*.w1/w3`` into ``gate_up_proj``) and back when it
saves; vLLM's ``FusedMoE.make_expert_params_mapping`` maps ``experts.{e}.{w1|w3}.`` onto its
``experts.w13_*`` and ``experts.{e}.w2.`` onto ``experts.w2_*`` parameters, for the weight and for
``weight_scale`` / ``weight_scale_inv`` / ``input_scale`` alike. The names per model type
(:data:`LAYOUTS`, from transformers' conversion mapping and vLLM's model files):

=============  ==========================================  ==========================
model_type     experts module in the checkpoint             gate / up / down
=============  ==========================================  ==========================
mixtral        ``model.layers.N.block_sparse_moe.experts``  ``w1`` / ``w3`` / ``w2``
qwen2_moe,     ``model.layers.N.mlp.experts``               ``gate_proj`` / ``up_proj`` /
qwen3_moe                                                    ``down_proj``
=============  ==========================================  ==========================

Mixtral's whole MoE block is renamed (``mlp`` in memory, ``block_sparse_moe`` on disk: its router
``gate.weight`` too). Each per-expert Linear is written exactly as the format writes a Linear
(the format's ``linear_tensors``), with the expert's slice of the fused tensors: gate = rows
``[0, I)`` of ``gate_up_proj[e]``, up = rows ``[I, 2·I)``; a per-tensor scale is the expert's scale
for both gate and up, a per-channel scale the rows' slice, a block scale the block rows' slice
(so ``I`` must be a multiple of the block's rows, which vLLM's FP8 MoE methods require too). A
static input scale is one per projection in fp8fx and is written for every expert (vLLM keeps
one per layer: it takes the maximum over the experts, ``process_fp8_input_tensor_strategy_moe``).

:func:`find` identifies the experts modules of a model (by identity: :class:`Fp8Experts`
instances and transformers experts modules with the standard fused layout), :func:`split` makes
the per-expert views that a format writes, and :func:`fuse` reads them back into one
:class:`Fp8Experts` (FP8 stacked as FP8, never through high precision).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import UnsupportedError
from ..modules import Fp8Experts
from ..schemes import LinearScheme, WeightGranularity

__all__ = ["Layout", "LAYOUTS", "Experts", "find", "ckpt_key", "split", "fuse", "ignore_pattern", "ExpertLinear"]


@dataclass(frozen=True)
class Layout:
    """How one model type's checkpoints name an experts module's per-expert Linears."""

    block: tuple[str, str] | None  # (the MoE block's attribute in memory, its name on disk), or None
    gate: str
    up: str
    down: str


#: model_type -> checkpoint layout (module docstring)
LAYOUTS: dict[str, Layout] = {
    "mixtral": Layout(("mlp", "block_sparse_moe"), "w1", "w3", "w2"),
    "qwen2_moe": Layout(None, "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": Layout(None, "gate_proj", "up_proj", "down_proj"),
}


@dataclass(frozen=True)
class Experts:
    """One experts module: its path in memory and in the checkpoint, and its sizes."""

    path: str          # named_modules() name in the transformers model
    ckpt: str          # the experts module's prefix in the checkpoint
    num: int           # E
    inter: int         # I (gate and up each have I rows)
    hidden: int        # H
    layout: Layout

    def names(self, e: int) -> tuple[str, str, str]:
        """Checkpoint module names of expert ``e``'s gate, up and down Linears."""
        lay = self.layout
        return f"{self.ckpt}.{e}.{lay.gate}", f"{self.ckpt}.{e}.{lay.up}", f"{self.ckpt}.{e}.{lay.down}"

    def all_names(self) -> list[str]:
        return [n for e in range(self.num) for n in self.names(e)]

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Per-expert Linear name -> its ``[out, in]``."""
        out = {}
        for e in range(self.num):
            g, u, d = self.names(e)
            out.update({g: (self.inter, self.hidden), u: (self.inter, self.hidden), d: (self.hidden, self.inter)})
        return out


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return getattr(cfg, "model_type", None)


def _standard(m: nn.Module) -> bool:
    """A transformers experts module in the fused layout Fp8Experts holds (or an Fp8Experts)."""
    if isinstance(m, Fp8Experts):
        return True
    if not isinstance(getattr(m, "num_experts", None), int):
        return False
    stacks = [getattr(m, p, None) for p in Fp8Experts.PROJECTIONS]
    if not all(isinstance(t, Tensor) and t.dim() == 3 for t in stacks):
        return False
    return (getattr(m, "is_transposed", False) is False and getattr(m, "is_concatenated", True) is True
            and not getattr(m, "has_bias", False) and getattr(m, "has_gate", True) is True)


def find(model: nn.Module) -> tuple[dict[str, Experts], dict[str, str]]:
    """The experts modules of ``model`` (by checkpoint prefix) and the module-prefix renames
    (memory -> checkpoint) their layout needs. A high-precision experts module of a model type
    without a known layout is left out (its fused parameters are written as they are); an
    :class:`Fp8Experts` there raises."""
    mtype = _model_type(model)
    layout = LAYOUTS.get(mtype) if isinstance(mtype, str) else None
    found: dict[str, Experts] = {}
    renames: dict[str, str] = {}
    for path, m in model.named_modules():
        if not _standard(m):
            continue
        if layout is None:
            if isinstance(m, Fp8Experts):
                raise UnsupportedError(
                    f"{path}: FP8 MoE experts of model type {mtype!r}, whose checkpoint layout fp8fx does not know "
                    f"(it writes {', '.join(LAYOUTS)}). Blocklist the experts modules to export the rest")
            continue
        parent, _, leaf = path.rpartition(".")
        block_parent, _, block_leaf = parent.rpartition(".")
        ckpt_parent = parent
        if layout.block is not None and block_leaf == layout.block[0]:
            ckpt_parent = f"{block_parent}.{layout.block[1]}" if block_parent else layout.block[1]
            renames[parent] = ckpt_parent
        e, two_i, h = getattr(m, "gate_up_proj").shape
        found[f"{ckpt_parent}.{leaf}" if ckpt_parent else leaf] = Experts(path, f"{ckpt_parent}.{leaf}", int(e),
                                                                          int(two_i) // 2, int(h), layout)
    return found, renames


def ckpt_key(key: str, renames: dict[str, str]) -> str:
    """``key`` (a state_dict name of the model in memory) as the checkpoint names it."""
    for src, dst in renames.items():
        if key == src or key.startswith(src + "."):
            return dst + key[len(src):]
    return key


def ignore_pattern(ckpt: str) -> str:
    """A compressed-tensors target (``re:``, matched with ``re.match``) for every per-expert Linear
    of the experts module ``ckpt``: vLLM asks for ``<experts>.0.gate_proj`` / ``up_proj`` /
    ``down_proj`` whatever the checkpoint calls them (``CompressedTensorsMoEMethod.get_moe_method``),
    so a name list would miss Mixtral's."""
    return "re:^" + re.escape(ckpt) + r"\.\d+\.[^.]+$"


# -------------------------------------------------------------------------------- split / fuse
@dataclass
class ExpertLinear:
    """One expert's projection with :class:`~fp8fx.modules.Fp8Linear`'s attributes, for a format's
    ``linear_tensors``: ``weight_scale`` 0-d, ``[out]`` or ``[out blocks, in blocks]``."""

    weight: Tensor
    weight_scale: Tensor
    input_scale: Tensor | None
    scheme: LinearScheme
    bias: None = None


def _scheme(module: Fp8Experts, info: Experts) -> LinearScheme:
    schemes = {p: module.schemes.get(p) for p in Fp8Experts.PROJECTIONS}
    if any(s is None for s in schemes.values()):
        hp = [p for p, s in schemes.items() if s is None]
        raise UnsupportedError(f"{info.path}: {', '.join(hp)} in high precision while the other projection is FP8; "
                               "vLLM's FusedMoE quantizes every projection of an experts layer with one scheme "
                               "(CompressedTensorsMoEMethod raises 'All MoE projections need to have same "
                               "quantization scheme'). Quantize both stacks or neither")
    gu, dn = schemes["gate_up_proj"], schemes["down_proj"]
    if gu != dn:
        raise UnsupportedError(f"{info.path}: gate_up_proj '{gu.describe()}' and down_proj '{dn.describe()}'; one "
                               "experts layer has one scheme in vLLM's FusedMoE. Quantize both with one scheme")
    return gu


def scheme_of(module: nn.Module, info: Experts) -> LinearScheme | None:
    """The one scheme of an Fp8Experts (raises when its projections differ), None for a
    high-precision experts module."""
    return _scheme(module, info) if isinstance(module, Fp8Experts) else None


def _rows(ws: Tensor, scheme: LinearScheme, e: int, lo: int, hi: int, whole: bool, info: Experts) -> Tensor:
    """Expert ``e``'s scale for rows ``[lo, hi)`` of its stack, in Fp8Linear's layout."""
    w = scheme.weights
    if w is WeightGranularity.TENSOR:
        return (ws if ws.dim() == 0 else ws[e]).reshape(()).clone()
    if w is WeightGranularity.CHANNEL:
        return ws[e, lo:hi].clone()
    if whole:
        return ws[e].clone()
    bn = scheme.block[0]
    if info.inter % bn:
        raise UnsupportedError(f"{info.path}: intermediate size {info.inter} is not a multiple of the weight block's "
                               f"{bn} rows, so a block of gate_up_proj holds rows of both gate and up and cannot be "
                               "split into per-expert Linears (vLLM's FP8 MoE methods raise on it too). Use a block "
                               "size that divides it, or per-channel weights")
    return ws[e, lo // bn:hi // bn].clone()


def split(module: nn.Module, info: Experts) -> dict[str, ExpertLinear | Tensor]:
    """Per-expert Linear name -> its FP8 view (an Fp8Experts), or -> its high-precision weight."""
    out: dict[str, ExpertLinear | Tensor] = {}
    i, h = info.inter, info.hidden
    scheme = scheme_of(module, info)
    for proj, parts in (("gate_up_proj", ((0, 0, i), (1, i, 2 * i))), ("down_proj", ((2, 0, h),))):
        w = getattr(module, proj)
        ws = getattr(module, f"{proj}_weight_scale", None)
        xs = getattr(module, f"{proj}_input_scale", None)
        for e in range(info.num):
            names = info.names(e)
            for which, lo, hi in parts:
                weight = w[e, lo:hi].detach().clone()
                if scheme is None:
                    out[names[which]] = weight
                else:
                    out[names[which]] = ExpertLinear(weight, _rows(ws, scheme, e, lo, hi, proj == "down_proj", info),
                                                     None if xs is None else xs.reshape(()).clone(), scheme)
    return out


def fuse(info: Experts, experts: nn.Module, scheme: LinearScheme | None, read: Callable[[str], Tensor],
         scale_key: Callable[[str], str], module_scale: Callable[[Tensor], Tensor], fp8_max: float,
         device: str | torch.device) -> nn.Module:
    """The experts module of ``info`` from its per-expert tensors: an Fp8Experts (``scheme`` set)
    holding the stacked FP8 weights and scales, or ``experts`` (the skeleton's module) with its
    stacked high-precision parameters. ``scale_key(name)`` names a Linear's weight scale in the
    format, ``module_scale`` puts a stored scale in Fp8Linear's layout."""
    per: dict[str, list[list[Tensor]]] = {"gate_up_proj": [], "down_proj": []}
    scales: dict[str, list[Tensor]] = {"gate_up_proj": [], "down_proj": []}
    inputs: dict[str, list[Tensor]] = {"gate_up_proj": [], "down_proj": []}
    for e in range(info.num):
        g, u, d = info.names(e)
        for proj, names in (("gate_up_proj", (g, u)), ("down_proj", (d,))):
            per[proj].append([read(f"{n}.weight").to(device) for n in names])
            if scheme is None:
                continue
            parts = [module_scale(read(scale_key(n))).to(device=device, dtype=torch.float32) for n in names]
            if scheme.weights is WeightGranularity.TENSOR:
                parts = [p.reshape(()) for p in parts]
                if len(parts) == 2 and not torch.equal(parts[0], parts[1]):
                    raise UnsupportedError(
                        f"{names[0]}.weight_scale ({float(parts[0]):.6g}) and {names[1]}.weight_scale "
                        f"({float(parts[1]):.6g}) differ: an Fp8Experts keeps one per-tensor scale per expert for "
                        "gate and up (vLLM requantizes both to the larger one on load); fp8fx does not requantize "
                        "FP8 weights. Load the high-precision model and quantize it with fp8fx")
                scales[proj].append(parts[0])
            else:
                if scheme.weights is WeightGranularity.CHANNEL:
                    parts = [p.reshape(-1) for p in parts]
                scales[proj].append(torch.cat(parts, dim=0))
            if scheme.static:
                inputs[proj] += [read(f"{n}.input_scale").to(device=device, dtype=torch.float32).reshape(())
                                 for n in names]
    stacks = {p: torch.stack([torch.cat(ws, dim=0) for ws in per[p]]) for p in per}
    if scheme is None:
        for p, t in stacks.items():
            experts._parameters[p] = nn.Parameter(t, requires_grad=False)
        return experts
    quants = {}
    for p in Fp8Experts.PROJECTIONS:
        xs = torch.stack(inputs[p]).max() if scheme.static else None  # vLLM's max over experts
        quants[p] = (stacks[p], torch.stack(scales[p]), xs, scheme)
    return Fp8Experts(experts, quants, fp8_max)


# ------------------------------------------------------------------------------------ checks
def collapse(names: list[str], experts: dict[str, Experts], to: Callable[[str], str]) -> list[str]:
    """``names`` with the per-expert Linears of each experts module that are all listed replaced
    by one entry, ``to(checkpoint prefix)`` (the experts path, or a ``re:`` pattern)."""
    listed = set(names)
    whole = {ckpt for ckpt, info in experts.items() if set(info.all_names()) <= listed}
    drop = {n for ckpt in whole for n in experts[ckpt].all_names()}
    return [n for n in names if n not in drop] + [to(ckpt) for ckpt in sorted(whole)]


def check(m, st, plan, fmt, problems: list) -> None:  # noqa: ANN001 (Manifest, Structure, Plan, format module)
    """The MoE rules every format shares: one scheme per experts module (every projection of every
    expert, or none, quantized), a scheme the format's FP8 MoE method runs, block rows that split
    gate from up, and no tensor of an expert the config does not have."""
    from .checks import CONFIG, Problem

    for ckpt, info in st.experts.items():
        names = info.all_names()
        schemes = {plan.linears[n].scheme if n in plan.linears else None for n in names}
        if len(schemes) > 1:
            hp = [n for n in names if n not in plan.linears]
            problems.append(Problem(ckpt, f"{len(schemes)} schemes across its per-expert Linears ({len(hp)} of "
                                    f"{len(names)} unquantized, e.g. {hp[0] if hp else names[0]}): vLLM's FusedMoE "
                                    "quantizes every projection of every expert with one scheme, or none"))
            continue
        scheme = schemes.pop()
        if scheme is not None:
            why = fmt.expert_scheme_problem(scheme)
            if why is not None:
                problems.append(Problem(ckpt, why))
            elif scheme.weights is WeightGranularity.BLOCK and info.inter % scheme.block[0]:
                problems.append(Problem(f"{names[0]}.weight", f"intermediate size {info.inter} is not a multiple of "
                                        f"the weight block's {scheme.block[0]} rows: vLLM's FP8 MoE methods raise "
                                        "('not divisible by weight quantization block_n')"))
        prefix = ckpt + "."
        for key in sorted(m.tensors):
            if not key.startswith(prefix):
                continue
            index = key[len(prefix):].partition(".")[0]
            if index.isdigit() and int(index) >= info.num:
                problems.append(Problem(key, f"a tensor of expert {index}, but {CONFIG} gives {ckpt} {info.num} "
                                        "experts (num_local_experts / num_experts): the consumer fails on it or drops "
                                        "it; the checkpoint and its config disagree"))
