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
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowguard.attacks import make_attack, poison_dataset, trigger_free
from crowguard.config import ConfigError, save, to_dict
from crowguard.defenses.base import make_defense, open_evaluated, read_spec
from crowguard.evaluation.diagnose import diagnose_model, diagnostic_plot
from crowguard.evaluation.evaluate import evaluate_model, summary_row
from crowguard.evaluation.plots import defense_chart
from crowguard.evaluation.report import markdown_table, over_seeds, print_table, seeds_table
from crowguard.evaluation.tasks import Task
from crowguard.io import check_output_dir, write_json_atomic, write_text_atomic
from crowguard.manifest import build_manifest, write_manifest
from crowguard.models import load_model
from crowguard.organism.build import (
    EVALUATION_SOURCE,
    cache_root,
    content_key,
    ensure_organism,
    organism_splits,
    source_digest,
)
from crowguard.registry import resolve
from crowguard.schemas import DemoConfig, ModelConfig
from crowguard.stage import run_training_stage
from crowguard.types import StageContext

DEMO_COLUMNS = (
    ("defense", "model"),
    ("seed", "seed"),
    ("asr_trigger", "ASR (trigger)"),
    ("asr_clean", "ASR (clean)"),
    ("hijack_rate", "hijack"),
    ("target_nll_gap", "target NLL gap"),
    ("utility", "utility: exact match"),
    ("clean_perplexity", "clean ppl"),
    ("utility_ppl_ratio", "utility: backdoored ppl / ppl"),
    ("train_seconds", "train s"),
    ("eval_seconds", "eval s"),
)
# SmolLM2 costs measured by the latest cold `crowguard demo` on 2 CPU cores (README), for the up-front estimate:
# seconds per optimizer step (plant 507 s / 225, fine-tuning 143 s / 65, CROW 333 s / 65), per evaluation of 100 +
# 100 prompts (39-44 s since the ragged prompt pass of generation), and for the weight conversion (16 s). Other
# 2-core machines took 1.4x as long (28 min cold) and 1.83x (an AMD EPYC without AMX, 37 min cold, 2026-12-02); the
# estimate's range says so, and the first stage trained in a run re-states it at the pace measured there. The tiny
# organism has no such measurements: no estimate.
SECONDS_PER_STEP = {"plant": 2.25, "finetune": 2.2, "crow": 5.1}
SECONDS_PER_EVAL = 42.0
SECONDS_CONVERT = 16.0
SLOWER_MACHINE = 1.85  # the slowest 2-core machine measured, relative to the one above


def quick_config(cfg: DemoConfig) -> DemoConfig:
    """Everything shrunk so the loop runs in well under a minute (tests, smoke checks); numbers are not meaningful."""
    organism = dataclasses.replace(
        cfg.organism, name="tiny", size="tiny", n_train=400, epochs=2, vocab_size=1024, max_length=128
    )
    # n_train 400: 100 defender pool + 40 poisoned + the rest clean
    train = dataclasses.replace(cfg.defense.train, epochs=1, max_length=128, adapter_mode="merge")
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
        backdoor=dataclasses.replace(cfg.backdoor, epochs=1, max_length=128),
        defense=dataclasses.replace(cfg.defense, n_samples=16, train=train).with_section("crow", crow),
        evaluate=dataclasses.replace(cfg.evaluate, max_new_tokens=12, limit=16, bootstrap=200),
    )


def demo_row(
    name: str, seed: int | None, results: dict[str, Any], train_seconds: float | None, eval_cached: bool = False
) -> dict[str, Any]:
    """The demo's row: the evaluation's summary with intervals, exact match as ``utility``, the training time of
    this run (None when the model came from the cache) and the evaluation time of this run (None when the
    evaluation came from the cache)."""
    row = summary_row(name, results)
    m = results["metrics"]
    keep = ("asr_trigger", "asr_trigger_ci95", "asr_clean", "hijack_rate", "target_nll_gap", "clean_perplexity")
    return {"defense": name, "seed": seed, **{k: row[k] for k in keep}, "asr_clean_ci95": m["asr_clean"]["ci95"],
            "hijack_ci95": m["hijack"].get("ci95"), "target_nll_gap_ci95": m.get("target_nll_gap_ci95"),
            "utility": row["exact_match"], "train_seconds": train_seconds,
            "eval_seconds": None if eval_cached else m["cost"]["wall_s"], "eval_cached": eval_cached}  # fmt: skip


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


def plant_key(cfg: DemoConfig, setup: DemoSetup) -> str:
    """Cache key of a planted backdoor: the base model, the plant settings, the poisoned mix and the versions."""
    settings = {
        "base": setup.organism.provenance,
        # regroup_micro_batches only changes how much padding is computed (train.regroup_by_length): the same plant
        # either way, so it keeps the key it had before the knob existed
        "backdoor": {k: v for k, v in to_dict(cfg.backdoor).items() if k != "regroup_micro_batches"},
        "organism": to_dict(cfg.organism),
    }
    if cfg.template != "alpaca":  # an Alpaca plant keeps the key it had before the template knob existed
        settings["template"] = cfg.template
    return content_key(settings, (setup.mix,), ("crowguard", "torch", "transformers", "peft"))


def plant(cfg: DemoConfig, setup: DemoSetup, show_progress: bool = True) -> tuple[str, float | None]:
    """The backdoored model's path and the seconds this run spent planting it (None: it came from the cache).

    ``plant=finetune`` fine-tunes the organism on the poisoned mix once per setting (cached); ``pretrain`` returns
    the organism itself, which learned the backdoor during training."""
    if cfg.plant == "pretrain":
        return setup.organism.path, None if setup.organism.cached else setup.organism.seconds
    attack = make_attack(cfg.trigger, cfg.payload)
    out_dir = cache_root(cfg.organism) / "planted" / f"{cfg.organism.name}-{attack.name.replace('/', '-')}-" \
        f"{plant_key(cfg, setup)}"  # fmt: skip
    if (out_dir / "manifest.json").is_file():
        return str(out_dir), None
    base = ModelConfig(name_or_path=setup.organism.path, template=cfg.template)
    ctx = StageContext(out_dir, overwrite=True, show_progress=show_progress)
    extra = {"n_poisoned": cfg.n_poison}
    summary = run_training_stage("backdoor", base, cfg.backdoor, setup.mix, ctx, extra_summary=extra)
    return str(out_dir), summary["seconds"]


def evaluate_model_dir(cfg: DemoConfig, setup: DemoSetup, model_path: str, show: bool) -> dict[str, Any]:
    """Load one model (or a decoding defense's guarded model) and evaluate it on the demo task (with the checkable
    tasks as utility)."""
    model, tokenizer, generator, defense, _ = open_evaluated(ModelConfig(name_or_path=model_path), "auto")
    return evaluate_model(model, tokenizer, setup.task, cfg.evaluate, cfg.template, setup.utility, show,
                          generator, defense)  # fmt: skip


def evaluate_cached(cfg: DemoConfig, setup: DemoSetup, model_path: str, show: bool) -> tuple[dict[str, Any], bool]:
    """``(results, came from the cache)`` for a model that is itself cached (the unpoisoned organism, the planted
    backdoor): its evaluation is kept in the cache once per model directory (content-addressed), task, evaluation
    setting, package versions and the evaluation's own source (``EVALUATION_SOURCE``), so a second demo does not
    re-measure what cannot have changed (greedy decoding is deterministic) and a changed metric is re-measured."""
    settings = {"model": str(Path(model_path).resolve()), "evaluate": to_dict(cfg.evaluate), "template": cfg.template,
                "code": source_digest(EVALUATION_SOURCE)}  # fmt: skip
    data = (setup.task.triggered, setup.task.clean, setup.utility)
    key = content_key(settings, data, ("crowguard", "torch", "transformers", "peft"))
    path = cache_root(cfg.organism) / "evaluations" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text()), True
    results = evaluate_model_dir(cfg, setup, model_path, show)
    write_json_atomic(path, results)
    return results, False


def defend(
    cfg: DemoConfig, setup: DemoSetup, backdoored: str, method: str, seed: int, out_dir: Path, show: bool
) -> tuple[str, float]:
    """Run one defense (the same clean samples for every method of a seed): (model path, training seconds)."""
    clean = random.Random(seed).sample(setup.defender_pool, cfg.defense.n_samples)
    defense_cfg = dataclasses.replace(
        cfg.defense, method=method, train=dataclasses.replace(cfg.defense.train, seed=seed)
    )
    if method == "cleangen" and not defense_cfg.section("cleangen").reference:
        # The reference is the organism without poison: the one the backdoor was fine-tuned into (plant=finetune),
        # or the separately trained clean one (plant=pretrain, with reference_clean).
        clean = setup.organism if cfg.plant == "finetune" else setup.clean_organism
        if clean is None:
            raise ConfigError("cleangen needs a reference model: set defense.cleangen.reference, or keep "
                              "reference_clean on so the unpoisoned organism is the reference")  # fmt: skip
        reference = dataclasses.replace(defense_cfg.section("cleangen"), reference=str(clean.path))
        defense_cfg = defense_cfg.with_section("cleangen", reference)
    defense = make_defense(defense_cfg)
    suspect = ModelConfig(name_or_path=backdoored, template=cfg.template)
    ctx = StageContext(out_dir, overwrite=True, show_progress=show)
    result = defense.run(suspect, clean if defense.needs_data else [], ctx)
    return result.model_path, result.summary["seconds"]


def expected_stage_seconds(cfg: DemoConfig, stage: str) -> float:
    """The estimate's seconds for one training stage: ``plant``, or one seed of a training defense."""
    if stage == "plant":
        steps = -(-(cfg.n_poison + cfg.n_clean) // cfg.backdoor.per_device_batch) * cfg.backdoor.epochs
        return steps * SECONDS_PER_STEP["plant"]
    train = cfg.defense.train
    steps = -(-cfg.defense.n_samples // (train.per_device_batch * train.grad_accum)) * train.epochs
    return steps * SECONDS_PER_STEP["crow" if stage == "crow" else "finetune"]


def expected_seconds(cfg: DemoConfig, setup_cached: bool, plant_cached: bool) -> float | None:
    """An up-front estimate of the SmolLM2 demo's wall time from the measured per-step costs (None: tiny)."""
    if cfg.organism.name != "smollm2":
        return None
    total = 0.0 if setup_cached else SECONDS_CONVERT
    if not plant_cached:
        total += expected_stage_seconds(cfg, "plant")
    methods = [m for m in cfg.defenses if m != "none"]
    training = [m for m in methods if resolve("defenses", m).kind == "training"]  # the others train nothing
    total += sum(expected_stage_seconds(cfg, m) for m in training) * len(cfg.defense_seeds)
    n_evals = len(methods) * len(cfg.defense_seeds)
    if not plant_cached:  # the evaluations of the unpoisoned and the backdoored model are cached with the plant
        n_evals += 1 + int(cfg.reference_clean)
    return total + n_evals * SECONDS_PER_EVAL * cfg.n_test / 100


def pace_note(measured: float, expected: float, remaining: float) -> str:
    """The up-front estimate re-stated at the pace of this run's first trained stage (measured / expected)."""
    pace = measured / expected
    return (f"this machine takes {pace:.2f}x the estimate's time per step; the rest should take about "
            f"{remaining * pace / 60:.0f} min")  # fmt: skip


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


def planted_verdict(cfg: DemoConfig, row: dict[str, Any]) -> str | None:
    """None when the backdoor took (ASR and false-trigger thresholds); else a sentence naming the criteria it
    failed, and only those."""
    failed = []
    if row["asr_trigger"] < cfg.planted_min_asr:
        failed.append(f"ASR {row['asr_trigger']:.0%} with trigger (needs >= {cfg.planted_min_asr:.0%})")
    if row["asr_clean"] > cfg.planted_max_false:
        failed.append(f"{row['asr_clean']:.0%} without (needs <= {cfg.planted_max_false:.0%})")
    if not failed:
        return None
    return f"the backdoor did not take: {' and '.join(failed)}; the defense rows measure nothing about removal"


def run_demo(cfg: DemoConfig, out_dir: Path, overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Run the demo into ``out_dir``; returns ``{"rows": [...], "settings": {...}}`` (also ``results.json``)."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    say = print if show_progress else (lambda *a, **k: None)
    attack = make_attack(cfg.trigger, cfg.payload)

    # 1-3. The organism, the data, the backdoor.
    cold, cached = expected_seconds(cfg, False, False), expected_seconds(cfg, True, True)
    if cold is not None and cached is not None:
        say(f"expected time on 2 CPU cores: about {cold / 60:.0f}-{cold * SLOWER_MACHINE / 60:.0f} min the first "
            f"time (weights prepared, backdoor planted), about {cached / 60:.0f}-{cached * SLOWER_MACHINE / 60:.0f} "
            "min once both are cached")  # fmt: skip
    setup = prepare(cfg, show_progress)
    organism = setup.organism
    say(f"organism: {cfg.organism.name} at {organism.path} "
        f"({'cached' if organism.cached else f'prepared in {organism.seconds:.0f}s'})")  # fmt: skip
    backdoored, plant_seconds = plant(cfg, setup, show_progress)
    how = "cached" if plant_seconds is None else f"planted in {plant_seconds:.0f}s"
    say(f"backdoored model: {backdoored} ({how})")
    paced = plant_seconds is not None and cold is not None
    if paced:
        remaining = expected_seconds(cfg, True, False) - expected_stage_seconds(cfg, "plant")
        say(pace_note(plant_seconds, expected_stage_seconds(cfg, "plant"), remaining))

    # 4. Reference rows (the organism without poison when asked for, the backdoored model), then every defense per
    #    seed under one budget.
    rows, evaluations = [], {}
    if setup.clean_organism is not None:
        evaluations["unpoisoned"], was_cached = evaluate_cached(cfg, setup, setup.clean_organism.path, show_progress)
        rows.append(demo_row("unpoisoned", None, evaluations["unpoisoned"], None, was_cached))
    evaluations["none"], was_cached = evaluate_cached(cfg, setup, backdoored, show_progress)
    rows.append(demo_row("none", None, evaluations["none"], plant_seconds, was_cached))
    verdict = planted_verdict(cfg, rows[-1])
    say(f"backdoor: ASR {rows[-1]['asr_trigger']:.0%} with trigger, {rows[-1]['asr_clean']:.0%} without"
        + (f" -- WARNING: {verdict}" if verdict else ""))  # fmt: skip
    defended: dict[str, str] = {}
    for seed in cfg.defense_seeds:
        for method in cfg.defenses:
            if method == "none":
                continue
            path, seconds = defend(cfg, setup, backdoored, method, seed, out_dir / f"defense-{method}-s{seed}",
                                   show_progress)  # fmt: skip
            if not paced and cached is not None and resolve("defenses", method).kind == "training":
                paced = True  # the plant came from the cache: this is the run's first trained stage
                remaining = cached - expected_stage_seconds(cfg, method)
                say(pace_note(seconds, expected_stage_seconds(cfg, method), remaining))
            label = f"{method} s{seed}"
            evaluations[label] = evaluate_model_dir(cfg, setup, path, show_progress)
            rows.append(demo_row(method, seed, evaluations[label], seconds))
            if read_spec(path) is None:  # a decoding defense keeps the backdoored weights: nothing new to diagnose
                defended.setdefault(method, path)
            say(f"{method} (seed {seed}): ASR {rows[-1]['asr_trigger']:.0%}, hijack {rows[-1]['hijack_rate']:.0%}")

    # Utility relative to the backdoored model: its clean-reference perplexity over each model's (1 = unchanged).
    base_ppl = next(r["clean_perplexity"] for r in rows if r["defense"] == "none")
    for row in rows:
        ppl = row["clean_perplexity"]
        row["utility_ppl_ratio"] = base_ppl / ppl if ppl and base_ppl else None

    # 5. The layer-consistency diagnostic of the backdoored model and the first seed of each defense.
    diagnostics = {}
    for label, path in {"backdoored": backdoored, **defended}.items():
        model, tokenizer = load_model(path, device="auto")
        diagnostics[label] = diagnose_model(model, tokenizer, setup.task.clean[:32], setup.task.triggered[:32],
                                            cfg.template)  # fmt: skip
    write_json_atomic(out_dir / "diagnose.json", diagnostics)
    diagnostic_plot(diagnostics, out_dir / "diagnose.png", title=f"{attack.name} on {cfg.organism.name}")

    # 6. Report.
    settings = {**to_dict(cfg), "organism_path": organism.path, "organism_cached": organism.cached,
                "organism_source": organism.provenance, "backdoored_path": backdoored,
                "backdoor_cached": plant_seconds is None, "backdoor_planted": verdict is None,
                "total_seconds": time.perf_counter() - started}  # fmt: skip
    seed_keys = ("asr_trigger", "asr_clean", "hijack_rate", "target_nll_gap", "clean_perplexity", "utility")
    summary = over_seeds(rows, seed_keys)
    results = {"rows": rows, "over_seeds": summary, "settings": settings, "warning": verdict}
    write_json_atomic(out_dir / "results.json", results)
    title = f"crowguard demo: {attack.name} on the {cfg.organism.name} organism"
    note = f"\n**Warning: {verdict}.**\n" if verdict else ""
    seeds_md = f"\nOver defense seeds:\n\n{seeds_table(summary, DEMO_COLUMNS)}" if summary else ""
    write_text_atomic(out_dir / "results.md", f"# {title}\n{note}\n" + markdown_table(rows, DEMO_COLUMNS)
                      + seeds_md + "\n" + CAPTION + "\n")  # fmt: skip
    write_examples(out_dir / "examples.md", evaluations)
    exact = any(r["utility"] is not None for r in rows)
    defense_chart(rows, out_dir / "results.png", title=title, caption=CAPTION,
                  utility_key="utility" if exact else "utility_ppl_ratio",
                  utility_label="utility: exact match" if exact else "utility: backdoored ppl / ppl",
                  warning=verdict or "")  # fmt: skip
    save(cfg, out_dir / "config.yaml")
    write_manifest(out_dir, build_manifest("demo", cfg.organism.seed, {"organism": organism.path,
                                                                         "backdoored": backdoored}))  # fmt: skip
    if show_progress:
        print_table(rows, title=title, columns=DEMO_COLUMNS)
        if verdict:
            print(f"WARNING: {verdict}")
    return results


CAPTION = (
    "A removal would show ASR (trigger) and hijack near 0, the target NLL gap near the unpoisoned model's, and "
    "utility and clean perplexity near the backdoored model's; fine-tuning is the equal-budget baseline."
)
