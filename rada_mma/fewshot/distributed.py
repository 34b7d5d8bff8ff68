"""The one place that knows about ``torch.distributed``: rank, world, backend, collectives.

Every part of the pipeline runs unchanged in one process; under ``torchrun``
:func:`init_from_env` joins the process group (NCCL on GPUs, gloo on CPUs),
each rank takes its share of the work, and these helpers combine the shares so
that the result equals a single-process run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_reduce_grads",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "comm_device",
    "gather_objects",
    "init_from_env",
    "is_main",
    "rank_world",
    "single_process",
]

_alone = False  # set by single_process(): this rank works on its own share, without collectives


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Within the block this process acts as the only one (``rank_world() == (0, 1)``), even under ``torchrun``.

    For work that ranks split among themselves rather than share: a sweep trains different configurations
    on different ranks, and each :func:`~rada_mma.fewshot.fit` must then neither split its batches nor wait
    for the other ranks. Nothing inside may write what only rank 0 should write.
    """
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group (and inside :func:`single_process`)."""
    if not _alone and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or the only process)."""
    return rank_world()[0] == 0


def init_from_env() -> None:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE > 1``): NCCL with CUDA, else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def comm_device(device: torch.device) -> torch.device:
    """Where collectives run: a CUDA device for NCCL (which reduces only CUDA tensors), the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if rank_world()[1] > 1:
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable objects; the value itself in one process)."""
    if rank_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (picklable objects; ``[value]`` in one process)."""
    world = rank_world()[1]
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(x: Tensor, device: torch.device) -> Tensor:
    """``x`` summed over ranks, back on ``x``'s device."""
    comm = x.to(comm_device(device))
    dist.all_reduce(comm)
    return comm.to(x.device)


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over ranks in one collective; a parameter no rank has a gradient for keeps ``None``.

    A rank whose share of a batch is empty contributes zeros, so every rank
    takes part in the same collective however the batch was split.
    """
    anchor = params[0]
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=anchor.device)
    flat = torch.cat([*parts, present])
    dist.all_reduce(flat)
    offset = 0
    for p, has in zip(params, flat[-len(params) :].tolist(), strict=True):
        chunk = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
        p.grad = chunk if has else None
        offset += p.numel()
