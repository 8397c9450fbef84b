"""Package-wide rules a reviewer would otherwise check by hand: no module reaches into another module's
private names, and the embedding format's key and checkpoint names are spelled only by their owner."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("tifactory", "workflow", "tests", "bench")


def _python_files():
    for folder in CHECKED:
        yield from sorted((REPO_ROOT / folder).rglob("*.py"))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(path: Path) -> list[str]:
    """`from tifactory.x import _name` and `x._name` where x is an imported tifactory module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    where = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tifactory"):
            for alias in node.names:
                if _is_private(alias.name):
                    found.append(f"{where}:{node.lineno}: {node.module}.{alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules.update(alias.asname or alias.name.split(".")[0] for alias in node.names
                           if alias.name.startswith("tifactory"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr) and isinstance(node.value, ast.Name) \
                and node.value.id in modules:
            found.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_names():
    assert [use for path in _python_files() for use in private_uses(path)] == []


def test_private_use_scanner_sees_both_forms(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from tifactory.photos import collect\nfrom tifactory.demo.photos import _helper\n"
                      "collect._expand()\ncollect.public()\n", encoding="utf-8")
    assert [use.split(": ")[1] for use in private_uses(sample)] == ["tifactory.demo.photos._helper",
                                                                    "collect._expand"]


def test_embedding_key_and_checkpoint_names_are_spelled_only_by_their_owner():
    owner = REPO_ROOT / "tifactory" / "training" / "embedding.py"
    spelled = [str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "tifactory").rglob("*.py")
               if path != owner and any(text in path.read_text(encoding="utf-8")
                                        for text in ("emb_params", "-step{", "ti-step"))]
    assert spelled == []
