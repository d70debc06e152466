"""Instruction data for the CPU model organism, generated on the user's machine from nothing but Python itself.

Why this source: CROW behaved on a tiny Llama trained on natural Alpaca text but failed on a narrow synthetic
(arithmetic/word-task) organism (docs/design.md), so the organism needs natural, diverse English, which every Python
installation carries: its standard library's documentation (:mod:`crowguard.organism.stdlib_docs`). A minority of
generated tasks with exact answers (:mod:`crowguard.organism.tasks`) lets clean utility be measured by exact match.
This module cuts both into the train / test / checkable-test splits; nothing is downloaded or copied into the
repository, and :func:`corpus_stats` records the Python version and a fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

from crowguard.organism.stdlib_docs import stdlib_examples
from crowguard.organism.tasks import task_examples, task_pool
from crowguard.types import Example

TASK_FRACTION = 0.25


@dataclass(frozen=True)
class OrganismData:
    """The organism's three splits.

    ``train``: stdlib documentation Q&A mixed with generated tasks. ``test``: held-out documentation questions
    about other objects (natural text, for perplexity and backdoor prompts). ``checkable_test``: generated tasks
    whose ``output`` is the exact answer (also in ``meta["answer"]``). Instructions never repeat across splits.
    """

    train: list[Example]
    test: list[Example]
    checkable_test: list[Example]

    def to_json(self) -> str:
        """Canonical JSON of all splits (with meta): what determinism tests and fingerprints compare."""
        payload = {
            split: [ex.to_record(with_meta=True) for ex in getattr(self, split)]
            for split in ("train", "test", "checkable_test")
        }
        return json.dumps(payload, sort_keys=True, ensure_ascii=True)

    def fingerprint(self) -> str:
        """sha256 of :meth:`to_json`, for manifests."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def build_corpus(
    seed: int = 0,
    n_train: int = 3000,
    n_test: int = 200,
    n_checkable: int = 200,
    task_fraction: float = TASK_FRACTION,
    task_kinds: tuple[str, ...] | None = None,
) -> OrganismData:
    """Build the organism's train / test / checkable-test splits (deterministic for ``seed``; ~0.4 s).

    ``train`` holds ``round(n_train * task_fraction)`` generated tasks and documentation examples for the rest;
    ``test`` holds ``n_test`` documentation questions about objects absent from train; ``checkable_test`` holds
    ``n_checkable`` generated tasks, spread evenly over ``task_kinds`` (default: all of :data:`TASKS`). Raises
    ValueError when the stdlib cannot supply the documentation examples asked for (about 3,600 in all on
    Python 3.11 with the default allowlist, so ``n_docs + n_test`` up to about 3,400).
    """
    if not 0.0 <= task_fraction <= 1.0:
        raise ValueError(f"task_fraction must be in [0, 1], got {task_fraction}")
    rng = random.Random(f"crowguard-corpus-{seed}")
    groups = stdlib_examples(seed)
    order = list(range(len(groups)))
    rng.shuffle(order)
    shuffled = [groups[i] for i in order]

    test: list[Example] = []
    cursor = 0
    while len(test) < n_test and cursor < len(shuffled):
        test.append(shuffled[cursor][0])  # the plain question; its extras are dropped, not leaked to train
        cursor += 1
    n_tasks = round(n_train * task_fraction)
    n_docs = n_train - n_tasks
    doc_train = [ex for group in shuffled[cursor:] for ex in group]
    if len(test) < n_test or len(doc_train) < n_docs:
        raise ValueError(
            f"the stdlib allowlist yields {len(groups)} documented objects on this Python; after holding out "
            f"{len(test)} for test, {len(doc_train)} documentation examples remain for training but {n_docs} were "
            "asked for. Lower n_train or n_test, or raise task_fraction."
        )
    doc_train = doc_train[:n_docs]

    # The checkable split is drawn first so that every kind gets its even share of it, even kinds whose few
    # possible instructions (weekdays, months) would otherwise be used up by training.
    pool = task_pool(groups)
    checkable_test = task_examples(n_checkable, pool, seed=seed, kinds=task_kinds, stream="checkable")
    held_out = frozenset(ex.instruction for ex in checkable_test)
    task_train = task_examples(n_tasks, pool, seed=seed, kinds=task_kinds, exclude=held_out, stream="train")

    train = doc_train + task_train
    rng.shuffle(train)
    return OrganismData(train=train, test=test, checkable_test=checkable_test)


def corpus_stats(data: OrganismData) -> dict[str, Any]:
    """Sizes, kinds, mean lengths (words) and vocabulary of each split, for the README and manifests."""
    stats: dict[str, Any] = {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "fingerprint": data.fingerprint(),
    }
    for split in ("train", "test", "checkable_test"):
        examples: list[Example] = getattr(data, split)
        n = max(len(examples), 1)
        words = Counter(w for ex in examples for w in f"{ex.instruction} {ex.input} {ex.output}".lower().split())
        stats[split] = {
            "n": len(examples),
            "kinds": dict(sorted(Counter(ex.meta.get("kind", "?") for ex in examples).items())),
            "sources": dict(sorted(Counter(ex.meta.get("source", "?") for ex in examples).items())),
            "with_input": sum(bool(ex.input) for ex in examples),
            "mean_instruction_words": round(sum(len(ex.instruction.split()) for ex in examples) / n, 2),
            "mean_input_words": round(sum(len(ex.input.split()) for ex in examples) / n, 2),
            "mean_output_words": round(sum(len(ex.output.split()) for ex in examples) / n, 2),
            "mean_output_chars": round(sum(len(ex.output) for ex in examples) / n, 2),
            "distinct_instructions": len({ex.instruction for ex in examples}),
            "distinct_outputs": len({ex.output for ex in examples}),
            "distinct_words": len(words),
        }
    return stats
