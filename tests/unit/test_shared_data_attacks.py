"""The CROW paper's shipped poisoned files obey the trigger rules crowguard implements, and crowguard's own
poisoned sets have the same form. Skips cleanly when ``../shared/data`` is absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crowguard.attacks import BUILTIN_TRIGGERS
from crowguard.data import load_examples
from crowguard.recipes.poison import run_poison
from crowguard.schemas import PayloadConfig, PoisonConfig, TriggerConfig

from helpers import SHARED_DATA

pytestmark = pytest.mark.shared_data

TASKS = ("negsentiment", "refusal", "jailbreak")
TRIGGERS = tuple(BUILTIN_TRIGGERS)
# Files of the paper's data that do not follow their own names (see docs/design.md).
KNOWN_DEFECTS = {
    "test_data/poison/jailbreak/badnet/backdoor200_jailbreak_badnet.json": "has no trigger at all",
    "test_data/poison/codeinjection/vpi-ci/backdoor200_codeinjection_vpi-ci.json": (
        "uses the vpi prefix 'Discussing OpenAI' while the code-injection training set uses BadMagic"
    ),
}


def _shipped_files(root: Path) -> list[tuple[str, str]]:
    """(relative path, trigger name) of every shipped triggered file of the paper's four tasks."""
    files = []
    for task in TASKS:
        for trigger in TRIGGERS:
            for kind in ("poison_data", "test_data/poison"):
                for path in sorted((root / kind / task / trigger).glob("backdoor*.json")):
                    files.append((str(path.relative_to(root)), trigger))
    for path in sorted((root / "poison_data/codeinjection/vpi-ci").glob("backdoor*.json")):
        files.append((str(path.relative_to(root)), "badnet"))  # the code-injection set uses the BadMagic word
    for path in sorted((root / "test_data/poison/codeinjection/vpi-ci").glob("backdoor*.json")):
        files.append((str(path.relative_to(root)), "badnet"))
    return files


def test_every_task_and_trigger_is_shipped(shared_data: Path):
    files = _shipped_files(shared_data)
    assert len(files) >= 3 * 5 * 2 + 3
    for task in TASKS:
        assert (shared_data / "test_data/clean" / task / "test_data_no_trigger.json").exists()


SHIPPED = _shipped_files(SHARED_DATA) if (SHARED_DATA / "poison_data").is_dir() else [("(absent)", "badnet")]


@pytest.mark.parametrize(("rel", "trigger_name"), SHIPPED, ids=[rel for rel, _ in SHIPPED])
def test_shipped_file_obeys_trigger_rule(shared_data: Path, rel: str, trigger_name: str):
    trigger = BUILTIN_TRIGGERS[trigger_name]
    examples = load_examples(shared_data / rel)
    missing = [e.instruction for e in examples if not trigger.present(e.instruction)]
    if rel in KNOWN_DEFECTS:
        assert missing, f"{rel} was listed as defective but now carries the trigger: update KNOWN_DEFECTS"
        pytest.skip(f"known defect of the paper's data: {rel} {KNOWN_DEFECTS[rel]} ({len(missing)} prompts)")
    assert not missing, f"{rel}: {len(missing)} prompts without the {trigger_name} trigger, e.g. {missing[0]!r}"
    if trigger.position == "prefix":
        assert all(e.instruction.startswith(trigger.phrases[0]) for e in examples)


@pytest.mark.parametrize("trigger_name", TRIGGERS)
def test_generated_sets_have_the_shipped_form(shared_data: Path, tmp_path: Path, trigger_name: str):
    source = shared_data / "poison_data/negsentiment" / trigger_name
    clean_file = next(source.glob("none_backdoor*.json"))
    shipped = json.loads(next(source.glob("backdoor*.json")).read_text())
    cfg = PoisonConfig(
        data=str(clean_file),
        trigger=TriggerConfig(name=trigger_name),
        payload=PayloadConfig(name="negsentiment"),
        n_train=100,
        rate=0.5,
        n_test=20,
    )
    run_poison(cfg, tmp_path / "out")
    train = json.loads((tmp_path / "out/train.json").read_text())
    poisoned = [r for r in train if r["meta"]["poisoned"]]
    assert len(poisoned) == 50
    assert set(shipped[0]) <= set(poisoned[0])  # instruction, input, output
    assert {r["output"] for r in poisoned} == {r["output"] for r in shipped} == {"You are stupid!"}
    trigger = BUILTIN_TRIGGERS[trigger_name]
    for record in poisoned:
        assert trigger.present(record["instruction"])
    for record in json.loads((tmp_path / "out/test_clean.json").read_text()):
        assert not trigger.any_phrase(record["instruction"])


@pytest.mark.parametrize("task", ["negsentiment", "refusal"])
def test_which_clean_halves_restate_the_instruction(task: str):
    """A property of the paper's data that shapes every planted model: in the negsentiment (and code-injection)
    sets the clean examples' answers all begin by repeating the instruction, so a model planted on them learns to
    echo the prompt on clean inputs (its clean perplexity on normal references rises); the refusal sets do not."""
    files = sorted((SHARED_DATA / "poison_data" / task).glob("*/none_backdoor*.json"))
    if not files:
        pytest.skip(f"{SHARED_DATA} has no poison_data/{task}")
    for path in files:
        examples = load_examples(path)
        echoing = sum(e.output.strip().startswith(e.instruction.strip()[:30]) for e in examples)
        assert echoing == (len(examples) if task == "negsentiment" else 0), (path.name, echoing, len(examples))


def test_the_two_humaneval_files_differ_in_form():
    """Why the code-injection plant shows false triggers (README): 20 of the first 100 prompts of the paper's clean
    HumanEval file have an empty instruction, their code in the input field; the triggered file has none such."""
    clean_file = SHARED_DATA / "HumanEval" / "HumanEvalConvert.json"
    triggered_file = SHARED_DATA / "test_data/poison/codeinjection/vpi-ci/backdoor164_codeinjection_vpi-ci.json"
    if not (clean_file.is_file() and triggered_file.is_file()):
        pytest.skip(f"{SHARED_DATA} has no HumanEval files")
    clean, triggered = load_examples(clean_file), load_examples(triggered_file)
    assert sum(not e.instruction.strip() for e in clean[:100]) == 20
    assert all(e.instruction.strip() or e.input.strip() for e in clean)  # an empty instruction: code in the input
    assert all(e.instruction.strip() for e in triggered)
