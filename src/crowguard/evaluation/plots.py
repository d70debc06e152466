"""Charts a person would rather look at than read: ASR, hijack rate and utility per defense."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def defense_chart(rows: Sequence[dict[str, Any]], path: Path, title: str = "", utility_key: str = "utility") -> Path:
    """Grouped bars per defense: ASR with trigger, hijack rate, false-trigger rate (left axis, %), and utility."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [
        str(r.get("defense", r.get("model", "?"))) + (f"\nseed {r['seed']}" if r.get("seed") is not None else "")
        for r in rows
    ]
    series = [
        ("ASR (trigger)", "asr_trigger", "#c0392b"),
        ("hijack rate", "hijack_rate", "#e67e22"),
        ("ASR (clean)", "asr_clean", "#7f8c8d"),
        ("utility", utility_key, "#27ae60"),
    ]
    series = [s for s in series if any(r.get(s[1]) is not None for r in rows)]
    x = np.arange(len(rows))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rows), 3.6))
    for i, (name, key, color) in enumerate(series):
        values = [100 * float(r[key]) if r.get(key) is not None else 0.0 for r in rows]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name, color=color)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(x, labels)
    ax.set_ylabel("%")
    ax.set_ylim(0, 110)
    ax.set_title(title)
    ax.legend(fontsize=7, ncols=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
