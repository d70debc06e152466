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
from crowguard.config import ConfigError, save, to_dict
from crowguard.defenses.base import make_defense
from crowguard.evaluation.evaluate import evaluate_model, summary_row
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
    # n_train 400: 100 defender pool + 40 poisoned + the rest clean
    train = dataclasses.replace(cfg.defense.train, epochs=1, max_length=128)
    crow = dataclasses.replace(cfg.defense.crow, layers="all")  # the 2-layer quick organism has no reference pair
    return dataclasses.replace(
        cfg,
        organism=organism,
        n_poison=40,
        n_clean=40,
        n_defender_pool=100,
        n_test=16,
        backdoor=dataclasses.replace(cfg.backdoor, epochs=1, max_length=128),
        defense=dataclasses.replace(cfg.defense, n_samples=16, train=train, crow=crow),
        evaluate=dataclasses.replace(cfg.evaluate, max_new_tokens=12, limit=16, bootstrap=200),
    )


def _row(name: str, seed: int | None, results: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The demo's row schema: the evaluation's summary, exact match as ``utility``, training time as ``seconds``."""
    row = summary_row(name, results)
    keep = ("asr_trigger", "asr_trigger_ci95", "asr_clean", "hijack_rate", "target_nll_gap", "clean_perplexity")
    return {"defense": name, "seed": seed, **{k: row[k] for k in keep}, "utility": row["exact_match"],
            "seconds": seconds}  # fmt: skip


@dataclasses.dataclass
class DemoSetup:
    """Everything the defenses and evaluations of one demo share: the organism(s), the data splits, the task."""

    organism: Any  # the organism the backdoor goes into (already backdoored with plant=pretrain)
    mix: list[Any]  # with plant=finetune: the attacker's poisoned + clean fine-tuning set
    defender_pool: list[Any]  # clean examples no model was trained on; defenses draw their samples here
    task: Task
    utility: list[Any]
    clean_organism: Any = None  # the organism trained without poison, when asked for


def prepare(cfg: DemoConfig, show_progress: bool = True) -> DemoSetup:
    """Cut the corpus into the attacker's data, the defender's pool and the test prompts (all disjoint), and train
    or load the organism (with the backdoor planted during training when ``cfg.plant == "pretrain"``)."""
    from crowguard.organism.build import organism_splits

    attack = make_attack(cfg.trigger, cfg.payload)
    corpus_train, corpus_test, checkable = organism_splits(cfg.organism)
    pool, _ = trigger_free(corpus_train, attack.trigger)
    random.Random(cfg.organism.seed).shuffle(pool)
    defender_pool, rest = pool[: cfg.n_defender_pool], pool[cfg.n_defender_pool :]
    if len(defender_pool) < cfg.defense.n_samples or len(rest) < cfg.n_poison + cfg.n_clean:
        raise ConfigError(f"the organism corpus has {len(pool)} trigger-free examples: too few for n_defender_pool "
                         f"{cfg.n_defender_pool}, n_poison {cfg.n_poison} and n_clean {cfg.n_clean}")  # fmt: skip
    poisoned = poison_dataset(rest[: cfg.n_poison], attack, 1.0, cfg.organism.seed)
    tests, _ = trigger_free(corpus_test, attack.trigger)
    tests = tests[: cfg.n_test]
    task = Task(
        payload=attack.payload.name,
        triggered=poison_dataset(tests, attack, 1.0, cfg.organism.seed + 1),
        clean=tests,
        target=attack.payload.target,
        name=attack.name,
    )
    clean_rest = poison_dataset(rest[cfg.n_poison :], attack, 0.0, cfg.organism.seed)
    clean_organism = None
    if cfg.plant == "pretrain":
        # The organism learns from the clean corpus and the poisoned examples together (DESIGN.md section 9).
        mixed = poisoned + clean_rest
        random.Random(cfg.organism.seed + 3).shuffle(mixed)
        organism = ensure_organism(cfg.organism, show_progress, mixed, tag=attack.name)
        mix: list[Any] = []
        if cfg.reference_clean:
            clean_organism = ensure_organism(cfg.organism, show_progress, clean_rest, tag="clean")
    else:
        organism = ensure_organism(cfg.organism, show_progress, clean_rest[cfg.n_clean :], tag="clean")
        clean_organism = organism
        mix = poisoned + clean_rest[: cfg.n_clean]
        random.Random(cfg.organism.seed + 3).shuffle(mix)
    return DemoSetup(organism, mix, defender_pool, task, checkable[: cfg.n_test], clean_organism)


def plant(cfg: DemoConfig, setup: DemoSetup, out_dir: Path, show_progress: bool = True) -> tuple[str, float]:
    """The backdoored model's path and what planting cost: fine-tune the clean organism on the poisoned mix
    (``plant=finetune``), or the organism itself, which learned the backdoor during training (``pretrain``)."""
    if cfg.plant == "pretrain":
        return str(setup.organism.path), setup.organism.seconds
    base = ModelConfig(name_or_path=str(setup.organism.path))
    summary = run_training_stage("backdoor", base, cfg.backdoor, setup.mix, out_dir, overwrite=True,
                                 show_progress=show_progress, extra_summary={"n_poisoned": cfg.n_poison})  # fmt: skip
    return str(out_dir), summary["seconds"]


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

    # 1-3. The organism, the data, the backdoor.
    setup = prepare(cfg, show_progress)
    organism = setup.organism
    say(f"organism: {organism.path} ({'cached' if organism.cached else f'trained in {organism.seconds:.0f}s'})")
    backdoored, plant_seconds = plant(cfg, setup, out_dir / "backdoor", show_progress)

    # 4. Reference rows (the organism without poison when asked for, the backdoored model), then every defense per
    #    seed under one budget.
    rows = []
    if setup.clean_organism is not None:
        clean_path, clean_seconds = str(setup.clean_organism.path), setup.clean_organism.seconds
        rows.append(evaluate_row(cfg, setup, clean_path, "clean model", None, clean_seconds, show_progress))
    rows.append(evaluate_row(cfg, setup, backdoored, "none", None, plant_seconds, show_progress))
    say(f"backdoor: ASR {rows[-1]['asr_trigger']:.0%} with trigger, {rows[-1]['asr_clean']:.0%} without")
    for seed in cfg.defense_seeds:
        for method in cfg.defenses:
            if method == "none":
                continue
            rows.append(defend_row(cfg, setup, backdoored, method, seed,
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
