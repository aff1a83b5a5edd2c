"""Policy: the only code that changes training.

Skipping a poisoned update means setting every ``.grad`` to ``None`` before ``optimizer.step()``: torch
optimizers skip parameters without a gradient (no update, no weight decay, no moment update), so the
weights stay bitwise unchanged while the step counter and the LR scheduler move on. Under
torch.distributed every rank must decide the same thing at the same step, or the ones that stop leave
the others waiting in the next collective forever: the fault flag is all-reduced first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def agree(local_bad: torch.Tensor, *, pending: bool = False) -> torch.Tensor:
    """A per-rank vector of fault flags, identical on every rank (one small all-reduce, no host sync).

    Slot ``r`` is 1 when rank ``r`` saw a non-finite value this step or has a stop decision pending.
    """
    flag = local_bad.float().reshape(1)
    if pending:
        flag = torch.ones_like(flag)
    n = world()
    if n == 1:
        return flag
    flags = torch.zeros(n, device=flag.device)
    flags[rank()] = flag[0]
    if flags.device.type == "cpu" or torch.distributed.get_backend() != "gloo":
        torch.distributed.all_reduce(flags)
    else:  # gloo cannot reduce device tensors
        cpu = flags.cpu()
        torch.distributed.all_reduce(cpu)
        flags = cpu.to(flags.device)
    return flags


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (only on the fault path: all ranks have agreed to stop)."""
    n = world()
    if n == 1:
        return [obj]
    out: list[Any] = [None] * n
    torch.distributed.all_gather_object(out, obj)
    return out


def skip_update(model: nn.Module, optimizer: Any | None = None) -> None:
    """Drop every gradient so that the coming ``optimizer.step()`` changes nothing."""
    for p in model.parameters():
        p.grad = None
    if optimizer is not None:
        for group in getattr(optimizer, "param_groups", []):
            for p in group["params"]:
                p.grad = None
