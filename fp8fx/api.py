"""Orchestration of the public entry points: prepare, finalize_calibration, convert, explain, report.

Data flow (each step is a module of its own)::

    FP8Config -> capture (dynamo graph) -> match -> annotate -> observe (MEASURE)
                                                            \\-> rewrite  (QUANTIZE)

``prepare`` replaces ``model.forward`` by a dynamo-compiled forward whose graphs carry observer
nodes; calibration is plain calls of the model. ``finalize_calibration`` writes the INC
measurement files. ``convert`` turns measurements into scales and swaps every decided Linear
for an FP8 module, then gives the model back its own eager forward: the result is the user's
model object (``.config``, ``.generate``, keyword arguments and output types intact) that runs
at any batch size and sequence length without recompiling.

``convert`` of a plain model (a second process, INC style) reads the measurement files at once
and captures the graph from ``example_inputs`` or, when none are given, from the first real
call: that call is traced (not run), converted, then run in FP8.

All state lives on the model in one attribute, ``model._fp8fx`` (a :class:`~fp8fx.state.Fp8fxState`);
config resolution and checks, shared with the torch.compile backend, are in :mod:`fp8fx.state`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .capture import CapturedGraph, CompiledForward, capture
from .config import FP8Config, Mode
from .errors import ConfigError, Fp8fxError, MeasurementError
from .formats.inc import Measurements, NodeMeasurement
from .passes.annotate import Decision, annotate, decide
from .passes.match import Match, OpKind, check_same_op, find_matches, owner_path
from .observers import HISTOGRAM_OBSERVERS
from .passes.observe import REQUIRED_OUTPUTS, observed_values
from .passes.rewrite import quantize_linears
from .passes.rewrite_attention import AttentionQuant, attention_quant, plan_attention, rewrite_attention_in_graph
from .kv_cache import KVQuant, fp8_cache, is_cache, kv_layer_names
from .modules import Fp8Linear
from .state import (ATTR, Fp8fxState, check_hp_dtype, check_supported, instrument, load_measurements,
                    measurement_exists, quantize_config, resolve_config, state_of, unwrap)

# Fp8fxState, check_hp_dtype and instrument live in fp8fx.state (shared with the torch.compile
# backend, which must not import this module) and stay importable from here.
__all__ = ["prepare", "finalize_calibration", "convert", "explain", "report", "fp8_kv_cache", "Explanation",
           "Fp8fxState", "check_hp_dtype", "instrument"]

def _call_args(example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    if example_inputs is None:
        args: tuple = ()
    elif isinstance(example_inputs, tuple):
        args = example_inputs
    elif isinstance(example_inputs, list):
        args = tuple(example_inputs)
    else:
        args = (example_inputs,)
    return args, dict(example_kwargs or {})


def _capture_model(model: nn.Module, args: tuple, kwargs: dict) -> list[CapturedGraph]:
    state = state_of(model)
    return capture(model, args, kwargs, forward=state.original_forward if state is not None else None)


# --------------------------------------------------------------------------------- prepare
def prepare(model: nn.Module, cfg: FP8Config | dict | str | None = None, example_inputs: Any = None,
            example_kwargs: dict | None = None, *, sequential: bool = False, calibration_data: Any = None,
            blocks: str | None = None, device: str | torch.device | None = None,
            cache_limit_bytes: int | None = None, progress: bool = False) -> nn.Module:
    """Instrument ``model`` for calibration (MEASURE) and return it.

    ``cfg`` defaults to the JSON file named by ``QUANT_CONFIG``. A QUANTIZE config converts
    instead (as INC does); AUTO measures unless measurement files already exist. Without
    example inputs the graph is captured on the first real call.

    ``sequential=True`` calibrates here, block by block, on ``calibration_data`` (a list of
    batches: input-id tensors, argument tuples or keyword dicts), one decoder block on ``device``
    at a time, activations cached in CPU memory up to ``cache_limit_bytes`` and on disk past it;
    ``blocks`` names the block list (default: found from ``_no_split_modules``). Then call
    :func:`finalize_calibration`. See :mod:`fp8fx.sequential` and docs/sequential.md.
    """
    cfg = resolve_config(cfg, "prepare")
    extra = [k for k, v in (("calibration_data", calibration_data), ("blocks", blocks), ("device", device),
                            ("cache_limit_bytes", cache_limit_bytes)) if v is not None]
    if not sequential and extra:
        raise ConfigError(f"fp8fx.prepare: {', '.join(extra)} only apply with sequential=True")
    if sequential and (cfg.mode is Mode.QUANTIZE or (cfg.mode is Mode.AUTO and measurement_exists(cfg))):
        raise ConfigError("fp8fx.prepare(sequential=True) calibrates, but the config's mode resolves to QUANTIZE "
                          f"(mode {cfg.mode.value!r}, files at {cfg.dump_stats_path!r}); use mode MEASURE, or "
                          "fp8fx.convert without sequential")
    if sequential and (calibration_data is None or example_inputs is not None or example_kwargs):
        raise ConfigError("fp8fx.prepare(sequential=True) needs calibration_data (a list of batches) and "
                          "takes no example_inputs/example_kwargs: it runs the calibration itself")
    if cfg.mode is Mode.QUANTIZE or (cfg.mode is Mode.AUTO and measurement_exists(cfg)):
        return convert(model, cfg, example_inputs, example_kwargs)  # convert checks the config
    check_supported(cfg)
    check_hp_dtype(model, cfg)
    if cfg.mode not in (Mode.MEASURE, Mode.AUTO):
        raise ConfigError(f"fp8fx.prepare: mode {cfg.mode.value!r} is not supported; use MEASURE, "
                          "QUANTIZE or AUTO")
    existing = state_of(model)
    if existing is not None:
        raise Fp8fxError(f"{type(model).__name__} was already prepared/converted by fp8fx "
                         f"(phase {existing.phase!r}); start from a fresh model")
    if cfg.mode is Mode.AUTO:
        cfg = cfg.replace(mode="MEASURE")
    state = Fp8fxState(config=cfg, phase="measure")
    if sequential:  # the model keeps its own forward; calibration runs here, block by block
        from .sequential import calibrate

        model.__dict__[ATTR] = state
        try:
            calibrate(model, state, calibration_data, blocks=blocks, device=device,
                      cache_limit_bytes=cache_limit_bytes, progress=progress)
        except BaseException:
            del model.__dict__[ATTR]
            raise
        return model

    state.compiled = CompiledForward(model, lambda cg: instrument(cg, state, model))
    state.original_forward = state.compiled._original
    state.compiled.install()
    model.__dict__[ATTR] = state
    args, kwargs = _call_args(example_inputs, example_kwargs)
    if args or kwargs:  # capture now; what this call observed is not calibration data
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        except BaseException:  # leave the model as it was given, so a retry can work
            state.compiled.uninstall()
            del model.__dict__[ATTR]
            raise
        for obs in state.observers.values():
            for o in obs.all():
                o.amax.zero_()
                o.calls = o.nonfinite_calls = 0
    return model


# ---------------------------------------------------------------------- finalize_calibration
def _weight_stats(model: nn.Module, match: Match, per_channel: bool) -> np.ndarray:
    w = model.get_parameter(match.weight).detach()
    if w.is_meta:  # offloaded after sequential calibration, which took its statistics while loaded
        from .sequential import offloaded_weight_stats

        return offloaded_weight_stats(model, match, per_channel)
    if match.weight_transposed:  # stored [in, out] (Conv1D): measure it as [out, in]
        w = w.transpose(-2, -1)
    w = w.reshape(-1, w.shape[-1])  # a MoE experts stack [E, out, in]: one row per output channel
    if per_channel:
        return w.abs().amax(dim=1).float().reshape(-1, 1).cpu().numpy()
    return w.abs().amax().float().reshape(1, 1).cpu().numpy()


def _collect(model: nn.Module, state: Fp8fxState, plan: Any = None) -> Measurements:
    """The measurements of the observers: every rank's together when the calibration is
    data-parallel (``plan``, default a new :func:`fp8fx.distributed.calibration_plan`)."""
    from .distributed import calibration_plan

    plan = calibration_plan(model, state) if plan is None else plan
    with plan.reduced(state):
        return _collect_observed(model, state)


def _collect_observed(model: nn.Module, state: Fp8fxState) -> Measurements:
    cfg = state.config
    never = [n for n, o in state.observers.items() if o.calls == 0 and cfg.measure_inputs]
    bad = {n: o.nonfinite_calls for n, o in state.observers.items() if o.nonfinite_calls}
    if bad:
        listing = ", ".join(f"{n} ({c} calls)" for n, c in list(bad.items())[:10])
        raise MeasurementError(
            f"non-finite values (inf/NaN) were seen during calibration at {len(bad)} node(s): "
            f"{listing}. Check the calibration data and the model's dtype (fp16 overflow?), or "
            "blocklist these nodes.")
    if not state.observers or (never and len(never) == len(state.observers)) or not any(
            o.calls for o in state.observers.values()):
        raise MeasurementError(
            f"{type(model).__name__}: no calibration data was observed; call the prepared model on "
            "calibration inputs before fp8fx.finalize_calibration / fp8fx.convert")
    per_channel = cfg.observer.value == "maxabs_per_channel"
    clipped = cfg.observer.value in HISTOGRAM_OBSERVERS  # values below the maxabs: keep the maxabs too
    nodes: dict[str, NodeMeasurement] = {}
    maxabs: dict[str, NodeMeasurement] = {}
    for name, obs in state.observers.items():
        if obs.calls == 0:
            continue
        m = state.decisions[name].match
        inputs, in_max = observed_values(obs.inputs, cfg, m) if cfg.measure_inputs else ([], [])
        outputs, out_max = (observed_values(obs.outputs, cfg, m)
                            if cfg.measure_outputs or m.kind in REQUIRED_OUTPUTS else (None, None))
        params: dict[str, np.ndarray] = {}
        if m.kind is OpKind.LINEAR and m.weight is not None and cfg.measure_params:
            params["weight"] = _weight_stats(model, m, per_channel).astype(np.float64)
        nodes[name] = NodeMeasurement(inputs=inputs, outputs=outputs, params=params)
        if clipped:
            maxabs[name] = NodeMeasurement(inputs=in_max, outputs=out_max)
    recorded = clipped or cfg.observer_params.per_head  # the files say how their values were made
    return Measurements(nodes=nodes, observer=cfg.observer.value, maxabs=maxabs if clipped else None,
                        observer_params=cfg.observer_params.resolved() if recorded else None)


def _observer_calls(state: Fp8fxState) -> int:
    return sum(o.calls for o in state.observers.values())


def finalize_calibration(model: nn.Module) -> list[Path]:
    """Write the measurement files (INC layout, atomically) and return their paths.

    Under torch.distributed this is a collective call (``calibration_parallel``, docs/distributed.md):
    data-parallel ranks reduce their statistics and rank 0 writes one set of files."""
    state = state_of(model)
    model = unwrap(model)
    if state is None or state.phase != "measure":
        raise Fp8fxError(f"fp8fx.finalize_calibration: {type(model).__name__} is not in MEASURE "
                         "mode; call fp8fx.prepare(model, FP8Config(mode='MEASURE')) and run "
                         "calibration first")
    from .distributed import calibration_plan  # per-rank files, or data-parallel: reduce, rank 0 writes

    plan = calibration_plan(model, state)
    state.measurements = _collect(model, state, plan)
    state.calls_at_finalize = _observer_calls(state)
    state.files = plan.write(state.measurements, state.config.dump_stats_path)
    return state.files


# ----------------------------------------------------------------------------------- convert
def _needs_measurement(m: Match, cfg: FP8Config) -> bool:
    """Whether a quantized node's scales come from a measurement (not a dynamic or weight-only
    Linear scheme, not a fixed-scale method)."""
    if m.kind is OpKind.LINEAR and not cfg.scheme_for(m.name, m.module_type, m.experts).static:
        return False
    return cfg.scale_method_for(m.name, m.module_type).needs_measurement


def _check_names(model: nn.Module, decisions: list[Decision], meas: Measurements | None,
                 cfg: FP8Config) -> set[str]:
    """Every quantized node is measured, and the file names no module this model lacks.

    Returns the unmeasured names to leave in high precision when the config says
    ``ignore_modules_wo_measures``; otherwise an unmeasured node raises.
    """
    if meas is None:
        return set()
    src = f" ({meas.source})" if meas.source else ""
    known = set(dict(model.named_modules())) | set(dict(model.named_parameters()))
    unknown = [name for name in meas.nodes if owner_path(name) not in known]
    if unknown:
        raise MeasurementError(
            f"the measurements{src} name {len(unknown)} node(s) that {type(model).__name__} does not "
            f"have: {', '.join(sorted(unknown)[:10])}{' ...' if len(unknown) > 10 else ''}. They were "
            "measured on a different model (or module names changed); re-run calibration on this one.")
    missing = sorted({d.match.name for d in decisions if d.quantize and d.match.name not in meas.nodes
                      and _needs_measurement(d.match, cfg)})
    if missing and cfg.ignore_modules_wo_measures:
        return set(missing)
    if missing:
        raise MeasurementError(
            f"the measurements{src} lack {len(missing)} node(s) that this config quantizes: "
            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}. Re-run calibration "
            "with the same model and allowlist/blocklist, blocklist these nodes, or set "
            "ignore_modules_wo_measures to leave them in high precision.")
    return set()


def _untie_fp8_output_embedding(model: nn.Module) -> None:
    """An FP8 output embedding is no longer tied to the input embedding: say so in the config,
    or ``model.tie_weights()`` (which lm-eval's HFLM and accelerate call) would put the hp
    embedding back in place of the FP8 weight. fp8fx never quantizes a weight that is still tied
    (annotate keeps it in hp); this covers a config that says tied when the weights are not."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    config = getattr(model, "config", None)
    if isinstance(out, Fp8Linear) and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def _apply(model: nn.Module, state: Fp8fxState, decisions: dict[str, Decision],
           meas: Measurements | None, cfg: FP8Config) -> None:
    """Check everything, then swap the modules; the state changes only when all succeeded."""
    check_hp_dtype(model, cfg)
    unmeasured = _check_names(model, list(decisions.values()), meas, cfg)
    decisions = dict(decisions)
    for name in unmeasured:
        decisions[name] = dataclasses.replace(
            decisions[name], quantize=False,
            reason="no measurement for it (ignore_modules_wo_measures): stays in high precision")
    attention = plan_attention(list(decisions.values()), cfg, meas)       # raises before any change
    converted = quantize_linears(model, list(decisions.values()), cfg, meas)  # all-or-nothing
    _untie_fp8_output_embedding(model)
    if converted:  # so that torch.compile(model) lowers fp8fx.linear instead of calling it
        from .backends.inductor import register_lowering

        register_lowering()
    state.config, state.measurements, state.decisions = cfg, meas, decisions
    state.converted, state.phase, state.attention = converted, "converted", attention
    converted.extend(sorted(attention))


def _install_quantized_graph(model: nn.Module, state: Fp8fxState) -> None:
    """When attention-path ops are quantized, the converted model runs its dynamo graph with
    those ops rewritten (eagerly, op by op); with Linears alone it keeps its own forward."""
    if not state.attention:
        return

    def backend(cg: CapturedGraph) -> Any:
        fresh = annotate(cg.gm, find_matches(cg), state.config, model)
        decisions = [dataclasses.replace(state.decisions[d.match.name], match=d.match)
                     if d.match.name in state.decisions else d for d in fresh]
        rewrite_attention_in_graph(cg.gm, decisions, state.attention)
        return cg.gm

    state.compiled = CompiledForward(model, backend)
    state.original_forward = state.compiled._original
    layers = kv_layers(model, state.attention)
    graph_forward = state.compiled.forward

    @functools.wraps(graph_forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):  # FP8 storage for the caches it is given
            if is_cache(value):
                fp8_cache(value, layers)
        return graph_forward(*args, **kwargs)

    state.compiled.forward = torch.compiler.disable(forward)  # as CompiledForward's own
    state.compiled.install()


def kv_layers(model: nn.Module, plan: dict[str, AttentionQuant]) -> dict[int, KVQuant]:
    """FP8 cache-layer scales by layer index, from the kv_cache entries of ``plan``."""
    kv = [n for n, q in plan.items() if q.kind is OpKind.KV_CACHE]
    return {i: KVQuant(plan[k].scales[0], plan[v].scales[0], plan[k].fp8_dtype, plan[k].fp8_max)
            for i, (k, v) in kv_layer_names(model, kv).items()}


def fp8_kv_cache(cache: Any, model: nn.Module, cfg: FP8Config | dict | str | None = None) -> Any:
    """Give a transformers cache FP8 storage with ``model``'s calibrated KV scales; returns it.

    A model converted by fp8fx does this by itself. For ``torch.compile(model, backend="fp8fx")``
    pass the QUANTIZE config (or set QUANT_CONFIG): the scales come from its measurement files.
    """
    state = state_of(model)
    model = unwrap(model)
    if state is not None and state.phase == "converted" and cfg is None:
        return fp8_cache(cache, kv_layers(model, state.attention))
    qcfg = quantize_config(cfg, None)
    meas = load_measurements(qcfg)
    pairs = kv_layer_names(model, list(meas.nodes) if meas is not None else [])
    if not pairs:
        raise MeasurementError(
            f"no KV-cache measurements for {type(model).__name__} in {qcfg.dump_stats_path!r}: calibrate "
            "with a cache (use_cache=True, e.g. through generate) so that the kv_cache nodes are measured")
    plan = {n: attention_quant(n, OpKind.KV_CACHE, "", qcfg, meas) for pair in pairs.values() for n in pair}
    return fp8_cache(cache, kv_layers(model, plan))


def _decide_graphs(model: nn.Module, graphs: list[CapturedGraph], cfg: FP8Config) -> dict[str, Decision]:
    out: dict[str, Decision] = {}
    for cg in graphs:
        for d in annotate(cg.gm, find_matches(cg), cfg, model):
            check_same_op(out.setdefault(d.match.name, d).match, d.match)
    return out


def _convert_prepared(model: nn.Module, state: Fp8fxState, cfg: FP8Config | dict | str | None) -> nn.Module:
    qcfg = quantize_config(cfg, state.config)
    if state.calls_at_finalize is not None and _observer_calls(state) != state.calls_at_finalize:
        raise MeasurementError(
            f"{type(model).__name__} was called again after fp8fx.finalize_calibration, so the "
            "measurement files no longer describe the calibration; call finalize_calibration again "
            "before convert")
    meas = state.measurements if state.measurements is not None else _collect(model, state)
    decisions = {n: decide(d.match, qcfg, model) for n, d in state.decisions.items()}
    _apply(model, state, decisions, meas, qcfg)  # raises before changing anything
    if state.compiled is not None:
        state.compiled.uninstall()
    state.compiled, state.observers, state.original_forward = None, {}, None
    _install_quantized_graph(model, state)
    return model


def convert(model: nn.Module, cfg: FP8Config | dict | str | None = None, example_inputs: Any = None,
            example_kwargs: dict | None = None) -> nn.Module:
    """Quantize ``model`` and return it (the same object, now with FP8 Linears).

    A prepared model is converted from its own observers (its QUANTIZE config defaults to the
    MEASURE config with mode QUANTIZE). A plain model needs a QUANTIZE config (or QUANT_CONFIG)
    whose ``dump_stats_path`` names the measurement files; its graph is captured from
    ``example_inputs``/``example_kwargs`` or, without them, on the first call (traced, converted,
    then run in FP8). Nothing is changed when convert raises.
    """
    state = state_of(model)
    if state is not None and state.phase in ("converted", "pending"):
        when = "" if state.phase == "converted" else " (on its first call, which has not happened yet)"
        raise Fp8fxError(f"{type(model).__name__} is already converted by fp8fx{when}")
    if state is not None and state.phase == "measure":
        return _convert_prepared(model, state, cfg)

    qcfg = quantize_config(cfg, None)
    meas = load_measurements(qcfg)  # a missing or corrupt file fails here, at once
    args, kwargs = _call_args(example_inputs, example_kwargs)
    state = Fp8fxState(config=qcfg, phase="pending", measurements=meas)
    if args or kwargs:
        graphs = capture(model, args, kwargs)
        _apply(model, state, _decide_graphs(model, graphs, qcfg), meas, qcfg)
        model.__dict__[ATTR] = state
        _install_quantized_graph(model, state)
        return model

    had_forward = "forward" in model.__dict__
    original = model.forward

    def first_call(*a: Any, **kw: Any) -> Any:
        graphs = capture(model, a, kw, forward=original)
        _apply(model, state, _decide_graphs(model, graphs, qcfg), meas, qcfg)  # on failure: stays pending
        if had_forward:
            model.forward = original
        else:
            del model.forward
        state.original_forward = None
        _install_quantized_graph(model, state)
        return model.forward(*a, **kw)

    state.original_forward = original
    model.__dict__[ATTR] = state
    model.forward = first_call
    return model


#: ``fp8fx.quantize``'s blocklist when no config is given: every kind but Linear, and lm_head
QUANTIZE_DEFAULT_BLOCKLIST = {"names": ["lm_head"], "types": [k.value for k in OpKind if k is not OpKind.LINEAR]}


def quantize(model: nn.Module, scheme: str | dict | FP8Config = "FP8_DYNAMIC", cfg: FP8Config | dict | str | None = None,
             example_inputs: Any = None, example_kwargs: dict | None = None) -> nn.Module:
    """Quantize ``model`` in one call, without calibration, and return it (the same object).

    ``scheme`` is a preset name (``"FP8_DYNAMIC"``, ``"FP8_BLOCK"``, ``"FP8_WEIGHT_ONLY"``; see
    :mod:`fp8fx.schemes`), a scheme object, or a whole FP8Config; ``cfg`` gives the other keys
    (allowlist, blocklist, target, ...); without ``cfg`` the Linears are quantized except
    ``lm_head`` (:data:`QUANTIZE_DEFAULT_BLOCKLIST`, llm-compressor's usual ``ignore``), and the
    attention ops, whose static scales need calibration, stay in high precision. The result is
    what :func:`convert` returns: eager, and
    compiled by ``torch.compile``. A scheme with static activation scales (``"FP8"``) needs
    calibration: use :func:`prepare` / :func:`finalize_calibration` / :func:`convert` (or name the
    measurement files in ``cfg``'s ``dump_stats_path``).
    """
    if isinstance(scheme, FP8Config):
        if cfg is not None:
            raise ConfigError("fp8fx.quantize: give the scheme inside one FP8Config, or a scheme plus cfg, not two configs")
        qcfg = scheme.replace(mode="QUANTIZE")
    else:
        base = FP8Config(blocklist=QUANTIZE_DEFAULT_BLOCKLIST) if cfg is None else resolve_config(cfg, "quantize")
        qcfg = base.replace(mode="QUANTIZE", scheme=scheme)
    if qcfg.needs_measurement and not measurement_exists(qcfg):
        label = qcfg.scheme.to_json() if qcfg.scheme is not None else "this config"
        raise ConfigError(
            f"fp8fx.quantize: scheme {label!r} has static activation scales, which come from calibration, and no "
            f"measurement files exist at dump_stats_path {qcfg.dump_stats_path!r}. Calibrate with fp8fx.prepare / "
            "finalize_calibration / convert, or pick a scheme without static activations (FP8_DYNAMIC, FP8_BLOCK, "
            "FP8_WEIGHT_ONLY)")
    return convert(model, qcfg, example_inputs, example_kwargs)


# ----------------------------------------------------------------------------- explain / report
@dataclass
class Explanation:
    """Every candidate node and what fp8fx does with it; ``lowering``: what the target's backend
    lowering does with a quantized node, by name (target ``cuda``: fp8fx.backends.cuda_attention)."""

    rows: list[Decision]
    lowering: dict[str, str] = dataclasses.field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        q = Counter(d.match.kind.value for d in self.rows if d.quantize)
        s = Counter(d.match.kind.value for d in self.rows if not d.quantize)
        return {"quantized": dict(q), "skipped": dict(s)}

    def to_dict(self) -> list[dict]:
        return [{**d.to_meta(), "module_type": d.match.module_type, "node": d.match.node,
                 **({"lowering": self.lowering[d.match.name]} if d.match.name in self.lowering else {})}
                for d in self.rows]

    def __str__(self) -> str:
        head = ("name", "kind", "module type", "decision", "reason")
        body = [(d.match.name, d.match.kind.value, d.match.module_type,
                 "quantize" if d.quantize else ("measure" if d.measure else "skip"),
                 self.lowering.get(d.match.name, "") if d.quantize else d.reason) for d in self.rows]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in [head, *body]]
        c = self.counts()
        lines.append(f"quantized: {c['quantized']}  skipped: {c['skipped']}")
        return "\n".join(lines)


def explain(model: nn.Module, cfg: FP8Config | dict | str | None = None, example_inputs: Any = None,
            example_kwargs: dict | None = None) -> Explanation:
    """List every candidate node: quantized or not, and why. Runs nothing, changes nothing."""
    state = state_of(model)
    if state is not None and state.decisions and cfg is None:
        return _explanation(list(state.decisions.values()), state.config)
    cfg = resolve_config(cfg, "explain")
    args, kwargs = _call_args(example_inputs, example_kwargs)
    if not (args or kwargs):
        raise Fp8fxError("fp8fx.explain needs example_inputs or example_kwargs to capture the graph "
                         "of a model that was not prepared/converted yet")
    if state is not None and state.phase == "converted":
        raise Fp8fxError(f"{type(model).__name__} is already converted: call fp8fx.explain(model) "
                         "without a config to see what was done, or explain a fresh model")
    return _explanation(list(_decide_graphs(model, _capture_model(model, args, kwargs), cfg).values()), cfg)


def _explanation(rows: list[Decision], cfg: FP8Config) -> Explanation:
    from .backends.cuda_attention import explain_notes

    return Explanation(rows, explain_notes(rows, cfg.target.value))


def report(model: nn.Module) -> dict:
    """What fp8fx did to ``model``: quantized and skipped nodes by kind, with reasons."""
    state = state_of(model)
    if state is None:
        raise Fp8fxError(f"{type(model).__name__} was not prepared or converted by fp8fx")
    exp = Explanation(list(state.decisions.values()))
    c = exp.counts()
    return {
        "phase": state.phase,
        "nodes_quantized": c["quantized"],
        "nodes_skipped": c["skipped"],
        "skipped": [{"name": d.match.name, "kind": d.match.kind.value, "reason": d.reason}
                    for d in exp.rows if not d.quantize],
        "converted": list(state.converted),
        "scheme": None if state.config.scheme is None else state.config.scheme.to_json(),
        "measurement_files": [str(p) for p in state.files],
    }
