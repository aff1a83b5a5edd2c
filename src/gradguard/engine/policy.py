"""Policy: the only code that changes training, and the ranks' agreement on it.

Skipping a poisoned update means setting every ``.grad`` to ``None`` before ``optimizer.step()``: torch
optimizers skip parameters without a gradient (no update, no weight decay, no moment update), so the
weights stay bitwise unchanged while the step counter and the LR scheduler move on.

Under torch.distributed every rank must decide the same thing at the same step, or the ones that stop
leave the others waiting in the next collective forever. So, once per optimizer step, every rank
contributes its fault flag (and the squared norms of its gradient *shards*, for FSDP2 / ZeRO) to ONE small
all-reduce (:func:`agree`); the result is identical on every rank, and every rank reads it in the
guard's one host sync. Only on the fault path, once all ranks have agreed to stop, do they exchange
their local diagnoses (:func:`agree_on_fault`, an ``all_gather_object``) so that every rank reports the
same fault, attributed to the rank where it began.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from torch import nn

# The order in which a non-finite value can be born: the earliest phase names the origin rank.
_PHASE_ORDER = {"data": 0, "forward": 1, "backward": 2, "optimizer": 3, "static": 4}


def world() -> int:
    """Number of processes in the default process group (1 without torch.distributed).

    >>> world()
    1
    """
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 without torch.distributed).

    >>> rank()
    0
    """
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def agree(
    local_bad: torch.Tensor, *, pending: bool = False, sumsq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank fault flags and cross-rank sums of shard norms: one small all-reduce, no host sync.

    Returns ``(flags, sumsq_total)``: ``flags[r]`` is 1 when rank ``r`` saw a non-finite value this step
    (``local_bad``) or has a stop decision pending; ``sumsq_total`` is ``sumsq`` (this rank's weighted
    squared norms of its gradient shards, one per sharded parameter) summed over the ranks. Both come
    from the same all-reduce (SUM) of one vector ``[flags..., sumsq...]``, identical on every rank.

    >>> flags, total = agree(torch.tensor(False), sumsq=torch.tensor([4.0]))
    >>> flags.tolist(), total.tolist()
    ([0.0], [4.0])
    """
    flag = torch.ones(1, device=local_bad.device) if pending else local_bad.float().reshape(1)
    extra = sumsq.float().reshape(-1).to(flag.device) if sumsq is not None else flag[:0]
    n = world()
    if n == 1:
        return flag, extra
    r = rank()
    vec = torch.cat([flag.new_zeros(r), flag, flag.new_zeros(n - r - 1), extra])
    if vec.device.type == "cpu" or torch.distributed.get_backend() != "gloo":
        torch.distributed.all_reduce(vec)
    else:  # gloo cannot reduce device tensors
        cpu = vec.cpu()
        torch.distributed.all_reduce(cpu)
        vec = cpu.to(vec.device)
    return vec[:n], vec[n:]


def shard_weight(param: torch.Tensor) -> float | None:
    """The weight that makes a DTensor's local squared norm sum (over all ranks) to the full one.

    A DTensor (FSDP2's ``fully_shard``, tensor parallel) holds a piece of the full tensor on every rank
    of its mesh; the pieces along ``Shard`` mesh dimensions are distinct, along ``Replicate`` ones they
    are copies. Summing ``local_sumsq * weight`` over all ranks of the world counts each distinct piece
    once when ``weight = (product of the Shard mesh sizes) / world``. ``None``: not a DTensor (its
    gradient is whole on this rank, e.g. DDP: nothing to reduce).

    >>> shard_weight(torch.zeros(3)) is None
    True
    """
    placements = getattr(param, "placements", None)
    mesh = getattr(param, "device_mesh", None)
    if placements is None or mesh is None:
        return None
    pieces = 1
    for dim, placement in enumerate(placements):
        if placement.is_shard():
            pieces *= mesh.size(dim)
    return pieces / world()


def replay_is_local(model: nn.Module) -> bool:
    """Whether re-running ``model``'s forward and backward on this rank alone issues no collective.

    The fault localiser replays the failing step on the rank(s) that saw the fault. That is safe for a
    bare module (the HF Trainer hands callbacks the unwrapped model; DDP's reducer ignores a backward that
    did not start in DDP's forward), but not under a DDP wrapper (buffer broadcast), FSDP (parameters
    are all-gathered in forward) or DeepSpeed ZeRO (gathers and gradient-reduction hooks): one rank
    alone would wait forever for the others.

    >>> replay_is_local(torch.nn.Linear(2, 2))
    True
    """
    if world() == 1:
        return True
    for module in model.modules():
        cls = type(module)
        names = {c.__name__ for c in cls.__mro__}
        if names & {"DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine"}:
            return False
    for p in model.parameters():
        if hasattr(p, "device_mesh") or hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            return False
    return True


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (only on the fault path: all ranks have agreed to stop).

    >>> gather({"rank": 0})
    [{'rank': 0}]
    """
    n = world()
    if n == 1:
        return [obj]
    out: list[Any] = [None] * n
    torch.distributed.all_gather_object(out, obj)
    return out


def plain(value: Any) -> Any:
    """``value`` as JSON-safe plain data (what crosses ranks on the fault path cannot fail to pickle).

    >>> plain({"norms": (1.0, float("nan")), "device": torch.device("cpu")})
    {'norms': [1.0, nan], 'device': 'cpu'}
    """

    def default(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        return str(obj)

    return json.loads(json.dumps(value, default=default))


def agree_on_fault(view: dict[str, Any] | None, flags: list[int]) -> tuple[int | None, list[dict[str, Any] | None]]:
    """Exchange every rank's own diagnosis of a fault step; say which rank it began on.

    ``view`` is this rank's diagnosis (``{"finding": …, "origin": …, "evidence": …, "localization": …}``)
    or ``None`` when this rank saw nothing itself. Every rank must call this at the same step (the guard
    does so when the agreed flags say "stop"). Returns :func:`origin_rank` and every rank's view, as plain
    data.

    >>> agree_on_fault(None, [1])
    (0, [None])
    """
    views: list[dict[str, Any] | None] = gather(plain(view) if view is not None else None)
    return origin_rank(views, flags), views


def origin_rank(views: list[dict[str, Any] | None], flags: list[int]) -> int | None:
    """The rank where a fault began: the earliest phase (data, forward, backward), then the lowest rank.

    A NaN born in rank 1's forward pass reaches every rank's gradients through the gradient reduction;
    rank 1 still names it first. Without any rank's diagnosis: the first flagged rank.

    >>> views = [{"origin": {"phase": "backward"}}, {"origin": {"phase": "forward"}}]
    >>> origin_rank(views, [1, 1]), origin_rank([None, None], [0, 1])
    (1, 1)
    """
    ranked = [
        (_PHASE_ORDER.get(str((v.get("origin") or {}).get("phase")), 9), r)
        for r, v in enumerate(views)
        if v is not None
    ]
    if ranked:
        return min(ranked)[1]
    return next((r for r, f in enumerate(flags) if f), None)


def rank_summaries(views: list[dict[str, Any] | None], flags: list[int]) -> list[dict[str, Any]]:
    """One short entry per rank for the report's ``fault.evidence["ranks"]``.

    >>> rank_summaries([None], [0])
    [{'rank': 0, 'flagged': False, 'saw': 'nothing itself: stopped with the other ranks'}]
    """
    out: list[dict[str, Any]] = []
    for r, v in enumerate(views):
        entry: dict[str, Any] = {"rank": r, "flagged": bool(flags[r]) if r < len(flags) else False}
        if v is None:
            entry["saw"] = "nothing itself: stopped with the other ranks"
        else:
            finding, origin = v.get("finding") or {}, v.get("origin") or {}
            entry.update(
                code=finding.get("code"),
                kind=finding.get("kind"),
                phase=origin.get("phase"),
                group=origin.get("group"),
                message=finding.get("message"),
            )
        out.append(entry)
    return out


def skip_update(model: nn.Module, optimizer: Any | None = None) -> None:
    """Drop every gradient so that the coming ``optimizer.step()`` changes nothing.

    >>> m = torch.nn.Linear(2, 1); m(torch.ones(1, 2)).sum().backward(); skip_update(m)
    >>> m.weight.grad is None
    True
    """
    for p in model.parameters():
        p.grad = None
    if optimizer is not None:
        for group in getattr(optimizer, "param_groups", []):
            for p in group["params"]:
                p.grad = None
