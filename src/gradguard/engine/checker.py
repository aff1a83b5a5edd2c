"""The chain behind ``Guard.check()``: read the step, diagnose it, decide.

:class:`Checker` owns what is attached to the model for it (the probes, the step reader, the tracer) and runs one
optimizer step through ``read`` (one host sync) -> ``diagnose`` (the pure detectors, then, on a flagged step, the
evidence, the replay's localisation and the ranks' agreement) -> ``policy.decide`` (pure). It changes nothing in
training: the guard records the decision and :func:`gradguard.engine.policy.apply` carries it out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from gradguard.core.groups import GroupMap
from gradguard.engine import detectors, distributed, policy
from gradguard.engine.diagnosis import Diagnosis
from gradguard.engine.journal import Journal
from gradguard.engine.localize import localized
from gradguard.engine.options import Options
from gradguard.engine.probes import Probes
from gradguard.engine.read import StepReader
from gradguard.engine.stats import GroupContext, StepStats
from gradguard.engine.trends import Trends
from gradguard.report.model import Origin


class Checker:
    """Probes, reader and tracer attached to ``model``, and the per-step chain over them."""

    def __init__(
        self,
        model: nn.Module,
        gmap: GroupMap,
        *,
        options: Options,
        contexts: Mapping[str, GroupContext],
        trends: Trends,
        journal: Journal,
        optimizer: Any = None,
        scaler: Any = None,
        param_check_every: int = 100,
        on_error: Callable[[BaseException], None] | None = None,
        on_crash: Callable[[Exception], None] | None = None,
    ) -> None:
        self.model, self.options, self.contexts, self.scaler = model, options, contexts, scaler
        self.trends, self.journal = trends, journal
        self.pending: Diagnosis | None = None  # seen after the ranks agreed: stop with them at the next step
        self.probes = Probes(model, gmap, on_error=on_error)
        self.probes.on_crash = on_crash
        self.probes.attach()
        # Norms batched per backward only in one process with whole gradients (see engine.probes).
        self.probes.batched = distributed.world() == 1 and not self.probes.shard_weights
        self.reader = StepReader(
            model, self.probes, optimizer=optimizer, scaler=scaler, param_check_every=param_check_every
        )
        self.tracer: Any = None  # engine.trace.Tracer: autocast capture for replays; every module if trace="full"
        if options.localize or options.trace:
            from gradguard.engine.trace import Tracer

            self.tracer = Tracer(model, full=options.trace == "full", on_error=on_error)
            self.tracer.attach()

    @property
    def idle(self) -> bool:
        """No backward since the last step: nothing to check."""
        return self.probes.idle

    def step(self, step: int, *, faulted: bool) -> tuple[StepStats, Diagnosis | None, policy.Action]:
        """Read, diagnose and decide one optimizer step (``faulted``: a fault was already recorded)."""
        stats = self.reader.read(step, pending=self.pending is not None)
        diagnosis = self.diagnose(stats, faulted=faulted)
        action = policy.decide(diagnosis, self.options.on_fault, world=distributed.world(), agreed=stats.flagged)
        self.pending = diagnosis if action.defer else None
        return stats, diagnosis, action

    def diagnose(self, stats: StepStats, *, faulted: bool = False) -> Diagnosis | None:
        """This step's fault, if any: the detectors' view, then (when the step is flagged) the evidence, the
        replay's localisation and the ranks' agreement. Trend findings are recorded on the way."""
        probes, rated = self.probes, self.options.rated
        first_bad = None if stats.grads_finite else probes.first_nonfinite_grad()
        local = detectors.diagnose(stats, self.contexts, first_bad)
        if local is not None:
            local = dataclasses.replace(local, finding=rated(local.finding))
        trends = [rated(f) for f in self.trends.update(stats, self.contexts)]
        self.journal.add(trends)
        if stats.params_bad:
            self.journal.add([detectors.nonfinite_params(stats.step)])
        self.journal.add_step(stats, scaler_skipped=stats.scaler_active and not stats.grads_finite and local is None)
        if local is None:
            errors = (detectors.from_finding(f, self.contexts) for f in trends if f.severity == "error")
            local = self.pending or next(errors, None)
        if not stats.flagged and (local is None or distributed.world() > 1):
            return local  # the ranks did not agree on this step: decide() defers a local error to the next
        if local is not None:
            local = local.with_evidence(*detectors.top_modules(probes.modules, self.reader.module_norms(9)))
            if self.options.localize and not faulted and distributed.replay_is_local(self.model):
                # "warn" replays only the first fault; a lone rank's replay must not enter a collective
                opts = dict(tracer=self.tracer, scaler=self.scaler, strict=self.options.strict)
                local = localized(local, self.model, probes, **opts)
        if distributed.world() > 1:
            return distributed.agree_on_fault(local, stats.rank_flags, stats.step, exchange=not faulted)
        return local or Diagnosis(detectors.unattributed(stats.step), Origin(phase="backward"))

    def module_norms(self) -> dict[str, float]:
        """The last step's gradient norm of every module holding trainable parameters (one host read)."""
        rows = self.reader.module_norms(1)
        return dict(zip(self.probes.modules, rows[-1])) if rows else {}

    def reset(self) -> None:
        """Forget the step (after it was checked, or when it is abandoned)."""
        self.probes.reset()
        if self.tracer is not None:
            self.tracer.reset()

    def detach(self) -> None:
        """Remove every hook (idempotent)."""
        for part in (self.probes, self.tracer):
            if part is not None:
                part.detach()
