"""Gaudi (HPU) lowering: ``fp8fx::linear`` nodes become Intel Gaudi's own FP8 ops.

:func:`lower_to_hpu` is an FX pass (``GraphModule -> int``, the number of nodes rewritten) that
replaces every ``fp8fx::linear`` call with the op sequence Intel Neural Compressor (INC) runs
for a quantized Linear on Gaudi. The ops live in ``torch.ops.hpu``, which the Gaudi PyTorch
bridge (``habana_frameworks.torch``, not on PyPI) registers when it is imported. This module
imports it lazily, only when asked (:func:`habana_available`, :func:`lower_to_hpu`); importing
fp8fx never touches it.

Mapping (scale convention of fp8fx: ``x ~= q * s``)
---------------------------------------------------
======================================  ==================================================
fp8fx                                   Gaudi
======================================  ==================================================
``linear(x, w, s_w, s_x, bias, m)``     ``qx = hpu.cast_to_fp8_v2(x, 1/s_x, False, False,
                                        w.dtype)[0]``

                                        ``y = hpu.fp8_gemm_v2(qx, False, w, True, None,
                                        x.dtype, s_x, s_w, bias, False)``
``scaled_linear(..., "token"|"tensor",  ``s = max(amax(|x|), AMAX_FLOOR) / fp8_max`` in
0, 0, 0)`` (dynamic activations,        float32 (aten ops; over the last dim, kept: ``[...,
``s_w`` 0-d or ``[N]``)                 1]``, for ``token``; 0-d for ``tensor``), then the
                                        cast with ``1/s`` and the gemm with ``A_scale_inv
                                        = s``, as above
``scaled_linear(..., "static", 0, 0,    as ``linear``
0)``
``scaled_linear`` with block weights,   kept: the node stays, its eager kernel runs
group activations or weight-only        (reasons in :data:`KEPT_REASONS`, written into
                                        ``node.meta["fp8fx_hpu"]``)
======================================  ==================================================

Dynamic schemes follow the op form INC uses on Gaudi for ``dynamic_quantization`` (its
``QuantDynamicInput`` and ``PatchedLinearBase.run_linear_quant``): a per-row scale tensor
``[..., 1]`` goes to ``cast_to_fp8_v2`` as ``1/s`` and to ``fp8_gemm_v2`` as ``A_scale_inv``,
next to a 0-d or ``[N]`` weight scale. The scale itself is fp8fx's (``docs/hpu.md`` lists the
differences): INC computes it with ``hpu.calculate_scale_for_cast`` (or aten ops), a backoff
of 0.5 and a power-of-two rounding; fp8fx uses no backoff and no rounding, so the scale here
is plain aten ops (``abs``, ``amax``, ``clamp_min``, ``div``, ``reciprocal``) that keep the
op's numerics. ``1/s`` is then an arbitrary float32 and ``x * (1/s)`` can differ from fp8fx's
``x / s`` by one float32 ulp before the FP8 rounding, which moves an FP8 code now and then
(never for power-of-two scales). MoE expert GEMMs (``fp8fx::grouped_linear``) are not lowered.

The attention path (``fp8fx::matmul`` / ``qdq`` / ``sdpa`` / ``kv_append`` / ``kv_index_copy_`` /
``dequant``) is lowered in the same call by :mod:`fp8fx.backends.hpu_attention` (Gaudi
``fp8_gemm_v2``, ``softmax_fp8``, ``fp8_sdpa_recomp_fwd``, ``cast_to_fp8_v2``/``cast_from_fp8``);
its module docstring has the mapping and the nodes it keeps. :func:`kept_nodes` lists every node
the pass left in place, with its reason.

Argument semantics of the Gaudi ops (schemas as the bridge registers them)::

    cast_to_fp8_v2(Tensor input, Tensor? scale=None, bool stochastic_rounding=False,
                   bool is_amax=False, ScalarType dtype=None, int[]? scale_shape=None)
        -> (Tensor, Tensor)
        out = saturate(input * scale) cast to ``dtype`` (round to nearest even unless
        stochastic_rounding); the second output is amax(|input|) when is_amax, else empty.
        ``scale`` is the *inverse* of fp8fx's scale: INC's QuantInput passes scale_inv = 1/s.
    fp8_gemm_v2(Tensor A, bool trans_A, Tensor B, bool trans_B, Tensor? D,
                ScalarType out_dtype, Tensor? A_scale_inv=None, Tensor? B_scale_inv=None,
                Tensor? bias=None, bool accumulate=False, int[]? B_scale_shape=None) -> Tensor
        out = op(A) @ op(B) * A_scale_inv * B_scale_inv + bias (+ D when accumulate), with
        FP32 accumulation, returned as out_dtype. Despite the names, the ``*_scale_inv``
        arguments take the *dequant* scales s (INC passes scale_input_inv=s_x,
        scale_other_inv=s_w). A per-channel B scale has shape [N] (INC: the flattened
        per-output-channel weight scale); the bridge requires it to broadcast against
        op(B) = [K, N], which [out] does for ``w`` [out, in] with trans_B=True.
    cast_from_fp8(Tensor input, Tensor? scale, ScalarType out_dtype, int[]? scale_shape=None)
        -> Tensor: input * scale as out_dtype (not needed by this lowering).

Choices, and where they differ from INC
---------------------------------------
* ``1/s_x``: a ``get_attr`` input scale is folded into a new buffer of the GraphModule (INC
  stores ``scale_inv`` as a buffer too; it is a snapshot: lower again after changing a scale);
  a graph input (dynamo/export lift buffers into
  placeholders) gets an ``aten.reciprocal`` node. The reciprocal is computed in float32; it can
  differ from fp8fx's ``x / s`` by one float32 ulp before the FP8 rounding (never with the
  power-of-two scales that the pow2/hw scale methods produce).
* Weight layout: ``w`` stays ``[out, in]`` and the gemm gets trans_B=True. INC transposes the
  weight once to ``[in, out]`` and uses trans_B=False; the product is the same.
* Bias: fused into the gemm (added in FP32 before the single rounding to ``out_dtype``: exactly
  fp8fx's semantics). INC's PatchedLinear passes bias=None and adds the bias afterwards in the
  high-precision dtype; ``fuse_bias=False`` reproduces that (one ``aten.add`` per biased
  Linear).
* out_dtype: ``x``'s dtype (INC: ``hp_dtype``), read from the node metadata that dynamo
  (``example_value``), torch.export (``val``) or ``ShapeProp`` (``tensor_meta``) record, else
  from ``out_dtype=``; unknown -> ``QuantizationError``.
* Saturation: the Gaudi cast saturates at the hardware E4M3 range, ±240 on Gaudi2 and ±448 on
  Gaudi3, not at the node's ``fp8_max``. As INC does, no extra clamp is inserted, so

  - ``fp8_max`` 240 on Gaudi3: identical except for activations beyond the calibrated range
    (``|x/s_x|`` in (240, 448]), which are cast as they are instead of saturating at 240;
  - ``fp8_max`` 448 on Gaudi2: Gaudi2 cannot hold E4M3 codes above 240, so weights are
    requantized as INC's ``convert_weight_to_inc`` does for 448-range checkpoints on Gaudi2:
    ``s_w' = s_w * 448/240``, ``w' = saturate(w * 240/448)`` (computed here in float32 from the
    FP8 codes, INC round-trips through bfloat16). The activation scale is kept (as INC), so
    activations saturate at ``240 * s_x``. This needs the weight and its scale as attributes
    of the GraphModule (``get_attr``); a graph that receives them as inputs raises
    ``QuantizationError`` (convert for Gaudi2 instead: fp8_max 240).

  The hardware range is ``e4m3_max=`` or, when omitted, detected from the Gaudi device through
  ``habana_frameworks`` (448 if it cannot be detected). E5M2 has the same range on both.

Sources checked: the op schemas and meta functions of the Intel Gaudi PyTorch bridge
(HabanaAI/gaudi-pytorch-bridge: its ``TORCH_LIBRARY(hpu, ...)`` registrations,
``habana_frameworks/torch/dynamo/_custom_op_meta_registrations.py`` and the fp8_gemm_v2 backend
with its scale-shape checks); INC 3.x ``neural_compressor/torch/algorithms/fp8_quant``:
``_core/quant_dequant.py`` (QuantInput), ``_core/fp_utils.py`` (cast helpers, Gaudi2 full scale),
``_quant_common/helper_modules.py`` (PatchedLinearBase.run_linear_quant),
``_core/quantized_func_wrappers/hpu/hpu_quantized_func_wrapper.py`` (QuantizedHpuMatmul) and
``save_load.py`` (convert_weight_to_inc).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from .. import ops as _ops  # noqa: F401  (registers torch.ops.fp8fx.*)
from ..errors import QuantizationError
from ..fp8 import E4M3, FP8_DTYPES
from ..kernels.schemes import AMAX_FLOOR
from ..numerics import quantize_fp32

__all__ = ["habana_available", "gaudi_e4m3_max", "lower_to_hpu", "kept_reason", "kept_nodes", "HPU_OPS",
           "KEPT_REASONS", "DYNAMIC_HPU_ACTIVATIONS"]

# the Gaudi ops this lowering emits; looked up in torch.ops.<_HPU_NAMESPACE> at lowering time
HPU_OPS = ("cast_to_fp8_v2", "fp8_gemm_v2")
_HPU_NAMESPACE = "hpu"
_LINEAR_ARGS = ("x", "weight", "weight_scale", "input_scale", "bias", "fp8_max")
_SCALED_ARGS = _LINEAR_ARGS + ("activations", "group_size", "block_n", "block_k")
#: ``fp8fx::scaled_linear`` activation schemes with a Gaudi form (dynamic, one scale per row or tensor)
DYNAMIC_HPU_ACTIVATIONS = ("token", "tensor")
#: why the other ``fp8fx::scaled_linear`` schemes keep the op (and its eager kernel); written into
#: ``node.meta["fp8fx_hpu"]`` of every node the pass leaves
KEPT_REASONS = {
    "group": "dynamic 1xG group activation scales vary along K; fp8_gemm_v2 applies one A scale per row "
             "(or per tensor) after the product, and no Gaudi FP8 GEMM form takes per-group scales",
    "block": "block weight scales vary along K; fp8_gemm_v2's B_scale_shape argument is not documented and "
             "INC never passes it (vLLM's Gaudi plugin dequantizes block weights to bfloat16 instead)",
    "none": "weight-only: INC's fp8_quant has no FP8 weight-only Linear on Gaudi; the op's kernel "
            "dequantizes the weight and runs a high-precision GEMM, which is that form already",
}
# metadata keys that describe a node's value; the rest (module stack, stack trace, fp8fx
# annotations) is copied onto the nodes that replace it
_VALUE_META = ("val", "example_value", "tensor_meta")


# --------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------


def habana_available() -> bool:
    """True when ``habana_frameworks.torch`` imports (which registers ``torch.ops.hpu``).

    Never raises: a missing or broken installation reads as "not available".
    """
    try:
        import habana_frameworks.torch  # noqa: F401
    except Exception:  # noqa: BLE001 (ImportError, or a broken driver stack failing at import)
        return False
    return True


def gaudi_e4m3_max() -> float | None:
    """Saturation of E4M3 on the attached Gaudi: 240.0 (Gaudi2), 448.0 (later); None if unknown."""
    try:
        import habana_frameworks.torch.utils.experimental as htexp

        gaudi2 = htexp._get_device_type() == htexp.synDeviceType.synDeviceGaudi2
    except Exception:  # noqa: BLE001 (no bridge, no device, or an older bridge API)
        return None
    return E4M3.gaudi2_max if gaudi2 else E4M3.max


def _missing_hpu_ops(names: tuple[str, ...] | list[str] = HPU_OPS) -> list[str]:
    namespace = getattr(torch.ops, _HPU_NAMESPACE)
    missing = []
    for name in names:
        try:
            getattr(namespace, name).default
        except (AttributeError, RuntimeError):
            missing.append(name)
    return missing


def _hpu_op(name: str) -> Any:
    return getattr(getattr(torch.ops, _HPU_NAMESPACE), name).default


def _require_hpu_ops(nodes: list[fx.Node], names: tuple[str, ...] | list[str] = HPU_OPS) -> None:
    missing = _missing_hpu_ops(names)
    if missing and habana_available():  # importing the bridge registers the ops
        missing = _missing_hpu_ops(names)
    if missing:
        names = ", ".join(f"torch.ops.{_HPU_NAMESPACE}.{m}" for m in missing)
        raise QuantizationError(
            f"cannot lower {len(nodes)} fp8fx node(s) (first: {nodes[0].name!r}, "
            f"{_op_name(nodes[0])}) to Gaudi: "
            f"{names} {'is' if len(missing) == 1 else 'are'} not registered. Install the Intel "
            "Gaudi software stack (habana_frameworks.torch, shipped with the Gaudi drivers and "
            "containers, not on PyPI) and run on a Gaudi host, or use the reference/inductor "
            "backend on other devices")


# --------------------------------------------------------------------------------------------
# Graph helpers
# --------------------------------------------------------------------------------------------


def _is_fp8fx_linear(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    packet = torch.ops.fp8fx.linear
    return node.target is packet or node.target is packet.default


def _is_fp8fx_scaled_linear(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    packet = torch.ops.fp8fx.scaled_linear
    return node.target is packet or node.target is packet.default


def _op_name(node: fx.Node) -> str:
    if _is_fp8fx_scaled_linear(node):
        return "fp8fx.scaled_linear"
    return "fp8fx.linear" if _is_fp8fx_linear(node) else str(node.target)


def _constant_number(arg: Any) -> float | None:
    """A constant Python number, or the value dynamo recorded for a float it lifted into a graph
    input (``specialize_float=False``: a module's float attribute reaches the graph as
    ``tensor.item()``, whose example value is a SymFloat with a concrete hint); else None."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    if isinstance(arg, fx.Node):
        value = arg.meta.get("example_value", arg.meta.get("val"))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, torch.SymFloat):
            hint = getattr(value.node, "hint", None)
            if isinstance(hint, (int, float)):
                return float(hint)
    return None


def _bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, whether passed positionally or by keyword."""
    names, op = (_SCALED_ARGS if _is_fp8fx_scaled_linear(node) else _LINEAR_ARGS), _op_name(node)
    if len(node.args) > len(names):
        raise QuantizationError(
            f"node {node.name!r}: {op} takes {len(names)} arguments "
            f"{names}, got {len(node.args)} positional ones; re-capture the model")
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    missing = [name for name in names if name not in bound]
    unknown = [name for name in bound if name not in names]
    if missing or unknown:
        raise QuantizationError(
            f"node {node.name!r}: {op} call has missing arguments {missing} / unknown "
            f"arguments {unknown}; expected {names}. Re-capture the model")
    return bound


def _scheme_args(node: fx.Node, args: dict[str, Any]) -> tuple[str, int, int, int]:
    """``(activations, group_size, block_n, block_k)`` of a scaled_linear node, checked constant."""
    acts, group, bn, bk = (args[k] for k in ("activations", "group_size", "block_n", "block_k"))
    ints_ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (group, bn, bk))
    if not isinstance(acts, str) or not ints_ok:
        raise QuantizationError(
            f"node {node.name!r}: fp8fx.scaled_linear needs constant scheme arguments (activations str, "
            f"group_size/block_n/block_k int), got {(acts, group, bn, bk)!r}; re-capture the model with its "
            "Fp8Linear modules unchanged")
    return acts, group, bn, bk


def kept_reason(node: fx.Node) -> str | None:
    """Why :func:`lower_to_hpu` leaves this ``fp8fx.scaled_linear`` node as it is (None: it has a
    Gaudi form, or it is not such a node)."""
    if not _is_fp8fx_scaled_linear(node):
        return None
    acts, _, block_n, _ = _scheme_args(node, _bind(node))
    if block_n > 0:
        return KEPT_REASONS["block"]
    if acts in DYNAMIC_HPU_ACTIVATIONS:
        return None
    if acts == "static":  # static activations with per-tensor/channel weights run fp8fx.linear
        return None
    return KEPT_REASONS.get(acts, f"activations {acts!r} have no Gaudi form")


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _constant_attr(gm: fx.GraphModule, arg: Any) -> Tensor | None:
    """The tensor behind a ``get_attr`` node, or None for any other value."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        try:
            value = _fetch_attr(gm, str(arg.target))
        except AttributeError:
            return None
        return value if isinstance(value, Tensor) else None
    return None


def _static_dtype(gm: fx.GraphModule, arg: Any) -> torch.dtype | None:
    """The dtype of a graph value known before running it, or None."""
    if isinstance(arg, Tensor):
        return arg.dtype
    if not isinstance(arg, fx.Node):
        return None
    value = _constant_attr(gm, arg)
    if value is not None:
        return value.dtype
    for key in ("val", "example_value"):
        value = arg.meta.get(key)
        if isinstance(value, Tensor):
            return value.dtype
    dtype = getattr(arg.meta.get("tensor_meta"), "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _new_buffer(gm: fx.GraphModule, base: str, value: Tensor) -> str:
    """Register ``value`` on ``gm`` under a fresh top-level name derived from ``base``."""
    stem = "_hpu_" + base.replace(".", "_")
    name, i = stem, 1
    while hasattr(gm, name):
        name, i = f"{stem}_{i}", i + 1
    gm.register_buffer(name, value)
    return name


def _copy_meta(src: fx.Node, dst: fx.Node, with_value: bool = False) -> None:
    for key, value in src.meta.items():
        if with_value or key not in _VALUE_META:
            dst.meta.setdefault(key, value)


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """What lowering one node needs, resolved (and checked) before the graph changes."""

    args: dict[str, Any]
    fp8_dtype: torch.dtype
    out_dtype: torch.dtype
    requantize: tuple[Tensor, Tensor] | None  # (FP8 weight, its scale) to requantize
    dynamic: str | None = None  # "token" / "tensor": the activation scale is computed per call


class _Lowering:
    """State of one :func:`lower_to_hpu` call: caches of folded and requantized constants."""

    def __init__(self, gm: fx.GraphModule, out_dtype: torch.dtype | None, e4m3_max: float,
                 fuse_bias: bool) -> None:
        self.gm, self.graph = gm, gm.graph
        self.out_dtype, self.e4m3_max, self.fuse_bias = out_dtype, e4m3_max, fuse_bias
        self.inv_cache: dict[str, str] = {}  # input scale target -> folded 1/s buffer
        self.requant_cache: dict[tuple[str, str], tuple[str, str]] = {}
        self.replaced: dict[fx.Node, None] = {}  # get_attr nodes that may have become dead

    def _get_attr(self, name: str, like: fx.Node) -> fx.Node:
        node = self.graph.get_attr(name)
        _copy_meta(like, node)
        return node

    def _scale_inv(self, node: fx.Node, input_scale: Any) -> fx.Node:
        value = _constant_attr(self.gm, input_scale)
        if value is not None:
            target = str(input_scale.target)
            if target not in self.inv_cache:
                inv = torch.reciprocal(value.detach().to(torch.float32))
                self.inv_cache[target] = _new_buffer(self.gm, target + "_inv", inv)
            return self._get_attr(self.inv_cache[target], node)
        inv = self.graph.call_function(torch.ops.aten.reciprocal.default, (input_scale,))
        _copy_meta(node, inv)
        return inv

    def _requantize(self, node: fx.Node, weight: fx.Node, weight_scale: fx.Node,
                    values: tuple[Tensor, Tensor], fp8_max: float) -> tuple[fx.Node, fx.Node]:
        """Weights quantized for ±fp8_max re-expressed in ±e4m3_max (Gaudi2), as INC does."""
        key = (str(weight.target), str(weight_scale.target))
        if key not in self.requant_cache:
            w, s = values
            ratio = fp8_max / self.e4m3_max
            codes = quantize_fp32(w.detach(), ratio, w.dtype, self.e4m3_max)
            new_s = s.detach().to(torch.float32) * ratio
            self.requant_cache[key] = (_new_buffer(self.gm, key[0], codes),
                                       _new_buffer(self.gm, key[1], new_s))
        self.replaced.update(dict.fromkeys((weight, weight_scale)))
        w_name, s_name = self.requant_cache[key]
        return self._get_attr(w_name, node), self._get_attr(s_name, node)

    def _dynamic_scale(self, node: fx.Node, x: fx.Node, plan: _Plan) -> tuple[fx.Node, fx.Node]:
        """``(s, 1/s)`` of the activation, computed in the graph as fp8fx defines it:
        ``max(amax(|x|), AMAX_FLOOR) / fp8_max`` in float32, over the last dim (kept, ``[..., 1]``)
        for ``token`` or over everything (0-d) for ``tensor``; unrounded. ``fp8_max`` above the
        Gaudi's E4M3 range (448 on Gaudi2) divides by that range instead: the cast could not hold
        larger codes (INC computes its dynamic scales with the device's full scale too)."""
        g = self.graph
        limit = float(plan.args["fp8_max"])
        if plan.fp8_dtype == E4M3.dtype:
            limit = min(limit, self.e4m3_max)
        mag = g.call_function(torch.ops.aten.abs.default, (x,))
        if plan.dynamic == "token":
            amax = g.call_function(torch.ops.aten.amax.default, (mag, [-1], True))
        else:
            amax = g.call_function(torch.ops.aten.amax.default, (mag, []))
        amax32 = g.call_function(torch.ops.aten._to_copy.default, (amax,), {"dtype": torch.float32})
        floored = g.call_function(torch.ops.aten.clamp_min.default, (amax32, AMAX_FLOOR))
        scale = g.call_function(torch.ops.aten.div.Tensor, (floored, limit))
        inv = g.call_function(torch.ops.aten.reciprocal.default, (scale,))
        for new in (mag, amax, amax32, floored, scale, inv):
            _copy_meta(node, new)
        return scale, inv

    def plan(self, node: fx.Node) -> _Plan:
        """Check that ``node`` can be lowered and resolve what its lowering needs; no mutation."""
        args = _bind(node)
        x, weight, fp8_max = args["x"], args["weight"], _constant_number(args["fp8_max"])
        if fp8_max is None:
            raise QuantizationError(
                f"node {node.name!r}: fp8_max must be a constant number, got {args['fp8_max']!r}; "
                "re-capture the model with its Fp8Linear modules unchanged")
        args = {**args, "fp8_max": fp8_max}
        fp8_dtype = _static_dtype(self.gm, weight)
        if fp8_dtype not in FP8_DTYPES:
            raise QuantizationError(
                f"node {node.name!r}: cannot tell the FP8 dtype of its weight "
                f"{getattr(weight, 'name', weight)!r} (got {fp8_dtype}). The weight must be a "
                "float8_e4m3fn/float8_e5m2 attribute, or a graph input whose dtype the capture "
                "recorded (dynamo, torch.export, or ShapeProp)")
        out_dtype = _static_dtype(self.gm, x) or self.out_dtype
        if out_dtype is None:
            raise QuantizationError(
                f"node {node.name!r}: the dtype of its input {getattr(x, 'name', x)!r} is not "
                "recorded in the graph, and fp8_gemm_v2 needs its out_dtype up front. Capture "
                "with dynamo or torch.export, run torch.fx.passes.shape_prop.ShapeProp(gm)"
                ".propagate(*example_inputs) first, or pass out_dtype= to lower_to_hpu")
        dynamic = None
        if _is_fp8fx_scaled_linear(node):
            acts, _, block_n, _ = _scheme_args(node, args)
            if block_n > 0 or acts not in DYNAMIC_HPU_ACTIVATIONS + ("static",):
                raise QuantizationError(f"node {node.name!r} has no Gaudi form: {kept_reason(node)}")
            dynamic = None if acts == "static" else acts
        requantize = None
        if fp8_dtype == E4M3.dtype and float(fp8_max) > self.e4m3_max:
            w, s = _constant_attr(self.gm, weight), _constant_attr(self.gm, args["weight_scale"])
            if w is None or s is None:
                raise QuantizationError(
                    f"node {node.name!r} was quantized for fp8_max={float(fp8_max):g}, but this "
                    f"Gaudi saturates E4M3 at ±{self.e4m3_max:g} (Gaudi2) and the weight or its "
                    "scale is a graph input, so it cannot be requantized here. Convert the "
                    "model for Gaudi2 (target 'gaudi2', fp8_max 240), or lower a GraphModule "
                    "that holds the weights as attributes (torch.fx.symbolic_trace)")
            requantize = (w, s)
        return _Plan(args, fp8_dtype, out_dtype, requantize, dynamic)

    def emit(self, node: fx.Node, plan: _Plan) -> None:
        args = plan.args
        x, weight, weight_scale = args["x"], args["weight"], args["weight_scale"]
        input_scale, bias = args["input_scale"], args["bias"]
        with self.graph.inserting_before(node):
            if plan.requantize is not None:
                weight, weight_scale = self._requantize(node, weight, weight_scale,
                                                        plan.requantize, float(args["fp8_max"]))
            if plan.dynamic is not None:
                input_scale, scale_inv = self._dynamic_scale(node, x, plan)
            else:
                scale_inv = self._scale_inv(node, input_scale)
            cast = self.graph.call_function(
                _hpu_op("cast_to_fp8_v2"), (x, scale_inv, False, False, plan.fp8_dtype))
            qx = self.graph.call_function(operator.getitem, (cast, 0))
            gemm_bias = bias if self.fuse_bias else None
            out = gemm = self.graph.call_function(
                _hpu_op("fp8_gemm_v2"),
                (qx, False, weight, True, None, plan.out_dtype, input_scale, weight_scale,
                 gemm_bias, False))
            if bias is not None and not self.fuse_bias:
                out = self.graph.call_function(torch.ops.aten.add.Tensor, (gemm, bias))
            for new in (cast, qx, gemm):
                _copy_meta(node, new)
            _copy_meta(node, out, with_value=True)
        node.replace_all_uses_with(out)
        self.graph.erase_node(node)

    def finish(self) -> None:
        for node in self.replaced:
            if not node.users:
                self.graph.erase_node(node)
        self.graph.lint()
        self.gm.recompile()


def lower_to_hpu(
    gm: fx.GraphModule,
    *,
    out_dtype: torch.dtype | None = None,
    e4m3_max: float | None = None,
    fuse_bias: bool = True,
) -> int:
    """Replace every ``fp8fx::linear`` node of ``gm``, every ``fp8fx::scaled_linear`` node whose
    scheme has a Gaudi form (dynamic per-token or per-tensor activations, per-tensor or
    per-channel weights; static activations), and every fp8fx attention-path node with a Gaudi
    form (:mod:`fp8fx.backends.hpu_attention`) by Gaudi's FP8 ops; in place.

    Returns the number of nodes rewritten (0 for a graph without any, which is left untouched
    and needs no Gaudi). Nodes left as they are (block weights, group activations, weight-only;
    per-head attention scales, E5M2 SDPA, ...) get the reason in ``node.meta["fp8fx_hpu"]``
    (:func:`kept_nodes`, :func:`kept_reason`). ``out_dtype`` is used only where the graph does not
    record an input's dtype. ``e4m3_max`` is the hardware E4M3 saturation (240 Gaudi2, 448 Gaudi3;
    detected when omitted). ``fuse_bias=False`` adds the bias after the gemm, as INC does.
    Raises :class:`~fp8fx.errors.QuantizationError` when the Gaudi ops are not registered
    (``habana_frameworks`` missing) or a node cannot be lowered; the graph is left unchanged
    then (every node is checked before any is rewritten).
    """
    from . import hpu_attention

    if not isinstance(gm, fx.GraphModule):
        raise QuantizationError(
            f"lower_to_hpu needs a torch.fx.GraphModule, got {type(gm).__name__}; capture the "
            "model first (dynamo backend, torch.export or torch.fx.symbolic_trace)")
    nodes = []
    for n in gm.graph.nodes:
        if _is_fp8fx_linear(n):
            nodes.append(n)
        elif _is_fp8fx_scaled_linear(n):
            reason = kept_reason(n)
            if reason is None:
                nodes.append(n)
            else:
                n.meta["fp8fx_hpu"] = f"kept as fp8fx.scaled_linear (its eager kernel runs): {reason}"
    attention = hpu_attention.plan_attention(gm, out_dtype)  # checks only; kept nodes get their reason
    if not nodes and not attention:
        return 0
    needed = (list(HPU_OPS) if nodes else []) + sorted(hpu_attention.needed_ops(attention) - set(HPU_OPS))
    _require_hpu_ops(nodes + [p.node for p in attention], needed)
    if e4m3_max is None:
        e4m3_max = gaudi_e4m3_max() or E4M3.max
    if not 0 < float(e4m3_max) <= E4M3.max:
        raise QuantizationError(
            f"e4m3_max={e4m3_max!r} is not a Gaudi E4M3 range: use 240.0 (Gaudi2) or 448.0 "
            "(Gaudi3)")
    lowering = _Lowering(gm, out_dtype, float(e4m3_max), fuse_bias)
    plans = [lowering.plan(node) for node in nodes]  # every check before any rewrite
    for node, plan in zip(nodes, plans):
        lowering.emit(node, plan)
    hpu_attention.emit_attention(gm, attention, _hpu_op, _new_buffer)
    lowering.finish()
    return len(nodes) + len(attention)


def kept_nodes(gm: fx.GraphModule) -> dict[str, str]:
    """Node name -> why :func:`lower_to_hpu` left it (or a note on how it lowered it), for every
    node of ``gm`` that carries such a line."""
    return {n.name: n.meta["fp8fx_hpu"] for n in gm.graph.nodes if "fp8fx_hpu" in n.meta}
