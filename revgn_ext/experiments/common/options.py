"""argparse pieces both papers' sub-commands use: value types that refuse bad input with a message
naming the expected form, the help formatter, and the command line as it is recorded in reports."""
from __future__ import annotations

import argparse
import re
import shlex

PROG = "python -m revgn_ext.experiments"


def plain(text: str) -> str:
    """``text`` (a docstring) without reStructuredText markup, for --help: double backquotes and roles
    such as :mod: are dropped, their text kept."""
    text = re.sub(r":[a-z]+:`~?\.*([^`]+)`", r"\1", text)
    return re.sub(r"``([^`]+)``", r"\1", text)


def command_line(argv) -> str:
    """The invocation as a shell command, for reports."""
    return f"{PROG} " + " ".join(shlex.quote(a) for a in argv)


def csv_choices(choices):
    """Type: a comma-separated list, each item one of ``choices`` (None: anything)."""
    def parse(text: str):
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in items if choices is not None and t not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {choices}, got {text!r}")
        return items
    return parse


def seconds(text: str) -> float:
    """Type: a positive finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def distinct_ints(text: str):
    """Type: distinct comma-separated ints."""
    try:
        items = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        items = ()
    if not items or len(set(items)) != len(items):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated ints, got {text!r}")
    return items


def positive_int(text: str):
    """Type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each option's default (an unset option, None, means the
    dataset's preset or the paper's value, as its help says)."""

    @staticmethod
    def _default(action) -> str | None:
        value = action.default
        if value in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return None
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        return f"(default: {text})".replace("%", "%%")

    def _format_action(self, action):
        default = self._default(action)
        if default and "default" not in (action.help or "").lower():
            action.help = f"{action.help} {default}" if action.help else default
        return super()._format_action(action)
