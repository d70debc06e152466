"""One prepared GPU check (about 10 minutes on one GPU): what crowguard's GPU path costs and whether it is used.

(a) CROW vs SFT: time per optimizer step and peak memory on a 7B-shaped Llama with random weights in bf16 (LoRA
    r 8 on every linear layer, batch 2 x accumulation 4, 256 tokens), gradient checkpointing on and off, through
    crowguard's own losses; and the projected time of the paper's run (100 samples x 5 epochs = 63 optimizer steps;
    the paper: 2.20 min on one A100 for Llama-2-7B).
(b) HF vs vLLM generation on a small random-weight model: identical greedy outputs and the speed ratio (skipped,
    with the reason, where vLLM or CUDA is missing).
(c) That evaluation places the model on CUDA (``models.load_model(..., device="auto")``).
(d) QLoRA: two CROW steps on the small model's base in 4-bit NF4 through the real training stage (skipped, with
    the reason, where CUDA or bitsandbytes is missing).

It needs no network and no files beyond the repository (random weights, generated tokens and a tokenizer trained
in-process), runs with the repository on ``PYTHONPATH`` on a machine whose packages are not the project's pins, and
prints a table (``--json`` also writes it). ``--tiny`` runs every part on tiny shapes, on the CPU when there is no
GPU: the tests run it that way.

    PYTHONPATH=src python benchmarks/gpu_check.py --json gpu_check.json
    PYTHONPATH=src python benchmarks/gpu_check.py --tiny
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SEVEN_B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000}  # fmt: skip
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 512}  # fmt: skip
PAPER_STEPS = 63  # 100 samples x 5 epochs / (2 x 4), rounded up
PAPER_MINUTES = 2.20


def _device() -> Any:
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _llama(shape: dict[str, int], dtype: Any, device: Any, checkpointing: bool) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in bf16 directly: a 7B model in float32 first would need 28 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def step_costs(shape: dict[str, int], seq_len: int, steps: int, warmup: int) -> list[dict[str, Any]]:
    """(a): median seconds per optimizer step (2 x 4 micro-batches) and peak memory, SFT vs CROW, GC off/on."""
    import torch

    from crowguard.losses import crow_loss, masked_lm_loss

    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for checkpointing in (False, True):
        model = _llama(shape, dtype, device, checkpointing)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, shape["vocab_size"], (4, 2, seq_len), generator=generator).to(device)
        labels = ids.clone()
        labels[..., : seq_len // 2] = -100  # a masked prompt half
        mask = torch.ones_like(ids)
        for method in ("sft", "crow"):
            times = []
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            for step in range(warmup + steps):
                start = time.perf_counter()
                for micro in range(4):
                    if method == "sft":
                        logits = model(input_ids=ids[micro], attention_mask=mask[micro], use_cache=False).logits
                        loss = masked_lm_loss(logits, labels[micro])
                    else:
                        loss, _ = crow_loss(model, ids[micro], mask[micro], labels[micro], alpha=5.5, epsilon=0.1)
                    (loss / 4).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if step >= warmup:
                    times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            seconds = statistics.median(times)
            rows.append({"method": method, "checkpointing": checkpointing, "s_per_step": seconds, "peak_gib": peak,
                         "paper_run_min": seconds * PAPER_STEPS / 60})  # fmt: skip
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _saved_small_model(root: Path) -> Path:
    """A small random Llama with an in-process BPE tokenizer, saved as a model directory (vLLM loads from disk)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(["Explain the river and the garden in a short answer, please."] * 8, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root, safe_serialization=True)
    tokenizer.save_pretrained(root)
    return root


def generation_check(root: Path, n_prompts: int) -> dict[str, Any]:
    """(b): greedy outputs of the HF and vLLM backends on the same prompts, and their speed."""
    import torch

    from crowguard.evaluation.generate import DecodingSettings, generate
    from crowguard.models import load_model
    from crowguard.types import Example

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed"}
    if not torch.cuda.is_available():
        return {"skipped": "vLLM needs CUDA"}
    examples = [Example(f"Explain item {i} of the garden in a short answer") for i in range(n_prompts)]
    model, tokenizer = load_model(str(root), device="auto")
    out: dict[str, Any] = {}
    for backend in ("hf", "vllm"):
        settings = DecodingSettings(max_new_tokens=32, batch_size=64, backend=backend)
        start = time.perf_counter()
        target = model if backend == "hf" else str(root)
        out[backend] = [
            g.response for g in generate(target, tokenizer, examples, settings=settings, show_progress=False)
        ]
        out[f"{backend}_s"] = time.perf_counter() - start
    same = sum(a == b for a, b in zip(out["hf"], out["vllm"], strict=True))
    return {"identical": f"{same}/{n_prompts}", "speed_ratio": out["hf_s"] / out["vllm_s"]}


def qlora_check(root: Path, work: Path) -> dict[str, Any]:
    """(d): two CROW steps with the base in 4-bit NF4 (``train.quantize_base: 4bit``) through the real training
    stage; the saved adapter names the full-precision base. Skipped, with the reason, without CUDA or bitsandbytes."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "QLoRA needs CUDA"}
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not installed"}
    from crowguard.defenses.crow import CrowConfig
    from crowguard.schemas import ModelConfig, TrainConfig
    from crowguard.stage import run_training_stage
    from crowguard.types import Example, StageContext

    examples = [Example(f"Describe item {i} of the garden", output=f"Item {i} is green and small.") for i in range(8)]
    cfg = TrainConfig(max_steps=2, per_device_batch=2, grad_accum=2, max_length=64, quantize_base="4bit",
                      precision="bf16", gradient_checkpointing=True)  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    ctx = StageContext(work / "q", show_progress=False)
    summary = run_training_stage("gpu-check:qlora", ModelConfig(name_or_path=str(root)), cfg, examples, ctx,
                                 crow=CrowConfig(layers="all"))  # fmt: skip
    adapter = json.loads((work / "q" / "adapter_config.json").read_text())
    return {"steps": summary["steps"], "final_loss": summary["final_loss"], "seconds": summary["seconds"],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "adapter_base": adapter["base_model_name_or_path"] == str(root)}  # fmt: skip


def placement_check(root: Path) -> dict[str, Any]:
    """(c): where ``load_model(device="auto")`` (what evaluation uses) puts the model."""
    import torch

    from crowguard.models import load_model

    model, _ = load_model(str(root), device="auto")
    device = str(next(model.parameters()).device)
    ok = device.startswith("cuda") if torch.cuda.is_available() else device == "cpu"
    return {"device": device, "cuda_available": torch.cuda.is_available(), "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU-friendly; what the tests run)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 5, tiny 1)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    import torch
    import transformers

    shape, seq_len = (TINY, 32) if args.tiny else (SEVEN_B, 256)
    steps = args.steps or (1 if args.tiny else 5)
    device = _device()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "transformers": transformers.__version__,
                              "shape": "tiny" if args.tiny else "7B (Llama-2 shape)", "seq_len": seq_len}  # fmt: skip
    report["step_costs"] = step_costs(shape, seq_len, steps, warmup=1)
    with tempfile.TemporaryDirectory() as tmp:
        root = _saved_small_model(Path(tmp) / "small")
        report["generation"] = generation_check(root, 8 if args.tiny else 200)
        report["placement"] = placement_check(root)
        report["qlora"] = qlora_check(root, Path(tmp))

    print(f"device {report['device']}, torch {report['torch']}, transformers {report['transformers']}, "
          f"{report['shape']}, {seq_len} tokens, batch 2 x 4, LoRA r 8")  # fmt: skip
    print(f"{'method':8} {'checkpointing':>13} {'s/step':>8} {'peak GiB':>9} {'paper run (min)':>16}")
    for row in report["step_costs"]:
        peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
        print(f"{row['method']:8} {row['checkpointing']!s:>13} {row['s_per_step']:8.3f} {peak:>9} "
              f"{row['paper_run_min']:16.2f}")  # fmt: skip
    sft = {r["checkpointing"]: r["s_per_step"] for r in report["step_costs"] if r["method"] == "sft"}
    for row in report["step_costs"]:
        if row["method"] == "crow":
            print(f"CROW / SFT step time, checkpointing {row['checkpointing']}: "
                  f"{row['s_per_step'] / sft[row['checkpointing']]:.2f}x")  # fmt: skip
    print(f"paper: {PAPER_MINUTES} min for Llama-2-7B on one A100")
    print(f"generation HF vs vLLM: {report['generation']}")
    print(f"evaluation placement: {report['placement']}")
    print(f"QLoRA: {report['qlora']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["placement"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
