"""Charts a person would rather look at than read: ASR, hijack rate and utility per defense."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def defense_chart(
    rows: Sequence[dict[str, Any]],
    path: Path,
    title: str = "",
    utility_key: str = "utility",
    caption: str = "",
    utility_label: str = "utility: exact match",
) -> Path:
    """Two panels per defense: rates (ASR with and without trigger, hijack, utility; 95% intervals as error bars
    where the rows carry them) and the target-likelihood gap (nats/token, with its interval); a caption below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [
        str(r.get("defense", r.get("model", "?"))) + (f" s{r['seed']}" if r.get("seed") is not None else "")
        for r in rows
    ]
    series = [
        ("ASR (trigger)", "asr_trigger", "asr_trigger_ci95", "#c0392b"),
        ("hijack rate", "hijack_rate", "hijack_ci95", "#e67e22"),
        ("ASR (clean): false triggers", "asr_clean", "asr_clean_ci95", "#7f8c8d"),
        (utility_label, utility_key, None, "#27ae60"),
    ]
    series = [s for s in series if any(r.get(s[1]) is not None for r in rows)]
    x = np.arange(len(rows))
    width = 0.8 / max(len(series), 1)
    fig, (ax, gap_ax) = plt.subplots(
        1, 2, figsize=(4.5 + 1.9 * len(rows), 4.4), gridspec_kw={"width_ratios": [3, 1.3]}
    )
    for i, (name, key, ci_key, color) in enumerate(series):
        values = np.array([100 * float(r[key]) if r.get(key) is not None else 0.0 for r in rows])
        errors = None
        if ci_key and all(r.get(ci_key) for r in rows):
            lows = np.array([100 * r[ci_key][0] for r in rows])
            highs = np.array([100 * r[ci_key][1] for r in rows])
            errors = np.vstack([np.clip(values - lows, 0, None), np.clip(highs - values, 0, None)])
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name, color=color,
                      yerr=errors, capsize=2, error_kw={"elinewidth": 0.8})  # fmt: skip
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("% of prompts")
    ax.set_ylim(0, 112)
    # Below the axes, so no bar or value label is ever hidden behind it.
    ax.legend(fontsize=7, ncols=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.09), frameon=False)
    ax.set_title("rates (95% intervals)", fontsize=9)
    gaps = [r.get("target_nll_gap") for r in rows]
    if any(g is not None for g in gaps):
        values = np.array([g if g is not None else 0.0 for g in gaps])
        errors = None
        if all(r.get("target_nll_gap_ci95") for r in rows):
            errors = np.vstack([values - [r["target_nll_gap_ci95"][0] for r in rows],
                                [r["target_nll_gap_ci95"][1] for r in rows] - values])  # fmt: skip
            errors = np.clip(errors, 0, None)
        gap_ax.bar(x, values, 0.6, color="#8e44ad", yerr=errors, capsize=2)
        gap_ax.axhline(0, color="black", linewidth=0.6)
        gap_ax.set_xticks(x, labels, fontsize=7, rotation=45, ha="right")
        gap_ax.set_ylabel("nats / token")
        gap_ax.set_title("target NLL gap: clean - triggered", fontsize=9)
    else:
        gap_ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7, wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.07 if caption else 0, 1, 1))
    return save_figure(fig, path, dpi=120)


def save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG atomically (a temporary sibling renamed into place) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path
