"""House rules of the package layout, checked on the source with ``ast`` (nothing is imported).

* ``fp8fx.backends.dynamo`` never imports ``fp8fx.api`` (what both need is in ``fp8fx.state``);
* no import cycle among fp8fx modules at module level;
* user-facing checks raise fp8fx errors: no ``raise`` of a builtin exception class and no
  ``assert`` in the package, except the few protocol cases allowed below.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "fp8fx"
FILES = sorted(PKG.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in FILES}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(name: str, node: ast.ImportFrom) -> str:
    """The absolute module of ``from <node.module> import ...`` written in module ``name``."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if _is_package(name) else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, nodes: list[ast.stmt] | ast.AST) -> set[str]:
    """fp8fx modules imported by the import statements among ``nodes`` (with their parent
    packages, whose ``__init__`` runs first)."""
    out: set[str] = set()
    for node in nodes:
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, node)
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]  # from pkg import submodule
        for t in targets:
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                if ".".join(parts[:i]) in MODULES:
                    out.add(".".join(parts[:i]))
    out.discard(name)
    return out


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    """Statements run at import time: the module body and its if/try/with blocks, not the
    bodies of functions or classes' methods (``if TYPE_CHECKING:`` blocks excluded)."""
    out: list[ast.stmt] = []
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        out.append(node)
        for field in ("body", "orelse", "finalbody", "handlers"):
            todo.extend(getattr(node, field, []))
    return out


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_dynamo_backend_never_imports_api() -> None:
    name = "fp8fx.backends.dynamo"
    tree = _tree(MODULES[name])
    every = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]  # lazy ones too
    bad = [f"{MODULES[name].name}:{n.lineno}: {ast.unparse(n)}" for n in every if "fp8fx.api" in _imports(name, [n])]
    assert not bad, "fp8fx/backends/dynamo.py imports fp8fx.api (use fp8fx.state): " + "; ".join(bad)


def test_api_does_not_import_the_dynamo_backend_at_module_level() -> None:
    assert "fp8fx.backends.dynamo" not in _imports("fp8fx.api", _module_level(_tree(MODULES["fp8fx.api"])))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}   # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_no_module_level_import_cycle() -> None:
    graph = {name: _imports(name, _module_level(_tree(path))) for name, path in MODULES.items()}
    # a submodule's edge to its own parent package (whose __init__ runs first) is not a cycle
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    cycles = _cycles(graph)
    assert not cycles, "module-level import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_import_graph_sees_imports_and_cycles() -> None:
    """The checks above are not vacuous: relative imports resolve, and a cycle is found."""
    deps = _imports("fp8fx.api", _module_level(_tree(MODULES["fp8fx.api"])))
    assert {"fp8fx.state", "fp8fx.capture", "fp8fx.passes.match"} <= deps
    assert "fp8fx.state" in _imports("fp8fx.backends.dynamo", _module_level(_tree(MODULES["fp8fx.backends.dynamo"])))
    lazy = ast.parse("def f():\n    from ..api import prepare\n")
    assert _imports("fp8fx.backends.dynamo", _module_level(lazy)) == set()
    assert _imports("fp8fx.backends.dynamo", list(ast.walk(lazy))) == {"fp8fx", "fp8fx.api"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# ------------------------------------------------------------------------------ error kinds
_BUILTIN_EXCEPTIONS = {n for n, v in vars(builtins).items()
                       if isinstance(v, type) and issubclass(v, Exception)}

# (file relative to fp8fx/, builtin class): the only builtin raises allowed, each for a protocol
# that requires that very class.
ALLOWED = {
    # PEP 562 module __getattr__: hasattr()/getattr(default) and `from fp8fx import x` rely on
    # AttributeError for an unknown name.
    ("__init__.py", "AttributeError"),
    # fp8fx.testing.assert_close / assert_* helpers, called in users' tests: a failed check must
    # be an AssertionError so that pytest and unittest report it as a test failure.
    ("testing.py", "AssertionError"),
}


def _raised_builtin(node: ast.Raise) -> str | None:
    exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
    if isinstance(exc, ast.Attribute) and isinstance(exc.value, ast.Name) and exc.value.id == "builtins":
        exc = ast.Name(exc.attr)
    if isinstance(exc, ast.Name) and exc.id in _BUILTIN_EXCEPTIONS:
        return exc.id
    return None


def _builtin_raises() -> list[str]:
    found = []
    for path in FILES:
        rel = path.relative_to(PKG).as_posix()
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Raise) and node.exc is not None:
                name = _raised_builtin(node)
                if name is not None and (rel, name) not in ALLOWED:
                    found.append(f"fp8fx/{rel}:{node.lineno}: raise {name}")
            elif isinstance(node, ast.Assert):
                found.append(f"fp8fx/{rel}:{node.lineno}: assert")
    return found


def test_every_raise_is_an_fp8fx_error() -> None:
    found = _builtin_raises()
    assert not found, ("raise an fp8fx error (fp8fx.errors) that names what, where and what to do "
                       "instead of:\n  " + "\n  ".join(found))


def test_allowed_builtin_raises_still_exist() -> None:
    """An allow-list entry whose raise is gone is removed, not kept "just in case"."""
    seen = set()
    for rel, name in ALLOWED:
        for node in ast.walk(_tree(PKG / rel)):
            if isinstance(node, ast.Raise) and node.exc is not None and _raised_builtin(node) == name:
                seen.add((rel, name))
    assert seen == ALLOWED


@pytest.mark.parametrize("source", ["raise ValueError('x')", "raise TypeError", "raise builtins.KeyError(1)",
                                    "assert x, 'y'"])
def test_the_raise_scan_sees_builtin_raises(source) -> None:
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.Assert) or _raised_builtin(node) is not None


def test_every_error_class_is_exported() -> None:
    import fp8fx
    from fp8fx import errors

    classes = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, errors.Fp8fxError)}
    assert classes == set(errors.__all__)
    for n in classes:
        assert fp8fx._EXPORTS.get(n) == "errors" and getattr(fp8fx, n) is getattr(errors, n)
