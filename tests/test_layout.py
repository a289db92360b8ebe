"""The package layout keeps its promises: the core never imports its users, and no two core modules import each
other (directly or through others), even lazily inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "tinker_jax"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _core_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(CORE.rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every module of `known` that `path` imports anywhere (module level or inside functions)."""
    out: set[str] = set()
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names]
            # `from pkg import sub` depends on the submodule; on the package only for names that are not modules
            names = [n for n in subs if n in known] + ([base] if any(n not in known for n in subs) else [])
        else:
            continue
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n != me:
                out.add(n)
    return out


def test_core_never_imports_server_or_benchmarks():
    modules = sorted(m for m in _core_modules() if m != "tinker_jax.sampling.vllm_backend")  # needs vllm? no: lazy
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('server', 'benchmarks'))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"core modules pulled in their users: {out.stdout.strip()}"
    for path in CORE.rglob("*.py"):  # lazy imports too, which the import above would not run
        text = path.read_text()
        for user in ("server", "benchmarks"):
            assert f"from {user}" not in text and f"import {user}" not in text, f"{path} imports {user}"


def test_no_import_cycles_in_the_core():
    mods = _core_modules()
    known = set(mods)
    graph = {m: _imports(p, known) for m, p in mods.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle worth reporting.
    for m in graph:
        graph[m] = {d for d in graph[m] if not (d.startswith(m + ".") and m in known and mods[m].name == "__init__.py")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
