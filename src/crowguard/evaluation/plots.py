"""Charts a person would rather look at than read: ASR, hijack rate and utility per defense."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def defense_chart(rows: Sequence[dict[str, Any]], path: Path, **kwargs: Any) -> Path:
    """:func:`defense_figure` written to ``path`` as PNG (atomically)."""
    return save_figure(defense_figure(rows, **kwargs), path, dpi=120)


def defense_figure(
    rows: Sequence[dict[str, Any]],
    title: str = "",
    utility_key: str = "utility",
    caption: str = "",
    utility_label: str = "utility: exact match",
    warning: str = "",
) -> Any:
    """Two panels per defense: rates (ASR with and without trigger, hijack, utility; 95% intervals as error bars
    where the rows carry them) and the target-likelihood gap (nats/token, with its interval); a caption below.
    A 0% rate is drawn as a short line on the axis (an empty slot would read as "not measured"); ``warning`` (the
    backdoor did not take) is written in red across the top, so the chart cannot be read as a removal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [row_label(r) for r in rows]
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
        where = x + (i - (len(series) - 1) / 2) * width
        bars = ax.bar(where, values, width, label=name, color=color,
                      yerr=errors, capsize=2, error_kw={"elinewidth": 0.8})  # fmt: skip
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
        for position, value in zip(where, values):
            if value == 0:  # measured as 0%: a line on the axis, not an empty slot
                ax.plot([position - width / 2, position + width / 2], [0, 0], color=color, linewidth=3,
                        solid_capstyle="butt", clip_on=False)  # fmt: skip
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
    if warning:
        fig.text(0.5, 0.905, "NOT A REMOVAL: " + warning, color="#c0392b", fontsize=9, ha="center", va="top",
                 wrap=True, bbox={"facecolor": "#fdecea", "edgecolor": "#c0392b"})  # fmt: skip
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7, wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.07 if caption else 0, 1, 0.84 if warning else 1))
    return fig


def row_label(row: dict[str, Any]) -> str:
    """A row's name on the chart: the model without any defense is ``backdoored (no defense)``, never ``none``."""
    name = str(row.get("defense", row.get("model", "?")))
    name = "backdoored (no defense)" if name in ("none", "backdoored") else name
    return name + (f" s{row['seed']}" if row.get("seed") is not None else "")


def save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG atomically (a temporary sibling renamed into place) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path
