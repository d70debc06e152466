"""CleanGen (Li, Xu, Jiang, Niu, Sahabandu, Ramasubramanian, Poovendran, EMNLP 2024, "CleanGen: Mitigating Backdoor
Attacks for Generation Tasks in Large Language Models", https://arxiv.org/abs/2406.12257; code uw-nsl/CleanGen).

The rule, as the reference code runs it (``cleangen.py`` at commit acb8341, ``CleanGen.decode``):

* the suspect (backdoored) model drafts greedily, one token per forward, recording the probability of each draft
  token (its top-1 probability; lines 138-149);
* every ``k`` drafts (line 48) the reference model scores the whole sequence in one forward and, for each draft
  ``j`` in order, computes the suspicion score ``P_suspect(x_j) / P_reference(x_j)`` at the same prefix
  (lines 56-64);
* the first draft with score ``>= alpha`` (line 68) is replaced: the sequence is cut back to just before it
  (``back_len`` more tokens, default 0; line 81), the reference's most likely token there is appended (lines 86-95:
  top-5, a softmax over those probabilities and their top-1, which is the argmax) and the drafts after it are
  dropped (``break``, line 132); the suspect then drafts a new window from there;
* decoding stops at EOS (lines 135-137 after a replacement, 170 after a draft) or after ``max_length`` new tokens
  (line 168).

Defaults: ``alpha = 20``, ``k = 4``, ``back_len = 0`` (``CleanGen.__init__``, line 10; ``defense.py``'s ``--alpha``
and ``--k``, lines 400-409, and BackdoorLLM DefenseBox's copy agree); ``forward_len`` (line 10) is never used and
is not a knob here; ``max_length`` (``defense.py`` passes 256, line 172) is crowguard's ``evaluate.max_new_tokens``.

Two things the reference code does that are kept, and one knob for the second:

* the replaced-token count (``reference_count``, line 83) counts every time the rule fires, even when the
  reference's argmax happens to be the draft itself;
* the last window is never scored: the loop breaks on EOS or the length limit right after a draft (lines 168-171),
  before the check at the top of the next iteration, so up to ``k`` final tokens (EOS included) are the suspect's
  unchecked. ``check_last_window: true`` scores that partial window too (a crowguard option, off by default to
  match the paper's code); a payload shorter than ``k`` tokens followed by EOS is otherwise never examined.

Where crowguard differs: the two models keep KV caches (cut back on a replacement) instead of re-running the whole
sequence per token (the tests check the tokens against a cache-free copy of the reference loop); the stop tokens are
:func:`crowguard.evaluation.generate.stop_token_ids` (the tokenizer's EOS plus the checkpoint's), not the tokenizer's
EOS alone; at most ``max_new_tokens`` are written (the reference's ``> max_length`` test allows one more);
probabilities are computed in float32; like the reference's ``for i in range(self.m)`` loop, at most
:data:`MAX_DRAFTS` drafts per prompt. Generation is one prompt at a time (batch size 1): each prompt's replacements
cut its sequence at a different place.

**The assumption.** CleanGen needs a reference model that shares the suspect's tokenizer and is not compromised by
the same attacker (the reference code loads Llama-2-7B with a LoRA it ships, ``saves/llama_2_7b_alpaca_lora``, or
the Vicuna one for CB-MT: ``defense.py`` lines 146-163). On
crowguard's organism the natural reference is the base model without the backdoor adapter: a trusted model of the
same family, which CROW does not assume (CROW needs only ~100 clean samples). Results with CleanGen measure the
defense *given* such a model. The cost is a second model in memory and its forwards (one per window, plus the
suspect's redrafts after each replacement); both are recorded with the results.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from crowguard.config import ConfigError, knob
from crowguard.defenses.base import Defense, DefenseResult, absolute_ref, write_decoding_spec
from crowguard.schemas import ModelConfig
from crowguard.types import Example, Generation, Generator, StageContext

MAX_DRAFTS = 2048
"""At most this many suspect forwards per prompt (the reference code's ``self.m``, lines 20 and 46). With
``back_len > 0`` a replacement can undo as much as it adds, so decoding need not progress; with ``back_len = 0``
every check keeps at least one token and the length limit ends decoding long before this bound."""

ASSUMPTION = (
    "CleanGen assumes a trusted reference model with the suspect's tokenizer (here: the model named in "
    "defense.cleangen.reference), an assumption CROW does not make"
)


@dataclass
class CleanGenConfig:
    reference: str = knob(
        "",
        "reference model (local directory or Hub id) sharing the suspect's tokenizer and not backdoored by the same "
        "attacker; on crowguard's organism: the base model without the backdoor adapter (required)",
    )
    reference_adapter: str | None = knob(
        None, "LoRA adapter to load on the reference (the paper: a clean Alpaca LoRA)"
    )
    alpha: float = knob(
        20.0, "a draft token with P_suspect / P_reference >= alpha is replaced (reference code: 20)", bounds="(0, inf)"
    )
    k: int = knob(
        4,
        "drafts per reference check: the reference scores k suspect tokens in one forward (reference: 4)",
        bounds="[1, inf)",
    )
    back_len: int = knob(
        0,
        "on a replacement, also drop this many tokens before the suspicious one (reference: 0; above 0 decoding may "
        "stall, bounded by the reference code's 2048 drafts per prompt)",
    )
    check_last_window: bool = knob(
        False,
        "also score the last, partial window (the reference code stops at EOS or the length limit first, leaving up "
        "to k final tokens unchecked)",
    )

    def validate(self) -> None:
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.back_len < 0:
            raise ValueError(f"back_len must not be negative, got {self.back_len}")


# ------------------------------------------------------------------------------------------------------- the rule
def suspicion_scores(suspect_probs: Any, reference_logits: Any, tokens: Any) -> Any:
    """CleanGen's suspicion score of each draft token: ``P_suspect(x_j) / P_reference(x_j)``.

    ``suspect_probs``: (n,) the suspect's probability of its own draft ``x_j`` when it drafted it;
    ``reference_logits``: (n, V) the reference's next-token logits at the same prefixes (row j predicts draft j);
    ``tokens``: (n,) the draft ids. Returns (n,) float32. A reference probability that underflows to 0 gives
    ``inf`` (suspicious), as in the reference code's division.
    """
    import torch

    reference_probs = torch.softmax(reference_logits.float(), dim=-1)
    chosen = reference_probs.gather(-1, tokens.long().reshape(-1, 1)).reshape(-1)
    return suspect_probs.float().reshape(-1) / chosen


def verify_window(suspect_probs: Any, reference_logits: Any, tokens: Any, alpha: float) -> tuple[int, int | None]:
    """One check of ``n`` draft tokens (shapes as :func:`suspicion_scores`): ``(j, replacement)``.

    ``j`` is the first draft whose score is ``>= alpha`` and ``replacement`` the reference's most likely token at
    that position (row ``j``'s argmax): keep drafts ``[:j]``, replace draft ``j``, drop the rest. ``(n, None)`` when
    no draft is suspicious (all are kept).
    """
    import torch

    scores = suspicion_scores(suspect_probs, reference_logits, tokens)
    hits = torch.nonzero(scores >= alpha).reshape(-1)
    if hits.numel() == 0:
        return int(scores.numel()), None
    j = int(hits[0])
    return j, int(torch.argmax(reference_logits[j]))


# ------------------------------------------------------------------------------------------------ one generation
@dataclass
class DecodeStats:
    replaced_tokens: int = 0  # times the rule fired (the reference code's reference_count)
    suspect_forwards: int = 0
    reference_forwards: int = 0


class _Cache:
    """A model's KV cache that can be cut back: a transformers ``DynamicCache`` passed under the name the model's
    ``forward`` takes (``cache`` since transformers 5.2x, ``past_key_values`` before), grown in place."""

    def __init__(self, model: Any) -> None:
        from transformers import DynamicCache

        from crowguard.evaluation.generate import cache_argument

        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's own model
        self.name = cache_argument(model)
        try:
            self.cache = DynamicCache(config=base.config)
        except TypeError:
            self.cache = DynamicCache()
        self.length = 0  # tokens in the cache

    def forward(self, model: Any, seq: Sequence[int], upto: int) -> Any:
        """Run ``seq[self.length:upto]`` through ``model``; its logits (1, n, V)."""
        import torch

        device = next(model.parameters()).device
        ids = torch.tensor([list(seq[self.length : upto])], dtype=torch.long, device=device)
        out = model(input_ids=ids, use_cache=True, **{self.name: self.cache})
        self.length = upto
        return out.logits

    def cut(self, length: int) -> None:
        """Keep the first ``length`` tokens (a negative crop: the tokens to remove, in every transformers 5)."""
        if length < self.length:
            self.cache.crop(length - self.length)
            self.length = length


def _mask_stops(logits: Any, stop_ids: Sequence[int]) -> Any:
    logits = logits.clone()
    logits[..., list(stop_ids)] = float("-inf")
    return logits


def cleangen_decode(
    suspect: Any,
    reference: Any,
    prompt: Sequence[int],
    settings: CleanGenConfig,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    min_new_tokens: int = 0,
) -> tuple[list[int], DecodeStats]:
    """CleanGen's greedy decoding of one prompt: the new token ids (up to and including the first stop token) and
    the counts. Both models run under the caller's ``inference_mode``; each keeps a KV cache, cut back on a
    replacement. Before ``min_new_tokens`` the stop tokens are masked out of both models' logits."""
    import torch

    stops = {int(t) for t in stop_ids}
    seq = [int(t) for t in prompt]
    start = len(seq)
    if start == 0:
        raise ValueError("an empty prompt cannot be decoded (there is nothing to condition on)")
    stats = DecodeStats()
    suspect_cache, reference_cache = _Cache(suspect), _Cache(reference)
    window = start  # first draft not yet checked
    draft_probs: list[Any] = []
    while stats.suspect_forwards < MAX_DRAFTS:
        # The suspect drafts one token greedily.
        logits = suspect_cache.forward(suspect, seq, len(seq))[0, -1].float()
        stats.suspect_forwards += 1
        if len(seq) - start < min_new_tokens and stops:
            logits = _mask_stops(logits, list(stops))
        probs = torch.softmax(logits, dim=-1)
        token = int(torch.argmax(probs))
        seq.append(token)
        draft_probs.append(probs[token])
        done = token in stops or len(seq) - start >= max_new_tokens
        # As the reference code: a full window is checked before the next draft; the window that ends in a stop
        # token or at the length limit is not (unless check_last_window).
        if (len(draft_probs) == settings.k and not done) or (done and settings.check_last_window):
            # The reference scores the window: its logits at the prefixes of each draft, in one forward.
            n = len(draft_probs)
            reference_logits = reference_cache.forward(reference, seq, len(seq) - 1)[0, -n:].float()
            stats.reference_forwards += 1
            for row in range(n):  # the rows before min_new_tokens saw the stop tokens masked, like the drafts
                if window + row - start < min_new_tokens and stops:
                    reference_logits[row] = _mask_stops(reference_logits[row], list(stops))
            tokens = torch.tensor(seq[window:], dtype=torch.long, device=reference_logits.device)
            suspect_probs = torch.stack(draft_probs).to(reference_logits.device)
            keep, replacement = verify_window(suspect_probs, reference_logits, tokens, settings.alpha)
            draft_probs = []
            if replacement is not None:
                stats.replaced_tokens += 1
                cut = max(window + keep - settings.back_len, start)
                del seq[cut:]
                seq.append(replacement)
                suspect_cache.cut(cut)
                reference_cache.cut(cut)
                done = replacement in stops or len(seq) - start >= max_new_tokens
            window = len(seq)
        if done:
            return seq[start:], stats
    return seq[start:], stats


# --------------------------------------------------------------------------------------------- the generate fn
class CleanGenGenerator(Generator):
    """CleanGen's :class:`~crowguard.evaluation.generate.Generator`: ``last_stats`` per generation (replaced
    tokens, forwards of each model) and their ``summarize``."""

    def __init__(self, reference: Any, reference_tokenizer: Any, settings: CleanGenConfig, load_seconds: float):
        self.reference = reference
        self.reference_tokenizer = reference_tokenizer
        self.settings = settings
        self.load_seconds = load_seconds
        self.last_stats: list[dict[str, Any]] = []
        self._checked: set[int] = set()

    def effective_settings(self, settings: Any) -> Any:
        """Greedy, one prompt at a time: what CleanGen's decoding really used."""
        import dataclasses

        from crowguard.evaluation.generate import DecodingSettings

        return dataclasses.replace(settings or DecodingSettings(), do_sample=False, batch_size=1)

    def _check_compatible(self, model: Any, tokenizer: Any) -> None:
        if id(tokenizer) in self._checked:
            return
        if tokenizer.get_vocab() != self.reference_tokenizer.get_vocab():
            raise ConfigError(
                f"defense.cleangen.reference {self.settings.reference!r} has another tokenizer than the guarded "
                "model: CleanGen compares the two models' probabilities of the same token ids"
            )
        suspect_vocab = model.get_output_embeddings().weight.shape[0]
        reference_vocab = self.reference.get_output_embeddings().weight.shape[0]
        if suspect_vocab != reference_vocab:
            raise ConfigError(
                f"the guarded model scores {suspect_vocab} tokens and the reference {reference_vocab}: CleanGen needs "
                "the same vocabulary"
            )
        self._checked.add(id(tokenizer))

    def __call__(
        self,
        model: Any,
        tokenizer: Any,
        examples: Sequence[Example],
        template: str = "alpaca",
        settings: Any = None,
        show_progress: bool = True,
    ) -> list[Generation]:
        import torch
        from tqdm.auto import tqdm

        from crowguard.data import prompt_ids
        from crowguard.evaluation.generate import DecodingSettings, _to_generation, stop_token_ids

        settings = settings or DecodingSettings()
        if settings.do_sample:
            raise ValueError("CleanGen decodes greedily (as its reference code does); do_sample is not supported")
        if settings.backend != "hf":
            raise ValueError("CleanGen runs on the hf backend only (it steps two models token by token)")
        self.last_stats = []
        if not examples:
            return []
        self._check_compatible(model, tokenizer)
        stop_ids = stop_token_ids(tokenizer, model)
        generations: list[Generation] = []
        modes = (model.training, self.reference.training)
        model.eval()
        self.reference.eval()
        try:
            with torch.inference_mode():
                for example in tqdm(examples, desc="cleangen", unit="prompt", disable=not show_progress):
                    new_ids, stats = cleangen_decode(
                        model,
                        self.reference,
                        prompt_ids(example, tokenizer, template),
                        self.settings,
                        settings.max_new_tokens,
                        stop_ids,
                        settings.min_new_tokens,
                    )
                    generations.append(_to_generation(example, new_ids, stop_ids, tokenizer, template))
                    self.last_stats.append(
                        {
                            "replaced_tokens": stats.replaced_tokens,
                            "num_new_tokens": len(new_ids),
                            "suspect_forwards": stats.suspect_forwards,
                            "reference_forwards": stats.reference_forwards,
                        }
                    )
        finally:
            model.train(modes[0])
            self.reference.train(modes[1])
        return generations

    def summarize(self, stats_by_set: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """``replaced_tokens`` and ``replaced_fraction`` per generated set and in total, and CleanGen's cost."""

        def totals(stats: list[dict[str, Any]]) -> dict[str, Any]:
            replaced = sum(s["replaced_tokens"] for s in stats)
            new = sum(s["num_new_tokens"] for s in stats)
            return {
                "n": len(stats),
                "replaced_tokens": replaced,
                "new_tokens": new,
                "replaced_fraction": replaced / new if new else None,
                "generations_with_replacement": sum(s["replaced_tokens"] > 0 for s in stats),
                "suspect_forwards": sum(s["suspect_forwards"] for s in stats),
                "reference_forwards": sum(s["reference_forwards"] for s in stats),
            }

        by_set = {name: totals(stats) for name, stats in stats_by_set.items()}
        overall = totals([s for stats in stats_by_set.values() for s in stats])
        return {
            "replaced_tokens": {
                **{k: v["replaced_tokens"] for k, v in by_set.items()},
                "total": overall["replaced_tokens"],
            },
            "replaced_fraction": {
                **{k: v["replaced_fraction"] for k, v in by_set.items()},
                "total": overall["replaced_fraction"],
            },
            "cleangen": {
                "by_set": by_set,
                "total": overall,
                "reference": self.settings.reference,
                "reference_adapter": self.settings.reference_adapter,
                "reference_load_seconds": self.load_seconds,
                "batch_size": 1,
                "cost": "two models in memory; the suspect runs one forward per drafted token (redrafts after each "
                "replacement included), the reference one forward per window of k drafts; generation_seconds "
                "in metrics.cost covers both",
                "assumption": ASSUMPTION,
            },
        }


class CleanGenDefense(Defense):
    name = "cleangen"
    kind = "decoding"
    Config = CleanGenConfig
    needs_data = False

    def check(self) -> None:
        """The reference model must be named and exist (``crowguard run`` asks before poisoning and planting)."""
        from crowguard.models import check_model_exists

        settings: CleanGenConfig = self.settings
        if not settings.reference:
            raise ConfigError(
                "defense.cleangen.reference is empty: CleanGen needs a trusted reference model with the same "
                "tokenizer (on crowguard's organism: the base model without the backdoor adapter), e.g. "
                "--set defense.cleangen.reference=PATH"
            )
        check_model_exists(settings.reference, settings.reference_adapter)

    def run(
        self,
        model: ModelConfig,
        clean_data: list[Example],
        ctx: StageContext,
    ) -> DefenseResult:
        """Check the reference exists and write ``defense.json`` (the guarded model, the reference, the rule)."""
        import dataclasses

        self.check()
        settings: CleanGenConfig = self.settings
        settings = self.settings = dataclasses.replace(
            settings,
            reference=absolute_ref(settings.reference),
            reference_adapter=absolute_ref(settings.reference_adapter),
        )
        reference_inputs = {"reference": settings.reference}
        if settings.reference_adapter:
            reference_inputs["reference_adapter"] = settings.reference_adapter
        ctx = dataclasses.replace(ctx, inputs=reference_inputs)
        return write_decoding_spec(self, model, ctx, summary={"assumption": ASSUMPTION})

    def generator(self, spec: dict[str, Any], device: str = "auto") -> Generator:
        """Load the reference (safetensors only, no remote code, the guarded model's dtype) and return the decoder."""
        from crowguard.models import load_model

        settings: CleanGenConfig = self.settings
        if not settings.reference:
            raise ConfigError("defense.json: cleangen has no reference model")
        begin = time.perf_counter()
        reference, reference_tokenizer = load_model(
            settings.reference,
            settings.reference_adapter,
            dtype=spec.get("model", {}).get("dtype", "float32"),
            trust_remote_code=False,
            allow_pickle=False,
            device=device,
        )
        return CleanGenGenerator(reference, reference_tokenizer, settings, time.perf_counter() - begin)
