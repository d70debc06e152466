"""The model organism's architecture: a tiny Llama, randomly initialised, sized to train on two CPU cores.

A real ``LlamaForCausalLM`` (not a toy module) so that every crowguard stage (LoRA, CROW's hidden-state loss,
generation, saving) runs on the organism exactly as on a Hub model. Sizes follow docs/design.md: "small" is
organism A (hidden 128, 4 layers, ~1.3M parameters with a 4,096-token vocabulary), on which CROW's effect was seen;
"deep" and "wide" are the variants on which the paper's defaults stopped working.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase


@dataclass(frozen=True)
class OrganismSize:
    """Llama shape of one organism preset (head size = hidden_size / num_heads)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int


SIZES: dict[str, OrganismSize] = {
    "tiny": OrganismSize(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128),  # unit tests only
    "small": OrganismSize(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=344),  # organism A
    "deep": OrganismSize(hidden_size=128, num_layers=8, num_heads=4, intermediate_size=344),
    "wide": OrganismSize(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=688),
}
MAX_POSITION_EMBEDDINGS = 512


def resolve_size(size: str | OrganismSize) -> OrganismSize:
    """Look a preset up by name (or pass an ``OrganismSize`` through), with the valid names in the error."""
    if isinstance(size, OrganismSize):
        return size
    if size not in SIZES:
        raise ValueError(f"unknown organism size {size!r}; choose one of {', '.join(SIZES)}")
    return SIZES[size]


def build_model(
    tokenizer: PreTrainedTokenizerBase,
    size: str | OrganismSize = "small",
    seed: int = 0,
    max_position_embeddings: int = MAX_POSITION_EMBEDDINGS,
    **config_overrides: Any,
) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` for ``tokenizer`` (vocabulary and special ids taken from it).

    Initialisation is seeded without touching the global torch RNG. Input and output embeddings are tied, which
    halves the parameter count at this scale. ``config_overrides`` go to ``LlamaConfig`` (e.g. ``rms_norm_eps``).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = resolve_size(size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **config_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in params.values())


def size_table(vocab_size: int = 4096) -> dict[str, dict[str, int]]:
    """Shape and parameter count of every preset for a given vocabulary, for the README and ``crowguard ls``."""
    table = {}
    for name, shape in SIZES.items():
        per_layer = 4 * shape.hidden_size**2 + 3 * shape.hidden_size * shape.intermediate_size + 2 * shape.hidden_size
        total = vocab_size * shape.hidden_size + shape.num_layers * per_layer + shape.hidden_size
        table[name] = {**asdict(shape), "parameters": total}
    return table
