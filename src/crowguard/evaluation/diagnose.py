"""The layer-consistency diagnostic (Figure 1 of the CROW paper): where in the stack does the trigger show up?

For clean and triggered prompts, the cosine between consecutive hidden states ``h_l`` and ``h_{l+1}`` for every
pair of the model (embedding output included), at the last prompt token and averaged over the prompt's real tokens.
CROW's premise is that a backdoored model's representations jump between layers when the trigger is present, so the
triggered curve should dip where the backdoor acts; whether CROW's default pairs (``hidden_states[1:-2]`` vs
``[2:-1]``) cover that place is then visible on the plot.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from crowguard.config import knob
from crowguard.evaluation.plots import save_figure
from crowguard.losses import resolve_layer_pairs
from crowguard.prompts import Template
from crowguard.schemas import TaskSource


@dataclass
class DiagnoseConfig(TaskSource):
    """``crowguard diagnose``: per-layer cosine of consecutive hidden states, clean vs triggered prompts (the CROW
    paper's Figure 1), for one or more models."""

    model: list[str] = knob([], "[LABEL=]PATH of a model or adapter directory; several to compare (repeatable)")
    limit: int = knob(50, "prompts of each set", bounds="[1, inf)")
    template: Template = knob("alpaca", "prompt template")

    def validate(self) -> None:
        if not self.model:
            raise ValueError("give --model [LABEL=]PATH (repeat it to compare models)")
        self.labelled_models()

    def labelled_models(self) -> dict[str, str]:
        """``{label: path}``: ``LABEL=PATH``, or a bare path labelled by its folder's name."""
        models: dict[str, str] = {}
        for spec in self.model:
            label, sep, path = spec.partition("=")
            if not sep:
                label, path = Path(spec).name or spec, spec
            if not label.strip() or not path.strip():
                raise ValueError(f"--model {spec!r}: expected LABEL=PATH (or a PATH) with both parts non-empty")
            if label in models:
                raise ValueError(f"--model {spec}: the label {label!r} is given twice (use LABEL=PATH)")
            models[label] = path
        return models


def pair_cosines(hidden_states: Sequence[Tensor], attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per example and layer pair, ``cos(h_l, h_{l+1})`` at the last real token and averaged over real tokens.

    Args:
        hidden_states: n tensors (B, T, D): index 0 the embedding output, the last one after the final norm.
        attention_mask: (B, T), 1 for real tokens, 0 for padding (left or right).

    Returns:
        ``(last, mean)``, each (B, n - 1) float32: column l is the pair (l, l + 1).
    """
    real = attention_mask.to(hidden_states[0].device) != 0
    positions = torch.arange(real.shape[1], device=real.device).expand_as(real)
    last_index = torch.where(real, positions, -1).amax(dim=1)  # (B,)
    rows = torch.arange(real.shape[0], device=real.device)
    weights = real.float() / real.sum(dim=1, keepdim=True).clamp_min(1)
    last, mean = [], []
    for lower, upper in itertools.pairwise(hidden_states):
        cos = F.cosine_similarity(lower.float(), upper.float(), dim=-1)  # (B, T)
        last.append(cos[rows, last_index])
        mean.append((cos.masked_fill(~real, 0.0) * weights).sum(dim=1))
    return torch.stack(last, dim=1), torch.stack(mean, dim=1)


@torch.no_grad()
def per_prompt_cosines(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], batch_size: int = 16
) -> tuple[Tensor, Tensor]:
    """:func:`pair_cosines` of each prompt (token id lists), in the order given; right padding, the prompts only.

    Returns:
        ``(last, mean)``, each (n_prompts, n_hidden_states - 1) float32 on the CPU.
    """
    from crowguard.losses import accepts_logits_to_keep

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    skip_logits = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}  # only hidden states are needed
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lasts, means = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, : len(p)] = torch.tensor(list(p), dtype=torch.long)
            mask[i, : len(p)] = 1
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                    use_cache=False, **skip_logits)  # fmt: skip
        last, mean = pair_cosines(out.hidden_states, mask)
        lasts.append(last.cpu())
        means.append(mean.cpu())
    return torch.cat(lasts), torch.cat(means)


def prompt_cosines(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], batch_size: int = 16
) -> dict[str, list[float]]:
    """Mean over prompts (token id lists) of :func:`pair_cosines`; right padding, the prompts only."""
    last, mean = per_prompt_cosines(model, tokenizer, prompts, batch_size)
    return {"last_token": last.mean(0).tolist(), "mean_tokens": mean.mean(0).tolist()}


def diagnose_model(
    model: Any,
    tokenizer: Any,
    clean: Sequence[Any],
    triggered: Sequence[Any],
    template: str = "alpaca",
    batch_size: int = 16,
) -> dict[str, Any]:
    """Clean vs triggered per-pair cosines of one model, the gap, and which pairs CROW's default loss covers."""
    from crowguard.data import prompt_ids

    model.eval()
    result: dict[str, Any] = {}
    for name, examples in (("clean", clean), ("triggered", triggered)):
        result[name] = prompt_cosines(model, tokenizer, [prompt_ids(e, tokenizer, template) for e in examples],
                                      batch_size)  # fmt: skip
    n_pairs = len(result["clean"]["last_token"])
    result["gap"] = {
        key: [c - t for c, t in zip(result["clean"][key], result["triggered"][key])] for key in result["clean"]
    }
    result["pairs"] = [[i, i + 1] for i in range(n_pairs)]
    try:
        result["reference_pairs"] = [lower for lower, _ in resolve_layer_pairs(n_pairs + 1, "reference")]
    except ValueError:
        result["reference_pairs"] = []
    result["largest_gap_pair"] = {key: max(range(n_pairs), key=lambda i: gap[i]) for key, gap in result["gap"].items()}
    result["n_prompts"] = {"clean": len(clean), "triggered": len(triggered)}
    return result


def diagnostic_plot(results: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path:
    """:func:`diagnostic_figure` written to ``path`` as PNG (atomically)."""
    return save_figure(diagnostic_figure(results, title), path, dpi=110)


def diagnostic_figure(results: dict[str, dict[str, Any]], title: str = "") -> Any:
    """Three panels: the cosine per layer pair at the last prompt token and averaged over prompt tokens, clean
    (solid) vs triggered (dashed) for each model, and the clean - triggered gap at the last token (where a trigger
    that breaks consistency would show as a peak); CROW's default pairs shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ref = next(iter(results.values()))["reference_pairs"]
    panels = (("last_token", "cos at the last prompt token"), ("mean_tokens", "cos, mean over prompt tokens"))
    for ax, (key, label) in zip(axes, panels):
        for i, (model_name, res) in enumerate(results.items()):
            color = colors[i % len(colors)]
            xs = list(range(len(res["clean"][key])))
            ax.plot(xs, res["clean"][key], color=color, label=f"{model_name}: clean")
            ax.plot(xs, res["triggered"][key], color=color, linestyle="--", label=f"{model_name}: triggered")
        ax.set_ylabel("cos(h_l, h_l+1)")
        ax.set_title(label, fontsize=9)
    for i, (model_name, res) in enumerate(results.items()):
        gap = res["gap"]["last_token"]
        axes[2].plot(range(len(gap)), gap, color=colors[i % len(colors)], marker=".", label=model_name)
    axes[2].axhline(0, color="black", linewidth=0.6)
    axes[2].set_ylabel("clean - triggered cos")
    axes[2].set_title("trigger effect at the last prompt token", fontsize=9)
    for ax in axes:
        if ref:
            ax.axvspan(ref[0] - 0.5, ref[-1] + 0.5, color="#dddddd", alpha=0.5, label="CROW's default pairs")
        ax.set_xlabel("layer pair (l, l+1); l = hidden-state index, 0 = embeddings")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # pairs are whole layers, never 2.5
    axes[1].legend(fontsize=7, loc="lower center")
    axes[2].legend(fontsize=7, loc="best")
    fig.suptitle(title or "layer consistency: clean vs triggered prompts", fontsize=10)
    fig.text(0.01, 0.01, "How to read it: where a dashed (triggered) line leaves its solid (clean) line, the trigger "
             "breaks layer consistency there; a gap near 0 everywhere means the trigger leaves no trace CROW's "
             "loss can see. The gap panel's peak is the layer pair to look at.", fontsize=8)  # fmt: skip
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
