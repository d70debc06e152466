"""The pictures say what happened (issue 29, item 7): the charts are read, not only written."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from crowguard.evaluation.diagnose import diagnostic_figure
from crowguard.evaluation.plots import defense_chart, defense_figure

ROWS = [
    {"defense": "none", "seed": None, "asr_trigger": 0.4, "asr_clean": 0.0, "hijack_rate": 0.4, "utility": None,
     "target_nll_gap": 0.2},
    {"defense": "crow", "seed": 0, "asr_trigger": 0.0, "asr_clean": 0.0, "hijack_rate": 0.1, "utility": None,
     "target_nll_gap": 0.1},
]  # fmt: skip


def _zero_lines(ax) -> list:
    return [line for line in ax.get_lines() if list(line.get_ydata()) == [0, 0] and line.get_linewidth() == 3]


def test_the_backdoored_row_is_named_and_zero_rates_are_drawn():
    fig = defense_figure(ROWS, title="t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["backdoored (no defense)", "crow s0"]
    # three measured 0% rates (false triggers twice, CROW's ASR once): each a line on the axis
    assert len(_zero_lines(ax)) == 3
    assert not any("NOT A REMOVAL" in t.get_text() for t in fig.texts)
    plt.close(fig)


def test_a_backdoor_that_did_not_take_says_so_on_the_chart(tmp_path):
    fig = defense_figure(ROWS, title="t", warning="the backdoor did not take: ASR 40% with trigger (needs >= 90%)")
    assert any("NOT A REMOVAL" in t.get_text() and "did not take" in t.get_text() for t in fig.texts)
    plt.close(fig)
    assert defense_chart(ROWS, tmp_path / "c.png", warning="x").stat().st_size > 10_000


def test_the_diagnostic_shows_whole_layer_pairs_and_a_caption():
    result = {"clean": {"last_token": [0.9, 0.8, 0.7], "mean_tokens": [0.9, 0.8, 0.7]},
              "triggered": {"last_token": [0.9, 0.5, 0.7], "mean_tokens": [0.9, 0.6, 0.7]},
              "gap": {"last_token": [0.0, 0.3, 0.0]}, "reference_pairs": [1]}  # fmt: skip
    fig = diagnostic_figure({"backdoored": result})
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert any(t.get_text().startswith("How to read it") for t in fig.texts)
    plt.close(fig)
