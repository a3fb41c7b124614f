"""Every ```python snippet in README.md and docs/, and every script in examples/, runs as written.

Each runs in a fresh interpreter (a snippet may start a process group or set global state), with the
revgn_ext this test imports. Shell blocks (```bash) are not run here: CI runs the make targets they
show.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import revgn_ext

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# The Lightning example has its own test (test_lightning.py), skipped without lightning.
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if p.name != "lightning_module.py")


def snippets():
    for path in DOC_FILES:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield pytest.param(match.group(1), id=f"{path.relative_to(ROOT)}:{line}")


def run_python(args, cwd):
    env = dict(os.environ)
    package_root = str(Path(revgn_ext.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


def test_the_docs_have_snippets():
    ids = [p.id for p in snippets()]
    assert any(i.startswith("README.md") for i in ids) and any(i.startswith("docs/api.md") for i in ids)


@pytest.mark.parametrize("code", list(snippets()))
def test_snippet_runs_as_written(code, tmp_path):
    run_python(["-c", code], tmp_path)


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    run_python([str(script)], tmp_path)
