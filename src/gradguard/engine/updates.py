"""The update-to-weight ratio ``|dW| / |W|`` of each group: how far one optimizer step really moves the weights.

It is the effective learning rate a group gets (about 1e-3 is typical for Adam fine-tunes), whatever the
configured learning rate, the scheduler, the warm-up or LoRA's scaling made of it. A ratio near 0 means the weights
do not move although gradients flow (a warm-up given in steps where a ratio was meant, ``learning_rate=0``,
``lora_alpha=0``); a ratio near 1 means one step rewrites the weights.

Measured without a second copy of the weights: a fixed *sample* of each group is kept, up to ``tensors``
tensors spread over the group, each read through a strided view of at most ``elements`` values (a view: no copy).
At every check the sample is gathered into one flat fp32 vector; its difference to the previous check's vector
is the update of the step in between. That is a handful of ops over at most ``tensors x elements`` values per
group, on the device, and the two squared norms per group ride in the guard's one host read.
"""

from __future__ import annotations

from typing import Any

import torch

from gradguard.engine.probes import Probes


class UpdateMeter:
    """Measures each group's ``|dW|`` and ``|W|`` on a sample, once per optimizer step.

    >>> import torch
    >>> from gradguard.core.groups import build_groups
    >>> model = torch.nn.Linear(4, 4)
    >>> with torch.no_grad():
    ...     _ = model.weight.fill_(1.0), model.bias.fill_(0.0)
    >>> meter = UpdateMeter(Probes(model, build_groups(model)))
    >>> meter.measure(torch.device("cpu")) is None  # the first call only takes the copy
    True
    >>> with torch.no_grad():
    ...     _ = model.weight.mul_(1.01)  # an "update" of 1% of the weights
    >>> moved, size = meter.measure(torch.device("cpu")).sqrt().tolist()[0]
    >>> round(moved / size, 6)
    0.01
    """

    def __init__(self, probes: Probes, *, tensors: int = 8, elements: int = 1024) -> None:
        self.groups = len(probes.group_names)
        self.views: list[torch.Tensor] = []
        self.owner: list[int] = []  # group of each view
        for gi in range(self.groups):
            members = [i for i, g in enumerate(probes.param_group) if g == gi]
            step = max(1, -(-len(members) // tensors))
            for i in members[::step]:
                view = _sample(probes.params[i][1], elements)
                if view is not None:
                    self.views.append(view)
                    self.owner.append(gi)
        self.copy: torch.Tensor | None = None  # the sample at the last call, flat, fp32
        self.group_sizes = [
            sum(v.numel() for v, g in zip(self.views, self.owner) if g == gi) for gi in range(self.groups)
        ]

    def measure(self, device: torch.device) -> torch.Tensor | None:
        """``[groups x 2]`` on ``device``: the squared norm of the sample's change since the last call, and of the
        sample before it (no host sync). ``None`` on the first call, and when nothing can be sampled."""
        if not self.views:
            return None
        # The whole sample as one flat fp32 vector: one gather, then a handful of ops whatever the number of
        # tensors (per-tensor _foreach ops cost a dispatch per tensor on CPU).
        try:
            now = torch.cat(self.views).float()
        except RuntimeError:  # a sample on several devices (a model split across GPUs)
            now = torch.cat([v.to(device) for v in self.views]).float()
        before, self.copy = self.copy, now
        if before is None:
            return None
        # The views are in group order: each group's values are one contiguous slice (empty for a group with none),
        # so both norms of every group come out of one fused call.
        sizes = self.group_sizes
        slices = [*(now - before).split_with_sizes(sizes), *before.split_with_sizes(sizes)]
        norms = torch.stack(torch._foreach_norm(slices, 2)).square().view(2, self.groups).t()
        return norms if norms.device == device else norms.to(device)

    def forget(self) -> None:
        """Start over (the weights changed for another reason than an update: a restart, a resume)."""
        self.copy = None


def _sample(param: torch.Tensor, elements: int) -> torch.Tensor | None:
    """A strided view of at most ``elements`` values of ``param``, or ``None`` for tensors that cannot be read
    whole on this rank (sharded: a DTensor, a DeepSpeed ZeRO-3 partition) or at all (meta, empty)."""
    if param.is_meta or param.numel() == 0 or hasattr(param, "ds_id") or hasattr(param, "device_mesh"):
        return None
    if not param.is_floating_point() or not param.is_contiguous():
        return None
    flat = param.detach().view(-1)
    return flat[:: max(1, flat.numel() // elements)][:elements]


class LearningRates:
    """Each group's learning rate for the coming update: the lr of the optimizer's param group that holds the
    group's first trainable tensor (found once; the lr itself is read every step, a Python float: no sync)."""

    def __init__(self, optimizer: Any, probes: Probes) -> None:
        self.optimizer = optimizer
        groups = getattr(optimizer, "param_groups", None) or []
        where = {id(p): k for k, pg in enumerate(groups) for p in pg.get("params", [])}
        self.index: list[int | None] = [None] * len(probes.group_names)
        for (_, p), gi in zip(probes.params, probes.param_group):
            if self.index[gi] is None:
                self.index[gi] = where.get(id(p))

    def read(self) -> list[float | None]:
        groups = getattr(self.optimizer, "param_groups", None) or []
        out: list[float | None] = []
        for k in self.index:
            lr = groups[k].get("lr") if k is not None and k < len(groups) else None
            # An lr kept in a device tensor (capturable optimizers) is left out rather than read: no sync.
            out.append(float(lr) if isinstance(lr, (int, float)) else None)
        return out
