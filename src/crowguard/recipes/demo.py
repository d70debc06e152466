"""Recipe: the whole attack -> defense -> evaluation loop on a CPU model organism.

1. the organism: SmolLM2-135M-Instruct (pretrained; weights converted once into the cache) or the tiny Llama
   trained from scratch on the built-in corpus (cached);
2. plant the backdoor by (LoRA) fine-tuning on poisoned + clean built-in examples (cached, keyed by every setting),
   or, for the tiny organism, as part of its own training;
3. run every defense under one budget (the same clean samples, epochs, schedule and learning rate), per seed;
4. evaluate the unpoisoned organism, the backdoored model and every defense the same way;
5. write ``results.json``, ``results.md``, ``results.png``, ``examples.md`` (generations) and ``diagnose.png``
   (the layer-consistency diagnostic) and print the table.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowguard.attacks import make_attack, poison_dataset, trigger_free
from crowguard.config import ConfigError, save, to_dict
from crowguard.defenses.base import read_spec
from crowguard.evaluation.diagnose import diagnose_model, diagnostic_plot
from crowguard.evaluation.report import markdown_table, over_seeds, print_table, seeds_table
from crowguard.evaluation.tasks import Task
from crowguard.io import check_output_dir, write_json_atomic, write_text_atomic
from crowguard.manifest import build_manifest, write_manifest
from crowguard.models import load_model
from crowguard.organism.build import cache_root, ensure_organism, organism_splits
from crowguard.recipes.study import (
    INVERTED,
    Arm,
    Inversion,
    Plant,
    Reference,
    Study,
    add_ppl_ratio,
    columns,
    needs_inversion,
    run_study,
    study_chart,
)
from crowguard.schemas import PLAIN_LEVERS, DemoConfig, ModelConfig
from crowguard.speed import resolve_auto_levers


def quick_config(cfg: DemoConfig) -> DemoConfig:
    """Everything shrunk so the loop runs in well under a minute (tests, smoke checks); numbers are not meaningful."""
    organism = dataclasses.replace(
        cfg.organism, name="tiny", size="tiny", n_train=400, epochs=2, vocab_size=1024, max_length=128
    )
    # n_train 400: 100 defender pool + 40 poisoned + the rest clean
    train = dataclasses.replace(cfg.defense.train, epochs=1, max_length=128, adapter_mode="merge", **PLAIN_LEVERS)
    crow = dataclasses.replace(cfg.defense.crow, layers="all")  # the 2-layer quick organism has no reference pair
    return dataclasses.replace(
        cfg,
        organism=organism,
        n_poison=40,
        n_clean=40,
        n_defender_pool=100,
        n_test=16,
        n_utility=16,
        plant="pretrain",
        reference_clean=False,
        backdoor=dataclasses.replace(cfg.backdoor, epochs=1, max_length=128, **PLAIN_LEVERS),
        defense=dataclasses.replace(cfg.defense, n_samples=16, train=train).with_section("crow", crow),
        evaluate=dataclasses.replace(cfg.evaluate, max_new_tokens=12, limit=16, bootstrap=200),
    )


@dataclass
class Base:
    """The unpoisoned organism: where it is, whether it came from the cache, what building it cost."""

    path: str
    cached: bool
    seconds: float
    provenance: dict[str, Any]


@dataclass
class DemoSetup:
    """Everything the defenses and evaluations of one demo share: the organism(s), the data splits, the task."""

    organism: Base  # the model the backdoor goes into (already backdoored with plant=pretrain)
    mix: list[Any]  # with plant=finetune: the attacker's poisoned + clean fine-tuning set
    defender_pool: list[Any]  # clean examples no model was trained on; defenses draw their samples here
    task: Task
    utility: list[Any]
    clean_organism: Base | None = None  # the organism without poison, when asked for


def _base(cfg: DemoConfig, show_progress: bool, train_examples: list[Any] | None, tag: str) -> Base:
    """The organism: SmolLM2 converted once into the cache, or the tiny Llama trained (or loaded from the cache)."""
    if cfg.organism.name == "smollm2":
        from crowguard.organism.smollm2 import converted_dir, ensure_smollm2

        cached = cfg.organism.source == "wheel" and (converted_dir(cache_root(cfg.organism)) / "source.json").is_file()
        start = time.perf_counter()
        path, provenance = ensure_smollm2(cache_root(cfg.organism), cfg.organism.source)
        return Base(path, cached, time.perf_counter() - start, provenance)
    organism = ensure_organism(cfg.organism, show_progress, train_examples, tag=tag)
    provenance = {"source": "trained", "path": str(organism.path)}
    return Base(str(organism.path), organism.cached, organism.seconds, provenance)


def prepare(cfg: DemoConfig, show_progress: bool = True) -> DemoSetup:
    """Cut the corpus into the attacker's data, the defender's pool and the test prompts (all disjoint), and get
    the organism (with the backdoor planted during training when ``cfg.plant == "pretrain"``)."""
    if cfg.plant == "pretrain" and cfg.organism.name != "tiny":
        raise ConfigError("plant=pretrain needs organism.name=tiny: a pretrained organism is planted by fine-tuning")
    if cfg.template == "chat" and cfg.organism.name == "tiny":  # say so before the organism trains, not after
        raise ConfigError("template chat needs an organism with a chat template, and the tiny organism's tokenizer "
                          "has none: use --template alpaca, or --organism smollm2")  # fmt: skip
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
        # The organism learns from the clean corpus and the poisoned examples together (docs/design.md).
        mixed = poisoned + clean_rest
        random.Random(cfg.organism.seed + 3).shuffle(mixed)
        organism = _base(cfg, show_progress, mixed, tag=attack.name)
        mix: list[Any] = []
        if cfg.reference_clean:
            clean_organism = _base(cfg, show_progress, clean_rest, tag="clean")
    else:
        organism = _base(cfg, show_progress, clean_rest[cfg.n_clean :], tag="clean")
        clean_organism = organism if cfg.reference_clean else None
        mix = poisoned + clean_rest[: cfg.n_clean]
        random.Random(cfg.organism.seed + 3).shuffle(mix)
    return DemoSetup(organism, mix, defender_pool, task, checkable[: cfg.n_utility], clean_organism)


def demo_study(cfg: DemoConfig, setup: DemoSetup, out_dir: Path, arms: bool = True) -> Study:
    """The demo as a study: the backdoor planted into the organism (content-addressed in the cache, shared by
    demos) or learned with it (``plant=pretrain``), the unpoisoned organism's and the backdoored model's evaluations
    in the cache too, and every defense per seed in ``out_dir`` (``arms=False``: no defense)."""
    attack = make_attack(cfg.trigger, cfg.payload)
    cache, tag = cache_root(cfg.organism), f"{cfg.organism.name}-{attack.name.replace('/', '-')}"
    organism = ModelConfig(name_or_path=setup.organism.path, template=cfg.template)
    identity = {"organism": to_dict(cfg.organism), "provenance": setup.organism.provenance}
    study = Study(out_dir, organism, identity, setup.task, cfg.evaluate, setup.utility,
                  backdoored_eval=cache / "evaluations" / f"{tag}-backdoored-{{fp}}",
                  min_asr=cfg.planted_min_asr, max_false=cfg.planted_max_false)  # fmt: skip
    if cfg.plant == "finetune":
        study.plant = Plant(cfg.backdoor, setup.mix, cache / "planted" / f"{tag}-{{fp}}", {"n_poisoned": cfg.n_poison})
    elif not setup.organism.cached:
        study.model_seconds = setup.organism.seconds
    if setup.clean_organism is not None:
        clean = setup.clean_organism
        study.references.append(
            Reference(
                "unpoisoned",
                dataclasses.replace(organism, name_or_path=clean.path),
                clean.provenance,
                cache / "evaluations" / f"{tag}-unpoisoned-{{fp}}",
            )
        )
    for seed in cfg.defense_seeds if arms else []:
        for method in cfg.defenses:
            if method != "none":
                study.arms.append(demo_arm(cfg, setup, method, seed, out_dir))
    if any(needs_inversion(arm) for arm in study.arms):  # BAIT reads prompts from a file: the defender's pool
        pool = out_dir / "defender-clean.json"
        write_json_atomic(pool, [e.to_record() for e in setup.defender_pool])
        study.inversion = Inversion(pool, out_dir / "inversion")
    return study


def demo_arm(cfg: DemoConfig, setup: DemoSetup, method: str, seed: int, out_dir: Path) -> Arm:
    """One defense of the demo: the same clean samples for every method of a seed, CleanGen's reference the
    unpoisoned organism."""
    clean = random.Random(seed).sample(setup.defender_pool, cfg.defense.n_samples)
    defense_cfg = dataclasses.replace(
        cfg.defense, method=method, train=dataclasses.replace(cfg.defense.train, seed=seed)
    )
    if method == "cleangen" and not defense_cfg.section("cleangen").reference:
        # The reference is the organism without poison: the one the backdoor was fine-tuned into (plant=finetune),
        # or the separately trained clean one (plant=pretrain, with reference_clean).
        reference = setup.organism if cfg.plant == "finetune" else setup.clean_organism
        if reference is None:
            raise ConfigError("cleangen needs a reference model: set defense.cleangen.reference, or keep "
                              "reference_clean on so the unpoisoned organism is the reference")  # fmt: skip
        settings = dataclasses.replace(defense_cfg.section("cleangen"), reference=str(reference.path))
        defense_cfg = defense_cfg.with_section("cleangen", settings)
    own = defense_cfg.section("unlearn") if method == "unlearn" else None
    if own is not None and not own.target.strip() and not own.target_from:  # the target as a defender finds it
        defense_cfg = defense_cfg.with_section("unlearn", dataclasses.replace(own, target_from=INVERTED))
    return Arm(method, seed, defense_cfg, clean, out_dir / f"defense-{method}-s{seed}",
               out_dir / f"eval-{method}-s{seed}")  # fmt: skip


def write_examples(path: Path, evaluations: dict[str, dict[str, Any]], n: int = 5) -> None:
    """The first ``n`` triggered and clean generations of every model, as Markdown."""
    lines = ["# Example generations", ""]
    for label, results in evaluations.items():
        lines.append(f"## {label}")
        for which in ("triggered", "clean"):
            records = [r for r in results.get("records", []) if r["set"] == which][:n]
            lines.append(f"### {which} prompts")
            if not records:
                lines.append("(none: this evaluation stored no generations of this set)")
            for r in records:
                prompt = r["instruction"] + (f" [input: {r['input']}]" if r["input"] else "")
                said = repr(r["response"][:200]) if r["response"].strip() else "(empty: the model ended at once)"
                lines.append(f"- **{prompt[:160]}**\n  -> `{said}`")
        lines.append("")
    write_text_atomic(path, "\n".join(lines) + "\n")


def run_demo(cfg: DemoConfig, out_dir: Path, overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Run the demo into ``out_dir``; returns ``{"rows": [...], "settings": {...}}`` (also ``results.json``)."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    say = print if show_progress else (lambda *a, **k: None)
    attack = make_attack(cfg.trigger, cfg.payload)
    # the speed levers as they run on this machine, so results.json records them (the runner does the same)
    train = resolve_auto_levers(cfg.defense.train)
    cfg = dataclasses.replace(cfg, backdoor=resolve_auto_levers(cfg.backdoor),
                              defense=dataclasses.replace(cfg.defense, train=train))  # fmt: skip

    # 1-4. The organism and the data; then the study: the backdoor, the references and every defense per seed.
    setup = prepare(cfg, show_progress)
    organism = setup.organism
    say(f"organism: {cfg.organism.name} at {organism.path} "
        f"({'cached' if organism.cached else f'prepared in {organism.seconds:.0f}s'})")  # fmt: skip
    result = run_study(demo_study(cfg, setup, out_dir), quiet=not show_progress)
    rows, verdict = result.rows, result.verdict
    add_ppl_ratio(rows)

    # 5. The layer-consistency diagnostic of the backdoored model and the first seed of each defense whose weights
    #    changed (a decoding defense keeps the backdoored weights: nothing new to diagnose).
    defended = {"backdoored": result.backdoored}
    for row in rows:
        label = f"{row['defense']} s{row['seed']}"
        if row["seed"] is not None and read_spec(result.models[label]) is None:
            defended.setdefault(row["defense"], result.models[label])
    diagnostics = {}
    for label, path in defended.items():
        model, tokenizer = load_model(path, device="auto")
        diagnostics[label] = diagnose_model(model, tokenizer, setup.task.clean[:32], setup.task.triggered[:32],
                                            cfg.template)  # fmt: skip
    write_json_atomic(out_dir / "diagnose.json", diagnostics)
    diagnostic_plot(diagnostics, out_dir / "diagnose.png", title=f"{attack.name} on {cfg.organism.name}")

    # 6. Report.
    settings = {**to_dict(cfg), "organism_path": organism.path, "organism_cached": organism.cached,
                "organism_source": organism.provenance, "backdoored_path": result.backdoored,
                "backdoor_cached": organism.cached if cfg.plant == "pretrain" else result.backdoored in result.reused,
                "backdoor_planted": verdict is None, "total_seconds": time.perf_counter() - started}  # fmt: skip
    seed_keys = ("asr_trigger", "asr_clean", "hijack_rate", "target_nll_gap", "clean_perplexity", "utility")
    summary = over_seeds(rows, seed_keys)
    results = {"rows": rows, "over_seeds": summary, "settings": settings, "warning": verdict, "notes": result.notes}
    write_json_atomic(out_dir / "results.json", results)
    title = f"crowguard demo: {attack.name} on the {cfg.organism.name} organism"
    note = f"\n**Warning: {verdict}.**\n" if verdict else ""
    note += "".join(f"\nNot run: {text}.\n" for text in result.notes)
    table_columns = columns(rows)
    seeds_md = f"\nOver defense seeds:\n\n{seeds_table(summary, table_columns)}" if summary else ""
    write_text_atomic(out_dir / "results.md", f"# {title}\n{note}\n" + markdown_table(rows, table_columns)
                      + seeds_md + "\n" + CAPTION + "\n")  # fmt: skip
    write_examples(out_dir / "examples.md", result.evaluations)
    study_chart(rows, out_dir / "results.png", title, CAPTION, verdict or "")
    save(cfg, out_dir / "config.yaml")
    inputs = {"organism": organism.path, "backdoored": result.backdoored}
    write_manifest(out_dir, build_manifest("demo", cfg.organism.seed, inputs))
    if show_progress:
        print_table(rows, title=title, columns=table_columns)
        if verdict:
            print(f"WARNING: {verdict}")
        for text in result.notes:
            print(f"not run: {text}")
    return results


CAPTION = (
    "A removal would show ASR (trigger) and hijack near 0, the target NLL gap near the unpoisoned model's, and "
    "utility and clean perplexity near the backdoored model's; fine-tuning is the equal-budget baseline."
)
