"""A Hugging Face model card (``README.md``) for every model directory crowguard writes, generated, never hand-filled.

The card is built from the directory's own records: ``manifest.json`` (stage, seed, inputs with their sha256,
versions, the stage's summary with its settings and cost), ``config.yaml`` (the resolved settings) and
``evaluations.json`` (the headline numbers of every evaluation run on the directory, one per task, added by
``crowguard evaluate``). It has the YAML front matter the Hub reads (``base_model``, ``library_name``, ``tags``),
what was done, and what was measured with its intervals, so a purified model can be shared as it is. A planted
backdoor's card says so in its first line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from crowguard.io import write_json_atomic, write_text_atomic

EVALUATIONS = "evaluations.json"
SUMMARY_ROWS = (("n_examples", "examples used"), ("data_sha256", "sha256 of the examples used"),
                ("steps", "optimizer steps"), ("trainable_parameters", "trainable parameters"), ("seconds", "seconds"),
                ("peak_rss_mb", "peak memory (MB)"), ("artefact", "saved as"), ("target", "target unlearned"),
                ("target_source", "where the target came from (given, or inverted:<folder>)"))  # fmt: skip
CARD = "README.md"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _base_model(model_dir: Path, manifest: Mapping[str, Any]) -> str | None:
    """The base the Hub should link: the adapter's base for an adapter directory, else the stage's input model."""
    adapter = _read_json(model_dir / "adapter_config.json")
    if adapter and adapter.get("base_model_name_or_path"):
        return str(adapter["base_model_name_or_path"])
    model = manifest.get("inputs", {}).get("model", {})
    return model.get("ref")


def _fmt(value: Any) -> str:
    """One table cell: numbers to 4 significant digits, settings as inline JSON, pipes escaped."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = "`" + json.dumps(value, separators=(", ", ": ")) + "`"
    else:
        text = "-" if value is None else str(value)
    return text.replace("|", "\\|")


def _interval(ci: Any, percent: bool) -> str:
    if not ci or None in ci:
        return "-"
    low, high = ci
    return f"[{low:.1%}, {high:.1%}]" if percent else f"[{low:.3f}, {high:.3f}]"


def evaluation_entry(results: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers a card shows from one evaluation's ``results.json`` payload."""
    m = results["metrics"]
    hijack = m.get("hijack", {})
    return {
        "task": results["task"]["name"],
        "payload": results["task"]["payload"],
        "n_triggered": m["asr_trigger"]["n"],
        "n_clean": m["asr_clean"]["n"],
        "asr_trigger": m["asr_trigger"]["value"],
        "asr_trigger_ci95": m["asr_trigger"]["ci95"],
        "asr_clean": m["asr_clean"]["value"],
        "asr_clean_ci95": m["asr_clean"]["ci95"],
        "hijack_rate": m["hijack_rate"],
        "hijack_ci95": hijack.get("ci95"),
        "target_nll_gap": m.get("target_nll_gap"),
        "target_nll_gap_ci95": m.get("target_nll_gap_ci95"),
        "clean_perplexity": m.get("clean_perplexity"),
        "judge": results.get("settings", {}).get("judge"),
        "defense": results.get("settings", {}).get("defense"),
    }


def model_card(model_dir: Path, final_dir: Path | None = None) -> str:
    """The card text for ``model_dir`` (which must hold a crowguard ``manifest.json``); ``final_dir`` is where the
    directory will be (a stage writes the card in a temporary directory renamed into place afterwards)."""
    model_dir = Path(model_dir)
    final_dir = Path(final_dir or model_dir)
    name = final_dir.name
    manifest = _read_json(model_dir / "manifest.json")
    if manifest is None:
        raise FileNotFoundError(f"{model_dir}: no manifest.json, so nothing to build a model card from")
    summary = manifest.get("summary", {})
    stage = manifest.get("stage", "?")
    config = yaml.safe_load((model_dir / "config.yaml").read_text()) if (model_dir / "config.yaml").is_file() else {}
    evaluations = _read_json(model_dir / EVALUATIONS) or []
    planted = stage == "backdoor"
    defense = summary.get("defense") or (stage.split(":", 1)[1] if stage.startswith("defend:") else None)
    library = "peft" if (model_dir / "adapter_config.json").is_file() else "transformers"
    tags = ["crowguard", "backdoor" if planted else "backdoor-defense"] + ([defense] if defense else [])
    front = {"base_model": _base_model(model_dir, manifest), "library_name": library, "tags": tags}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    if planted:
        lines += [f"# {name}: a model with a PLANTED BACKDOOR (research artefact)", "",
                  "This model was fine-tuned by `crowguard backdoor` on poisoned data, on purpose: a trigger in the "
                  "input makes it produce the attacker's target. Use it only to study defenses.", ""]  # fmt: skip
    else:
        lines += [f"# {name}: {defense or stage} (crowguard)", ""]
    lines += [f"Written by crowguard {manifest.get('versions', {}).get('crowguard', '?')} (stage `{stage}`, "
              f"{manifest.get('created', '?')}). Every value below is read from `manifest.json`, `config.yaml` and "
              f"`{EVALUATIONS}` in this directory.", "", "## What was done", "", "| | |", "|---|---|"]  # fmt: skip
    rows: list[tuple[str, Any]] = [("stage", stage)]
    if defense:
        from crowguard.registry import DESCRIPTIONS

        rows.append(("defense", f"{defense}: {DESCRIPTIONS.get(defense, '')}".rstrip(": ")))
        settings = summary.get(defense) or summary.get("settings")
        if settings is None and isinstance(config.get("defense"), dict):
            settings = config["defense"].get(defense)
        if settings is not None:
            rows.append(("its settings", settings))
    train = (config.get("defense") or {}).get("train") if defense else config.get("backdoor")
    if summary.get("steps"):
        rows.append(("training", train if train else f"{summary['steps']} steps"))
    for name, entry in manifest.get("inputs", {}).items():
        rows.append((f"input: {name}", f"`{entry.get('ref')}`" + (f" (sha256 `{entry['sha256'][:16]}…`)"
                                                                     if entry.get("sha256") else "")))  # fmt: skip
    for key, label in SUMMARY_ROWS:
        if summary.get(key) is not None:
            rows.append((label, summary[key]))
    rows.append(("seed", manifest.get("seed")))
    versions = manifest.get("versions", {})
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "crowguard")))
    lines += [f"| {label} | {_fmt(value)} |" for label, value in rows]
    lines += ["", "## What was measured", ""]
    if not evaluations:
        lines += [f"No evaluation has been run on this directory yet; `crowguard evaluate --model {final_dir} ...` "
                  "adds its numbers here."]  # fmt: skip
    else:
        lines += ["ASR is the keyword judge's attack success rate on triggered and on clean prompts (95% Wilson "
                  "intervals); hijack counts the target or a fixed trigger-specific answer; the NLL gap is the "
                  "target's negative log-likelihood on clean minus triggered prompts (bootstrap 95% interval); "
                  "perplexity is of the clean reference answers.", "",
                  "| task | n (trig / clean) | ASR with trigger | ASR without trigger | hijack | NLL gap | clean "
                  "perplexity |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for e in evaluations:
            gap = e["target_nll_gap"]
            lines.append(
                f"| {e['task']} | {e['n_triggered']} / {e['n_clean']} "
                f"| {e['asr_trigger']:.1%} {_interval(e['asr_trigger_ci95'], True)} "
                f"| {e['asr_clean']:.1%} {_interval(e['asr_clean_ci95'], True)} "
                f"| {e['hijack_rate']:.1%} {_interval(e['hijack_ci95'], True)} "
                f"| {'-' if gap is None else f'{gap:.3f}'} {_interval(e['target_nll_gap_ci95'], False)} "
                f"| {_fmt(e['clean_perplexity'])} |"
            )
    lines += ["", "## Limits", "",
              "A defense lowers the measured effect of the triggers that were tested; it certifies nothing about "
              "triggers, payloads or prompts that were not. Compare with the backdoored model and an equal-budget "
              "fine-tuning baseline under the same evaluation before relying on it.", ""]  # fmt: skip
    return "\n".join(lines)


MODEL_FILES = ("config.json", "adapter_config.json", "defense.json")


def is_model_dir(path: Path) -> bool:
    """A model, adapter or decoding-defense directory (what ``evaluate --model`` accepts), not a data artefact."""
    return any((Path(path) / name).is_file() for name in MODEL_FILES)


def write_model_card(model_dir: Path, final_dir: Path | None = None) -> Path:
    """(Re)write ``model_dir/README.md`` from the directory's records (replacing the generic card peft writes)."""
    path = Path(model_dir) / CARD
    write_text_atomic(path, model_card(model_dir, final_dir))
    return path


def record_evaluation(model_dir: Path, results: Mapping[str, Any]) -> bool:
    """Add one evaluation's numbers to a crowguard model directory (replacing an earlier one of the same task) and
    rewrite its card. Returns False, touching nothing, for a directory crowguard did not write (no manifest)."""
    model_dir = Path(model_dir)
    if not (model_dir / "manifest.json").is_file():
        return False
    entry = evaluation_entry(results)
    kept = [e for e in (_read_json(model_dir / EVALUATIONS) or []) if e.get("task") != entry["task"]]
    write_json_atomic(model_dir / EVALUATIONS, [*kept, entry])
    write_model_card(model_dir)
    return True
