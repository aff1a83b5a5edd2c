"""Reading a step: the probes' device tensors become one :class:`~gradguard.engine.stats.StepStats`.

Everything one optimizer step recorded (losses, token counts, abs-maxes, the per-tensor gradient norms, the
update sample's norms) goes into one vector, read with one ``tolist()``: the guard's one host sync per step. The
per-group sums are then taken on the host (a few additions per tensor are cheaper than device ops). Across
ranks the fault flags and the sharded gradients' squared norms go through one small all-reduce first. This is
the guard's whole per-step cost outside the hooks, so it is kept to a handful of tensor ops.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradguard.engine import distributed
from gradguard.engine.probes import Probes, _absmax
from gradguard.engine.stats import StepStats
from gradguard.engine.updates import LearningRates, UpdateMeter


class StepReader:
    """Reads one step's statistics from the probes (one host sync), and keeps the per-module gradient norms of
    the last steps on the device for the fault path's evidence."""

    def __init__(
        self,
        model: nn.Module,
        probes: Probes,
        *,
        optimizer: Any = None,
        scaler: Any = None,
        param_check_every: int = 100,
    ) -> None:
        self.model = model
        self.probes = probes
        self.scaler = scaler
        self.param_check_every = param_check_every
        self.module_window: deque[torch.Tensor] = deque(maxlen=9)  # this step's per-parameter norms, 8 before it
        self.updates = UpdateMeter(probes)
        self.lrs = LearningRates(optimizer, probes)
        self._skipped = False  # the fp16 GradScaler skipped the last update: no update ratio for it

    def read(self, step: int, *, pending: bool = False) -> StepStats:
        """This step's statistics; ``pending``: this rank has a stop decision to share with the others."""
        probes = self.probes
        probes.settle()  # heads' outputs no returned loss covered (a loss computed outside the model)
        probes.prune()  # forwards without a backward are not training micro-batches
        device = probes.device
        norms = probes.local_norms(device)
        micro = probes.micro
        losses = [m.loss for m in micro if m.loss is not None]
        weights = [m.loss_weight for m in micro if m.loss is not None and m.loss_weight is not None]
        scale = getattr(self.scaler, "_scale", None) if self.scaler is not None else None
        scale = scale if isinstance(scale, torch.Tensor) else None
        # The scalars, in this order; their counts say where each part lies in the packed vector.
        parts: dict[str, list[torch.Tensor]] = {
            "losses": losses,
            "inputs": [v for m in micro for _, v in m.inputs],
            "loss_weights": weights if len(weights) == len(losses) else [],
            "supervised": [m.supervised for m in micro if m.supervised is not None],
            "outputs": [v for _, _, v in probes.group_outputs if v is not None],
            "scale": [scale] if scale is not None else [],
            "params_bad": [params_bad(self.model)] if step % self.param_check_every == 0 else [],
        }
        scalars = stack_scalars([t for ts in parts.values() for t in ts], device)
        flags = None
        if distributed.world() > 1:
            # This rank's fault flag (from its own values), and the squared norms of its gradient shards
            # (FSDP2 / ZeRO): summed over the ranks in ONE small all-reduce, the only collective per step.
            watched = [scalars[: len(losses) + len(parts["inputs"])]] + ([] if scale is not None else [norms])
            local_bad = (~torch.isfinite(torch.cat(watched))).any()
            shard_ix, shard_w = probes.shard_index(device)
            flags, shard_sumsq = distributed.agree(local_bad, pending=pending, sumsq=norms[shard_ix].square() * shard_w)
            if shard_ix.numel():  # full-tensor norms of the sharded parameters, without gathering any tensor
                norms = norms.index_copy(0, shard_ix, shard_sumsq.sqrt())
        updates = self.updates.measure(device)  # the last update, per group: [|dW|^2, |W|^2]
        tail = [norms.float()] + ([updates.reshape(-1)] if updates is not None else [])
        tail += [flags.float()] if flags is not None else []
        packed = torch.cat([scalars, *tail]).tolist()  # the one host sync
        self.module_window.append(norms)  # per module on the fault path only (Probes.module_norms)
        sizes = {k: len(ts) for k, ts in parts.items()}
        stats = self._unpack(step, packed, sizes, updates is not None, pending, flags is not None)
        self._skipped = stats.scaler_active and not stats.grads_finite
        return stats

    def _unpack(
        self, step: int, packed: list[float], sizes: dict[str, int], updated: bool, pending: bool, agreed: bool
    ) -> StepStats:
        """The packed vector back into named host values (the layout :meth:`read` packed)."""
        probes = self.probes
        values: dict[str, list[float]] = {}
        at = 0
        for key, n in sizes.items():
            values[key] = packed[at : at + n]
            at += n
        names = probes.group_names
        rows = probes.reduce_grads(packed[at : at + len(probes.params)])  # per group, on the host
        at += len(probes.params)
        ratios: dict[str, float] = {}
        if updated:
            moves = [packed[at + 2 * i : at + 2 * i + 2] for i in range(len(names))]
            at += 2 * len(names)
            if not self._skipped:
                ratios = {n: _ratio(*m) for n, m in zip(names, moves) if m[1] > 0 or m[0] > 0}
        scaler_active = bool(sizes["scale"])
        if agreed:
            rank_flags = [int(v) for v in packed[at:]]
        else:  # one process: the flag is this step's own values, read on the host
            bad = not all(map(math.isfinite, values["losses"] + values["inputs"]))
            bad |= not scaler_active and any(row[1] for row in rows)
            rank_flags = [int(bad or pending)]
        sup = iter(values["supervised"])
        inputs = [(m.index, k) for m in probes.micro for k, _ in m.inputs]
        outs = [(g, m) for g, m, v in probes.group_outputs if v is not None]
        fired = probes.fired_per_group()
        unfired = probes.unfired(fired)
        return StepStats(
            step=step,
            losses=values["losses"],
            loss_weights=values["loss_weights"],
            supervised=[int(next(sup)) if m.supervised is not None else None for m in probes.micro],
            inputs=[(m, k, v) for (m, k), v in zip(inputs, values["inputs"])],
            group_outputs=[(names[g], m, v) for (g, m), v in zip(outs, values["outputs"])],
            group_norm={n: math.sqrt(r[0]) if r[0] >= 0 else r[0] for n, r, f in zip(names, rows, fired) if f},
            group_nonfinite={n: int(r[1]) for n, r in zip(names, rows)},
            group_nonzero={n: int(r[2]) for n, r in zip(names, rows)},
            group_fired=dict(zip(names, fired)),
            group_ran=dict(zip(names, probes.ran_per_group())),
            group_unfired={names[g]: params for g, params in unfired.items()},
            scaler_active=scaler_active,
            loss_scale=values["scale"][0] if values["scale"] else None,
            params_bad=int(values["params_bad"][0]) if values["params_bad"] else None,
            rank_flags=rank_flags,
            update_ratio=ratios,
            lr=dict(zip(names, self.lrs.read())),
            vocab=max((m.vocab for m in probes.micro if m.vocab), default=None),
        )

    def module_norms(self, steps: int = 1) -> list[list[float]]:
        """Per-module gradient norms of the last ``steps`` steps, oldest first (one host read: the fault path,
        or a log event). Columns follow ``probes.modules``."""
        window = list(self.module_window)[-steps:]
        if not window:
            return []
        return self.probes.module_norms(torch.stack(window)).tolist()


def _ratio(moved_sq: float, size_sq: float) -> float:
    """``|dW| / |W|`` from their squares (a weight that moved from exactly 0, LoRA's B at step 1: infinite)."""
    return math.sqrt(moved_sq / size_sq) if size_sq > 0 else math.inf


def stack_scalars(scalars: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0-d (or one-element) tensors as one fp32 vector on ``device``: one ``stack`` in the usual case."""
    if not scalars:
        return torch.zeros(0, device=device)
    try:
        return torch.stack([t.reshape(()) if t.dim() else t for t in scalars]).to(device, torch.float32)
    except RuntimeError:  # scalars on several devices (a model split across GPUs)
        return torch.stack([t.reshape(()).to(device, torch.float32) for t in scalars])


def params_bad(model: nn.Module) -> torch.Tensor:
    """Count of trainable parameter tensors holding a non-finite value (device tensor, no sync)."""
    ps = [p for p in model.parameters() if p.requires_grad and not p.is_meta]
    if not ps:
        return torch.zeros(())
    # This rank's piece of each weight: a DTensor's local shard, a ZeRO-3 parameter's partition.
    locals_ = [getattr(p, "ds_tensor", p) if hasattr(p, "ds_id") else p for p in ps]
    locals_ = [t.to_local() if hasattr(t, "to_local") else t for t in locals_]
    locals_ = [t for t in locals_ if t.numel()]  # an empty shard has no inf-norm
    if not locals_:
        return torch.zeros(())
    norms = torch.stack([_absmax(t) for t in locals_])  # aminmax: ~5x faster than an inf-norm on CPU
    return (~torch.isfinite(norms)).sum()


def params_finite(model: nn.Module) -> bool:
    """Whether every trainable weight is finite (one host read)."""
    return int(params_bad(model).item()) == 0
