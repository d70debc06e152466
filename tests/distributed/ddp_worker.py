"""torchrun worker: CROW gradients of a tiny Llama on this rank's half of a fixed batch, wrapped by DDP
(``argv[2] == "ddp"``) or sharded with FSDP2 (``"fsdp"``: ``fully_shard`` per decoder layer and at the root, so
the embedding matrix is sharded outside the forward and only the wrapped forward gathers it).

Rank 0 writes the averaged, full (unsharded) gradients to ``argv[1]`` (safetensors) for the test to compare with
one process.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from crowguard.losses import crow_loss

from helpers import fixed_batch, tiny_llama, tiny_tokenizer


def wrap(model: torch.nn.Module, how: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the module to call, the module whose parameters hold the gradients)."""
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model), model
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, model


def main(out_path: str, how: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    called, holder = wrap(tiny_llama(tiny_tokenizer(), layers=3), how)
    input_ids, attention_mask, labels = fixed_batch(len(tiny_tokenizer()), rows=2 * world)
    rows = slice(2 * rank, 2 * rank + 2)
    loss, _ = crow_loss(called, input_ids[rows], attention_mask[rows], labels[rows], alpha=5.5, epsilon=0.1,
                        layers="all")  # fmt: skip
    loss.backward()
    grads = {}
    for name, param in holder.named_parameters():
        if param.grad is not None:
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            grads[name] = grad.detach().clone().contiguous()
    if rank == 0:
        save_file(grads, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
