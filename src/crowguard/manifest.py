"""``manifest.json``: what produced an artefact (versions, seed, input hashes, world size, the machine), for
reproducibility."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from crowguard import __version__
from crowguard.io import sha256_path, write_json_atomic

TRACKED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that change numerical results (read without importing them)."""
    versions: dict[str, str | None] = {"crowguard": __version__, "python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine() -> dict[str, Any]:
    """The CPU this ran on (its model name, and family/model from ``/proc/cpuinfo`` where there is one, else None)
    and how many cores it saw: the times a stage records compare only between like machines (a Xeon with AMX against
    an AMD EPYC is 1.5-2x), with the vector instructions torch uses and whether the CPU has bfloat16 units, where the
    stage ran torch."""
    name, family = platform.processor() or platform.machine(), None
    try:
        first: dict[str, str] = {}  # the first processor's fields
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, colon, value = line.partition(":")
            if colon:
                first.setdefault(key.strip(), value.strip())
        name = first.get("model name", name)
        if "cpu family" in first and "model" in first:  # "AMD EPYC" alone names Zen 3 and Zen 4 alike
            family = f"{first['cpu family']}/{first['model']}"
    except OSError:
        pass
    found = {"cpu": name, "cpu_family_model": family, "cpu_count": os.cpu_count(), "system": platform.system()}
    torch = sys.modules.get("torch")  # recorded where the stage ran torch; a data-only stage does not import it
    if torch is None:
        return found
    from crowguard.speed import cpu_bfloat16_native

    return {
        **found,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bfloat16_native": cpu_bfloat16_native(),
    }


def build_manifest(
    stage: str,
    seed: int | None,
    inputs: Mapping[str, str | Path] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A manifest for ``stage``; every existing local input is hashed (Hub ids are recorded as given)."""
    hashed: dict[str, dict[str, str]] = {}
    for name, ref in (inputs or {}).items():
        path = Path(ref)
        entry = {"ref": str(ref)}
        if path.exists():
            entry["sha256"] = sha256_path(path)
        hashed[name] = entry
    return {
        "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "versions": package_versions(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "machine": machine(),
        "command": " ".join(sys.argv),
        "inputs": hashed,
        **dict(extra or {}),
    }


def write_manifest(out_dir: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``out_dir/manifest.json`` atomically and return its path."""
    path = Path(out_dir) / "manifest.json"
    write_json_atomic(path, dict(manifest))
    return path
