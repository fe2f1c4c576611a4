"""The docs point at real code: every file path, `path::name` reference, dotted tinyalign name and
`python -m` command in README.md and docs/*.md exists. (A layout change that leaves a page behind
fails here, not in a reader's hands.)"""

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def defines(source: str, name: str) -> bool:
    return bool(re.search(rf"^\s*(def|class) {name}\b|^{name} = |^\s+{name}: ", source, re.M))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_path_and_definition_named_exists(page):
    text = page.read_text()
    for path in re.findall(r"`((?:tinyalign|tests|docs)/[\w/.-]*\w)(?:::\w+)?`", text):
        assert (REPO / path).exists(), f"{page_id(page)} names {path}, which does not exist"
    for path, name in re.findall(r"`([\w/]+\.py)::(\w+)`", text):
        assert (REPO / path).exists(), f"{page_id(page)} names {path}"
        assert defines((REPO / path).read_text(), name), f"{page_id(page)}: {path} defines no {name}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_command_names_a_module_that_runs(page):
    modules = set(re.findall(r"python -m (tinyalign[\w.]*)", page.read_text()))
    for module in modules:
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{page_id(page)}: python -m {module}: no such module"
        if spec.submodule_search_locations:  # a package runs its __main__
            assert importlib.util.find_spec(module + ".__main__"), f"{page_id(page)}: {module} has no __main__"
        else:
            assert re.search(r'^if __name__ == "__main__":', Path(spec.origin).read_text(), re.M), \
                f"{page_id(page)}: python -m {module} runs nothing"


def resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_dotted_tinyalign_name_resolves(page):
    names = re.findall(r"`(tinyalign(?:\.\w+)+)`", page.read_text())
    for name in names:
        assert resolve(name) is not None, f"{page_id(page)} names {name}"


def test_the_readme_is_a_map():
    """At most 300 lines: the commands, what the demo shows, how a DPO step runs, a tour by layer,
    and a link to each area's page (every page under docs/ is linked)."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[:3] == ["What the demo shows", "How a DPO step runs", "A tour by layer"]
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in text, f"README.md does not link docs/{page.name}"
