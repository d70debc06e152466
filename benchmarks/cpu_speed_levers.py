"""The levers of ``benchmarks/cpu_speed.py``: each atom's training and generation settings, its maths and its
environment (allocator, OpenMP), and which workloads a lever applies to."""

from __future__ import annotations

import dataclasses
import subprocess
from typing import Any


@dataclasses.dataclass(frozen=True)
class Atom:
    """One lever: what it sets for training and for generation (None: it does not apply), its maths, its env."""

    kind: str  # "fp32" (must equal today's), "bf16" (efficacy checked elsewhere), "batches" (other samples per step)
    train: dict[str, Any] | None = None
    generate: dict[str, Any] | None = None
    env: dict[str, str] | None = None
    unlearn: dict[str, Any] | None = None  # settings of the unlearn workload's own config (it alone takes them)


_BIG = str(1 << 32)  # a trim threshold no run reaches: freed memory stays with the process
ATOMS: dict[str, Atom] = {
    "compile": Atom("fp32", train={"compile": "layers"}, generate={"compile_decode": True}),
    "bf16": Atom("bf16", train={"precision": "bf16"}, generate={"dtype": "bfloat16"}),
    "bf16base": Atom("bf16", train={"base_dtype": "bfloat16"}),
    "trainer_compile": Atom("fp32", train={"trainer_args": {"torch_compile": True}}),
    "length_sorted": Atom("batches", train={"trainer_args": {"length_sorted": True}}),
    "merge": Atom("fp32", generate={"merge": True}),
    "fused": Atom("fp32", unlearn={"fused": True}),
    "malloc": Atom("fp32", env={"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": _BIG}),
    "nommap": Atom("fp32", env={"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": _BIG}),
    "omp_passive": Atom("fp32", env={"OMP_WAIT_POLICY": "PASSIVE"}),
    "omp_active": Atom("fp32", env={"OMP_WAIT_POLICY": "ACTIVE"}),
    "jemalloc": Atom("fp32", env={"LD_PRELOAD": "libjemalloc.so"}),
    "tcmalloc": Atom("fp32", env={"LD_PRELOAD": "libtcmalloc.so"}),
}
DEFAULT_LEVERS = ("compile,bf16,bf16base,bf16base+bf16,compile+bf16base,compile+bf16,trainer_compile,length_sorted,"
                  "merge,compile+merge,bf16+merge,malloc,nommap,omp_passive")  # fmt: skip


def atoms_of(lever: str) -> list[str]:
    return [] if lever == "base" else lever.split("+")


def preloaded(name: str) -> str | None:
    """The full path ``ldconfig -p`` gives for a shared library name (``libjemalloc.so``), or None."""
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    for line in listing.splitlines():
        if line.strip().startswith(name) and "=>" in line:
            return line.split("=>")[-1].strip()
    return None


def lever_env(lever: str) -> tuple[dict[str, str], str | None]:
    """The environment a lever's atoms set, and why it cannot run here (a preload library missing) or None."""
    env: dict[str, str] = {}
    for atom in atoms_of(lever):
        for key, value in (ATOMS[atom].env or {}).items():
            if key == "LD_PRELOAD":
                path = preloaded(value)
                if path is None:
                    return env, f"{value} is not installed (ldconfig -p lists no such library)"
                value = path
            env[key] = value
    return env, None


def applies(lever: str, workload: str) -> bool:
    def fits(atom: Atom) -> bool:
        if atom.unlearn is not None:
            return workload == "unlearn"
        return (atom.generate if workload == "generate" else atom.train) is not None or bool(atom.env)

    return all(fits(ATOMS[a]) for a in atoms_of(lever))
