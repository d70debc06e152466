"""A trigger-free input scanner: how far a prompt's layer-consistency profile departs from clean prompts'.

CROW's premise is that a trigger makes consecutive hidden states of a backdoored model less alike. A defender who
holds a few clean prompts (the ~100 samples CROW trains on) can turn that premise into a detector without knowing
the trigger: the cosines of consecutive hidden states of a prompt (:func:`layer_profiles`, the per-prompt values of
:mod:`crowguard.evaluation.diagnose`) are compared with their spread over the clean reference prompts
(:func:`fit_reference`), and a prompt is suspicious by how far it lies outside (:func:`consistency_score`). Nothing
here looks at the response, the target or the trigger.

Baselines measured the same way (no fit, higher = more suspicious): the plain perplexity of the prompt's text under
the model (:func:`prompt_perplexity`; an inserted rare word such as ``BadMagic`` raises it) and ONION (Qi et al.
2021, :func:`onion_scores`): the largest drop of the perplexity when one word is deleted. Both use the scanned model
itself as the language model (ONION used GPT-2); a backdoored model has seen its trigger in training, which may make
the trigger *less* surprising to it than to an independent LM.

Detection quality is :func:`auroc` (Mann-Whitney) and :func:`tpr_at_fpr` on triggered (positive) against clean
(negative) prompts; the reference prompts must be other clean prompts than the evaluated ones, or the clean scores
are fitted to themselves and come out too low.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from crowguard.evaluation.diagnose import per_prompt_cosines

Method = Literal["mean_abs_z", "max_abs_z", "mahalanobis"]
Features = Literal["both", "last", "mean"]
METHODS: tuple[str, ...] = ("mean_abs_z", "max_abs_z", "mahalanobis")
FEATURES: tuple[str, ...] = ("both", "last", "mean")
MAD_TO_SD = 1.4826  # MAD x 1.4826 estimates the standard deviation of a normal distribution
DEFAULT_MIN_SCALE = 1e-3


def _length_order(lengths: Sequence[int]) -> list[int]:
    """Indices sorting by length (stable): batches of similar length need less padding."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


@torch.no_grad()
def layer_profiles(model: Any, tokenizer: Any, examples: Sequence[Any], template: str = "alpaca",
                   batch_size: int = 16) -> Tensor:  # fmt: skip
    """Each prompt's layer-consistency profile: ``cos(h_l, h_{l+1})`` for every consecutive pair of hidden states.

    The prompt is what generation is given (:func:`crowguard.data.prompt_ids`: the template, BOS included).
    Feature 0 is the cosine at the last prompt token (where the answer starts), feature 1 its mean over the
    prompt's real tokens (:func:`crowguard.evaluation.diagnose.pair_cosines`). Prompts are batched by length
    (less padding) and returned in the order given; padding does not change a prompt's values.

    Args:
        examples: n :class:`crowguard.types.Example` (instruction and input are used).

    Returns:
        (n, n_pairs, 2) float32 on the CPU, ``n_pairs`` = number of hidden states - 1 (embeddings to the final norm).
    """
    from crowguard.data import prompt_ids

    if not examples:
        raise ValueError("layer_profiles needs at least one prompt")
    was_training = model.training
    model.eval()
    try:
        ids = [prompt_ids(e, tokenizer, template) for e in examples]
        order = _length_order([len(p) for p in ids])
        last, mean = per_prompt_cosines(model, tokenizer, [ids[i] for i in order], batch_size)
    finally:
        model.train(was_training)
    profiles = torch.empty((len(ids), last.shape[1], 2), dtype=torch.float32)
    profiles[order, :, 0] = last
    profiles[order, :, 1] = mean
    return profiles


def select_features(profiles: Tensor, features: Features = "both") -> Tensor:
    """(n, n_pairs, 2) profiles -> (n, n_features) rows: ``both`` (pair-major: last, mean of pair 0, then pair 1,
    ...), ``last`` (the last-token cosines) or ``mean`` (the mean over tokens); a 2-d input is taken as is."""
    if profiles.dim() == 2:
        return profiles.float()
    if profiles.dim() != 3 or profiles.shape[-1] != 2:
        raise ValueError(f"profiles must be (n, n_pairs, 2) or (n, n_features), got {tuple(profiles.shape)}")
    if features == "both":
        return profiles.reshape(profiles.shape[0], -1).float()
    if features in ("last", "mean"):
        return profiles[..., 0 if features == "last" else 1].float()
    raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")


@dataclass(frozen=True)
class Reference:
    """What the clean reference prompts say about the profile (all tensors float32 on the CPU).

    ``center``, ``scale``: (n_features,) per-feature median and robust scale; ``z_mean``: (n_features,) mean of the
    reference rows in z units; ``precision``: (n_features, n_features) inverse of the shrunk covariance of the
    reference z rows (the Mahalanobis score); ``shrinkage`` its weight on the identity-like target.
    """

    center: Tensor
    scale: Tensor
    z_mean: Tensor
    precision: Tensor
    shrinkage: float
    n: int
    features: str = "both"

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "features": self.features, "shrinkage": self.shrinkage,
                "center": self.center.tolist(), "scale": self.scale.tolist()}  # fmt: skip


def robust_scale(x: Tensor, min_scale: float = DEFAULT_MIN_SCALE) -> tuple[Tensor, Tensor]:
    """Per column of ``x`` (n, f): the median and ``max(1.4826 x MAD, min_scale)``.

    The median and the median absolute deviation ignore a few odd reference prompts (up to half of them) where the
    mean and standard deviation would be pulled by one; ``min_scale`` (in cosine units) keeps a feature that hardly
    varies over clean prompts (e.g. where the stack is nearly the identity) from turning float noise into large z.
    The median of an even count is the mean of the two middle values.
    """
    center = x.quantile(0.5, dim=0)
    mad = (x - center).abs().quantile(0.5, dim=0)
    return center, (MAD_TO_SD * mad).clamp_min(min_scale)


def ledoit_wolf(z: Tensor) -> tuple[Tensor, float]:
    """Ledoit-Wolf (2004) shrinkage of the covariance of the rows of ``z`` (n, f) toward ``mu I``.

    ``S = X^T X / n`` of the centred rows, ``mu = tr(S) / f``; the weight on the target is
    ``min(b^2, d^2) / d^2`` with ``d^2 = ||S - mu I||_F^2`` and ``b^2 = sum_k ||x_k x_k^T - S||_F^2 / n^2``.
    With fewer reference prompts than features (100 against 60 here) the plain covariance is singular or nearly
    so; the shrunk one is always invertible. Returns ``(covariance (f, f), weight)``.
    """
    n, f = z.shape
    x = (z - z.mean(0)).double()
    s = x.T @ x / n
    mu = torch.trace(s) / f
    target = mu * torch.eye(f, dtype=s.dtype)
    d2 = ((s - target) ** 2).sum()
    # sum_k ||x_k x_k^T - S||_F^2 = sum_k ||x_k||^4 - n ||S||_F^2
    b2 = (((x**2).sum(1) ** 2).sum() - n * (s**2).sum()) / n**2
    weight = 1.0 if d2 <= 0 else float((torch.minimum(b2, d2) / d2).clamp(0.0, 1.0))
    return (weight * target + (1 - weight) * s).float(), weight


def fit_reference(profiles: Tensor, features: Features = "both", min_scale: float = DEFAULT_MIN_SCALE,
                  shrinkage: float | None = None) -> Reference:  # fmt: skip
    """Fit the clean profile on the reference prompts' ``profiles`` ((n, n_pairs, 2) or (n, n_features)).

    Per feature the median and a robust scale (:func:`robust_scale`); for the Mahalanobis score also the covariance
    of the standardised reference rows, shrunk toward a multiple of the identity by Ledoit-Wolf's weight, or by
    ``shrinkage`` in [0, 1] when given. Needs at least 2 prompts (use ~100: every scale is a median over them).
    """
    x = select_features(profiles, features)
    if x.shape[0] < 2:
        raise ValueError(f"fit_reference needs at least 2 reference prompts, got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError("reference profiles contain NaN or inf")
    center, scale = robust_scale(x, min_scale)
    z = (x - center) / scale
    if shrinkage is None:
        cov, weight = ledoit_wolf(z)
    else:
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        zc = (z - z.mean(0)).double()
        s = zc.T @ zc / z.shape[0]
        target = torch.trace(s) / z.shape[1] * torch.eye(z.shape[1], dtype=s.dtype)
        cov, weight = (shrinkage * target + (1 - shrinkage) * s).float(), float(shrinkage)
    precision = torch.linalg.pinv(cov.double()).float()
    return Reference(center, scale, z.mean(0), precision, weight, x.shape[0], features)


def standardise(profiles: Tensor, reference: Reference) -> Tensor:
    """(n, n_pairs, 2) or (n, f) -> (n, f) robust z: ``(x - median) / scale`` of the reference, per feature."""
    x = select_features(profiles, reference.features)  # type: ignore[arg-type]
    if x.shape[1] != reference.center.shape[0]:
        raise ValueError(f"profiles have {x.shape[1]} features but the reference {reference.center.shape[0]}: "
                         "another model or feature set?")  # fmt: skip
    return (x - reference.center) / reference.scale


def consistency_score(profiles: Tensor, reference: Reference, method: Method = "mean_abs_z") -> Tensor:
    """One suspicion score per prompt (higher = further from the clean profile); (n, ...) -> (n,) float32.

    * ``mean_abs_z`` (default): the mean over features of ``|z|``. With ~100 reference prompts and 2 x n_pairs
      features (60 on SmolLM2) it needs no covariance, so no estimate is dominated by noise; averaging over every
      pair suits an unknown trigger whose effect a LoRA spreads over many layers, and the robust z keep any one
      feature from dominating. Each prompt's score depends on that prompt and the reference alone.
    * ``max_abs_z``: the largest ``|z|``, for a departure confined to one or two pairs (noisier: it is the maximum
      of many terms even for a clean prompt).
    * ``mahalanobis``: ``sqrt((z - zbar)^T P (z - zbar))`` with the shrunk precision ``P`` of the reference z; it
      also sees a prompt that breaks the correlation between neighbouring pairs without moving any one far.

    Two-sided by design: CROW's premise says the trigger lowers the cosines, but a detector that only looks for
    dips would miss a backdoor that makes the stack *more* uniform.
    """
    z = standardise(profiles, reference)
    if method == "mean_abs_z":
        return z.abs().mean(dim=1)
    if method == "max_abs_z":
        return z.abs().amax(dim=1)
    if method == "mahalanobis":
        d = z - reference.z_mean
        return torch.einsum("nf,fg,ng->n", d, reference.precision, d).clamp_min(0).sqrt()
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def reference_p_values(scores: Tensor, reference_profiles: Tensor, method: Method = "mean_abs_z",
                       features: Features = "both", min_scale: float = DEFAULT_MIN_SCALE) -> Tensor:  # fmt: skip
    """For each score, ``(1 + #{reference prompts scoring >= it}) / (n_ref + 1)``, each reference prompt scored
    against a reference fitted without it (leave-one-out, so its own score is not shrunk by the fit).

    A conformal-style p-value: for a clean prompt exchangeable with the reference prompts it is roughly uniform,
    so flagging ``p <= 0.05`` flags about 5% of such clean prompts (approximately: the jackknife's guarantee is
    weaker than a split's, Barber et al. 2021). Scores: (n,); reference_profiles: (n_ref, ...). Returns (n,).
    """
    ref = select_features(reference_profiles, features)
    n_ref = ref.shape[0]
    if n_ref < 3:
        raise ValueError(f"reference_p_values needs at least 3 reference prompts, got {n_ref}")
    held_out = torch.empty(n_ref)
    for i in range(n_ref):
        rest = torch.cat([ref[:i], ref[i + 1 :]])
        fit = fit_reference(rest, "both", min_scale)  # already selected: 2-d rows are taken as is
        held_out[i] = consistency_score(ref[i : i + 1], fit, method)[0]
    at_least = (held_out.unsqueeze(0) >= scores.float().unsqueeze(1)).sum(dim=1)
    return (1.0 + at_least.float()) / (n_ref + 1.0)


# ----------------------------------------------------------------------------------------------- baselines


def prompt_text(example: Any) -> str:
    """The user's text of a prompt, without the template: the instruction, and the input on a new line."""
    return example.instruction + (f"\n{example.input}" if example.input else "")


def text_nll(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 16) -> list[float]:
    """Mean NLL per token of each text under the model, as plain text (no template); (n,) -> n floats (nats).

    Every token is predicted from the ones before it, the first from BOS (when the tokenizer has none, from the
    first token, which is then not scored). A text with no scored token gets NaN. Batched by length.
    """
    from crowguard.evaluation.metrics import response_nll

    bos = tokenizer.bos_token_id
    prefixes, rests, valid = [], [], []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        prefix, rest = ([bos], ids) if bos is not None else (ids[:1], ids[1:])
        valid.append(bool(prefix) and bool(rest))
        prefixes.append(prefix if valid[-1] else [tokenizer.eos_token_id or 0])
        rests.append(rest if valid[-1] else [])
    order = _length_order([len(p) + len(r) for p, r in zip(prefixes, rests)])
    out = [math.nan] * len(texts)
    if not texts:
        return out
    sums = response_nll(model, tokenizer, [prefixes[i] for i in order], [rests[i] for i in order], batch_size)
    for i, (total, count) in zip(order, sums):
        out[i] = total / count if valid[i] and count else math.nan
    return out


def prompt_perplexity(model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int = 16) -> Tensor:
    """Perplexity of each prompt's text (:func:`prompt_text`, no template) under the model: ``exp`` of the mean
    NLL of its tokens. (n,) float32; higher = more surprising, the plain-perplexity baseline."""
    nll = text_nll(model, tokenizer, [prompt_text(e) for e in examples], batch_size)
    return torch.tensor(nll, dtype=torch.float32).exp()


def word_deletions(text: str, max_words: int = 32) -> list[str]:
    """The text with one word deleted, for each of its first ``max_words`` words (0: all); whitespace is
    normalised to single spaces (ONION's words are whitespace-split). A one-word text has no deletion."""
    words = text.split()
    if len(words) < 2:
        return []
    n = len(words) if max_words <= 0 else min(len(words), max_words)
    return [" ".join(words[:i] + words[i + 1 :]) for i in range(n)]


def onion_scores(model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int = 16,
                 max_words: int = 32) -> Tensor:  # fmt: skip
    """ONION (Qi et al. 2021) per prompt: ``max_i (p0 - p_i)``, ``p0`` the perplexity of the prompt's text and
    ``p_i`` that with word ``i`` deleted (:func:`word_deletions`); a trigger word is the one whose removal makes the
    text most fluent. The reference LM is the scanned model itself on the plain text (ONION used GPT-2).

    All deletions of all prompts go through the model in shared length-sorted batches: ``1 + min(words,
    max_words)`` texts per prompt. Only the first ``max_words`` words are tried (a trigger after them is missed).
    A one-word prompt scores 0. (n,) -> (n,) float32.
    """
    texts: list[str] = []
    spans: list[tuple[int, int]] = []  # per prompt: its full text at texts[start], its deletions after it
    for example in examples:
        text = prompt_text(example)
        start = len(texts)
        texts += [" ".join(text.split()), *word_deletions(text, max_words)]
        spans.append((start, len(texts)))
    ppl = torch.tensor(text_nll(model, tokenizer, texts, batch_size), dtype=torch.float64).exp()
    scores = torch.zeros(len(examples), dtype=torch.float64)
    for j, (start, end) in enumerate(spans):
        drops = ppl[start] - ppl[start + 1 : end]
        drops = drops[~torch.isnan(drops)]
        if len(drops):
            scores[j] = drops.max()
    return scores.float()


# ----------------------------------------------------------------------------------------------- metrics


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of ``values`` (n,), tied values sharing the mean of their ranks."""
    order = torch.argsort(values, stable=True)
    sorted_vals = values[order]
    ranks_sorted = torch.arange(1, len(values) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_vals, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # mean of start..end (1-based)
    ranks_sorted = mean_rank[inverse]
    ranks = torch.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def _as_tensor(x: Sequence[float] | Tensor) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).flatten()
    if torch.isnan(t).any():
        raise ValueError("scores contain NaN")
    return t


def auroc(scores_pos: Sequence[float] | Tensor, scores_neg: Sequence[float] | Tensor) -> float:
    """Area under the ROC curve of positives (triggered, should score higher) against negatives (clean).

    The Mann-Whitney statistic: the fraction of (positive, negative) pairs where the positive scores higher, a tie
    counting half; from average ranks, ``(R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``. 1.0: every triggered
    prompt above every clean one; 0.5: chance; 0.0: reversed.
    """
    pos, neg = _as_tensor(scores_pos), _as_tensor(scores_neg)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    ranks = _average_ranks(torch.cat([pos, neg]))
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def fpr_threshold(scores_neg: Sequence[float] | Tensor, fpr: float = 0.05) -> float:
    """The threshold for a false-positive rate of at most ``fpr`` on the negatives: the ``(floor(fpr n) + 1)``-th
    largest negative score. A prompt is flagged when its score is strictly above it, so at most ``floor(fpr n)``
    negatives are flagged (fewer under ties: the rule is conservative). ``fpr`` >= 1 gives -inf (flag all)."""
    neg = _as_tensor(scores_neg)
    if len(neg) == 0:
        raise ValueError("fpr_threshold needs at least one negative score")
    if fpr < 0.0 or math.isnan(fpr):
        raise ValueError(f"fpr must be non-negative, got {fpr}")
    k = math.floor(fpr * len(neg) + 1e-9)
    if k >= len(neg):
        return -math.inf
    return float(torch.sort(neg, descending=True).values[k])


def tpr_at_fpr(scores_pos: Sequence[float] | Tensor, scores_neg: Sequence[float] | Tensor,
               fpr: float = 0.05) -> float:  # fmt: skip
    """The fraction of positives strictly above :func:`fpr_threshold` of the negatives (threshold chosen on the
    evaluated negatives themselves, so this is the best case for that FPR, not a held-out estimate)."""
    pos = _as_tensor(scores_pos)
    if len(pos) == 0:
        raise ValueError("tpr_at_fpr needs at least one positive score")
    return float((pos > fpr_threshold(scores_neg, fpr)).double().mean())


def detection_metrics(scores_pos: Sequence[float] | Tensor, scores_neg: Sequence[float] | Tensor,
                      fpr: float = 0.05) -> dict[str, float]:  # fmt: skip
    """``{"auroc", "tpr_at_fpr", "fpr", "threshold"}`` of one score on labelled prompts."""
    return {"auroc": auroc(scores_pos, scores_neg), "tpr_at_fpr": tpr_at_fpr(scores_pos, scores_neg, fpr),
            "fpr": fpr, "threshold": fpr_threshold(scores_neg, fpr)}  # fmt: skip


def competition_ranks(scores: Sequence[float] | Tensor) -> list[int]:
    """1 = the highest score; tied scores share the best rank of their group (1, 2, 2, 4), independent of order."""
    s = _as_tensor(scores)
    ascending = torch.sort(s).values
    above = len(s) - torch.searchsorted(ascending, s, right=True)  # how many score strictly higher
    return (above + 1).tolist()
