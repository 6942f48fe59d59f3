"""Two gloo processes train one step of a tiny GPT under DDP or FSDP2 (fully_shard) and save rank 0's full
gradients; run by test_integrations.py:  python dist_worker.py ddp|fsdp2 OUT_DIR"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tlv_fast.models import GPT


def run(rank, world, out_dir, mode):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", dropout=0.0)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    shard = ids[rank * 2:(rank + 1) * 2]
    if mode == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # kept alive: its hooks all-reduce in backward
        ddp(shard, labels=shard)["loss"].backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    else:
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        model(shard, labels=shard)["loss"].backward()
        grads = {k: p.grad.full_tensor() for k, p in model.named_parameters()}
    if rank == 0:
        torch.save(grads, os.path.join(out_dir, "grads.pt"))
    dist.barrier()  # no rank tears its connections down while the other still uses them (seen: SIGABRT under load)
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], sys.argv[2]
    mp.spawn(run, args=(2, out_dir, mode), nprocs=2)
