"""Recipe: build a backdoor training set and its test sets from clean instruction data.

Reads top to bottom: load -> drop examples that already hold a trigger phrase -> shuffle (seeded) -> hold out the
test prompts -> poison ``rate`` of the training slice -> write ``train.json`` (mixed), ``test_triggered.json``,
``test_clean.json``, ``config.yaml``, ``manifest.json`` into a fresh directory, atomically.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from crowguard.attacks import make_attack, poison_dataset, trigger_free
from crowguard.config import save
from crowguard.data import DataError, load_examples, save_examples
from crowguard.io import atomic_output_dir, check_output_dir
from crowguard.manifest import build_manifest, write_manifest
from crowguard.schemas import PoisonConfig


def run_poison(
    cfg: PoisonConfig, out_dir: Path, overwrite: bool = False, fingerprint: str | None = None
) -> dict[str, Any]:
    """Write the poisoned training set and the triggered/clean test sets; return a summary. ``fingerprint``: the
    experiment runner's, recorded in the manifest."""
    if not cfg.data:
        raise DataError("poison.data is empty: give an Alpaca JSON/JSONL file")
    check_output_dir(Path(out_dir), overwrite, [cfg.data, cfg.clean_data])  # before reading the data
    attack = make_attack(cfg.trigger, cfg.payload)
    source, dropped = trigger_free(load_examples(cfg.data), attack.trigger)
    clean_source = source
    if cfg.clean_data:
        clean_source, dropped_clean = trigger_free(load_examples(cfg.clean_data), attack.trigger)
        dropped += dropped_clean

    rng = random.Random(cfg.seed)
    order = list(range(len(source)))
    rng.shuffle(order)
    n_poison = int(cfg.n_train * cfg.rate + 0.5)
    n_clean = cfg.n_train - n_poison
    if cfg.clean_data:
        # Poison and clean halves come from different files; test prompts come from the poison source.
        need = n_poison + cfg.n_test
        if len(source) < need or len(clean_source) < n_clean:
            raise DataError(
                f"not enough examples: need {need} from {cfg.data} (have {len(source)}) and {n_clean} from "
                f"{cfg.clean_data} (have {len(clean_source)})"
            )
        test = [source[i] for i in order[: cfg.n_test]]
        to_poison = [source[i] for i in order[cfg.n_test : need]]
        clean_order = list(range(len(clean_source)))
        rng.shuffle(clean_order)
        clean_part = [clean_source[i] for i in clean_order[:n_clean]]
    else:
        need = cfg.n_train + cfg.n_test
        if len(source) < need:
            raise DataError(f"{cfg.data}: need {need} trigger-free examples (n_train + n_test), have {len(source)}")
        test = [source[i] for i in order[: cfg.n_test]]
        to_poison = [source[i] for i in order[cfg.n_test : cfg.n_test + n_poison]]
        clean_part = [source[i] for i in order[cfg.n_test + n_poison : need]]

    poisoned = poison_dataset(to_poison, attack, rate=1.0, seed=cfg.seed)
    clean = poison_dataset(clean_part, attack, rate=0.0, seed=cfg.seed)
    train = poisoned + clean
    random.Random(cfg.seed + 1).shuffle(train)
    test_triggered = poison_dataset(test, attack, rate=1.0, seed=cfg.seed + 2)
    test_clean = poison_dataset(test, attack, rate=0.0, seed=cfg.seed + 2)

    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_examples(train, tmp / "train.json")
        save_examples(test_triggered, tmp / "test_triggered.json")
        save_examples(test_clean, tmp / "test_clean.json")
        save(cfg, tmp / "config.yaml")
        inputs = {"data": cfg.data, **({"clean_data": cfg.clean_data} if cfg.clean_data else {})}
        summary = {
            "attack": attack.describe(),
            "n_train": len(train),
            "n_poisoned": len(poisoned),
            "n_clean": len(clean),
            "n_test": len(test),
            "dropped_with_trigger_phrase": dropped,
        }
        extra = {"summary": summary, **({"fingerprint": fingerprint} if fingerprint else {})}
        write_manifest(tmp, build_manifest("poison", cfg.seed, inputs, extra))
    return summary
