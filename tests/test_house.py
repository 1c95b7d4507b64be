"""The house's rules, checked on the source: no import circles (between modules, or between the package's parts), no
imports inside functions but the allowed lazy ones, and every module importable on its own in a fresh interpreter."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from import_graph import cycles, module_names, package_edges, read_graph  # noqa: E402

PACKAGE = ROOT / "mesp_mlx"
# the imports that stay inside functions, each for a reason its site's comment gives
LAZY = {
    "mesp_mlx.backend": "mlx (--link-openblas relinks MLX's BLAS before MLX loads)",
    "mesp_mlx.data.corpora": "chatterbot_corpus (optional, installed by scripts/setup.sh)",
    "mesp_mlx.federated.cli": "Flower (its import takes seconds; only `federate` pays it)",
    "mesp_mlx.plan.speed": "matplotlib (slow import; its backend is chosen before pyplot loads)",
    "mesp_mlx.run.metrics": "matplotlib (as above)",
}


def test_no_import_cycles():
    edges, _ = read_graph(PACKAGE)
    assert len(edges) > 50  # the whole package was read
    assert cycles(edges) == []
    assert cycles(package_edges(edges)) == []


def test_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "mesp_mlx"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")  # hidden inside a function
    (pkg / "c.py").write_text("from . import a\n")
    edges, inner = read_graph(pkg)
    assert cycles(edges) == [["mesp_mlx.a", "mesp_mlx.sub.b"]]
    assert inner == [("mesp_mlx.sub.b", 2, "from ..a import x")]
    assert edges["mesp_mlx.c"] == {"mesp_mlx.a"}


def test_imports_inside_functions_are_only_the_allowed_lazy_ones():
    _, inner = read_graph(PACKAGE)
    unexpected = [f"{module}:{line}: {statement}" for module, line, statement in inner if module not in LAZY]
    assert unexpected == []
    for module, line, _ in inner:  # each lazy site says why, on its line or in its module's docstring
        path = module_names(PACKAGE)[module]
        lines = path.read_text().splitlines()
        assert "#" in lines[line - 1] or "not at the top" in path.read_text(), f"{module}:{line} has no reason"


def _import_alone(module: str) -> tuple[str, int, str]:
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=ROOT)
    return module, proc.returncode, proc.stderr[-400:]


def test_every_module_imports_in_a_fresh_interpreter():
    modules = sorted(module_names(PACKAGE))
    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [r for r in pool.map(_import_alone, modules) if r[1] != 0]
    assert failed == []


def test_every_cited_document_is_in_the_repository():
    """The code cites docs/design.md by section; nothing cites a document the repository does not hold."""
    import re

    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", design, re.M))
    texts = {p: p.read_text() for d in ("mesp_mlx", "tests", "tools", "docs") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".md") and p.name != "test_house.py"}
    texts[ROOT / "README.md"] = (ROOT / "README.md").read_text()
    for path, text in texts.items():
        assert not re.search(r"REFERENCE §|ARCHITECTURE\b", text), path
        for cited in re.findall(r"docs/design\.md ((?:§\d+(?:, )?)+)", text):
            assert set(re.findall(r"\d+", cited)) <= sections, (path, cited)
