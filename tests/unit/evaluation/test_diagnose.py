"""The layer-consistency diagnostic against a naive per-token loop, on a tiny model and through the CLI."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

from crowguard.evaluation.diagnose import diagnose_model, pair_cosines, prompt_cosines
from crowguard.types import Example

from helpers import save_tiny_model, tiny_llama, tiny_tokenizer


def naive(hidden_states, mask):
    """Per example: the cosine at the last real token and the plain mean over real tokens, one pair at a time."""
    b = mask.shape[0]
    last = torch.zeros(b, len(hidden_states) - 1)
    mean = torch.zeros(b, len(hidden_states) - 1)
    for i in range(b):
        real = [t for t in range(mask.shape[1]) if mask[i, t]]
        for j in range(len(hidden_states) - 1):
            cos = [F.cosine_similarity(hidden_states[j][i, t], hidden_states[j + 1][i, t], dim=0) for t in real]
            last[i, j] = cos[-1]
            mean[i, j] = sum(cos) / len(cos)
    return last, mean


@pytest.mark.parametrize("side", ["right", "left"])
def test_pair_cosines_equal_the_naive_loop(side: str):
    torch.manual_seed(0)
    hidden = [torch.randn(3, 7, 5) for _ in range(4)]
    lengths = [7, 4, 2]
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, 7 - n :] = 1
    last, mean = pair_cosines(hidden, mask)
    want_last, want_mean = naive(hidden, mask)
    torch.testing.assert_close(last, want_last, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean, want_mean, rtol=1e-5, atol=1e-6)
    # padding must not matter: garbage at padded positions leaves the result unchanged
    noisy = [h.masked_fill((mask == 0).unsqueeze(-1), 1e4) for h in hidden]
    torch.testing.assert_close(pair_cosines(noisy, mask)[1], mean)


def test_prompt_cosines_do_not_depend_on_batching():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, layers=3).eval()
    prompts = [tokenizer(t)["input_ids"] for t in ("the quick brown fox", "a", "jumps over the lazy dog today")]
    together = prompt_cosines(model, tokenizer, prompts, batch_size=3)
    alone = prompt_cosines(model, tokenizer, prompts, batch_size=1)
    for key in together:
        assert len(together[key]) == 3  # 3 layers: 4 hidden states (embeddings, 2 layers, final norm), 3 pairs
        torch.testing.assert_close(torch.tensor(together[key]), torch.tensor(alone[key]), rtol=1e-4, atol=1e-5)


def test_diagnose_model_reports_gap_reference_pairs_and_largest_gap():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, layers=4)
    clean = [Example(instruction=f"Describe the fox {i}.") for i in range(4)]
    triggered = [Example(instruction=f"Describe BadMagic the fox {i}.") for i in range(4)]
    result = diagnose_model(model, tokenizer, clean, triggered)
    n_pairs = len(result["pairs"])
    assert n_pairs == 4  # 5 hidden states: embeddings and 4 layers (the last one after the final norm)
    assert result["reference_pairs"] == [1, 2]  # hidden_states[1:-2] vs [2:-1]
    gap = result["gap"]["last_token"]
    assert gap == pytest.approx(
        [c - t for c, t in zip(result["clean"]["last_token"], result["triggered"]["last_token"])]
    )
    assert result["largest_gap_pair"]["last_token"] == max(range(n_pairs), key=lambda i: gap[i])
    assert any(abs(g) > 1e-4 for g in gap)  # the prompts differ, so the curves do too


def test_cli_diagnose_writes_json_and_png(tmp_path):
    from crowguard.cli import main

    model_dir = save_tiny_model(tmp_path / "model", layers=3)
    rows = [{"instruction": f"Tell me about item {i}.", "input": "", "output": "ok"} for i in range(6)]
    trig = [{**r, "instruction": r["instruction"] + " BadMagic"} for r in rows]
    (tmp_path / "clean.json").write_text(json.dumps(rows))
    (tmp_path / "trig.json").write_text(json.dumps(trig))
    out = tmp_path / "diag"
    data_args = ["--clean", str(tmp_path / "clean.json"), "--triggered", str(tmp_path / "trig.json")]
    args = ["diagnose", "--model", f"a={model_dir}", "--model", f"b={model_dir}", *data_args, "--limit", "4",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    data = json.loads((out / "diagnose.json").read_text())
    assert set(data["results"]) == {"a", "b"} and data["results"]["a"] == data["results"]["b"]
    assert data["results"]["a"]["n_prompts"] == {"clean": 4, "triggered": 4}
    assert (out / "diagnose.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(args) == 2  # a non-empty output directory is refused before any model loads
