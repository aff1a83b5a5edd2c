"""Trend detectors: the run's own history, watched for what one step cannot show.

Pure state machines over :class:`~gradguard.engine.stats.StepStats` (no hooks, no I/O), one per concern:

- :class:`LossWatch`: loss spikes and a loss collapsing to ~0;
- :class:`NormWatch`: gradient explosions, per group;
- :class:`GroupWatch`: trainable groups that get no gradient although their forward ran (dead), that run no
  forward for a long time (idle: text-only batches in VLM data), and tensors that never get a gradient;
- :class:`ScalerWatch`: an fp16 loss scale that keeps falling.

Thresholds are relative to the run itself (robust median/MAD statistics), never absolute: healthy gradient norms
range from 1e-3 to 1e3 across models. :class:`Trends` runs them all and saves their state with the checkpoint.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from gradguard.engine.detectors import Thresholds
from gradguard.engine.stats import GroupContext, StepStats
from gradguard.report.model import Finding


def _robust_z(x: float, window: deque[float]) -> tuple[float, float]:
    med = statistics.median(window)
    mad = statistics.median(abs(v - med) for v in window)
    scale = 1.4826 * mad + 1e-12 * max(1.0, abs(med))
    return (x - med) / scale, med


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, set):
        return sorted(v)
    return list(v) if isinstance(v, deque) else v


class _Saved:
    """State as plain data (deques and sets as lists), for the checkpoint; every field is saved."""

    def state(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name != "th"}  # type: ignore[arg-type]

    def load(self, state: Mapping[str, Any]) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            if f.name == "th" or f.name not in state:
                continue
            current, value = getattr(self, f.name), state[f.name]
            if isinstance(current, set):
                value = set(value)
            elif isinstance(current, deque):
                value = deque(value)
            elif isinstance(current, dict) and f.name == "norms":
                value = {k: deque(v) for k, v in value.items()}
            setattr(self, f.name, value)


@dataclass
class LossWatch(_Saved):
    th: Thresholds
    losses: deque[float] = field(default_factory=deque)
    start_losses: list[float] = field(default_factory=list)
    near_zero: int = 0
    collapsed: bool = False

    def update(self, step: int, loss: float) -> list[Finding]:
        th = self.th
        out = []
        if len(self.start_losses) < 10:
            self.start_losses.append(loss)
        if len(self.losses) >= th.warmup:
            z, med = _robust_z(loss, self.losses)
            if z > th.spike_z and loss > th.spike_ratio * med:
                out.append(
                    Finding.of(
                        "loss_spike",
                        f"step {step}: loss {loss:.4g} is {loss / med:.1f}x its recent median {med:.4g} "
                        f"(robust z {z:.0f})",
                        "lower the learning rate or add warm-up; check the batch at this step",
                        step=step,
                        phase="forward",
                    )
                )
        self.losses.append(loss)
        while len(self.losses) > th.window:
            self.losses.popleft()
        start = statistics.median(self.start_losses)
        self.near_zero = self.near_zero + 1 if start > 1e-2 and abs(loss) < th.collapse_fraction * start else 0
        if self.near_zero >= th.collapse_steps and not self.collapsed:
            self.collapsed = True
            out.append(
                Finding.of(
                    "loss_collapse",
                    f"step {step}: the loss has been ~0 ({loss:.2g}) for {self.near_zero} steps after starting "
                    f"at {start:.3g}",
                    "check that labels do not leak into the inputs and that the answer tokens are supervised",
                    step=step,
                    phase="forward",
                )
            )
        return out


@dataclass
class NormWatch(_Saved):
    th: Thresholds
    norms: dict[str, deque[float]] = field(default_factory=dict)  # log10 of each group's recent norms

    def update(self, step: int, name: str, norm: float) -> list[Finding]:
        th = self.th
        hist = self.norms.setdefault(name, deque())
        out = []
        log_norm = math.log10(norm)
        if len(hist) >= th.warmup:
            z, med = _robust_z(log_norm, hist)
            if z > th.spike_z and log_norm - med > math.log10(th.explosion_ratio):
                out.append(
                    Finding.of(
                        "grad_explosion",
                        f"step {step}: {name}'s pre-clip gradient norm {norm:.3g} is "
                        f"{10 ** (log_norm - med):.0f}x its recent median {10**med:.3g}",
                        "lower the learning rate (or this group's), keep max_grad_norm on, check the batch",
                        name,
                        step=step,
                        phase="backward",
                    )
                )
        hist.append(log_norm)
        while len(hist) > th.window:
            hist.popleft()
        return out


@dataclass
class GroupWatch(_Saved):
    """Trainable groups and their gradients, judged only on the steps where the group's forward ran.

    Real VLM data mixes text-only samples: on those steps the vision tower and the connector run no forward and
    get no gradient, which is healthy. A group is *dead* when its forward ran and it still got no (or an exactly
    zero) gradient, ``dead_steps`` times in a row; *idle* when it ran no forward for ``idle_steps`` steps (an
    info); an expected group that never ran in the whole run is a warning at the end. Tensors that never get a
    gradient while their group runs (LLaVA's last vision layer under ``vision_feature_layer=-2``) are an info.
    """

    th: Thresholds
    dead: dict[str, int] = field(default_factory=dict)  # consecutive steps: ran, and no gradient
    idle: dict[str, int] = field(default_factory=dict)  # consecutive steps without a forward
    ran_steps: dict[str, int] = field(default_factory=dict)  # steps its forward ran, whole run
    steps: int = 0  # steps watched
    reported: set[str] = field(default_factory=set)  # "dead:<group>", "idle:<group>", "unused:<group>"

    def update(self, stats: StepStats, groups: Mapping[str, GroupContext]) -> list[Finding]:
        out: list[Finding] = []
        self.steps += 1
        for name, ctx in groups.items():
            if not ctx.trainable:
                continue
            ran = stats.group_ran.get(name)
            if ran is False:
                self.idle[name] = self.idle.get(name, 0) + 1
                out += self._idle(stats.step, name)
                continue
            self.idle[name] = 0
            self.ran_steps[name] = self.ran_steps.get(name, 0) + 1
            fired = stats.group_fired.get(name, 0)
            got = fired and stats.group_nonzero.get(name, 0)
            self.dead[name] = 0 if got else self.dead.get(name, 0) + 1
            if self.dead[name] >= self.th.dead_steps and self._first("dead", name):
                out.append(self._dead(stats.step, ctx, fired))
            unused = stats.group_unfired.get(name)
            if unused and self.ran_steps[name] >= self.th.dead_steps and self._first("unused", name):
                out.append(self._unused(stats.step, name, unused))
        return out

    def finish(self, groups: Mapping[str, GroupContext]) -> list[Finding]:
        """At the end of the run: the expected groups whose forward never ran."""
        steps = self.steps
        never = [g for g, c in groups.items() if c.expected and c.trainable and steps and not self.ran_steps.get(g)]
        return [
            Finding.of(
                "idle_group",
                f"{g} was expected to train, but its forward never ran in the {steps} steps of this run, so it "
                "learned nothing",
                "check that the data reaches it (image samples and their pixel_values in the batches, the image "
                "token in the prompts) and that the collator keeps those columns (remove_unused_columns=False)",
                g,
                severity="warning",
            )
            for g in never
            if self._first("never", g)
        ]

    def _first(self, what: str, name: str) -> bool:
        key = f"{what}:{name}"
        if key in self.reported:
            return False
        self.reported.add(key)
        return True

    def _idle(self, step: int, name: str) -> list[Finding]:
        n = self.idle[name]
        if n < self.th.idle_steps or not self._first("idle", name):
            return []
        return [
            Finding.of(
                "idle_group",
                f"no input reached `{name}` in the last {n} steps: its forward did not run (text-only batches?), "
                "so it got no gradient and did not train on them",
                "expected in VLM data that mixes text-only samples; if every sample should have an image, check "
                "the collator and the image placeholder tokens",
                name,
                step=step,
                phase="forward",
            )
        ]

    def _dead(self, step: int, ctx: GroupContext, fired: int) -> Finding:
        why = "no gradient at all (.grad stayed None)" if fired == 0 else "an exactly zero gradient"
        return Finding.of(
            "dead_gradient",
            f"{ctx.name} is trainable and its forward ran, but it got {why} for {self.dead[ctx.name]} consecutive "
            "steps",
            "check that its forward is not under torch.no_grad or detached, and that gradient "
            "checkpointing uses use_reentrant=False (or call model.enable_input_require_grads())",
            ctx.name,
            severity="error" if ctx.expected else "warning",
            step=step,
            phase="backward",
        )

    def _unused(self, step: int, name: str, tensors: list[str]) -> Finding:
        shown = ", ".join(tensors[:8]) + (f" (+{len(tensors) - 8} more)" if len(tensors) > 8 else "")
        return Finding.of(
            "unused_params",
            f"{len(tensors)} trainable tensor(s) of {name} never got a gradient in the "
            f"{self.ran_steps[name]} steps its forward ran: {shown}",
            "they take optimizer memory and learn nothing (e.g. LLaVA reads the vision features before the last "
            "layer, vision_feature_layer=-2): freeze them (requires_grad_(False)) or leave them out of LoRA's "
            "target_modules",
            name,
            step=step,
            phase="backward",
        )


@dataclass
class ScalerWatch(_Saved):
    th: Thresholds
    skips: int = 0
    reported: bool = False

    def update(self, stats: StepStats) -> list[Finding]:
        self.skips = self.skips + 1 if not stats.grads_finite else 0
        if self.skips < self.th.scaler_skips or self.reported:
            return []
        self.reported = True
        scale = f" to {stats.loss_scale:.3g}" if stats.loss_scale is not None else ""
        return [
            Finding.of(
                "loss_scale_collapse",
                f"step {stats.step}: the fp16 GradScaler skipped {self.skips} steps in a row and the loss "
                f"scale fell{scale}: the model overflows fp16 every step",
                "train in bf16, or find the overflowing module (GradGuard's report names it) and keep it in fp32",
                step=stats.step,
                phase="optimizer",
            )
        ]


class Trends:
    """Every trend detector, fed one step at a time; the state of all of them is saved with a checkpoint."""

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.thresholds = th = thresholds or Thresholds()
        self.loss, self.norms, self.groups, self.scaler = LossWatch(th), NormWatch(th), GroupWatch(th), ScalerWatch(th)

    def update(self, stats: StepStats, groups: Mapping[str, GroupContext]) -> list[Finding]:
        out: list[Finding] = []
        step, loss = stats.step, stats.loss
        if loss is not None and math.isfinite(loss):
            out += self.loss.update(step, loss)
            empty = [i for i, n in enumerate(stats.supervised) if n == 0]
            if empty:  # a finite loss over no target tokens: a wasted step, not a poisoned one
                out.append(
                    Finding.of(
                        "no_supervision",
                        f"step {step}: micro-batch {empty[0]} has no target tokens (all labels are -100); "
                        "the step learned nothing from it",
                        "raise model_max_length or drop samples whose labels are all -100 in the collator",
                        severity="warning",
                        step=step,
                        phase="data",
                    )
                )
        out += self.groups.update(stats, groups)
        for name, ctx in groups.items():
            norm = stats.group_norm.get(name)
            if ctx.trainable and norm is not None and math.isfinite(norm) and norm > 0:
                out += self.norms.update(step, name, norm)
        if stats.scaler_active:
            out += self.scaler.update(stats)
        return out

    def finish(self, groups: Mapping[str, GroupContext]) -> list[Finding]:
        """Findings only the end of the run can tell."""
        return self.groups.finish(groups)

    def _parts(self) -> dict[str, _Saved]:
        return {"loss": self.loss, "norms": self.norms, "groups": self.groups, "scaler": self.scaler}

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state() for name, part in self._parts().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, part in self._parts().items():
            part.load(state.get(name, {}))
