"""The import layers and the architecture doc's module map, read from the code (no imports executed).

Layers, bottom up: ``ddm.models`` < the rest of ``ddm`` < ``data`` < ``train``. ``ddm`` (math, models, sampling,
evaluation) never imports ``data`` or ``train``; models never import the export/pipeline/evaluation code above
them. Function-local imports count: an edge hidden in a function body is still an edge."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ddm", "data", "train")
# what ddm/models may not import: the layers that use models
ABOVE_MODELS = ("ddm.pipeline", "ddm.assemble", "ddm.export", "ddm.interop_export", "ddm.evaluate", "ddm.eval", "ddm.generate",
                "ddm.sampler")


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p.name != "__init__.py")


def _imports(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth of the file (absolute imports only, as the project
    writes them)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_scan_sees_function_local_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from data.shards import iter_shard\n    import train.job\n")
    assert _imports(probe) == {"os", "data.shards", "train.job"}


@pytest.mark.parametrize("path", [p for p in _modules() if p.parts[len(ROOT.parts)] == "ddm"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_ddm_never_imports_data_or_train(path):
    upward = sorted(n for n in _imports(path) if _within(n, ("data", "train")))
    assert not upward, f"{path.relative_to(ROOT)} imports {upward} (ddm is the bottom layer)"


@pytest.mark.parametrize("path", sorted((ROOT / "ddm" / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_never_import_the_layers_that_use_them(path):
    upward = sorted(n for n in _imports(path) if _within(n, ABOVE_MODELS))
    assert not upward, f"{path.relative_to(ROOT)} imports {upward}"


def test_every_module_is_in_the_architecture_module_map():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = doc[doc.index("## Module map"):]
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| ")][1:]
    listed = {(row[1].strip(), name.strip().strip("`")) for row in rows for name in row[2].split(",")}
    missing = []
    for path in _modules():
        package, *rest = path.relative_to(ROOT).parts
        rel = "/".join(rest)
        if package == "ddm" and rest[0] == "eval":  # the eval/ folder is one row
            rel = "eval/"
        if (package, rel) not in listed:
            missing.append(f"{package}/{'/'.join(rest)}")
    assert not missing, f"modules missing from docs/architecture.md's module map: {missing}"


def test_no_module_is_over_600_lines():
    """A file a reader can hold in their head (the project's rule): long modules are split by concern."""
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"modules over 600 lines: {long}"
