"""``torch.compile(model, backend="fp8fx", options={"config": cfg})``.

The backend runs the same passes as ``prepare``/``convert`` on the graphs dynamo hands it:

* MEASURE (or AUTO without measurement files): match, annotate, insert observer nodes; the
  graph runs eagerly (calibration needs no speed). Observers live in a state shared by every
  graph of the same model and config, and ``fp8fx.finalize_calibration(compiled_model)``
  writes the same INC files as the eager path.
* QUANTIZE: match, annotate, then :func:`~fp8fx.passes.rewrite.rewrite_linears_in_graph`
  replaces each decided ``linear`` by ``fp8fx.linear`` with FP8 weight constants,
  :func:`~fp8fx.passes.rewrite_attention.rewrite_attention_in_graph` rewrites attention's
  matmul/softmax/SDPA/KV-cache writes (see ``fp8fx.fp8_kv_cache`` for FP8 cache storage), and the graph
  goes to Inductor (``options={"inductor": False}`` runs it eagerly instead) or, for a Gaudi
  target, is lowered to ``torch.ops.hpu`` ops.

Dynamo hands a backend the parameters as graph inputs, so the high-precision weights arrive on
every compile. FP8 weights are cached by parameter identity (and its in-place version counter):
a weight is cast once however many graphs (shapes, prefill/decode) are compiled.

The FX graph cache stays correct: Inductor gets a post-grad pass whose ``uuid()`` is a digest
of the config, every scale and every FP8 weight, so a different config or different
measurements never reuse a stale compiled graph.

The backend is registered under the name ``fp8fx`` through the ``torch_dynamo_backends``
entry point group: ``backend="fp8fx"`` works without importing fp8fx first.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ..capture import CapturedGraph
from ..config import FP8Config, Mode
from ..errors import ConfigError, QuantizationError
from ..formats.inc import Measurements, measurement_file_paths
from ..passes.annotate import annotate
from ..passes.match import Match, find_matches
from ..passes.rewrite import (LinearQuant, input_scale, rewrite_linears_in_graph,
                              plan_linears, weight_quant)
from ..passes.rewrite_attention import plan_attention, rewrite_attention_in_graph
from ..state import (check_hp_dtype, check_supported, instrument, load_measurements, measure_state,
                     measurement_exists, resolve_config, worker)
from ..state import compiled_state_of as state_of

# state_of (the MEASURE state of a compiled model) is fp8fx.state.compiled_state_of, next to the
# registry that maps parameters to it; it stays importable from here.
__all__ = ["fp8fx_backend", "state_of", "OPTIONS"]

OPTIONS = {
    "config": "an FP8Config, a dict of INC keys or a JSON path (default: QUANT_CONFIG)",
    "inductor": "compile the QUANTIZE graph with Inductor (default True); False runs it eagerly",
    "keep_hp_weights": "False (default): the first QUANTIZE compile swaps the model's decided Linears "
                       "for FP8 modules, as fp8fx.convert does, so each weight is held once, in FP8; "
                       "True leaves the model untouched and keeps FP8 copies as graph constants",
    "model": "the nn.Module whose graphs these are (default: found on the call stack by identity); "
             "needed only when compiling a plain function that calls the model",
}

# parameter -> (its _version when cast, {cast key: (FP8 weight, weight scale)})
# (keyed by identity: tensors compare elementwise, so a plain WeakKeyDictionary cannot hold them)
_WEIGHTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _options(options: dict | None) -> dict:
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        valid = "; ".join(f"{k!r}: {v}" for k, v in OPTIONS.items())
        raise ConfigError(f"unknown torch.compile option(s) {unknown} for backend 'fp8fx'; valid: {valid}")
    opts.setdefault("inductor", True)
    opts.setdefault("keep_hp_weights", False)
    return opts


def _cast_key(m: Match, cfg: FP8Config) -> tuple:
    return (cfg.scale_method_for(m.name, m.module_type).value, cfg.backoffs_for(m.name, m.module_type)[1],
            cfg.fp8_dtype, cfg.fp8_max, cfg.target.value, cfg.scheme_for(m.name, m.module_type, m.experts))


def cached_weight_quant(weight: Tensor, m: Match, cfg: FP8Config) -> tuple[Tensor, Tensor]:
    """FP8 weight and scale of ``weight``, cast once per parameter (recast after an in-place
    change of the parameter, which bumps its version counter)."""
    key = _cast_key(m, cfg)
    version = weight._version
    entry = _WEIGHTS.get(weight)
    if entry is None or entry[0] != version:
        entry = (version, {})
        _WEIGHTS[weight] = entry
    if key not in entry[1]:
        entry[1][key] = weight_quant(weight, m.name, m.module_type, cfg)
    return entry[1][key]


_MEASUREMENTS: dict[tuple, Measurements | None] = {}


def _measurements(cfg: FP8Config) -> Measurements | None:
    """The config's measurement files, read once per version of the files (every graph of a
    model, prefill and decode, needs the same ones)."""
    rank, world = worker(cfg)
    stats = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else (str(p),)
                  for p in measurement_file_paths(cfg.dump_stats_path, cfg.observer.value, rank, world))
    key = (stats, cfg.needs_measurement)
    if key not in _MEASUREMENTS:
        if len(_MEASUREMENTS) > 8:
            _MEASUREMENTS.clear()
        _MEASUREMENTS[key] = load_measurements(cfg)
    return _MEASUREMENTS[key]


def _digest(cfg: FP8Config, quants: list[LinearQuant]) -> str:
    """Config, Linear scales and FP8 weights (attention-path scales are float constants in the
    graph's code, which the FX graph cache hashes already)."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    for q in quants:
        h.update(repr(q.scheme).encode())
        for t in (q.weight_scale, q.input_scale, q.weight):
            if t is not None:
                h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def _cache_pass(digest: str):
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class Fp8fxCacheKey(CustomGraphPass):
        """Changes nothing; its uuid() puts fp8fx's config and scales into the FX graph cache key."""

        def __call__(self, graph: fx.Graph) -> None:
            return None

        def uuid(self) -> str:
            return "fp8fx-" + digest

    return Fp8fxCacheKey()


def fp8fx_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None) -> Callable:
    """The ``fp8fx`` torch.compile backend (see the module docstring)."""
    opts = _options(options)
    cfg = resolve_config(opts.get("config"), "compile")
    check_supported(cfg)
    model = opts.get("model")
    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError(f"torch.compile option 'model' of backend 'fp8fx' must be an nn.Module, got "
                          f"{type(model).__name__}")
    cg = CapturedGraph.from_dynamo(gm, example_inputs, model)
    check_hp_dtype(cg.model, cfg)
    measure = cfg.mode is Mode.MEASURE or (cfg.mode is Mode.AUTO and not measurement_exists(cfg))
    if measure:
        return instrument(cg, measure_state(cg, cfg if cfg.mode is Mode.MEASURE else cfg.replace(mode="MEASURE")))
    if cfg.mode is not Mode.QUANTIZE:
        cfg = cfg.replace(mode="QUANTIZE")
    model = cg.model
    decisions = annotate(gm, find_matches(cg), cfg, model)  # the rule prepare/convert use
    meas = _measurements(cfg)
    plan = plan_attention(decisions, cfg, meas)  # attention-path scales first: a missing one raises
    if opts["keep_hp_weights"]:
        quants: list[LinearQuant] = []

        def quantize(weight: Tensor, m: Match) -> LinearQuant:
            scheme = cfg.scheme_for(m.name, m.module_type, m.experts)
            x_scale = input_scale(m.name, m.module_type, cfg, meas, weight.device) if scheme.static else None
            w_q, w_scale = cached_weight_quant(weight, m, cfg)
            quants.append(LinearQuant(w_q, w_scale, x_scale, scheme))
            return quants[-1]

        rewrite_linears_in_graph(cg, decisions, cfg, meas, quantize=quantize)
        sources = [cg.example_inputs[i] for i in _quantized_inputs(cg, decisions)]
        swap = None
    else:
        # the decided Linears become FP8 modules on the model (as fp8fx.convert does), so each
        # weight is held once, in FP8, and the high-precision ones are freed. Everything is
        # computed now (all-or-nothing) and this graph reads the new modules' own FP8 tensors;
        # the modules are swapped in when this graph first runs, after dynamo has built its guards
        # on the model as it is now. The next call fails those guards (float8 parameters, other
        # module attributes) and dynamo recompiles on the swapped modules, whose fp8fx.linear
        # calls need no rewrite.
        quants, sources = [], []
        swap = plan_linears(model, decisions, cfg, meas)
        if swap.done:
            rewrite_linears_in_graph(cg, decisions, cfg, meas, oriented=True,
                                     quantize=lambda _w, m: quants.append(swap.quant(m)) or quants[-1])
    rewrite_attention_in_graph(gm, decisions, plan)
    cg.example_inputs.clear()
    if cfg.target.value in ("gaudi2", "gaudi3"):
        from ..numerics import fp8_max
        from .hpu import lower_to_hpu

        lower_to_hpu(gm, e4m3_max=fp8_max(torch.float8_e4m3fn, cfg.target.value))  # 240 on Gaudi2, not a guess
        return _swap_on_first_run(_bound_to_parameters(gm, example_inputs, sources), swap)
    from .cuda_attention import lower_attention_for_cuda

    lower_attention_for_cuda(gm)  # CUDA nodes only: FP8 GEMMs for fp8fx.matmul, reasons in node.meta
    if not opts["inductor"]:
        return _swap_on_first_run(_bound_to_parameters(gm, example_inputs, sources), swap)
    from torch._inductor.compile_fx import compile_fx

    from .inductor import register_lowering

    register_lowering()
    from .cpu_attention import lower_cpu_attention

    lower_cpu_attention(gm)  # fp8fx::sdpa on CPU tensors: FP8 codes into Inductor's GEMMs/reductions
    compiled = compile_fx(gm, example_inputs,
                          config_patches={"post_grad_custom_post_pass": _cache_pass(_digest(cfg, quants))})
    return _swap_on_first_run(_bound_to_parameters(compiled, example_inputs, sources), swap)


def _swap_on_first_run(fn: Callable, swap) -> Callable:  # noqa: ANN001 (a LinearSwap or None)
    """``fn``, swapping ``swap``'s FP8 modules into the model when it first runs."""
    if swap is None or not swap.done:
        return fn
    pending = [swap]

    def run(*args: Any) -> Any:
        if pending:
            pending.pop().apply()
        return fn(*args)

    return run


def _quantized_inputs(cg: CapturedGraph, decisions: list) -> list[int]:
    """Positions of the graph inputs that are weights cast to FP8 graph constants."""
    weights = {d.match.weight for d in decisions if d.quantize and d.match.weight is not None}
    placeholders = [n.name for n in cg.gm.graph.nodes if n.op == "placeholder"]
    return [i for i, name in enumerate(placeholders) if cg.param_names.get(name) in weights]


def _bound_to_parameters(fn: Callable, example_inputs: list[Any], sources: list[Tensor]) -> Callable:
    """Refuse to run a QUANTIZE graph on parameters other than the ones it was built from, or on
    weights that changed since they were cast.

    The graph holds FP8 copies of ``sources``, but dynamo guards parameters by shape and dtype
    only (and matches backends by object id), so it can serve this graph to another instance of
    the same model class, or after ``load_state_dict``/an optimizer step changed the weights in
    place: that would silently compute with the old FP8 weights (and the new biases).
    """
    checks = [(i, weakref.ref(t)) for i, t in enumerate(example_inputs)
              if isinstance(t, nn.Parameter)]
    versions = [(weakref.ref(t), t._version) for t in sources]

    def run(*args: Any) -> Any:
        for i, ref in checks:
            if args[i] is not ref():
                raise QuantizationError(
                    "dynamo reused an fp8fx QUANTIZE graph for different parameters (another model "
                    "instance of the same class): its FP8 weights belong to the first model. Call "
                    "torch._dynamo.reset() before compiling the other model.")
        for ref, version in versions:
            t = ref()
            if t is not None and t._version != version:
                raise QuantizationError(
                    "a weight that the fp8fx QUANTIZE graph cast to FP8 was changed in place since "
                    "(load_state_dict, an optimizer step, copy_): the graph still holds the old FP8 "
                    "weights. Call torch._dynamo.reset() and call the compiled model again to recast, "
                    "or compile without keep_hp_weights so the FP8 weights live on the model.")
        return fn(*args)

    return run
