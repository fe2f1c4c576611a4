"""The layout docs/architecture.md describes, held to the code: the core at tinyalign/'s top level,
rooms beside it, imports only downward (lazy ones included), no circle, nothing inside the package
importing its face."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "tinyalign"
# Bottom to top: a module may import its own layer and the layers before it, never one after.
LAYERS = ["core", "infra", "speed", "demo", "evaluation", "lab"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "core"


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(module: str) -> set[tuple[str, str | None]]:
    """Every (module, imported name or None) that `module` imports anywhere in its file, inside
    functions too, as absolute names."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {(a.name, None) for a in node.names if a.name.startswith("tinyalign")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.startswith("tinyalign"):
                found |= {(source, a.name) for a in node.names}
    return found


def targets_of(module: str) -> set[str]:
    """The package's modules that `module` imports (a name that is itself a module counts as one)."""
    out = set()
    for source, name in imports_of(module):
        target = f"{source}.{name}" if name and f"{source}.{name}" in MODULES else source
        if target in MODULES and target != module:
            out.add(target)
    return out


def test_the_core_and_the_rooms_are_where_the_docs_say():
    rooms = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert rooms == sorted(LAYERS[1:])
    for room in rooms:
        doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"tinyalign/{room}/__init__.py does not say what it may import"
    architecture = (REPO / "docs" / "architecture.md").read_text()
    for path in sorted(PACKAGE.glob("*.py")) + sorted(PACKAGE.glob("*/*.py")):
        if path.name != "__init__.py":
            assert f"`{path.relative_to(PACKAGE).as_posix()}`" in architecture, f"docs/architecture.md omits {path}"


@pytest.mark.parametrize("module", sorted(set(MODULES) - {"tinyalign"}))
def test_imports_run_downward_only(module):
    """The core imports no room; a room imports only the core and the rooms below it. (The face,
    tinyalign/__init__.py, re-exports load_model and save_model from infra/: it is no layer.)"""
    mine = LAYERS.index(layer_of(module))
    for target in targets_of(module):
        if target == "tinyalign":
            continue
        assert LAYERS.index(layer_of(target)) <= mine, f"{module} ({layer_of(module)}) imports {target}"


def test_no_module_inside_the_package_imports_its_face():
    """tinyalign/__init__.py re-exports the public API for users; inside the package every import
    names the module it takes from, so the face can import anything without a circle."""
    for module in MODULES:
        for source, name in imports_of(module):
            if source == "tinyalign" and name is not None:
                assert f"tinyalign.{name}" in MODULES, f"{module} imports {name!r} from the package's face"


def test_no_import_circle_lazy_imports_included():
    graph = {m: targets_of(m) - {"tinyalign"} for m in MODULES}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n,))) for n in graph[start])

    circles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert not circles, circles


def test_the_network_modules_hold_no_speed_code():
    """Fused projections and compiled decode graphs are applied where generation runs (speed/), and
    blocks are compiled at the call site: the modules that define the network only define it."""
    for name in ("llama.py", "model.py", "vision.py", "attention.py"):
        text = (PACKAGE / name).read_text()
        found = re.findall(r"torch\.compile\(|\.compile\(|fuse_weights|fused_projections|cudagraphs|LENGTH_BUCKET|"
                           r"mark_static_address", text)
        assert not found, (name, found)
