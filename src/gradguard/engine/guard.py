"""``Guard``: the framework-free engine. Integrations (the HF Trainer callback, Lightning) are thin
adapters around it; a hand-written loop uses it directly::

    guard = Guard(model, optimizer)                 # 1: audit + hooks
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        if not guard.check():                       # 2: before optimizer.step(); False = stop
            break
        optimizer.step(); optimizer.zero_grad()
    guard.close()                                   # 3: remove hooks, write the report

Each step is one chain (docs/architecture.md): ``stats = read`` (probes -> one host sync) -> ``diagnosis =
diagnose(stats)`` (pure detectors, plus the replay on a fault) -> ``action = policy.decide(...)`` (pure) ->
``policy.apply(action)``, the one place that changes training.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradguard.core.audit import Audit, audit_requires_grad
from gradguard.engine import detectors, distributed, policy, shutdown, zero
from gradguard.engine.checker import Checker
from gradguard.engine.detectors import Thresholds
from gradguard.engine.diagnosis import Diagnosis
from gradguard.engine.history import History
from gradguard.engine.journal import Journal, ReportWriter, environment, print_report
from gradguard.engine.options import Options
from gradguard.engine.probes import Probes
from gradguard.engine.read import params_finite
from gradguard.engine.stats import GroupContext, StepStats
from gradguard.engine.trends import Trends
from gradguard.errors import ConfigurationError
from gradguard.report.model import Fault, Finding, Report

log = logging.getLogger("gradguard")

Explain = Callable[[Diagnosis], Mapping[str, Any]]
AmendHints = Callable[[Sequence[Finding], Mapping[str, str]], object]


class Guard:
    """Watch a model's training: record, detect, attribute, and stop before a poisoned update.

    Args:
        model: the module being trained (a PeftModel, a DDP/FSDP-wrapped module, a compiled one …).
        optimizer: checked for coverage of the trainable parameters, and read for the learning rates (optional).
        options: an :class:`~gradguard.engine.options.Options`, or its fields as keywords (``expect_trainable``,
            ``on_fault``, ``report_dir``, ``groups``, ``thresholds``, ``strict``, ``console``, ``localize``,
            ``trace``, ``severity``).
        scaler: the fp16 ``GradScaler``, whose skipped steps are overflows it handles, not faults.
        explain: extra evidence for a fault from a front door that knows the framework (the HF callback says
            how the Trainer's logs show a NaN loss); ``amend_hints``: called with the audit's findings and
            ``{group: role}`` before they are recorded (the framework's own switch goes into the hints).
        history_size, param_check_every: steps of history kept at full resolution before it thins out; how often
            (in steps) every trainable weight is checked for NaN/Inf.
        stops_before_first_step: the front door can stop its loop before the first step (Lightning's
            ``should_stop``). Otherwise a static error under ``on_fault="stop"`` raises
            :class:`TrainingHealthError` at :meth:`start`, so that no forward, backward or update runs at all.
        start: build groups, audit and hooks now (``False``: call :meth:`start` later).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> guard = Guard(model, opt, console=False)
    >>> model(torch.randn(2, 4)).sum().backward()
    >>> guard.check()
    True
    >>> guard.close().status
    'healthy'
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any | None = None,
        *,
        options: Options | None = None,
        scaler: Any | None = None,
        explain: Callable[[Diagnosis], Sequence[Mapping[str, Any]]] | None = None,
        amend_hints: Callable[[Sequence[Finding], Mapping[str, str]], object] | None = None,
        history_size: int = 2048,
        param_check_every: int = 100,
        stops_before_first_step: bool = False,
        start: bool = True,
        **knobs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Guard expects the torch.nn.Module being trained, got {type(model).__name__}")
        self.options = Options.of(options, knobs, history_size=history_size, param_check_every=param_check_every)
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.explain, self.amend_hints = explain, amend_hints
        self.param_check_every, self.stops_before_first_step = param_check_every, stops_before_first_step
        self.step = 0  # optimizer steps checked so far (1-based numbering in reports)
        self.stopped = self.disabled = self._closed = self._warned_idle = False
        self.journal = Journal(history_size)
        self.trends = Trends(Thresholds.from_dict(self.options.thresholds))
        self.contexts: dict[str, GroupContext] = {}
        self.last: StepStats | None = None
        self.audit: Audit | None = None
        self.checker: Checker | None = None
        self._crash: Exception | None = None  # the model's forward raised (cleared when training goes on)
        self.writer = ReportWriter(Path(self.options.report_dir)) if self.options.report_dir is not None else None
        if start:
            self.start()

    # -- what the run has shown ----------------------------------------------------------------------------
    @property
    def findings(self) -> list[Finding]:
        return self.journal.findings

    @property
    def fault(self) -> Fault | None:
        return self.journal.fault

    @property
    def history(self) -> History:
        return self.journal.history

    @property
    def probes(self) -> Probes | None:
        return self.checker.probes if self.checker is not None else None

    @property
    def report_dir(self) -> Path | None:
        return self.writer.folder if self.writer is not None else None

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self, optimizer: Any | None = None) -> Audit:
        """Build groups, run the static audit, attach the probes; returns the audit. A static error (an expected
        group frozen, trainable tensors missing from the optimizer, nothing trainable) is a fault before step 1.
        Calling it again (to hand over the optimizer once it exists) restarts the guard: the earlier hooks come
        off first, so they never fire twice."""
        self.optimizer = optimizer if optimizer is not None else self.optimizer
        self._detach()
        shutdown.register(self)  # an interrupted run still removes its hooks and writes its report
        opts = self.options
        try:
            audit = self.audit = audit_requires_grad(self.model, opts.expect_trainable, self.optimizer, opts.groups)
            gmap = audit.group_map
            assert gmap is not None
            expected = {g.name for selector in opts.expected for g in gmap.match(selector)}
            self.contexts = {g.name: GroupContext(g.name, g.role, g.trainable, g.name in expected) for g in gmap}
            audit.findings[:] = [opts.rated(f) for f in audit.findings]
            if self.amend_hints is not None:
                self.amend_hints(audit.findings, {name: c.role for name, c in self.contexts.items()})
            self.journal.add(audit.findings)
            self.journal.environment = environment(self.model, self.optimizer, self.scaler)
        except ConfigurationError:
            shutdown.unregister(self)
            raise  # bad input (an unknown group, a bad role): a clear error before any step runs
        except Exception as exc:  # a bug of gradguard's: training goes on without it
            self.contain(exc)
            return Audit(groups=[], findings=list(self.findings))
        try:
            self.checker = Checker(
                self.model, gmap, options=opts, contexts=self.contexts, trends=self.trends, journal=self.journal,
                optimizer=self.optimizer, scaler=self.scaler, param_check_every=self.param_check_every,
                on_error=self.contain, on_crash=self._crashed,
            )  # fmt: skip
            zero.attach(self)  # under DeepSpeed, check inside its optimizer step
        except Exception as exc:
            self.contain(exc)
        static = detectors.static_fault(audit.findings, self.contexts)
        if static is not None:
            raises = not self.stops_before_first_step
            self._apply(policy.decide(static, opts.on_fault, static_stop_raises=raises), static)
        return audit

    def close(self, error: BaseException | None = None, *, signal: str | None = None) -> Report:
        """Remove every hook, run the final checks and write the report (idempotent). ``error``: the exception
        that ended training, if one did (status ``aborted``; ``interrupted`` for a ``KeyboardInterrupt``);
        ``signal``: the signal that stopped the process."""
        if self._closed:
            return self.report()
        self._closed = True
        self._detach()
        self.journal.ended(error or self._crash, self.step, signal)
        try:
            if not self.disabled and self.step:
                self.journal.add(map(self.options.rated, self.trends.finish(self.contexts)))
                if not params_finite(self.model) and not any(f.kind == "nonfinite_param" for f in self.findings):
                    self.journal.add([detectors.nonfinite_params(self.step, "after")])
            report = self.report()
        except Exception as exc:
            self.contain(exc)
            env = {**self.journal.environment, "steps": self.step, "disabled": True}
            report = Report("fault" if self.fault else "healthy", self.fault, list(self.findings), environment=env)
        try:
            if self.options.console and distributed.rank() == 0:  # printed first: a failure to print is in the file
                print_report(report)
        except Exception as exc:
            self.contain(exc)
            report.findings, report.environment = list(self.findings), {**report.environment, "disabled": True}
        shutdown.unregister(self)
        self.write(report)
        return report

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        self.close(error)

    # -- the step ----------------------------------------------------------------------------------------
    def check(self, step: int | None = None) -> bool:
        """Call after backward (and clipping) and before ``optimizer.step()``.

        Reads this step's statistics with one host sync, runs the detectors and applies the policy. Returns
        ``True`` when training may go on; on a fault with ``on_fault="stop"`` the poisoned update is skipped
        (every ``.grad`` is set to ``None``) and ``False`` is returned; with ``"raise"`` a
        :class:`TrainingHealthError` follows. A check with no backward since the last one counts no step and
        repeats the last decision (it warns once: the loop probably calls it before ``backward()``).
        """
        checker = self.checker
        if checker is None or checker.idle:
            if checker is not None and step != self.step:  # not a front door's second look (DeepSpeed's step)
                self._warn_idle()
            self.step = step if step is not None else self.step  # the front door's numbering, if it has one
            self._reset()
            return not self.stopped
        self.step = step if step is not None else self.step + 1
        self._crash = None  # a forward that raised earlier was caught: training went on
        if self.stopped or self.disabled or self._closed:
            self._reset()
            return policy.apply(policy.STOPPED, self) if self.stopped else True
        try:
            self.last, diagnosis, action = checker.step(self.step, faulted=self.fault is not None)
        except Exception as exc:
            self.contain(exc)
            return True
        finally:
            self._reset()
        return self._apply(action, diagnosis)

    def record_loss(self, loss: torch.Tensor) -> None:
        """Record one micro-batch's loss when the model's forward does not return it (call before backward).

        The guard reads ``outputs.loss`` from the model's forward by itself; a loss computed outside the model
        (``loss = loss_fn(model(x), y)``) it cannot see. Without it a NaN loss is still caught (as non-finite
        gradients) but not called a loss fault, and a diverging or collapsing loss goes unnoticed.

        >>> import torch
        >>> model = torch.nn.Linear(4, 1)
        >>> guard = Guard(model, console=False)
        >>> loss = torch.nn.functional.mse_loss(model(torch.randn(2, 4)), torch.zeros(2, 1))
        >>> guard.record_loss(loss)
        >>> loss.backward()
        >>> guard.check(), guard.last.losses == [loss.item()]
        (True, True)
        >>> guard.close().status
        'healthy'
        """
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            what = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"record_loss expects the scalar loss tensor you call backward() on, got {what}")
        if not self.disabled and self.checker is not None:
            try:
                self.checker.probes.add_loss(loss)
            except Exception as exc:
                self.contain(exc)

    def _apply(self, action: policy.Action, diagnosis: Diagnosis | None) -> bool:
        """Record the decision (the fault, a skipped update), then let :func:`policy.apply` carry it out."""
        if action.record and diagnosis is not None:
            if self.explain is not None and self.fault is None:
                diagnosis = diagnosis.with_evidence(*self.explain(diagnosis))
            self.journal.poison_let_through |= action.let_through
            static = diagnosis.origin.phase == "static"
            intact = static or (
                action.skip_update and not self.journal.poison_let_through and params_finite(self.model)
            )
            fault = self.journal.add_fault(diagnosis, 0 if static else self.step, intact)
            if action.skip_update and not static:
                self.journal.add_skipped(self.step, f"gradguard: {fault.code} {fault.kind}")
        return policy.apply(action, self)

    def _crashed(self, error: Exception) -> None:  # the model's forward raised: the run may be aborting
        self._crash = error

    def _warn_idle(self) -> None:
        if not self._warned_idle:
            self._warned_idle = True
            message = f"gradguard: check() was called with no backward since the last check (after step {self.step}): "
            message += "it counts no step. Call it once per step, after loss.backward(), before optimizer.step()"
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _reset(self) -> None:
        if self.checker is not None:
            self.checker.reset()

    def _detach(self) -> None:
        if self.checker is not None:
            self.checker.detach()

    # -- for the front doors -------------------------------------------------------------------------------
    def contain(self, exc: BaseException) -> None:
        """A bug inside gradguard: disable gradguard loudly (hooks off, a warning, GG901) and let training go
        on. With ``strict=True`` the exception propagates instead."""
        if self.options.strict:
            raise exc
        if self.disabled:
            return
        self.disabled = True
        self._detach()
        finding = detectors.internal_error(exc, self.step)
        log.error(finding.message, exc_info=exc)
        try:
            warnings.warn(finding.message, RuntimeWarning, stacklevel=2)
        except Exception:  # warnings turned into errors (-W error) must not undo the containment
            pass
        self.journal.findings.append(finding)

    def add_finding(self, *findings: Finding) -> None:
        """Record findings a front door made (e.g. the HF callback's ``masked_nonfinite_log``)."""
        self.journal.add(map(self.options.rated, findings))

    def module_norms(self) -> dict[str, float]:
        """The last step's gradient norm of every module holding trainable parameters (one host read)."""
        return self.checker.module_norms() if self.checker is not None else {}

    # -- output ------------------------------------------------------------------------------------------
    def report(self) -> Report:
        gmap = self.audit.group_map if self.audit else None
        return self.journal.report(gmap, self.optimizer, steps=self.step, disabled=self.disabled)

    def write(self, report: Report | None = None) -> Path | None:
        """Write ``gradguard-report.json`` / ``.md`` into ``report_dir`` (rank 0 only); the path, or ``None``."""
        if self.writer is None or distributed.rank() != 0:
            return None
        return self.writer.write(report or self.report(), on_bug=self.contain, again=self.report)

    # -- resume ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "trends": self.trends.state_dict(), **self.journal.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        self.trends.load_state_dict(state.get("trends", {}))
        self.journal.load_state_dict(state)
