"""``GradGuardCallback``: gradguard for PyTorch Lightning (``pip install gradguard[lightning]``).

A thin adapter: Lightning's hooks drive :class:`gradguard.engine.guard.Guard`.

- ``on_train_start``: groups, static audit, hooks (the optimizers exist by then).
- ``on_before_backward``: hands the ``training_step`` loss to the guard, for modules whose forward does
  not return it.
- ``on_before_optimizer_step``: Lightning calls it inside ``optimizer.step(closure)``, after the
  closure ran forward and backward, before gradient clipping and before the optimizer reads a single
  gradient (``Precision._after_closure``; under a fp16 GradScaler, after ``unscale_``). This is where
  the step is checked. A poisoned update is skipped by setting every ``.grad`` to ``None``: the
  optimizer then leaves every weight untouched (clipping and the GradScaler skip missing grads too).
- ``on_fault="stop"`` stops through Lightning's own mechanism (``trainer.should_stop = True``: the
  current step finishes, then ``fit`` returns); ``"raise"`` raises :class:`TrainingHealthError` out of
  ``trainer.fit``.
- ``on_train_end`` / ``on_exception``: removes the hooks and writes ``gradguard-report.json`` / ``.md``
  to ``report_dir`` (default: ``trainer.log_dir``, which is ``default_root_dir`` without a logger).
- checkpoints: the guard's history is saved in the callback's ``state_dict`` and restored on resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from gradguard.engine.guard import Guard
from gradguard.engine.options import Options
from gradguard.report.model import Report


class _AllOptimizers:
    """Several optimizers seen as one (the guard only reads ``param_groups`` for its coverage audit)."""

    def __init__(self, optimizers: Sequence[Any]) -> None:
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]


@dataclass(eq=False)
class GradGuardCallback(Options, Callback):
    """Training-health guard for ``lightning.Trainer``.

    >>> from gradguard.integrations.lightning import GradGuardCallback
    >>> trainer = lightning.Trainer(callbacks=[GradGuardCallback(expect_trainable=["vpm"])])  # doctest: +SKIP
    >>> trainer.fit(module, loader)                                                           # doctest: +SKIP
    >>> callback.report.status                                                                # doctest: +SKIP
    'healthy'

    Takes the :class:`~gradguard.engine.options.Options` (``expect_trainable``, ``on_fault``, ``report_dir``,
    ``groups``, ``thresholds``, ``strict``, ``console``, ``localize``, ``trace``), plus:

    Args:
        module: the attribute path of the network inside the ``LightningModule`` (``"model"``). By default
            the guard watches the one child module that holds every parameter (the usual
            ``self.model = ...`` pattern), so group names read as the network's own (``vpm``, ``resampler``)
            and the network's own forward (its ``.loss``, its inputs) is observed; with several children,
            the ``LightningModule`` itself is watched.
    """

    module: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.guard: Guard | None = None
        self.report: Report | None = None  # set when training ends
        self._resume: dict[str, Any] | None = None

    # -- Lightning hooks --------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = list(trainer.optimizers)
        optimizer: Any = optimizers[0] if len(optimizers) == 1 else _AllOptimizers(optimizers) if optimizers else None
        options = self.as_options()
        options.report_dir = self.report_dir if self.report_dir is not None else trainer.log_dir
        options.console = self.console and trainer.is_global_zero
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # fp16 "16-mixed" on GPU only
        # Lightning's fit loop checks should_stop before its first step: a static error stops it there, no raise.
        module = self.watched_module(pl_module)
        guard = Guard(module, optimizer, options=options, scaler=scaler, stops_before_first_step=True, start=False)
        if self._resume:
            guard.load_state_dict(self._resume)
        self.guard, self.report = guard, None
        guard.start()
        if guard.stopped:  # a static error (e.g. an expected group is frozen): stop before step 1
            trainer.should_stop = True

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self.guard is not None and not self.guard.disabled:
            self.guard.record_loss(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Inside optimizer.step(closure): backward is done, the update is not. global_step counts the
        # optimizer steps completed, so the one about to happen is global_step + 1.
        if self.guard is not None and not self.guard.check(step=trainer.global_step + 1):
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close(exception)  # the report says how the run ended (our own TrainingHealthError is the fault)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"guard": self.guard.state_dict()} if self.guard is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_train_start; the guard picks this up when it is built.
        self._resume = state_dict.get("guard")

    # -- helpers ----------------------------------------------------------------------------------------
    def watched_module(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module the guard watches: ``module`` if given, else the one child holding every parameter."""
        if self.module is not None:
            try:
                return pl_module.get_submodule(self.module)
            except AttributeError:
                children = ", ".join(n for n, _ in pl_module.named_children()) or "none"
                raise ValueError(
                    f"GradGuardCallback(module={self.module!r}): {type(pl_module).__name__} has no such submodule; "
                    f"its children are: {children}"
                ) from None
        every = {id(p) for p in pl_module.parameters()}
        holders = [m for _, m in pl_module.named_children() if any(True for _ in m.parameters())]
        if len(holders) == 1 and {id(p) for p in holders[0].parameters()} == every:
            return holders[0]
        return pl_module

    def _close(self, error: BaseException | None = None) -> None:
        if self.guard is not None and self.report is None:
            self.report = self.guard.close(error)
