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


def over_seeds(
    rows: Sequence[dict[str, Any]], keys: Sequence[str], group: Sequence[str] = ("defense",)
) -> list[dict[str, Any]]:
    """Per group (rows equal in ``group``) that ran with two or more seeds (``row["seed"]`` not None): for each of
    ``keys`` the mean, the sample standard deviation and every seed's value, so no single seed stands for a method.

    Returns one dict per group: the ``group`` fields, ``seeds``, and ``{key: {"mean", "sd", "values"}}``.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("seed") is not None:
            groups.setdefault(tuple(row.get(g) for g in group), []).append(row)
    out = []
    for names, members in groups.items():
        if len(members) < 2:
            continue
        entry: dict[str, Any] = {**dict(zip(group, names, strict=True)), "seeds": [m["seed"] for m in members]}
        for key in keys:
            values = [m[key] for m in members if m.get(key) is not None]
            if len(values) >= 2:
                mean = sum(values) / len(values)
                sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
                entry[key] = {"mean": mean, "sd": sd, "values": values}
        out.append(entry)
    return out


def seeds_table(summary: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], group: str = "defense") -> str:
    """Markdown for :func:`over_seeds`: ``mean +- sd (seed values)`` per cell."""
    present = [(k, h) for k, h in columns if any(k in e for e in summary)]
    lines = [f"| {group} (seeds) | " + " | ".join(h for _, h in present) + " |", "|---" * (len(present) + 1) + "|"]
    for entry in summary:
        cells = []
        for key, _ in present:
            stat = entry.get(key)
            if not stat:
                cells.append("n/a")
                continue
            each = "/".join(format_value(key, v) for v in stat["values"])
            cells.append(f"{format_value(key, stat['mean'])} +- {format_value(key, stat['sd'])} ({each})")
        seeds = ",".join(str(s) for s in entry["seeds"])
        lines.append(f"| {entry[group]} ({seeds}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
