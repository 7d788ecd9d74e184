"""The codebase keeps its layers: `common` ← `workers`, `common` ← `gateway`, all three ←
`corral` (the CLI), and `common` imports nothing heavy (every process loads it). Lint and
types are checked by their own step of `.ci/run`, not here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import, anywhere in its tree
FORBIDDEN = {
    "common": {"gateway", "workers", "corral", "celery", "fastapi", "httpx", "numpy", "gguf"},
    "gateway": {"workers", "corral"},
    "workers": {"gateway", "corral"},
}


def imported(source: str) -> list[str]:
    """Every module an import statement of `source` names (function-level ones too)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def violations(package: str, files: dict[str, str]) -> list[str]:
    """`file imports module` for each import in `files` (name -> source) that the layers
    forbid `package`."""
    banned = FORBIDDEN[package]
    return [
        f"{name} imports {module}"
        for name, source in sorted(files.items())
        for module in imported(source)
        if module.split(".")[0] in banned
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers(package: str) -> None:
    files = {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / package).rglob("*.py")}
    assert len(files) > 3, f"no sources found under {package}/"
    assert violations(package, files) == []


def test_the_layer_check_catches_a_break() -> None:
    """The check itself: an import that crosses a layer, even inside a function, is found."""
    gateway = {"gateway/x.py": "def f():\n    from workers.task.infer import infer\n"}
    assert violations("gateway", gateway) == ["gateway/x.py imports workers.task.infer"]
    assert violations("common", {"common/y.py": "import gateway.app\n"}) == [
        "common/y.py imports gateway.app"
    ]
    fine = {"workers/z.py": "from common import redis_keys\nfrom . import sibling\n"}
    assert violations("workers", fine) == []
