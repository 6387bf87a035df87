"""What every command-line front end shares (``fxprune.cli`` and the HF route ``fxprune.cli.hf``):
the one-line error type, the aligned Markdown table and how a sparsity is shown. A leaf module, so the front ends import it
instead of each other.

>>> print("\\n".join(markdown_table([("group", "kept"), ("conv1", "32")])))
| group | kept |
|-------|------|
| conv1 | 32   |
"""
from __future__ import annotations

from typing import Any, Mapping


class CliError(Exception):
    """An expected failure: printed as one line, exit status 2."""


def markdown_table(rows: list[tuple[str, ...]]) -> list[str]:
    """An aligned Markdown table: readable in a terminal and in summary.md."""
    rows = [tuple(c.replace("|", "\\|") for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(row: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    return [line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows[1:])]


def format_sparsity(sparsity: Any) -> str:
    """``0.5``, or ``layer*=0.3,fc=0.1`` for a mapping: how a summary's title shows it."""
    if isinstance(sparsity, Mapping):
        return ",".join(f"{k}={v:g}" for k, v in sparsity.items())
    return f"{sparsity:g}"
