"""ARCHITECTURE.md is true: the rooms it names exist, imports point only the allowed ways, and nothing is circular.

Read from the source with `ast` (every import, at module level or inside a function), so a lazy import that closes a
circle or crosses a boundary counts as much as a top-level one.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lora_core": ROOT / "lora_core", "lora_daemon": ROOT / "daemon"}


def _modules() -> dict[str, Path]:
    found = {}
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> set[str]:
    """Every project module `module` imports, resolved to a module name in `MODULES`."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_the_rooms_architecture_md_names_exist():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = text.split("## Rooms", 1)[1].split("Arrows allowed", 1)[0]
    for row in table.splitlines():
        cells = row.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`"):
            continue
        rooms = re.findall(r"`([\w./]+/)`", cells[1])
        for room in rooms:
            assert (ROOT / room).is_dir(), f"ARCHITECTURE.md names {room}, which does not exist"
            for module in re.findall(r"`([\w/]+\.py)`", cells[2]):
                candidates = [ROOT / room / module, ROOT / module]
                assert any(c.exists() for c in candidates), f"ARCHITECTURE.md: {room}{module} does not exist"


def test_no_module_imports_another_in_a_circle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def _violations(source_prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{module} imports {target}" for module, targets in GRAPH.items()
            if module == source_prefix or module.startswith(source_prefix + ".")
            for target in targets if any(target == f or target.startswith(f + ".") for f in forbidden)]


def test_the_arrows_point_only_the_allowed_ways():
    assert _violations("lora_core", ("lora_daemon",)) == []
    assert _violations("lora_core.dataset", ("lora_core.image", "lora_core.text", "lora_core.loop",
                                             "lora_core.train", "lora_core.plan")) == []
    assert _violations("lora_core.text", ("lora_core.image",)) == []
    assert _violations("lora_daemon.ui", ("lora_core", "lora_daemon.server", "lora_daemon.queue",
                                          "lora_daemon.worker", "lora_daemon.store", "lora_daemon.publish")) == []


def test_the_engine_never_imports_zmq_or_gradio():
    for module, path in MODULES.items():
        if not module.startswith("lora_core"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                assert name.split(".")[0] not in {"zmq", "gradio", "fastapi", "watchdog"}, f"{module} imports {name}"
