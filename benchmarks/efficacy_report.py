"""The efficacy study's report: rows, seed aggregates and paired tests from the evaluations a study left.

Reads a study's output (``benchmarks/efficacy.py --out``): each cell's ``eval-*`` evaluations, loose or packed into
``evaluations.json.xz``, and the manifests of the stages they evaluated. Writes nothing but what ``pack`` moves.
"""

from __future__ import annotations

import json
import lzma
import shutil
from pathlib import Path
from typing import Any

from crowguard.attacks.payloads import make_payload
from crowguard.evaluation.evaluate import summary_row
from crowguard.evaluation.metrics import hijack_rate, paired_rates
from crowguard.evaluation.report import over_seeds
from crowguard.invert import InvertConfig
from crowguard.schemas import EvalConfig

EVAL = EvalConfig()  # the hijack rule's defaults, for evaluations that did not record theirs


def fired(records: list[dict[str, Any]]) -> list[bool]:
    """Per record, whether the attack fired (a 0/1 judge's score, or a graded one at 0.5)."""
    return [r["score"] >= 0.5 for r in records]


def seeded_label(label: str) -> tuple[str, int] | None:
    """``"crow-continue-s1"`` -> ``("crow-continue", 1)``; None for an unseeded model (``backdoored``)."""
    name, _, seed = label.rpartition("-s")
    return (name, int(seed)) if name and seed.isdigit() else None


def current_hijack(results: dict[str, Any]) -> float:
    """The hijack rate of stored generations under the current rule (``metrics.hijack_rate``), so evaluations made
    before a change of the rule are reported by the same rule as new ones."""
    records = results["records"]
    triggered = [r for r in records if r["set"] == "triggered"]
    clean = [r["response"] for r in records if r["set"] == "clean"]
    settings = results.get("settings", {})
    return hijack_rate([r["response"] for r in triggered], clean, fired(triggered),
                       min_share=settings.get("hijack_min_share", EVAL.hijack_min_share),
                       clean_ratio=settings.get("hijack_clean_ratio", EVAL.hijack_clean_ratio))["rate"]  # fmt: skip


# a committed cell's evaluations, every generation kept, in one file: xz, whose window spans the whole file, so the
# same prompts and near-equal answers of the cell's many evaluations compress together (3.6x smaller than gzip's)
PACKED = "evaluations.json.xz"


def loose(cell_dir: Path) -> list[Path]:
    """A cell's unpacked evaluations: the runner's ``eval-*/results.json`` (and ``partial-*``), and the JSON files
    of the study's first runs."""
    files = [*cell_dir.glob("eval-*.json"), *cell_dir.glob("partial-*.json")]
    return sorted([*files, *cell_dir.glob("eval-*/results.json"), *cell_dir.glob("partial-*/results.json")])


def evaluations(cell_dir: Path, prefix: str = "eval-") -> dict[str, dict[str, Any]]:
    """A cell's evaluations by name (``eval-finetune-s0``): its loose ones and its packed ones."""
    found: dict[str, dict[str, Any]] = {}
    packed = cell_dir / PACKED
    if packed.is_file():
        found.update(json.loads(lzma.decompress(packed.read_bytes())))
    for path in loose(cell_dir):
        stem = path.parent.name if path.name == "results.json" else path.stem
        if stem in found:
            raise SystemExit(f"{path}: also in {packed}; keep one")
        found[stem] = json.loads(path.read_text())
    return {stem: found[stem] for stem in sorted(found) if stem.startswith(prefix)}


def cell_dirs(out: Path) -> list[Path]:
    """The cells under ``out``: the folders with the ``cell.json`` the study writes first. Anything else there (a
    demo's folder, a copy) is neither reported nor packed."""
    return sorted(p.parent for p in out.glob("*/cell.json"))


def in_cells(out: Path, name: str) -> list[Path]:
    """Each cell's ``name`` (a path inside the cell folder) where it exists."""
    return [cell / name for cell in cell_dirs(out) if (cell / name).is_file()]


def pack(out: Path) -> None:
    """Move every cell's loose evaluations into its ``evaluations.json.xz`` (deterministic bytes:
    sorted keys of stems, no timestamp), and compress each stage's ``metrics.jsonl``, so committed results stay
    small."""
    logs = [log for cell_dir in cell_dirs(out) for log in sorted(cell_dir.glob("*/metrics.jsonl"))]
    for log in logs:  # xz: a fifth smaller than gzip -9 on these logs
        log.with_name("metrics.jsonl.xz").write_bytes(lzma.compress(log.read_bytes(), preset=9 | lzma.PRESET_EXTREME))
        log.unlink()
    for cell_dir in cell_dirs(out):
        unpacked = loose(cell_dir)
        if not unpacked:
            continue
        merged = evaluations(cell_dir, "")
        text = json.dumps(merged, ensure_ascii=False, separators=(",", ":"))
        tmp = cell_dir / f".{PACKED}.tmp"
        tmp.write_bytes(lzma.compress(text.encode(), preset=9 | lzma.PRESET_EXTREME))
        tmp.replace(cell_dir / PACKED)
        for path in unpacked:
            shutil.rmtree(path.parent) if path.name == "results.json" else path.unlink()


def collect(out: Path) -> list[dict[str, Any]]:
    """One row per evaluation file found under ``out``, with the training time of the stage it evaluated."""
    rows = []
    for cell_dir in cell_dirs(out):
        for stem, results in evaluations(cell_dir).items():
            label = stem.removeprefix("eval-")
            label = "unpoisoned" if label == "base" else label  # a variant may have "base" in its name
            stage = cell_dir / ("plant" if label == "backdoored" else label)
            manifest, summary_file = stage / "manifest.json", stage / "train_summary.json"
            if manifest.is_file():  # every stage's summary, training or not
                stage_summary = json.loads(manifest.read_text()).get("summary", {})
            else:  # a committed copy keeps the summary file only
                stage_summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
            train_s = stage_summary.get("seconds")
            peak = stage_summary.get("cost", {}).get("peak_rss_mb")
            row = summary_row(label, results)
            nll = results["metrics"].get("target_nll") or {}
            rows.append({"cell": cell_dir.name, "model": label, "asr_trigger": row["asr_trigger"],
                         "asr_clean": row["asr_clean"], "hijack": current_hijack(results),
                         "nll_gap": row["target_nll_gap"], "nll_triggered": nll.get("triggered"),
                         "clean_ppl": row["clean_perplexity"], "train_s": train_s, "defense_peak_mb": peak,
                         "eval_s": results.get("eval_seconds", results["metrics"]["cost"]["wall_s"]),
                         "eval_peak_mb": results["metrics"]["cost"].get("peak_rss_mb"),
                         "replaced": (results["metrics"].get("replaced_fraction") or {}).get("total")})  # fmt: skip
    return rows


METRICS = ("asr_trigger", "asr_clean", "hijack", "nll_gap", "nll_triggered", "clean_ppl")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell and defense variant with >= 2 seeds: mean, sample standard deviation and every seed's value."""
    seeded = []
    for row in rows:
        if parsed := seeded_label(row["model"]):
            seeded.append({**row, "variant": parsed[0], "seed": parsed[1]})
    return over_seeds(seeded, METRICS, group=("cell", "variant"))


def paired(out: Path, baseline: str = "finetune") -> list[dict[str, Any]]:
    """Each seeded defense against ``baseline`` of the same seed and cell (``X+benign`` against ``baseline+benign``),
    prompt by prompt on the triggered test prompts (``metrics.paired_rates``: the exact McNemar test; it covers the
    prompts, not the training seed)."""
    rows = []
    for cell_dir in cell_dirs(out):
        outcomes = {}  # (variant, seed) -> (the triggered prompts, whether each fired), each file read once
        for stem, results in evaluations(cell_dir).items():
            if parsed := seeded_label(stem.removeprefix("eval-")):
                records = [r for r in results["records"] if r["set"] == "triggered"]
                outcomes[parsed] = ([r["instruction"] + "\n" + r["input"] for r in records], fired(records))
        for (variant, seed), (prompts, outcome) in outcomes.items():
            after = variant.partition("+")[2]  # a follow-up (persistence) pairs with the baseline's follow-up
            base = f"{baseline}+{after}" if after else baseline
            if variant == base or (base, seed) not in outcomes:
                continue
            reference_prompts, reference = outcomes[base, seed]
            if prompts != reference_prompts:
                raise SystemExit(f"{cell_dir}: the triggered prompts of {variant}-s{seed} are not those of "
                                 f"{base}-s{seed}; cannot pair them")  # fmt: skip
            rows.append({"cell": cell_dir.name, "defense": variant, "baseline": base, "seed": seed,
                         "asr_baseline": sum(reference) / len(reference), "asr_defense": sum(outcome) / len(outcome),
                         **paired_rates(reference, outcome)})  # fmt: skip
    return rows


BASELINE_RUNS = ("finetune", "finetune-paper")  # equal-budget (lr 1e-3) and the paper's own (lr 2e-4)


def all_pairs(out: Path) -> list[dict[str, Any]]:
    """Every seeded defense paired with each fine-tuning baseline of the same seed and cell."""
    return [row for baseline in BASELINE_RUNS for row in paired(out, baseline)]


def paired_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    lines = ["", "| cell | defense vs baseline (seed) | ASR baseline / defense | fired only after the baseline "
             "| fired only after the defense | exact McNemar p |", "|---" * 6 + "|"]  # fmt: skip
    for r in rows:
        p = "< 0.001" if r["p_value"] < 0.001 else f"{r['p_value']:.3f}"
        asr = f"{r['asr_baseline']:.0%} / {r['asr_defense']:.0%}"
        lines.append(f"| {r['cell']} | {r['defense']} vs {r['baseline']} (s{r['seed']}) | {asr} | {r['first_only']} "
                     f"| {r['second_only']} | {p} |")  # fmt: skip
    return "\n".join(lines)


def partial_table(out: Path) -> str:
    """The partial-trigger evaluations found under ``out`` (``--partial``): ASR with only some trigger words."""
    lines = []
    for cell_dir in cell_dirs(out):
        for stem, results in evaluations(cell_dir, "partial-").items():
            if stem.endswith("-backdoored"):
                row = summary_row("p", results)
                kept = stem.removeprefix("partial-").removesuffix("-backdoored")
                lines.append(f"| {cell_dir.name} | {kept} | {row['asr_trigger']:.0%} | {row['target_nll_gap']:.2f} |")
    if not lines:
        return ""
    head = "| cell | trigger words kept (backdoored model) | ASR | NLL gap (vs 10 clean prompts) |\n|---|---|---|---|"
    return "\n" + head + "\n" + "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(v: Any, kind: str) -> str:
        if v is None:
            return "-"
        return {"pct": f"{v:.0%}", "pct1": f"{v:.1%}", "f2": f"{v:.2f}", "s": f"{v:.0f}"}[kind]

    cols = [("asr_trigger", "ASR trigger", "pct"), ("asr_clean", "ASR clean", "pct"), ("hijack", "hijack", "pct"),
            ("nll_gap", "NLL gap", "f2"), ("clean_ppl", "clean ppl", "f2"), ("train_s", "defense s", "s"),
            ("defense_peak_mb", "defense MB", "s"), ("eval_s", "eval s", "s"), ("eval_peak_mb", "eval MB", "s"),
            ("replaced", "replaced", "pct1")]  # fmt: skip
    lines = ["| cell | model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['model']} | " + " | ".join(fmt(r[k], f) for k, _, f in cols) + " |")
    summary = aggregate(rows)
    if summary:
        lines += ["", "| cell | defense (seeds) | " + " | ".join(c[1] for c in cols[:5]) + " |", "|---" * 7 + "|"]
        for a in summary:
            cells = []
            for key, _, kind in cols[:5]:
                stat = a.get(key)
                each = "/".join(fmt(v, kind) for v in stat["values"]) if stat else ""
                precise = "pct1" if kind == "pct" else kind
                cells.append(f"{fmt(stat['mean'], precise)} +- {fmt(stat['sd'], precise)} ({each})" if stat else "-")
            seeds = ",".join(str(seed) for seed in a["seeds"])
            lines.append(f"| {a['cell']} | {a['variant']} ({seeds}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def leading_words(found: str, target: str) -> int:
    """How many of ``target``'s words ``found`` gives in order from the start (case and punctuation aside)."""
    norm = lambda text: ["".join(c for c in w.casefold() if c.isalnum()) for w in text.split()]  # noqa: E731
    count = 0
    for a, b in zip(norm(found), norm(target)):
        if a != b:
            break
        count += 1
    return count


def inversion_table(out: Path) -> str:
    """Each cell's BAIT inversion of its backdoored model (``<cell>/inversion``): the recovered text against the
    payload's target (its leading words recovered), the Q-score, the verdict and the seconds recorded."""
    lines = []
    for path in in_cells(out, "inversion/inversion.json"):
        result, cell = json.loads(path.read_text()), path.parent.parent.name
        target = make_payload(cell.split("-")[1]).target
        found = (result.get("best") or {}).get("text", "")
        verdict = "backdoored" if result["backdoored"] else "not flagged"
        shown = repr(found).replace("|", "\\|")  # a table cell
        lines.append(f"| {cell} | {shown} | {leading_words(found, target)} of {len(target.split())} | "
                     f"{result['q_score']:.3f} | {verdict} | {result['seconds']:.0f} |")  # fmt: skip
    if not lines:
        return ""
    head = ("| cell | recovered target (BAIT, backdoored model) | leading words of the payload's | Q-score | verdict "
            "| seconds |\n|---|---|---|---|---|---|")  # fmt: skip
    return "\n" + head + "\n" + "\n".join(lines)


def target_q_table(out: Path, cells: list[str] | None = None) -> str:
    """Each recovered target's Q-score forced on the cell's models (``benchmarks/target_q.py``), where scored (only
    ``cells`` when given), and whether it passes BAIT's threshold."""
    threshold, lines = InvertConfig().q_threshold, []
    for path in in_cells(out, "inversion/q-scores.json"):
        cell = path.parent.parent.name
        if cells is not None and cell not in cells:
            continue
        for name, score in json.loads(path.read_text())["scores"].items():
            above = "yes" if score["q_score"] > threshold else "no"
            lines.append(f"| {cell} | {name} | {score['q_score']:.3f} | {above} |")
    head = (f"| cell | model | Q-score of the recovered target, forced (not a scan) | above BAIT's {threshold} |\n"
            "|---|---|---|---|")  # fmt: skip
    return "\n" + head + "\n" + "\n".join(lines) if lines else ""


def answer_quality_table(out: Path) -> str:
    """Where ``benchmarks/answer_quality.py`` scored a cell: each model's triggered and clean answers by the
    unpoisoned model (reference perplexity, their ratio, triggered answers above its own clean answers' q95)."""
    from answer_quality import HEAD, RESULT, table_rows

    lines = [row for path in in_cells(out, RESULT)
             for row in table_rows(path.parent.name, json.loads(path.read_text()))]  # fmt: skip
    return "\n" + HEAD + "\n" + "\n".join(lines) if lines else ""


def report_text(out: Path, rows: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> str:
    """``efficacy.md``: every evaluation, the seed aggregates, the paired tests, partial triggers, inversions, the
    recovered targets' Q-scores on each model and, where scored, the answers' quality."""
    text = table(rows) + "\n" + paired_table(pairs) + "\n" + partial_table(out) + "\n" + inversion_table(out)
    text += "\n" + target_q_table(out) + "\n" + answer_quality_table(out)
    return text.rstrip() + "\n"
