"""The pure core imports no I/O; nothing imports app or cli (STYLE.md)."""

from __future__ import annotations

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[2] / "gateway"
PURE = {"config", "routing", "errors", "frames", "http1", "session", "auth"}
IO_LIBS = {"asyncio", "aiohttp", "redis", "uvloop", "socket"}


def imports(module: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names |= {(node.module or "").split(".")[0]} | {a.name for a in node.names if not node.module}
            else:
                names.add((node.module or "").split(".")[0])
    return names


def test_pure_modules_do_no_io():
    for name in PURE:
        path = PKG / f"{name}.py"
        if path.exists():
            bad = imports(path) & IO_LIBS
            # config resolves the node id (hostname) but opens no sockets;
            # frames borrows aiohttp's C XOR-mask helper, a pure function.
            if name == "config":
                bad -= {"socket"}
            if name == "frames":
                bad -= {"aiohttp"}
            assert not bad, f"gateway/{name}.py imports {bad}"


def test_nothing_imports_app_or_cli():
    for path in PKG.glob("*.py"):
        if path.stem in ("app", "cli", "__main__"):
            continue
        assert not imports(path) & {"app", "cli"}, f"{path.name} imports app or cli"
