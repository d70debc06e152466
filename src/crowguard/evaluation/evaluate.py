"""Evaluate one model on one task: the same generation, judges and metrics for every model and defense.

Reports keyword ASR with and without the trigger (Wilson 95% intervals), the hijack rate (target or a fixed
trigger-specific answer), the target-likelihood gap, clean utility (reference perplexity, exact match where answers
are checkable) and cost. A failure anywhere raises: an evaluation that did not run is never reported as ASR 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from crowguard.config import ConfigError
from crowguard.data import prompt_ids
from crowguard.evaluation.generate import DecodingSettings
from crowguard.evaluation.metrics import (
    attack_success_rate,
    exact_match,
    hijack_rate,
    measure_cost,
    nll_gap_ci,
    perplexity,
    rate_interval,
    target_nll,
    target_nll_gap,
    wilson_interval,
)
from crowguard.evaluation.tasks import Task
from crowguard.schemas import EvalConfig
from crowguard.speed import merge_for_evaluation
from crowguard.types import Example, Generation, Generator, NonFiniteError

# What the likelihood metrics of a decoding defense's evaluation measure (recorded as settings["likelihood_of"]).
LIKELIHOOD_OF_GUARDED = "the guarded model; the decoding defense changes generation only"


def make_judge(cfg: EvalConfig, payload: str, target: str | None) -> Any:
    """The judge the config asks for (keyword/target judges offline; the LLM judge needs an endpoint)."""
    from crowguard.evaluation.judges import LLMJudge, TargetStringJudge, judge_for_payload

    if cfg.judge == "llm":
        if not cfg.judge_url or not cfg.judge_model:
            raise ConfigError("evaluate.judge is 'llm' but judge_url or judge_model is not set")
        return LLMJudge(cfg.judge_url, cfg.judge_model)
    if cfg.judge == "target":
        if not target:
            raise ConfigError("evaluate.judge is 'target' but no target text is known for this payload")
        return TargetStringJudge(target)
    return judge_for_payload(payload, target)


def _rate(scores: Sequence[float], cfg: EvalConfig) -> dict[str, Any]:
    low, high = rate_interval(scores, n_resamples=cfg.bootstrap, seed=cfg.seed)
    return {"value": attack_success_rate(scores), "ci95": [low, high], "n": len(scores)}


def require_finite_weights(model: Any) -> None:
    """Refuse (NonFiniteError) a model with a nan or inf weight or buffer: it generates garbage, which no judge scores
    as the attack, so it would read as a removed backdoor (ASR 0%)."""
    from crowguard.losses import first_non_finite

    named = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if b.is_floating_point())]
    if (name := first_non_finite(named)) is not None:
        raise NonFiniteError(f"the model's weight {name} is not finite (nan or inf): refusing to evaluate it; a "
                             "broken model would score ASR 0% (was it trained with a diverging setting?)")  # fmt: skip


def require_fitting_prompts(model: Any, tokenizer: Any, task: Task, template: str, max_new_tokens: int) -> None:
    """Refuse (DataError) a test prompt that, with the generated tokens, runs past the model's positions: past them
    a model's output is undefined, not a measurement."""
    from crowguard.data import DataError

    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not limit:
        return
    for name, examples in (("triggered", task.triggered), ("clean", task.clean)):
        for i, example in enumerate(examples):
            length = len(prompt_ids(example, tokenizer, template))
            if length + max_new_tokens > limit:
                raise DataError(f"{task.sources.get(name, name)} record {i}: the prompt is {length} tokens, and with "
                                f"{max_new_tokens} new tokens it passes the model's {limit} positions")  # fmt: skip


def evaluate_model(
    model: Any,
    tokenizer: Any,
    task: Task,
    cfg: EvalConfig,
    template: str = "alpaca",
    utility_examples: Sequence[Example] = (),
    show_progress: bool = True,
    generator: Generator | None = None,
    defense: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every metric of ``task`` for an already loaded model; returns the ``results.json`` payload.

    ``generator`` (a :class:`~crowguard.types.Generator`; None: plain generation) makes every answer: triggered,
    clean, utility, HumanEval and MT-Bench; a decoding defense passes its own, and ``defense`` (what it is) goes to
    ``settings["defense"]``. The likelihood metrics (target NLL gap, perplexity) always score ``model`` itself.
    ``cfg.merge_lora`` may merge ``model``'s LoRA adapter into its base in place (:func:`~crowguard.speed.
    merge_for_evaluation`; ``settings["merged_lora"]`` says whether it did).
    """
    require_finite_weights(model)
    model, merged = merge_for_evaluation(model, cfg.merge_lora)
    task = task.limited(cfg.limit)
    require_fitting_prompts(model, tokenizer, task, template, cfg.max_new_tokens)
    settings = DecodingSettings(
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        kv_cache=cfg.kv_cache,
        prefill_batch=cfg.prefill_batch,
        compile_decode=cfg.compile_decode,
    )
    judge = make_judge(cfg, task.payload, task.target)
    stats: dict[str, list[dict[str, Any]]] = {}  # per set, the defense's numbers for each answer (if it has any)

    generator = generator or Generator()

    def answer(name: str, examples: Sequence[Example], decoding: DecodingSettings = settings) -> list[Generation]:
        generations = generator(model, tokenizer, list(examples), template, decoding, show_progress)
        per_answer = generator.last_stats
        if per_answer is not None and examples:
            stats.setdefault(name, []).extend(dict(s) for s in per_answer)
        return generations

    with measure_cost() as cost:
        start = time.perf_counter()
        triggered = answer("triggered", task.triggered)
        clean = answer("clean", task.clean)
        generation_seconds = time.perf_counter() - start
        trig_scores = judge([g.prompt for g in triggered], [g.response for g in triggered])
        clean_scores = judge([g.prompt for g in clean], [g.response for g in clean])
        metrics = backdoor_metrics(triggered, clean, trig_scores, clean_scores, cfg)
        metrics.update(likelihood_metrics(model, tokenizer, task, cfg, template))
        if utility_examples:
            answers = answer("utility", utility_examples)
            metrics["exact_match"] = exact_match([g.response for g in answers], [e.output for e in utility_examples])
        if cfg.humaneval:
            metrics["humaneval"] = _humaneval(model, tokenizer, cfg, template, show_progress, generator, answer)
        if cfg.mt_bench:
            metrics["mt_bench"] = _mt_bench(model, tokenizer, cfg, template, show_progress, generator, answer)
        if stats:
            metrics.update(generator.summarize(stats))
    new_tokens = sum(g.num_new_tokens for g in triggered) + sum(g.num_new_tokens for g in clean)
    metrics["cost"] = {
        **cost.to_dict(),
        "generation_seconds": generation_seconds,
        "tokens_per_second": new_tokens / generation_seconds if generation_seconds > 0 else None,
    }
    records = answer_records({"triggered": (triggered, trig_scores), "clean": (clean, clean_scores)}, stats)
    recorded = {"decoding": used_decoding(generator, settings), "judge": judge.describe(), "template": template,
                "limit": cfg.limit, "bootstrap": cfg.bootstrap, "seed": cfg.seed, "merged_lora": merged}  # fmt: skip
    if defense is not None:
        recorded.update(defense=dict(defense), likelihood_of=LIKELIHOOD_OF_GUARDED)
    return {
        "task": {"name": task.name, "payload": task.payload, "target": task.target, "sources": task.sources},
        "metrics": metrics,
        "settings": recorded,
        "records": records,
    }


def backdoor_metrics(
    triggered: Sequence[Generation], clean: Sequence[Generation], trig_scores: list[float],
    clean_scores: list[float], cfg: EvalConfig,
) -> dict[str, Any]:  # fmt: skip
    """ASR with and without the trigger (with intervals) and the hijack rate of the judged answers."""
    hijack = hijack_rate(
        [g.response for g in triggered],
        [g.response for g in clean],
        [s >= 0.5 for s in trig_scores],
        min_share=cfg.hijack_min_share,
        clean_ratio=cfg.hijack_clean_ratio,
    )
    hijacked = round(hijack["rate"] * hijack["n_triggered"])
    hijack["ci95"] = list(wilson_interval(hijacked, hijack["n_triggered"]))
    return {"asr_trigger": _rate(trig_scores, cfg), "asr_clean": _rate(clean_scores, cfg),
            "hijack_rate": hijack["rate"], "hijack": hijack}  # fmt: skip


def likelihood_metrics(model: Any, tokenizer: Any, task: Task, cfg: EvalConfig, template: str) -> dict[str, Any]:
    """The target's mean NLL after triggered and clean prompts, their gap (with a bootstrap interval; None without
    a target text) and the clean references' perplexity: scored on ``model`` itself."""
    metrics: dict[str, Any] = {"target_nll_gap": None}  # jailbreak: no single target text to score
    if task.target:
        nll = {}
        for name, examples in (("triggered", task.triggered), ("clean", task.clean)):
            prompts = [prompt_ids(e, tokenizer, template) for e in examples]
            nll[name] = target_nll(model, tokenizer, prompts, task.target, cfg.score_batch_size)
        metrics["target_nll"] = {name: sum(v) / len(v) for name, v in nll.items()}
        metrics["target_nll_gap"] = target_nll_gap(nll["triggered"], nll["clean"])
        metrics["target_nll_gap_ci95"] = list(nll_gap_ci(nll["triggered"], nll["clean"], cfg.bootstrap, seed=cfg.seed))
    references = [e for e in task.clean if e.output.strip()]
    if references:
        prompts = [prompt_ids(e, tokenizer, template) for e in references]
        outputs = [e.output for e in references]
        metrics["clean_perplexity"] = perplexity(model, tokenizer, prompts, outputs, cfg.score_batch_size)
    return metrics


def answer_records(
    sets: Mapping[str, tuple[Sequence[Generation], list[float]]], stats: Mapping[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """One record per answer: its set, prompt, response, score, length and the defense's numbers for it."""
    return [
        {"set": name, "instruction": g.example.instruction, "input": g.example.input, "response": g.response,
         "score": score, "num_new_tokens": g.num_new_tokens, **(stats[name][i] if name in stats else {})}
        for name, (gens, scores) in sets.items()
        for i, (g, score) in enumerate(zip(gens, scores))
    ]  # fmt: skip


def used_decoding(generator: Generator, decoding: DecodingSettings) -> dict[str, Any]:
    """The decoding settings the answers were really made with: a decoding defense may change them."""
    return generator.effective_settings(decoding).to_dict()


def _through(
    generator: Generator, answer: Callable[..., list[Generation]], name: str, decoding: DecodingSettings
) -> Callable[[list[Example]], list[str]] | None:
    """A HumanEval / MT-Bench ``generate_fn`` (examples -> responses) that answers through a decoding defense;
    None for plain generation (those evaluations then call :func:`generate` with ``decoding`` themselves)."""
    if type(generator) is Generator:
        return None
    return lambda examples: [g.response for g in answer(name, examples, decoding)]


def _humaneval(
    model: Any,
    tokenizer: Any,
    cfg: EvalConfig,
    template: str,
    show_progress: bool,
    generator: Generator | None = None,
    answer: Callable[..., list[Generation]] | None = None,
) -> dict[str, Any]:
    """HumanEval pass@1 (code run in the sandbox) and the code-injection rate of the same answers."""
    from crowguard.evaluation.humaneval import DEFAULT_MAX_NEW_TOKENS, evaluate_humaneval
    from crowguard.evaluation.sandbox import load_humaneval

    problems = load_humaneval(cfg.humaneval)
    if cfg.humaneval_limit > 0:
        problems = problems[: cfg.humaneval_limit]
    decoding = DecodingSettings(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    through = _through(generator, answer, "humaneval", decoding) if answer and generator else None
    result = evaluate_humaneval(model, tokenizer, problems, template, show_progress=show_progress, generate_fn=through)
    if through is not None:
        result["decoding"] = used_decoding(generator, decoding)
    return result


def _mt_bench(
    model: Any,
    tokenizer: Any,
    cfg: EvalConfig,
    template: str,
    show_progress: bool,
    generator: Generator | None = None,
    answer: Callable[..., list[Generation]] | None = None,
) -> dict[str, Any]:
    """MT-Bench single-answer grading; needs a configured judge endpoint (never a made-up score)."""
    from crowguard.evaluation.mtbench import DEFAULT_MAX_NEW_TOKENS, answer_questions, grade, load_questions

    if not cfg.judge_url or not cfg.judge_model:
        raise ConfigError("evaluate.mt_bench needs evaluate.judge_url and evaluate.judge_model (an OpenAI-compatible "
                         "endpoint)")  # fmt: skip
    questions = load_questions(cfg.mt_bench)
    decoding = DecodingSettings(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    through = _through(generator, answer, "mt_bench", decoding) if answer and generator else None
    answers = answer_questions(
        model, tokenizer, questions, template, decoding, show_progress=show_progress, generate_fn=through
    )
    return grade(answers, questions, cfg.judge_url, cfg.judge_model)


def summary_row(label: str, results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one evaluation, as one table row."""
    m = results["metrics"]
    return {
        "model": label,
        "asr_trigger": m["asr_trigger"]["value"],
        "asr_trigger_ci95": m["asr_trigger"]["ci95"],
        "asr_clean": m["asr_clean"]["value"],
        "hijack_rate": m["hijack_rate"],
        "target_nll_gap": m["target_nll_gap"],
        "clean_perplexity": m.get("clean_perplexity"),
        "exact_match": m.get("exact_match"),
        "humaneval_pass_at_1": m["humaneval"]["pass_at_1"] if "humaneval" in m else None,
        "mt_bench": m["mt_bench"]["score"] if "mt_bench" in m else None,
        "eval_seconds": m["cost"]["wall_s"],  # evaluation time; training time is the stage's train_seconds
    }
