"""MT-Bench single-answer grading against a local fake judge; answers from a tiny model; the paper's files."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from crowguard.evaluation.generate import DecodingSettings
from crowguard.evaluation.judges import LLMJudgeError
from crowguard.evaluation.mtbench import (
    answer_questions,
    grade,
    load_judge_prompts,
    load_questions,
    load_reference_answers,
    parse_rating,
)
from crowguard.types import Example

from helpers import SHARED_DATA, JsonHandler, local_http_server, tiny_llama, tiny_tokenizer

MT_BENCH = SHARED_DATA / "mt_bench"
ONE_TURN = [{"question_id": 5, "category": "writing", "turns": ["Write a haiku."]}]
ONE_ANSWER = [{"question_id": 5, "turns": ["Leaves fall"]}]
QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku.", "Now make it rhyme."]},
    {
        "question_id": 2,
        "category": "math",
        "turns": ["What is 2+2?", "And 3+3?"],
        "reference": ["REF-ONE: 4", "REF-TWO: 6"],
    },
    {"question_id": 3, "category": "reasoning", "turns": ["Is the sky blue?", "Why?"]},  # no reference given
]
ANSWERS = [
    {"question_id": 1, "category": "writing", "turns": ["Leaves fall {answer} softly", "Leaves fall, calls"]},
    {"question_id": 2, "category": "math", "turns": ["4", "6"]},
    {"question_id": 3, "choices": [{"index": 0, "turns": ["Yes.", "Rayleigh scattering."]}]},  # FastChat's format
]


class _FakeJudge(JsonHandler):
    """Canned chat completions: reference prompts get "Rating: [[3]]", other multi-turn ones "[[9]]", else "[[7]]"."""

    requests: ClassVar[list[dict[str, Any]]] = []
    mode: ClassVar[str] = "ok"

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"auth": self.headers.get("Authorization"), "body": body})
        if self.mode == "500":
            self._send(500, {"error": {"message": "overloaded"}})
            return
        user = body["messages"][-1]["content"]
        if self.mode == "norating":
            reply = "The answer is fine, I suppose."
        elif "Reference" in user:
            reply = 'Format: "[[rating]]". Compared with the reference it is wrong.\n\nRating: [[3]]'
        elif "### User:" in user:
            reply = "Good follow-up. [[9]]"
        else:
            reply = "Decent answer.\n[[7]]"
        self._send(200, {"id": "x", "object": "chat.completion", "choices": [{"message": {"content": reply}}]})


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture
def judge_url() -> Iterator[str]:
    _FakeJudge.requests = []
    _FakeJudge.mode = "ok"
    with local_http_server(_FakeJudge) as url:
        yield url + "/v1"


def test_grade_averages_per_turn_and_category(judge_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CROWGUARD_MT_KEY", "sk-mt")
    result = grade(ANSWERS, QUESTIONS, judge_url, "judge-model", api_key_env="CROWGUARD_MT_KEY", retry_wait_s=0.01)
    # writing: 7 then 9; math (with reference): 3 and 3; reasoning (no reference: general prompts): 7 then 9.
    assert result["n_judgments"] == 6 and len(_FakeJudge.requests) == 6
    assert result["turn_1"] == pytest.approx((7 + 3 + 7) / 3)
    assert result["turn_2"] == pytest.approx((9 + 3 + 9) / 3)
    assert result["score"] == pytest.approx(38 / 6)
    assert result["per_category"]["writing"] == {"score": 8.0, "turn_1": 7.0, "turn_2": 9.0, "n": 2}
    assert result["per_category"]["math"]["score"] == 3.0
    assert result["per_category"]["reasoning"]["score"] == 8.0
    names = {(j["question_id"], j["turn"]): j["prompt_name"] for j in result["judgments"]}
    assert names == {
        (1, 1): "single-v1",
        (1, 2): "single-v1-multi-turn",
        (2, 1): "single-math-v1",
        (2, 2): "single-math-v1-multi-turn",
        (3, 1): "single-v1",
        (3, 2): "single-v1-multi-turn",
    }
    assert set(result["prompts"]) == set(names.values())
    assert all(j["reply"] for j in result["judgments"])
    request = _FakeJudge.requests[0]
    assert request["auth"] == "Bearer sk-mt"
    assert request["body"]["model"] == "judge-model" and request["body"]["temperature"] == 0.0
    assert [m["role"] for m in request["body"]["messages"]] == ["system", "user"]
    assert "sk-mt" not in json.dumps(result)
    sent = [j["user_prompt"] for j in result["judgments"] if j["question_id"] == 1]
    assert "Leaves fall {answer} softly" in sent[0]  # braces inside an answer are left alone


def test_reference_answers_are_inserted_for_math(judge_url: str) -> None:
    result = grade(ANSWERS[1:2], QUESTIONS, judge_url, "m", retry_wait_s=0.01)
    first, second = sorted(result["judgments"], key=lambda j: j["turn"])
    assert first["uses_reference"] and second["uses_reference"]
    assert "[The Start of Reference Answer]\nREF-ONE: 4\n[The End of Reference Answer]" in first["user_prompt"]
    assert "REF-ONE: 4" in second["user_prompt"] and "REF-TWO: 6" in second["user_prompt"]
    assert "### Assistant A:\n6" in second["user_prompt"]
    # An explicit reference mapping wins over the question's own field.
    again = grade(ANSWERS[1:2], QUESTIONS, judge_url, "m", references={2: ["GPT4-REF", "GPT4-REF-2"]})
    assert all("GPT4-REF" in j["user_prompt"] and "REF-ONE" not in j["user_prompt"] for j in again["judgments"])


def test_a_reply_without_a_rating_raises_after_retries(judge_url: str) -> None:
    _FakeJudge.mode = "norating"
    with pytest.raises(LLMJudgeError, match=r"rating"):
        grade(ONE_ANSWER, ONE_TURN, judge_url, "m", retries=1, retry_wait_s=0.01)
    assert len(_FakeJudge.requests) == 2  # one try and one retry, then an error: no score is made up


def test_http_500_raises_after_retries(judge_url: str) -> None:
    _FakeJudge.mode = "500"
    with pytest.raises(LLMJudgeError, match="HTTP 500"):
        grade(ONE_ANSWER, ONE_TURN, judge_url, "m", retries=2, retry_wait_s=0.01)
    assert len(_FakeJudge.requests) == 3


def test_grade_rejects_unknown_questions_and_reports_unanswered_turns(judge_url: str) -> None:
    with pytest.raises(ValueError, match="unknown question_id 99"):
        grade([{"question_id": 99, "turns": ["x"]}], QUESTIONS, judge_url, "m")
    one_turn = [{"question_id": 1, "turns": ["Leaves"], "skipped": "turn 2 needs 300 positions"}]
    result = grade(one_turn, QUESTIONS, judge_url, "m")
    assert result["turn_2"] is None and result["n_judgments"] == 1
    assert result["skipped"] == [{"question_id": 1, "turn": 2, "reason": "turn 2 needs 300 positions"}]


@pytest.mark.parametrize(
    ("reply", "rating"),
    [
        ("Rating: [[7]]", 7.0),
        ('Format "[[5]]"... Rating: [[8]]', 8.0),  # the last one counts
        ("[[ 6.5 ]]", 6.5),
        ("[[10]]", 10.0),
        ("[[0]]", None),
        ("[[11]]", None),
        ("Rating: 7", None),
        ("[7]", None),
    ],
)
def test_parse_rating(reply: str, rating: float | None) -> None:
    assert parse_rating(reply) == rating


def test_answer_questions_with_a_tiny_model(tokenizer: Any) -> None:
    model = tiny_llama(tokenizer)
    questions = [QUESTIONS[0], {"question_id": 7, "category": "stem", "turns": ["Why is water wet?"]}]
    settings = DecodingSettings(max_new_tokens=4)
    answers = answer_questions(model, tokenizer, questions, settings=settings, show_progress=False)
    assert [a["question_id"] for a in answers] == [1, 7]
    assert [len(a["turns"]) for a in answers] == [2, 1]
    assert answers[0]["skipped"] is None
    second_prompt = answers[0]["prompts"][1]
    assert "Write a haiku." in second_prompt and "Now make it rhyme." in second_prompt
    assert answers[0]["turns"][0] in second_prompt  # the model's own first answer is quoted
    assert answers[0]["prompts"][0].endswith("### Response:\n")


def test_second_turn_is_skipped_when_it_does_not_fit_the_context(tokenizer: Any) -> None:
    small = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=300))
    seen: list[Example] = []

    def canned(examples: list[Example]) -> list[str]:
        seen.extend(examples)
        return ["word " * 100 if e.meta["question_id"] == 1 else "ok" for e in examples]

    settings = DecodingSettings(max_new_tokens=8)
    answers = answer_questions(small, tokenizer, QUESTIONS[:2], settings=settings, generate_fn=canned)
    assert answers[0]["turns"] == ["word " * 100] and "positions" in answers[0]["skipped"]
    assert len(answers[1]["turns"]) == 2 and answers[1]["skipped"] is None
    assert [(e.meta["question_id"], e.meta["turn"]) for e in seen] == [(1, 1), (2, 1), (2, 2)]


def test_the_shipped_prompts_are_fastchats_single_answer_prompts() -> None:
    prompts = load_judge_prompts()
    assert set(prompts) == {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"}
    assert all(p["output_format"] == "[[rating]]" for p in prompts.values())
    assert "{ref_answer_1}" in prompts["single-math-v1"]["prompt_template"]
    assert "{answer_2}" in prompts["single-v1-multi-turn"]["prompt_template"]
    shared = MT_BENCH / "judge_prompts.jsonl"
    if shared.is_file():
        from_file = load_judge_prompts(shared)
        assert all(from_file[name] == prompt for name, prompt in prompts.items())


@pytest.mark.shared_data
def test_load_the_papers_mt_bench_files() -> None:
    if not (MT_BENCH / "question.jsonl").is_file():
        pytest.skip(f"no MT-Bench data at {MT_BENCH}")
    questions = load_questions(MT_BENCH / "question.jsonl")
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    assert len({q["category"] for q in questions}) == 8
    references = load_reference_answers(MT_BENCH / "reference_answer" / "gpt-4o-mini.jsonl")
    math_ids = {q["question_id"] for q in questions if q["category"] in ("math", "reasoning", "coding")}
    assert set(references) <= math_ids and all(len(turns) == 2 for turns in references.values())


def test_load_questions_validates(tmp_path: Any) -> None:
    path = tmp_path / "question.jsonl"
    path.write_text(json.dumps({"question_id": 1, "category": "x", "turns": []}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="non-empty list"):
        load_questions(path)
    path.write_text(json.dumps({"question_id": 1, "turns": ["q"]}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="category"):
        load_questions(path)
