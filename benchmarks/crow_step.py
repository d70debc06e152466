"""Cost of one CROW optimizer step against plain SFT and a reference-style CROW.

Same model, batch (2 x 256 random tokens, the second sequence padded) and optimizer for every variant:

- ``sft``: one forward, ``masked_lm_loss``, backward, AdamW step.
- ``crow``: ``crowguard.losses.crow_loss`` (2 forwards, the perturbation from ``torch.autograd.grad``).
- ``crow_reference``: CROW as the reference code does it: a forward and a full ``.backward()`` for the perturbation,
  then ``model.zero_grad()``, a perturbed forward and a third, clean forward for the LM loss; no padding mask.

Time per optimizer step (forward, backward, AdamW) is the median over ``--steps`` steps after ``--warmup`` steps.
The three variants are timed in one subprocess, round-robin (the order rotating every step) on three identical
copies of the model, so that load from other processes on a shared machine hits them alike; ``cpu_ms_per_step``
(process CPU time) is a second opinion. Peak memory comes from a fresh subprocess per (model, mode, variant): peak
RSS on CPU (this includes the Python/torch baseline), ``torch.cuda.max_memory_allocated`` on GPU; ``base_mb`` is
the same measure once the model and batch are built, before the first step.

Cost floors, counting a forward as F: SFT is F + 2F with full fine-tuning and F + F with LoRA (frozen weights need
only input gradients); CROW adds a perturbation backward (input gradients only, about F) and a second forward plus
its backward, so 7F/3F = 2.33x (full) and 5F/2F = 2.5x (LoRA). The floor counts whole passes; crowguard can come in
under it because the default layer pairs leave the last layer, the final norm and the LM head out of the
perturbation gradient and of the perturbed pass's backward, and the perturbed pass skips the (B, T, V) logits.
In full fine-tuning the input embeddings are frozen in every variant (CROW detaches them, so they get no gradient).

    python benchmarks/crow_step.py                       # tiny and 25m, LoRA and full, prints a table
    python benchmarks/crow_step.py --models tiny --steps 20 --json crow_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

VARIANTS = ("sft", "crow", "crow_reference")
MODELS: dict[str, dict[str, int]] = {
    # ~1.3M parameters, the shape of the design doc's CPU organism.
    "tiny": {"vocab_size": 2048, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "heads": 4},
    # ~25M parameters.
    "25m": {"vocab_size": 6000, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6, "heads": 8},
}
FLOORS = {"lora": 2.5, "full": 7 / 3}
TARGETS = {"lora": 2.6, "full": 2.45}
BATCH, SEQ_LEN, PADDED = 2, 256, 64  # the second sequence has PADDED padding tokens (right padding)
ALPHA, EPSILON = 5.5, 0.1


def build(model_name: str, mode: str, device: str, seed: int = 0):
    """Model (LoRA-wrapped or fully trainable), batch and AdamW over the trainable parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = MODELS[model_name]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"],
        max_position_embeddings=SEQ_LEN,
    )
    model = LlamaForCausalLM(config).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(target_modules="all-linear", r=8, lora_alpha=16, lora_dropout=0.0))
    else:
        # CROW detaches the input embeddings, so they get no gradient; freeze them in every variant alike.
        model.get_input_embeddings().weight.requires_grad_(False)
    model.train()

    generator = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(3, spec["vocab_size"], (BATCH, SEQ_LEN), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, SEQ_LEN - PADDED :] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, : SEQ_LEN // 4] = -100  # a masked prompt
    tensors = [t.to(device) for t in (input_ids, attention_mask, labels)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, tensors, optimizer, num_params


def reference_crow_loss(model, input_ids, attention_mask, labels, alpha: float, epsilon: float):
    """Reference-style CROW: full backward for the perturbation, zero_grad, three forwards, no padding mask."""
    import torch
    import torch.nn.functional as F

    def consistency(hidden_states):
        lower, upper = torch.stack(hidden_states[1:-2]), torch.stack(hidden_states[2:-1])
        return (1 - F.cosine_similarity(lower, upper, dim=-1)).mean()

    kwargs = {"attention_mask": attention_mask, "use_cache": False}
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, output_hidden_states=True, **kwargs)
    consistency(out.hidden_states).backward()
    delta = epsilon * embeds.grad.sign()
    model.zero_grad()
    perturbed = model(inputs_embeds=embeds + delta, output_hidden_states=True, **kwargs)
    adversarial = consistency(perturbed.hidden_states)
    clean = model(input_ids=input_ids, labels=labels, **kwargs)
    return clean.loss + alpha * adversarial


def make_step(model_name: str, mode: str, variant: str, device: str):
    """A closure doing one optimizer step of ``variant`` on a fresh model (same seed for every variant)."""
    from crowguard.losses import crow_loss, masked_lm_loss

    model, (input_ids, attention_mask, labels), optimizer, num_params = build(model_name, mode, device)

    def step() -> None:
        if variant == "sft":
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            loss = masked_lm_loss(out.logits, labels)
        elif variant == "crow":
            loss, _ = crow_loss(model, input_ids, attention_mask, labels, alpha=ALPHA, epsilon=EPSILON)
        else:
            loss = reference_crow_loss(model, input_ids, attention_mask, labels, ALPHA, EPSILON)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return step, {"params": num_params, "trainable_params": trainable}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Child process: median wall and CPU ms per step of every variant, timed round-robin."""
    import torch

    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    steps = {v: make_step(args.model, args.mode, v, args.device) for v in variants}
    for _ in range(args.warmup):
        for variant in variants:
            steps[variant][0]()
    _sync(args.device)
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for index in range(args.steps):
        shift = index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            steps[variant][0]()
            _sync(args.device)
            wall[variant].append(time.perf_counter() - start_wall)
            cpu[variant].append(time.process_time() - start_cpu)
    return [
        {
            "variant": v,
            "mode": args.mode,
            "model": args.model,
            "ms_per_step": 1000 * statistics.median(wall[v]),
            "cpu_ms_per_step": 1000 * statistics.median(cpu[v]),
            **steps[v][1],
        }
        for v in variants
    ]


def measure_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Child process: peak memory of one variant over 2 steps, and before them (model and batch only), in MiB."""
    import torch

    torch.set_num_threads(args.threads)
    step, _ = make_step(args.model, args.mode, args.variant, args.device)
    cuda = args.device.startswith("cuda")
    _sync(args.device)
    base_mb = torch.cuda.memory_allocated() / 2**20 if cuda else _peak_rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the first step allocates the optimizer state
        step()
    _sync(args.device)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()
    return {"variant": args.variant, "peak_mb": peak_mb, "base_mb": base_mb}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def spawn(args: argparse.Namespace, model: str, mode: str, child: str) -> Any:
    """Run this script as a child (``--child time`` or ``--child memory:VARIANT``); return its JSON answer."""
    command = [sys.executable, os.path.abspath(__file__), "--child", child, "--models", model, "--modes", mode]
    command += ["--variants", args.variants, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--threads", str(args.threads), "--device", args.device]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{model}/{mode}/{child} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """crow/sft and crow_reference/sft per (model, mode), against the floor and target."""
    ratios = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            by_variant = {r["variant"]: r for r in rows if r["model"] == model and r["mode"] == mode}
            if "sft" not in by_variant:
                continue
            sft = by_variant["sft"]
            entry: dict[str, Any] = {"model": model, "mode": mode, "floor": FLOORS[mode], "target": TARGETS[mode]}
            for variant in ("crow", "crow_reference"):
                if variant in by_variant:
                    entry[f"{variant}_over_sft"] = by_variant[variant]["ms_per_step"] / sft["ms_per_step"]
                    entry[f"{variant}_over_sft_cpu"] = by_variant[variant]["cpu_ms_per_step"] / sft["cpu_ms_per_step"]
                    entry[f"{variant}_peak_over_sft"] = by_variant[variant]["peak_mb"] / sft["peak_mb"]
            if "crow_over_sft" in entry:
                entry["meets_target"] = entry["crow_over_sft"] <= TARGETS[mode]
            ratios.append(entry)
    return ratios


def print_table(rows: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> None:
    header = f"{'model':<6} {'mode':<5} {'variant':<15} {'params':>8} {'ms/step':>9} {'cpu ms':>9} {'peak MB':>9}"
    print(header + f" {'base MB':>8}")
    print("-" * (len(header) + 9))
    for r in rows:
        params = f"{r['params'] / 1e6:.2f}M"
        print(
            f"{r['model']:<6} {r['mode']:<5} {r['variant']:<15} {params:>8} {r['ms_per_step']:>9.1f} "
            f"{r['cpu_ms_per_step']:>9.1f} {r['peak_mb']:>9.1f} {r['base_mb']:>8.1f}"
        )
    print()
    print(f"{'model':<6} {'mode':<5} {'crow/sft':>9} {'ref/sft':>8} {'floor':>6} {'target':>7}  crow peak/sft  ok")
    for e in ratios:
        print(
            f"{e['model']:<6} {e['mode']:<5} {e.get('crow_over_sft', float('nan')):>8.2f}x "
            f"{e.get('crow_reference_over_sft', float('nan')):>7.2f}x {e['floor']:>5.2f}x {e['target']:>6.2f}x  "
            f"{e.get('crow_peak_over_sft', float('nan')):>12.2f}x  {'yes' if e.get('meets_target') else 'NO'}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,25m", help="comma-separated: " + ",".join(MODELS))
    parser.add_argument("--modes", default="lora,full", help="comma-separated: lora,full")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the ratios are the point, and one thread per process keeps them stable "
        "when other processes share the cores; several threads then spin and time out erratically)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--json", metavar="PATH", help="also write rows and ratios as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: "time" or "memory:VARIANT"
    args = parser.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.child:
        args.model, args.mode = args.models, args.modes
        if args.child == "time":
            print(json.dumps(time_variants(args)))
        else:
            args.variant = args.child.removeprefix("memory:")
            print(json.dumps(measure_memory(args)))
        return 0

    models, modes = args.models.split(","), args.modes.split(",")
    unknown = [m for m in models if m not in MODELS] + [m for m in modes if m not in FLOORS]
    unknown += [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown model/mode/variant: {unknown}")
    print(f"device={args.device} threads={args.threads} batch={BATCH}x{SEQ_LEN} steps={args.steps} (+{args.warmup})")
    print(f"load average before: {os.getloadavg()}", flush=True)
    rows = []
    for model in models:
        for mode in modes:
            timed = spawn(args, model, mode, "time")
            for row in timed:
                row.update(spawn(args, model, mode, f"memory:{row['variant']}"))
                print(f"  {model}/{mode}/{row['variant']}: {row['ms_per_step']:.1f} ms/step", flush=True)
            rows += timed
    print(f"load average after: {os.getloadavg()}\n")
    ratios = summarize(rows)
    print_table(rows, ratios)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "ratios": ratios}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
