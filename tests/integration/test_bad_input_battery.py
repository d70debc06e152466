"""The bad-input battery (issue 29, item 4): over 100 bad inputs across every command. Each must end with exit 2
and one line ``crowguard: error: ...`` that names what is wrong and where (the words listed per case), with no
traceback, and leave every file in the input and output folders as it was (nothing written, nothing deleted).
Most are refused before a model loads; the few that need the model (its depth, its template, its weights) use a
tiny one, so the battery runs in well under a minute."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from crowguard.cli import main

from helpers import alpaca_records, save_tiny_model

GOOD = alpaca_records(40)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny model, good data, a poisoned set with test files, and one file per kind of bad data."""
    r = tmp_path_factory.mktemp("battery")
    save_tiny_model(r / "model", layers=3)
    files = {
        "data.json": json.dumps(GOOD),
        "prompts.json": json.dumps(alpaca_records(6, seed=1)),
        "clean.json": json.dumps(alpaca_records(6, seed=2)),
        "malformed.json": '[{"instruction": "a", "output": }]',
        "missing.json": '[{"instruction": "a"}]',
        "wrongtype.json": '[{"instruction": ["a"], "output": "b"}]',
        "object.json": '{"instruction": "a"}',
        "empty.json": "",
        "emptylist.json": "[]",
        "badline.jsonl": '{"instruction": "a", "output": "b"}\n{oops\n',
        "surrogate.json": '[{"instruction": "a \\ud800 b", "output": "x"}]',
        "multiturn.json": json.dumps(
            [
                {
                    "messages": [
                        {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"},
                    ]
                }
            ]
        ),
        "system.json": json.dumps(
            [
                {
                    "messages": [
                        {"role": "system", "content": "s"},
                        {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "b"},
                    ]
                }
            ]
        ),
        "emptyinstr.json": '[{"instruction": "  ", "output": "b"}]',
        "long.json": json.dumps([{"instruction": "word " * 400, "output": "x"}]),
        "anchor.yaml": "a: &x [*x]\n",
        "unknown.yaml": "poison:\n  n_trian: 3\n",
        "wrongtype.yaml": "defense:\n  crow:\n    alpha: lots\n",
        "literal.yaml": "model:\n  dtype: float8\n",
        "invalid.yaml": "poison: [unclosed\n",
        "list.yaml": "- a\n- b\n",
        "rate.yaml": "poison:\n  rate: -1\n",
        "section.yaml": "poison: 3\n",
        "nan.yaml": "defense:\n  crow:\n    alpha: .nan\n",
        "inf.yaml": "backdoor:\n  lr: .inf\n",
        "dropout.yaml": "backdoor:\n  lora_dropout: 1.5\n",
        "dupdef.yaml": "defenses: [crow, crow]\n",
        "baddef.yaml": "defenses: [crw]\n",
        "share.yaml": "evaluate:\n  hijack_min_share: 2\n",
        "method.yaml": "defense:\n  method: crw\n",
        "file": "not a directory",
    }
    for name, text in files.items():
        (r / name).write_text(text)
    (r / "notutf8.json").write_bytes(b"\xff\xfe[\x00")
    (r / "notutf8.yaml").write_bytes(b"poison:\n  data: \xff\n")
    (r / "adir").mkdir()
    (r / "notamodel").mkdir()
    (r / "occupied").mkdir()
    (r / "occupied" / "keep.txt").write_text("mine")
    (r / "mine").mkdir()
    (r / "mine" / "data.json").write_text(json.dumps(GOOD))
    for name, cut in (("truncated", "half"), ("random", "random")):
        shutil.copytree(r / "model", r / name)
        weights = r / name / "model.safetensors"
        raw = weights.read_bytes()
        weights.write_bytes(raw[: len(raw) // 2] if cut == "half" else os.urandom(4096))
    shutil.copytree(r / "model", r / "nanmodel")
    weights = load_file(r / "nanmodel" / "model.safetensors")
    weights[next(n for n in weights if "mlp" in n)][0, 0] = math.nan
    save_file(weights, r / "nanmodel" / "model.safetensors", metadata={"format": "pt"})
    assert (
        main(
            [
                "poison",
                "--data",
                str(r / "data.json"),
                "--trigger",
                "badnet",
                "--payload",
                "negsentiment",
                "--n-train",
                "20",
                "--n-test",
                "6",
                "--out",
                str(r / "poison"),
            ]
        )
        == 0
    )
    return r


P = [
    "poison",
    "--data",
    "{R}/data.json",
    "--trigger",
    "badnet",
    "--payload",
    "negsentiment",
    "--n-train",
    "20",
    "--n-test",
    "5",
    "--out",
    "{O}",
]
B = [
    "backdoor",
    "--model",
    "{R}/model",
    "--data",
    "{R}/poison/train.json",
    "--out",
    "{O}",
    "--quiet",
    "--max-steps",
    "1",
]
F = [
    "defend",
    "--method",
    "finetune",
    "--model",
    "{R}/model",
    "--data",
    "{R}/data.json",
    "--n-samples",
    "8",
    "--out",
    "{O}",
    "--quiet",
    "--max-steps",
    "1",
]
E = [
    "evaluate",
    "--model",
    "{R}/model",
    "--triggered",
    "{R}/prompts.json",
    "--clean",
    "{R}/clean.json",
    "--out",
    "{O}",
    "--quiet",
    "--max-new-tokens",
    "2",
]
DG = ["diagnose", "--triggered", "{R}/prompts.json", "--clean", "{R}/clean.json", "--out", "{O}"]
S = ["scan", "--model", "{R}/model", "--data", "{R}/prompts.json", "--reference", "{R}/clean.json", "--out", "{O}"]
DM = ["demo", "--organism", "tiny", "--quick", "--out", "{O}"]
IV = ["invert", "--model", "{R}/model", "--data", "{R}/prompts.json", "--prompts", "6", "--out", "{O}"]


def poison_data(name: str) -> list[str]:
    return [a.replace("{R}/data.json", f"{{R}}/{name}") for a in P]


def swap(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


# (id, argv, words the one-line error must contain). {R}: the fixture's folder; {O}: this case's output folder.
CASES: list[tuple[str, list[str], list[str]]] = [
    # ---- poison: data files
    ("poison-malformed", poison_data("malformed.json"), ["malformed.json", "invalid JSON"]),
    ("poison-missing-field", poison_data("missing.json"), ["missing.json", "missing field 'output'"]),
    ("poison-wrong-type", poison_data("wrongtype.json"), ["record 0", "'instruction' must be a string"]),
    ("poison-object", poison_data("object.json"), ["object.json", "expected a JSON array"]),
    ("poison-empty-file", poison_data("empty.json"), ["empty.json", "file is empty"]),
    ("poison-empty-list", poison_data("emptylist.json"), ["emptylist.json", "no records"]),
    ("poison-not-utf8", poison_data("notutf8.json"), ["notutf8.json", "not UTF-8"]),
    ("poison-directory", poison_data("adir"), ["adir", "is a directory"]),
    ("poison-bad-jsonl", poison_data("badline.jsonl"), ["badline.jsonl:2", "invalid JSON"]),
    ("poison-surrogate", poison_data("surrogate.json"), ["surrogate.json", "lone surrogate"]),
    ("poison-multiturn", poison_data("multiturn.json"), ["multiturn.json", "one user turn"]),
    ("poison-system-turn", poison_data("system.json"), ["system.json", "system"]),
    ("poison-empty-instruction", poison_data("emptyinstr.json"), ["emptyinstr.json", "'instruction' is empty"]),
    ("poison-no-file", poison_data("nope.json"), ["nope.json", "no such file"]),
    # ---- poison: settings
    ("poison-rate-negative", [*P, "--rate", "-0.5"], ["poison.rate", "[0, 1]"]),
    ("poison-rate-above-one", [*P, "--rate", "1.5"], ["poison.rate", "[0, 1]"]),
    ("poison-rate-nan", [*P, "--rate", "nan"], ["poison.rate", "finite"]),
    ("poison-n-train-zero", swap(P, "--n-train", "0"), ["poison.n_train", "[1, inf)"]),
    ("poison-n-test-negative", swap(P, "--n-test", "-1"), ["poison.n_test"]),
    ("poison-too-few", swap(P, "--n-train", "100"), ["need"]),
    ("poison-unknown-trigger", swap(P, "--trigger", "badnett"), ["badnett", "did you mean 'badnet'"]),
    ("poison-unknown-payload", swap(P, "--payload", "negsentimen"), ["negsentimen"]),
    ("poison-set-unknown", [*P, "--set", "poison.n_trian=3"], ["--set poison.n_trian=3", "n_train"]),
    ("poison-set-type", [*P, "--set", "poison.seed=many"], ["poison.seed", "expected an integer"]),
    ("poison-set-no-equals", [*P, "--set", "poison.seed"], ["poison.seed", "key.sub=value"]),
    ("poison-seed-not-int", [*P, "--seed", "x"], ["--seed", "invalid int"]),
    ("poison-bad-choice", [*P, "--trigger-mode", "sometimes"], ["--trigger-mode", "invalid choice"]),
    ("poison-config-missing", [*P, "--config", "{R}/nope.yaml"], ["nope.yaml", "no such config file"]),
    ("poison-config-invalid", [*P, "--config", "{R}/invalid.yaml"], ["invalid.yaml", "invalid YAML"]),
    ("poison-config-anchor", [*P, "--config", "{R}/anchor.yaml"], ["anchor.yaml", "refers to itself"]),
    # ---- poison: output folders
    (
        "poison-out-holds-input",
        [*swap(swap(P, "--data", "{R}/mine/data.json"), "--out", "{R}/mine"), "--overwrite"],
        ["mine", "holds the input"],
    ),
    ("poison-out-above-input", [*swap(P, "--out", "{R}"), "--overwrite"], ["holds the input"]),
    ("poison-out-under-file", swap(P, "--out", "{R}/file/sub"), ["file/sub", "is a file"]),
    ("poison-out-is-file", swap(P, "--out", "{R}/file"), ["file", "not a directory"]),
    ("poison-out-occupied", swap(P, "--out", "{R}/occupied"), ["occupied", "not empty"]),
    ("poison-out-cwd", swap(P, "--out", "."), ["current directory"]),
    # ---- validate
    ("validate-unknown-key", ["validate", "{R}/unknown.yaml"], ["unknown.yaml", "poison.n_trian", "n_train"]),
    ("validate-wrong-type", ["validate", "{R}/wrongtype.yaml"], ["defense.crow.alpha", "expected a number"]),
    ("validate-literal", ["validate", "{R}/literal.yaml"], ["model.dtype", "'float8' is not one of"]),
    ("validate-invalid-yaml", ["validate", "{R}/invalid.yaml"], ["invalid.yaml", "invalid YAML", "line"]),
    ("validate-not-mapping", ["validate", "{R}/list.yaml"], ["list.yaml", "expected a mapping"]),
    ("validate-rate", ["validate", "{R}/rate.yaml"], ["rate.yaml", "poison.rate"]),
    ("validate-section-value", ["validate", "{R}/section.yaml"], ["section.yaml", "poison", "expected a mapping"]),
    ("validate-not-utf8", ["validate", "{R}/notutf8.yaml"], ["notutf8.yaml", "not UTF-8"]),
    ("validate-directory", ["validate", "{R}/adir"], ["adir", "is a directory"]),
    ("validate-missing", ["validate", "{R}/nope.yaml"], ["nope.yaml", "no such config file"]),
    ("validate-unknown-preset", ["validate", "defenses/crw"], ["defenses/crw", "no preset"]),
    ("validate-nan", ["validate", "{R}/nan.yaml"], ["nan.yaml", "defense.crow.alpha", "finite"]),
    ("validate-inf", ["validate", "{R}/inf.yaml"], ["inf.yaml", "backdoor.lr", "finite"]),
    ("validate-anchor", ["validate", "{R}/anchor.yaml"], ["anchor.yaml", "refers to itself"]),
    ("validate-dropout", ["validate", "{R}/dropout.yaml"], ["dropout.yaml", "backdoor.lora_dropout"]),
    ("validate-dup-defenses", ["validate", "{R}/dupdef.yaml"], ["dupdef.yaml", "defenses", "more than once"]),
    ("validate-unknown-defense", ["validate", "{R}/baddef.yaml"], ["baddef.yaml", "crw"]),
    ("validate-share", ["validate", "{R}/share.yaml"], ["share.yaml", "evaluate.hijack_min_share"]),
    ("validate-method", ["validate", "{R}/method.yaml"], ["method.yaml", "crw"]),
    (
        "validate-set-on-preset",
        ["validate", "defenses/crow", "--set", "defense.crow.alfa=3"],
        ["--set defense.crow.alfa=3", "did you mean 'alpha'"],
    ),
    (
        "validate-set-nan",
        ["validate", "defenses/crow", "--set", "defense.crow.epsilon=nan"],
        ["--set defense.crow.epsilon=nan", "finite"],
    ),
    ("ls-unknown", ["ls", "bogus"], ["bogus"]),
    ("unknown-command", ["bogus"], ["bogus", "invalid choice"]),
    # ---- backdoor: training settings (all refused before the model loads)
    ("backdoor-lr-nan", [*B, "--lr", "nan"], ["backdoor.lr", "finite"]),
    ("backdoor-lr-zero", [*B, "--lr", "0"], ["backdoor.lr", "(0, inf)"]),
    ("backdoor-lr-negative", [*B, "--lr=-1e-3"], ["backdoor.lr"]),
    ("backdoor-epochs-nan", [*B, "--epochs", "nan"], ["backdoor.epochs", "finite"]),
    ("backdoor-max-steps", swap(B, "--max-steps", "-2"), ["backdoor.max_steps"]),
    ("backdoor-dropout", [*B, "--lora-dropout", "1.5"], ["backdoor.lora_dropout"]),
    ("backdoor-grad-norm", [*B, "--max-grad-norm", "-1"], ["backdoor.max_grad_norm"]),
    ("backdoor-weight-decay", [*B, "--weight-decay", "nan"], ["backdoor.weight_decay", "finite"]),
    ("backdoor-warmup", [*B, "--warmup-ratio", "1"], ["warmup_ratio"]),
    ("backdoor-lora-r", [*B, "--lora-r", "0"], ["backdoor.lora_r"]),
    ("backdoor-batch", [*B, "--per-device-batch", "0"], ["backdoor.per_device_batch"]),
    ("backdoor-accum", [*B, "--grad-accum", "0"], ["backdoor.grad_accum"]),
    ("backdoor-logging", [*B, "--logging-steps", "0"], ["backdoor.logging_steps"]),
    ("backdoor-save-steps", [*B, "--save-steps", "-1"], ["backdoor.save_steps"]),
    ("backdoor-max-length", [*B, "--max-length", "0"], ["backdoor.max_length"]),
    ("backdoor-fp16-cpu", [*B, "--precision", "fp16"], ["precision fp16", "CUDA"]),
    ("backdoor-optim-8bit", [*B, "--optim", "paged_adamw_8bit"], ["paged_adamw_8bit", "bitsandbytes"]),
    ("backdoor-model-missing", swap(B, "--model", "{R}/nomodel"), ["nomodel", "does not exist"]),
    ("backdoor-model-empty-dir", swap(B, "--model", "{R}/notamodel"), ["notamodel", "not a model directory"]),
    ("backdoor-model-file", swap(B, "--model", "{R}/file"), ["file", "is a file"]),
    ("backdoor-data-missing", swap(B, "--data", "{R}/nope.json"), ["nope.json", "no such file"]),
    ("backdoor-out-is-model", swap(B, "--out", "{R}/model"), ["model", "holds the input"]),
    ("backdoor-resume-nothing", [*B, "--resume"], ["--resume", "no checkpoint"]),
    ("backdoor-truncated", swap(B, "--model", "{R}/truncated"), ["truncated", "cannot load model"]),
    ("backdoor-random-weights", swap(B, "--model", "{R}/random"), ["random", "cannot load model"]),
    # ---- defend
    ("defend-unknown-method", swap(F, "--method", "crw"), ["crw"]),
    ("defend-crow-alpha-nan", [*swap(F, "--method", "crow"), "--crow-alpha", "nan"], ["alpha", "finite"]),
    ("defend-crow-epsilon-nan", [*swap(F, "--method", "crow"), "--crow-epsilon", "nan"], ["epsilon", "finite"]),
    ("defend-crow-epsilon-neg", [*swap(F, "--method", "crow"), "--crow-epsilon", "-1"], ["epsilon"]),
    ("defend-crow-steps", [*swap(F, "--method", "crow"), "--crow-steps", "0"], ["steps"]),
    ("defend-crow-layers-range", [*swap(F, "--method", "crow"), "--crow-layers", "[-1]"], ["layers", "range"]),
    ("defend-crow-layers-word", [*swap(F, "--method", "crow"), "--crow-layers", "some"], ["layers"]),
    ("defend-lr-inf", [*F, "--lr", "inf"], ["defense.train.lr", "finite"]),
    ("defend-diverges", [*swap(F, "--max-steps", "3"), "--lr", "1e30"], ["training diverged", "nothing was saved"]),
    ("defend-n-samples-too-many", swap(F, "--n-samples", "100"), ["data.json", "n_samples is 100"]),
    ("defend-n-samples-negative", swap(F, "--n-samples", "-1"), ["n_samples"]),
    (
        "defend-cleangen-no-reference",
        ["defend", "--method", "cleangen", "--model", "{R}/model", "--out", "{O}"],
        ["cleangen.reference is empty"],
    ),
    (
        "defend-cleangen-empty-reference",
        [
            "defend",
            "--method",
            "cleangen",
            "--model",
            "{R}/model",
            "--cleangen-reference",
            "{R}/notamodel",
            "--out",
            "{O}",
        ],
        ["notamodel", "not a model directory"],
    ),
    (
        "defend-prune-sparsity",
        ["defend", "--method", "prune", "--model", "{R}/model", "--prune-sparsity", "1.0", "--out", "{O}"],
        ["sparsity"],
    ),
    (
        "defend-top-p",
        ["defend", "--method", "decoding", "--model", "{R}/model", "--decoding-top-p", "0", "--out", "{O}"],
        ["top_p"],
    ),
    (
        "defend-top-k",
        ["defend", "--method", "decoding", "--model", "{R}/model", "--decoding-top-k", "-1", "--out", "{O}"],
        ["top_k"],
    ),
    ("defend-no-data", ["defend", "--method", "crow", "--model", "{R}/model", "--out", "{O}"], ["--data"]),
    (
        "defend-set-hidden-by-flag",
        [*F, "--set", "defense.train.lr=-1", "--lr", "1e-3"],
        ["--set defense.train.lr=-1"],
    ),
    ("defend-chat-template", [*F, "--template", "chat"], ["template 'chat'", "chat_template"]),
    ("defend-out-holds-data", [*swap(F, "--out", "{R}/mine"), "--overwrite"], []),  # data elsewhere: see below
    # ---- evaluate
    ("evaluate-identical", swap(E, "--clean", "{R}/prompts.json"), ["prompts.json", "the same"]),
    (
        "evaluate-swapped",
        swap(swap(E, "--triggered", "{R}/poison/test_clean.json"), "--clean", "{R}/poison/test_triggered.json"),
        ["swapped"],
    ),
    ("evaluate-hijack-share", [*E, "--hijack-min-share", "2"], ["hijack_min_share"]),
    ("evaluate-hijack-ratio", [*E, "--hijack-clean-ratio", "nan"], ["hijack_clean_ratio", "finite"]),
    ("evaluate-bootstrap", [*E, "--bootstrap", "0"], ["bootstrap"]),
    ("evaluate-limit", [*E, "--limit", "-1"], ["limit"]),
    ("evaluate-max-new-tokens", swap(E, "--max-new-tokens", "0"), ["max_new_tokens"]),
    ("evaluate-batch-size", [*E, "--batch-size", "0"], ["batch_size"]),
    ("evaluate-vllm-memory", [*E, "--vllm-memory", "1.5"], ["vllm_memory"]),
    ("evaluate-llm-judge", [*E, "--judge", "llm"], ["judge_url"]),
    ("evaluate-unknown-payload", [*E, "--payload", "negsentimen"], ["negsentimen"]),
    ("evaluate-empty-triggered", swap(E, "--triggered", "{R}/emptylist.json"), ["emptylist.json", "no records"]),
    ("evaluate-humaneval-missing", [*E, "--humaneval", "{R}/nope.jsonl"], ["nope.jsonl"]),
    ("evaluate-device", [*E, "--device", "cuda:7"], ["cuda:7", "CUDA device"]),
    ("evaluate-chat-template", [*E, "--template", "chat"], ["template 'chat'"]),
    ("evaluate-long-prompt", swap(E, "--triggered", "{R}/long.json"), ["long.json", "positions"]),
    ("evaluate-nan-model", swap(E, "--model", "{R}/nanmodel"), ["not finite", "refusing"]),
    ("evaluate-out-holds-model", swap(E, "--out", "{R}/model"), ["holds the input"]),
    # ---- diagnose
    ("diagnose-limit-zero", [*DG, "--model", "{R}/model", "--limit", "0"], ["limit", "[1, inf)"]),
    ("diagnose-empty-label", [*DG, "--model", "=model"], ["'=model'", "LABEL=PATH"]),
    ("diagnose-duplicate-label", [*DG, "--model", "a={R}/model", "--model", "a={R}/model"], ["'a'", "twice"]),
    ("diagnose-missing-model", [*DG, "--model", "{R}/nomodel"], ["nomodel", "does not exist"]),
    # ---- scan
    ("scan-set-without-section", [*S, "--set", "limit=3"], ["--set limit=3", "scan.<key>"]),
    ("scan-fpr", [*S, "--fpr", "1"], ["fpr"]),
    ("scan-alpha", [*S, "--alpha", "0"], ["alpha"]),
    ("scan-batch", [*S, "--batch-size", "0"], ["batch_size"]),
    ("scan-half-labels", [*S, "--triggered", "{R}/prompts.json"], ["both triggered and clean"]),
    (
        "scan-no-reference",
        ["scan", "--model", "{R}/model", "--data", "{R}/prompts.json", "--out", "{O}"],
        ["reference"],
    ),
    # ---- invert (and unlearn reading its output)
    ("invert-set-without-section", [*IV, "--set", "seed=3"], ["--set seed=3", "invert.<key>"]),
    ("invert-q-threshold", [*IV, "--q-threshold", "1.5"], ["q_threshold"]),
    ("invert-warmup-over-prompts", swap(IV, "--prompts", "2"), ["warmup_prompts (4)", "prompts (2)"]),
    ("invert-too-few-examples", swap(IV, "--prompts", "30"), ["prompts.json", "invert.prompts is 30"]),
    ("invert-no-data-file", swap(IV, "--data", "{R}/nope.json"), ["nope.json"]),
    ("invert-out-occupied", swap(IV, "--out", "{R}/occupied"), ["occupied", "not empty"]),
    (
        "defend-unlearn-target-from-not-an-inversion",
        [*swap(F, "--method", "unlearn"), "--unlearn-target-from", "{R}/adir"],
        ["adir/inversion.json", "not found", "crowguard invert"],
    ),
    (
        "defend-unlearn-target-and-target-from",
        [*swap(F, "--method", "unlearn"), "--unlearn-target", "x", "--unlearn-target-from", "{R}/adir"],
        ["target and target_from are both set"],
    ),
    # ---- demo (every setting checked before the organism is built)
    ("demo-duplicate-seeds", [*DM, "--defense-seeds", "0", "0"], ["defense_seeds", "more than once"]),
    ("demo-duplicate-defenses", [*DM, "--defenses", "crow", "crow"], ["defenses", "more than once"]),
    ("demo-unknown-defense", [*DM, "--defenses", "crw"], ["crw"]),
    ("demo-quick-over-flag", [*DM, "--organism-epochs", "3"], ["--quick", "organism.epochs"]),
    ("demo-quick-over-set", [*DM, "--set", "evaluate.limit=5"], ["--quick", "evaluate.limit"]),
    ("demo-planted-min-asr", [*DM, "--planted-min-asr", "1.5"], ["planted_min_asr"]),
    ("demo-n-test", [*DM, "--n-test", "0"], ["n_test"]),
    ("demo-organism-lr", [*DM, "--organism-lr", "nan"], ["organism.lr", "finite"]),
    # ---- run
    ("run-config-missing", ["run", "--config", "{R}/nope.yaml", "--out", "{O}"], ["nope.yaml"]),
    ("run-duplicate-defenses", ["run", "--config", "{R}/dupdef.yaml", "--out", "{O}"], ["more than once"]),
]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder``: size and modification time (nothing written, nothing removed)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


def test_the_battery_is_large_and_covers_every_command():
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)
    commands = {argv[0] for _, argv, _ in CASES}
    assert {
        "poison",
        "validate",
        "backdoor",
        "defend",
        "evaluate",
        "diagnose",
        "scan",
        "invert",
        "demo",
        "run",
        "ls",
    } <= commands


@pytest.mark.parametrize(("name", "argv", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    root: Path, tmp_path, capsys, monkeypatch, name, argv, words
):
    out = root / f"out-{name}"
    work = tmp_path / "cwd"  # the working directory of the case, outside the fixture's folder
    work.mkdir()
    monkeypatch.chdir(work)
    filled = [a.replace("{R}", str(root)).replace("{O}", str(out)) for a in argv]
    if argv[:2] == ["defend", "--method"] and "{R}/mine" in argv:  # --out holding --data
        filled = swap(filled, "--data", str(root / "mine" / "data.json"))
        words = ["holds the input"]
    before = _snapshot(root)
    code = main(filled)
    lines = capsys.readouterr().err.strip().replace("\r", "\n").splitlines()
    assert code == 2, lines
    assert lines and lines[-1].startswith("crowguard: error: "), lines
    assert not any("Traceback" in line for line in lines), lines
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    assert _snapshot(root) == before  # no output, no .partial, .work or .lock, no input touched
