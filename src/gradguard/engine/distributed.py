"""The ranks' agreement: every rank decides the same thing at the same step.

A rank that stops alone leaves the others waiting in their next collective forever. So, once per optimizer
step, every rank contributes its fault flag (and the squared norms of its gradient *shards*, for FSDP2 /
ZeRO) to ONE small all-reduce (:func:`agree`); the result is identical on every rank, and every rank reads
it in the guard's one host sync. Only on the fault path, once all ranks have agreed to stop, do they
exchange their own diagnoses (:func:`agree_on_fault`, an ``all_gather_object``) so that every rank reports
the same fault, attributed to the rank where it began.

Everything here is a no-op without ``torch.distributed`` (one process).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from gradguard.engine import detectors
from gradguard.engine.diagnosis import Diagnosis, fact
from gradguard.report.model import Origin

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
        names = {c.__name__ for c in type(module).__mro__}
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


def agree_on_fault(local: Diagnosis | None, flags: list[int], step: int, *, exchange: bool = True) -> Diagnosis:
    """The fault every rank reports for this step: the diagnosis of the rank where it began.

    Every rank must call this at the same step (the guard does so when the agreed flags say "stop"); ``local``
    is this rank's own diagnosis, or ``None`` when it saw nothing itself. With ``exchange=False`` (a fault was
    already reported under ``on_fault="warn"``: every rank knows) no collective runs and each rank keeps its
    own view.

    >>> agree_on_fault(None, [1], step=3).finding.kind
    'nonfinite_grad'
    """
    if not exchange:
        return local if local is not None else Diagnosis(detectors.flagged_elsewhere(step), Origin(phase="backward"))
    views: list[dict[str, Any] | None] = gather(local.to_plain() if local is not None else None)
    first = origin_rank(views, flags)
    chosen = views[first] if first is not None else None
    if chosen is not None:
        agreed = Diagnosis.from_plain(chosen)
    else:
        agreed = Diagnosis(detectors.unattributed(step), Origin(phase="backward"))
    agreed = dataclasses.replace(agreed, origin=dataclasses.replace(agreed.origin, rank=first))
    ranks = rank_summaries(views, flags)
    said = "; ".join(
        f"rank {r['rank']}: " + (f"{r['code']} {r['phase']}" if r.get("code") else "nothing") for r in ranks
    )
    return agreed.with_evidence(fact("ranks", f"what each rank saw: {said}", value=ranks))


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
