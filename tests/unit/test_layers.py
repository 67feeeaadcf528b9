"""The layers stay honest (STYLE.md): the pure core imports no I/O, nothing
imports app or cli, and no gateway module imports another in a circle."""

from __future__ import annotations

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[2] / "gateway"
PURE = {"config", "routing", "errors", "frames", "http1", "session", "auth", "dispatch", "channels",
        "records", "paths", "tokens", "redact", "trace", "reliable"}
IO_LIBS = {"asyncio", "aiohttp", "redis", "uvloop", "socket"}
# Exceptions, each with its reason.
ALLOWED_IO = {
    "config": {"socket"},   # resolves the node id (hostname) but opens no sockets
    "frames": {"aiohttp"},  # borrows aiohttp's C XOR-mask helper, a pure function
}


def modules() -> dict[str, pathlib.Path]:
    """Dotted name below the package ('store.redis') -> file."""
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _import_nodes(tree: ast.AST):
    """Every import, at any depth (a function-level import is still a dependency),
    except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def external_imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in _import_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif not node.level:
            names.add((node.module or "").split(".")[0])
    return names


def internal_imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Gateway modules that `name` imports, as dotted names below the package."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    out = set()
    for node in _import_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module is None:
                candidates = {".".join(base + [a.name]) for a in node.names}
            else:
                candidates = {target} | {f"{target}.{a.name}" for a in node.names}
            out |= {c.lstrip(".") for c in candidates if c.lstrip(".") in known}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gateway"):
            target = node.module.removeprefix("gateway").lstrip(".")
            out |= {c for c in {target} | {f"{target}.{a.name}".lstrip(".") for a in node.names} if c in known}
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("gateway.") for a in node.names
                    if a.name.startswith("gateway.") and a.name.removeprefix("gateway.") in known}
    out.discard(name)
    out.discard("")
    return out


def test_pure_modules_do_no_io():
    mods = modules()
    for name in PURE:
        assert name in mods, f"gateway/{name}.py is listed as pure but does not exist"
        bad = external_imports(mods[name]) & IO_LIBS
        bad -= ALLOWED_IO.get(name, set())
        assert not bad, f"gateway/{name}.py imports {bad}"


def test_pure_modules_import_only_pure_modules():
    mods = modules()
    for name in PURE:
        impure = internal_imports(name, mods[name], set(mods)) - PURE
        assert not impure, f"gateway/{name}.py (pure) imports I/O modules {impure}"


def test_nothing_imports_app_or_cli():
    mods = modules()
    for name, path in mods.items():
        if name in ("app", "cli", "__main__"):
            continue
        assert not internal_imports(name, path, set(mods)) & {"app", "cli"}, f"{name} imports app or cli"


def test_no_module_imports_in_a_circle():
    mods = modules()
    known = set(mods)
    graph = {name: internal_imports(name, path, known) for name, path in mods.items()}
    # A package's __init__ re-exporting its submodules is not a cycle of design.
    for name in list(graph):
        graph[name] = {d for d in graph[name] if not (d and name.startswith(d + "."))}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(trail[trail.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_cycle(tmp_path):
    # The cycle check itself can fail: two files importing each other are found.
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import y\n")
    known = {"a", "b"}
    assert internal_imports("a", tmp_path / "a.py", known) == {"b"}
    assert internal_imports("b", tmp_path / "b.py", known) == {"a"}
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import z\n")
    assert internal_imports("c", tmp_path / "c.py", known | {"c"}) == set()


def test_every_exception_lives_in_errors():
    """One exception tree (STYLE.md): a class deriving from an exception is defined in errors.py."""
    import builtins

    tree = ast.parse((PKG / "errors.py").read_text())
    ours = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    builtin_errors = {name for name, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
    for name, path in modules().items():
        if name == "errors":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                assert not bases & (ours | builtin_errors), \
                    f"gateway/{path.relative_to(PKG)}: class {node.name} is an exception; define it in errors.py"
