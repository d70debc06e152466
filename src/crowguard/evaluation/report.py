"""Readable results: a Markdown table for ``results.md`` and the same table on the terminal (rich)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COLUMNS = (
    ("model", "model"),
    ("asr_trigger", "ASR (trigger)"),
    ("asr_clean", "ASR (clean)"),
    ("hijack_rate", "hijack"),
    ("target_nll_gap", "target NLL gap"),
    ("clean_perplexity", "clean ppl"),
    ("exact_match", "exact match"),
    ("humaneval_pass_at_1", "HumanEval pass@1"),
    ("mt_bench", "MT-Bench"),
    ("train_seconds", "train s"),
    ("eval_seconds", "eval s"),
)
PERCENT = {"asr_trigger", "asr_clean", "hijack_rate", "exact_match", "utility", "humaneval_pass_at_1"}


def format_value(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key in PERCENT:
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.1f}" if key.endswith("seconds") else f"{value:.3g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]] = COLUMNS) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (missing keys show as n/a)."""
    present = [(k, h) for k, h in columns if any(k in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h in present) + " |", "|" + "---|" * len(present)]
    for row in rows:
        lines.append("| " + " | ".join(format_value(k, row.get(k)) for k, _ in present) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows: Sequence[dict[str, Any]], title: str = "", columns: Sequence[tuple[str, str]] = COLUMNS) -> None:
    """Print ``rows`` as a rich table."""
    from rich.console import Console
    from rich.table import Table

    present = [(k, h) for k, h in columns if any(k in r for r in rows)]
    table = Table(title=title or None)
    for _, header in present:
        table.add_column(header, justify="left" if header == present[0][1] else "right")
    for row in rows:
        table.add_row(*(format_value(k, row.get(k)) for k, _ in present))
    console = Console()
    if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
