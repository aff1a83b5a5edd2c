"""CI smoke tests: a few real optimizer steps of your own model under a strict guard.

::

    from gradguard.testing import assert_healthy, smoke_test

    def test_training_is_healthy():
        model = build_model()                       # your set-up: PEFT wrapping, freezing, dtype …
        assert_healthy(smoke_test(model, [batch], expect_trainable=["vision", "connector"]))

``smoke_test`` restores the model's weights, buffers, train/eval mode, gradients and the RNG state when
it is done, so it can run on the real model right before real training (the cost: one copy of the
state dict in host memory). Pass ``restore=False`` on a throwaway model to skip that copy.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradguard.errors import TrainingHealthError
from gradguard.report.model import Finding, Report

LossFn = Callable[[Any, Any], torch.Tensor]


def smoke_test(
    model: nn.Module,
    batches: Iterable[Any],
    steps: int = 5,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    expect_trainable: str | Sequence[str] | None = None,
    lr: float = 1e-3,
    loss_fn: LossFn | None = None,
    max_grad_norm: float | None = 1.0,
    restore: bool = True,
    report_dir: str | Path | None = None,
    groups: Mapping[str, str] | None = None,
    thresholds: Mapping[str, Any] | None = None,
    strict: bool = True,
    console: bool = False,
    expect_learning: bool | float = False,
) -> Report:
    """Train ``model`` for ``steps`` optimizer steps on ``batches`` under a guard; return the report.

    The guard runs with ``on_fault="stop"`` (the run stops at the first fault, whose update is skipped)
    and ``strict=True`` (an internal error of gradguard fails your CI instead of disabling itself).
    The report comes back healthy or not: check it with :func:`assert_healthy` or ``report.ok``.

    Args:
        model: your model, set up as for training (PEFT-wrapped, frozen parts frozen, on its device).
        batches: a list of batches or any iterable (a ``DataLoader``); cycled until ``steps`` is reached.
            A mapping is called as ``model(**batch)``, a tuple or list as ``model(*batch)``, anything else
            as ``model(batch)``. Tensors are moved to the model's device.
        steps: optimizer steps to run (5 lets the dead-gradient detector, which waits 3 steps, speak).
        optimizer: your optimizer (its state is restored too); default ``AdamW(trainable params, lr)``.
        expect_trainable: group names, their short names or roles that must train (``["vision_tower",
            "connector"]``; the rule is ``GroupMap.match``'s, see docs/groups.md).
        loss_fn: ``loss_fn(output, batch) -> loss`` when the model's output has no ``.loss``.
        max_grad_norm: clip as your training does (``None``: no clipping).
        restore: put the weights, buffers, optimizer state, train/eval mode and RNG state back afterwards.
        report_dir: also write ``gradguard-report.json`` / ``.md`` there (a CI artifact).
        groups, thresholds: as for :class:`~gradguard.engine.guard.Guard`.
        strict: let gradguard's own errors propagate (the default here, unlike in training).
        console: print the report as well.
        expect_learning: also check that the set-up can learn (the classic "overfit one batch" check): pass one
            batch, enough ``steps`` (20 for a tiny model), and the loss must fall to 0.8 of its first value (or to
            the fraction given, e.g. ``0.5``), or the report gets a ``not_learning`` error (GG117) with each
            group's update-to-weight ratio.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> batches = [torch.randn(16, 4)]
    >>> report = smoke_test(model, batches, loss_fn=lambda output, batch: output.square().mean())
    >>> report.status, report.ok
    ('healthy', True)
    """
    from gradguard.engine.guard import Guard
    from gradguard.engine.probes import rng_state, set_rng_state

    if not isinstance(model, nn.Module):
        raise TypeError(f"smoke_test expects your torch.nn.Module, got {type(model).__name__}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    factor = _learning_factor(expect_learning)
    own_optimizer = optimizer is None
    optimizer = optimizer or _default_optimizer(model, lr)
    saved = _snapshot(model, None if own_optimizer else optimizer) if restore else None
    rng, was_training = rng_state(), model.training
    try:  # a static error (an expected group frozen, nothing trainable) stops it before the first step
        guard = Guard(
            model,
            optimizer,
            expect_trainable=expect_trainable,
            on_fault="stop",
            report_dir=report_dir,
            groups=groups,
            thresholds=thresholds,
            strict=strict,
            console=console,
        )
    except TrainingHealthError as stopped:
        return Report.from_dict(stopped.report)
    try:
        losses = _train(model, guard, optimizer, batches, steps, loss_fn, max_grad_norm)
        if factor is not None and not guard.stopped:
            guard.add_finding(*_not_learning(losses, factor, guard))
    finally:
        report = guard.close()  # every hook removed, even when the user's forward raised
        optimizer.zero_grad(set_to_none=True)
        if saved is not None:
            _restore(model, None if own_optimizer else optimizer, saved)
        set_rng_state(rng)
        model.train(was_training)
    return report


def _train(
    model: nn.Module,
    guard: Any,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    steps: int,
    loss_fn: LossFn | None,
    max_grad_norm: float | None,
) -> list[float]:
    """The training loop, checked by ``guard`` every step; the raw loss of each step the guard saw."""
    model.train()
    device = _device_of(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    it = _cycle(batches)
    losses: list[float] = []
    for _ in range(steps):
        batch = _to_device(next(it), device)
        output = _call(model, batch)
        loss = _loss_of(output, batch, loss_fn)
        guard.record_loss(loss)  # a no-op when the model's output carried it (the guard saw it there)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        go_on = guard.check()
        if guard.last is not None and guard.last.loss is not None:
            losses.append(guard.last.loss)  # read in the guard's own sync: no extra one
        if not go_on:  # a fault: the poisoned update was skipped
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def _default_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            "smoke_test: nothing in the model requires grad, so there is nothing to train; unfreeze the "
            "parts you mean to train (or pass the model as your training set-up builds it)"
        )
    return torch.optim.AdamW(trainable, lr=lr)


def _learning_factor(expect_learning: bool | float) -> float | None:
    """The loss must end at or below this fraction of its first value (``True``: 0.8, a fifth lower)."""
    if expect_learning is False:
        return None
    factor = 0.8 if expect_learning is True else expect_learning
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
        raise ValueError(
            "expect_learning must be True (the loss must fall to 0.8 of its first value) or the fraction to fall to, "
            f"between 0 and 1 (e.g. 0.5); got {expect_learning!r}"
        )
    return float(factor)


def _not_learning(losses: list[float], factor: float, guard: Any) -> list[Finding]:
    """The ``not_learning`` finding when the loss did not fall to ``factor`` of its first value."""
    if len(losses) < 2 or not all(map(math.isfinite, losses)) or losses[-1] <= factor * losses[0]:
        return []
    last = guard.last
    ratios = ", ".join(f"{g}: {r:.1e}" for g, r in (last.update_ratio if last else {}).items()) or "not measured"
    return [
        Finding.of(
            "not_learning",
            f"on a repeated batch the loss went from {losses[0]:.4g} to {losses[-1]:.4g} in {len(losses)} steps; "
            f"it should have fallen to {factor:g} of its first value. Update-to-weight ratio of the last step, per "
            f"group: {ratios}",
            "check the learning rate and the optimizer's param groups (a ratio ~0 is a group that does not move), "
            "that the loss depends on what trains, and that the labels are what the model should predict; or "
            "give more steps",
            step=guard.step,
            phase="optimizer",
        )
    ]


def assert_healthy(report: Report | Mapping[str, Any] | str | Path) -> Report:
    """Fail (``AssertionError``) with the rendered report unless the run was healthy; return the report.

    Healthy means no fault and no error finding (warnings pass). ``report`` may be a :class:`Report`, its
    dict, or the path of a ``gradguard-report.json`` (or of the folder holding it).

    >>> from gradguard.report.model import Report
    >>> assert_healthy(Report()).status
    'healthy'
    """
    from gradguard.report.render import to_text

    if isinstance(report, (str, Path)):
        report = Report.load(report)
    elif isinstance(report, Mapping):
        report = Report.from_dict(dict(report))
    elif not isinstance(report, Report):
        raise TypeError(
            f"assert_healthy expects a gradguard Report (from smoke_test, Guard.close() or Report.load), "
            f"got {type(report).__name__}"
        )
    if not report.ok:
        raise AssertionError(f"gradguard: the training run is not healthy\n{to_text(report)}")
    return report


# -- helpers ------------------------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def _cycle(batches: Iterable[Any]) -> Iterator[Any]:
    """Cycle a list or a re-iterable (DataLoader); a one-shot iterator is cached on its first pass."""
    if isinstance(batches, (Mapping, torch.Tensor)):
        raise TypeError("batches must be a list (or iterable) of batches; wrap a single batch as [batch]")
    one_shot = iter(batches) is batches
    seen: list[Any] = []
    while True:
        source = seen if one_shot and seen else batches
        count = 0
        for b in source:
            count += 1
            if one_shot and source is batches:
                seen.append(b)
            yield b
        if count == 0:
            raise ValueError("smoke_test: batches is empty; pass at least one batch")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _loss_of(output: Any, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    if loss_fn is not None:
        loss: torch.Tensor | None = loss_fn(output, batch)
    else:
        from gradguard.engine.probes import find_loss

        loss = find_loss(output)
        if loss is None:
            raise ValueError(
                f"smoke_test: the model's output ({type(output).__name__}) has no loss; put labels in the batch "
                "(Hugging Face models then return .loss) or pass loss_fn=lambda output, batch: ..."
            )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"smoke_test: the loss must be a scalar tensor, got {loss!r:.80}")
    return loss


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    # Parameters and buffers themselves (not state_dict(), whose hooks may hand out converted copies).
    yield from model.named_parameters()
    yield from model.named_buffers()


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    # On the CPU: a smoke test must not double the accelerator memory the real run needs.
    def cpu(v: Any) -> Any:
        return v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v)

    opt_state = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        opt_state = {
            "state": {k: {n: cpu(v) for n, v in st.items()} for k, st in sd["state"].items()},
            "param_groups": copy.deepcopy(sd["param_groups"]),
        }
    return {"model": {k: cpu(v) for k, v in _tensors(model)}, "optimizer": opt_state}


@torch.no_grad()
def _restore(model: nn.Module, optimizer: torch.optim.Optimizer | None, saved: dict[str, Any]) -> None:
    # In-place copies keep every Parameter object (the user's optimizer holds references to them).
    for k, v in _tensors(model):
        if k in saved["model"]:
            v.copy_(saved["model"][k])
    if optimizer is not None and saved["optimizer"] is not None:
        optimizer.load_state_dict(saved["optimizer"])  # moves the state back to the parameters' devices
