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
placeholders back to the model's qualified parameter names *by identity* (the tensor objects
against ``model.named_parameters()``), which is how the matcher tells ``linear(x, weight)``
from a matmul between two activations; :class:`ModuleNames` names each node's owning module
from the model's own ``named_modules()``. Dynamo's source strings (``L['self']._modules[...]``)
are never parsed: their form changes between torch and transformers releases.
"""

from __future__ import annotations

import functools
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from .errors import CaptureError, Fp8fxError

__all__ = ["CapturedGraph", "CompiledForward", "ModuleNames", "capture", "find_root"]


def _type_key(typ: Any) -> str:
    """A class as ``module.qualname`` (dynamo records the class object; older releases a string)."""
    if isinstance(typ, type):
        return f"{typ.__module__}.{typ.__qualname__}"
    return str(typ)


def _type_name(typ: Any) -> str:
    return typ.__name__ if isinstance(typ, type) else str(typ).rsplit(".", 1)[-1]


class ModuleNames:
    """Qualified names of a root module's submodules and parameters, by identity.

    Parameters and buffers are named through ``root.named_parameters()`` / ``named_buffers()``
    by object identity. A node's owning module comes from ``node.meta["nn_module_stack"]``,
    whose entries are a path in dynamo's own notation (it changes between releases: ``L['self']``,
    ``L['args'][0]``, ``L['fn'].__self__``, ...) and the module's class. An entry resolves to
    the submodule of ``root`` *of exactly that class* whose qualified name (from
    ``root.named_modules()``) ends the path: dynamo's prefix for the root is never parsed, and a
    name is only ever one the model itself gives.
    """

    def __init__(self, root: torch.nn.Module) -> None:
        self.root = root
        self.tensors: dict[int, str] = {}
        for name, t in root.named_buffers(remove_duplicate=False):
            self.tensors.setdefault(id(t), name)
        for name, t in root.named_parameters(remove_duplicate=False):
            self.tensors[id(t)] = name  # a tied parameter: its last name, as before
        self._by_type: dict[str, list[str]] = {}
        for name, mod in root.named_modules(remove_duplicate=False):
            self._by_type.setdefault(_type_key(type(mod)), []).append(name)
        self._resolved: dict[tuple[str, str], str | None] = {}

    def owns(self, t: Any) -> bool:
        return id(t) in self.tensors

    def entry(self, raw: str, typ: Any) -> str | None:
        """The qualified name of the module an ``nn_module_stack`` entry stands for, or None
        when no submodule of the root has that class and a name ending the path."""
        key = (str(raw), _type_key(typ))
        if key not in self._resolved:
            names = [n for n in self._by_type.get(key[1], ()) if n and key[0].endswith("." + n)]
            if names:
                self._resolved[key] = max(names, key=len)
            elif "" in self._by_type.get(key[1], ()):
                self._resolved[key] = ""  # the root itself
            else:
                self._resolved[key] = None
        return self._resolved[key]

    def owner(self, node: fx.Node) -> tuple[str, str]:
        """(qualified module path, class name) of the innermost module that owns ``node``;
        ``("", "")`` for nodes of the root's own forward. A module called without being a
        submodule of the root (a module held in a global, say) is named after its nearest
        enclosing submodule."""
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return "", ""
        entries = list(stack.values())
        type_name = _type_name(entries[-1][1])
        for raw, typ in reversed(entries):
            name = self.entry(raw, typ)
            if name is not None:
                return name, type_name
        return "", type_name


def _modules_in(value: Any) -> list[torch.nn.Module]:
    """Modules held by a frame local: itself, or the items of a tuple/list/dict (``*args``)."""
    if isinstance(value, torch.nn.Module):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return [v for v in items if isinstance(v, torch.nn.Module)]


def find_root(example_inputs: list[Any]) -> torch.nn.Module | None:
    """The module whose graph dynamo is handing a backend, found by identity.

    Candidates, in order: the module a ``torch.compile(module)`` wrapper compiled (an
    ``OptimizedModule`` on the call stack), the modules among the locals of the frame dynamo
    is compiling (``self``, ``args[0]``), then modules in the callers' locals, nearest first.
    The first whose parameters include every parameter the graph takes wins; names are then
    relative to it, as for ``fp8fx.prepare(that_module)``.
    """
    params = [t for t in example_inputs if isinstance(t, torch.nn.Parameter)]
    candidates: list[torch.nn.Module] = []
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    from torch._dynamo.eval_frame import OptimizedModule


    for f in frames:
        obj = f.f_locals.get("self")
        if isinstance(obj, OptimizedModule):
            candidates.append(obj._orig_mod)
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        for value in tx.f_locals.values():
            candidates.extend(_modules_in(value))
    except Exception:  # noqa: BLE001 (not inside dynamo's tracing: the stack alone decides)
        pass
    for f in frames:
        for value in f.f_locals.values():
            candidates.extend(_modules_in(value))
    seen: set[int] = set()
    for mod in candidates:
        mod = getattr(mod, "_orig_mod", mod)
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        if not params:
            return mod
        owned = {id(p) for _, p in mod.named_parameters(remove_duplicate=False)}
        if all(id(p) in owned for p in params):
            return mod
    return None


@dataclass
class CapturedGraph:
    """One dynamo graph, the module it was captured from, and what its placeholders are."""

    gm: fx.GraphModule
    example_inputs: list[Any]
    names: ModuleNames
    # placeholder node name -> qualified parameter/buffer name in the user's model
    param_names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dynamo(cls, gm: fx.GraphModule, example_inputs: list[Any],
                    model: torch.nn.Module | None = None) -> "CapturedGraph":
        """Map placeholders to parameter names by identity with ``model``'s parameters. Without
        ``model`` (a torch.compile backend) the module is found on the call stack
        (:func:`find_root`)."""
        if model is None:
            model = find_root(example_inputs)
            if model is None:
                raise CaptureError(
                    "the fp8fx backend could not tell which module this graph belongs to: none of the "
                    "modules on the call stack owns all of its parameters. Compile the module itself "
                    "(torch.compile(model, backend='fp8fx')) or name it: "
                    "torch.compile(fn, backend='fp8fx', options={'model': model, ...})")
        names = ModuleNames(model)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        param_names = {node.name: names.tensors[id(value)] for node, value in zip(placeholders, example_inputs)
                       if isinstance(value, torch.Tensor) and names.owns(value)}
        return cls(gm=gm, example_inputs=list(example_inputs), names=names, param_names=param_names)

    @property
    def model(self) -> torch.nn.Module:
        return self.names.root

    def module_path_of(self, node: fx.Node) -> tuple[str, str]:
        """(qualified module path, class name) of the innermost module that owns ``node``."""
        return self.names.owner(node)

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


def _where(exc: BaseException) -> str:
    """``file:line in function`` of the user's code where dynamo stopped (its recorded stack)."""
    stack = getattr(exc, "real_stack", None) or ()
    frames = [f for f in stack if getattr(f, "filename", "") != __file__]
    if not frames:
        return ""
    f = frames[-1]
    line = (getattr(f, "line", "") or "").strip()
    return f" at {f.filename}:{f.lineno} in {f.name}" + (f" ({line})" if line else "")


def _capture_error(model: torch.nn.Module, exc: BaseException, args: tuple, kwargs: dict,
                   forward: Callable | None = None) -> CaptureError:
    """What to tell the user when dynamo could not capture a call. The forward is run once
    without dynamo: when it fails there too, the model rejects these inputs (its own exception
    is reported, and chained by the caller); otherwise it is a graph break, named with where."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    call = f"{type(model).__name__}.forward{_describe_call(args, kwargs)}"
    own: BaseException | None = None
    if forward is not None:
        try:
            with torch.no_grad():
                forward(*args, **kwargs)
        except Exception as eager_exc:  # noqa: BLE001 (the model's own failure, reported below)
            own = eager_exc
    if own is not None or type(exc).__name__ == "TorchRuntimeError":
        reason = f"{type(own).__name__}: {own}" if own is not None else " ".join(
            ln.strip() for ln in text.splitlines()[:2] if ln.strip())
        err = CaptureError(
            f"{call} fails on these inputs{'' if own is not None else ' while being traced'}: {reason}\n"
            "Check that the inputs (example inputs, or the first call) are ones the model accepts "
            "when run without fp8fx.")
        err.__cause__ = own
        return err
    return CaptureError(
        f"could not capture {call} into one FX graph: {type(exc).__name__}: {first}{_where(exc)}\n"
        "fp8fx needs the whole forward in one graph so that every Linear/matmul/softmax/SDPA is "
        "seen and named the same way in every call. Fix this graph break (see "
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
        raise _capture_error(model, exc, args, kwargs, forward) from exc
    # dynamo may keep this backend (and so this list) alive in its caches: hand the graphs to
    # the caller and leave the list empty, so that no parameter outlives the caller's use of it
    result = list(graphs)
    graphs.clear()
    if not result:
        raise CaptureError(
            f"dynamo produced no graph for {type(model).__name__}.forward{_describe_call(args, kwargs)}: "
            "the call ran without being traced (is torch.compile disabled, or was the recompile "
            "limit reached?). Set TORCH_LOGS=recompiles to see why."
        )
    return result


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
            if self._compiled is None:
                raise Fp8fxError(f"this fp8fx forward of {type(model).__name__} was uninstalled (the model "
                                 "was converted or reset); call the model itself, not a saved forward")
            try:
                out = self._compiled(*args, **kwargs)
            except CaptureError:
                raise
            except Exception as exc:
                own = _fp8fx_cause(exc)
                if own is not None:  # our pass refused the graph: say why, not "could not capture"
                    raise own from exc
                if type(exc).__module__.startswith("torch._dynamo"):
                    raise _capture_error(model, exc, args, kwargs, self._original) from exc
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
        """Give the model its own forward back and drop every graph and dynamo cache entry this
        forward made: a graph's example inputs are the model's parameters, so keeping them would
        keep high-precision weights alive after ``convert`` replaced them."""
        if self.model.__dict__.get("forward") is self.forward:
            if self._had_forward_attr:
                self.model.forward = self._original
            else:
                del self.model.forward
        for cg in self.graphs:
            cg.example_inputs.clear()
        self.graphs.clear()
        self._compiled = None  # the private code object, and dynamo's cache on it, go with it
