"""Recipe: scan prompts for a backdoor trigger without knowing it, by their layer-consistency profile.

check the output directory, model and files -> load the model (untrusted: safetensors, no remote code) -> fit the
clean profile on the reference prompts (:func:`crowguard.evaluation.scan.fit_reference`) -> score every prompt
(:func:`crowguard.evaluation.scan.consistency_score`, a p-value against the reference, the prompt's perplexity and
optionally ONION) -> ``scores.json``, ``scan.md`` and ``manifest.json``, written atomically. With labelled prompts
(a triggered and a clean file) it also reports AUROC and TPR at 5% FPR of every score.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from crowguard.config import ConfigError, suggest, to_dict
from crowguard.data import DataError, load_examples
from crowguard.evaluation import scan
from crowguard.io import atomic_output_dir, check_output_dir, write_json_atomic, write_text_atomic
from crowguard.manifest import build_manifest, write_manifest
from crowguard.models import check_model_exists, load_model
from crowguard.schemas import ModelConfig, ScanConfig
from crowguard.types import Example

MIN_REFERENCE = 3


def _key(example: Example) -> tuple[str, str]:
    return (" ".join(example.instruction.split()), " ".join(example.input.split()))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"scan {name}: unknown {value!r}{suggest(value, list(choices))}; one of {', '.join(choices)}"
        )


def reference_prompts(reference: list[Example], scored: list[Example], n_reference: int) -> tuple[list[Example], int]:
    """The first ``n_reference`` (0: all) reference prompts that are not among the scored ones (same instruction
    and input, whitespace-normalised), and how many were left out for that: a clean prompt must never be scored
    against a reference fitted on itself."""
    scored_keys = {_key(e) for e in scored}
    kept = [e for e in reference if _key(e) not in scored_keys]
    excluded = len(reference) - len(kept)
    if n_reference > 0:
        kept = kept[:n_reference]
    if len(kept) < MIN_REFERENCE:
        raise DataError(f"the reference set has {len(kept)} usable prompts ({excluded} are among the scanned ones); "
                        f"give at least {MIN_REFERENCE} other clean prompts (about 100)")  # fmt: skip
    return kept, excluded


def scan_markdown(result: dict[str, Any], top: int = 10) -> str:
    """``scan.md``: the settings, the detection metrics (when labelled) and the most suspicious prompts."""
    s = result["settings"]
    lines = [f"# Scan: {s['model']}" + (f" + {s['adapter']}" if s["adapter"] else ""), "",
             f"Score: `{s['method']}` over the `{s['features']}` features of {result['reference']['n']} clean "
             f"reference prompts ({result['reference']['n_excluded']} left out as scanned); "
             f"{len(result['prompts'])} prompts scanned, {result['n_flagged']} with p <= {s['alpha']} "
             "against the reference.", ""]  # fmt: skip
    metrics = result.get("metrics")
    if metrics:
        lines += [f"## Triggered ({metrics['n_triggered']}) vs clean ({metrics['n_clean']}) prompts", "",
                  f"| score | AUROC | TPR @ {100 * s['fpr']:g}% FPR |", "|---|---|---|"]  # fmt: skip
        for name, m in metrics["scores"].items():
            mark = " (primary)" if name == s["method"] else ""
            lines.append(f"| {name}{mark} | {m['auroc']:.3f} | {100 * m['tpr_at_fpr']:.1f}% |")
        lines.append("")
    lines += [f"## The {min(top, len(result['prompts']))} most suspicious prompts", "",
              "| rank | score | p | perplexity | source | instruction |", "|---|---|---|---|---|---|"]  # fmt: skip
    for rec in sorted(result["prompts"], key=lambda r: r["rank"])[:top]:
        text = " ".join(rec["instruction"].split()).replace("|", "\\|")
        text = text if len(text) <= 100 else text[:97] + "..."
        lines.append(f"| {rec['rank']} | {rec['score']:.3g} | {rec['p_value']:.3f} | {rec['perplexity']:.3g} | "
                     f"{rec['source']} | {text} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run_scan(
    model_cfg: ModelConfig,
    cfg: ScanConfig,
    out_dir: Path,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Score the prompts of ``cfg.data`` and/or of ``cfg.triggered``/``cfg.clean`` against the clean profile of
    ``cfg.reference``'s prompts (those not scanned, the first ``n_reference``); write ``out_dir`` and return what
    ``scores.json`` holds: per prompt its score, rank (1 = most suspicious), p-value against the reference
    (flagged at ``alpha``), perplexity and, with ``onion``, ONION's score; with labels, every score's AUROC/TPR."""
    _check_choice("method", cfg.method, scan.METHODS)
    _check_choice("features", cfg.features, scan.FEATURES)
    if not cfg.data and not cfg.triggered:
        raise DataError("nothing to scan: give --data, or --triggered and --clean")
    sets = [("data", None, cfg.data)] if cfg.data else []
    if cfg.triggered:
        sets += [("triggered", 1, cfg.triggered), ("clean", 0, cfg.clean)]
    inputs = [model_cfg.name_or_path, model_cfg.adapter, cfg.reference, *(path for _, _, path in sets)]
    check_output_dir(Path(out_dir), overwrite, inputs)  # before any model is loaded
    check_model_exists(model_cfg.name_or_path, model_cfg.adapter, model_cfg.revision)
    scanned: list[tuple[str, int | None, Example]] = []
    for source, label, path in sets:
        examples = load_examples(path, require_output=False)
        scanned += [(source, label, e) for e in (examples[: cfg.limit] if cfg.limit > 0 else examples)]
    examples = [e for _, _, e in scanned]
    reference, excluded = reference_prompts(load_examples(cfg.reference, require_output=False), examples,
                                            cfg.n_reference)  # fmt: skip
    model, tokenizer = load_model(model_cfg.name_or_path, model_cfg.adapter, dtype=model_cfg.dtype,
                                  trust_remote_code=model_cfg.trust_remote_code, allow_pickle=model_cfg.allow_pickle,
                                  revision=model_cfg.revision, device=model_cfg.device)  # fmt: skip
    placement = {"device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype)}
    start = time.perf_counter()
    ref_profiles = scan.layer_profiles(model, tokenizer, reference, model_cfg.template, cfg.batch_size)
    profiles = scan.layer_profiles(model, tokenizer, examples, model_cfg.template, cfg.batch_size)
    fit = scan.fit_reference(ref_profiles, cfg.features)
    all_scores = {m: scan.consistency_score(profiles, fit, m) for m in scan.METHODS}  # type: ignore[arg-type]
    p_values = scan.reference_p_values(all_scores[cfg.method], ref_profiles, cfg.method, cfg.features)
    baselines = {"perplexity": scan.prompt_perplexity(model, tokenizer, examples, cfg.batch_size)}
    if cfg.onion:
        baselines["onion"] = scan.onion_scores(model, tokenizer, examples, cfg.batch_size, cfg.onion_max_words)
    seconds = time.perf_counter() - start

    records = _records(scanned, all_scores, cfg.method, p_values, baselines, cfg.alpha)
    metrics = _metrics(scanned, {**all_scores, **baselines}, cfg.fpr) if cfg.triggered else None
    settings = {"model": model_cfg.name_or_path, "adapter": model_cfg.adapter, "data": cfg.data or None,
                "reference": cfg.reference, "labels_from": [cfg.triggered, cfg.clean] if cfg.triggered else None,
                "template": model_cfg.template, **{k: v for k, v in to_dict(cfg).items() if k not in _FILES},
                "placement": placement}  # fmt: skip
    result = {"settings": settings,
              "reference": {"n": fit.n, "n_excluded": excluded, "shrinkage": fit.shrinkage,
                            "n_pairs": int(ref_profiles.shape[1])},
              "metrics": metrics, "n_flagged": sum(r["flagged"] for r in records), "seconds": seconds,
              "prompts": records}  # fmt: skip
    with atomic_output_dir(Path(out_dir), overwrite) as tmp:
        write_json_atomic(tmp / "scores.json", result)
        write_text_atomic(tmp / "scan.md", scan_markdown(result))
        named = {"model": model_cfg.name_or_path, "reference": cfg.reference}
        named |= {"adapter": model_cfg.adapter} if model_cfg.adapter else {}
        named |= {source: path for source, _, path in sets}
        write_manifest(tmp, build_manifest("scan", None, named, {"placement": placement}))
    if show_progress:
        print(scan_markdown(result, top=5))
    return result


_FILES = ("data", "reference", "triggered", "clean")  # recorded as paths above, not as knobs


def _records(
    scanned: list[tuple[str, int | None, Example]],
    all_scores: dict[str, Any],
    method: str,
    p_values: Any,
    baselines: dict[str, Any],
    alpha: float,
) -> list[dict[str, Any]]:
    """One record per scanned prompt: its text, source, label, primary score, rank, p-value, flag and baselines."""
    scores = all_scores[method]
    ranks = scan.competition_ranks(scores)
    records = []
    for i, (source, label, e) in enumerate(scanned):
        rec = {"instruction": e.instruction, "input": e.input, "source": source, "label": label,
               "score": float(scores[i]), "rank": ranks[i], "p_value": float(p_values[i]),
               "flagged": bool(p_values[i] <= alpha), "perplexity": float(baselines["perplexity"][i])}  # fmt: skip
        if "onion" in baselines:
            rec["onion"] = float(baselines["onion"][i])
        rec["scores"] = {m: float(all_scores[m][i]) for m in scan.METHODS}
        records.append(rec)
    return records


def _metrics(scanned: list[tuple[str, int | None, Example]], named: dict[str, Any], fpr: float) -> dict[str, Any]:
    """Every score's detection metrics, triggered (label 1) as the positives against clean (label 0)."""
    pos = [i for i, (_, label, _) in enumerate(scanned) if label == 1]
    neg = [i for i, (_, label, _) in enumerate(scanned) if label == 0]
    return {"n_triggered": len(pos), "n_clean": len(neg), "positive": "triggered",
            "scores": {name: scan.detection_metrics(values[pos], values[neg], fpr)
                       for name, values in named.items()}}  # fmt: skip
