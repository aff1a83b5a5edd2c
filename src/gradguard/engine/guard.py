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

Data flow per optimizer step: probes (hooks, device tensors) -> one packed tensor -> one host sync ->
detectors (pure) -> policy (skip the update / stop / raise / warn) -> history and report.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import sys
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from gradguard.core.audit import Audit, audit_requires_grad, optimizer_param_ids, summarize
from gradguard.core.groups import param_numel
from gradguard.engine import policy, shutdown
from gradguard.engine.detectors import GroupContext, StepStats, Thresholds, Trends, detect_fault
from gradguard.engine.history import History
from gradguard.engine.probes import MAX_MICRO_BATCHES, MicroBatch, Probes, _absmax
from gradguard.errors import ConfigurationError, TrainingHealthError
from gradguard.report.model import Fault, Finding, Origin, Report, atomic_write

log = logging.getLogger("gradguard")

OnFault = Literal["stop", "raise", "warn"]
_ON_FAULT = ("stop", "raise", "warn")


def validate_options(on_fault: str, trace: str | None = None) -> None:
    """The checks every front door (Guard, GradGuard, the Lightning callback) makes at construction,
    so that a typo fails when the trainer is built, not after data loading."""
    if on_fault not in _ON_FAULT:
        raise ValueError(f"on_fault must be one of {', '.join(map(repr, _ON_FAULT))}, got {on_fault!r}")
    if trace not in (None, "full"):
        raise ValueError(f"trace must be None or 'full', got {trace!r}")


class Guard:
    """Watch a model's training: record, detect, attribute, and stop before a poisoned update.

    Args:
        model: the module being trained (a PeftModel, a DDP/FSDP-wrapped module, a compiled one …).
        optimizer: checked for coverage of the trainable parameters (optional).
        expect_trainable: group names, roles or globs that must train (``["vpm", "resampler"]``,
            ``["vision", "connector"]``). Violations are errors; without it, gradguard only warns.
        on_fault: ``"stop"`` (skip the poisoned update, stop, write the report), ``"raise"`` (the same,
            then raise :class:`TrainingHealthError`), ``"warn"`` (record and go on).
        report_dir: where ``gradguard-report.json`` / ``.md`` go (``None``: not written).
        groups: overrides of group detection, ``{"glob over param paths": "group[:role]"}``.
        thresholds: :class:`Thresholds` or a dict of its fields.
        strict: let gradguard's own exceptions propagate (tests); by default an internal error disables
            gradguard loudly and training goes on.

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
        expect_trainable: str | Sequence[str] | None = None,
        on_fault: OnFault = "stop",
        report_dir: str | os.PathLike[str] | None = None,
        groups: Mapping[str, str] | None = None,
        thresholds: Thresholds | Mapping[str, Any] | None = None,
        strict: bool = False,
        console: bool = True,
        history_size: int = 2048,
        param_check_every: int = 100,
        scaler: Any | None = None,
        localize: bool = True,
        trace: Literal["full"] | None = None,
        start: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Guard expects the torch.nn.Module being trained, got {type(model).__name__}")
        validate_options(on_fault, trace)
        if param_check_every < 1:
            raise ValueError(f"param_check_every must be >= 1, got {param_check_every}")
        self.model = model
        self.optimizer = optimizer
        self.expect_trainable = expect_trainable
        self.on_fault: OnFault = on_fault
        self.report_dir = Path(report_dir) if report_dir is not None else None
        self.group_overrides = dict(groups) if groups else None
        self.thresholds = Thresholds.from_dict(thresholds)  # type: ignore[arg-type]
        self.strict = strict
        self.console = console
        self.param_check_every = param_check_every
        self.scaler = scaler
        self.localize = localize
        self.trace = trace

        self.step = 0  # optimizer steps checked so far (1-based numbering in reports)
        self.findings: list[Finding] = []
        self.repeats: dict[tuple[str, str | None], int] = {}
        self.fault: Fault | None = None
        self.stopped = False
        self.disabled = False
        # The latest steps only (bounded under on_fault="warn"); the counts cover the whole run.
        self.skipped_steps: deque[int] = deque(maxlen=1024)
        self.nonfinite_loss_steps: deque[int] = deque(maxlen=1024)
        self.counts = {"nonfinite_loss_steps": 0, "skipped_steps": 0}
        self.history = History(history_size)
        self.recent: deque[dict[str, Any]] = deque(maxlen=16)  # full-resolution tail for the report
        self.trends = Trends(self.thresholds)
        self.last: StepStats | None = None
        self.audit: Audit | None = None
        self.probes: Probes | None = None
        self.tracer: Any = None  # engine.trace.Tracer: autocast capture for replays; every module if trace="full"
        self._poison_let_through = False
        self._pending_stop: Finding | None = None
        self._checked_in_step: int | None = None  # a step hook (DeepSpeed) already checked this step
        self._module_norms: torch.Tensor | None = None
        self._module_window: deque[torch.Tensor] = deque(maxlen=8)  # per-module norms of the last steps
        self._closed = False
        self._loss_upto = 0  # probes.micro entries already paired with a record_loss() call
        self.environment: dict[str, Any] = {}
        if start:
            self.start()

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self, optimizer: Any | None = None) -> Audit:
        """Build groups, run the static audit, attach the probes. Returns the audit.

        A static error (a group in ``expect_trainable`` that is frozen, trainable parameters missing
        from the optimizer, nothing trainable) is a fault at step 0: the policy applies before the
        first step.

        Calling it again (say, to hand over the optimizer once it exists) restarts the guard: the hooks
        of the earlier start come off first, so they never fire twice.
        """
        if optimizer is not None:
            self.optimizer = optimizer
        if self.probes is not None:
            self.probes.detach()
        if self.tracer is not None:
            self.tracer.detach()
        self.probes = self.tracer = None
        shutdown.register(self)  # an interrupted run still removes its hooks and writes its report
        try:
            audit = audit_requires_grad(self.model, self.expect_trainable, self.optimizer, self.group_overrides)
            self.audit = audit
            gmap = audit.group_map
            assert gmap is not None
            expected: set[str] = set()
            wanted = self.expect_trainable
            for sel in [wanted] if isinstance(wanted, str) else wanted or []:
                expected |= {g.name for g in gmap.match(sel)}
            self.contexts = {g.name: GroupContext(g.name, g.role, g.trainable, g.name in expected) for g in gmap}
            self._record(audit.findings)
            self.environment = environment(self.model, self.optimizer, self.scaler)
        except ConfigurationError:
            shutdown.unregister(self)
            raise  # bad input (an unknown group, a bad role): a clear error before any step runs
        except Exception as exc:  # a bug of gradguard's: training goes on without it
            self._internal_error(exc)
            return Audit(groups=[], findings=list(self.findings))
        try:
            self.probes = Probes(self.model, gmap, on_error=self._internal_error)
            self.probes.attach()
            from gradguard.integrations.deepspeed import attach as attach_deepspeed  # no deepspeed import

            deepspeed = attach_deepspeed(self)  # under DeepSpeed, check inside its optimizer step
            # Norms batched per backward only in one process with whole gradients (see engine.probes).
            self.probes.batched = policy.world() == 1 and not self.probes.shard_weights and not deepspeed
            if self.localize or self.trace:
                from gradguard.engine.trace import Tracer

                self.tracer = Tracer(self.model, full=self.trace == "full", on_error=self._internal_error)
                self.tracer.attach()
        except Exception as exc:
            self._internal_error(exc)
        errors = [f for f in audit.findings if f.severity == "error"]
        if errors:
            first = errors[0]
            ctx = self.contexts.get(first.group or "")
            origin = Origin(
                phase="static",
                module=first.group,
                group=first.group,
                role=ctx.role if ctx else None,
                trainable=ctx.trainable if ctx else None,
            )
            self._fault(first, origin, {"static errors": len(errors)})
        return audit

    def close(self) -> Report:
        """Remove every hook, run the final checks and write the report (idempotent)."""
        if self._closed:
            return self.report()
        self._closed = True
        if self.probes is not None:
            self.probes.detach()
        if self.tracer is not None:
            self.tracer.detach()
        if not self.disabled and self.step:
            try:
                if not params_finite(self.model) and not any(f.kind == "nonfinite_param" for f in self.findings):
                    self._record(
                        [
                            Finding.of(
                                "nonfinite_param",
                                f"after step {self.step}: some trainable weights are not finite",
                                "resume from a checkpoint taken before the first fault",
                                step=self.step,
                                phase="optimizer",
                            )
                        ]
                    )
            except Exception as exc:
                self._internal_error(exc)
        shutdown.unregister(self)
        try:
            report = self.report()
        except Exception as exc:
            self._internal_error(exc)
            report = Report(
                status="fault" if self.fault else "healthy",
                fault=self.fault,
                findings=list(self.findings),
                environment={**self.environment, "steps": self.step, "disabled": True},
            )
        if self.console:  # printed first, so that a failure to print is in the file
            try:
                self.print(report)
            except Exception as exc:
                self._internal_error(exc)
                report.findings = list(self.findings)
                report.environment = {**report.environment, "disabled": True}
        self.write(report)
        return report

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the step ----------------------------------------------------------------------------------------
    def check(self, step: int | None = None) -> bool:
        """Call after backward (and clipping) and before ``optimizer.step()``.

        Reads this step's statistics with one host sync, runs the detectors and applies the policy.
        Returns ``True`` when training may go on; on a fault with ``on_fault="stop"`` the poisoned update
        is skipped (every ``.grad`` is set to ``None``) and ``False`` is returned; with ``"raise"`` a
        :class:`TrainingHealthError` follows.
        """
        if self._checked_in_step is not None:  # checked inside DeepSpeed's optimizer step already
            self._checked_in_step = None
            self.step = step if step is not None else self.step
            return not self.stopped
        self.step = step if step is not None else self.step + 1
        if self.stopped:
            policy.skip_update(self.model, self.optimizer)
            self._reset_probes()
            return False
        if self.disabled or self._closed or self.probes is None:
            return True
        try:
            stats, device_fault = self._collect()
            fault = self._decide(stats, device_fault)
        except TrainingHealthError:
            raise
        except Exception as exc:
            self._internal_error(exc)
            return True
        finally:
            self._reset_probes()
        if fault and self.on_fault != "warn":
            return False
        return True

    def record_loss(self, loss: torch.Tensor) -> None:
        """Record one micro-batch's loss when the model's forward does not return it (call before backward).

        The guard reads ``outputs.loss`` from the model's forward by itself; a loss computed outside the
        model (``loss = loss_fn(model(x), y)``) it cannot see. Without it a NaN loss is still caught (as
        non-finite gradients), but it is not called a loss fault and a collapsing loss goes unnoticed.
        A loss the model already returned for this micro-batch wins (it is the raw, unscaled one).

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
        probes = self.probes
        if self.disabled or probes is None:
            return
        try:
            probes.settle()  # a head's output, when no forward of the guarded model returned (Lightning)
            value = loss.detach().float().reshape(())  # stays on the device: no host sync here
            if len(probes.micro) >= MAX_MICRO_BATCHES:
                probes.reset()  # nobody calls check(): bound memory, as the probes' own hook does
            if len(probes.micro) < self._loss_upto:
                self._loss_upto = 0  # the probes dropped an unchecked backlog since the last call
            if len(probes.micro) > self._loss_upto:
                # A forward of the model ran since the last call: this loss belongs to its micro-batch.
                if probes.micro[-1].loss is None:
                    probes.micro[-1].loss = value
            else:
                # The guarded module's forward did not run (e.g. Lightning calls training_step, not forward).
                probes.micro.append(MicroBatch(index=len(probes.micro), loss=value))
            self._loss_upto = len(probes.micro)
        except Exception as exc:
            self._internal_error(exc)

    def _reset_probes(self) -> None:
        self._loss_upto = 0
        if self.probes is not None:
            self.probes.reset()
        if self.tracer is not None:
            self.tracer.reset()

    def _collect(self) -> tuple[StepStats, bool]:
        """Pack this step's device tensors, agree across ranks, and read them with one host sync.

        Everything this step recorded (losses, token counts, abs-maxes, per-group gradient reductions)
        goes into one vector, read with one ``tolist()``. It is the guard's whole per-step cost outside
        the hooks, so it is kept to a handful of tensor ops.
        """
        probes = self.probes
        assert probes is not None
        probes.settle()  # heads' outputs no returned loss covered (a loss computed outside the model)
        device = probes.device
        norms = probes.local_norms(device)
        micro = probes.micro
        losses = [m.loss for m in micro if m.loss is not None]
        weights = [m.loss_weight for m in micro if m.loss is not None and m.loss_weight is not None]
        supervised = [m.supervised for m in micro]
        inputs = [(m.index, k, v) for m in micro for k, v in m.inputs]
        outs = [(g, m, v) for g, m, v in probes.group_outputs if v is not None]
        scale = getattr(self.scaler, "_scale", None) if self.scaler is not None else None
        scaler_active = isinstance(scale, torch.Tensor)
        check_params = self.step % self.param_check_every == 0
        # The scalars, in this order; their counts say where each part lies in the packed vector.
        scalar_parts: dict[str, list[torch.Tensor]] = {
            "losses": losses,
            "inputs": [v for _, _, v in inputs],
            "loss_weights": weights if len(weights) == len(losses) else [],
            "supervised": [s for s in supervised if s is not None],
            "outputs": [v for _, _, v in outs],
            "scale": [scale] if isinstance(scale, torch.Tensor) else [],
            "params_bad": [params_bad(self.model)] if check_params else [],
        }
        scalars = _stack_scalars([t for ts in scalar_parts.values() for t in ts], device)
        sizes = {k: len(ts) for k, ts in scalar_parts.items()}
        flags = None
        if policy.world() > 1:
            # This rank's fault flag (from its own values), and the squared norms of its gradient shards
            # (FSDP2 / ZeRO): summed over the ranks in ONE small all-reduce, the only collective per step.
            watched = [scalars[: sizes["losses"] + sizes["inputs"]]] + ([] if scaler_active else [norms])
            local_bad = (~torch.isfinite(torch.cat(watched))).any()
            shard_ix, shard_w = probes.shard_index(device)
            flags, shard_sumsq = policy.agree(
                local_bad, pending=self._pending_stop is not None, sumsq=norms[shard_ix].square() * shard_w
            )
            if shard_ix.numel():  # full-tensor norms of the sharded parameters, without gathering any tensor
                norms = norms.index_copy(0, shard_ix, shard_sumsq.sqrt())
        per_group, module_sumsq = probes.reduce_grads(device, norms)
        tail = [per_group.reshape(-1)] + ([flags.float()] if flags is not None else [])
        packed = torch.cat([scalars, *tail]).tolist()  # the one host sync
        values: dict[str, list[float]] = {}
        at = 0
        for key, n in sizes.items():
            values[key] = packed[at : at + n]
            at += n
        g = len(probes.group_names)
        group_rows = [packed[at + 3 * i : at + 3 * i + 3] for i in range(g)]
        at += 3 * g
        if flags is not None:
            self.rank_flags = [int(v) for v in packed[at:]]
        else:  # one process: the flag is this step's own values, read on the host
            watched_values = values["losses"] + values["inputs"]
            bad = not all(map(math.isfinite, watched_values))
            bad |= not scaler_active and any(row[1] for row in group_rows)
            self.rank_flags = [int(bad or self._pending_stop is not None)]

        names = probes.group_names
        sup_iter = iter(values["supervised"])
        fired = probes.fired_per_group()
        stats = StepStats(
            step=self.step,
            losses=values["losses"],
            loss_weights=values["loss_weights"],
            supervised=[int(next(sup_iter)) if s is not None else None for s in supervised],
            inputs=[(m, k, v) for (m, k, _), v in zip(inputs, values["inputs"])],
            group_outputs=[(names[g], m, v) for (g, m, _), v in zip(outs, values["outputs"])],
            group_norm={n: math.sqrt(r[0]) if r[0] >= 0 else r[0] for n, r, f in zip(names, group_rows, fired) if f},
            group_nonfinite={n: int(r[1]) for n, r in zip(names, group_rows)},
            group_nonzero={n: int(r[2]) for n, r in zip(names, group_rows)},
            group_fired=dict(zip(names, fired)),
            scaler_active=scaler_active,
            loss_scale=values["scale"][0] if values["scale"] else None,
        )
        if self._module_norms is not None:
            self._module_window.append(self._module_norms)  # device tensors: no sync unless a fault reads them
        self._module_norms = module_sumsq.sqrt()
        if values["params_bad"] and values["params_bad"][0] > 0:
            self._record(
                [
                    Finding.of(
                        "nonfinite_param",
                        f"before step {self.step}: some trainable weights are not finite",
                        "resume from a checkpoint taken before the first fault",
                        step=self.step,
                        phase="optimizer",
                    )
                ]
            )
        return stats, any(self.rank_flags)

    def _decide(self, stats: StepStats, agreed_bad: bool) -> Fault | None:
        self.last = stats
        probes = self.probes
        assert probes is not None
        first_bad_grad = None
        if not stats.grads_finite:
            first_bad_grad = self._first_bad_grad()
        found = detect_fault(stats, self.contexts, first_bad_grad[0] if first_bad_grad else None)
        if found is not None and first_bad_grad is not None:
            found[2]["first non-finite gradient (backward order)"] = first_bad_grad[1]
        trend_findings = self.trends.update(stats, self.contexts)
        if stats.loss is not None and not math.isfinite(stats.loss):
            self.nonfinite_loss_steps.append(stats.step)
            self.counts["nonfinite_loss_steps"] += 1
        if stats.scaler_active and not stats.grads_finite and found is None:
            self.skipped_steps.append(stats.step)
            self.counts["skipped_steps"] += 1
        self._record(trend_findings)
        self._add_history(stats)
        pending = self._pending_stop
        if pending is None:
            pending = next((f for f in trend_findings if f.severity == "error"), None)
        if found is None and not agreed_bad and pending is None:
            return None
        if not agreed_bad and policy.world() > 1:
            # Seen here only after this step's flags were agreed (a host-side error such as a dead expected
            # group): stopping alone would leave the other ranks waiting in their next collective forever.
            # Raise the flag at the next step instead; all ranks stop together then.
            self._pending_stop = found[0] if found is not None else pending
            return None
        self._pending_stop = None
        local: tuple[Finding, Origin, dict[str, Any]] | None = None  # what this rank saw itself
        if found is not None:
            local = found
            self._record([found[0]])
        elif pending is not None:
            ctx = self.contexts.get(pending.group or "")
            origin = Origin(
                phase=pending.phase or "backward",
                module=pending.group,
                group=pending.group,
                role=ctx.role if ctx else None,
                trainable=ctx.trainable if ctx else None,
            )
            local = (pending, origin, {})
        localization = None
        if local is not None:
            local[2].update(self._top_modules())
            if policy.replay_is_local(self.model):  # a lone rank's replay must not enter a collective
                localization = self._localize(local[0], local[1])
        if policy.world() > 1:
            finding, origin, evidence, localization = self._agree_on_fault(local, localization, stats.step)
        elif local is not None:
            finding, origin, evidence = local
        else:  # flagged on the device, but no detector could say more
            finding = Finding.of(
                "nonfinite_grad",
                f"step {stats.step}: a non-finite value was seen in this step's statistics",
                "rerun with GradGuard(trace='full') to find where it appears",
                step=stats.step,
                phase="backward",
            )
            origin, evidence = Origin(phase="backward"), {}
        if self.on_fault == "warn":
            self._poison_let_through |= finding.kind.startswith("nonfinite")
        else:
            policy.skip_update(self.model, self.optimizer)
        return self._fault(finding, origin, evidence, localization)

    def _agree_on_fault(
        self, local: tuple[Finding, Origin, dict[str, Any]] | None, localization: dict[str, Any] | None, step: int
    ) -> tuple[Finding, Origin, dict[str, Any], dict[str, Any] | None]:
        """Every rank stops at this step: swap the ranks' own diagnoses, report the one where it began.

        Fault path only (one ``all_gather_object``); every rank ends with the same fault, so the report
        (written by rank 0) names the origin rank even when rank 0 itself saw nothing wrong.
        """
        if self.fault is not None:  # "warn" already reported the first fault; keep this rank's view
            if local is not None:
                return (*local, localization)
            again = Finding.of(
                "nonfinite_grad",
                f"step {step}: another rank saw a non-finite value again",
                "read the report written by rank 0: it names the rank where the fault began",
                step=step,
                phase="backward",
            )
            return again, Origin(phase="backward"), {}, None
        view = None
        if local is not None:
            view = {"finding": local[0], "origin": local[1], "evidence": local[2], "localization": localization}
        origin_rank, views = policy.agree_on_fault(view, self.rank_flags)
        chosen = views[origin_rank] if origin_rank is not None else None
        if chosen is not None:
            finding, origin = Finding(**chosen["finding"]), Origin(**chosen["origin"])
            evidence, localization = dict(chosen["evidence"]), chosen["localization"]
        else:
            finding = Finding.of(
                "nonfinite_grad",
                f"step {step}: a rank flagged a non-finite value that no detector could attribute",
                "rerun with GradGuard(trace='full') to find where it appears",
                step=step,
                phase="backward",
            )
            origin, evidence, localization = Origin(phase="backward"), {}, None
        origin.rank = origin_rank
        evidence["ranks"] = policy.rank_summaries(views, self.rank_flags)
        return finding, origin, evidence, localization

    def _localize(self, finding: Finding, origin: Origin) -> dict[str, Any] | None:
        """Pinpoint the exact module of a non-finite fault (replay of the step; see engine/localize.py)."""
        if not self.localize or not finding.kind.startswith("nonfinite") or origin.phase == "data":
            return None
        if self.fault is not None:  # on_fault="warn": only the first fault is reported; don't replay every step
            return None
        try:
            from gradguard.engine.localize import localize

            return localize(self, finding, origin)
        except Exception as exc:  # localisation is a bonus: never let it cost the report
            log.warning("gradguard: could not localise the fault (%s: %s)", type(exc).__name__, exc)
            if self.strict:
                raise
            return None

    def _fault(
        self,
        finding: Finding,
        origin: Origin,
        evidence: dict[str, Any],
        localization: dict[str, Any] | None = None,
    ) -> Fault:
        """Record the fault and apply the policy (the update itself was already skipped or let through)."""
        if finding not in self.findings:
            self._record([finding])
        if self.fault is not None:  # "warn": keep the first fault, the findings keep the rest
            return self.fault
        if finding.kind == "nonfinite_loss" and self._masked_in_logs():
            evidence["logged as"] = (
                "Trainer's logging_nan_inf_filter shows this NaN loss as 0.0 (or a stale average): "
                "`loss 0.0, grad_norm nan` in the logs is this fault"
            )
        static = origin.phase == "static"
        self.fault = Fault(
            step=0 if static else self.step,
            kind=finding.kind,
            code=finding.code,
            message=finding.message,
            origin=origin,
            weights_intact=static
            or (self.on_fault != "warn" and not self._poison_let_through and params_finite(self.model)),
            evidence=evidence,
            localization=localization,
        )
        if self.on_fault == "warn":
            return self.fault
        self.stopped = True
        log.error("gradguard: %s at step %s: %s", finding.code, self.fault.step, finding.message)
        if self.on_fault == "raise":
            report = self.close()
            raise TrainingHealthError(
                f"{finding.code} {finding.kind} at step {self.fault.step}: {finding.message}", report.to_dict()
            )
        return self.fault

    def _masked_in_logs(self) -> bool:
        # Overridden by the HF integration, which knows logging_nan_inf_filter; plain loops log nothing.
        return False

    def _first_bad_grad(self) -> tuple[str, str] | None:
        """(group, parameter name) of the first gradient, in backward order, that was not finite."""
        probes = self.probes
        assert probes is not None
        order = [i for i in dict.fromkeys(probes.grad_order) if probes.grad_slots[i] is not None]
        if not order:
            return None
        values = torch.stack([probes.grad_slots[i] for i in order]).tolist()  # type: ignore[misc]  # fault path
        bad = next((i for i, v in zip(order, values) if not math.isfinite(v)), None)
        if bad is None:
            return None
        return probes.group_names[probes.param_group[bad]], probes.params[bad][0]

    def _top_modules(self, k: int = 5) -> dict[str, Any]:
        """The modules with the largest (or non-finite) gradient norms at this step, and the ones whose norm
        grew most against the recent window (fault path only: one read of the window)."""
        if self._module_norms is None or self.probes is None or not self.probes.modules:
            return {}
        window = torch.stack([*self._module_window, self._module_norms]).tolist()
        norms, past = window[-1], window[:-1]
        mods = self.probes.modules
        out: dict[str, Any] = {}
        if past:
            growth = []
            for i, m in enumerate(mods):
                before = sorted(row[i] for row in past if math.isfinite(row[i]))
                ref = before[len(before) // 2] if before else 0.0
                if ref > 0 and math.isfinite(norms[i]):
                    growth.append((norms[i] / ref, m))
            top = [f"{m}: {g:.3g}x" for g, m in sorted(growth, reverse=True)[:k] if g > 2]
            if top:
                out[f"fastest-growing gradient norms (vs median of last {len(past)} steps)"] = ", ".join(top)
        bad = [m for m, v in zip(mods, norms) if not math.isfinite(v)]
        finite = sorted(((v, m) for m, v in zip(mods, norms) if math.isfinite(v)), reverse=True)[:k]
        if bad:
            out["modules with non-finite gradients"] = ", ".join(bad[:k]) + (
                f" (+{len(bad) - k})" if len(bad) > k else ""
            )
        if finite:
            out["largest finite gradient norms"] = ", ".join(f"{m}: {v:.3g}" for v, m in finite)
        return out

    def _add_history(self, s: StepStats) -> None:
        row = {
            "loss": s.loss,
            "supervised": sum(n for n in s.supervised if n is not None) if s.supervised else None,
            "norms": dict(s.group_norm),
        }
        self.history.add(s.step, row)
        self.recent.append({"step": s.step, **row})

    # -- findings and containment -------------------------------------------------------------------
    def _record(self, findings: Sequence[Finding]) -> None:
        for f in findings:
            key = (f.code, f.group)
            if f.step is not None and key in self.repeats:
                self.repeats[key] += 1  # the same problem again (on_fault="warn"): count, don't grow
                continue
            if f.step is not None:
                self.repeats[key] = 0
            self.findings.append(f)
            if f.severity != "info":
                log.warning("gradguard %s %s: %s", f.code, f.kind, f.message)

    def _internal_error(self, exc: BaseException) -> None:
        if self.strict:
            raise exc
        if self.disabled:
            return
        self.disabled = True
        if self.probes is not None:
            try:
                self.probes.detach()
            except Exception:  # pragma: no cover - detaching must not fail twice
                pass
        if self.tracer is not None:
            try:
                self.tracer.detach()
            except Exception:  # pragma: no cover
                pass
        msg = f"gradguard disabled itself after an internal error ({type(exc).__name__}: {exc}); training goes on"
        log.error(msg, exc_info=exc)
        try:
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        except Exception:  # warnings turned into errors (-W error) must not undo the containment
            pass
        self.findings.append(
            Finding.of("internal_error", msg, "please report it; GradGuard(strict=True) re-raises it", step=self.step)
        )

    # -- output ------------------------------------------------------------------------------------------
    def report(self) -> Report:
        gmap = self.audit.group_map if self.audit else None
        opt_ids = None
        if self.optimizer is not None:
            try:
                opt_ids = optimizer_param_ids(self.optimizer)
            except TypeError:
                opt_ids = None
        groups = [summarize(g, opt_ids) for g in gmap] if gmap else []
        history = self.history.to_dict([g.name for g in groups])
        history["recent"] = list(self.recent)
        history["nonfinite_loss_steps"] = list(self.nonfinite_loss_steps)[-100:]
        history["skipped_steps"] = list(self.skipped_steps)[-100:]
        history["counts"] = dict(self.counts)
        history["repeated_findings"] = {f"{c} {g or ''}".strip(): n for (c, g), n in self.repeats.items() if n}
        return Report(
            status="fault" if self.fault is not None else "healthy",
            fault=self.fault,
            findings=list(self.findings),
            groups=groups,
            history=history,
            environment={**self.environment, "steps": self.step, "disabled": self.disabled},
        )

    def write(self, report: Report | None = None) -> Path | None:
        if self.report_dir is None or policy.rank() != 0:
            return None
        try:
            return (report or self.report()).save(self.report_dir)
        except Exception as exc:
            self._internal_error(exc)
        try:  # the JSON is what programs read: try it alone, now with the GG901 finding in it
            path = self.report_dir / "gradguard-report.json"
            atomic_write(path, self.report().to_json())
            return path
        except Exception as exc:
            log.error("gradguard: could not write the report to %s (%s: %s)", self.report_dir, type(exc).__name__, exc)
            return None

    def print(self, report: Report | None = None) -> None:
        if policy.rank() != 0:
            return
        from rich.console import Console

        Console(stderr=True).print(report or self.report())

    # -- resume ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "history": self.history.state_dict(),
            "trends": self.trends.state_dict(),
            "nonfinite_loss_steps": list(self.nonfinite_loss_steps),
            "skipped_steps": list(self.skipped_steps),
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        self.history.load_state_dict(state.get("history", {}))
        self.trends.load_state_dict(state.get("trends", {}))
        self.nonfinite_loss_steps.extend(state.get("nonfinite_loss_steps", []))
        self.skipped_steps.extend(state.get("skipped_steps", []))
        self.counts.update(state.get("counts", {}))


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if not p.is_meta:
            return p.device
    return torch.device("cpu")


def _stack_scalars(scalars: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
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
    return int(params_bad(model).item()) == 0


def environment(model: nn.Module, optimizer: Any, scaler: Any) -> dict[str, Any]:
    dtypes: dict[str, int] = {}
    for p in model.parameters():
        if p.requires_grad:
            key = str(p.dtype).removeprefix("torch.")
            dtypes[key] = dtypes.get(key, 0) + param_numel(p)
    env: dict[str, Any] = {
        "gradguard": __import__("gradguard").__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(_device_of(model)),
        "trainable_dtypes": dtypes,
        "fp16_scaler": scaler is not None,
        "world_size": policy.world(),
    }
    for mod in ("transformers", "peft", "accelerate", "lightning"):
        if mod in sys.modules:
            env[mod] = getattr(sys.modules[mod], "__version__", "?")
    if optimizer is not None:
        env["optimizer"] = type(getattr(optimizer, "optimizer", optimizer)).__name__
    return env
