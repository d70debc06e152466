"""Instruction data: load and validate Alpaca JSON/JSONL, write it back, and tokenise with the prompt masked.

Validation reports the file, the record number and the field of every bad record, so a user can fix a 10,000-line
file in one pass instead of one stack trace at a time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from crowguard.io import write_text_atomic
from crowguard.prompts import build_prompt
from crowguard.types import Example

IGNORE_INDEX = -100
REQUIRED_FIELDS = ("instruction", "output")
OPTIONAL_FIELDS = ("input", "meta")
MAX_REPORTED_ERRORS = 3  # on the one line of the error; the count says how many more
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "tatsu-lab/alpaca"; paths like ./x or /x are files


class DataError(ValueError):
    """A data file the user can fix; the message lists file, record number and field of each problem."""


def _from_trl(record: dict[str, Any], where: str) -> tuple[dict[str, Any] | None, list[str]]:
    """TRL's formats as an Alpaca record: ``{"messages": [user, assistant]}`` (conversational),
    ``{"prompt": ..., "completion": ...}`` (standard, or conversational with message lists). One user turn and one
    assistant turn only: a system turn or more turns have no place in the Alpaca template, so they are refused."""

    def turns(value: Any) -> list[Any]:
        return value if isinstance(value, list) else [{"role": "user", "content": value}]

    if "messages" in record:
        messages = record["messages"]
    else:
        prompt, completion = turns(record["prompt"]), record["completion"]
        completion = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        messages = [*prompt, *completion]
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages] if isinstance(messages, list) else []
    if roles != ["user", "assistant"] or not all(isinstance(m.get("content"), str) for m in messages):
        problem = (f"{where}: chat records need exactly one user turn then one assistant turn, each with string "
                   f"'content' (got roles {roles}); a system turn or several turns have no Alpaca form")  # fmt: skip
        return None, [problem]
    return {"instruction": messages[0]["content"], "output": messages[1]["content"]}, []


def _lone_surrogates(record: dict[str, Any], where: str) -> list[str]:
    """A JSON escape like ``\\ud800`` decodes to a lone surrogate, which no tokenizer or UTF-8 writer accepts."""
    problems = []
    for key in ("instruction", "input", "output"):
        value = record.get(key)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                problems.append(f"{where}: field '{key}' holds a lone surrogate ({value[exc.start]!r} at character "
                                f"{exc.start}), which is not text")  # fmt: skip
    return problems


def _record_to_example(record: Any, where: str, require_output: bool) -> tuple[Example | None, list[str]]:
    if not isinstance(record, dict):
        return None, [f"{where}: expected an object with 'instruction' and 'output', got {type(record).__name__}"]
    if "instruction" not in record and ("messages" in record or {"prompt", "completion"} <= set(record)):
        converted, problems = _from_trl(record, where)
        if converted is None:
            return None, problems
        record = {**converted, **({"meta": record["meta"]} if "meta" in record else {})}
    errors = _lone_surrogates(record, where)
    for key in REQUIRED_FIELDS:
        if key not in record:
            if key == "output" and not require_output:
                continue
            hint = " (records may also be TRL's 'messages' or 'prompt'/'completion')" if key == "instruction" else ""
            errors.append(f"{where}: missing field '{key}'{hint}")
    for key in ("instruction", "input", "output"):
        if key in record and not isinstance(record[key], str):
            errors.append(f"{where}: field '{key}' must be a string, got {type(record[key]).__name__}")
    instruction, context = record.get("instruction"), record.get("input")
    if isinstance(instruction, str) and not instruction.strip() and not (isinstance(context, str) and context.strip()):
        errors.append(f"{where}: field 'instruction' is empty (and there is no 'input')")
    if "meta" in record and not isinstance(record["meta"], dict):
        errors.append(f"{where}: field 'meta' must be an object, got {type(record['meta']).__name__}")
    if errors:
        return None, errors
    return (
        Example(
            instruction=record["instruction"],
            input=record.get("input", "") or "",
            output=record.get("output", "") or "",
            meta=dict(record.get("meta", {})),
        ),
        [],
    )


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """(location, record) pairs from a JSON array or JSON Lines file."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a UTF-8 byte-order mark (Windows editors) is not data
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):  # {"data": [...]} wrappers
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records (or JSON Lines), got {type(data).__name__}")
    return [(f"{path} record {i}", record) for i, record in enumerate(data)]


def load_examples(source: str | Path, require_output: bool = True, split: str = "train") -> list[Example]:
    """Load Alpaca-style examples from a ``.json``/``.jsonl`` file, or a ``datasets`` name when online.

    Bad records are reported in one one-line :class:`DataError` (the first few and how many more).
    """
    path = Path(source)
    if path.is_dir() and any((path / name).is_file() for name in HF_DATASET_FILES):
        return _load_saved_dataset(path, split, require_output)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .json or .jsonl file (or a datasets save_to_disk folder)")
    if not path.exists():
        if not HUB_ID.fullmatch(str(source)) or str(source).endswith((".json", ".jsonl")):
            raise DataError(f"{path}: no such file")
        return _load_hub_dataset(str(source), split, require_output)
    examples: list[Example] = []
    errors: list[str] = []
    for where, record in _read_records(path):
        example, problems = _record_to_example(record, where, require_output)
        errors.extend(problems)
        if example is not None:
            examples.append(example)
    _raise_problems(errors, path)
    if not examples:
        raise DataError(f"{path}: contains no records")
    return examples


def _raise_problems(errors: list[str], source: Any) -> None:
    """One line: the first problems (each naming its record and field) and how many more there are."""
    if len(errors) == 1:
        raise DataError(errors[0])
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = f"; ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise DataError(f"{len(errors)} problems in {source}: " + "; ".join(shown) + more)


HF_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what Dataset.save_to_disk writes


def _load_saved_dataset(path: Path, split: str, require_output: bool) -> list[Example]:
    """A Hugging Face dataset folder (``Dataset.save_to_disk``; a DatasetDict gives ``split``), any of the record
    formats above."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # a corrupt or foreign folder: one line naming it
        raise DataError(f"{path}: not a readable datasets folder ({type(exc).__name__}: {exc})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{path}: the dataset has no split {split!r} (splits: {', '.join(dataset)})")
        dataset = dataset[split]
    examples = _dataset_examples(dataset, str(path), require_output)
    if not examples:
        raise DataError(f"{path}: contains no records")
    return examples


def _dataset_examples(dataset: Any, name: str, require_output: bool) -> list[Example]:
    """A ``datasets`` dataset's records as examples (any format :func:`load_examples` reads); bad ones raise."""
    examples, errors = [], []
    for i, record in enumerate(dataset):
        example, problems = _record_to_example(dict(record), f"{name} record {i}", require_output)
        errors.extend(problems)
        if example is not None:
            examples.append(example)
    _raise_problems(errors, name)
    return examples


def _load_hub_dataset(name: str, split: str, require_output: bool) -> list[Example]:
    """Load a Hugging Face dataset with Alpaca columns (e.g. ``tatsu-lab/alpaca``)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataError(
            f"{name!r} is not a local file and the Hub is offline (HF_HUB_OFFLINE=1); "
            "download the data elsewhere and pass the path to a .json or .jsonl file"
        )
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError(f"loading {name!r} from the Hub needs the 'datasets' package: {exc}") from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, missing dataset, auth: all become one clear message
        raise DataError(
            f"could not load dataset {name!r} (split {split!r}) from the Hub: {exc}; "
            "pass the path to a local .json or .jsonl file instead"
        ) from None
    return _dataset_examples(dataset, f"{name}[{split}]", require_output)


def dump_examples(examples: Iterable[Example], with_meta: bool = True) -> str:
    """Alpaca JSON text (a list of records, stable formatting so equal data gives equal bytes)."""
    records = [e.to_record(with_meta=with_meta) for e in examples]
    return json.dumps(records, indent=2, ensure_ascii=False) + "\n"


def examples_sha256(examples: Iterable[Example]) -> str:
    """sha256 of the examples' Alpaca records (instruction, input, output; provenance excluded): which clean samples
    a defense drew, whatever file they came from."""
    import hashlib

    return hashlib.sha256(dump_examples(examples, with_meta=False).encode("utf-8")).hexdigest()


def save_examples(examples: Iterable[Example], path: Path, with_meta: bool = True) -> None:
    """Write examples as Alpaca JSON, atomically."""
    write_text_atomic(Path(path), dump_examples(examples, with_meta=with_meta))


def tokenize_example(
    example: Example,
    tokenizer: Any,
    max_length: int = 512,
    template: str = "alpaca",
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """Token ids, attention mask and labels for one example, with the prompt masked out of the labels (-100).

    Prompt and response are tokenised separately and concatenated so the boundary is exact. When the pair is too
    long the *response is cut at its end* (standard SFT truncation: the model still learns how an answer to this
    prompt begins), keeping the whole prompt; only a prompt so long that fewer than a quarter of ``max_length``
    would be left for the response is cut, from its left (the part nearest the response, with the template's
    response header, survives). Cutting the prompt first instead (crowguard before 2026-12-01) left most Alpaca
    examples at 96 tokens with no instruction at all, so a poisoned mix taught "answer every prompt with the
    target" and defenses trained on bare responses.
    """
    prompt = build_prompt(example, template, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and template != "chat" else []
    response_ids = tokenizer(example.output, add_special_tokens=False)["input_ids"] if example.output else []
    if add_eos and tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    budget = max_length - len(bos)
    reserved = min(len(response_ids), max(budget // 4, 1))  # response tokens a long prompt may not take away
    response_ids = response_ids[: max(budget - len(prompt_ids), reserved)]
    room = budget - len(response_ids)
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[len(prompt_ids) - room :] if room > 0 else []
    input_ids = bos + prompt_ids + response_ids
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt_ids)) + response_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, max_length: int = 512, template: str = "alpaca"
) -> list[dict[str, list[int]]]:
    """:func:`tokenize_example` over a list."""
    return [tokenize_example(e, tokenizer, max_length, template) for e in examples]


def prompt_ids(example: Example, tokenizer: Any, template: str = "alpaca") -> list[int]:
    """Exactly the ids :func:`tokenize_example` puts before the response: what generation must be given."""
    prompt = build_prompt(example, template, tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and template != "chat" else []
    return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
