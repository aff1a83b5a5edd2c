"""Policy: what to do about a diagnosis (:func:`decide`, pure), and the one place that does it (:func:`apply`).

The split follows Lightning's ``EarlyStopping``: deciding (``_evaluate_stopping_criteria``) is kept apart from
the only code that touches the trainer. :func:`decide` is a pure function of the diagnosis, the user's
``on_fault`` and the ranks' agreement; :func:`apply` is the only code in gradguard that drops an update, sets
the stop flag or raises :class:`~gradguard.errors.TrainingHealthError`. Every front door (a plain loop, the HF
``Trainer``, Lightning, DeepSpeed's optimizer step) goes through it.

Skipping a poisoned update means dropping every gradient before ``optimizer.step()``: torch optimizers skip
parameters without a gradient (no update, no weight decay, no moment update), so the weights stay bitwise
unchanged while the step counter and the LR scheduler move on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from torch import nn

from gradguard.engine.diagnosis import Diagnosis
from gradguard.errors import TrainingHealthError

OnFault = Literal["stop", "raise", "warn"]
ON_FAULT: tuple[OnFault, ...] = ("stop", "raise", "warn")

log = logging.getLogger("gradguard")


@dataclass(frozen=True)
class Action:
    """What :func:`apply` does about one step."""

    record: bool = False  # a fault to record in the report
    skip_update: bool = False  # drop this step's gradients: the coming optimizer.step() changes nothing
    stop: bool = False  # stop training after this step
    raise_error: bool = False  # then raise TrainingHealthError, once the report is written
    let_through: bool = False  # on_fault="warn": a poisoned update reaches the weights
    defer: bool = False  # seen by this rank after the ranks agreed: flag it at the next step, all stop then
    reason: str = ""  # the sentence TrainingHealthError carries


CONTINUE = Action()
STOPPED = Action(skip_update=True, stop=True)  # every step after a stop: nothing more reaches the weights


def decide(
    diagnosis: Diagnosis | None,
    on_fault: OnFault,
    *,
    world: int = 1,
    agreed: bool = True,
    stopped: bool = False,
    static_stop_raises: bool = True,
) -> Action:
    """The action for this step (pure).

    ``agreed``: whether the ranks' all-reduced flags marked this step (every rank knows); a rank that found
    something the flags did not carry must not act alone: it defers to the next step, where its flag makes
    every rank stop together. In one process ``agreed`` does not matter. Only an error stops a run; a warning
    or an info finding is recorded elsewhere and training goes on. A static error (found before step 1) under
    ``on_fault="stop"`` raises when ``static_stop_raises``: most loops (the HF Trainer's among them) cannot stop
    before their first step, and raising is the one way to guarantee that nothing trains.

    >>> from gradguard.report.model import Finding, Origin
    >>> nan = Diagnosis(Finding.of("nonfinite_loss", "step 3: the loss is nan", "fix it", step=3), Origin("forward"))
    >>> decide(nan, "stop").skip_update, decide(nan, "warn").let_through
    (True, True)
    >>> decide(nan, "stop", world=2, agreed=False).defer  # one rank alone: stop with the others next step
    True
    """
    if stopped:
        return STOPPED
    if diagnosis is None or diagnosis.finding.severity != "error":
        return CONTINUE
    if world > 1 and not agreed:
        return Action(defer=True)
    finding = diagnosis.finding
    if on_fault == "warn":
        return Action(record=True, let_through=finding.kind.startswith("nonfinite"))
    if diagnosis.origin.phase == "static":
        reason = (
            f"{finding.code} {finding.kind} before step 1: {finding.message}. Training was stopped before its "
            "first step: nothing was trained. Fix the set-up (the hint in the report), or pass on_fault='warn' "
            "to train anyway"
        )
        raises = on_fault == "raise" or static_stop_raises
        return Action(record=True, skip_update=True, stop=True, raise_error=raises, reason=reason)
    reason = f"{finding.code} {finding.kind} at step {finding.step}: {finding.message}"
    return Action(record=True, skip_update=True, stop=True, raise_error=on_fault == "raise", reason=reason)


class Run(Protocol):
    """What :func:`apply` acts on (a :class:`~gradguard.engine.guard.Guard`)."""

    model: nn.Module
    optimizer: Any
    stopped: bool

    def close(self) -> Any: ...


def apply(action: Action, run: Run) -> bool:
    """Carry out ``action`` on ``run``: the only code that changes training. Returns whether training may go on.

    >>> import torch
    >>> class Loop:  # anything with a model, an optimizer and a stop flag
    ...     model = torch.nn.Linear(2, 1); optimizer = None; stopped = False
    ...     def close(self): raise AssertionError("only on_fault='raise' closes the run")
    >>> run = Loop(); run.model(torch.ones(1, 2)).sum().backward()
    >>> apply(STOPPED, run), run.stopped, run.model.weight.grad is None
    (False, True, True)
    """
    if action.skip_update:
        drop_update(run.model, run.optimizer)
    if action.stop:
        run.stopped = True
    if action.raise_error:
        raise TrainingHealthError(action.reason, run.close().to_dict())
    return not action.stop


def drop_update(model: nn.Module, optimizer: Any | None = None) -> None:
    """Drop every gradient so that the coming ``optimizer.step()`` changes nothing.

    Optimizers that keep reduced gradients of their own (DeepSpeed's ZeRO and bf16 optimizers, reached through
    Accelerate's wrappers) are told the step overflowed, as DeepSpeed does itself for an fp16 overflow: its
    engine then counts the step as skipped and leaves the LR schedule alone. Found by duck typing: gradguard
    never imports DeepSpeed.

    >>> import torch
    >>> m = torch.nn.Linear(2, 1); m(torch.ones(1, 2)).sum().backward(); drop_update(m)
    >>> m.weight.grad is None
    True
    """
    for p in model.parameters():
        p.grad = None
    for opt in _wrapped(optimizer):
        for group in getattr(opt, "param_groups", None) or []:
            for p in group["params"]:
                p.grad = None
        if type(opt).__module__.startswith("deepspeed.runtime") and hasattr(opt, "overflow"):
            try:
                opt.zero_grad(set_to_none=True)
                averaged = getattr(opt, "averaged_gradients", None)
                if isinstance(averaged, dict):
                    for key in averaged:
                        averaged[key] = None
                opt.overflow = True
            except Exception as exc:  # its step is not run either way: the update cannot happen
                log.warning("gradguard: could not drop DeepSpeed's gradients (%s); training stops anyway", exc)


def _wrapped(optimizer: Any | None) -> Iterator[Any]:
    """``optimizer`` and the optimizers it wraps (Accelerate -> DeepSpeed -> torch), outermost first."""
    seen = 0
    while optimizer is not None and seen < 4:
        yield optimizer
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
