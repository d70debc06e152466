"""Loading and saving models as untrusted artefacts: safetensors only by default, no remote code, clear errors.

A model under test may have been downloaded from anywhere; its weights are read with safetensors (no unpickling)
unless the user opts in with ``allow_pickle``, and its repository's Python code never runs unless
``trust_remote_code`` is set. A crowguard adapter directory (``adapter_config.json``) is loaded on top of the base
model it names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


PEFT_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"
"""peft reads this deprecated transformers property on every adapter it wraps (a FutureWarning per model load)."""


@contextlib.contextmanager
def without_peft_deprecation_warning() -> Iterator[None]:
    """A ``with`` block in which only that one FutureWarning is silenced (other warnings keep their filters)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
        yield


class ModelLoadError(ValueError):
    """A model, tokenizer or adapter that cannot be loaded as asked; the message says what to do."""


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
"""``owner/name`` or ``name``, as the Hub accepts them; anything else can only be a local path."""


def _hub_offline() -> bool:
    """Whether Hub look-ups are switched off (``HF_HUB_OFFLINE``, read now, or as huggingface_hub read it)."""
    import huggingface_hub

    flag = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    offline = getattr(huggingface_hub, "is_offline_mode", lambda: huggingface_hub.constants.HF_HUB_OFFLINE)
    return flag.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(offline())


def _is_hub_id(ref: str) -> bool:
    return len(ref) <= 96 and "--" not in ref and ".." not in ref and _HUB_ID.fullmatch(ref) is not None


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "adapter_config.json"):
        try:
            if isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str):
                return True
        except ValueError:  # a name the cache layer rejects
            return False
    return False


def local_path(ref: str) -> str:
    """``ref`` with a leading ``~`` expanded (a YAML config gets no shell expansion); other refs unchanged."""
    return os.path.expanduser(ref) if ref.startswith("~") else ref


def check_model_exists(name_or_path: str, adapter: str | None = None, revision: str | None = None) -> None:
    """Fail fast, before any weights load, on a model or adapter that is not there: "model path X does not exist".

    A ref that exists locally is fine. One that cannot be a Hub id (``./x``, ``/x``, ``~/x``, ``a/b/c``) or that is
    neither local nor in the Hub cache while offline is a missing path; a valid Hub id with the Hub reachable is left
    to ``from_pretrained``, so Hub models keep working for users with internet.
    """
    if not name_or_path:
        raise ModelLoadError("no model given: pass --model (a local directory or Hub id)")
    path = local_path(name_or_path)
    if not Path(path).exists():
        if name_or_path.startswith((".", "/", "~")) or not _is_hub_id(name_or_path):
            raise ModelLoadError(f"model path {name_or_path!r} does not exist")
        if _hub_offline() and not _in_hub_cache(name_or_path, revision):
            raise ModelLoadError(
                f"model path {name_or_path!r} does not exist (and it is not in the Hub cache; HF_HUB_OFFLINE is set, "
                "so the Hub is not asked)"
            )
    elif Path(path).is_file():
        raise ModelLoadError(f"model path {name_or_path!r} is a file; give the model's directory")
    elif Path(path).is_dir() and not any((Path(path) / name).is_file() for name in MODEL_MARKERS):
        markers = ", ".join(MODEL_MARKERS)
        raise ModelLoadError(f"model path {name_or_path!r} is not a model directory (it has none of {markers})")
    if adapter is not None and not Path(local_path(adapter)).exists():
        raise ModelLoadError(f"adapter path {adapter!r} does not exist")


# What makes a local directory loadable: a model (config.json), a LoRA adapter, or a decoding defense's spec.
MODEL_MARKERS = ("config.json", "adapter_config.json", "defense.json")


def is_adapter_dir(path: str | Path) -> bool:
    """A LoRA adapter directory (``adapter_config.json``, no ``config.json``), loadable as a model on its base."""
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file()


def arrives_with_adapter(name_or_path: str | Path, adapter: str | None = None) -> bool:
    """Whether a model comes with a LoRA adapter: a separate ``adapter``, or an adapter directory as the model."""
    return adapter is not None or is_adapter_dir(name_or_path)


def _check_adapter_files(adapter: Path, allow_pickle: bool) -> None:
    if (adapter / "adapter_model.safetensors").is_file():
        return
    if (adapter / "adapter_model.bin").is_file():
        if not allow_pickle:
            raise ModelLoadError(
                f"{adapter}: the adapter is stored as a pickle (adapter_model.bin), which can run code when loaded; "
                "convert it to safetensors or pass allow_pickle (model.allow_pickle=true) if you trust it"
            )
        warnings.warn(f"loading pickled adapter weights from {adapter} (allow_pickle is set)", stacklevel=3)
        return
    raise ModelLoadError(f"{adapter}: no adapter_model.safetensors in the adapter directory")


def base_of_adapter(adapter: str | Path) -> str:
    """The base model an adapter directory was trained on (``base_model_name_or_path``)."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{adapter}: adapter_config.json names no base model; pass the base model explicitly")
    return str(base)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The model's tokenizer with a pad token (the EOS token when the model defines none) and right padding."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {name_or_path!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"{name_or_path}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def resolve_device(requested: str = "auto") -> Any:
    """The torch device a stage that runs the model itself (evaluation, diagnosis) puts it on.

    ``auto``: this process's GPU when CUDA is available (``cuda:LOCAL_RANK`` under torchrun), else the CPU; any
    other value is a torch device string. Training stages leave placement to the Trainer, which does the same.
    """
    import torch

    if requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError as exc:
            raise ModelLoadError(f"model.device {requested!r}: not a torch device ({exc})") from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (device.index or 0) >= count:
                raise ModelLoadError(f"model.device {requested!r}: this machine has {count} CUDA device(s)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def check_4bit() -> None:
    """Refuse QLoRA, before any model loads, where bitsandbytes' 4-bit kernels cannot run (no CUDA, no package)."""
    import importlib.util

    import torch

    from crowguard.config import ConfigError

    if not torch.cuda.is_available():
        raise ConfigError("train.quantize_base 4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do not "
                          "run on this machine, which has none; use quantize_base none")  # fmt: skip
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("train.quantize_base 4bit (QLoRA) needs the bitsandbytes package: pip install bitsandbytes")


def four_bit_config() -> Any:
    """QLoRA's base quantization (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): NF4 weights, double
    quantization of the scales, bfloat16 compute."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip


def load_model(
    name_or_path: str,
    adapter: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    trainable_adapter: bool = False,
    device: str | None = None,
    quantize_4bit: bool = False,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local directory or Hub id, plus an optional LoRA adapter.

    ``name_or_path`` may itself be an adapter directory; its base model is then loaded first. Weights must be
    safetensors unless ``allow_pickle``. An adapter that does not fit the base model raises :class:`ModelLoadError`.
    ``device`` (see :func:`resolve_device`; None: where transformers puts it, the CPU) is where the model ends up.
    ``quantize_4bit`` loads the base in 4-bit NF4 (QLoRA, :func:`four_bit_config`) on this process's GPU.
    """
    if quantize_4bit:
        check_4bit()
    model, tokenizer = _load_model(
        name_or_path, adapter, dtype, trust_remote_code, allow_pickle, revision, trainable_adapter, quantize_4bit
    )
    if device is not None and not quantize_4bit:  # a 4-bit model is placed when it loads
        model = model.to(resolve_device(device))
    first = next(model.parameters())
    if first.dtype == torch.bfloat16:
        from crowguard.speed import warn_if_slow_bfloat16

        # no device given: a training run's Trainer moves the model to the GPU when there is one
        runs_on = first.device if device is not None or not torch.cuda.is_available() else torch.device("cuda")
        warn_if_slow_bfloat16(f"model.dtype {dtype} loaded {name_or_path} in bfloat16", runs_on)
    return model, tokenizer


def _load_model(
    name_or_path: str,
    adapter: str | None,
    dtype: str,
    trust_remote_code: bool,
    allow_pickle: bool,
    revision: str | None,
    trainable_adapter: bool,
    quantize_4bit: bool = False,
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    check_model_exists(name_or_path, adapter, revision)
    name_or_path = local_path(name_or_path)
    adapter = local_path(adapter) if adapter is not None else None
    if is_adapter_dir(name_or_path):
        if adapter is not None:
            raise ModelLoadError(f"{name_or_path} is an adapter directory; give its base model, not a second adapter")
        base_ref = base_of_adapter(name_or_path)
        try:
            check_model_exists(base_ref, revision=revision)
        except ModelLoadError as exc:
            named_in = Path(name_or_path) / "adapter_config.json"
            raise ModelLoadError(f"{exc} (the base model named in {named_in})") from None
        # The base may itself be an adapter directory (a defense trained a new LoRA on a merged backdoored
        # adapter): load it recursively and merge it before attaching this adapter.
        if quantize_4bit and is_adapter_dir(local_path(base_ref)):
            raise ModelLoadError(f"{name_or_path}: its base {base_ref} is itself an adapter, which would have to be "
                                 "merged into 4-bit weights; merge it into a full-precision model first")  # fmt: skip
        base, tokenizer = _load_model(
            base_ref, None, dtype, trust_remote_code, allow_pickle, revision, False, quantize_4bit
        )
        base = merge_adapter(base)
        model = attach_adapter(base, name_or_path, allow_pickle=allow_pickle, trainable=trainable_adapter)
        return model, tokenizer
    if allow_pickle:
        warnings.warn(f"allow_pickle is set: pickled weights of {name_or_path} may run code when loaded", stacklevel=2)
    if trust_remote_code:
        warnings.warn(f"trust_remote_code is set: the Python files in {name_or_path} (or its Hub repository) run with "
                      "your rights while it loads; only for a model whose code you trust", stacklevel=2)  # fmt: skip
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        placement: dict[str, Any] = {}
        if quantize_4bit:  # bitsandbytes quantizes while loading, onto this process's GPU
            placement = {"quantization_config": four_bit_config(), "device_map": {"": resolve_device("auto").index}}
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=DTYPES[dtype],
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            revision=revision,
            **placement,
        )
    except Exception as exc:
        if not isinstance(exc, (OSError, ValueError)) and type(exc).__name__ != "SafetensorError":
            raise
        hint = ""
        if not allow_pickle and "safetensors" in str(exc).lower():
            hint = " (crowguard loads safetensors only; pass allow_pickle if you trust pickled .bin weights)"
        if "trust_remote_code" in str(exc):
            hint = " (this model needs its own code: pass trust_remote_code only if you trust its repository)"
        message = " ".join(str(exc).split())  # transformers' Hub errors span lines; the CLI prints one
        if not Path(name_or_path).exists():  # a Hub id that failed (no network, no such repo, gated)
            raise ModelLoadError(
                f"model path {name_or_path!r} does not exist, and as a Hub id it failed: {message}{hint}"
            ) from None
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {message}{hint}") from None
    tokenizer = load_tokenizer(name_or_path, trust_remote_code, revision)
    if adapter is not None:
        model = attach_adapter(model, adapter, allow_pickle=allow_pickle, trainable=trainable_adapter)
    return model, tokenizer


def attach_adapter(model: Any, adapter: str | Path, allow_pickle: bool = False, trainable: bool = False) -> Any:
    """Load a LoRA adapter onto ``model``; a shape or module mismatch becomes a :class:`ModelLoadError`."""
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter}: not an adapter directory (no adapter_config.json)")
    _check_adapter_files(adapter, allow_pickle)
    try:
        with without_peft_deprecation_warning():
            warnings.simplefilter("error", UserWarning)  # peft warns (not raises) on missing/unexpected keys
            return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError, UserWarning) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"adapter {adapter} does not fit the base model: {first}") from None


def merge_adapter(model: Any) -> Any:
    """Merge a LoRA adapter into its base weights (a no-op for a plain model)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def save_model(model: Any, tokenizer: Any, out_dir: Path, base_name_or_path: str | None = None) -> str:
    """Save a full model or a LoRA adapter (safetensors) with the tokenizer; returns ``"adapter"`` or ``"model"``.

    An adapter records ``base_model_name_or_path`` so :func:`load_model` can find its base again.
    """
    from peft import PeftModel

    out_dir = Path(out_dir)
    model = getattr(model, "module", model)  # unwrap DDP
    if isinstance(model, PeftModel):
        model.save_pretrained(out_dir, safe_serialization=True)
        if base_name_or_path:
            config_path = out_dir / "adapter_config.json"
            config = json.loads(config_path.read_text())
            local = Path(base_name_or_path)
            config["base_model_name_or_path"] = str(local.resolve()) if local.exists() else str(base_name_or_path)
            config_path.write_text(json.dumps(config, indent=2) + "\n")
        kind = "adapter"
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
        kind = "model"
    tokenizer.save_pretrained(out_dir)
    return kind
