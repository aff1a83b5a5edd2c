"""``GradGuard``: the Hugging Face ``Trainer`` callback (works unchanged in TRL's trainers).

A thin adapter: the Trainer's events drive :class:`gradguard.engine.guard.Guard`.

- ``on_train_begin``: groups, static audit (intent, optimizer coverage), hooks.
- ``on_pre_optimizer_step``: after all micro-batches' backward and after clipping, before
  ``optimizer.step()`` - the last moment to keep a poisoned update out of the weights. The pre-clip
  gradient statistics were captured during backward.
- ``on_log``: adds gradguard's values (per-group grad norms, non-finite loss steps, supervised tokens) to
  the Trainer's logs, so they reach TensorBoard / W&B, and explains a ``loss 0.0`` that is really NaN.
- ``on_train_end``: removes the hooks, writes ``gradguard-report.json`` / ``.md`` to ``report_dir``
  (default: the Trainer's ``output_dir``) and prints the summary.
- checkpoints: gradguard's history and baselines are saved in the Trainer's ``stateful_callbacks`` and
  picked up again on ``resume_from_checkpoint``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from gradguard.engine.diagnosis import Diagnosis, fact, plain
from gradguard.engine.guard import Guard
from gradguard.engine.options import Options
from gradguard.integrations.frameworks import Framework, amend_hints, detect, find_trainer
from gradguard.report.model import Finding

# How the Trainer's own logs show a NaN loss (its `logging_nan_inf_filter`, on by default): the sentence a
# fault report carries, so that `loss 0.0, grad_norm nan` is recognised as this fault.
_MASKED = (
    "Trainer's logging_nan_inf_filter shows this NaN loss as 0.0 (or a stale average): "
    "`loss 0.0, grad_norm nan` in the logs is this fault"
)


@dataclass(eq=False)
class GradGuard(Options, TrainerCallback, ExportableState):
    """Drop-in training-health guard for ``transformers.Trainer`` (and TRL's trainers).

    >>> from gradguard import GradGuard
    >>> callback = GradGuard(expect_trainable=["vpm", "resampler"])   # doctest: +SKIP
    >>> Trainer(model, args, train_dataset=ds, callbacks=[callback]).train()  # doctest: +SKIP

    Takes the :class:`~gradguard.engine.options.Options` (``expect_trainable``, ``on_fault``: ``"stop"``,
    ``"raise"``, ``"warn"``; ``report_dir``, default ``args.output_dir``; ``groups``, ``thresholds``, ``strict``,
    ``console``, ``localize``, ``trace``), plus ``log_module_norms=True`` to also log per-module gradient
    norms at ``logging_steps``.
    """

    log_module_norms: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.guard: Guard | None = None
        self._resume: dict[str, Any] | None = None
        self._masked_reported = False
        self._last_logged_step = 0
        self._masking = False  # the Trainer's logs show a NaN loss as 0.0 (logging_nan_inf_filter)
        # The fine-tuning framework that built the Trainer (LLaMA-Factory, ms-swift, ...): its own switch goes
        # first in the hints of GG001 / GG002.
        self.framework: Framework | None = None

    # -- Trainer events -----------------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        optimizer = kwargs.get("optimizer")
        if model is None:
            raise ValueError("GradGuard needs the model: use it as a Trainer callback (callbacks=[GradGuard()])")
        if self.guard is not None:  # an earlier train() that was interrupted: on_train_end never came
            self.guard.close()
        options = self.as_options()
        options.report_dir = self.report_dir or args.output_dir
        options.console = self.console and state.is_world_process_zero
        self._masking = bool(getattr(args, "logging_nan_inf_filter", False))
        frame = inspect.currentframe()  # callbacks are not handed the Trainer: find it on the stack (never raises)
        try:
            self.framework = detect(find_trainer(frame, callback=self), args)
        finally:
            del frame
        guard = Guard(
            model,
            optimizer,
            options=options,
            scaler=getattr(optimizer, "scaler", None),
            explain=self._explain,
            amend_hints=lambda findings, roles: amend_hints(findings, self.framework, roles),
            start=False,
        )
        self.guard = guard
        try:  # gradguard's own bookkeeping: a bug here disables gradguard, never the training
            self._put_first_for_logging()
            resume = self._resume
            if resume is None and state.global_step > 0:
                callbacks_state: dict[str, Any] = state.stateful_callbacks or {}  # type: ignore[assignment]
                stored = callbacks_state.get(type(self).__name__)
                stored = stored[0] if isinstance(stored, list) and stored else stored
                resume = stored.get("attributes", {}).get("_resume") if isinstance(stored, dict) else None
            if resume:
                guard.load_state_dict(resume)
        except Exception as exc:
            guard.contain(exc)
        self._last_logged_step = state.global_step
        if not guard.disabled:
            guard.start()  # contains its own errors, but bad input (ConfigurationError) raises here
            if not guard.disabled:
                guard.add_finding(*_warmup_longer_than_run(args, state))
        if guard.stopped:
            control.should_training_stop = True

    def _explain(self, diagnosis: Diagnosis) -> list[dict[str, Any]]:
        """What the Trainer's own logs show of this fault."""
        masked = diagnosis.kind == "nonfinite_loss" and self._masking
        return [fact("logged_as", f"logged as: {_MASKED}")] if masked else []

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.guard is None:
            return
        if not self.guard.check(step=state.global_step + 1):
            control.should_training_stop = True

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.guard is not None and self.guard.stopped:
            control.should_training_stop = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        guard = self.guard
        if guard is None or logs is None or "loss" not in logs or guard.disabled:
            return
        try:
            self._log(guard, state, logs)
        except Exception as exc:
            guard.contain(exc)

    def _log(self, guard: Guard, state: TrainerState, logs: dict[str, Any]) -> None:
        window = [s for s in guard.journal.nonfinite_loss_steps if s > self._last_logged_step]
        self._last_logged_step = state.global_step
        values = self.log_values()
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
        if window and self._masking and not self._masked_reported:
            self._masked_reported = True
            guard.add_finding(
                Finding.of(
                    "masked_nonfinite_log",
                    f"the Trainer logged loss {logs['loss']} at step {state.global_step}, but the raw loss "
                    f"was NaN/Inf at step(s) {', '.join(map(str, window[:10]))}: logging_nan_inf_filter "
                    "hides it",
                    "read gradguard's report (or set logging_nan_inf_filter=False) to see the real loss",
                    step=state.global_step,
                )
            )

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.guard is not None and self.guard.report_dir is not None:
            self.guard.write()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.guard is not None:
            self.guard.close()

    # -- values for the Trainer's logs ---------------------------------------------------------------------
    def log_values(self) -> dict[str, float]:
        guard = self.guard
        if guard is None or guard.last is None:
            return {}
        last = guard.last
        out: dict[str, float] = {f"gradguard/grad_norm/{g}": v for g, v in last.group_norm.items()}
        out["gradguard/nonfinite_loss_steps"] = float(guard.journal.counts["nonfinite_loss_steps"])
        supervised = [n for n in last.supervised if n is not None]
        if supervised:
            out["gradguard/supervised_tokens"] = float(sum(supervised))
        if last.loss is not None:
            out["gradguard/raw_loss"] = last.loss
        out.update({f"gradguard/update_ratio/{g}": v for g, v in last.update_ratio.items()})
        if self.log_module_norms:
            for name, v in guard.module_norms().items():
                out[f"gradguard/module_grad_norm/{name}"] = v
        return {k: (v if math.isfinite(v) else float("nan")) for k, v in out.items()}

    # -- checkpoints (transformers' ExportableState) -----------------------------------------------------
    def state(self) -> dict[str, Any]:
        args = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"args": plain(args), "attributes": {"_resume": self._guard_state()}}

    def _guard_state(self) -> dict[str, Any] | None:
        if self.guard is None or self.guard.disabled:
            return None
        try:
            return self.guard.state_dict()
        except Exception as exc:  # a checkpoint must never fail because of gradguard
            self.guard.contain(exc)
            return None

    # -- helpers ------------------------------------------------------------------------------------------
    def _put_first_for_logging(self) -> None:
        """Run before the reporting callbacks in ``on_log``, so TensorBoard / W&B see gradguard's keys.

        Callbacks get no handle on the Trainer; the CallbackHandler is the caller of this event. A new
        list is assigned (never mutated in place), so the event loop iterating the old one is unaffected.
        """
        frame = inspect.currentframe()
        try:
            caller = frame.f_back.f_back if frame and frame.f_back else None
            handler = caller.f_locals.get("self") if caller else None
            callbacks = getattr(handler, "callbacks", None)
            if isinstance(callbacks, list) and self in callbacks:
                handler.callbacks = [self] + [c for c in callbacks if c is not self]  # type: ignore[union-attr]
        finally:
            del frame


def _warmup_longer_than_run(args: TrainingArguments, state: TrainerState) -> list[Finding]:
    """A linear warm-up longer than the whole run (``warmup_steps=10**6`` with ``max_steps=20``: a count given where
    a ratio was meant): the learning rate never gets near its value, and the weights barely move."""
    steps = state.max_steps
    get = getattr(args, "get_warmup_steps", None)
    warmup = get(steps) if callable(get) and steps and steps > 0 else 0
    if not warmup or warmup <= steps:
        return []
    reached = steps / warmup
    return [
        Finding.of(
            "no_update",
            f"the warm-up ({warmup} steps) is longer than the run ({steps} steps): the learning rate reaches only "
            f"{reached:.2g} of learning_rate={args.learning_rate:g}, so the weights barely move",
            "give the warm-up as a fraction (warmup_ratio=0.03) or as steps shorter than max_steps",
            phase="static",
        )
    ]
