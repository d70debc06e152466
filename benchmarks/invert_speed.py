"""BAIT's target inversion (:mod:`crowguard.invert`) on CPU: seconds per batch of first tokens, before and after.

Before: the per-prompt engine (:class:`PerPromptContinuations`, kept here as the reference): one forward per prompt
per step, each of a few rows, through the unmerged LoRA layers. After: :class:`crowguard.invert.Continuations`,
one forward per step over every (candidate, prompt) pair (the prompts' KV caches stacked, shorter ones left-padded
and masked), on the adapter merged into the base as ``crowguard invert`` now does. On a CPU a forward of few rows
costs its per-op overhead, so that is what the model is sized to show: a random Llama as deep as SmolLM2-135M
(30 layers) but ``--hidden`` 64 wide, vocabulary ``--vocab`` 2048, a LoRA adapter (r 16, every linear layer, random
B so it changes the outputs) unless ``--no-lora``.

One batch is the work ``crowguard invert`` does for a batch of first tokens at its defaults, made fixed: 20
prompts of random ids, 24 to 32 tokens long (so the padded path runs); the warm-up of 100 first tokens over the
first 4 prompts for 5 steps with thresholds that keep every candidate and inspect each once (``entropy_low`` 0,
``expectation_threshold`` 0, ``entropy_high`` inf: more warm-up work than any real batch); then the full inversion
of the first 4 survivors over all 20 prompts for 20 steps (no EOS), as in the SmolLM2 run that motivated this (4
survivors, 880 s). Reported per row: the warm-up's and the full inversion's seconds (the median of ``--repeats``),
their sum per batch, the speed-up over the first row, and the equality check against the first row: the warm-up
survivors' tokens and the full inversion's tokens equal, and the largest difference of a survivor's Q-score.

    nice -n 19 python benchmarks/invert_speed.py --threads 1          # the table (about a minute on one core)
    python benchmarks/invert_speed.py --layers 2 --repeats 1 --json out.json   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any


class PerPromptContinuations:
    """The engine before batching (``crowguard.invert.Continuations``'s contract): per prompt its own KV cache of
    the prompt and each row's suffix, one forward per prompt per step."""

    def __init__(self, model: Any, prompts: Any, first: Any, limit: int) -> None:
        from transformers import DynamicCache

        self.model, self.prompts, self.limit = model, list(prompts), limit
        self.suffix = first.view(-1, 1)
        self.caches = [DynamicCache([(k.expand(len(first), -1, -1, -1), v.expand(len(first), -1, -1, -1))
                                     for k, v in p.layers]) for p in self.prompts]  # fmt: skip
        self.probs = self._mean(self.caches, self.suffix)

    def _probs(self, prompt: Any, cache: Any, suffix: Any) -> Any:
        import torch

        from crowguard.invert import banned_tokens

        logits = self.model(input_ids=suffix[:, -1:], use_cache=True, **{prompt.name: cache}).logits[:, -1].float()
        rows, cols = [], []
        if prompt.ngram > 0:
            for row, tail in enumerate(suffix.tolist()):
                for token in banned_tokens(prompt.ids, prompt.table, tail, prompt.ngram):
                    rows.append(row)
                    cols.append(token)
        if rows:
            logits = logits.clone()
            logits[rows, cols] = float("-inf")
        return torch.softmax(logits, dim=-1)

    def _mean(self, caches: Any, suffix: Any) -> Any:
        total = None
        for prompt, cache in zip(self.prompts, caches):
            probs = self._probs(prompt, cache, suffix)
            total = probs if total is None else total + probs
        return total / len(self.prompts)

    def keep(self, index: Any) -> None:
        for cache in self.caches:
            cache.batch_select_indices(index)
        self.suffix, self.probs = self.suffix[index], self.probs[index]

    def extend(self, tokens: Any, feed: bool = True) -> None:
        import torch

        self.suffix = torch.cat([self.suffix, tokens.view(-1, 1)], dim=1)
        if feed:
            self.probs = self._mean(self.caches, self.suffix)

    def peek(self, index: Any, tokens: Any) -> Any:
        import torch
        from transformers import DynamicCache

        k = tokens.shape[1]
        source = index.repeat_interleave(k)
        suffix = torch.cat([self.suffix[source], tokens.reshape(-1, 1)], dim=1)
        out = []
        for start in range(0, len(source), self.limit):
            rows = source[start : start + self.limit]
            caches = [DynamicCache([(layer.keys[rows], layer.values[rows]) for layer in cache.layers])
                      for cache in self.caches]  # fmt: skip
            out.append(self._mean(caches, suffix[start : start + self.limit]))
        return torch.cat(out)


@contextlib.contextmanager
def engine(cls: Any):
    """Run :mod:`crowguard.invert`'s steps on ``cls`` (None: its own engine) inside the block."""
    import crowguard.invert as invert

    own = invert.Continuations
    invert.Continuations = cls or own
    try:
        yield
    finally:
        invert.Continuations = own


def build(layers: int, hidden: int, vocab: int, lora: bool, seed: int = 0) -> tuple[Any, Any]:
    """The random Llama (with its unmerged LoRA adapter) and the same merged, both in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from crowguard.models import merge_adapter

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2)  # fmt: skip
    model = LlamaForCausalLM(config).eval()  # initializer_range 0.2: peaked distributions, no near-ties
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 init_lora_weights=False)).eval()  # fmt: skip
    return model, merge_adapter(copy.deepcopy(model)).eval()


def one_batch(model: Any, prompts: list[list[int]], firsts: list[int], survivors: int) -> dict[str, Any]:
    """One batch of first tokens: the warm-up (every candidate kept, each inspected once), then the full inversion
    of the first ``survivors``; seconds of each, the survivors' tokens and Q-scores."""
    import torch

    from crowguard.invert import InvertConfig, PromptCache, full_inversion, q_score, warm_up

    s = InvertConfig(entropy_low=0.0, entropy_high=float("inf"), expectation_threshold=0.0)
    with torch.inference_mode():
        every = [PromptCache(model, p, s.no_repeat_ngram) for p in prompts]
        start = time.perf_counter()
        forced = warm_up(model, every[: s.warmup_prompts], firsts, s)
        middle = time.perf_counter()
        group = list(forced)[:survivors]
        runs = full_inversion(model, every, group, [forced[f] for f in group], s, None)
        end = time.perf_counter()
    return {"warmup_s": middle - start, "full_s": end - middle, "warmup": forced,
            "tokens": [t for t, _ in runs], "q": [q_score(p) for _, p in runs]}  # fmt: skip


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    prompts = [[rng.randrange(args.vocab) for _ in range(rng.randint(24, 32))] for _ in range(20)]
    firsts = sorted(rng.sample(range(args.vocab), args.batch))
    unmerged, merged = build(args.layers, args.hidden, args.vocab, not args.no_lora)
    weights = [("LoRA unmerged", unmerged), ("merged", merged)] if not args.no_lora else [("plain", merged)]
    cases = [("per-prompt", PerPromptContinuations, name, m) for name, m in weights]
    cases += [("batched", None, name, m) for name, m in weights]
    rows = []
    for label, cls, name, model in cases:
        with engine(cls):
            runs = [one_batch(model, prompts, firsts, args.survivors) for _ in range(args.repeats)]
        warm, full = statistics.median(r["warmup_s"] for r in runs), statistics.median(r["full_s"] for r in runs)
        rows.append({"engine": label, "weights": name, "warmup_s": warm, "full_s": full, "batch_s": warm + full,
                     **{k: runs[0][k] for k in ("warmup", "tokens", "q")}})  # fmt: skip
    ref = rows[0]
    for row in rows:
        row["speedup"] = ref["batch_s"] / row["batch_s"]
        row["same_tokens"] = row["warmup"] == ref["warmup"] and row["tokens"] == ref["tokens"]
        row["max_q_diff"] = max(abs(a - b) for a, b in zip(row["q"], ref["q"]))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| engine | weights | warm-up s | full inversion s | s / batch | speed-up | same tokens | max dQ |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        times = f"{r['warmup_s']:.2f} | {r['full_s']:.2f} | {r['batch_s']:.2f} | {r['speedup']:.1f}x"
        lines.append(f"| {r['engine']} | {r['weights']} | {times} | {r['same_tokens']} | {r['max_q_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=100, help="first tokens in the batch")
    parser.add_argument("--survivors", type=int, default=4, help="warm-up survivors given the full inversion")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--no-lora", action="store_true", help="a plain model, no adapter")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = measure(args)
    print(f"{args.layers} layers x {args.hidden} wide, vocab {args.vocab}, {args.batch} first tokens, "
          f"{args.survivors} survivors, 20 prompts (24-32 tokens), median of {args.repeats}")  # fmt: skip
    print(table(rows))
    if args.json:
        keep = [{k: v for k, v in r.items() if k != "warmup"} for r in rows]
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": keep}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
