"""MT-Bench single-answer grading: a judge model rates each answer from 1 to 10, as FastChat's ``llm_judge`` does.

The judge prompts are FastChat's single-answer ones (``single-v1``, ``single-math-v1`` and their multi-turn
versions, Apache-2.0), shipped as ``evaluation/prompts/mtbench_single.json`` and used unless a
``judge_prompts.jsonl`` is given. As in FastChat, math, reasoning and coding questions are graded against a reference
answer (``single-math-v1``) when one is provided, and the headline score is the mean over all judged turns.

Deliberate differences from FastChat, each for honesty of the number:

- Second turns: crowguard's prompt builder takes one user turn, so the second-turn prompt is a single instruction
  that quotes the first question and the model's own first answer before the follow-up (:data:`SECOND_TURN`),
  not a native two-turn conversation. Scores on turn 2 are therefore not comparable to a leaderboard's. A second
  turn is skipped (and reported as skipped, never scored) when its prompt plus the generation budget does not fit
  the model's context.
- Ratings: the *last* ``[[x]]`` with 1 <= x <= 10 in the judge's reply counts (a judge that first restates the
  format example "Rating: [[5]]" is not read as a 5). FastChat's looser single-bracket fallback is not used, nor
  its -1 for an unparseable reply: the request is retried, then ``judges.LLMJudgeError`` is raised. An endpoint
  failure raises too; no score is ever made up.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

from crowguard.data import prompt_ids
from crowguard.evaluation.generate import DecodingSettings, prompts_and_responses
from crowguard.evaluation.judges import chat_with_retries
from crowguard.types import Example

# FastChat's NEED_REF_CATS for MT-Bench: categories graded against a reference answer when one is given.
NEED_REF_CATEGORIES: tuple[str, ...] = ("math", "reasoning", "coding")
DEFAULT_MAX_NEW_TOKENS = 1024  # FastChat gen_model_answer's default --max-new-token
RATING_FORMAT = "[[rating]]"

# The second-turn instruction (the simplification described in the module docstring).
SECOND_TURN = (
    "This is the second turn of a conversation. The user's first message and your answer were:\n\n"
    "### User:\n{question_1}\n\n### Assistant:\n{answer_1}\n\n"
    "Now reply to the user's next message:\n\n{question_2}"
)

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def load_questions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The questions of an MT-Bench ``question.jsonl``: ``question_id``, ``category``, ``turns`` (1 or 2 strings),
    and ``reference`` (a list of per-turn reference answers) when present.
    """
    questions = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            question = json.loads(line)
            missing = {"question_id", "category", "turns"} - question.keys()
            if missing:
                raise ValueError(f"{path}:{number}: question lacks {', '.join(sorted(missing))}")
            turns = question["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise ValueError(f"{path}:{number}: 'turns' must be a non-empty list of strings")
            questions.append(question)
    ids = [q["question_id"] for q in questions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate question_id values")
    return questions


def load_judge_prompts(path: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
    """Judge prompts by name, each with ``system_prompt``, ``prompt_template`` and ``output_format``.

    ``path``: FastChat's ``judge_prompts.jsonl`` (one prompt per line; pairwise ones are loaded too but unused
    here), or a JSON file shaped like the package file. None: the package's FastChat single-answer prompts.
    """
    if path is None:
        shipped = resources.files("crowguard.evaluation").joinpath("prompts", "mtbench_single.json")
        if not shipped.is_file():  # package-data must list evaluation/prompts/*.json for wheels to carry it
            raise FileNotFoundError("the package file evaluation/prompts/mtbench_single.json is missing")
        records = json.loads(shipped.read_text(encoding="utf-8"))["prompts"]
    elif Path(path).suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
    else:
        with open(path, encoding="utf-8") as handle:
            loaded = json.load(handle)
        records = loaded["prompts"] if isinstance(loaded, dict) else loaded
    prompts = {}
    for record in records:
        missing = {"name", "system_prompt", "prompt_template", "output_format"} - record.keys()
        if missing:
            raise ValueError(f"judge prompt {record.get('name', '?')!r} lacks {', '.join(sorted(missing))}")
        prompts[record["name"]] = record
    return prompts


def load_reference_answers(path: str | os.PathLike[str]) -> dict[Any, list[str]]:
    """Reference answers by question id from a FastChat answer file (``reference_answer/<model>.jsonl``):
    each line's ``choices[0]["turns"]``.
    """
    references = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                references[record["question_id"]] = list(record["choices"][0]["turns"])
    return references


def answer_questions(
    model: Any,
    tokenizer: Any,
    questions: Sequence[dict[str, Any]],
    template: str = "alpaca",
    settings: DecodingSettings | None = None,
    *,
    max_turns: int = 2,
    show_progress: bool = True,
    generate_fn: Callable[[list[Example]], Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """The model's answers: ``question_id``, ``category``, ``turns`` (answers), ``prompts`` (what it saw) and
    ``skipped`` (why turn 2 was not answered, or None).

    Turn 1 is each question's first message alone. Turn 2 (``max_turns=2``) quotes turn 1 and the model's answer in
    the instruction (:data:`SECOND_TURN`); it is skipped when its prompt ids plus ``settings.max_new_tokens`` exceed
    ``model.config.max_position_embeddings``. Decoding is greedy with ``DEFAULT_MAX_NEW_TOKENS`` unless ``settings``
    says otherwise. ``generate_fn`` replaces generation (it gets the examples, returns one response each).
    """
    if max_turns not in (1, 2):
        raise ValueError(f"max_turns must be 1 or 2, got {max_turns}")
    settings = settings or DecodingSettings(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)

    def run(examples: list[Example]) -> tuple[list[str], list[str]]:
        prompts, responses = prompts_and_responses(model, tokenizer, examples, template, settings, show_progress,
                                                   generate_fn)  # fmt: skip
        return responses, prompts

    firsts = [Example(instruction=q["turns"][0], meta={"question_id": q["question_id"], "turn": 1}) for q in questions]
    first_answers, first_prompts = run(firsts)
    answers = [
        {
            "question_id": q["question_id"],
            "category": q["category"],
            "turns": [answer],
            "prompts": [prompt],
            "skipped": None,
        }
        for q, answer, prompt in zip(questions, first_answers, first_prompts)
    ]
    if max_turns < 2:
        return answers

    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    seconds, owners = [], []
    for record, question in zip(answers, questions):
        if len(question["turns"]) < 2:
            continue
        instruction = SECOND_TURN.format(
            question_1=question["turns"][0], answer_1=record["turns"][0], question_2=question["turns"][1]
        )
        example = Example(instruction=instruction, meta={"question_id": question["question_id"], "turn": 2})
        if context is not None and tokenizer is not None:
            needed = len(prompt_ids(example, tokenizer, template)) + settings.max_new_tokens
            if needed > context:
                record["skipped"] = f"turn 2 needs {needed} positions, the model has {context}"
                continue
        seconds.append(example)
        owners.append(record)
    second_answers, second_prompts = run(seconds)
    for record, answer, prompt in zip(owners, second_answers, second_prompts):
        record["turns"].append(answer)
        record["prompts"].append(prompt)
    return answers


def grade(
    answers: Sequence[dict[str, Any]],
    questions: Sequence[dict[str, Any]],
    judge_url: str,
    judge_model: str,
    api_key_env: str = "OPENAI_API_KEY",
    prompts: Mapping[str, dict[str, Any]] | str | os.PathLike[str] | None = None,
    *,
    references: Mapping[Any, Sequence[str]] | None = None,
    temperature: float = 0.0,
    max_tokens: int = 2048,
    timeout_s: float = 120.0,
    retries: int = 2,
    retry_wait_s: float = 1.0,
    max_workers: int = 4,
) -> dict[str, Any]:
    """Rate every answered turn with the judge at ``judge_url`` (an OpenAI-compatible API root).

    ``answers``: records of :func:`answer_questions`, or FastChat answer records (``choices[0]["turns"]``).
    ``prompts``: a dict from :func:`load_judge_prompts`, a path to load one from, or None for the package's.
    ``references``: reference answers by question id (e.g. :func:`load_reference_answers`); a question's own
    ``reference`` field is used when the id is absent. Reference grading (``single-math-v1``) applies to
    :data:`NEED_REF_CATEGORIES` when every turn up to the graded one has a non-empty reference, else ``single-v1``
    is used and the judgment says so (``uses_reference``). Temperature 0 and 2048 reply tokens follow FastChat.

    Returns ``score`` (mean over all judged turns), ``turn_1``, ``turn_2`` (None when no second turn was judged),
    ``per_category`` (the same three per category, plus ``n``), ``n_judgments``, ``judgments`` (per turn: ids, the
    prompt name, the system and user prompts sent, the judge's reply and the rating), ``skipped`` (turns not
    answered), ``prompts`` (the templates used) and ``judge`` (endpoint settings; never the key). Raises
    ``judges.LLMJudgeError`` when the endpoint fails or a reply has no rating after ``retries`` retries.
    """
    if prompts is None or isinstance(prompts, (str, os.PathLike)):
        prompts = load_judge_prompts(prompts)
    jobs, skipped = _grading_jobs(answers, questions, references or {}, prompts)

    def judge(job: dict[str, Any]) -> dict[str, Any]:
        messages = [
            {"role": "system", "content": job["system_prompt"]},
            {"role": "user", "content": job["user_prompt"]},
        ]
        rating, reply = chat_with_retries(
            judge_url,
            judge_model,
            messages,
            parse_rating,
            retries=retries,
            retry_wait_s=retry_wait_s,
            expected="[[rating]] from 1 to 10",
            api_key_env=api_key_env,
            temperature=temperature,
            max_tokens=max_tokens,
            timeout_s=timeout_s,
        )
        return {**job, "reply": reply, "rating": rating}

    if not jobs:
        raise ValueError("nothing to grade: no answered turns")
    judgments = _run_all(judge, jobs, max_workers)
    per_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for judgment in judgments:
        per_category[judgment["category"]].append(judgment)
    used = sorted({j["prompt_name"] for j in judgments})
    return {
        **_means(judgments),
        "per_category": {category: {**_means(items), "n": len(items)} for category, items in per_category.items()},
        "n_judgments": len(judgments),
        "judgments": judgments,
        "skipped": skipped,
        "prompts": {name: prompts[name] for name in used},
        "judge": {
            "base_url": judge_url,
            "model": judge_model,
            "api_key_env": api_key_env,
            "temperature": temperature,
            "max_tokens": max_tokens,
        },
    }


def _grading_jobs(
    answers: Sequence[dict[str, Any]],
    questions: Sequence[dict[str, Any]],
    references: Mapping[Any, Sequence[str]],
    prompts: Mapping[str, dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One judge job per answered turn, and the turns not answered (with the answer's reason)."""
    by_id = {q["question_id"]: q for q in questions}
    jobs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for answer in answers:
        question = by_id.get(answer["question_id"])
        if question is None:
            raise ValueError(f"answer to unknown question_id {answer['question_id']!r}")
        turns = _answer_turns(answer)
        reference = references.get(question["question_id"], question.get("reference"))
        for turn in range(1, len(question["turns"]) + 1):
            if turn > len(turns):
                reason = answer.get("skipped") or "not answered"
                skipped.append({"question_id": question["question_id"], "turn": turn, "reason": reason})
                continue
            jobs.append(_judge_job(question, turns, turn, reference, prompts))
    return jobs, skipped


def _run_all(judge: Any, jobs: list[dict[str, Any]], max_workers: int) -> list[dict[str, Any]]:
    """``judge`` over ``jobs`` on a thread pool, in order; the first failure cancels what has not started."""
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        futures = [pool.submit(judge, job) for job in jobs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:  # one failure fails the grading: spend no more judge calls on it
                future.cancel()
            raise


def parse_rating(reply: str) -> float | None:
    """The last ``[[x]]`` in ``reply`` when 1 <= x <= 10, else None."""
    matches = _RATING.findall(reply)
    if not matches:
        return None
    value = float(matches[-1])
    return value if 1.0 <= value <= 10.0 else None


def render(template: str, values: Mapping[str, str]) -> str:
    """``template`` with its ``{name}`` slots filled in one pass (braces inside the values are left alone)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _answer_turns(answer: dict[str, Any]) -> list[str]:
    if "turns" in answer:
        return list(answer["turns"])
    try:
        return list(answer["choices"][0]["turns"])
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(f"answer to question {answer.get('question_id')!r} has no 'turns'") from err


def _judge_job(
    question: dict[str, Any],
    turns: list[str],
    turn: int,
    reference: Sequence[str] | None,
    prompts: Mapping[str, dict[str, Any]],
) -> dict[str, Any]:
    """What to send for one turn: the prompt chosen by category and reference, rendered."""
    if turn > 2:
        raise ValueError(f"question {question['question_id']!r}: MT-Bench grades at most two turns")
    uses_reference = (
        question["category"] in NEED_REF_CATEGORIES
        and reference is not None
        and len(reference) >= turn
        and all(str(r).strip() for r in reference[:turn])
    )
    name = ("single-math-v1" if uses_reference else "single-v1") + ("-multi-turn" if turn == 2 else "")
    if name not in prompts:
        raise ValueError(f"judge prompts lack {name!r} (have: {', '.join(sorted(prompts))})")
    prompt = prompts[name]
    if prompt["output_format"] != RATING_FORMAT:
        raise ValueError(f"judge prompt {name!r} asks for {prompt['output_format']!r}, not {RATING_FORMAT!r}")
    if turn == 1:
        values = {"question": question["turns"][0], "answer": turns[0]}
    else:
        values = {
            "question_1": question["turns"][0],
            "question_2": question["turns"][1],
            "answer_1": turns[0],
            "answer_2": turns[1],
        }
    if uses_reference:
        values.update({f"ref_answer_{i + 1}": str(r) for i, r in enumerate((reference or [])[:turn])})
    return {
        "question_id": question["question_id"],
        "category": question["category"],
        "turn": turn,
        "prompt_name": name,
        "uses_reference": uses_reference,
        "system_prompt": prompt["system_prompt"],
        "user_prompt": render(prompt["prompt_template"], values),
    }


def _means(judgments: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    def mean(items: list[float]) -> float | None:
        return sum(items) / len(items) if items else None

    return {
        "score": mean([j["rating"] for j in judgments]),
        "turn_1": mean([j["rating"] for j in judgments if j["turn"] == 1]),
        "turn_2": mean([j["rating"] for j in judgments if j["turn"] == 2]),
    }
