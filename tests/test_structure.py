"""The package's layering, read from the source: dependencies point down, never up or sideways.

errors < {config, mesh} < {losses, model, data, convex, eval} < train < launch. The packages of one
layer never import each other (losses never runs a model; the convex solver stands alone), and nothing in
cvxdpo/ imports launch/ or reads absl flags.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {"cvxdpo.errors": 0, "cvxdpo.config": 1, "cvxdpo.mesh": 1, "cvxdpo.losses": 2, "cvxdpo.model": 2,
          "cvxdpo.data": 2, "cvxdpo.convex": 2, "cvxdpo.eval": 2, "cvxdpo.train": 3, "launch": 4}


def unit(module: str) -> str | None:
    """The layered unit (package or top-level module) a dotted module name belongs to."""
    parts = module.split(".")
    for n in (2, 1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    return None


def imports(path: str) -> list[tuple[int, str]]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def sources():
    for top in ("cvxdpo", "launch"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    rel = os.path.relpath(path, ROOT)
                    module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    if module != "cvxdpo":  # the empty package marker
                        yield rel, module


def violations(rel: str, module: str) -> list[str]:
    own = unit(module)
    bad = []
    for line, name in imports(os.path.join(ROOT, rel)):
        if own != "launch" and (name.startswith("absl.flags") or name == "absl.app"):
            bad.append(f"{rel}:{line} reads command-line flags ({name})")
        target = unit(name)
        if target is None or target == own:
            continue
        if LAYERS[target] >= LAYERS[own]:
            bad.append(f"{rel}:{line} imports {name} ({target} is not below {own})")
    return bad


@pytest.mark.parametrize("rel, module", list(sources()), ids=lambda v: v)
def test_imports_point_down(rel, module):
    assert unit(module) is not None, f"{rel} belongs to no layer: add it to LAYERS"
    assert violations(rel, module) == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """losses importing the model (what the landed code did) is reported."""
    fake = tmp_path / "cvxdpo"
    fake.mkdir()
    (fake / "losses.py").write_text("import jax\nfrom cvxdpo.model import gpt2\nfrom cvxdpo.errors import X\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    assert violations("cvxdpo/losses.py", "cvxdpo.losses") == [
        "cvxdpo/losses.py:2 imports cvxdpo.model.gpt2 (cvxdpo.model is not below cvxdpo.losses)"]
