"""Recipe: the whole attack -> defense -> evaluation loop on the CPU model organism, in minutes.

1. train (or load from the cache) the clean organism on built-in natural instruction data;
2. plant the backdoor by fine-tuning on poisoned + clean examples;
3. run every defense under one budget (the same clean samples, epochs, schedule and learning rate), per seed;
4. evaluate the clean organism (reference), the backdoored model and every defense the same way;
5. write ``results.json``, ``results.md`` and ``results.png`` and print the table.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

from crowguard.attacks import make_attack, poison_dataset, trigger_free
from crowguard.config import save, to_dict
from crowguard.defenses.base import make_defense
from crowguard.evaluation.evaluate import evaluate_model
from crowguard.evaluation.plots import defense_chart
from crowguard.evaluation.report import markdown_table, print_table
from crowguard.evaluation.tasks import Task
from crowguard.io import check_output_dir, write_json_atomic, write_text_atomic
from crowguard.manifest import build_manifest, write_manifest
from crowguard.models import load_model
from crowguard.organism.build import ensure_organism
from crowguard.recipes.stage import run_training_stage
from crowguard.schemas import DemoConfig, ModelConfig

DEMO_COLUMNS = (
    ("defense", "model"),
    ("seed", "seed"),
    ("asr_trigger", "ASR (trigger)"),
    ("asr_clean", "ASR (clean)"),
    ("hijack_rate", "hijack"),
    ("target_nll_gap", "target NLL gap"),
    ("utility", "utility (EM)"),
    ("clean_perplexity", "clean ppl"),
    ("seconds", "seconds"),
)


def quick_config(cfg: DemoConfig) -> DemoConfig:
    """Everything shrunk so the loop runs in well under a minute (tests, smoke checks); numbers are not meaningful."""
    organism = dataclasses.replace(cfg.organism, size="tiny", n_train=400, epochs=2, vocab_size=1024, max_length=128)
    train = dataclasses.replace(cfg.defense.train, epochs=1, max_length=128)
    crow = dataclasses.replace(cfg.defense.crow, layers="all")  # the 2-layer quick organism has no reference pair
    return dataclasses.replace(
        cfg,
        organism=organism,
        n_poison=40,
        n_clean=40,
        n_test=16,
        backdoor=dataclasses.replace(cfg.backdoor, epochs=1, max_length=128),
        defense=dataclasses.replace(cfg.defense, n_samples=16, train=train, crow=crow),
        evaluate=dataclasses.replace(cfg.evaluate, max_new_tokens=12, limit=16, bootstrap=200),
    )


def _row(name: str, seed: int | None, results: dict[str, Any], seconds: float) -> dict[str, Any]:
    m = results["metrics"]
    return {
        "defense": name,
        "seed": seed,
        "asr_trigger": m["asr_trigger"]["value"],
        "asr_trigger_ci95": m["asr_trigger"]["ci95"],
        "asr_clean": m["asr_clean"]["value"],
        "hijack_rate": m["hijack_rate"],
        "target_nll_gap": m["target_nll_gap"],
        "utility": m.get("exact_match"),
        "clean_perplexity": m.get("clean_perplexity"),
        "seconds": seconds,
    }


@dataclasses.dataclass
class DemoSetup:
    """Everything the defenses and evaluations of one demo share: the organism, the data splits, the task."""

    organism: Any
    mix: list[Any]
    defender_pool: list[Any]
    task: Task
    utility: list[Any]


def prepare(cfg: DemoConfig, show_progress: bool = True) -> DemoSetup:
    """Train or load the organism and cut the attacker's mix, the defender's pool and the test prompts (disjoint)."""
    organism = ensure_organism(cfg.organism, show_progress)
    attack = make_attack(cfg.trigger, cfg.payload)
    pool, _ = trigger_free(organism.train, attack.trigger)
    rng = random.Random(cfg.organism.seed)
    rng.shuffle(pool)
    n_attack = cfg.n_poison + cfg.n_clean
    if len(pool) < n_attack + cfg.defense.n_samples:
        raise ValueError(f"the organism corpus has {len(pool)} trigger-free examples; the demo needs "
                         f"{n_attack + cfg.defense.n_samples}")  # fmt: skip
    mix = poison_dataset(pool[: cfg.n_poison], attack, 1.0, cfg.organism.seed) + poison_dataset(
        pool[cfg.n_poison : n_attack], attack, 0.0, cfg.organism.seed
    )
    rng.shuffle(mix)
    tests, _ = trigger_free(organism.test, attack.trigger)
    tests = tests[: cfg.n_test]
    task = Task(
        payload=attack.payload.name,
        triggered=poison_dataset(tests, attack, 1.0, cfg.organism.seed + 1),
        clean=tests,
        target=attack.payload.target,
        name=attack.name,
    )
    return DemoSetup(organism, mix, pool[n_attack:], task, organism.checkable_test[: cfg.n_test])


def plant(cfg: DemoConfig, setup: DemoSetup, out_dir: Path, show_progress: bool = True) -> dict[str, Any]:
    """Fine-tune the clean organism on the poisoned mix; the backdoored model lands in ``out_dir``."""
    base = ModelConfig(name_or_path=str(setup.organism.path))
    return run_training_stage("backdoor", base, cfg.backdoor, setup.mix, out_dir, overwrite=True,
                              show_progress=show_progress, extra_summary={"n_poisoned": cfg.n_poison})  # fmt: skip


def evaluate_row(
    cfg: DemoConfig, setup: DemoSetup, model_path: str, name: str, seed: int | None, seconds: float, show: bool
) -> dict[str, Any]:
    """Evaluate one model on the demo task and return its table row."""
    model, tokenizer = load_model(model_path)
    results = evaluate_model(model, tokenizer, setup.task, cfg.evaluate, "alpaca", setup.utility, show)
    return _row(name, seed, results, seconds)


def defend_row(
    cfg: DemoConfig, setup: DemoSetup, backdoored: str, method: str, seed: int, out_dir: Path, show: bool
) -> dict[str, Any]:
    """Run one defense (same clean samples for every method of a seed) and evaluate it."""
    clean = random.Random(seed).sample(setup.defender_pool, cfg.defense.n_samples)
    defense_cfg = dataclasses.replace(
        cfg.defense, method=method, train=dataclasses.replace(cfg.defense.train, seed=seed)
    )
    result = make_defense(defense_cfg).run(
        ModelConfig(name_or_path=backdoored), clean, out_dir, overwrite=True, show_progress=show
    )
    return evaluate_row(cfg, setup, result.model_path, method, seed, result.summary["seconds"], show)


def run_demo(cfg: DemoConfig, out_dir: Path, overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Run the demo into ``out_dir``; returns ``{"rows": [...], "settings": {...}}`` (also ``results.json``)."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    say = print if show_progress else (lambda *a, **k: None)

    # 1-2. The clean organism and the data.
    setup = prepare(cfg, show_progress)
    organism = setup.organism
    say(f"organism: {organism.path} ({'cached' if organism.cached else f'trained in {organism.seconds:.0f}s'})")

    # 3. Plant the backdoor.
    backdoor_dir = out_dir / "backdoor"
    backdoor = plant(cfg, setup, backdoor_dir, show_progress)

    # 4. Reference rows (the clean organism, the backdoored model), then every defense per seed, one budget.
    rows = [
        evaluate_row(cfg, setup, str(organism.path), "clean model", None, organism.seconds, show_progress),
        evaluate_row(cfg, setup, str(backdoor_dir), "none", None, backdoor["seconds"], show_progress),
    ]
    say(f"backdoor: ASR {rows[1]['asr_trigger']:.0%} with trigger, {rows[1]['asr_clean']:.0%} without")
    for seed in cfg.defense_seeds:
        for method in cfg.defenses:
            if method == "none":
                continue
            rows.append(defend_row(cfg, setup, str(backdoor_dir), method, seed,
                                   out_dir / f"defense-{method}-s{seed}", show_progress))  # fmt: skip
            say(f"{method} (seed {seed}): ASR {rows[-1]['asr_trigger']:.0%}, hijack {rows[-1]['hijack_rate']:.0%}")

    # 5. Report.
    attack = make_attack(cfg.trigger, cfg.payload)
    settings = {**to_dict(cfg), "organism_path": str(organism.path), "organism_cached": organism.cached,
                "total_seconds": time.perf_counter() - started}  # fmt: skip
    results = {"rows": rows, "settings": settings}
    write_json_atomic(out_dir / "results.json", results)
    title = f"crowguard demo: {attack.name} on the {cfg.organism.size} organism"
    write_text_atomic(out_dir / "results.md", f"# {title}\n\n" + markdown_table(rows, DEMO_COLUMNS))
    defense_chart(rows, out_dir / "results.png", title=title, utility_key="utility")
    save(cfg, out_dir / "config.yaml")
    write_manifest(out_dir, build_manifest("demo", cfg.organism.seed, {"organism": str(organism.path)}))
    if show_progress:
        print_table(rows, title=title, columns=DEMO_COLUMNS)
    return results
