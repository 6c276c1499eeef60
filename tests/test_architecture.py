"""The dependency rule of ARCHITECTURE.md, checked on the source. A module's layer is its folder (its room):
every project module lives in a room, imports (at any depth, lazy imports included) only modules of its own
layer or the layers below, the apps use the public API (omni.py) and the torch-free base only, and there is
no import cycle. A file dropped straight into utils/ has no layer and fails the test.
"""
from __future__ import annotations

import ast
from pathlib import Path


from tests.conftest import REPO

LAYER_NAMES = {0: "networks", 1: "base", 2: "media inputs", 3: "weights and formats", 4: "engine",
               5: "public API", 6: "apps"}
# Rooms (folders, or the one file omni.py) and their layer; a top-level script is an app.
ROOMS = {"models": 0, "utils/base": 1, "utils/media": 2, "utils/weights": 3, "utils/engine": 4, "omni.py": 5,
         "utils/cli": 6, "utils/server": 6, "utils/batch": 6, "tools": 6}
# What an app may import besides other apps: the public API and the torch-free base (ARCHITECTURE.md).
APP_MAY_USE = ("omni", "utils.base")
# Developer tools that train, measure or convert below the public API on purpose.
INTERNAL_TOOLS = ("tools",)
SKIP_DIRS = {"tests", "checkpoints", "examples", "__pycache__", ".venv", ".git", "venv"}


def project_modules(root: Path = REPO) -> dict[str, Path]:
    mods = {}
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if SKIP_DIRS & set(rel.parts):
            continue
        name = ".".join(rel.with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def room_of(path: Path, root: Path = REPO) -> str | None:
    """The room a file belongs to: the longest room path that contains it; a top-level script is its own."""
    rel = path.relative_to(root).as_posix()
    if "/" not in rel:
        return rel
    best = None
    for room in ROOMS:
        if (rel == room or rel.startswith(room + "/")) and (best is None or len(room) > len(best)):
            best = room
    if best is None and rel.startswith("utils/") and rel.count("/") == 1 and rel.endswith("__init__.py"):
        return "utils"  # the package marker itself
    return best


def layer_of(path: Path, root: Path = REPO) -> int | None:
    room = room_of(path, root)
    if room is None:
        return None
    if room == "utils":
        return 0
    if "/" not in room and room.endswith(".py"):
        return ROOMS.get(room, 6)  # omni.py, or an app script
    return ROOMS[room]


def imports_of(path: Path, module: str, mods: dict[str, Path]) -> set[str]:
    """Project modules that `path` imports anywhere in its body."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0] if "." in module else ""
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


def import_graph(root: Path = REPO) -> tuple[dict[str, Path], dict[str, set[str]]]:
    mods = project_modules(root)
    return mods, {m: imports_of(p, m, mods) for m, p in mods.items()}


def violations(root: Path = REPO) -> list[str]:
    """Every breach of the rule in the tree at `root`: modules outside the rooms, upward imports, apps that
    reach below the public API, and import cycles."""
    mods, graph = import_graph(root)
    found = [f"{m} ({mods[m].relative_to(root)}) is in no room" for m in sorted(mods) if layer_of(mods[m], root) is None]
    for m in sorted(graph):
        lm = layer_of(mods[m], root)
        if lm is None:
            continue
        for d in sorted(graph[m]):
            ld = layer_of(mods[d], root)
            if ld is None or d == "utils":
                continue
            if ld > lm:
                found.append(f"{m} ({LAYER_NAMES[lm]}) imports {d} ({LAYER_NAMES[ld]}): upward")
            elif (lm == 6 and ld < 6 and not d.startswith(APP_MAY_USE)
                  and not m.startswith(INTERNAL_TOOLS)):
                found.append(f"{m} (app) imports {d} ({LAYER_NAMES[ld]}): apps use omni and utils.base only")
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                found.append("cycle: " + " -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_the_tree_keeps_the_rule():
    assert violations() == []


def test_the_checker_sees_real_edges():
    """Positive control on the real tree: edges known to exist are found."""
    _, graph = import_graph()
    assert "omni" in graph["infer_chat"] | set().union(*(graph[m] for m in graph if m.startswith("utils.cli")))
    assert "models.thinker" in graph["utils.engine.generation"]


def _copy_tree(tmp_path: Path) -> Path:
    import shutil
    root = tmp_path / "repo"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(*SKIP_DIRS))
    return root


def test_an_upward_import_fails(tmp_path):
    """Positive control: a media module importing the engine is reported."""
    root = _copy_tree(tmp_path)
    f = root / "utils" / "media" / "image.py"
    f.write_text(f.read_text(encoding="utf-8") + "\nfrom utils.engine import generation  # noqa\n", encoding="utf-8")
    assert any("utils.media.image (media inputs) imports utils.engine.generation" in v for v in violations(root))


def test_a_module_outside_the_rooms_fails(tmp_path):
    """Positive control: utils/mapping.py, straight in utils/, has no layer."""
    root = _copy_tree(tmp_path)
    (root / "utils" / "mapping.py").write_text('"""no room"""\n', encoding="utf-8")
    assert any(v.startswith("utils.mapping ") and "in no room" in v for v in violations(root))


def test_an_app_below_the_public_api_fails(tmp_path):
    """Positive control: the server importing the engine directly is reported."""
    root = _copy_tree(tmp_path)
    f = root / "serve.py"
    f.write_text(f.read_text(encoding="utf-8") + "\nfrom utils.engine import generation  # noqa\n", encoding="utf-8")
    assert any(v.startswith("serve (app) imports utils.engine.generation") for v in violations(root))


def test_a_cycle_fails(tmp_path):
    """Positive control: two base modules importing each other form a cycle."""
    root = _copy_tree(tmp_path)
    f = root / "utils" / "base" / "defaults.py"
    f.write_text(f.read_text(encoding="utf-8") + "\nimport utils.base.version  # noqa\n", encoding="utf-8")
    g = root / "utils" / "base" / "version.py"
    g.write_text(g.read_text(encoding="utf-8") + "\nimport utils.base.defaults  # noqa\n", encoding="utf-8")
    assert any(v.startswith("cycle:") and "utils.base.defaults" in v for v in violations(root))
