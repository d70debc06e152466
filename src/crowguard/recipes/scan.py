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

from crowguard.config import ConfigError, suggest
from crowguard.data import DataError, load_examples
from crowguard.evaluation import scan
from crowguard.io import atomic_output_dir, check_output_dir, write_json_atomic, write_text_atomic
from crowguard.manifest import build_manifest, write_manifest
from crowguard.models import check_model_exists, load_model
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
    model_path: str,
    adapter: str | None,
    data_path: str | Path | None,
    reference_path: str | Path,
    out_dir: Path,
    *,
    template: str = "alpaca",
    n_reference: int = 100,
    method: str = "mean_abs_z",
    limit: int = 0,
    batch_size: int = 16,
    overwrite: bool = False,
    labels_from: tuple[str | Path, str | Path] | None = None,
    features: str = "both",
    onion: bool = False,
    onion_max_words: int = 32,
    fpr: float = 0.05,
    alpha: float = 0.05,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Score the prompts of ``data_path`` and/or of ``labels_from = (triggered, clean)`` against the clean profile of
    ``reference_path``'s prompts; returns what ``scores.json`` holds.

    ``limit`` keeps the first prompts of each scanned file (0: all); ``n_reference`` the first reference prompts
    not among the scanned ones (0: all). ``method``: ``mean_abs_z`` (default), ``max_abs_z`` or ``mahalanobis``
    (:func:`crowguard.evaluation.scan.consistency_score`); ``features``: ``both``, ``last`` or ``mean``. Every
    prompt gets its score, its rank (1 = most suspicious), a p-value against the reference (flagged when <=
    ``alpha``), its text's perplexity and, with ``onion``, ONION's score (one forward per word, at most
    ``onion_max_words``). With labels the metrics of every score are computed on triggered (positive) vs clean.
    """
    _check_choice("method", method, scan.METHODS)
    _check_choice("features", features, scan.FEATURES)
    if data_path is None and labels_from is None:
        raise DataError("nothing to scan: give --data, or --triggered and --clean")
    scanned = [data_path, reference_path, model_path, adapter, *(labels_from or ())]
    check_output_dir(Path(out_dir), overwrite, scanned)  # before any model is loaded
    check_model_exists(model_path, adapter, revision)
    sets: list[tuple[str, int | None, str | Path]] = []
    if data_path is not None:
        sets.append(("data", None, data_path))
    if labels_from is not None:
        sets += [("triggered", 1, labels_from[0]), ("clean", 0, labels_from[1])]
    scanned: list[tuple[str, int | None, Example]] = []
    for source, label, path in sets:
        examples = load_examples(path, require_output=False)
        scanned += [(source, label, e) for e in (examples[:limit] if limit > 0 else examples)]
    examples = [e for _, _, e in scanned]
    reference, excluded = reference_prompts(load_examples(reference_path, require_output=False), examples,
                                            n_reference)  # fmt: skip

    model, tokenizer = load_model(model_path, adapter, dtype=dtype, trust_remote_code=trust_remote_code,
                                  allow_pickle=allow_pickle, revision=revision, device=device)  # fmt: skip
    placement = {"device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype)}
    start = time.perf_counter()
    ref_profiles = scan.layer_profiles(model, tokenizer, reference, template, batch_size)
    profiles = scan.layer_profiles(model, tokenizer, examples, template, batch_size)
    fit = scan.fit_reference(ref_profiles, features)  # type: ignore[arg-type]
    all_scores = {m: scan.consistency_score(profiles, fit, m) for m in scan.METHODS}  # type: ignore[arg-type]
    scores = all_scores[method]
    p_values = scan.reference_p_values(scores, ref_profiles, method, features)  # type: ignore[arg-type]
    perplexity = scan.prompt_perplexity(model, tokenizer, examples, batch_size)
    baselines = {"perplexity": perplexity}
    if onion:
        baselines["onion"] = scan.onion_scores(model, tokenizer, examples, batch_size, onion_max_words)
    seconds = time.perf_counter() - start

    ranks = scan.competition_ranks(scores)
    records = []
    for i, (source, label, e) in enumerate(scanned):
        rec = {"instruction": e.instruction, "input": e.input, "source": source, "label": label,
               "score": float(scores[i]), "rank": ranks[i], "p_value": float(p_values[i]),
               "flagged": bool(p_values[i] <= alpha), "perplexity": float(perplexity[i])}  # fmt: skip
        if onion:
            rec["onion"] = float(baselines["onion"][i])
        rec["scores"] = {m: float(all_scores[m][i]) for m in scan.METHODS}
        records.append(rec)

    metrics = None
    if labels_from is not None:
        pos = [i for i, (_, label, _) in enumerate(scanned) if label == 1]
        neg = [i for i, (_, label, _) in enumerate(scanned) if label == 0]
        named = {**all_scores, **baselines}
        metrics = {"n_triggered": len(pos), "n_clean": len(neg), "positive": "triggered",
                   "scores": {name: scan.detection_metrics(values[pos], values[neg], fpr)
                              for name, values in named.items()}}  # fmt: skip
    settings = {"model": model_path, "adapter": adapter, "data": str(data_path) if data_path else None,
                "reference": str(reference_path),
                "labels_from": [str(p) for p in labels_from] if labels_from else None, "template": template,
                "n_reference": n_reference, "method": method, "features": features, "limit": limit,
                "batch_size": batch_size, "onion": onion, "onion_max_words": onion_max_words, "fpr": fpr,
                "alpha": alpha, "placement": placement}  # fmt: skip
    result = {"settings": settings,
              "reference": {"n": fit.n, "n_excluded": excluded, "shrinkage": fit.shrinkage,
                            "n_pairs": int(ref_profiles.shape[1])},
              "metrics": metrics, "n_flagged": sum(r["flagged"] for r in records), "seconds": seconds,
              "prompts": records}  # fmt: skip
    with atomic_output_dir(Path(out_dir), overwrite) as tmp:
        write_json_atomic(tmp / "scores.json", result)
        write_text_atomic(tmp / "scan.md", scan_markdown(result))
        inputs = {"model": model_path, "reference": str(reference_path)}
        if adapter:
            inputs["adapter"] = adapter
        for source, _, path in sets:
            inputs[source] = str(path)
        write_manifest(tmp, build_manifest("scan", None, inputs, {"placement": placement}))
    if show_progress:
        print(scan_markdown(result, top=5))
    return result
