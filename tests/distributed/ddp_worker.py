"""torchrun worker: CROW gradients of a DDP-wrapped tiny Llama on this rank's half of a fixed batch.

Rank 0 writes the averaged gradients to ``argv[1]`` (safetensors) for the test to compare with one process.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from crowguard.losses import crow_loss

from helpers import fixed_batch, grad_dict, tiny_llama, tiny_tokenizer


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = tiny_llama(tiny_tokenizer(), layers=3)
    ddp = DistributedDataParallel(model)
    input_ids, attention_mask, labels = fixed_batch(len(tiny_tokenizer()), rows=2 * world)
    rows = slice(2 * rank, 2 * rank + 2)
    loss, _ = crow_loss(ddp, input_ids[rows], attention_mask[rows], labels[rows], alpha=5.5, epsilon=0.1, layers="all")
    loss.backward()
    if rank == 0:
        save_file(grad_dict(model), out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
