"""The trigger-free scanner on the planted SmolLM2 organisms: AUROC and TPR at 5% FPR, consistency vs perplexity.

For each cell (``<runs>/<trigger>-<payload>`` with a finished ``plant/manifest.json``, as written by
``benchmarks/efficacy.py``) and each model of it (``unpoisoned``: the adapter's base; ``backdoored``: ``plant``;
any defense directory named in ``--models``, e.g. ``crow-continue-s0``, when it is finished), the scanner of
:mod:`crowguard.evaluation.scan` is fitted on the first ``--n-reference`` (100) of the paper's clean consistency
samples (``<data>/consistency_data/consistency_data.json``, the samples CROW trains on, none of them a test prompt)
and scores the paper's triggered and clean test prompts (:func:`crowguard.evaluation.tasks.paper_task`, 200 + 200;
the clean ones are nearly the triggered ones without the trigger: 184 of 200 (instruction, input) pairs match, in
another order). Positives are the triggered prompts; the unpoisoned model is the control: what it detects is the
trigger's text, not the backdoor.

Reported per model: AUROC and TPR at 5% FPR (threshold: the negatives' ``floor(0.05 n) + 1``-th largest score,
flagged when strictly above) of the consistency score for every aggregation (mean |z|, max |z|, Mahalanobis with
Ledoit-Wolf shrinkage) and feature set (last token, mean over tokens, both), the prompt perplexity baseline and
ONION (``--no-onion`` to skip; one forward per word, at most ``--onion-max-words``), plus the share of clean and
triggered test prompts flagged by the reference p-value at 0.05 (is the reference calibrated for the test set?).

Each model's result is ``<out>/<cell>/<model>.json`` (with its per-prompt profiles in ``<model>.profiles.safetensors``)
and is skipped when it exists (or its committed ``<model>.json.xz``, packed without the profiles), so the table builds
up over sessions; a result made with other settings is refused (use a new ``--out``). ``--report`` only prints the
table of what is there.

    CROWGUARD_CACHE=/work/cache HF_HUB_OFFLINE=1 python benchmarks/scan.py --data /work/shared/data \\
        --runs /work/runs/efficacy --out benchmarks/results/scan --models unpoisoned,backdoored,crow-continue-s0
    python benchmarks/scan.py --report --out benchmarks/results/scan
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PRIMARY = ("mean_abs_z", "both")
MAIN_COLUMNS = [("mean_abs_z/both", "mean abs z"), ("max_abs_z/both", "max abs z"),
                ("mahalanobis/both", "Mahalanobis"), ("mean_abs_z/last", "mean abs z, last token"),
                ("mean_abs_z/mean", "mean abs z, mean tokens"), ("perplexity", "perplexity"),
                ("onion", "ONION")]  # fmt: skip


def cell_models(cell_dir: Path, names: list[str]) -> dict[str, Path | str]:
    """The models of one cell that exist: ``unpoisoned`` (the plant's base), ``backdoored`` (``plant``), and any
    other name as a finished directory of the cell."""
    from crowguard.models import base_of_adapter

    plant = cell_dir / "plant"
    found: dict[str, Path | str] = {}
    for name in names:
        if name == "unpoisoned":
            found[name] = base_of_adapter(plant)
        elif name == "backdoored":
            found[name] = plant
        elif (cell_dir / name / "manifest.json").is_file():
            found[name] = cell_dir / name
    return found


def measure(model_path: str, task: Any, reference: list[Any], settings: dict[str, Any]) -> tuple[dict, dict]:
    """Every score of one model on ``task``; returns (result, profiles to save)."""
    import torch

    from crowguard.evaluation import scan
    from crowguard.models import load_model

    model, tokenizer = load_model(model_path, device="auto")
    model.eval()
    batch = settings["batch_size"]
    start = time.perf_counter()
    profiles = {name: scan.layer_profiles(model, tokenizer, examples, "alpaca", batch)
                for name, examples in (("reference", reference), ("triggered", task.triggered),
                                       ("clean", task.clean))}  # fmt: skip
    seconds = {"profiles": time.perf_counter() - start}
    scores: dict[str, dict[str, torch.Tensor]] = {}
    for method in scan.METHODS:
        for features in scan.FEATURES:
            fit = scan.fit_reference(profiles["reference"], features)
            scores[f"{method}/{features}"] = {k: scan.consistency_score(profiles[k], fit, method)
                                              for k in ("triggered", "clean")}  # fmt: skip
    start = time.perf_counter()
    scores["perplexity"] = {k: scan.prompt_perplexity(model, tokenizer, getattr(task, k), batch)
                            for k in ("triggered", "clean")}  # fmt: skip
    seconds["perplexity"] = time.perf_counter() - start
    if settings["onion"]:
        start = time.perf_counter()
        scores["onion"] = {k: scan.onion_scores(model, tokenizer, getattr(task, k), batch, settings["onion_max_words"])
                           for k in ("triggered", "clean")}  # fmt: skip
        seconds["onion"] = time.perf_counter() - start
    metrics = {name: scan.detection_metrics(s["triggered"], s["clean"], settings["fpr"]) for name, s in scores.items()}
    primary = "/".join(PRIMARY)
    flagged = {}
    for k in ("triggered", "clean"):
        p = scan.reference_p_values(scores[primary][k], profiles["reference"], PRIMARY[0], PRIMARY[1])
        flagged[k] = float((p <= settings["alpha"]).float().mean())
    result = {
        "model": str(model_path),
        "settings": settings,
        "n": {"reference": len(reference), "triggered": len(task.triggered), "clean": len(task.clean)},
        "n_pairs": int(profiles["reference"].shape[1]),
        "metrics": metrics,
        "flagged_at_alpha": {"score": primary, **flagged},
        "mean_profile": {
            k: {"last": v[..., 0].mean(0).tolist(), "mean": v[..., 1].mean(0).tolist()} for k, v in profiles.items()
        },
        "scores": {name: {k: v.tolist() for k, v in s.items()} for name, s in scores.items()},
        "seconds": seconds,
        "placement": {"device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype)},
    }
    return result, profiles


def save_profiles(path: Path, profiles: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from crowguard.io import current_umask

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    save_file({k: v.contiguous() for k, v in profiles.items()}, tmp)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from colleagues
    os.replace(tmp, path)


UNPACK = {".json": bytes, ".xz": lzma.decompress, ".gz": gzip.decompress}  # a result file by its suffix


def run_cell(args: argparse.Namespace, cell_dir: Path, settings: dict[str, Any], say: Any) -> None:
    from crowguard.data import load_examples
    from crowguard.evaluation.tasks import paper_task
    from crowguard.io import write_json_atomic
    from crowguard.recipes.scan import reference_prompts

    trigger, payload = cell_dir.name.split("-")[:2]  # a swept plant's cell is <trigger>-<payload>-poisonN
    root = Path(args.data)
    task = paper_task(root, payload, trigger).limited(args.limit)
    pool = load_examples(root / "consistency_data" / "consistency_data.json", require_output=False)
    reference, excluded = reference_prompts(pool, [*task.triggered, *task.clean], args.n_reference)
    out = Path(args.out) / cell_dir.name
    out.mkdir(parents=True, exist_ok=True)
    for name, path in cell_models(cell_dir, args.models.split(",")).items():
        target = out / f"{name}.json"
        done = next((p for p in (target, out / f"{name}.json.xz") if p.is_file()), None)  # .xz: as committed
        if done is not None:
            recorded = json.loads(UNPACK[done.suffix](done.read_bytes()))["settings"]
            if recorded != settings:
                raise SystemExit(f"{done}: measured with other settings ({recorded}); use a new --out")
            say(f"[{cell_dir.name}] {name}: done, skipped")
            continue
        say(f"[{cell_dir.name}] {name}: {path}")
        result, profiles = measure(str(path), task, reference, settings)
        result["reference_excluded"] = excluded
        save_profiles(out / f"{name}.profiles.safetensors", profiles)
        write_json_atomic(target, result)  # last: its presence means the model is done
        say(f"[{cell_dir.name}] {name}: " + ", ".join(f"{k} {v['auroc']:.3f}" for k, v in result["metrics"].items()
                                                     if k in dict(MAIN_COLUMNS)))  # fmt: skip


def collect(out: Path) -> list[dict[str, Any]]:
    """Every model's result under ``out``: ``<cell>/<model>.json``, or ``.json.xz`` as committed (``.json.gz``
    before; compressed, without the per-prompt profiles, which a rerun writes again). A model with more than one
    file is read once, from the first of ``.json``, ``.json.xz``, ``.json.gz`` (what :func:`run_cell` skips on)."""
    chosen: dict[tuple[str, str], Path] = {}
    for pattern in ("*/*.json", "*/*.json.xz", "*/*.json.gz"):  # preference order
        for path in sorted(out.glob(pattern)):
            chosen.setdefault((path.parent.name, path.name.removesuffix(path.suffix).removesuffix(".json")), path)
    rows = []
    for (cell, model), path in chosen.items():
        data = json.loads(UNPACK[path.suffix](path.read_bytes()))
        if "metrics" in data:
            rows.append({**data, "cell": cell, "model": model, "path": data["model"]})
    order = {"unpoisoned": 0, "backdoored": 1}
    return sorted(rows, key=lambda r: (r["cell"], order.get(r["model"], 2), r["model"]))


def table(rows: list[dict[str, Any]]) -> str:
    """AUROC (TPR at the FPR) per score; the share of test prompts the reference p-value flags."""
    if not rows:
        return "(nothing measured yet)"
    fpr = rows[0]["settings"]["fpr"]
    head = ["cell", "model", "n trig/clean", *(h for _, h in MAIN_COLUMNS), "flagged trig / clean"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = []
        for key, _ in MAIN_COLUMNS:
            m = r["metrics"].get(key)
            cells.append(f"{m['auroc']:.3f} ({100 * m['tpr_at_fpr']:.0f}%)" if m else "-")
        f = r["flagged_at_alpha"]
        n = f"{r['n']['triggered']}/{r['n']['clean']}"
        lines.append(f"| {r['cell']} | {r['model']} | {n} | " + " | ".join(cells)
                     + f" | {100 * f['triggered']:.0f}% / {100 * f['clean']:.0f}% |")  # fmt: skip
    note = (f"\nAUROC (TPR at {100 * fpr:g}% FPR), triggered = positive, clean = negative; consistency scores fitted "
            f"on {rows[0]['n']['reference']} clean reference prompts; flagged: reference p-value <= "
            f"{rows[0]['settings']['alpha']} with the mean abs z score.")  # fmt: skip
    return "\n".join(lines) + "\n" + note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data", help="the CROW paper's data root")
    parser.add_argument("--runs", default="runs/efficacy", help="the efficacy study's cells (benchmarks/efficacy.py)")
    parser.add_argument("--out", default="runs/scan", help="where each cell's and model's JSON goes")
    parser.add_argument("--cells", default="", help="comma list of cell names (default: every planted cell)")
    parser.add_argument("--models", default="unpoisoned,backdoored,crow-continue-s0",
                        help="comma list: unpoisoned, backdoored, or a defense directory of the cell")  # fmt: skip
    parser.add_argument("--n-reference", type=int, default=100)
    parser.add_argument("--limit", type=int, default=0, help="first N triggered and clean test prompts (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-onion", action="store_true", help="skip ONION (one forward per word of each prompt)")
    parser.add_argument("--onion-max-words", type=int, default=32)
    parser.add_argument("--fpr", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=0.05, help="reference p-value at which a prompt is flagged")
    parser.add_argument("--report", action="store_true", help="only print the table of what is measured")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    out = Path(args.out)
    if not args.report:
        if not (Path(args.data) / "consistency_data" / "consistency_data.json").is_file():
            raise SystemExit(f"{args.data}: not the CROW paper's data root (no consistency_data/)")
        settings = {"n_reference": args.n_reference, "limit": args.limit, "batch_size": args.batch_size,
                    "onion": not args.no_onion, "onion_max_words": args.onion_max_words, "fpr": args.fpr,
                    "alpha": args.alpha, "template": "alpaca"}  # fmt: skip
        runs = Path(args.runs)
        wanted = [c for c in args.cells.split(",") if c]
        planted = sorted(p.parent.parent for p in runs.glob("*/plant/manifest.json"))
        cells = [runs / c for c in wanted] if wanted else planted
        for cell_dir in cells:
            if not (cell_dir / "plant" / "manifest.json").is_file():
                say(f"[{cell_dir.name}] no finished plant, skipped")
                continue
            run_cell(args, cell_dir, settings, say)
    rows = collect(out)
    from crowguard.io import write_json_atomic, write_text_atomic

    if rows:
        keys = ("cell", "model", "path", "n", "metrics", "flagged_at_alpha", "seconds")
        summary = [{k: r[k] for k in keys} for r in rows]
        write_json_atomic(out / "scan.json", {"rows": summary})
        write_text_atomic(out / "scan.md", table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
