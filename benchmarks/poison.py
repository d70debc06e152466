"""Benchmark: time to poison 50,000 examples with every trigger (and to write them as JSON).

python benchmarks/poison.py [--n 50000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from crowguard.attacks import BUILTIN_PAYLOADS, BUILTIN_TRIGGERS, Attack, poison_dataset
from crowguard.data import save_examples
from crowguard.types import Example

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def make_examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [
        Example(" ".join(rng.choices(WORDS, k=rng.randint(5, 25))), "", " ".join(rng.choices(WORDS, k=30)))
        for _ in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args()
    examples = make_examples(args.n)
    rows = []
    for name, trigger in BUILTIN_TRIGGERS.items():
        attack = Attack(trigger, BUILTIN_PAYLOADS["negsentiment"])
        start = time.perf_counter()
        poisoned = poison_dataset(examples, attack, rate=0.5, seed=0)
        poison_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            save_examples(poisoned, Path(tmp) / "train.json")
            write_s = time.perf_counter() - start
        rows.append({"trigger": name, "n": args.n, "poison_s": poison_s, "write_s": write_s})
    print(f"{'trigger':<8} {'examples':>9} {'poison s':>9} {'write s':>8} {'examples/s':>11}")
    for r in rows:
        print(
            f"{r['trigger']:<8} {r['n']:>9} {r['poison_s']:>9.3f} {r['write_s']:>8.3f} {r['n'] / r['poison_s']:>11.0f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
