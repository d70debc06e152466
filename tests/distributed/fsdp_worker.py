"""torchrun worker: CROW gradients of a tiny Llama sharded with FSDP2 (``fully_shard`` per decoder layer and at
the root), on this rank's half of a fixed batch. Rank 0 writes the full (unsharded) gradients to ``argv[1]``."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from crowguard.losses import crow_loss

from helpers import fixed_batch, tiny_llama, tiny_tokenizer


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = tiny_llama(tiny_tokenizer(), layers=3)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)  # the embedding matrix is sharded outside the forward: only the wrapped forward gathers it
    input_ids, attention_mask, labels = fixed_batch(len(tiny_tokenizer()), rows=2 * world)
    rows = slice(2 * rank, 2 * rank + 2)
    loss, _ = crow_loss(model, input_ids[rows], attention_mask[rows], labels[rows], alpha=5.5, epsilon=0.1,
                        layers="all")  # fmt: skip
    loss.backward()
    grads = {n: p.grad.full_tensor().contiguous() for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        save_file(grads, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
