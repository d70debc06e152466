"""Benchmark: what this CPU's matrix products give at the shapes of a SmolLM2 training step (float32 and bfloat16).

A SmolLM2-135M step of 8 x 96 tokens is about 400 GFLOP of matrix products; the throughput here says how much of a
step they take on this machine, and whether bfloat16 is native (faster) or emulated (far slower) on its CPU.

python benchmarks/cpu_gemm.py [--tokens 768] [--reps 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

# (inner, columns) of a step's products, each with ``tokens`` rows: SmolLM2's hidden 576, MLP 1536, vocabulary 49,152
SHAPES = {
    "attention projection": (576, 576),
    "MLP up": (576, 1536),
    "MLP down": (1536, 576),
    "LM head": (576, 49152),
}


def median_seconds(a: torch.Tensor, b: torch.Tensor, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speedup(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{1 / ratio:.0f}x slower"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=768, help="rows of each product (a step's tokens)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--bf16-reps", type=int, default=1,
                        help="bfloat16 products: 70-300x slower than float32 on a CPU without bfloat16 units (the LM "
                             "head's took 132 s on a Zen 3 EPYC)")  # fmt: skip
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, (inner, cols) in SHAPES.items():
        a, b = torch.randn(args.tokens, inner), torch.randn(inner, cols)
        fp32 = median_seconds(a, b, args.reps)
        bf16 = median_seconds(a.bfloat16(), b.bfloat16(), args.bf16_reps, warmup=1)
        flops = 2 * args.tokens * inner * cols
        rows.append({"product": name, "shape": [args.tokens, inner, cols], "fp32_ms": 1e3 * fp32,
                     "fp32_gflops": flops / fp32 / 1e9, "bf16_ms": 1e3 * bf16,
                     "bf16_over_fp32": fp32 / bf16})  # fmt: skip
    machine = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    print(f"# {machine['cpu_capability']}, {machine['threads']} threads, {args.tokens} rows")
    print("| product | shape | float32 ms | GFLOP/s | bfloat16 ms | bfloat16 speed-up |\n|---|---|---|---|---|---|")
    for r in rows:
        shape = " x ".join(map(str, r["shape"]))
        print(f"| {r['product']} | {shape} | {r['fp32_ms']:.2f} | {r['fp32_gflops']:.0f} | {r['bf16_ms']:.2f} | "
              f"{speedup(r['bf16_over_fp32'])} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
