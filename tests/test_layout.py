"""The package map of the README's "Layout" section, enforced: imports go one way.

``mope`` (the method) and ``mope_data`` (shard format + loaders) are plain-PyTorch libraries; ``datasets_prep`` (the
converters) writes the format ``mope_data`` reads; ``reports`` reads MLflow; ``harness`` (CLI, sweeps, Ray, DeepSpeed,
MLflow) sits on top and nothing below imports it. ``bench`` imports no test code.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "mope": {"harness", "mope_data", "datasets_prep", "reports", "tests", "ray", "mlflow", "hydra", "deepspeed"},
    "mope_data": {"harness", "datasets_prep", "reports", "tests", "ray", "mlflow", "hydra", "deepspeed"},
    "datasets_prep": {"harness", "reports", "tests", "ray", "mlflow", "hydra", "deepspeed"},
    "reports": {"harness", "datasets_prep", "tests", "ray", "deepspeed"},
    "bench": {"tests"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def test_imports_go_one_way():
    bad = []
    for pkg, forbidden in FORBIDDEN.items():
        files = sorted((ROOT / pkg).rglob("*.py"))
        assert files, f"{pkg}/ has no Python files: the layout changed, update this test and the README"
        for f in files:
            bad += [f"{f.relative_to(ROOT)}:{ln} imports {mod}" for ln, mod in _imports(f) if mod in forbidden]
    assert not bad, "imports against the layout (README 'Layout'):\n" + "\n".join(bad)
