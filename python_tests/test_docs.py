"""Every ```python snippet in README.md and docs/, and every script in examples/, runs as written.

Each runs in this process, in a fresh namespace, with torch's global state (default dtype, RNG,
threads) restored afterwards; a fresh interpreter per snippet would spend most of the time importing
torch. Shell blocks (```bash) are not run here: CI runs the make targets they show.
"""
import contextlib
import io
import re
import runpy
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # spawns processes

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# The Lightning example has its own test (test_lightning.py), skipped without lightning; the causal
# language model's checks its losses (test_causal_lm_example_loss_goes_down).
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if p.name not in ("lightning_module.py", "causal_lm.py"))


def snippets():
    for path in DOC_FILES:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield pytest.param(match.group(1), id=f"{path.relative_to(ROOT)}:{line}")


@contextlib.contextmanager
def isolated(cwd):
    """Run with cwd, torch's default dtype, RNG state and thread count restored on exit."""
    dtype, rng, threads = torch.get_default_dtype(), torch.get_rng_state(), torch.get_num_threads()
    old = Path.cwd()
    out = io.StringIO()
    try:
        import os
        os.chdir(cwd)
        with contextlib.redirect_stdout(out):
            yield out
    finally:
        os.chdir(old)
        torch.set_default_dtype(dtype)
        torch.set_rng_state(rng)
        # Only when a snippet changed it: with this torch build's MKL, set_num_threads after a batched
        # LU leaves later batched LUs (torch.linalg.solve) failing with invalid pivots.
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_the_docs_have_snippets():
    ids = [p.id for p in snippets()]
    assert any(i.startswith("README.md") for i in ids) and any(i.startswith("docs/api.md") for i in ids)


@pytest.mark.parametrize("code", list(snippets()))
def test_snippet_runs_as_written(code, tmp_path):
    with isolated(tmp_path):
        exec(compile(code, "<snippet>", "exec"), {"__name__": "__main__"})


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    with isolated(tmp_path):
        runpy.run_path(str(script), run_name="__main__")


def test_causal_lm_example_loss_goes_down(tmp_path):
    """examples/causal_lm.py: EGN with curvature="sampled" on padded per-token cross-entropy lowers the
    held-out loss at every logged step, to below 0.7 of the untrained model's."""
    with isolated(tmp_path):
        example = runpy.run_path(str(ROOT / "examples" / "causal_lm.py"), run_name="causal_lm_example")
        losses = example["train"]()
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.7 * losses[0], losses
