"""Markdown for the reports: tables of numbers and mean ± std cells."""
from __future__ import annotations

import math

from .protocol import Stat


def cell(v, digits: int = 4) -> str:
    """A table cell: a Stat as ``m ± s``, a float to ``digits`` significant digits, NaN and None as "-"."""
    if isinstance(v, Stat):
        return format(v, f".{digits - 1}g")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def markdown_table(rows: list) -> str:
    """A markdown table of dict rows (columns: the first row's keys)."""
    if not rows:
        return "(no runs)\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"
