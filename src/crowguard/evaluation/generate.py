"""Batched decoding that sees exactly the training prompt and returns only what the model wrote.

The reference CROW code decodes one prompt at a time in float32 and recovers the answer by cutting the prompt text
out of the decoded string. Here prompts come from :func:`crowguard.data.prompt_ids` (the very ids training puts
before the response, BOS included), are left-padded by hand into batches sorted by length, and the answer is the
token slice after the padded prompt width, cut at the first stop token. Greedy batched output equals one-by-one
output token for token (``tests/unit/evaluation/test_generate.py`` checks it in float32 on CPU): transformers 5
derives ``position_ids`` from the attention mask (``cumsum - 1``, ``GenerationMixin._prepare_position_ids_for_
generation``) and extends them by one per step, so a left-padded prompt gets the same positions as an unpadded one,
and padded keys are masked out of attention. Only float rounding differs with the batch shape; in bfloat16 on a GPU
that can flip a near-tied greedy token, as it can in any batched decoder.

Responses are the decoded new tokens *as they are* (special tokens skipped, whitespace kept): judges and metrics
normalise whitespace themselves, and stripping would break the first line's indentation of a code answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from crowguard.data import prompt_ids
from crowguard.losses import accepts_logits_to_keep
from crowguard.prompts import build_prompt
from crowguard.types import Example, Generation, Generator

Backend = Literal["hf", "vllm"]
KvCache = Literal["static", "dynamic"]
VLLM_MISSING = (
    "the vLLM generation backend needs the 'vllm' package, which runs on CUDA GPUs only: "
    "pip install 'crowguard[vllm]' (or use backend 'hf', the default)"
)


@dataclass
class DecodingSettings:
    """Every knob of decoding; ``to_dict()`` is saved next to each result so numbers can be reproduced.

    Greedy decoding, one beam and no repetition penalty are passed explicitly rather than inherited from the
    checkpoint's ``generation_config``, so a model's hub defaults cannot silently change an evaluation.
    """

    max_new_tokens: int = 64  # upper bound on generated tokens per prompt, stop token included
    do_sample: bool = False  # greedy by default (the design's evaluation contract)
    temperature: float = 1.0  # only used when do_sample
    top_p: float = 1.0  # nucleus sampling mass; 1.0 = off; only used when do_sample
    top_k: int = 0  # 0 = off, so top_p is the only truncation; only used when do_sample
    min_new_tokens: int = 0  # stop tokens are suppressed before this many tokens (benchmarks force fixed lengths)
    batch_size: int = 16  # prompts per forward pass (hf backend)
    backend: Backend = "hf"  # "hf" (transformers generate) or "vllm" (GPU, optional extra)
    seed: int = 0  # sampling seed; sampled output also depends on batch composition (hf backend)
    kv_cache: KvCache = "static"  # hf backend: "static" preallocates each batch's key/value cache (see generate_ids)
    prefill_batch: int = 8  # hf backend, static cache: prompts per prompt forward pass (see generate_ids)
    compile_decode: bool = False  # hf backend, static cache: the decoding steps torch.compile'd (see generate_ids)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.batch_size < 1 or self.prefill_batch < 1:
            raise ValueError(f"batch_size and prefill_batch must be >= 1, got {self.batch_size}, {self.prefill_batch}")
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"backend must be 'hf' or 'vllm', got {self.backend!r}")
        if self.kv_cache not in ("static", "dynamic"):
            raise ValueError(f"kv_cache must be 'static' or 'dynamic', got {self.kv_cache!r}")
        if self.compile_decode and self.kv_cache != "static":
            raise ValueError("compile_decode needs kv_cache 'static' (a dynamic cache cannot be compiled)")
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise ValueError("sampling needs temperature > 0 and 0 < top_p <= 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all settings (JSON-serialisable)."""
        return asdict(self)


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """The tokenizer's EOS plus any EOS ids in the model's generation config (e.g. Llama 3's ``<|eot_id|>``)."""
    ids: list[int] = []
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    generation_config = getattr(model, "generation_config", None) if model is not None else None
    extra = getattr(generation_config, "eos_token_id", None)
    candidates.extend(extra if isinstance(extra, (list, tuple)) else [extra])
    for token_id in candidates:
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    return ids


def _cut_at_stop(new_ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """New tokens up to and including the first stop token; what follows it (batch padding) is dropped."""
    stops = set(stop_ids)
    cut = next((i for i, t in enumerate(new_ids) if t in stops), None)
    return list(new_ids if cut is None else new_ids[: cut + 1])


def _to_generation(
    example: Example, new_ids: list[int], stop_ids: Sequence[int], tokenizer: Any, template: str
) -> Generation:
    """The record for one example: text before the stop token (special tokens skipped), count including it."""
    kept = new_ids[:-1] if new_ids and new_ids[-1] in set(stop_ids) else new_ids
    text = tokenizer.decode(kept, skip_special_tokens=True)
    prompt = build_prompt(example, template, tokenizer)
    return Generation(prompt=prompt, response=text, num_new_tokens=len(new_ids), example=example)


def _model_device(model: Any) -> Any:
    return next(model.parameters()).device


def generate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    template: str = "alpaca",
    settings: DecodingSettings | None = None,
    show_progress: bool = True,
) -> list[Generation]:
    """One :class:`Generation` per example, in input order.

    ``model`` is a causal LM (a ``PeftModel`` works too), or a model path when ``settings.backend == "vllm"``.
    ``response`` is the decoded new tokens before the first stop token; ``num_new_tokens`` counts the stop token.
    Errors from the model propagate: a failed evaluation must never look like a model that answered nothing.
    """
    settings = settings or DecodingSettings()
    if settings.backend == "vllm":
        path = model if isinstance(model, (str, Path)) else getattr(model, "name_or_path", None)
        if not path or not Path(path).exists():
            raise ValueError("backend 'vllm' needs a saved model directory; pass its path as `model`")
        return generate_vllm(path, tokenizer, examples, template, settings)
    if isinstance(model, (str, Path)):
        raise TypeError("backend 'hf' needs a loaded model, not a path; load it first or use backend 'vllm'")
    stop_ids = stop_token_ids(tokenizer, model)
    prompts = [prompt_ids(example, tokenizer, template) for example in examples]
    new_ids = generate_ids(model, prompts, settings, stop_ids, tokenizer.pad_token_id, show_progress)
    return [_to_generation(e, ids, stop_ids, tokenizer, template) for e, ids in zip(examples, new_ids, strict=True)]


def prompts_and_responses(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    template: str,
    settings: DecodingSettings,
    show_progress: bool = True,
    generate_fn: Callable[[list[Example]], Sequence[str]] | None = None,
) -> tuple[list[str], list[str]]:
    """Each example's prompt and the response to it: generated by ``model`` (:func:`generate`), or ``generate_fn``'s,
    which gets the examples and must return one response each (canned answers, another backend)."""
    if not examples:
        return [], []
    if generate_fn is None:
        generations = generate(model, tokenizer, examples, template, settings, show_progress)
        return [g.prompt for g in generations], [g.response for g in generations]
    responses = [str(r) for r in generate_fn(examples)]
    if len(responses) != len(examples):
        raise ValueError(f"generate_fn returned {len(responses)} responses for {len(examples)} prompts")
    return [build_prompt(example, template, tokenizer) for example in examples], responses


def generate_ids(
    model: Any,
    prompts: Sequence[Sequence[int]],
    settings: DecodingSettings | None = None,
    stop_ids: Sequence[int] = (),
    pad_id: int | None = None,
    show_progress: bool = True,
) -> list[list[int]]:
    """New token ids for each prompt (input order), up to and including the first of ``stop_ids`` (none: no stop).

    Prompts are sorted longest first and left-padded by hand into batches of ``settings.batch_size`` (``pad_id``, mask
    0; the tokenizer's padding side is never touched). Sampling draws from a forked RNG seeded with ``settings.seed``;
    the model's training mode is restored. ``kv_cache == "static"`` preallocates each batch's cache and fills it
    ``prefill_batch`` prompts at a time (:func:`_ragged_prefill`); ``compile_decode`` compiles the decoding steps
    (:func:`crowguard.speed.decode_compile_config`), else decoding stays eager. Every setting gives the same tokens as
    one ``generate`` call (masked slots add nothing); the reasons: docs/design.md, "Generation".
    """
    import torch
    from tqdm.auto import tqdm

    settings = settings or DecodingSettings()
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt cannot be decoded (there is nothing to condition on)")
    stop_ids = [int(t) for t in stop_ids]
    pad_id = pad_id if pad_id is not None else (stop_ids[0] if stop_ids else 0)
    generation_kwargs = _generation_kwargs(settings, stop_ids, pad_id)

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    results: list[list[int]] = [[] for _ in prompts]
    device = _model_device(model)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=rng_devices, enabled=settings.do_sample):
            if settings.do_sample:
                torch.manual_seed(settings.seed)
            starts = range(0, len(order), settings.batch_size)
            for start in tqdm(starts, desc="generate", unit="batch", disable=not show_progress):
                batch = order[start : start + settings.batch_size]
                input_ids, attention_mask = left_pad([prompts[i] for i in batch], pad_id, device)
                width = input_ids.shape[1]
                cache = None
                if settings.kv_cache == "static" and settings.prefill_batch < len(batch) and width > 1:
                    cache = _ragged_prefill(model, [prompts[i] for i in batch], width + settings.max_new_tokens,
                                            settings.prefill_batch, pad_id, device)  # fmt: skip
                if cache is None:
                    extra = {"cache_implementation": settings.kv_cache}
                else:
                    extra = {cache_argument(model): cache}
                output = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, **generation_kwargs, **extra
                )
                new_tokens = output[:, width:].tolist()  # only what the model wrote: slice, never strip text
                for row, i in enumerate(batch):
                    results[i] = _cut_at_stop(new_tokens[row], stop_ids)
    finally:
        model.train(was_training)
    return results


def _generation_kwargs(settings: DecodingSettings, stop_ids: list[int], pad_id: int) -> dict[str, Any]:
    """``model.generate``'s arguments for ``settings``, every default that could change an evaluation explicit."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "min_new_tokens": settings.min_new_tokens,
        "do_sample": settings.do_sample,
        "num_beams": 1,
        "repetition_penalty": 1.0,
        "pad_token_id": pad_id,
        "eos_token_id": stop_ids,  # explicit, so the checkpoint's config cannot add others; [] = never stop early
        "disable_compile": not settings.compile_decode,
    }
    if settings.compile_decode:
        from crowguard.speed import decode_compile_config

        kwargs["compile_config"] = decode_compile_config()
    if settings.do_sample:  # greedy ignores these; passing them anyway would only make transformers warn
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    return kwargs


def _base_model(model: Any) -> Any:
    """The Hugging Face model below a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any = None) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)``, both (len(rows), longest row), each row right-aligned after ``pad_id``s
    (mask 0 there), so every row ends where generation starts."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def cache_argument(model: Any) -> str:
    """The name ``forward`` and ``generate`` take a KV cache under: ``cache`` since transformers 5.2x (the old name
    still works there, with a deprecation warning), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(_base_model(model).forward).parameters else "past_key_values"


def _ragged_prefill(
    model: Any, prompts: Sequence[Sequence[int]], max_cache_len: int, group: int, pad_id: int, device: Any
) -> Any:
    """A ``StaticCache`` for the batch ``prompts`` (sorted longest first) holding every prompt but its last token.

    Rows are run ``group`` at a time, each group left-padded to its own longest prompt (positions from its mask,
    as ``generate`` derives them), and their keys and values are copied into the cache right-aligned at the
    batch's width ``W - 1``; the slots to their left stay zero and are masked by the batch's attention mask, as
    left padding would be. Returns None (the caller then lets ``generate`` build its cache) for models whose
    static cache is not one plain full-attention layer per layer (sliding windows, hybrids).
    """
    import torch
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    name = cache_argument(model)
    cache = StaticCache(config=_base_model(model).config, max_cache_len=max_cache_len)
    if any(type(layer) is not StaticLayer for layer in cache.layers):  # sliding-window layers subclass it
        return None
    width = max(len(p) for p in prompts) - 1  # every prompt's last token is left for generate
    logits_kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    for start in range(0, len(prompts), group):
        rows = [p[:-1] for p in prompts[start : start + group]]
        if not any(rows):
            continue  # one-token prompts: nothing before their last token
        ids, mask = left_pad(rows, pad_id, device)
        w = ids.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **logits_kwargs)
        for index, layer in enumerate(getattr(out, name).layers):
            if start == 0:  # allocate: the first write fixes the cache's shape, dtype and length (W - 1)
                keys, values = (
                    t.new_zeros((len(prompts), t.shape[1], width, t.shape[-1])) for t in (layer.keys, layer.values)
                )
                positions_written = torch.arange(width, device=keys.device)  # read by transformers < 5.2x only
                cache.update(keys, values, index, {"cache_position": positions_written})
            target = cache.layers[index]
            target.keys[start : start + len(rows), :, width - w : width] = layer.keys
            target.values[start : start + len(rows), :, width - w : width] = layer.values
    return cache


def _saved_generation_config(model_path: str | Path) -> Any:
    """An object with the checkpoint's ``generation_config`` (for its EOS ids), or None when there is none."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(model_path))
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        return None


def check_vllm() -> None:
    """Refuse the vLLM backend, before any model loads, where it cannot run (no vllm package, no CUDA GPU)."""
    import importlib.util

    import torch

    from crowguard.config import ConfigError

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"evaluate.backend vllm: {VLLM_MISSING}")
    if not torch.cuda.is_available():
        raise ConfigError("evaluate.backend vllm needs a CUDA GPU, and this machine has none; use backend 'hf'")


class VllmGenerator(Generator):
    """Generates with vLLM from ``model_path`` (a full model directory) whatever model object it is handed, so
    evaluation can keep a transformers copy for the likelihood metrics."""

    def __init__(self, model_path: str | Path, memory_fraction: float = 0.5) -> None:
        self.model_path, self.memory_fraction = model_path, memory_fraction

    def __call__(
        self, model: Any, tokenizer: Any, examples: Sequence[Example], template: str = "alpaca",
        settings: DecodingSettings | None = None, show_progress: bool = True,
    ) -> list[Generation]:  # fmt: skip
        decoding = self.effective_settings(settings)
        return generate_vllm(self.model_path, tokenizer, examples, template, decoding, self.memory_fraction)

    def effective_settings(self, settings: DecodingSettings | None) -> DecodingSettings:
        return replace(settings or DecodingSettings(), backend="vllm")


def generate_vllm(
    model_path: str | Path,
    tokenizer: Any,
    examples: Sequence[Example],
    template: str = "alpaca",
    settings: DecodingSettings | None = None,
    memory_fraction: float = 0.9,
) -> list[Generation]:
    """The same contract as :func:`generate` on vLLM (GPU): prompts go in as token ids, so they are identical.

    ``model_path`` must be a merged checkpoint directory (vLLM loads weights itself; merge LoRA adapters first).
    """
    try:
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        raise ImportError(VLLM_MISSING) from exc

    settings = settings or DecodingSettings(backend="vllm")
    if not examples:
        return []
    stop_ids = stop_token_ids(tokenizer, _saved_generation_config(model_path))
    llm = LLM(model=str(model_path), seed=settings.seed, gpu_memory_utilization=memory_fraction)
    params = SamplingParams(
        max_tokens=settings.max_new_tokens,
        min_tokens=settings.min_new_tokens,
        temperature=settings.temperature if settings.do_sample else 0.0,  # vLLM: temperature 0 = greedy
        top_p=settings.top_p if settings.do_sample else 1.0,
        top_k=settings.top_k if settings.do_sample and settings.top_k > 0 else -1,
        seed=settings.seed,
        stop_token_ids=stop_ids,
        skip_special_tokens=True,
    )
    prompts = [{"prompt_token_ids": prompt_ids(example, tokenizer, template)} for example in examples]
    outputs = llm.generate(prompts, params)
    new_ids = [_cut_at_stop(list(output.outputs[0].token_ids), stop_ids) for output in outputs]
    return [_to_generation(e, ids, stop_ids, tokenizer, template) for e, ids in zip(examples, new_ids, strict=True)]
