"""The layout reads as the method (issue 24 §4): one subpackage per step, imports one way.

Every import between ctxaware modules (module-level and function-local, parsed from the source) goes
from a later step to an earlier one or within a step, never up; the module graph has no cycle; only the
entry points (cli, demo, experiment) sit at the top and import across the steps."""

from __future__ import annotations

import ast
from pathlib import Path

import ctxaware

PKG = Path(ctxaware.__file__).parent
# the steps, earliest first (docs/architecture.md)
STEPS = ["core", "rendering", "data", "attention", "scoring", "training", "evaluation", "reporting"]
ENTRY_POINTS = {"ctxaware.cli", "ctxaware.demo", "ctxaware.experiment"}
COMMANDS = "ctxaware.commands"  # one thin module per CLI command, above everything; only cli imports them


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(f: Path, modules: dict[str, Path]) -> set[str]:
    deps = set()
    for node in ast.walk(ast.parse(f.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctxaware"):
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("ctxaware")]
        for n in names:  # the deepest name that is a module: `from ctxaware.core import stats` -> core.stats
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n:
                deps.add(n)
    return deps


def _step(module: str) -> int | None:
    parts = module.split(".")
    return STEPS.index(parts[1]) if len(parts) > 1 and parts[1] in STEPS else None


def test_every_module_lives_in_a_step_or_is_an_entry_point():
    top = {m for m in _modules() if m.count(".") == 1 and _step(m) is None} - {COMMANDS}
    assert top == ENTRY_POINTS, f"flat modules outside the steps: {sorted(top - ENTRY_POINTS)}"


def test_one_thin_command_module_per_cli_command():
    """Issue 24 section 4: every CLI command is its own module in ctxaware.commands, imported by cli alone;
    the steps hold no command-line code (no ``main``)."""
    from ctxaware.cli import COMMANDS as CLI

    modules = _modules()
    assert {mod for mod, _ in CLI.values()} == {m for m in modules if m.startswith(COMMANDS + ".")}
    for m, f in modules.items():
        tree = ast.parse(f.read_text())
        has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
        assert has_main == (m.startswith(COMMANDS + ".") or m == "ctxaware.cli"), m
        if m != "ctxaware.cli" and not m.startswith(COMMANDS):
            assert not {d for d in _imports(f, modules) if d.startswith(COMMANDS)}, f"{m} imports a command"


def test_imports_run_one_way_and_without_cycles():
    modules = _modules()
    graph = {m: _imports(f, modules) - {m} for m, f in modules.items()}
    up = []
    for m, deps in graph.items():
        for d in deps:
            if d == "ctxaware":  # the package itself: __version__
                continue
            if d in ENTRY_POINTS and m not in ENTRY_POINTS and not m.startswith(COMMANDS):
                up.append(f"{m} -> {d} (an entry point)")
            elif _step(m) is not None and _step(d) is not None and _step(d) > _step(m):
                up.append(f"{m} ({STEPS[_step(m)]}) -> {d} ({STEPS[_step(d)]})")
    assert not up, "imports that point up the method:\n" + "\n".join(sorted(up))
    # the graph is consistent with the check: real edges exist (a walker that sees nothing would pass)
    assert "ctxaware.data.needle" in graph["ctxaware.evaluation.nih"]
    assert "ctxaware.attention.intercept" in graph["ctxaware.scoring.score"]
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d == "ctxaware" or d not in graph:
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d) :] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
