"""``torch.distributed`` helpers shared by the methods: all-gathers along the batch axis where ranks may
hold different numbers of rows (the last batch of an epoch, ``drop_last=False``)."""

from __future__ import annotations

import torch
from torch import Tensor


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gather_uneven(x: Tensor) -> tuple[Tensor, list[int]]:
    """Every rank's ``x`` concatenated in rank order, and each rank's row count: ranks exchange their
    sizes first, then all-gather rows padded to the largest (``all_gather`` needs equal shapes)."""
    world = torch.distributed.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    counts = [int(n) for n in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts)]), counts


def gather_rows(tensor: Tensor) -> Tensor:
    """All ranks' ``tensor`` (rows may differ in number), concatenated in rank order, without
    gradient; itself when not distributed."""
    if not distributed():
        return tensor
    return _gather_uneven(tensor)[0]


class _GatherWithGradient(torch.autograd.Function):
    """All-gather along the batch axis (uneven sizes allowed); the backward all-reduces (sums) the
    gradient of the gathered tensor and returns this process's rows. Works on gloo and NCCL."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        gathered, counts = _gather_uneven(x)
        rank = torch.distributed.get_rank()
        ctx.rows = (sum(counts[:rank]), counts[rank])
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
        start, n = ctx.rows
        return grad[start : start + n]


def gather_batch(x: Tensor, with_gradient: bool) -> Tensor:
    """The global batch of ``x`` over all DDP processes (``x`` itself when not distributed)."""
    if not distributed() or torch.distributed.get_world_size() == 1:
        return x
    if with_gradient:
        return _GatherWithGradient.apply(x)
    with torch.no_grad():
        return _GatherWithGradient.apply(x.detach())
