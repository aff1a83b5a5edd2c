"""The update-to-weight ratio ``|dW| / |W|`` of each group: how far one optimizer step really moves the weights.

It is the effective learning rate a group gets (about 1e-3 is typical for Adam fine-tunes), whatever the
configured learning rate, the scheduler, the warm-up or LoRA's scaling made of it. A ratio near 0 means the weights
do not move although gradients flow (a warm-up given in steps where a ratio was meant, ``learning_rate=0``,
``lora_alpha=0``); a ratio near 1 means one step rewrites the weights.

Measured without a second copy of the weights: a fixed *sample* of each group is kept, up to ``tensors``
tensors spread over the group, each read through a strided view of at most ``elements`` values (a view: no copy).
At every check the sample's difference to the previous check's copy is the update of the step in between; then
the copy is refreshed in place. That is a few fused ``_foreach`` kernels over at most ``tensors x elements``
values per group, on the device, and the two squared norms per group ride in the guard's one host read.
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

    def __init__(self, probes: Probes, *, tensors: int = 16, elements: int = 1024) -> None:
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
        self.copy: list[torch.Tensor] | None = None
        self._index: dict[torch.device, torch.Tensor] = {}

    def measure(self, device: torch.device) -> torch.Tensor | None:
        """``[groups x 2]`` on ``device``: the squared norm of the sample's change since the last call, and of the
        sample before it (no host sync). ``None`` on the first call, and when nothing can be sampled."""
        if not self.views:
            return None
        if self.copy is None:
            self.copy = [v.detach().clone() for v in self.views]
            return None
        moved = torch._foreach_norm(torch._foreach_sub(self.views, self.copy), 2)
        sizes = torch._foreach_norm(self.copy, 2)  # the weights before the update
        torch._foreach_copy_(self.copy, self.views)
        both = [torch.stack([m.float(), w.float()]).to(device) for m, w in zip(moved, sizes)]  # dtypes may differ
        per_view = torch.stack(both).square()
        if device not in self._index:
            self._index[device] = torch.tensor(self.owner, device=device, dtype=torch.long)
        return torch.zeros(self.groups, 2, device=device).index_add_(0, self._index[device], per_view)

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
