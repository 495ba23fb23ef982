"""The house rule of DESIGN.md: imports only point down the layers.

Each sub-package has a rank; a module may import cryoscape modules of a strictly lower rank or of
its own sub-package (lazy imports inside functions count too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RANK = {
    "errors": 0,
    "geometry": 1,
    "fourier": 1,
    "io": 2,
    "simulate": 3,
    "data": 3,
    "models": 4,
    "reconstruct": 4,
    "posesearch": 5,
    "classical": 6,  # EM refinement/classification: reads posesearch's lattices, below train
    "train": 7,
    "analysis": 8,
    "report": 9,
    "dashboard": 9.5,  # the web app of cryoscape dashboard: uses report, analysis, train; only cli imports it
    "cli": 10,
}
ROOT = Path(__file__).resolve().parents[1] / "src" / "cryoscape"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cryoscape."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cryoscape."):
                    found.add(alias.name.split(".")[1])
    return found


@pytest.mark.parametrize("package", sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name in RANK))
def test_imports_point_down(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for target in _imports(path):
            if target == package:
                continue
            if target not in RANK:
                bad.append(f"{path.relative_to(ROOT)} imports unknown layer cryoscape.{target}")
            elif RANK[target] >= RANK[package]:
                bad.append(f"{path.relative_to(ROOT)} imports cryoscape.{target} (rank {RANK[target]} >= {RANK[package]})")
    assert not bad, "\n".join(bad)


def test_every_layer_is_ranked():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(RANK), packages - set(RANK)
