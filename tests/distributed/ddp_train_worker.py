"""torchrun worker: one optimizer step of crowguard's ``train`` (the Trainer under DDP) on 4 unequal-length examples.

``argv``: output path, loss average (token | micro_batch), ``full-gc-untied`` for full fine-tuning with gradient
checkpointing on a model whose embeddings are not tied (the path where the Trainer's default DDP setting used to make
CROW refuse to run), and the work directory (its ``metrics.jsonl`` holds the logged losses). Rank 0 writes each
weight's update (after - before) as safetensors.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from crowguard.defenses.crow import CrowConfig
from crowguard.schemas import TrainConfig
from crowguard.train import prepare_for_training, train

from helpers import tiny_llama, tiny_tokenizer, unequal_examples


def one_step_update(loss_average: str, per_device_batch: int, full_gc_untied: bool, work: str) -> dict:
    """The weight update of one SGD step (no clipping) with CROW; the same function runs single-process."""
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    cfg = TrainConfig(lr=0.05, max_steps=1, per_device_batch=per_device_batch, grad_accum=1, warmup_ratio=0.0,
                      scheduler="constant", max_length=96, optim="sgd", max_grad_norm=0.0, seed=0,
                      loss_average=loss_average, finetune="full" if full_gc_untied else "lora",
                      gradient_checkpointing=full_gc_untied, lora_r=4, lora_alpha=8)  # fmt: skip
    model = prepare_for_training(tiny_llama(tokenizer, layers=3, tied=not full_gc_untied), cfg)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    crow = CrowConfig(alpha=5.5, epsilon=0.1, layers="all")
    train(model, tokenizer, unequal_examples(4), cfg, work, crow=crow, show_progress=False)
    return {k: (v.detach() - before[k]).contiguous() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    out, loss_average, variant = sys.argv[1], sys.argv[2], sys.argv[3]
    work = sys.argv[4] if len(sys.argv) > 4 else tempfile.mkdtemp()
    update = one_step_update(loss_average, 2, variant == "full-gc-untied", work)
    if int(os.environ.get("RANK", "0")) == 0:
        save_file(update, out)
    # Close the group the Trainer opened, together: a rank that exits with it open can abort in gloo's teardown
    # ("terminate called without an active exception", SIGABRT) while the other is still writing.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
