"""The one prompt builder used for backdoor training, defense training and evaluation alike.

The reference CROW code trains with the Alpaca template but evaluates on the raw instruction and drops ``input``;
crowguard routes every stage through :func:`build_prompt` so the model always sees the same format.
"""

from __future__ import annotations

from typing import Any, Literal

from crowguard.types import Example

Template = Literal["alpaca", "chat", "raw"]
TEMPLATES: tuple[str, ...] = ("alpaca", "chat", "raw")

# Stanford Alpaca's templates, as used by the CROW paper and BackdoorLLM.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def build_prompt(example: Example, template: str = "alpaca", tokenizer: Any = None) -> str:
    """Return the prompt text (everything the model sees before its response) for ``example``.

    ``alpaca``: the Stanford Alpaca template (paper parity). ``chat``: the tokenizer's own chat template with one
    user turn (instruction and input joined by a blank line) and the generation prompt appended. ``raw``: the
    instruction (and input) alone, for base models probed without a template.
    """
    if template == "alpaca":
        if example.input:
            return ALPACA_WITH_INPUT.format(instruction=example.instruction, input=example.input)
        return ALPACA_NO_INPUT.format(instruction=example.instruction)
    user = example.instruction if not example.input else f"{example.instruction}\n\n{example.input}"
    if template == "raw":
        return user
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            from crowguard.config import ConfigError

            raise ConfigError("template 'chat' needs a tokenizer with a chat_template, and this model's has none; use "
                              "template 'alpaca' instead")  # fmt: skip
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")
