"""Imports flow one way (docs/integrations.md, "Where an integration sits"): capture -> store ->
analyse -> render -> cli, the integrations feeding capture. Read from the source files' syntax
trees (lazy imports inside functions included), never by importing them."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

PACKAGE = "freezeframe"
SUBPACKAGES = ("capture", "store", "analyse", "render", "integrations")
TOP_LEVEL = {  # the package's own modules outside the subpackages
    "run": "api", "cli": "cli", "demo": "cli", "demo_model": "cli",
    "fastai": "integrations", "lightning": "integrations", "transformers": "integrations",
    "errors": "neutral", "hashing": "neutral", "_version": "neutral", "modes": "neutral",
}

# (importing layer, imported layer or module): why. A layer imports itself and the neutral modules
# (errors, hashing, the version, the run-directory modes); every other import is one of these.
ALLOWED = {
    ("capture", "store.writer"): "the recorder writes its run directory (capture -> store)",
    ("capture", "store.layout"): "the columns and file names the writer stores",
    ("capture", "store.indexspace"): "tensor indices as the manifest stores them",
    ("capture", "store.reader"): "appending continues a run directory the recorder writes: it reads back "
                                 "the steps already on disk, never another layer's output",
    ("analyse", "store"): "analysis reads a stored run, or two checkpoint files for a diff (store -> analyse)",
    ("render", "analyse"): "a renderer draws what analysis computed (analyse -> render)",
    ("render", "store.outputs"): "a renderer writes only where the store's rule allows, never over a run's files",
    ("integrations", "capture"): "a callback feeds the recorder its framework's events and facts",
    ("api", "capture"): "freezeframe.watch builds a Recorder",
    ("api", "store.reader"): "freezeframe.load reads a stored run",
    ("api", "analyse"): "a Run's summary and findings",
    ("api", "render"): "a Run shows itself in a terminal and a notebook",
    ("cli", "api"): "the commands load runs; the demo watches its own training",
    ("cli", "analyse"): "the commands' figures and diffs",
    ("cli", "render"): "the commands print and write what the renderers make",
    ("cli", "integrations"): "the demo trains with the fastai callback",
    ("cli", "store.outputs"): "a command refuses an output path before any work, by the store's rule",
    ("cli", "store.layout"): "the demo marks the run folder a later demo may replace",
}


def _package_dir() -> Path:
    return Path(importlib.util.find_spec(PACKAGE).submodule_search_locations[0])


def _modules() -> dict[str, Path]:
    root = _package_dir()
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(root).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(modules: dict[str, Path]):
    """(importing module, imported module, line, whether it names the package root itself) for
    every import of the package; `from X import n` counts as an import of X.n where that is a module."""
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        yield mod, alias.name, node.lineno, alias.name == PACKAGE
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in modules:
                        yield mod, sub, node.lineno, False
                    else:
                        yield mod, source, node.lineno, source == PACKAGE


def _layer(mod: str) -> str | None:
    parts = mod.split(".")
    if len(parts) == 1:
        return "api"  # the package root: watch, load, Run
    return parts[1] if parts[1] in SUBPACKAGES else TOP_LEVEL.get(parts[1])


def _allowed(src: str, dst: str) -> bool:
    a, b = _layer(src), _layer(dst)
    if a == b or b == "neutral":
        return a != "neutral" or b == "neutral"
    return any(frm == a and _matches(dst, to) for frm, to in ALLOWED)


def _matches(dst: str, to: str) -> bool:
    """`dst` is in the layer `to`, or is the module `to` or inside it."""
    rel = dst.partition(".")[2]
    return _layer(dst) == to or rel == to or rel.startswith(to + ".")


def test_imports_follow_the_direction():
    modules = _modules()
    edges = list(_imports(modules))
    # the walk sees the imports it must see (a walk that finds none would pass everything)
    assert ("freezeframe.capture.recorder", "freezeframe.store.writer") in {(s, d) for s, d, _, _ in edges}
    unknown = sorted(m for m in modules if _layer(m) is None)
    assert not unknown, f"modules in no layer (add them to TOP_LEVEL): {unknown}"
    wrong = sorted(f"{src}:{line} imports {dst} ({_layer(src)} -> {_layer(dst)})"
                   for src, dst, line, _ in edges if not _allowed(src, dst))
    assert not wrong, "imports against the direction:\n" + "\n".join(wrong)
    # and the table holds no edge the code no longer needs (an unused entry would hide a new import)
    used = {(frm, to) for src, dst, _, _ in edges for frm, to in ALLOWED if _layer(src) == frm
            and _layer(src) != _layer(dst) and _matches(dst, to)}
    assert set(ALLOWED) <= used, f"allowed edges no import uses: {sorted(set(ALLOWED) - used)}"


def test_subpackages_never_import_the_package_root():
    """`from freezeframe import X` / `from .. import X` of a name of the root inside a subpackage
    runs the whole public API's imports from a layer below it (and cycles at import time)."""
    modules = _modules()
    wrong = sorted(f"{src}:{line}" for src, dst, line, root in _imports(modules)
                   if root and _layer(src) in SUBPACKAGES)
    assert not wrong, f"package-root imports inside subpackages: {wrong}"


def test_integrations_reach_the_store_only_through_the_recorder():
    modules = _modules()
    wrong = sorted(f"{src}:{line} imports {dst}" for src, dst, line, _ in _imports(modules)
                   if _layer(src) == "integrations" and _layer(dst) == "store")
    assert not wrong, f"integrations importing the store: {wrong}"
