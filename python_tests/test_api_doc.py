"""docs/api.md documents every public argument and exception, and nothing that no longer exists.

The convention (stated at the top of docs/api.md's "Reference" section): each public constructor,
function and user-facing method has a block that opens with a line

    Arguments of `NAME`:

(``NAME`` relative to ``revgn_ext``: ``EGN``, ``EGN.step``, ``ops.gram_factor``, ...), followed by one
bullet per argument whose lead names it in backticks before the first colon
(`` * `lr`: ...`` or `` * `rtol`, `atol`: ...``; continuation lines are indented). A callable without
arguments says ``Arguments of `NAME`: none.`` The public exceptions are listed in the section
"## Errors and warnings", each as a bullet that starts with its name in backticks.

The public surface is read off the package: everything in ``__all__`` of ``revgn_ext``,
``revgn_ext.ops`` and ``revgn_ext.distributed`` that is a class or a function, plus the user-facing
methods in ``METHODS``.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import revgn_ext

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"
MODULES = {"": revgn_ext, "ops.": revgn_ext.ops, "distributed.": revgn_ext.distributed}
# Methods a user calls directly (the rest of the optimizers' methods are torch.optim's or internal).
METHODS = {"EGN": ("step", "direction"), "RevGN": ("step", "direction"),
           "RevMLP": ("forward", "inverse", "forward_with_trace")}

HEADER = re.compile(r"^Arguments of `([\w.]+)`:\s*(none\.)?\s*$")
BULLET = re.compile(r"^\* (.*)$")
LEAD_NAME = re.compile(r"`(\w+)`")


def public_objects() -> dict[str, object]:
    """{doc name: object} for every public class and function, and the listed methods."""
    found = {}
    for prefix, module in MODULES.items():
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                found[prefix + name] = obj
    for cls, methods in METHODS.items():
        for method in methods:
            found[f"{cls}.{method}"] = getattr(getattr(revgn_ext, cls), method)
    return found


def is_exception(obj) -> bool:
    return inspect.isclass(obj) and issubclass(obj, BaseException)


def parameters(obj) -> list[str]:
    """The names a user passes: the signature's parameters without ``self``."""
    return [p for p in inspect.signature(obj).parameters if p != "self"]


def documented(text: str) -> dict[str, tuple[int, dict[str, int]]]:
    """{NAME: (line of its header, {argument: line})} from the ``Arguments of`` blocks of ``text``."""
    blocks: dict[str, tuple[int, dict[str, int]]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = HEADER.match(lines[i])
        if not match:
            i += 1
            continue
        name, header_line = match.group(1), i + 1
        if name in blocks:
            raise AssertionError(f"docs/api.md:{header_line}: a second 'Arguments of `{name}`' block "
                                 f"(the first is at line {blocks[name][0]})")
        args: dict[str, int] = {}
        i += 1
        if not match.group(2):
            while i < len(lines) and (BULLET.match(lines[i]) or lines[i].startswith("  ")):
                bullet = BULLET.match(lines[i])
                if bullet:
                    lead = bullet.group(1).split(":", 1)[0]
                    names = LEAD_NAME.findall(lead)
                    if not names:
                        raise AssertionError(f"docs/api.md:{i + 1}: a bullet in the block of `{name}` "
                                             f"names no argument in backticks before its colon")
                    for arg in names:
                        args[arg] = i + 1
                i += 1
        blocks[name] = (header_line, args)
    return blocks


def errors_section(text: str) -> str:
    match = re.search(r"^## Errors and warnings\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, "docs/api.md has no '## Errors and warnings' section"
    return match.group(1)


TEXT = API.read_text()
OBJECTS = public_objects()
BLOCKS = documented(TEXT)


def test_the_surface_is_found():
    """Guards the test itself: the optimizers' constructors and the new arguments are in view."""
    assert {"EGN", "RevGN", "RevMLP", "EGN.step", "ops.gram_factor", "distributed.resolve"} <= set(OBJECTS)
    assert {"curvature", "samples", "gram_block_rows"} <= set(parameters(revgn_ext.EGN))
    assert BLOCKS["EGN"][1], "the EGN block parsed to no argument"


@pytest.mark.parametrize("name", sorted(n for n, o in OBJECTS.items() if not is_exception(o)))
def test_every_argument_is_documented(name):
    obj = OBJECTS[name]
    assert name in BLOCKS, (f"docs/api.md has no block for `{name}`{inspect.signature(obj)}: add a line "
                            f"'Arguments of `{name}`:' with one bullet per argument (or ': none.')")
    line, doc_args = BLOCKS[name]
    actual = parameters(obj)
    missing = [a for a in actual if a not in doc_args]
    stale = [a for a in doc_args if a not in actual]
    problems = [f"argument `{a}` of `{name}` is not documented (add a bullet '* `{a}`: ...' to the block "
                f"at docs/api.md:{line})" for a in missing]
    problems += [f"docs/api.md:{doc_args[a]} documents `{a}`, which `{name}` no longer takes "
                 f"(its signature: {inspect.signature(obj)})" for a in stale]
    assert not problems, "\n".join(problems)


def test_no_block_for_something_that_is_gone():
    gone = {name: line for name, (line, _) in BLOCKS.items() if name not in OBJECTS}
    assert not gone, "\n".join(f"docs/api.md:{line}: 'Arguments of `{name}`' documents nothing public "
                               f"(not in __all__ of revgn_ext, revgn_ext.ops or revgn_ext.distributed, nor "
                               f"a listed method)" for name, line in gone.items())


def test_the_memory_refusal_raises_the_exported_exception():
    import torch
    from torch import nn
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = revgn_ext.EGN(model, loss="mse", memory_limit=10_000)
    with pytest.raises(revgn_ext.UnsupportedModelError, match="memory_limit"):
        opt.step(torch.randn(32, 5), torch.randn(32, 2))
    assert issubclass(revgn_ext.UnsupportedModelError, ValueError)


def test_exceptions_are_exported_and_documented():
    assert "UnsupportedModelError" in revgn_ext.__all__
    section = errors_section(TEXT)
    listed = set(re.findall(r"^\* `(\w+)`", section, re.MULTILINE))
    exceptions = [name.rsplit(".", 1)[-1] for name, obj in OBJECTS.items() if is_exception(obj)]
    assert exceptions, "no public exception found: UnsupportedModelError should be exported"
    missing = [e for e in exceptions if e not in listed]
    assert not missing, (f"public exception(s) {missing} are not listed in docs/api.md's 'Errors and "
                         f"warnings' section (a bullet starting with the name in backticks)")


def test_parser_reports_missing_and_stale_arguments():
    """The parser reads a block as documented and stops at the first line that is not part of it."""
    text = ("Arguments of `f`:\n* `a`: one\n  continued: with a colon `b`\n* `c`, `d`: two\n\n"
            "* `e`: not in the block\nArguments of `g`: none.\n")
    blocks = documented(text)
    assert set(blocks["f"][1]) == {"a", "c", "d"} and blocks["g"][1] == {}
