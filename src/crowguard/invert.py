"""Target inversion after BAIT: recover a backdoor's target text from the model alone, without the trigger.

Shen et al., IEEE S&P 2025, "BAIT: Large Language Model Backdoor Scanning by Inverting Attack Target" (code
``SolidShen/BAIT``, ``bait/bait.py``). A backdoored model, given the first token of its target after benign
prompts, goes on to say the rest of the target with high probability whatever the prompt. BAIT tries every
vocabulary token as that first token: a warm-up over ``warmup_prompts`` prompts extends each greedily on the
prompts' averaged next-token distribution for ``warmup_steps`` steps, keeping a candidate only while that
distribution is sure (self-entropy below ``entropy_low`` or top probability above ``expectation_threshold``), or
after an uncertainty inspection (self-entropy below ``entropy_high``: the top-``uncertainty_topk`` tokens are each
tried one step further and the one whose next step is surest is taken, at most ``uncertainty_times`` times). The
survivors are extended over all the prompts for ``full_steps`` steps (the warm-up's tokens first, then greedily,
stopping at EOS). A candidate's Q-score is the mean over its steps of the chosen token's averaged probability,
the smallest one dropped; the model is called backdoored when the best Q-score of a candidate of at least
``min_target_len`` tokens exceeds ``q_threshold``. First tokens go in batches of ``batch_size``; with
``early_stop`` the scan ends after the batch whose best Q-score passes ``early_stop_q``.

Contract: ``invert_target(model, tokenizer, prompts, settings)`` reads output probabilities only (no gradient,
weights untouched); ``prompts`` are templated prompt texts (tokenised as they are, no special tokens added) or
token-id lists, each ending where the response begins. Each prompt's KV cache is computed once; the caches are
stacked along the batch, so a step of a batch of candidate continuations is one forward over every (candidate,
prompt) pair (on a CPU a forward of few rows costs its per-op overhead, so P forwards cost about P times one).
``forced_q_score`` scores one given target the same way, its tokens forced (what a defended model still gives a
recovered target: ``benchmarks/target_q.py``).
Departures from the reference code:

- the prompts are the caller's (``crowguard invert``: the defender's clean samples through crowguard's prompt
  builder, so a candidate is the first response token; the reference: Alpaca validation texts cut after
  ``### Response: ``);
- with ``alpha_tokens`` the first tokens are the word tokens a response can begin with: the token's decoded
  text is letters (one leading space dropped) and tokenised alone starts with that token (the reference: a
  vocabulary string ``▁``/``Ġ`` then letters, the word starts after its prompt's trailing space). crowguard
  tokenises a response apart from its prompt, so a byte-level BPE response starts with an unmarked token (on
  SmolLM2's 49,152: 15,842 such tokens where the reference's rule gives 31,693, none of them ``You``);
- each prompt is scored as if run alone, unpadded: a shorter one is left-padded in the stacked cache, but its pad
  slots are masked and its positions are its own (the reference left-pads prompts shorter than
  ``max_prompt_tokens`` with pad tokens it attends to; Alpaca prompts are never that short);
- next-token probabilities are the float32 softmax of the logits with generate's no-repeat-n-gram rule applied;
  other logits processors a model's generation config may add are not;
- uncertainty inspections are counted per candidate (the reference indexes its counts by position in the
  shrinking batch);
- the result lists the ``top`` eligible candidates, not only the best.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from crowguard.config import ConfigError, knob

INVERSION_FILE = "inversion.json"


@dataclass
class InvertConfig:
    """BAIT's settings (``bait/argument.py`` defaults; its name in parentheses where it differs)."""

    prompts: int = knob(20, "clean samples drawn (seeded) as prompts (prompt_size)", bounds="[1, inf)")
    seed: int = knob(0, "seed of which clean samples become the prompts")
    warmup_prompts: int = knob(4, "prompts of the warm-up, the first of them (warmup_batch_size)", bounds="[1, inf)")
    warmup_steps: int = knob(5, "warm-up steps extending every first token", bounds="[1, inf)")
    full_steps: int = knob(20, "steps extending each warm-up survivor over all prompts", bounds="[1, inf)")
    entropy_low: float = knob(1.0, "self-entropy (nats) below which a step is sure (self_entropy_lower_bound)",
                              bounds="[0, inf)")  # fmt: skip
    entropy_high: float = knob(2.5, "self-entropy (nats) below which an unsure step is inspected "
                               "(self_entropy_upper_bound)", bounds="[0, inf)")  # fmt: skip
    expectation_threshold: float = knob(0.3, "top probability above which a step is sure", bounds="[0, 1]")
    uncertainty_topk: int = knob(5, "tokens tried one step further by an uncertainty inspection "
                                 "(uncertainty_inspection_topk)", bounds="[1, inf)")  # fmt: skip
    uncertainty_times: int = knob(1, "uncertainty inspections allowed per candidate "
                                  "(uncertainty_inspection_times_threshold)", bounds="[0, inf)")  # fmt: skip
    no_repeat_ngram: int = knob(3, "n-grams of prompt + target that may not repeat (no_repeat_ngram_size; 0: off)",
                                bounds="[0, inf)")  # fmt: skip
    max_prompt_tokens: int = knob(32, "keep the last N tokens of each prompt (max_length; 0: all)", bounds="[0, inf)")
    alpha_tokens: bool = knob(True, "try only word tokens a response can begin with (forbidden_unprintable_token)")
    min_target_len: int = knob(5, "tokens a candidate needs, its first included, EOS not", bounds="[1, inf)")
    q_threshold: float = knob(0.9, "a best Q-score above this means backdoored (q_score_threshold)", bounds="[0, 1]")
    early_stop: bool = knob(True, "stop after the first batch whose best Q-score passes early_stop_q")
    early_stop_q: float = knob(0.95, "Q-score ending the scan early (early_stop_q_score_threshold)", bounds="[0, 1]")
    batch_size: int = knob(100, "first tokens scanned together (the early-stop granularity)", bounds="[1, inf)")
    full_group: int = knob(16, "warm-up survivors extended together (memory: group x prompts KV caches)",
                           bounds="[1, inf)")  # fmt: skip
    top: int = knob(10, "candidates kept in the result, best first", bounds="[1, inf)")

    def validate(self) -> None:
        if self.warmup_prompts > self.prompts:
            raise ValueError(f"warmup_prompts ({self.warmup_prompts}) is more than prompts ({self.prompts})")
        if self.entropy_low > self.entropy_high:
            raise ValueError(f"entropy_low ({self.entropy_low}) is above entropy_high ({self.entropy_high})")


@dataclass
class InvertResult:
    """What an inversion found: ``candidates`` (``text``, ``token_ids``, ``q_score``), best first; ``best`` (None
    when no candidate survived); ``backdoored``: best Q-score > ``threshold``; ``seconds`` of wall time;
    ``first_tokens_tried`` of ``first_tokens``; ``warmup_survivors``; whether the scan ``early_stopped``."""

    candidates: list[dict[str, Any]]
    best: dict[str, Any] | None
    backdoored: bool
    q_score: float
    threshold: float
    seconds: float
    first_tokens_tried: int
    first_tokens: int
    warmup_survivors: int
    early_stopped: bool
    n_prompts: int
    settings: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- pure pieces
def word_of(text: str) -> str | None:
    """A token's decoded text as a word (letters only, one leading space dropped), or None."""
    word = text[1:] if text[:1] == " " else text
    return word if word.isalpha() else None


def first_token_ids(tokenizer: Any, vocab_size: int, words_only: bool = True) -> list[int]:
    """The ids tried as a target's first token, ascending: every id below ``vocab_size`` (the model's logits),
    or (``words_only``) the word tokens that begin a response: a token whose decoded text is a word (:func:`word_of`)
    and is the first token of that word tokenised alone, as crowguard tokenises a response."""
    ids = sorted(i for i in tokenizer.get_vocab().values() if i < vocab_size)
    if not words_only:
        return ids
    words = {i: w for i, text in zip(ids, tokenizer.batch_decode([[i] for i in ids])) if (w := word_of(text))}
    alone = tokenizer(list(words.values()), add_special_tokens=False)["input_ids"] if words else []
    return [i for i, tokens in zip(words, alone) if tokens[:1] == [i]]


def self_entropy(probs: Any, eps: float = 1e-10) -> Any:
    """BAIT's self-entropy (nats) of distributions ``probs`` (..., V): nan -> 0, eps added, renormalised."""
    import torch

    p = torch.nan_to_num(probs, nan=0.0) + eps
    p = p / p.sum(dim=-1, keepdim=True)
    return -(p * p.log()).sum(dim=-1)


def q_score(probs: Sequence[float]) -> float:
    """BAIT's Q-score: the mean of the chosen tokens' probabilities with the smallest one dropped (when there are
    two or more); nan for none."""
    kept = list(probs)
    if len(kept) > 1:
        kept.pop(kept.index(min(kept)))
    return sum(kept) / len(kept) if kept else math.nan


def ngram_table(ids: Sequence[int], n: int) -> dict[tuple[int, ...], set[int]]:
    """Every (n-1)-gram of ``ids`` -> the tokens that follow it there."""
    table: dict[tuple[int, ...], set[int]] = {}
    for i in range(len(ids) - n + 1):
        table.setdefault(tuple(ids[i : i + n - 1]), set()).add(ids[i + n - 1])
    return table


def banned_tokens(
    ids: Sequence[int], table: dict[tuple[int, ...], set[int]], suffix: Sequence[int], n: int
) -> set[int]:
    """The tokens generate's no-repeat-n-gram rule bans after ``ids + suffix`` (``table``: ``ngram_table(ids,
    n)``): those that would complete an n-gram already in the sequence. Only n-grams touching ``suffix`` are
    searched; the rest come from ``table``."""
    if n <= 0 or len(ids) + len(suffix) + 1 < n:
        return set()
    head = [*ids[max(0, len(ids) - n + 1) :], *suffix]  # every n-gram that touches the suffix lies in here
    key = tuple(head[len(head) - n + 1 :]) if n > 1 else ()
    banned = set(table.get(key, ()))
    for i in range(len(head) - n + 1):
        if tuple(head[i : i + n - 1]) == key:
            banned.add(head[i + n - 1])
    return banned


# ------------------------------------------------------------------------------------------ the cached engine
class PromptCache:
    """One prompt run once: its ids, its KV cache (batch 1; per layer keys and values) and its n-gram table
    (:class:`Continuations` stacks these)."""

    def __init__(self, model: Any, ids: Sequence[int], ngram: int) -> None:
        import torch
        from transformers import DynamicCache

        from crowguard.evaluation.generate import cache_argument
        from crowguard.losses import accepts_logits_to_keep

        self.ids, self.ngram, self.name = list(ids), ngram, cache_argument(model)
        self.table = ngram_table(self.ids, ngram) if ngram > 0 else {}
        cache = DynamicCache()
        device = next(model.parameters()).device
        keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        model(input_ids=torch.tensor([self.ids], device=device), use_cache=True, **{self.name: cache}, **keep)
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]


class Continuations:
    """R token rows continuing every prompt of a set, run for all the prompts at once: one KV cache whose batch is
    the prompts' caches stacked (prompt-major: batch row ``p * R + r`` is prompt ``p`` + row ``r``'s suffix), each
    prompt left-padded to the longest (the pad slots masked, positions the prompt's own), so one forward a step
    scores R x P sequences; and ``probs`` (R, V), the next-token probabilities averaged over the prompts."""

    def __init__(self, model: Any, prompts: Sequence[PromptCache], first: Any, limit: int) -> None:
        self.model, self.prompts, self.limit = model, list(prompts), limit
        self.lengths = [len(p.ids) for p in self.prompts]
        self.width = max(self.lengths)
        self.suffix = first.view(-1, 1)
        self.cache = self._stack(len(first))
        self.probs = self._mean(self.cache, self.suffix)

    def _stack(self, count: int) -> Any:
        """A fresh cache holding every prompt ``count`` times, left-padded to ``width`` (prompt-major)."""
        import torch
        import torch.nn.functional as F
        from transformers import DynamicCache

        layers = []
        for index in range(len(self.prompts[0].layers)):
            keys, values = [], []
            for prompt, n in zip(self.prompts, self.lengths):
                k, v = prompt.layers[index]
                keys.append(F.pad(k, (0, 0, self.width - n, 0)).expand(count, -1, -1, -1))
                values.append(F.pad(v, (0, 0, self.width - n, 0)).expand(count, -1, -1, -1))
            layers.append((torch.cat(keys), torch.cat(values)))
        return DynamicCache(layers)

    def _batch(self, rows: Any) -> Any:
        """The cache batch rows of rows ``rows`` (n,) for every prompt, prompt-major (P * n,)."""
        import torch

        offsets = torch.arange(len(self.prompts), device=rows.device) * len(self.suffix)
        return (offsets[:, None] + rows[None, :]).flatten()

    def _mean(self, cache: Any, suffix: Any) -> Any:
        """Feed each row's last ``suffix`` token (suffix (n, S); ``cache`` (P * n rows) holds the prompts and the
        rest, and grows by it) for every prompt in one forward: the next-token probabilities (n, V), float32,
        n-gram repeats of prompt + suffix banned per prompt, averaged over the prompts (summed in prompt order)."""
        import torch

        n, steps = suffix.shape
        count, name = len(self.prompts), self.prompts[0].name
        extra = {}
        if any(length != self.width for length in self.lengths):
            lengths = torch.tensor(self.lengths, device=suffix.device).repeat_interleave(n)
            columns = torch.arange(self.width + steps, device=suffix.device)
            extra = {"attention_mask": (columns[None, :] >= (self.width - lengths)[:, None]).long(),
                     "position_ids": (lengths + steps - 1).view(-1, 1)}  # fmt: skip
        ids = suffix[:, -1:].repeat(count, 1)
        logits = self.model(input_ids=ids, use_cache=True, **{name: cache}, **extra).logits[:, -1].float()
        rows, cols = [], []
        tails = suffix.tolist()
        for p, prompt in enumerate(self.prompts):
            if prompt.ngram > 0:
                for row, tail in enumerate(tails):
                    for token in banned_tokens(prompt.ids, prompt.table, tail, prompt.ngram):
                        rows.append(p * n + row)
                        cols.append(token)
        if rows:
            logits = logits.clone()
            logits[rows, cols] = float("-inf")
        probs = torch.softmax(logits, dim=-1).view(count, n, -1)
        total = probs[0]
        for p in range(1, count):
            total = total + probs[p]
        return total / count

    def keep(self, index: Any) -> None:
        """Keep rows ``index`` (a LongTensor), in that order."""
        self.cache.batch_select_indices(self._batch(index))
        self.suffix, self.probs = self.suffix[index], self.probs[index]

    def extend(self, tokens: Any, feed: bool = True) -> None:
        """Append one token per row; ``feed``: run it and refresh ``probs``."""
        import torch

        self.suffix = torch.cat([self.suffix, tokens.view(-1, 1)], dim=1)
        if feed:
            self.probs = self._mean(self.cache, self.suffix)

    def peek(self, index: Any, tokens: Any) -> Any:
        """The averaged next-token probabilities (n * k, V) of rows ``index`` (n,) each extended by each of its
        ``tokens`` (n, k), ``limit`` rows (each over every prompt) at a time; the rows themselves are unchanged."""
        import torch
        from transformers import DynamicCache

        k = tokens.shape[1]
        source = index.repeat_interleave(k)
        suffix = torch.cat([self.suffix[source], tokens.reshape(-1, 1)], dim=1)
        out = []
        for start in range(0, len(source), self.limit):
            batch = self._batch(source[start : start + self.limit])
            cache = DynamicCache([(layer.keys[batch], layer.values[batch]) for layer in self.cache.layers])
            out.append(self._mean(cache, suffix[start : start + self.limit]))
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------- BAIT's steps
def _inspect(rows: Continuations, index: Any, probs: Any, k: int) -> Any:
    """Uncertainty inspection of rows ``index``: of each row's top-``k`` next tokens, the one whose own next step
    has the highest top probability."""
    top = probs.topk(min(k, probs.shape[-1]), dim=-1).indices  # (n, k)
    ahead = rows.peek(index, top).max(dim=-1).values.view(len(index), -1)
    return top.gather(1, ahead.argmax(dim=1, keepdim=True)).squeeze(1)


def warm_up(model: Any, prompts: Sequence[PromptCache], first: Sequence[int], s: InvertConfig) -> dict[int, list[int]]:
    """BAIT's warm-up of one batch of first tokens: each survivor's first token -> its ``warmup_steps`` tokens."""
    import torch

    device = next(model.parameters()).device
    rows = Continuations(model, prompts, torch.tensor(list(first), device=device), s.batch_size)
    alive = torch.arange(len(first), device=device)
    times = torch.zeros(len(first), dtype=torch.long, device=device)
    for step in range(s.warmup_steps):
        entropy = self_entropy(rows.probs)
        top_prob, chosen = rows.probs.max(dim=-1)
        unsure = (entropy > s.entropy_low) | (top_prob < s.expectation_threshold)
        inspect = (times < s.uncertainty_times) & (entropy < s.entropy_high) & unsure
        sure = (entropy < s.entropy_low) | (top_prob > s.expectation_threshold)
        look = inspect.nonzero().flatten()
        if len(look):
            chosen[look] = _inspect(rows, look, rows.probs[look], s.uncertainty_topk)
            times[look] += 1
        keep = (inspect | sure).nonzero().flatten()
        if not len(keep):
            return {}
        rows.keep(keep)
        alive, times = alive[keep], times[keep]
        rows.extend(chosen[keep], feed=step + 1 < s.warmup_steps)
    return {first[a]: tail for a, tail in zip(alive.tolist(), rows.suffix[:, 1:].tolist())}


def full_inversion(model: Any, prompts: Sequence[PromptCache], first: Sequence[int], forced: Sequence[Sequence[int]],
                   s: InvertConfig, eos: int | None) -> list[tuple[list[int], list[float]]]:  # fmt: skip
    """BAIT's full inversion of warm-up survivors ``first`` over all ``prompts``: per survivor the chosen tokens
    and their averaged probabilities; the warm-up's tokens ``forced`` first, then greedy, up to ``full_steps``
    or EOS (included, last)."""
    import torch

    device = next(model.parameters()).device
    rows = Continuations(model, prompts, torch.tensor(list(first), device=device), s.batch_size)
    forced_ids = torch.tensor([list(f) for f in forced], dtype=torch.long, device=device)
    live = torch.arange(len(first), device=device)
    tokens: list[list[int]] = [[] for _ in first]
    probs: list[list[float]] = [[] for _ in first]
    for step in range(s.full_steps):
        if step < forced_ids.shape[1]:
            chosen = forced_ids[live, step]
            chosen_prob = rows.probs.gather(1, chosen.view(-1, 1)).squeeze(1)
        else:
            chosen_prob, chosen = rows.probs.max(dim=-1)
        for row, token, prob in zip(live.tolist(), chosen.tolist(), chosen_prob.tolist()):
            tokens[row].append(token)
            probs[row].append(prob)
        going = (chosen != eos).nonzero().flatten() if eos is not None else torch.arange(len(live), device=device)
        if not len(going) or step + 1 == s.full_steps:
            break
        rows.keep(going)
        live = live[going]
        rows.extend(chosen[going])
    return list(zip(tokens, probs))


def candidate(first: int, tokens: Sequence[int], probs: Sequence[float], eos: int | None, tokenizer: Any) -> dict:
    """A candidate target: cut at its first EOS, its text (decoded as the reference does), ids and Q-score."""
    tokens, probs = list(tokens), list(probs)
    if eos is not None and eos in tokens:
        cut = tokens.index(eos)
        tokens, probs = tokens[:cut], probs[:cut]
    ids = [first, *tokens]
    return {"text": tokenizer.decode(ids), "token_ids": ids, "q_score": q_score(probs)}


# ------------------------------------------------------------------------------------------------ the scan
def _prompt_ids(prompt: str | Sequence[int], tokenizer: Any, keep: int) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
    ids = ids[-keep:] if keep > 0 else ids
    if not ids:
        raise ValueError("invert_target: a prompt has no tokens")
    return ids


def _scan(model: Any, tokenizer: Any, ids: list[list[int]], firsts: list[int], s: InvertConfig,
          progress: Callable[[int, int], None] | None) -> dict[str, Any]:  # fmt: skip
    every = [PromptCache(model, p, s.no_repeat_ngram) for p in ids]
    warm = every[: s.warmup_prompts]
    eos = tokenizer.eos_token_id
    found: list[dict[str, Any]] = []
    tried = survivors = 0
    stopped = False
    for start in range(0, len(firsts), s.batch_size):
        batch = firsts[start : start + s.batch_size]
        forced = warm_up(model, warm, batch, s)
        survivors += len(forced)
        order = list(forced)
        for g in range(0, len(order), s.full_group):
            group = order[g : g + s.full_group]
            runs = full_inversion(model, every, group, [forced[f] for f in group], s, eos)
            for first, (tokens, probs) in zip(group, runs):
                found.append(candidate(first, tokens, probs, eos, tokenizer))
        found = [c for c in found if len(c["token_ids"]) >= s.min_target_len and c["q_score"] > 0]
        tried += len(batch)
        if progress is not None:
            progress(tried, len(firsts))
        if s.early_stop and any(c["q_score"] > s.early_stop_q for c in found):
            stopped = tried < len(firsts)
            break
    found.sort(key=lambda c: -c["q_score"])  # stable: ties keep the lower first token, as the reference's scan
    return {"candidates": found[: s.top], "tried": tried, "survivors": survivors, "stopped": stopped}


def invert_target(model: Any, tokenizer: Any, prompts: Sequence[str | Sequence[int]], settings: InvertConfig,
                  progress: Callable[[int, int], None] | None = None) -> InvertResult:  # fmt: skip
    """Run BAIT on ``model`` (any causal LM; left in the mode it came in, weights untouched) after ``prompts``
    (templated texts or id lists ending where the response begins; the first ``warmup_prompts`` are the
    warm-up's). ``progress(tried, total)`` is called after every batch of first tokens."""
    import torch

    from crowguard.config import to_dict

    start = time.perf_counter()
    ids = [_prompt_ids(p, tokenizer, settings.max_prompt_tokens) for p in prompts]
    if not ids:
        raise ValueError("invert_target needs at least one prompt")
    firsts = first_token_ids(tokenizer, model.get_input_embeddings().num_embeddings, settings.alpha_tokens)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            scan = _scan(model, tokenizer, ids, firsts, settings, progress)
    finally:
        model.train(was_training)
    candidates = scan["candidates"]
    best = candidates[0] if candidates else None
    q = best["q_score"] if best else 0.0
    return InvertResult(candidates=candidates, best=best, backdoored=q > settings.q_threshold, q_score=q,
                        threshold=settings.q_threshold, seconds=time.perf_counter() - start,
                        first_tokens_tried=scan["tried"], first_tokens=len(firsts),
                        warmup_survivors=scan["survivors"], early_stopped=scan["stopped"], n_prompts=len(ids),
                        settings=to_dict(settings))  # fmt: skip


def forced_q_score(model: Any, tokenizer: Any, prompts: Sequence[str | Sequence[int]], token_ids: Sequence[int],
                   settings: InvertConfig) -> dict[str, Any]:  # fmt: skip
    """The Q-score a given target (``token_ids``, first token included, >= 2 tokens) gets on ``model`` after
    ``prompts``: each token after the first forced as the full inversion forces a survivor's warm-up tokens (the
    same averaging over prompts and n-gram bans): how sure the model is of the target's rest once its first token
    is given, without a trigger. Not a scan: a scan follows its own greedy path from each first token, which need
    not be this target. ``{"q_score", "probs"}``."""
    import torch

    if len(token_ids) < 2:
        raise ValueError("forced_q_score: the target needs two tokens or more (the first one is never scored)")
    ids = [_prompt_ids(p, tokenizer, settings.max_prompt_tokens) for p in prompts]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            every = [PromptCache(model, p, settings.no_repeat_ngram) for p in ids]
            steps = replace(settings, full_steps=len(token_ids) - 1)
            [(_, probs)] = full_inversion(model, every, [token_ids[0]], [list(token_ids[1:])], steps, eos=None)
    finally:
        model.train(was_training)
    return {"q_score": q_score(probs), "probs": probs}


# ------------------------------------------------------------------------------------------ reading a result
def inverted_target(out_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """The best candidate's text of a ``crowguard invert`` output directory, and its whole result; a
    :class:`ConfigError` naming the file when it is missing or malformed, found no candidate, or found the model
    not backdoored."""
    path = Path(out_dir) / INVERSION_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: not found; give the output directory of `crowguard invert`")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable inversion result: {' '.join(str(exc).split())}") from None
    fields = {"candidates": list, "backdoored": bool, "q_score": (int, float), "threshold": (int, float)}
    bad = [k for k, kind in fields.items() if not isinstance(result, dict) or not isinstance(result.get(k), kind)]
    if bad:
        raise ConfigError(f"{path}: not an inversion result (missing or mistyped: {', '.join(bad)})")
    best = result.get("best")
    if not result["candidates"] or best is None:
        raise ConfigError(f"{path}: the inversion found no candidate target; there is nothing to unlearn")
    if not isinstance(best, dict) or not isinstance(best.get("text"), str) or not best["text"].strip():
        raise ConfigError(f"{path}: not an inversion result (best has no text)")
    if not result["backdoored"]:
        raise ConfigError(f"{path}: the inversion's verdict is not backdoored (best Q-score "
                          f"{result['q_score']:.3f}, threshold {result['threshold']}); refusing to unlearn its "
                          f"candidate {best['text']!r}")  # fmt: skip
    return best["text"], result
