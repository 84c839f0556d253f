"""Rewrite (QUANTIZE): measurements -> scales -> FP8 modules in place of the matched Linears.

Scales come from pure functions in :mod:`fp8fx.numerics`; this pass only looks up the right
measurement for each decision, checks it, and swaps the module. An ``nn.Linear`` whose
``linear`` node was decided ``quantize`` is replaced (on its parent module) by an
:class:`~fp8fx.modules.Fp8Linear` holding the FP8 weight, cast once, here.

Nothing is guessed: a quantized node without a measurement, or with a non-finite one, raises
:class:`~fp8fx.errors.MeasurementError` naming the node and the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import numerics
from ..config import FP8Config
from ..errors import MeasurementError
from ..formats.inc import Measurements
from ..modules import Fp8Linear
from .annotate import Decision
from .match import OpKind

__all__ = ["LinearQuant", "linear_quant", "quantize_linears"]


@dataclass
class LinearQuant:
    weight: torch.Tensor        # FP8 [out, in]
    weight_scale: torch.Tensor  # 0-d or [out], float32
    input_scale: torch.Tensor   # 0-d, float32


def _source(meas: Measurements | None) -> str:
    return f" in {meas.source}" if meas is not None and meas.source else ""


def _input_amax(name: str, meas: Measurements | None) -> torch.Tensor:
    if meas is None or name not in meas.nodes:
        raise MeasurementError(
            f"no measurement for node {name!r}{_source(meas)}. Run calibration (MEASURE mode, then "
            "fp8fx.finalize_calibration) on this model with this allowlist/blocklist, or blocklist "
            "the node, or use scale_method 'unit_scale' which needs no measurement.")
    try:
        amax = meas.nodes[name].input_maxabs(0)
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise MeasurementError(f"measurement of node {name!r}{_source(meas)} has no usable input 0 "
                               f"({exc}); re-run calibration.") from exc
    t = torch.tensor(float(amax), dtype=torch.float32)
    if not bool(torch.isfinite(t)):
        raise MeasurementError(f"measurement of node {name!r}{_source(meas)} is not finite ({amax}); "
                               "re-run calibration on finite inputs or blocklist the node.")
    return t


def linear_quant(module: nn.Linear, name: str, type_name: str, cfg: FP8Config,
                 meas: Measurements | None) -> LinearQuant:
    """FP8 weight and scales of one Linear, from its weight and its measured input maxabs."""
    method = cfg.scale_method_for(name, type_name).value
    fp8_dtype, target = cfg.fp8_dtype, cfg.target.value
    needs = cfg.scale_method_for(name, type_name).needs_measurement
    amax = _input_amax(name, meas) if needs else torch.ones((), dtype=torch.float32)
    where = f"node {name!r}"
    input_backoff, weight_backoff = cfg.backoffs_for(name, type_name)
    x_scale = numerics.activation_scale(amax, method, fp8_dtype=fp8_dtype, target=target,
                                        backoff=input_backoff, where=where)
    w = module.weight.detach()
    w_scale = numerics.weight_scale(w, method, fp8_dtype=fp8_dtype, target=target,
                                    backoff=weight_backoff, where=where)
    w_q = numerics.quantize_weight(w, w_scale, fp8_dtype, cfg.fp8_max)
    device = w.device
    return LinearQuant(weight=w_q, weight_scale=w_scale.to(device=device, dtype=torch.float32),
                       input_scale=x_scale.to(device=device, dtype=torch.float32).reshape(()))


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def quantize_linears(model: nn.Module, decisions: list[Decision], cfg: FP8Config,
                     meas: Measurements | None) -> list[str]:
    """Swap every Linear decided ``quantize`` for an Fp8Linear. Returns the swapped names.

    All-or-nothing: every scale and FP8 weight is computed first (any error raises here, with the
    model untouched), then the modules are swapped.
    """
    planned: dict[str, tuple[nn.Linear, LinearQuant]] = {}
    for d in decisions:
        m = d.match
        if not d.quantize or m.kind is not OpKind.LINEAR or m.name in planned:
            continue
        module = model.get_submodule(m.name)
        if isinstance(module, Fp8Linear):
            continue
        planned[m.name] = (module, linear_quant(module, m.name, m.module_type, cfg, meas))
    for name, (module, q) in planned.items():
        bias = None if module.bias is None else module.bias.detach()
        _set_submodule(model, name, Fp8Linear(q.weight, q.weight_scale, q.input_scale, bias, cfg.fp8_max))
    return list(planned)
