"""The dependency rule of ARCHITECTURE.md, checked on the source: every project module belongs to one layer and
imports (at any depth, lazy imports included) only modules of its own layer or the layers below, with no cycle.

A module missing from LAYERS fails the test: a new file has to be placed in a layer on purpose.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

# (layer number, name); a module's layer is given by the longest matching prefix in LAYER_OF.
LAYER_NAMES = {0: "models", 1: "helpers", 2: "building and formats", 3: "inference", 4: "public API", 5: "apps"}
LAYER_OF = {
    "models": 0,
    "utils": 1, "utils.errors": 1, "utils.defaults": 1, "utils.audio": 1, "utils.image": 1, "utils.video": 1,
    "utils.tokenizer": 1, "utils.checkpoint": 1,
    "utils.components": 2, "utils.loading": 2, "utils.export_format": 2, "utils.quant": 2, "utils.native_decode": 2,
    "utils.media": 1, "utils.transcript": 1, "utils.version": 1, "utils.fileio": 1,
    "utils.generation": 3, "utils.speech": 3, "utils.transcribe": 3, "utils.batching": 3, "utils.export_writer": 3,
    "utils.batch_job": 3,
    "omni": 4,
    "infer_chat": 5, "infer_safetensors": 5, "export": 5, "bench": 5, "serve": 5, "batch": 5, "tools": 5,
}
PACKAGES_SCANNED = ("models", "utils", "tools")
SKIP_DIRS = {"tests", "checkpoints", "examples", "__pycache__", ".venv", ".git"}


def project_modules() -> dict[str, Path]:
    mods = {p.stem: p for p in REPO.glob("*.py")}
    for pkg in PACKAGES_SCANNED:
        for p in (REPO / pkg).rglob("*.py"):
            if SKIP_DIRS & set(p.relative_to(REPO).parts):
                continue
            name = ".".join(p.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


APP_WORDS = ("cli", "repl", "console", "app")  # utils modules named so are command-line or server apps


def layer_of(module: str) -> int | None:
    if module.startswith("utils.") and any(w in module.split(".")[-1] for w in APP_WORDS):
        return 5
    best = None
    for prefix, layer in LAYER_OF.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def imports_of(path: Path, module: str, mods: dict[str, Path]) -> set[str]:
    """Project modules that `path` imports anywhere in its body."""
    found = set()
    package = module.rsplit(".", 1)[0] if "." in module else ""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" if base else a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in mods and candidate != module:
                    found.add(candidate)
                    break
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports_of(p, m, mods) for m, p in mods.items()}


def test_every_module_has_a_layer(graph):
    assert [m for m in graph if layer_of(m) is None] == [], "add these modules to LAYER_OF"


def test_no_module_imports_a_higher_layer(graph):
    upward = [f"{m} ({LAYER_NAMES[layer_of(m)]}) imports {d} ({LAYER_NAMES[layer_of(d)]})"
              for m, deps in sorted(graph.items()) for d in sorted(deps)
              if layer_of(m) is not None and layer_of(d) is not None and layer_of(d) > layer_of(m)]
    assert upward == []


def test_no_import_cycle(graph):
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_checker_sees_real_edges(graph):
    """Positive control: edges known to exist are found, so an empty violation list means something."""
    assert "omni" in graph["infer_chat"] | set().union(*(graph[m] for m in graph if m.startswith("utils.cli")))
    assert "models.thinker" in graph["utils.generation"]
