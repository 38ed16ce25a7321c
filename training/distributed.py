"""Multi-GPU: EDM's DataParallel (--dp) and torchrun's DistributedDataParallel.

Under torchrun (WORLD_SIZE > 1 in the environment) each process joins a process group
(gloo on CPU, nccl on GPU), wraps the model in DDP, trains on its shard of every epoch and
all-reduces gradients; rank 0 alone writes files and logs. Without torchrun, ``--dp=True``
wraps the model in DataParallel when more than one GPU is visible (EDM's behaviour).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device(no_cuda: bool = False) -> torch.device:
    """The device of a single-process run: CUDA when available unless ``--no-cuda``, else the CPU.

    Every entry point asks here (tests replace it to run the scripts on a stand-in accelerator).
    """
    return torch.device("cuda" if torch.cuda.is_available() and not no_cuda else "cpu")


def setup(args: argparse.Namespace) -> DistContext:
    """Join torchrun's process group if there is one; choose the device."""
    use_cuda = not getattr(args, "no_cuda", False) and torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=select_device(getattr(args, "no_cuda", False)))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, args: argparse.Namespace, ctx: DistContext) -> torch.nn.Module:
    """DDP under torchrun; DataParallel with --dp and >1 visible GPU; else the model itself."""
    if ctx.distributed:
        device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if getattr(args, "dp", False) and ctx.device.type == "cuda" and torch.cuda.device_count() > 1:
        print(f"Training with DataParallel on {torch.cuda.device_count()} GPUs")
        return torch.nn.DataParallel(model)
    return model


def all_true(flag: bool, ctx: DistContext) -> bool:
    """True iff ``flag`` holds on every process (all processes must take the same branch)."""
    if not ctx.distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    if not ctx.distributed:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max_int(value: int, ctx: DistContext) -> int:
    """The largest ``value`` over processes (one small all-reduce)."""
    if not ctx.distributed:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every process's ``obj``, in rank order (on every process)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
