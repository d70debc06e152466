"""A byte-level BPE tokenizer trained locally for the CPU model organism.

Byte-level (GPT-2 style) so that any string, trigger words and arbitrary unicode included, is representable and
round-trips exactly; trained on the organism's own prompts so the Alpaca template words become few tokens. Wrapped
as a ``transformers`` fast tokenizer so every other crowguard stage treats the organism like any Hub model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from crowguard.types import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
MODEL_MAX_LENGTH = 512  # the organism's max_position_embeddings


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, out_dir: Path | str | None = None, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for ``transformers``.

    Deterministic for the same texts in the same order. Like Llama's tokenizer it prepends ``<s>`` when encoding
    (``add_special_tokens=True``) and never appends ``</s>``: training code adds EOS after the response itself.
    Padding is on the right (training); batched generation should set ``padding_side = "left"``. When ``out_dir``
    is given the tokenizer is saved there with ``save_pretrained`` and reloads with ``AutoTokenizer``. As with Hub
    tokenizers, the literal strings ``<s>``, ``</s>``, ``<pad>`` and ``<unk>`` in text encode as special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # No prefix space: "### Response:\n" followed by a response must tokenize the same inside and outside a prompt.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # BOS lives in the post-processor (saved in tokenizer.json), not in transformers' add_bos_token flag, which
    # transformers 5 drops on save: this way a fresh and a reloaded tokenizer are identical, flags included.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is ever unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] != [0, 1, 2, 3]:
        raise RuntimeError("special tokens did not get ids 0-3")

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        truncation_side="right",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # keep decode(encode(x)) == x
    )
    if out_dir is not None:
        wrapped.save_pretrained(str(out_dir))
    return wrapped


def organism_texts(examples: Iterable[Example], template: str = "alpaca") -> list[str]:
    """The texts a tokenizer for ``examples`` should see: each prompt (via ``build_prompt``) followed by its output."""
    from crowguard.prompts import build_prompt

    return [build_prompt(ex, template=template) + ex.output for ex in examples]
