"""Capture: a module call becomes an FX GraphModule whose nodes know their owning module.

fp8fx captures with TorchDynamo, not ``torch.export``. Why:

* ``prepare``/``convert`` must keep the user's model usable as it is: ``generate()`` calls
  ``forward`` with changing keyword arguments and cache objects (prefill, then decode).
  Dynamo guards handle every signature and re-captures when one changes; ``torch.export``
  gives one signature per export.
* ``torch.compile(model, backend="fp8fx")`` hands the backend exactly these graphs, so the
  eager entry points and the compile entry point run the same passes on the same graphs.

Two ways of capturing are used:

* :func:`capture` traces one call and stops before running it (the compiled callable raises a
  private sentinel that is caught here). It is used to *look* at a model (``explain``,
  ``convert`` of a plain model) without computing anything.
* :class:`CompiledForward` replaces ``model.forward`` by a dynamo-compiled forward whose
  backend is a callable of ours (``prepare`` uses it to run calibration through graphs with
  observer nodes). It counts the graphs that actually ran, so a call that dynamo silently
  ran without our backend (a recompile limit, a disabled frame) is detected and reported
  instead of calibrating nothing.

Dynamo hands the backend the parameters as graph inputs. :class:`CapturedGraph` maps those
placeholders back to the model's qualified parameter names, which is how the matcher tells
``linear(x, weight)`` from a matmul between two activations.
"""

from __future__ import annotations

import functools
import re
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from .errors import CaptureError, Fp8fxError

__all__ = ["CapturedGraph", "CompiledForward", "capture", "module_path_of", "normalize_module_path"]


# the root module as dynamo names it: L['self'] (a compiled bound forward) or
# L['fn'].__self__ (the bound forward seen through fp8fx's trampoline)
_SELF_PREFIX = re.compile(r"^L\['[^']+'\](?:\.__self__)?")
_INDEX = re.compile(r"\[(\d+)\]")
_QUOTED = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\['([^']+)'\]")


def normalize_module_path(raw: str) -> str:
    """``"L['self'].model.layers[0].mlp"`` -> ``"model.layers.0.mlp"`` (the names INC files use)."""
    path = _SELF_PREFIX.sub("", raw)
    path = _QUOTED.sub(lambda m: "." + (m.group(1) or m.group(2)), path)
    path = _INDEX.sub(lambda m: "." + m.group(1), path)
    return path.strip(".")


def module_path_of(node: fx.Node) -> tuple[str, str]:
    """(qualified module path, module class name) of the innermost module that owns ``node``.

    Nodes traced outside any submodule (directly in the root's forward) get ``("", "")``.
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    raw, typ = list(stack.values())[-1]
    type_name = typ.__name__ if isinstance(typ, type) else str(typ).rsplit(".", 1)[-1]
    return normalize_module_path(str(raw)), type_name


@dataclass
class CapturedGraph:
    """One dynamo graph and what its placeholders are."""

    gm: fx.GraphModule
    example_inputs: list[Any]
    # placeholder node name -> qualified parameter/buffer name in the user's model
    param_names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dynamo(cls, gm: fx.GraphModule, example_inputs: list[Any],
                    model: torch.nn.Module | None = None) -> "CapturedGraph":
        """Map placeholders to parameter names: by identity with ``model``'s parameters, or, when
        the model is unknown (a torch.compile backend), from the source dynamo recorded for each
        ``nn.Parameter`` input (``L['self']._modules['fc']._parameters['weight']`` -> ``fc.weight``)."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        names: dict[str, str] = {}
        if model is not None:
            by_id = {id(t): n for n, t in model.named_parameters(remove_duplicate=False)}
            by_id.update({id(t): n for n, t in model.named_buffers(remove_duplicate=False) if id(t) not in by_id})
            for node, value in zip(placeholders, example_inputs):
                if isinstance(value, torch.Tensor) and id(value) in by_id:
                    names[node.name] = by_id[id(value)]
        else:
            for node, value in zip(placeholders, example_inputs):
                arg = node.meta.get("grapharg")
                source = getattr(getattr(arg, "source", None), "name", None)
                if isinstance(value, torch.nn.Parameter) and callable(source):  # older torch: a method
                    source = source()
                if isinstance(value, torch.nn.Parameter) and isinstance(source, str):
                    names[node.name] = normalize_module_path(source)
        return cls(gm=gm, example_inputs=list(example_inputs), param_names=names)

    def param_name(self, node: Any) -> str | None:
        """Qualified parameter name when ``node`` is a model parameter, else None."""
        if not isinstance(node, fx.Node):
            return None
        if node.op == "placeholder":
            return self.param_names.get(node.name)
        if node.op == "get_attr":
            return str(node.target)
        return None


def _fresh_entry(fn: Callable) -> Callable:
    """A trampoline to ``fn`` with a code object of its own.

    Dynamo keeps its compiled graphs on the code object of the frame it compiles. Every model
    of one class shares ``forward``'s code object, so without this, prepare/convert of a few
    models of the same class in one process would exhaust dynamo's recompile limit (and
    compete for one cache). A private code object per capture gives each its own cache,
    released with the trampoline.
    """

    def trampoline(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    code = trampoline.__code__.replace()
    return types.FunctionType(code, trampoline.__globals__, "fp8fx_forward", None, trampoline.__closure__)


class _Captured(Exception):
    """Private sentinel: raised by the compiled callable so that capture runs nothing."""


def _fp8fx_cause(exc: BaseException) -> BaseException | None:
    """The fp8fx error that dynamo wrapped (a backend failure), if any."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, Fp8fxError):
            return exc
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
        seen += 1
    return None


def _describe_call(args: tuple, kwargs: dict) -> str:
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"Tensor{tuple(v.shape)}:{str(v.dtype).replace('torch.', '')}"
        return type(v).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def _capture_error(model: torch.nn.Module, exc: BaseException, args: tuple, kwargs: dict) -> CaptureError:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if type(exc).__name__ == "TorchRuntimeError":  # the model's own code fails on these inputs
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        reason = " ".join(lines[:2]) if lines else type(exc).__name__
        return CaptureError(
            f"{type(model).__name__}.forward{_describe_call(args, kwargs)} fails on these inputs "
            f"while being traced: {reason}\nCheck that the inputs (example "
            "inputs, or the first call) are ones the model accepts when run without fp8fx.")
    return CaptureError(
        f"could not capture {type(model).__name__}.forward{_describe_call(args, kwargs)} into one "
        f"FX graph: {type(exc).__name__}: {first}\n"
        "fp8fx needs the whole forward in one graph so that every Linear/matmul/softmax/SDPA is "
        "seen and named the same way in every call. Fix the graph break named above (see "
        "torch._dynamo.explain(model)(...) for the full list), or quantize a submodule that "
        "captures as one graph."
    )


def capture(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    dynamic: bool = True,
    forward: Callable | None = None,
) -> list[CapturedGraph]:
    """Trace ``model(*args, **kwargs)`` with dynamo and return its graph without running it.

    The forward must capture as one graph: a graph break raises :class:`CaptureError` naming it.
    ``forward`` overrides the function traced (default ``model.forward``).
    """
    kwargs = kwargs or {}
    graphs: list[CapturedGraph] = []

    def backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        graphs.append(CapturedGraph.from_dynamo(gm, example_inputs, model))

        def stop(*_: Any) -> Any:
            raise _Captured()

        return stop

    forward = forward if forward is not None else model.forward
    compiled = torch.compile(_fresh_entry(forward), backend=backend, dynamic=dynamic, fullgraph=True)
    try:
        with torch.no_grad():
            compiled(*args, **kwargs)
    except _Captured:
        pass
    except Exception as exc:  # dynamo wraps a graph break in its own exception types
        if isinstance(exc, CaptureError):
            raise
        raise _capture_error(model, exc, args, kwargs) from exc
    if not graphs:
        raise CaptureError(
            f"dynamo produced no graph for {type(model).__name__}.forward{_describe_call(args, kwargs)}: "
            "the call ran without being traced (is torch.compile disabled, or was the recompile "
            "limit reached?). Set TORCH_LOGS=recompiles to see why."
        )
    return graphs


class CompiledForward:
    """Replaces ``model.forward`` by a dynamo-compiled forward that runs graphs through ``backend``.

    ``backend(captured: CapturedGraph) -> callable`` gets every graph dynamo produces (the first
    call, and each re-capture for a new signature) and returns what runs it. Every call checks
    that one of our graphs actually ran; otherwise dynamo fell back to plain Python (recompile
    limit, disabled frame) and the call raises :class:`CaptureError` instead of silently doing
    nothing.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        backend: Callable[[CapturedGraph], Callable],
        *,
        dynamic: bool = True,
    ) -> None:
        self.model = model
        self.graphs: list[CapturedGraph] = []
        self.runs = 0
        self._backend = backend
        self._had_forward_attr = "forward" in model.__dict__
        self._original = model.forward

        def dynamo_backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
            captured = CapturedGraph.from_dynamo(gm, example_inputs, model)
            self.graphs.append(captured)
            run = backend(captured)

            def counted(*inputs: Any) -> Any:
                self.runs += 1
                return run(*inputs)

            return counted

        self._compiled = torch.compile(_fresh_entry(self._original), backend=dynamo_backend,
                                       dynamic=dynamic, fullgraph=True)

        @functools.wraps(self._original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            before = self.runs
            try:
                out = self._compiled(*args, **kwargs)
            except CaptureError:
                raise
            except Exception as exc:
                own = _fp8fx_cause(exc)
                if own is not None:  # our pass refused the graph: say why, not "could not capture"
                    raise own from exc
                if type(exc).__module__.startswith("torch._dynamo"):
                    raise _capture_error(model, exc, args, kwargs) from exc
                raise
            if self.runs == before:
                raise CaptureError(
                    f"{type(model).__name__}.forward{_describe_call(args, kwargs)} ran without an "
                    "fp8fx graph (dynamo fell back to plain Python, e.g. its recompile limit was "
                    "reached), so nothing was observed. Set TORCH_LOGS=recompiles to see why; "
                    "raising torch._dynamo.config.recompile_limit usually fixes it."
                )
            return out

        # an outer torch.compile(model) would inline the original code and skip this backend
        # (observers, rewrites): it runs this forward as it is instead
        self.forward = torch.compiler.disable(forward)

    def install(self) -> None:
        self.model.forward = self.forward  # instance attribute shadows the class's forward

    def uninstall(self) -> None:
        if self.model.__dict__.get("forward") is self.forward:
            if self._had_forward_attr:
                self.model.forward = self._original
            else:
                del self.model.forward
