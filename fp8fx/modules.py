"""Modules that a converted model holds.

:class:`Fp8Linear` keeps its FP8 weight and scales *on the module*, as parameters/buffers that
``state_dict`` shows with the names FP8 checkpoints use (``weight`` float8 ``[out, in]``,
``weight_scale``, ``input_scale``). Memory savings are therefore real, a checkpoint export is a
``state_dict`` walk, and the weight is cast once, at convert, never per call. Its forward is
one call of the ``fp8fx::linear`` op, so eager runs, dynamo graphs and later backends all see
the same op. It replaces an ``nn.Linear`` and also a GPT-2 ``Conv1D`` (whose weight is stored
``[in, out]``: the FP8 weight is its transpose).

:class:`Fp8Experts` replaces a transformers MoE experts module (``@use_experts_implementation``:
every expert's projections stacked in one 3-D parameter, ``gate_up_proj [E, 2·I, H]`` and
``down_proj [E, H, I]``). It keeps each stack as one float8 ``[E, out, in]`` parameter with one
weight scale per expert (``[E]``, or ``[E, out]`` per channel) and one input scale per
projection: calibration observes the input of the grouped GEMM, which holds every expert's
tokens, so one activation scale serves all experts (as vLLM's FP8 MoE keeps one per layer).
Its forward is transformers' ``grouped_mm`` experts forward (tokens sorted by expert, one
grouped GEMM per projection, the gate activation, the top-k weighted sum); the GEMMs are the
``fp8fx::grouped_linear`` op defined here: an opaque custom op, because it loops over the
experts with data-dependent row counts, which a graph cannot hold.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import ops  # noqa: F401  (registers torch.ops.fp8fx.*)
from .errors import QuantizationError
from .fp8 import FP8_DTYPES
from .kernels.linear import quantize_activation
from .kernels.schemes import dynamic_scale, scaled_linear_fast
from .schemes import LinearScheme, WeightGranularity

__all__ = ["Fp8Linear", "Fp8Experts", "grouped_linear"]


def _keep_dtypes(module: nn.Module, tensors: list[Tensor | None], fn, recurse: bool):  # noqa: ANN001, ANN202
    """``module._apply`` that lets ``.to(device)`` move ``tensors`` but never changes their dtype
    (``.to(dtype)``/``.half()`` would silently undo the quantization)."""
    keep = {id(t) for t in tensors if t is not None}

    def guarded(t):  # noqa: ANN001, ANN202
        out = fn(t)
        if id(t) in keep and isinstance(out, torch.Tensor) and out.dtype != t.dtype:
            out = t.to(out.device)
        return out

    return nn.Module._apply(module, guarded, recurse)


def _check_linear(weight: Tensor, weight_scale: Tensor, input_scale: Tensor | None, bias: Tensor | None,
                  fp8_max: float, scheme: LinearScheme) -> tuple[Tensor, Tensor | None]:
    """Validate an Fp8Linear's tensors; returns the scales in this module's layout (float32,
    ``weight_scale`` 0-d, ``[out]`` or ``[out blocks, in blocks]``, ``input_scale`` 0-d or None).
    Checkpoints store a per-tensor scale as ``[1]`` and per-channel scales as ``[out, 1]`` (vLLM,
    compressed-tensors): both are taken."""
    problems = []
    if not isinstance(weight, Tensor) or weight.dtype not in FP8_DTYPES or weight.dim() != 2:
        what = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        raise QuantizationError(f"Fp8Linear: weight must be a 2-D float8 tensor [out, in] "
                                f"({', '.join(map(str, FP8_DTYPES))}), got {what}")
    out_f, in_f = weight.shape
    if scheme.static != (input_scale is not None):
        raise QuantizationError(f"Fp8Linear [{out_f}, {in_f}]: scheme '{scheme.describe()}' "
                                f"{'needs a static input_scale' if scheme.static else 'takes no input_scale'}, got "
                                f"{'None' if input_scale is None else 'one'}")
    for name, t in (("weight_scale", weight_scale), ("input_scale", input_scale)):
        if t is None and name == "input_scale":
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dtype in FP8_DTYPES:
            raise QuantizationError(f"Fp8Linear: {name} must be a floating-point (not float8) tensor, got "
                                    f"{getattr(t, 'dtype', type(t).__name__)}")
    ws = weight_scale.detach().to(torch.float32).clone()  # the module's own: loading never writes the caller's
    blocks = tuple(-(-d // b) for d, b in zip((out_f, in_f), scheme.block))
    if scheme.weights is WeightGranularity.BLOCK:
        if tuple(ws.shape) != blocks:
            problems.append(f"weight_scale has shape {tuple(weight_scale.shape)}; {scheme.block[0]}x{scheme.block[1]} "
                            f"blocks need {list(blocks)}")
    elif ws.numel() == 1 and ws.dim() <= 1 or ws.dim() == 2 and ws.shape == (1, 1):
        ws = ws.reshape(())
    elif ws.shape in ((out_f,), (out_f, 1)):
        ws = ws.reshape(out_f)
    else:
        problems.append(f"weight_scale has shape {tuple(weight_scale.shape)}; expected () or [1] (per tensor) "
                        f"or [{out_f}] / [{out_f}, 1] (per output channel)")
    if input_scale is not None and input_scale.numel() != 1:
        problems.append(f"input_scale has shape {tuple(input_scale.shape)}; a static activation scale is one "
                        "value (() or [1])")
    if bias is not None and tuple(bias.shape) != (out_f,):
        problems.append(f"bias has shape {tuple(bias.shape)}, expected [{out_f}]")
    if not float(fp8_max) > 0:
        problems.append(f"fp8_max must be positive, got {fp8_max}")
    if problems:
        raise QuantizationError(f"Fp8Linear [{out_f}, {in_f}]: " + "; ".join(problems))
    xs = None if input_scale is None else input_scale.detach().to(torch.float32).reshape(()).clone()
    if not bool(torch.isfinite(ws).all()) or bool((ws <= 0).any()) or \
            (xs is not None and not (bool(torch.isfinite(xs)) and float(xs) > 0)):
        raise QuantizationError(f"Fp8Linear [{out_f}, {in_f}]: scales must be finite and positive (weight_scale "
                                f"min {float(ws.min()):.4g}, input_scale {'none' if xs is None else f'{float(xs):.4g}'})")
    return ws, xs


class Fp8Linear(nn.Linear):
    """A Linear with an FP8 weight, in one of the schemes of :mod:`fp8fx.schemes`.

    ``scheme`` (default: static activations, per-tensor or per-channel weights as the scale's
    shape says) decides the scales: ``weight_scale`` 0-d, ``[out]`` or one per block;
    ``input_scale`` 0-d for static activations, None (no buffer, no state_dict key) otherwise.
    Static per-tensor/per-channel runs ``fp8fx::linear``, every other scheme
    ``fp8fx::scaled_linear``.

    It subclasses ``nn.Linear`` so that code which checks ``isinstance(m, nn.Linear)`` (and
    ``in_features``/``out_features``) keeps working. The output has the input's dtype (the
    model's high-precision dtype, INC's ``hp_dtype``); the bias keeps the model's dtype.
    """

    def __init__(self, weight: Tensor, weight_scale: Tensor, input_scale: Tensor | None,
                 bias: Tensor | None, fp8_max: float, scheme: LinearScheme | None = None) -> None:
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a high-precision weight
        if scheme is None:
            scheme = LinearScheme(WeightGranularity.CHANNEL if isinstance(weight_scale, Tensor)
                                  and weight_scale.numel() > 1 else WeightGranularity.TENSOR)
        weight_scale, input_scale = _check_linear(weight, weight_scale, input_scale, bias, fp8_max, scheme)
        self.scheme = scheme
        self.out_features, self.in_features = weight.shape
        self.fp8_max = float(fp8_max)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach(), requires_grad=False))
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("input_scale", input_scale)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # noqa: ANN001
                              unexpected_keys, error_msgs) -> None:
        """Load FP8 tensors only: ``copy_`` of a high-precision weight into the float8 one would
        cast it without a scale (a silently wrong model); scales in the checkpoints' layouts
        (``[1]``, ``[out, 1]``) are reshaped to this module's."""
        problems = []
        w = state_dict.get(prefix + "weight")
        if isinstance(w, Tensor) and w.dtype != self.weight.dtype:
            problems.append(f"{prefix}weight is {w.dtype}, this Fp8Linear holds {self.weight.dtype}")
        for key, mine in (("weight_scale", self.weight_scale), ("input_scale", self.input_scale)):
            t = state_dict.get(prefix + key)
            if isinstance(t, Tensor) and mine is not None:
                if t.numel() != mine.numel():
                    problems.append(f"{prefix}{key} has shape {tuple(t.shape)}, expected {tuple(mine.shape)}")
                elif not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
                    problems.append(f"{prefix}{key} holds non-finite or non-positive values")
                else:
                    state_dict[prefix + key] = t.reshape(mine.shape).to(torch.float32)
        if problems:
            raise QuantizationError(
                "cannot load into an FP8 Linear: " + "; ".join(problems) + ". Load the high-precision "
                "checkpoint into a fresh high-precision model and quantize it again (or load an FP8 "
                "checkpoint with matching scales).")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        """``.to(device)`` moves the FP8 weight and the scales; ``.to(dtype)``/``.half()`` leave
        their dtypes alone. The bias follows."""
        return _keep_dtypes(self, [self.weight, self.weight_scale, self.input_scale], fn, recurse)

    @property
    def per_channel(self) -> bool:
        return self.scheme.weights is WeightGranularity.CHANNEL

    def forward(self, x: Tensor) -> Tensor:
        s = self.scheme
        if s.uses_linear_op:
            return torch.ops.fp8fx.linear(x, self.weight, self.weight_scale, self.input_scale,
                                          self.bias, self.fp8_max)
        block_n, block_k = s.op_block
        return torch.ops.fp8fx.scaled_linear(x, self.weight, self.weight_scale, self.input_scale, self.bias,
                                             self.fp8_max, s.activations.op_name, s.op_group, block_n, block_k)

    def extra_repr(self) -> str:
        fmt = str(self.weight.dtype).replace("torch.", "")
        xs = "" if self.input_scale is None else f", input_scale={self.input_scale.item():.4g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={fmt}, {self.scheme.describe()}{xs}")


# ------------------------------------------------------------------------------- MoE experts
@torch.library.custom_op("fp8fx::grouped_linear", mutates_args=())
def grouped_linear(x: Tensor, weight: Tensor, weight_scale: Optional[Tensor], input_scale: Optional[Tensor],
                   offsets: Tensor, fp8_max: float, activations: str = "static", group_size: int = 0,
                   block_n: int = 0, block_k: int = 0) -> Tensor:
    """``y[rows of expert e] = x[rows of expert e] @ W[e]ᵀ`` for ``x [S, in]`` sorted by expert.

    ``offsets [E]`` are the cumulative row counts (expert ``e`` owns rows ``offsets[e-1]:offsets[e]``;
    rows past ``offsets[-1]`` are zero). An FP8 ``weight [E, out, in]`` comes with ``weight_scale``
    (0-d, ``[E]`` or ``[E, out]``) and the 0-d ``input_scale``: ``x`` is quantized once, each block
    is ``(q_x @ q_wᵀ) * s_x * s_w[e]`` in float32 (``fp8fx::linear``'s numerics). A high-precision
    weight comes with both scales None and is a plain grouped GEMM. The result has ``x.dtype``.

    The other schemes (``activations``, ``group_size``, ``block_n``, ``block_k`` as
    ``fp8fx::scaled_linear`` takes them; ``input_scale`` None unless static) run each expert's
    rows through ``fp8fx::scaled_linear``'s kernel with that expert's scale (``[E, ...]``); a
    dynamic per-tensor scale is taken over all rows, as one Linear over the stacked input would.
    """
    fp8 = weight.dtype in FP8_DTYPES
    static = activations == "static"
    if fp8 != (weight_scale is not None and (input_scale is not None) == static) or (
            not fp8 and (weight_scale is not None or input_scale is not None)):
        raise QuantizationError(
            f"fp8fx::grouped_linear got a {weight.dtype} weight with weight_scale "
            f"{'set' if weight_scale is not None else 'None'} and input_scale "
            f"{'set' if input_scale is not None else 'None'} (activations {activations!r}): an FP8 weight "
            "with static activations needs both scales, with dynamic or no activation quantization a weight "
            "scale only; a high-precision weight neither. Convert again from the high-precision model")
    if fp8 and (not static or block_n > 0):
        return _grouped_scaled(x, weight, weight_scale, input_scale, offsets, fp8_max, activations, group_size,
                               block_n, block_k)
    xs = quantize_activation(x, input_scale, weight.dtype, fp8_max).float() if fp8 else x
    y = torch.zeros((x.shape[0], weight.shape[1]), dtype=torch.float32 if fp8 else x.dtype, device=x.device)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            if fp8:
                s_w = weight_scale if weight_scale.dim() == 0 else weight_scale[e]
                y[start:end] = (xs[start:end] @ weight[e].float().t()) * (input_scale * s_w)
            else:
                y[start:end] = xs[start:end] @ weight[e].t()
        start = end
    return y.to(x.dtype)


def _grouped_scaled(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Optional[Tensor], offsets: Tensor,
                    fp8_max: float, activations: str, group_size: int, block_n: int, block_k: int) -> Tensor:
    if activations == "tensor":  # one scale over every expert's rows
        input_scale, activations = dynamic_scale(x, "tensor", 0, fp8_max).reshape(()), "static"
    y = torch.zeros((x.shape[0], weight.shape[1]), dtype=x.dtype, device=x.device)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            s_w = weight_scale if weight_scale.dim() == 0 else weight_scale[e]
            y[start:end] = scaled_linear_fast(x[start:end], weight[e], s_w, input_scale, None, fp8_max, activations,
                                              group_size, block_n, block_k)
        start = end
    return y


@grouped_linear.register_fake
def _grouped_linear_fake(x: Tensor, weight: Tensor, weight_scale: Optional[Tensor], input_scale: Optional[Tensor],
                         offsets: Tensor, fp8_max: float, activations: str = "static", group_size: int = 0,
                         block_n: int = 0, block_k: int = 0) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[1]))


# what transformers' experts interface must say for Fp8Experts' forward to be the module's own
_EXPERTS_FLAGS = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                  "has_post_expert_norm": False, "_is_expert_parallel": False}


class Fp8Experts(nn.Module):
    """MoE experts with FP8 weight stacks, in place of a transformers experts module.

    ``quants`` maps ``"gate_up_proj"`` / ``"down_proj"`` to ``(FP8 weight [E, out, in], weight
    scale, input scale)``; a projection not in it keeps the original high-precision parameter
    (e.g. one blocklisted by name) and has no scales.
    """

    PROJECTIONS = ("gate_up_proj", "down_proj")

    @staticmethod
    def unsupported_reason(module: nn.Module | None, leaf: str, match) -> str | None:  # noqa: ANN001
        """None when ``module`` can be replaced by an Fp8Experts, else why not."""
        type_name = type(module).__name__ if module is not None else "?"
        problems = [] if leaf in Fp8Experts.PROJECTIONS else [f"projection {leaf!r} (supported: gate_up_proj, down_proj)"]
        if module is None or not isinstance(getattr(module, "num_experts", None), int) or not hasattr(module, "act_fn"):
            problems.append("no num_experts/act_fn attributes (not a transformers experts module)")
        else:
            problems += [f"{k}={getattr(module, k, None)!r}" for k, v in _EXPERTS_FLAGS.items()
                         if getattr(module, k, None) != v]
            gate = getattr(type(module), "_apply_gate", None)
            if getattr(gate, "__name__", "") != "_default_apply_gate":
                problems.append("a custom _apply_gate")
            shapes = {p: tuple(getattr(module, p).shape) for p in Fp8Experts.PROJECTIONS
                      if isinstance(getattr(module, p, None), torch.Tensor)}
            if len(shapes) != 2 or any(len(s) != 3 or s[0] != module.num_experts for s in shapes.values()):
                problems.append(f"weight stacks {shapes}")
        if match.weight_transposed:
            problems.append("weights stored [experts, in, out]")
        if not problems:
            return None
        return (f"MoE experts {match.weight!r} ({type_name}): {'; '.join(problems)} — only the standard "
                "layout (gate_up_proj [E, 2*I, H] and down_proj [E, H, I], concatenated gate/up, "
                "no bias, default gate) is rewritten in this version, it stays in high precision")

    def __init__(self, experts: nn.Module, quants: dict[str, tuple[Tensor, Tensor, Tensor]], fp8_max: float) -> None:
        super().__init__()
        for attr in ("num_experts", "hidden_dim", "intermediate_dim"):
            if hasattr(experts, attr):
                setattr(self, attr, getattr(experts, attr))
        self.act_fn = experts.act_fn
        self.fp8_max = float(fp8_max)
        self.schemes: dict[str, LinearScheme] = {}
        for proj in self.PROJECTIONS:
            if proj in quants:
                w, w_scale, x_scale, *rest = quants[proj]
                scheme = rest[0] if rest else LinearScheme(
                    WeightGranularity.CHANNEL if w_scale.dim() == 2 else WeightGranularity.TENSOR)
                if scheme.static != (x_scale is not None):
                    raise QuantizationError(f"Fp8Experts {proj}: scheme '{scheme.describe()}' "
                                            f"{'needs' if scheme.static else 'takes no'} input scale; pass the "
                                            "scales that scheme produces (fp8fx.convert / fp8fx.quantize do)")
                self.schemes[proj] = scheme
                self.register_parameter(proj, nn.Parameter(w, requires_grad=False))
                self.register_buffer(f"{proj}_weight_scale", w_scale.detach().to(torch.float32))
                self.register_buffer(f"{proj}_input_scale", None if x_scale is None else
                                     x_scale.detach().to(torch.float32).reshape(()))
            else:
                self.register_parameter(proj, getattr(experts, proj))
                self.register_buffer(f"{proj}_weight_scale", None)
                self.register_buffer(f"{proj}_input_scale", None)

    def _apply(self, fn, recurse=True):  # noqa: ANN001
        fp8 = [t for p in self.PROJECTIONS for t in (getattr(self, p), getattr(self, f"{p}_weight_scale"),
                                                     getattr(self, f"{p}_input_scale"))
               if getattr(self, f"{p}_weight_scale") is not None and t is not None]
        return _keep_dtypes(self, fp8, fn, recurse)

    def _project(self, proj: str, x: Tensor, offsets: Tensor) -> Tensor:
        s = self.schemes.get(proj)
        extra = () if s is None else (s.activations.op_name, s.op_group, *s.op_block)
        return torch.ops.fp8fx.grouped_linear(x, getattr(self, proj), getattr(self, f"{proj}_weight_scale"),
                                              getattr(self, f"{proj}_input_scale"), offsets, self.fp8_max, *extra)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        top_k = top_k_index.size(-1)
        tokens = hidden_states.size(0)
        expert_ids, perm = torch.sort(top_k_index.reshape(-1))
        x = hidden_states[perm // top_k]
        # rows per expert; one_hot keeps the shape static (bincount's is data-dependent)
        offsets = torch.cumsum(nn.functional.one_hot(expert_ids, self.num_experts).sum(0), dim=0)
        gate, up = self._project("gate_up_proj", x, offsets).chunk(2, dim=-1)
        h = self._project("down_proj", self.act_fn(gate) * up, offsets)
        h = h * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        out = torch.empty_like(h)
        out[perm] = h  # back to (token, k) order
        return out.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        parts = []
        for p in self.PROJECTIONS:
            w, s = getattr(self, p), getattr(self, f"{p}_weight_scale")
            fmt = str(w.dtype).replace("torch.", "")
            parts.append(f"{p}={tuple(w.shape)}:{fmt}" + ("" if s is None else f" scales={tuple(s.shape)}"))
        return ", ".join(parts)
