"""Seconds per optimizer step of the demo's defenses on SmolLM2, for one effective batch split different ways.

The paper's defense budget is batch 8 as 2 x 4 (micro-batch x accumulation). With the token-averaged loss (the
default: each step's loss is the mean over all its tokens, whatever the split) 2 x 4, 4 x 2 and 8 x 1 are the same
optimizer step, and CROW's signed perturbation is the same too (a positive rescaling of the loss leaves the sign of
its gradient unchanged). On a CPU a step is thousands of small operations, so fewer, larger micro-batches may be
cheaper. This runs the real defenses (fine-tuning and CROW, continue mode, the demo's settings) on the demo's planted
backdoor and 100 clean samples for ``--steps`` optimizer steps per (method, split, regrouping), in rotation,
``--reps`` times. ``--regroup on,off`` also compares each step's micro-batches re-dealt by length (the default,
``train.regroup_micro_batches``: less padding computed, the same step) against the sampler's own grouping.

Step cost is the median of the per-step wall times in ``metrics.jsonl`` (``elapsed_s``), the first step excluded.
The first step's losses are printed beside it: the same maths must give the same numbers in every split (float
summation order aside). Needs the demo's planted backdoor in the cache (run ``crowguard demo`` once; it is planted
here otherwise, ~11 minutes). Run it alone: a second heavy process on 2 cores makes timings meaningless.

    python benchmarks/defense_step.py
    python benchmarks/defense_step.py --splits 2x4,8x1 --steps 6 --reps 2 --json benchmarks/results/defense-step.json
    python benchmarks/defense_step.py --splits 2x4 --regroup on,off --steps 8 --reps 2
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from crowguard import config
from crowguard.defenses.base import make_defense
from crowguard.io import write_json_atomic
from crowguard.recipes.demo import demo_arm, demo_study, prepare
from crowguard.recipes.study import run_study
from crowguard.registry import preset_path
from crowguard.schemas import DemoConfig, ModelConfig
from crowguard.types import StageContext


def run_one(cfg: DemoConfig, setup: Any, backdoored: str, method: str, split: tuple[int, int], regroup: bool,
            steps: int, work: Path) -> dict[str, Any]:  # fmt: skip
    """One defense run of ``steps`` optimizer steps, exactly as the demo runs it (its seed-0 clean samples, through
    ``recipes.demo.demo_arm``); its per-step wall times and first- and last-step losses."""
    batch, accum = split
    train = dataclasses.replace(cfg.defense.train, per_device_batch=batch, grad_accum=accum, max_steps=steps,
                                regroup_micro_batches=regroup)  # fmt: skip
    cfg = dataclasses.replace(cfg, defense=dataclasses.replace(cfg.defense, train=train))
    arm = demo_arm(cfg, setup, method, 0, work)
    out = work / f"{method}-{batch}x{accum}-{regroup}"
    suspect = ModelConfig(name_or_path=backdoored, template=cfg.template)
    path = make_defense(arm.defense).run(suspect, arm.clean, StageContext(out, True, show_progress=False)).model_path
    records = [json.loads(line) for line in (Path(path) / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r and "elapsed_s" in r]
    elapsed = [0.0] + [r["elapsed_s"] for r in logged]
    per_step = [b - a for a, b in itertools.pairwise(elapsed)]
    first, last = (
        {k: r[k] for k in ("loss", "lm_loss", "consistency_adv") if k in r} for r in (logged[0], logged[-1])
    )
    return {"per_step_s": per_step, "first_step": first, "last_step": last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="finetune,crow", help="comma-separated defenses")
    parser.add_argument("--splits", default="2x4,4x2,8x1", help="micro-batch x accumulation, comma-separated")
    parser.add_argument("--regroup", default="on", help="on, off or on,off: micro-batches re-dealt by length")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--reps", type=int, default=2, help="rotations over (method, split)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()

    cfg = config.load(DemoConfig, Path(str(preset_path("demo/smollm2"))), ())
    setup = prepare(cfg, show_progress=False)
    study = demo_study(cfg, setup, Path(tempfile.gettempdir()), arms=False)
    study.backdoored_eval, study.references = None, []
    backdoored = run_study(study).backdoored  # planted once, then taken from the cache
    splits = [tuple(int(x) for x in s.split("x")) for s in args.splits.split(",")]
    regroups = [{"on": True, "off": False}[r] for r in args.regroup.split(",")]
    methods = args.methods.split(",")
    runs: dict[tuple[str, tuple[int, int], bool], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            order = [(m, s, g) for m in methods for s in splits for g in regroups]
            order = order[rep % len(order) :] + order[: rep % len(order)]
            for method, split, regroup in order:
                result = run_one(cfg, setup, backdoored, method, split, regroup, args.steps, Path(tmp))
                runs.setdefault((method, split, regroup), []).append(result)
                print(f"rep {rep} {method} {split[0]}x{split[1]} regroup {'on' if regroup else 'off'}: "
                      f"{' '.join(f'{t:.2f}' for t in result['per_step_s'])} s/step")  # fmt: skip

    rows = []
    for method in methods:
        base = None
        for split in splits:
            for regroup in regroups:
                key = (method, split, regroup)
                timed = [t for r in runs[key] for t in r["per_step_s"][1:]]
                median = statistics.median(timed)
                base = base or median
                rows.append({"method": method, "split": f"{split[0]}x{split[1]}", "regroup": regroup,
                             "median_s_per_step": round(median, 3), "speedup_vs_first": round(base / median, 2),
                             "n_timed": len(timed), "first_step": runs[key][0]["first_step"],
                             "last_step": runs[key][0]["last_step"]})  # fmt: skip
    print("\n| method | micro-batch x accum | regroup | s/step (median) | speed-up vs the method's first row | "
          "first-step loss | last-step loss |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        first, last = (", ".join(f"{k} {v:.4f}" for k, v in r[end].items()) for end in ("first_step", "last_step"))
        print(f"| {r['method']} | {r['split']} | {'on' if r['regroup'] else 'off'} | {r['median_s_per_step']:.2f} | "
              f"{r['speedup_vs_first']:.2f}x | {first} | {last} |")  # fmt: skip
    if args.json:
        write_json_atomic(Path(args.json), {"rows": rows, "steps": args.steps, "reps": args.reps,
                                            "backdoored": backdoored})  # fmt: skip


if __name__ == "__main__":
    main()
