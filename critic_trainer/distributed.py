"""Data-parallel helpers on torch.distributed (torchrun; gloo on CPU, nccl on CUDA). No-ops in one process.

Each rank samples its own minibatch; gradients are averaged with all_reduce before the optimiser step, and
parameters start identical (broadcast from rank 0), so every rank holds the same model after every step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def broadcast_parameters(params: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy rank `src`'s parameter (and buffer) values to every rank."""
    if is_distributed():
        for p in params:
            dist.broadcast(p.data, src)


@torch.no_grad()
def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """All-reduce-average .grad over ranks (missing grads count as zero so every rank joins every call)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)


def finite_on_all_ranks(value: torch.Tensor) -> bool:
    """True iff `value` is finite on every rank (one tiny all_reduce), so all ranks skip or step together."""
    ok = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if is_distributed():
        if dist.get_backend() == "nccl":
            ok = ok.cuda()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)
