"""Architecture guards from DESIGN.md: rag/ never imports ray; only settings.py reads the environment;
SQL lives in rag/store/; no model loads at import time."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "rag" / "store"


def test_core_imports_no_ray_and_loads_no_model():
    code = (
        "import sys, ragcli, rag.pipeline, rag.ingest, rag.eval, rag.store, rag.rerank, rag.embed, rag.db\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not bad, bad\n"
        "assert 'sentence_transformers' not in sys.modules, 'model library imported at import time'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_only_settings_reads_the_environment():
    offenders = []
    for p in [*(ROOT / "rag").rglob("*.py"), *(ROOT / "deployments").rglob("*.py")]:
        if p.name == "settings.py":
            continue
        if re.search(r"os\.environ\s*(\[|\.)|os\.getenv\(", p.read_text()):
            offenders.append(str(p.relative_to(ROOT)))
    assert not offenders, f"environment read outside rag/settings.py: {offenders}"


def test_sql_lives_in_store():
    pattern = re.compile(r"\b(SELECT|INSERT INTO|CREATE TABLE|DELETE FROM)\b[^\n]*\b(FROM|VALUES|\()")
    offenders = [
        str(p.relative_to(ROOT))
        for p in [*(ROOT / "rag").rglob("*.py"), *(ROOT / "deployments").rglob("*.py")]
        if STORE not in p.parents and pattern.search(p.read_text())
    ]
    assert not offenders, f"SQL outside rag/store/: {offenders}"


def test_core_imports_nothing_from_the_layers_above():
    """rag/ is the core: no module in it imports deployments/, bench/ or the CLI (ragcli/), even lazily."""
    import ast

    above = ("deployments", "bench", "ragcli")
    offenders = []
    for p in (ROOT / "rag").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{p.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in above]
    assert not offenders, f"the core imports a layer above it: {offenders}"


def test_rays_private_apis_live_in_one_module():
    """Ray's private APIs (``ray._*``, ``ray.serve._private``, private attributes of Ray's objects) are used
    only in deployments/_ray_compat.py, where each has a contract test (tests/test_ray_compat.py)."""
    pattern = re.compile(
        r"ray\._|serve\._private|serve\.context import _|\._router\b|(?<!self)\._record\(|__serve_build_asgi_app__"
    )
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in [*(ROOT / "rag").rglob("*.py"), *(ROOT / "deployments").rglob("*.py")]
        if p.name != "_ray_compat.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, f"Ray private API outside deployments/_ray_compat.py: {offenders}"
