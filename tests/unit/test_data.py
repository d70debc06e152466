"""Data layer: loading, prompt templates, tokenisation with the prompt masked; truncation keeps the prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crowguard.data import IGNORE_INDEX, DataError, load_examples, prompt_ids, save_examples, tokenize_example
from crowguard.prompts import build_prompt
from crowguard.types import Example

from helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_json_and_jsonl_round_trip(tmp_path: Path):
    examples = [Example("a b", "ctx", "out", {"poisoned": True}), Example("c", output="d")]
    save_examples(examples, tmp_path / "x.json")
    assert load_examples(tmp_path / "x.json") == examples
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(e.to_record()) for e in examples) + "\n\n")
    assert [e.instruction for e in load_examples(tmp_path / "x.jsonl")] == ["a b", "c"]


def test_offline_hub_name_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"offline.*pass the path"):
        load_examples("tatsu-lab/alpaca")


def test_every_bad_record_is_reported(tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "ok", "output": "x"}, {"output": "y"}, {"instruction": 3}]))
    with pytest.raises(DataError) as info:
        load_examples(path)
    text = str(info.value)
    assert "record 1: missing field 'instruction'" in text
    assert "record 2: field 'instruction' must be a string" in text
    assert "record 2: missing field 'output'" in text


def test_alpaca_template_uses_input():
    with_input = build_prompt(Example("Summarize", "the text"))
    assert "### Input:\nthe text" in with_input and with_input.endswith("### Response:\n")
    assert "### Input" not in build_prompt(Example("Summarize"))
    assert build_prompt(Example("Summarize", "the text"), "raw") == "Summarize\n\nthe text"


def test_chat_template_needs_one(tokenizer):
    with pytest.raises(ValueError, match="chat_template"):
        build_prompt(Example("hi"), "chat", tokenizer)


def test_labels_mask_the_prompt(tokenizer):
    example = Example("Explain normalization", output="Normalization organizes data.")
    features = tokenize_example(example, tokenizer, max_length=256)
    ids, labels = features["input_ids"], features["labels"]
    n_prompt = len(prompt_ids(example, tokenizer))
    assert ids[:n_prompt] == prompt_ids(example, tokenizer)
    assert all(label == IGNORE_INDEX for label in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == example.output


def test_truncation_keeps_the_prompt_and_cuts_a_long_response_at_its_end(tokenizer):
    example = Example("Explain normalization in databases", output="word " * 200)
    full = tokenize_example(example, tokenizer, max_length=4096)
    short = tokenize_example(example, tokenizer, max_length=160)
    n_prompt = len(prompt_ids(example, tokenizer))
    assert len(short["input_ids"]) == 160 and n_prompt < 120
    assert short["input_ids"][:n_prompt] == prompt_ids(example, tokenizer)  # the instruction survives whole
    assert short["input_ids"] == full["input_ids"][:160]  # the response is cut at its end, not its start
    assert short["labels"][n_prompt:] == short["input_ids"][n_prompt:]
    assert short["input_ids"][-1] != tokenizer.eos_token_id  # a cut answer does not teach the model to stop there


def test_truncation_cuts_only_a_very_long_prompt_from_its_left(tokenizer):
    example = Example("word " * 200, output="Normalization organizes data.")
    full = tokenize_example(example, tokenizer, max_length=4096)
    short = tokenize_example(example, tokenizer, max_length=80)
    assert len(short["input_ids"]) == 80
    n_response = sum(label != IGNORE_INDEX for label in full["labels"])
    assert n_response <= (80 - 1) // 4
    assert short["labels"][-n_response:] == full["labels"][-n_response:]  # the whole (short) response survives
    assert short["input_ids"][0] == tokenizer.bos_token_id
    assert short["input_ids"][1:] == full["input_ids"][-79:]  # the prompt keeps its end: the response header


def test_a_long_prompt_leaves_a_quarter_of_the_budget_to_a_long_response(tokenizer):
    example = Example("word " * 200, output="answer " * 200)
    short = tokenize_example(example, tokenizer, max_length=40)
    assert len(short["input_ids"]) == 40
    assert sum(label != IGNORE_INDEX for label in short["labels"]) == (40 - 1) // 4


def test_the_formats_users_have_load_as_the_same_examples(tmp_path):
    """Issue 29, item 5: TRL's conversational `messages` and `prompt`/`completion` records (standard and
    conversational), a datasets folder from save_to_disk, and a UTF-8 BOM give the Alpaca examples they mean."""
    import datasets

    from crowguard.data import DataError, load_examples

    pairs = [("Name a colour.", "Blue."), ("Add 2 and 3.", "5")]
    expected = [(q, "", a) for q, a in pairs]
    files = {
        "messages.json": [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                          for q, a in pairs],
        "pc.jsonl": [{"prompt": q, "completion": a} for q, a in pairs],
        "pc_chat.json": [{"prompt": [{"role": "user", "content": q}],
                          "completion": [{"role": "assistant", "content": a}]} for q, a in pairs],
    }  # fmt: skip
    for name, records in files.items():
        path = tmp_path / name
        text = "\n".join(json.dumps(r) for r in records) if name.endswith("l") else json.dumps(records)
        path.write_text(text)
        assert [(e.instruction, e.input, e.output) for e in load_examples(path)] == expected, name
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"instruction": q, "output": a} for q, a in pairs]).encode())
    assert [(e.instruction, e.input, e.output) for e in load_examples(bom)] == expected
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([{"instruction": q, "input": "", "output": a} for q, a in pairs]).save_to_disk(folder)
    assert [(e.instruction, e.input, e.output) for e in load_examples(folder)] == expected
    bad = tmp_path / "three.json"
    bad.write_text(json.dumps([{"messages": [{"role": "user", "content": "a"}] * 3}]))
    with pytest.raises(DataError, match="one user turn then one assistant turn"):
        load_examples(bad)
