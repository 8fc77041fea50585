"""The package's structure, read from the source (nothing run): layers import only downwards, the
contract needs the standard library alone, no code edits sys.path, model folders import the package
by name, and the facts that used to be copied by hand are declared once."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flux2_serving"
# The folders of the one distribution (pyproject.toml's package-dir): flux2_serving/ holds most subpackages; the
# top-level export/ and clients/ folders (the product's specified layout) are flux2_serving.export and .clients.
TOP_LEVEL_SUBPACKAGES = {"export": ROOT / "export", "clients": ROOT / "clients"}
# Lower layers first; a module may import its own layer and the ones before it (flux2_serving/__init__.py
# says what each holds). contract and devtools depend on nothing of the project.
LAYERS = [{"(root)", "contract", "devtools"}, {"modeling"}, {"export"}, {"models"}, {"serving"}, {"server"},
          {"clients"}, {"front"}]
# What the serving image carries (docker/serving.Dockerfile copies flux2_serving/ alone) and a server runs.
SERVING_SIDE = {"(root)", "contract", "devtools", "modeling", "models", "serving", "server"}
MAX_UPWARD_IMPORTS = 0


def _layer(name: str) -> int:
    return next(index for index, names in enumerate(LAYERS) if name in names)


def _package_modules():
    """(path, subpackage) of every module of the distribution, wherever its folder is."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        yield path, parts[0] if len(parts) > 1 else "(root)"
    for name, folder in TOP_LEVEL_SUBPACKAGES.items():
        yield from ((path, name) for path in sorted(folder.rglob("*.py")))


def _dotted_package(path: Path) -> list[str]:
    for name, folder in TOP_LEVEL_SUBPACKAGES.items():
        if path.is_relative_to(folder):
            return ["flux2_serving", name, *path.relative_to(folder).parent.parts]
    return list(path.relative_to(ROOT).parent.parts)


def _imports(path: Path):
    """(imported module, line) for every import of `path`, relative ones resolved, function-level ones too."""
    package = _dotted_package(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                yield ".".join([*base, *([node.module] if node.module else [])]), node.lineno
            else:
                yield node.module, node.lineno


def _target(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and ((PACKAGE / parts[1]).is_dir() or parts[1] in TOP_LEVEL_SUBPACKAGES):
        return parts[1]
    return "(root)"


def test_layers_import_only_downwards():
    upward = []
    for path, source in _package_modules():
        for module, line in _imports(path):
            parts = module.split(".")
            if parts[0] in ("bench", "perf", "tests", *TOP_LEVEL_SUBPACKAGES):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {module} (outside the package)")
            elif parts[0] == "flux2_serving" and _layer(_target(module)) > _layer(source):
                upward.append(f"{path.relative_to(ROOT)}:{line} ({source}) imports {module} ({_target(module)})")
    assert len(upward) <= MAX_UPWARD_IMPORTS, "\n".join(upward)


def test_the_serving_side_needs_neither_the_exporter_nor_the_clients():
    """The serving image carries flux2_serving/ only: what it runs imports nothing from export/ or clients/, and
    those folders sit at the top level only (one copy of each module)."""
    assert not (PACKAGE / "export").exists() and not (PACKAGE / "clients").exists()
    reached = [f"{path.relative_to(ROOT)}:{line} imports {module}"
               for path, source in _package_modules() if source in SERVING_SIDE
               for module, line in _imports(path) if _target(module) in TOP_LEVEL_SUBPACKAGES
               and module.startswith("flux2_serving.")]
    assert not reached, "\n".join(reached)
    dockerfile = (ROOT / "docker" / "serving.Dockerfile").read_text()
    copied = re.findall(r"^COPY (\S+) /opt/flux2/lib/", dockerfile, flags=re.MULTILINE)
    assert copied == ["flux2_serving"], copied


def test_the_distribution_maps_the_top_level_folders():
    text = (ROOT / "pyproject.toml").read_text()
    for name in TOP_LEVEL_SUBPACKAGES:
        assert f'"flux2_serving.{name}" = "{name}"' in text
    listed = set(re.findall(r'"(flux2_serving(?:\.\w+)?)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    on_disk = {"flux2_serving", *(f"flux2_serving.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()),
               *(f"flux2_serving.{name}" for name in TOP_LEVEL_SUBPACKAGES)}
    assert listed == on_disk


def test_the_contract_needs_the_standard_library_only():
    for path in sorted((PACKAGE / "contract").glob("*.py")):
        for module, line in _imports(path):
            top = module.split(".")[0]
            assert top in sys.stdlib_module_names or module.startswith("flux2_serving.contract"), (
                f"{path.relative_to(ROOT)}:{line} imports {module}")


def _python_files():
    for folder in ("flux2_serving", "export", "clients", "model_repository", "bench", "perf", "tests"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_code_edits_sys_path():
    for path in _python_files():
        text = path.read_text()
        assert not re.search(r"sys\.path\s*(\[[^\]]*\]\s*)?(=|\.insert|\.append|\.extend|\+=)", text), path


def test_model_folders_import_the_package_by_name():
    """Every committed model.py is a shim: one import of its model from flux2_serving.models."""
    shims = sorted((ROOT / "model_repository").rglob("*.py"))
    assert shims and all(path.name == "model.py" for path in shims), shims
    for path in shims:
        imports = list(_imports(path))
        named = re.findall(r"from flux2_serving\.models\.(\w+) import", path.read_text())
        assert [module for module, _ in imports if module != "__future__"] == [
            f"flux2_serving.models.{m}" for m in named
        ] and len(imports) == 1, path


def test_the_assembler_copies_no_project_module():
    """serving/repository.py writes configs, links graphs and plans, and copies committed model folders and the
    tokenizer/scheduler data: never a module of the package (model.py imports it instead)."""
    text = (PACKAGE / "serving" / "repository.py").read_text()
    assert "flux2_export" not in text and "_export_modules" not in text and "triton_io.py" not in text


# Facts that were copied by hand (issue 20): each literal may appear only where it is declared.
DECLARED_ONCE = {
    '"flux2_klein_kv"': "contract/names.py",
    '"reference_kv_cache"': "contract/names.py",
    '"x-flux2-reference-key"': "contract/names.py",
    '"Exceeds maximum queue size"': "contract/names.py",
    '"Request timeout expired"': "contract/names.py",
    '"cached" +': None,
    "[3:]": None,
    "REFERENCE_CACHE_BYTES": None,
    "TEXT_LAYERS_KEPT": None,
    "text_tokens": None,
    "served_module": None,
    "(9, 18, 27)": "contract/specs.py",
    '("text_encoder", "vae_encoder", "transformer_prefill", "transformer_cached", "vae_decoder")': None,  # GRAPHS
    'graph == "vae_encoder"': None,  # special cases by name: graphs.Graph fields instead
    'spec.name == "transformer_cached" else': None,
    '("vae_encoder", "vae_decoder")': None,
    "max_images": None,
    "images_per_request": None,
    "max_steps": None,
}


def _holds(path: Path, literal: str) -> bool:
    """A quoted literal: a string constant of exactly that value (prose in docstrings may quote it); else
    the text itself anywhere in the code."""
    if literal.startswith('"') and literal.endswith('"') and literal.count('"') == 2:
        value = literal[1:-1]
        tree = ast.parse(path.read_text())
        return any(isinstance(node, ast.Constant) and node.value == value for node in ast.walk(tree))
    return literal in path.read_text()


def test_facts_are_declared_once():
    product = [p for p in _python_files() if p.parts[len(ROOT.parts)] != "tests"]
    for literal, home in DECLARED_ONCE.items():
        found = [str(p.relative_to(PACKAGE if p.is_relative_to(PACKAGE) else ROOT))
                 for p in product if _holds(p, literal)]
        assert found == ([home] if home else []), (literal, found)


def test_test_modules_share_code_through_tests_support_only():
    for path in sorted((ROOT / "tests").glob("*.py")):
        for module, line in _imports(path):
            if module.startswith("tests"):
                assert module == "tests.support", f"{path.relative_to(ROOT)}:{line} imports {module}"
