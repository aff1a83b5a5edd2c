"""DeepSpeed ZeRO (stages 1-3, and its bf16 optimizer): read gradients through DeepSpeed, check before its step.

Why a path of its own: under ZeRO a gradient is not in ``param.grad`` when anyone looks. During backward
ZeRO reduces every gradient into the partition of the rank that owns it and frees ``.grad``; and under the
HF Trainer (Accelerate) the engine's optimizer step runs *inside* ``accelerator.backward()``, before
``on_pre_optimizer_step``, after which DeepSpeed drops the gradients ("only available immediately after
backward and before engine step"). A callback would find no gradients, and the update already applied.

So the guard wraps the ZeRO optimizer's ``step`` (an attribute on that one instance, removed again with the
guard's hooks on ``Guard.close()``). Right before DeepSpeed's step, on every rank:

1. each trainable parameter's gradient is read through DeepSpeed's API as this rank's *partition*
   (``deepspeed.utils.safe_get_local_grad`` under ZeRO-3; under ZeRO-1/2 and the bf16 optimizer, the
   fragment of the reduced gradient that ``safe_get_full_grad`` would all-reduce into the full tensor).
   No full gradient is assembled: ``safe_get_full_grad`` would cost one full-size all-reduce per
   parameter per step;
2. :meth:`Guard.check` runs: the squared norms of the partitions go into its one all-reduce with the
   fault flags, so every rank gets the full per-group norms, equal to one process's;
3. on a fault (``on_fault="stop"`` or ``"raise"``) DeepSpeed's step is not run and its gradients are
   dropped, as DeepSpeed itself does for an fp16 overflow: the weights stay as they were.

The Trainer callback's own check for that step then finds nothing new and returns the decision already
taken. ``deepspeed`` is imported only when the optimizer is DeepSpeed's. :meth:`Guard.start` attaches this
by itself when the optimizer it is given is DeepSpeed's (the HF callback's and a hand-written loop's alike);
in a hand-written DeepSpeed loop, build the guard with the engine's optimizer and do not call
``guard.check()`` yourself::

    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=cfg)
    guard = Guard(engine.module, engine.optimizer)        # checks inside engine.step()
    for batch in loader:
        engine.backward(engine(**batch).loss)
        engine.step()
        if guard.stopped:
            break
    guard.close()
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from gradguard.engine import distributed
from gradguard.engine.probes import grad_norm

if TYPE_CHECKING:
    from gradguard.engine.guard import Guard

log = logging.getLogger("gradguard")


def zero_optimizer(optimizer: Any) -> Any | None:
    """The optimizer DeepSpeed steps behind ``optimizer`` (Accelerate's wrapper, or itself), else ``None``.

    That is DeepSpeed's ZeRO / bf16 optimizer, or, under Accelerate, whatever optimizer DeepSpeed's engine
    steps inside ``accelerator.backward()`` (also without ZeRO).

    >>> zero_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)) is None
    True
    """
    inner, depth = optimizer, 0
    while inner is not None and depth < 4:
        cls = type(inner)
        if cls.__name__ == "DeepSpeedOptimizerWrapper":  # Accelerate: the engine steps inside backward()
            return getattr(inner, "optimizer", None)
        ours = cls.__module__.startswith("deepspeed.runtime") and cls.__name__ != "DeepSpeedEngine"
        if ours and callable(getattr(inner, "step", None)) and hasattr(inner, "param_groups"):
            return inner
        inner, depth = getattr(inner, "optimizer", None), depth + 1
    return None


def local_grad(param: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """This rank's piece of ``param``'s reduced gradient, and its weight in the sum over the ranks.

    ``None``: this rank holds no part of it. Valid only between DeepSpeed's backward and its optimizer
    step, which is when the guard calls it. The weight makes ``sum over ranks of weight * |piece|^2`` the
    full gradient's squared norm.
    """
    if hasattr(param, "ds_id"):  # ZeRO-3: every rank owns a slice of every parameter
        from deepspeed.utils import safe_get_local_grad

        return safe_get_local_grad(param), _partition_weight(param)
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer
        mapping = param._hp_mapping
        if mapping is None:  # this rank's partition holds no part of this parameter
            return None, _partition_weight(param)
        fragment = mapping.get_lp_grad_fragment(param._index_in_param_group).reshape(-1)  # type: ignore[attr-defined]
        address = mapping.lp_fragment_address
        if fragment.numel() != address.numel:  # the bf16 optimizer keeps the whole gradient: take our part
            fragment = fragment.narrow(0, address.start, address.numel)
        return fragment, _partition_weight(param)
    # Not partitioned (no ZeRO): the whole gradient, already averaged over the ranks, the same on each.
    return param.grad, 1.0 / distributed.world()


def _partition_weight(param: torch.Tensor) -> float:
    """Share of the world holding each distinct partition (data-parallel group size / world size)."""
    group = getattr(param, "ds_process_group", None) or getattr(param, "_dp_group", None)
    size = torch.distributed.get_world_size(group) if group is not None else distributed.world()
    return size / distributed.world()


class StepHook:
    """Runs the guard right before DeepSpeed's optimizer step; :meth:`remove` restores the step."""

    def __init__(self, guard: Guard, optimizer: Any) -> None:
        self.guard = guard
        self.optimizer = optimizer
        self.original = optimizer.step
        optimizer.step = self.step  # on this instance only

    def remove(self) -> None:
        if self.optimizer.__dict__.get("step") == self.step:
            del self.optimizer.step

    def step(self, *args: Any, **kwargs: Any) -> Any:
        guard = self.guard
        if not guard.disabled and not guard.stopped:
            try:
                self._read_partitions()
            except Exception as exc:  # a bug in gradguard never kills the run
                guard.contain(exc)
        # May raise TrainingHealthError (on_fault="raise"): DeepSpeed's step is not run. On a fault the guard's
        # policy has dropped this step's gradients (DeepSpeed's own buffers too): the step must not run.
        if not guard.check():
            return None
        return self.original(*args, **kwargs)

    def _read_partitions(self) -> None:
        probes = self.guard.probes
        if probes is None:
            return
        norms, weights = {}, {}
        for i, (_, p) in enumerate(probes.params):
            g, weights[i] = local_grad(p)
            # A rank without a part of this gradient contributes 0 to the sum over the ranks.
            norms[i] = grad_norm(g) if g is not None else torch.zeros((), device=p.device)
        probes.set_grad_norms(norms, weights)


def attach(guard: Guard) -> bool:
    """Route the guard's gradient reading and check through DeepSpeed's optimizer step, when DeepSpeed trains.

    :meth:`Guard.start` calls it once the probes are attached; returns whether DeepSpeed was found. The hook
    is removed with the guard's other hooks.

    >>> from gradguard import Guard
    >>> model = torch.nn.Linear(2, 1)
    >>> guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), console=False)
    >>> attach(guard)  # a torch optimizer: nothing to do
    False
    >>> _ = guard.close()
    """
    optimizer = zero_optimizer(guard.optimizer)
    if optimizer is None or guard.probes is None:
        return False
    guard.probes.own(StepHook(guard, optimizer))
    guard.probes.batched = False  # DeepSpeed's hooks move gradients into its partitions during backward
    log.info("gradguard: DeepSpeed %s found: checking inside its optimizer step", type(optimizer).__name__)
    return True
