"""The run's record: findings, the fault, the per-step history and counters; the :class:`Report` is built from it.

Bounded over millions of steps: a finding seen again (``on_fault="warn"``) is counted, not stored again; the
history thins itself out (:class:`~gradguard.engine.history.History`); step lists keep their latest entries.
"""

from __future__ import annotations

import logging
import math
import platform
import sys
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradguard.core.audit import optimizer_param_ids, summarize
from gradguard.core.groups import GroupMap, param_numel
from gradguard.engine import distributed
from gradguard.engine.diagnosis import Diagnosis
from gradguard.engine.history import History
from gradguard.engine.stats import StepStats
from gradguard.errors import TrainingHealthError
from gradguard.report.model import Fault, Finding, Report, Status, atomic_write

log = logging.getLogger("gradguard")


_TRAINS: dict[bool | None, str] = {True: "trainable", False: "frozen"}


class Journal:
    """Everything the guard has seen so far, ready to become a :class:`Report`."""

    def __init__(self, history_size: int = 2048) -> None:
        self.findings: list[Finding] = []
        self.repeats: dict[tuple[str, str | None], int] = {}
        self.fault: Fault | None = None
        self.poison_let_through = False  # on_fault="warn" let a non-finite update reach the weights
        # The latest steps only (bounded under on_fault="warn"); the counts cover the whole run.
        self.skipped: deque[dict[str, Any]] = deque(maxlen=1024)  # {"step", "by"}: updates that did not happen
        self.nonfinite_loss_steps: deque[int] = deque(maxlen=1024)
        self.counts = {"nonfinite_loss_steps": 0, "skipped_steps": 0}
        self.history = History(history_size)
        self.recent: deque[dict[str, Any]] = deque(maxlen=16)  # full-resolution tail for the report
        self.environment: dict[str, Any] = {}
        self.exit: dict[str, Any] | None = None  # how a run that did not finish ended

    def add(self, findings: Iterable[Finding], *, quiet: bool = False) -> None:
        """Record findings; a step's finding seen again for the same group is counted instead. Warnings and errors
        are logged (once each), unless ``quiet``."""
        for f in findings:
            if f in self.findings:  # the same finding, passed on again (a trend error that became the fault)
                continue
            key = (f.code, f.group)
            if f.step is not None and key in self.repeats:
                self.repeats[key] += 1  # the same problem again (on_fault="warn"): count, don't grow
                continue
            if f.step is not None:
                self.repeats[key] = 0
            self.findings.append(f)
            if f.severity != "info" and not quiet:
                log.warning("gradguard %s %s: %s", f.code, f.kind, f.message)

    def add_step(self, s: StepStats, *, scaler_skipped: bool = False) -> None:
        """One step's loss, supervision and group norms into the history and the counters; ``scaler_skipped``:
        the fp16 GradScaler skips this update (an overflow it handles itself)."""
        loss = s.loss
        if loss is not None and not math.isfinite(loss):
            self.nonfinite_loss_steps.append(s.step)
            self.counts["nonfinite_loss_steps"] += 1
        if scaler_skipped:
            self.add_skipped(s.step, "fp16 GradScaler: gradients overflowed")
        row = {
            "loss": loss,
            "supervised": sum(n for n in s.supervised if n is not None) if s.supervised else None,
            "norms": dict(s.group_norm),
            "updates": dict(s.update_ratio),
        }
        self.history.add(s.step, row)
        self.recent.append({"step": s.step, **row})

    def add_skipped(self, step: int, by: str) -> None:
        """An update that did not happen: gradguard dropped it (a fault), or the fp16 GradScaler skipped it."""
        self.skipped.append({"step": step, "by": by})
        self.counts["skipped_steps"] += 1

    def add_fault(self, diagnosis: Diagnosis, step: int, weights_intact: bool) -> Fault:
        """The run's fault (the first one: under ``on_fault="warn"`` later ones stay findings), said in one log
        line; the summary at the end of the run says the rest."""
        finding = diagnosis.finding
        if finding not in self.findings:
            o = diagnosis.origin
            where = ", ".join(str(x) for x in (o.group or o.module, o.role, _TRAINS.get(o.trainable)) if x)
            when = "before step 1" if o.phase == "static" else f"at step {step}"
            log.error(
                "gradguard: %s %s %s: %s phase%s",
                finding.code,
                finding.kind,
                when,
                o.phase,
                f", {where}" if where else "",
            )
        self.add([finding], quiet=True)
        if self.fault is None:
            finding = diagnosis.finding
            self.fault = Fault(
                step=step,
                kind=finding.kind,
                code=finding.code,
                message=finding.message,
                origin=diagnosis.origin,
                weights_intact=weights_intact,
                evidence=[dict(e) for e in diagnosis.evidence],
                localization=dict(diagnosis.localization) if diagnosis.localization is not None else None,
            )
        return self.fault

    def ended(self, error: BaseException | None, step: int, signal: str | None = None) -> None:
        """Record how the run ended when it did not finish: an exception that escaped training (aborted), or
        Ctrl-C / a termination signal (interrupted). gradguard's own TrainingHealthError is the fault itself."""
        if self.exit is not None or (error is None and signal is None) or isinstance(error, TrainingHealthError):
            return
        if signal is not None:
            status, kind, message = "interrupted", signal, f"the process received {signal}"
        else:
            assert error is not None
            status = "interrupted" if isinstance(error, KeyboardInterrupt) else "aborted"
            kind, message = type(error).__name__, str(error)
        self.exit = {"status": status, "type": kind, "message": message, "last_step": step}

    def report(self, gmap: GroupMap | None, optimizer: Any, *, steps: int, disabled: bool) -> Report:
        opt_ids = None
        if optimizer is not None:
            try:
                opt_ids = optimizer_param_ids(optimizer)
            except TypeError:
                opt_ids = None
        groups = [summarize(g, opt_ids) for g in gmap] if gmap else []
        history = self.history.to_dict([g.name for g in groups])
        history["recent"] = list(self.recent)
        history["nonfinite_loss_steps"] = list(self.nonfinite_loss_steps)[-100:]
        history["skipped_steps"] = [s["step"] for s in self.skipped][-100:]
        history["skipped_updates"] = list(self.skipped)[-100:]
        history["counts"] = dict(self.counts)
        history["repeated_findings"] = {f"{c} {g or ''}".strip(): n for (c, g), n in self.repeats.items() if n}
        status: Status = "fault" if self.fault is not None else self.exit["status"] if self.exit else "healthy"
        return Report(
            status=status,
            exit=self.exit,
            fault=self.fault,
            findings=list(self.findings),
            groups=groups,
            history=history,
            environment={**self.environment, "steps": steps, "disabled": disabled},
        )

    # -- resume ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history.state_dict(),
            "nonfinite_loss_steps": list(self.nonfinite_loss_steps),
            "skipped": list(self.skipped),
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history.load_state_dict(state.get("history", {}))
        self.nonfinite_loss_steps.extend(state.get("nonfinite_loss_steps", []))
        self.skipped.extend(state.get("skipped", []))
        self.counts.update(state.get("counts", {}))


class ReportWriter:
    """Writes ``gradguard-report.json`` / ``.md`` where the user asked.

    Writing is I/O, not gradguard's logic: a folder that cannot be written (a path that is a file, a read-only or
    full disk) is warned about once, with the path and the OS error, and the report goes to a temporary folder that
    the warning names; detection never stops because of it, and the report in memory stays complete.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fallback: Path | None = None

    def write(
        self,
        report: Report,
        *,
        json_only: bool = False,
        on_bug: Callable[[BaseException], None] | None = None,
        again: Callable[[], Report] | None = None,
    ) -> Path | None:
        """The path of the JSON written, or ``None`` when neither folder could be written. A failure that is not
        I/O (a bug of gradguard's while rendering) goes to ``on_bug``; then the JSON alone, which programs read, is
        written from ``again()`` (the report rebuilt, now with the bug's finding in it)."""
        if on_bug is not None:
            try:
                return self.write(report, json_only=json_only)
            except Exception as exc:
                on_bug(exc)
                return self.write(again() if again is not None else report, json_only=True)
        save = (lambda f: _save_json(report, f)) if json_only else report.save
        try:
            return save(self.fallback or self.folder)
        except OSError as exc:
            if self.fallback is not None:
                log.error("gradguard: could not write the report to %s either (%s: %s)", self.fallback, _name(exc), exc)
                return None
            self.fallback = Path(tempfile.mkdtemp(prefix="gradguard-report-"))
            message = (
                f"gradguard: cannot write the report to {self.folder} ({_name(exc)}: {exc}); writing it to "
                f"{self.fallback} instead. Detection goes on."
            )
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        try:
            return save(self.fallback)
        except OSError as exc:
            log.error("gradguard: could not write the report to %s either (%s: %s)", self.fallback, _name(exc), exc)
            return None


def _save_json(report: Report, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gradguard-report.json"
    atomic_write(path, report.to_json())
    return path


def _name(exc: BaseException) -> str:
    return type(exc).__name__


def print_report(report: Report) -> None:
    """The summary on stderr (rich), at a width that never cuts a group name in a log file (``make_console``)."""
    from gradguard.report.render import make_console

    make_console(stderr=True).print(report)


def environment(model: nn.Module, optimizer: Any, scaler: Any) -> dict[str, Any]:
    """Versions, device, trainable dtypes and world size, for the report."""
    dtypes: dict[str, int] = {}
    device = None
    for p in model.parameters():
        if device is None and not p.is_meta:
            device = p.device
        if p.requires_grad:
            key = str(p.dtype).removeprefix("torch.")
            dtypes[key] = dtypes.get(key, 0) + param_numel(p)
    env: dict[str, Any] = {
        "gradguard": __import__("gradguard").__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device or torch.device("cpu")),
        "trainable_dtypes": dtypes,
        "fp16_scaler": scaler is not None,
        "world_size": distributed.world(),
    }
    for mod in ("transformers", "peft", "accelerate", "lightning"):
        if mod in sys.modules:
            env[mod] = getattr(sys.modules[mod], "__version__", "?")
    if optimizer is not None:
        env["optimizer"] = type(getattr(optimizer, "optimizer", optimizer)).__name__
    return env
