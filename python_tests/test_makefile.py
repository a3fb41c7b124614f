"""The Makefile says what it installs before each install step (pip -q is silent for minutes)."""
import re
from pathlib import Path

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"


def recipe_lines():
    return [line.strip() for line in MAKEFILE.read_text().splitlines() if line.startswith("\t")]


def test_every_pip_install_is_announced_with_what_and_how_large():
    lines = recipe_lines()
    installs = [i for i, line in enumerate(lines) if re.search(r"-m pip install", line)
                and not line.startswith(("echo", "@echo"))]
    assert installs, "no pip install found in the Makefile's recipes"
    for i in installs:
        before = lines[max(0, i - 3):i]
        announced = [b for b in before if b.startswith("@echo") and "installing" in b]
        assert announced, f"Makefile: `{lines[i][:80]}` is not preceded by an '@echo \"make: installing ...\"' line"
    sized = [line for line in lines if line.startswith("@echo") and "installing" in line
             and re.search(r"\d+ ?(MB|GB)|several GB", line)]
    assert any("torch" in line for line in sized), "the torch install step does not say how large it is"
