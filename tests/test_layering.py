"""Imports run down only: a module imports from its own room or from rooms below it (the order of
rooms in docs/library.md), never from a room above or beside it, so no two rooms form a loop."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "moe_vision"
# Lowest first; rooms on one line are peers and must not import each other.
LEVELS = [
    {"_compat", "io_utils", "errors", "progress", "exactness"},
    {"moe", "data"},
    {"models", "plotting"},
    {"decoder", "adapters"},
    {"tasks"},
    {"pretrain"},
    {"engine"},
    {"inference"},
    {"surgery"},
    {"export", "serve", "bench", "cli"},
    {"downstream"},
]
RANK = {room: i for i, rooms in enumerate(LEVELS) for room in rooms}


def room_of(module: str) -> str:
    return module.split(".")[1]


def imports(path: Path, root: Path = ROOT):
    """``(line, imported module)`` of every moe_vision import in ``path``, relative ones resolved."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    package = parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            yield from ((node.lineno, n) for n in names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moe_vision."):
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.startswith("moe_vision."))


def uphill_imports(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        if rel.parts[1] == "__init__.py":  # the package's public API re-exports from every room
            continue
        src = rel.parts[1].removesuffix(".py")
        for line, module in imports(path, root):
            dst = room_of(module) if module.count(".") else None
            if dst is None or dst == src:
                continue
            assert dst in RANK and src in RANK, f"room {dst if dst not in RANK else src} has no place in LEVELS"
            if RANK[dst] >= RANK[src]:
                bad.append(f"{rel}:{line} imports {module} ({src} must not import {dst})")
    return bad


def test_no_module_imports_from_a_room_above_or_beside_its_own():
    assert uphill_imports() == []


def test_the_check_finds_an_uphill_import(tmp_path):
    pkg = tmp_path / "moe_vision"
    for room, text in (("data", "from ..engine.builders import build_dataset\n"), ("engine", "from ..data import x\n"),
                       ("moe", "from ..data import x\n")):
        (pkg / room).mkdir(parents=True)
        (pkg / room / "m.py").write_text(text)
    assert sorted(b.split(" ")[0] for b in uphill_imports(pkg)) == ["moe_vision/data/m.py:1", "moe_vision/moe/m.py:1"]
