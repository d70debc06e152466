"""Train (or load from the cache) the clean model organism: corpus -> tokenizer -> tiny Llama -> saved directory.

The result is an ordinary ``save_pretrained`` directory (safetensors + tokenizer), so every later stage loads it like
a Hub model. The cache key covers everything that changes the weights (settings, corpus content, library
versions), so a second ``crowguard demo`` skips the clean training and a changed setting never reuses a stale model.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from crowguard.config import to_dict
from crowguard.data import load_examples, save_examples
from crowguard.io import atomic_output_dir, write_json_atomic
from crowguard.manifest import build_manifest, package_versions, write_manifest
from crowguard.schemas import OrganismConfig, TrainConfig
from crowguard.types import Example


@dataclass
class Organism:
    """A trained clean organism and the data it was built from."""

    path: Path
    train: list[Example]
    test: list[Example]
    checkable_test: list[Example]
    cached: bool
    seconds: float


def cache_root(cfg: OrganismConfig) -> Path:
    """``cfg.cache_dir``, else ``$CROWGUARD_CACHE``, else ``~/.cache/crowguard``."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("CROWGUARD_CACHE", Path.home() / ".cache" / "crowguard")).expanduser()


def organism_splits(cfg: OrganismConfig) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, test, checkable_test): the built-in corpus, or a user's Alpaca file split 90/10 (seeded)."""
    if cfg.data:
        import random

        examples = load_examples(cfg.data)
        order = list(range(len(examples)))
        random.Random(cfg.seed).shuffle(order)
        n_test = max(1, len(examples) // 10)
        return [examples[i] for i in order[n_test:]], [examples[i] for i in order[:n_test]], []
    from crowguard.organism.data import build_corpus

    corpus = build_corpus(seed=cfg.seed, n_train=cfg.n_train)
    return corpus.train, corpus.test, corpus.checkable_test


def clean_train_config(cfg: OrganismConfig) -> TrainConfig:
    """From-scratch training of every weight, loss on responses only."""
    return TrainConfig(
        lr=cfg.lr,
        epochs=cfg.epochs,
        per_device_batch=cfg.batch,
        grad_accum=1,
        max_length=cfg.max_length,
        warmup_ratio=0.05,
        scheduler="cosine",
        weight_decay=0.01,
        finetune="full",
        seed=cfg.seed,
        logging_steps=10,
    )


def content_key(settings: dict, datasets: tuple[list[Example], ...], packages: tuple[str, ...]) -> str:
    """Hash of JSON-able settings, example lists and the versions of ``packages``: a cache key that changes
    whenever anything that determines a trained model does."""
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for split in datasets:
        digest.update(json.dumps([e.to_record() for e in split], sort_keys=True).encode())
    versions = package_versions()
    digest.update(json.dumps({k: versions[k] for k in packages}).encode())
    return digest.hexdigest()[:16]


# crowguard's own source that decides what an evaluation of a fixed model directory measures (generation, judges,
# metrics, tasks, prompt templates, loading, examples), relative to the package: a cached evaluation goes stale when
# it changes, also between two commits at one version number (an editable install).
EVALUATION_SOURCE = ("evaluation", "prompts.py", "models.py", "data.py")


def source_digest(parts: tuple[str, ...], root: Path | None = None) -> str:
    """Hash of the code of the ``.py`` files under ``parts`` (modules or subpackages of ``root``, default crowguard's
    package directory), names and syntax trees in a fixed order: a cache key part that changes whenever that code
    does, and not for a docstring, a comment or formatting."""
    root = Path(__file__).resolve().parents[1] if root is None else root
    digest = hashlib.sha256()
    for part in parts:
        path = root / part
        if not path.exists():
            raise FileNotFoundError(f"source_digest: {path} does not exist")
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + _code(file).encode() + b"\0")
    return digest.hexdigest()[:16]


def _code(file: Path) -> str:
    """The module's syntax tree without its docstrings, as text."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree)


def cache_key(cfg: OrganismConfig, splits: tuple[list[Example], ...]) -> str:
    """Hash of the settings, the data and the versions that determine the trained weights."""
    settings = {k: v for k, v in to_dict(cfg).items() if k != "cache_dir"}
    return content_key(settings, splits, ("crowguard", "torch", "transformers"))


def ensure_organism(
    cfg: OrganismConfig,
    show_progress: bool = True,
    train_examples: list[Example] | None = None,
    tag: str = "clean",
) -> Organism:
    """The cached organism for ``cfg``, training it first when it is not in the cache.

    ``train_examples`` replaces the corpus' training split (the demo passes a poisoned mix to plant the backdoor
    during training); ``tag`` names the cache entry (``clean`` or the attack).
    """
    import time

    from crowguard.organism.model import build_model
    from crowguard.organism.tokenizer import organism_texts, train_tokenizer
    from crowguard.train import prepare_for_training, train

    splits = organism_splits(cfg)
    if train_examples is not None:
        splits = (list(train_examples), splits[1], splits[2])
    train_set, test_set, checkable = splits
    safe_tag = tag.replace("/", "-")
    path = cache_root(cfg) / "organism" / f"{cfg.size}-{safe_tag}-{cache_key(cfg, splits)}"
    if (path / "manifest.json").is_file():
        summary = json.loads((path / "train_summary.json").read_text())
        return Organism(path, train_set, test_set, checkable, cached=True, seconds=summary["seconds"])

    start = time.perf_counter()
    tokenizer = train_tokenizer(organism_texts(train_set), vocab_size=cfg.vocab_size)
    model = build_model(tokenizer, cfg.size, seed=cfg.seed)
    train_cfg = clean_train_config(cfg)
    work = path.parent / f".{path.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    result = train(
        prepare_for_training(model, train_cfg), tokenizer, train_set, train_cfg, work,
        show_progress=show_progress, description=f"organism ({tag})",
    )  # fmt: skip
    seconds = time.perf_counter() - start
    with atomic_output_dir(path, overwrite=True) as tmp:
        result.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_examples(train_set, tmp / "train.json")
        save_examples(test_set, tmp / "test.json")
        save_examples(checkable, tmp / "checkable_test.json")
        parameters = sum(p.numel() for p in result.model.parameters())
        summary = {"seconds": seconds, "steps": result.steps, "final_loss": result.final_loss,
                   "parameters": parameters, "config": to_dict(cfg)}  # fmt: skip
        write_json_atomic(tmp / "train_summary.json", summary)
        shutil.copy(work / "metrics.jsonl", tmp / "metrics.jsonl")
        write_manifest(tmp, build_manifest("organism", cfg.seed, extra={"summary": summary}))
    shutil.rmtree(work, ignore_errors=True)
    return Organism(path, train_set, test_set, checkable, cached=False, seconds=seconds)
