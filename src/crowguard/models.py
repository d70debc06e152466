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


def _is_adapter_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file()


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


def load_model(
    name_or_path: str,
    adapter: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    trainable_adapter: bool = False,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local directory or Hub id, plus an optional LoRA adapter.

    ``name_or_path`` may itself be an adapter directory; its base model is then loaded first. Weights must be
    safetensors unless ``allow_pickle``. An adapter that does not fit the base model raises :class:`ModelLoadError`.
    """
    from transformers import AutoModelForCausalLM

    if _is_adapter_dir(name_or_path):
        if adapter is not None:
            raise ModelLoadError(f"{name_or_path} is an adapter directory; give its base model, not a second adapter")
        # The base may itself be an adapter directory (a defense trained a new LoRA on a merged backdoored
        # adapter): load it recursively and merge it before attaching this adapter.
        base, tokenizer = load_model(
            base_of_adapter(name_or_path), None, dtype, trust_remote_code, allow_pickle, revision
        )
        base = merge_adapter(base)
        model = attach_adapter(base, name_or_path, allow_pickle=allow_pickle, trainable=trainable_adapter)
        return model, tokenizer
    if allow_pickle:
        warnings.warn(f"allow_pickle is set: pickled weights of {name_or_path} may run code when loaded", stacklevel=2)
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=DTYPES[dtype],
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            revision=revision,
        )
    except (OSError, ValueError) as exc:
        hint = ""
        if not allow_pickle and "safetensors" in str(exc).lower():
            hint = " (crowguard loads safetensors only; pass allow_pickle if you trust pickled .bin weights)"
        if "trust_remote_code" in str(exc):
            hint = " (this model needs its own code: pass trust_remote_code only if you trust its repository)"
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {exc}{hint}") from None
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
