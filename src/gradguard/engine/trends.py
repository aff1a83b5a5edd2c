"""Trend detectors: the run's own history, watched for what one step cannot show.

Pure state machines over :class:`~gradguard.engine.stats.StepStats` (no hooks, no I/O), one per concern:

- :class:`LossWatch`: divergence from the first steps (worse than guessing), loss spikes, a loss collapsing to ~0
  (suddenly: leaked labels; smoothly: memorisation);
- :class:`NormWatch`: gradient explosions, per group, against the first steps and the recent history;
- :class:`UpdateWatch`: weights that do not move, or move too much, per optimizer step;
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
    """The raw loss: divergence from the first steps on, spikes against the recent median, collapse to ~0.

    Divergence needs no warm-up: a cross-entropy over ``V`` classes starts near ``ln V`` with random weights and
    only falls from there in a fine-tune, so a loss ``chance_factor`` times above ``ln V`` is *worse than guessing*
    whatever the history; without a vocabulary, a loss ``divergence_ratio`` times its first value says the same.
    One such step is a warning; ``divergence_steps`` in a row is ``loss_divergence``, an error.
    """

    th: Thresholds
    losses: deque[float] = field(default_factory=deque)
    start_losses: list[float] = field(default_factory=list)
    near_zero: int = 0
    collapsed: bool = False
    fell_from: float = 0.0  # the highest of the 3 losses just before it reached ~0
    diverged: int = 0  # consecutive steps above the divergence line
    warned: bool = False
    reported: bool = False

    def update(self, step: int, loss: float, vocab: int | None = None) -> list[Finding]:
        out = self._divergence(step, loss, vocab)
        if len(self.losses) >= self.th.warmup:
            out += self._spike(step, loss)
        recent = list(self.losses)[-3:]
        if len(self.start_losses) < 10:
            self.start_losses.append(loss)
        self.losses.append(loss)
        while len(self.losses) > self.th.window:
            self.losses.popleft()
        return out + self._collapse(step, loss, recent)

    def _divergence(self, step: int, loss: float, vocab: int | None) -> list[Finding]:
        th = self.th
        chance = math.log(vocab) if vocab and vocab > 1 else None
        first = self.start_losses[0] if self.start_losses else None
        if chance is not None:
            line, why = (
                th.chance_factor * chance,
                f"{loss / chance:.1f}x the loss of guessing (ln {vocab} = {chance:.2f})",
            )
        elif first is not None and first > 0:
            line, why = th.divergence_ratio * first, f"{loss / first:.1f}x the run's first loss ({first:.4g})"
        else:
            return []
        self.diverged = self.diverged + 1 if loss > line else 0
        if not self.diverged:
            return []
        out = []
        if not self.warned:
            self.warned = True
            out.append(
                Finding.of(
                    "loss_spike",
                    f"step {step}: loss {loss:.4g} is {why}: the model is confidently wrong",
                    "lower the learning rate (a typo such as 1.0 for 1e-4?), add warm-up and clipping",
                    step=step,
                    phase="forward",
                )
            )
        if self.diverged >= th.divergence_steps and not self.reported:
            self.reported = True
            out.append(
                Finding.of(
                    "loss_divergence",
                    f"step {step}: the loss has diverged: {self.diverged} steps in a row above the line "
                    f"({line:.4g}); now {loss:.4g}, {why}",
                    "the learning rate is far too high for this model (check its value and unit), or the update is "
                    "wrong (a scheduler, a loss scale): lower it, add warm-up and max_grad_norm; to be warned only, "
                    "pass GradGuard(severity={'loss_divergence': 'warning'})",
                    step=step,
                    phase="optimizer",
                )
            )
        return out

    def _spike(self, step: int, loss: float) -> list[Finding]:
        z, med = _robust_z(loss, self.losses)
        if z <= self.th.spike_z or loss <= self.th.spike_ratio * med:
            return []
        return [
            Finding.of(
                "loss_spike",
                f"step {step}: loss {loss:.4g} is {loss / med:.1f}x its recent median {med:.4g} (robust z {z:.0f})",
                "lower the learning rate or add warm-up; check the batch at this step",
                step=step,
                phase="forward",
            )
        ]

    def _collapse(self, step: int, loss: float, recent: list[float]) -> list[Finding]:
        """A loss stuck at ~0. Sudden (``collapse_drop`` times down within 3 steps: the signature of labels leaking
        into the inputs) is a warning; a smooth descent over many steps (memorising a small data set) an info."""
        th = self.th
        start = statistics.median(self.start_losses)
        near = start > 1e-2 and abs(loss) < th.collapse_fraction * start
        if near and not self.near_zero:
            self.fell_from = max(recent, default=loss)
        self.near_zero = self.near_zero + 1 if near else 0
        if self.near_zero < th.collapse_steps or self.collapsed:
            return []
        self.collapsed = True
        if self.fell_from >= th.collapse_drop * th.collapse_fraction * start:  # from far above the ~0 line
            return [
                Finding.of(
                    "loss_collapse",
                    f"step {step}: the loss fell to ~0 ({loss:.2g}) within 3 steps (from {self.fell_from:.3g}) and "
                    f"stayed there for {self.near_zero} steps, after starting at {start:.3g}",
                    "check that labels do not leak into the inputs and that the answer tokens are supervised",
                    step=step,
                    phase="forward",
                )
            ]
        return [
            Finding.of(
                "loss_collapse",
                f"step {step}: the loss has descended smoothly to ~0 ({loss:.2g}) from {start:.3g}: the model is "
                "memorising its training data",
                "expected on a tiny data set or many epochs; hold out an evaluation set (eval_strategy) to see "
                "whether it still generalises, and stop earlier if it does not",
                severity="info",
                step=step,
                phase="forward",
            )
        ]


@dataclass
class NormWatch(_Saved):
    """Each group's pre-clip gradient norm: far above its first steps' (no warm-up needed), or a robust outlier
    against its recent history (after ``warmup`` steps)."""

    th: Thresholds
    norms: dict[str, deque[float]] = field(default_factory=dict)  # log10 of each group's recent norms
    first: dict[str, list[float]] = field(default_factory=dict)  # log10 of its first 3 norms

    def update(self, step: int, name: str, norm: float) -> list[Finding]:
        th = self.th
        hist = self.norms.setdefault(name, deque())
        first = self.first.setdefault(name, [])
        log_norm = math.log10(norm)
        out: list[Finding] = []
        if len(first) == 3 and log_norm - statistics.median(first) >= math.log10(th.early_explosion_ratio):
            out.append(self._finding(step, name, norm, 10 ** statistics.median(first), "its first steps' median"))
        elif len(hist) >= th.warmup:
            z, med = _robust_z(log_norm, hist)
            if z > th.spike_z and log_norm - med > math.log10(th.explosion_ratio):
                out.append(self._finding(step, name, norm, 10**med, "its recent median"))
        if len(first) < 3:
            first.append(log_norm)
        hist.append(log_norm)
        while len(hist) > th.window:
            hist.popleft()
        return out

    @staticmethod
    def _finding(step: int, name: str, norm: float, ref: float, what: str) -> Finding:
        return Finding.of(
            "grad_explosion",
            f"step {step}: {name}'s pre-clip gradient norm {norm:.3g} is {norm / ref:.0f}x {what} {ref:.3g}",
            "lower the learning rate (or this group's), keep max_grad_norm on, check the batch",
            name,
            step=step,
            phase="backward",
        )


@dataclass
class UpdateWatch(_Saved):
    """The update-to-weight ratio of each trainable group (see :mod:`gradguard.engine.updates`).

    ``no_update``: below ``no_update_ratio`` for ``no_update_steps`` steps in a row, while the learning rate is not
    warming up (the first steps of a warm-up from 0 are tiny on purpose) nor decayed to under half its peak (the
    second half of a cosine or linear schedule: a small update is then the schedule's doing).
    ``update_too_large``: one step moved the weights by more than ``update_too_large`` of their norm.
    """

    th: Thresholds
    small: dict[str, int] = field(default_factory=dict)
    peak_lr: dict[str, float] = field(default_factory=dict)
    last_lr: dict[str, float] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)

    def update(self, stats: StepStats, groups: Mapping[str, GroupContext]) -> list[Finding]:
        out: list[Finding] = []
        for name, ratio in stats.update_ratio.items():
            ctx = groups.get(name)
            if ctx is None or not ctx.trainable:
                continue
            lr = stats.lr.get(name)
            warming = lr is not None and lr > self.last_lr.get(name, math.inf)
            if lr is not None:
                self.last_lr[name] = lr
                self.peak_lr[name] = max(self.peak_lr.get(name, 0.0), lr)
            annealed = lr is not None and lr < 0.5 * self.peak_lr[name]  # a decaying schedule's doing
            tiny = ratio < self.th.no_update_ratio and not warming and not annealed
            self.small[name] = self.small.get(name, 0) + 1 if tiny else 0
            if self.small[name] >= self.th.no_update_steps and f"none:{name}" not in self.reported:
                self.reported.add(f"none:{name}")
                out.append(self._none(stats.step, ctx, ratio, lr))
            if self.th.update_too_large < ratio < math.inf and f"large:{name}" not in self.reported:
                self.reported.add(f"large:{name}")
                out.append(self._large(stats.step, name, ratio, lr))
        return out

    def _none(self, step: int, ctx: GroupContext, ratio: float, lr: float | None) -> Finding:
        if lr == 0:
            cause = "the learning rate of its optimizer param group is 0"
        elif lr is not None and lr < 1e-7:
            cause = (
                f"its learning rate is {lr:.2g}: a warm-up given in steps where a ratio was meant (warmup_steps "
                "longer than the run), or a scheduler that returns ~0"
            )
        else:
            cause = f"gradients arrive but the update is ~0 at learning rate {lr:.2g}" if lr else "the update is ~0"
        return Finding.of(
            "no_update",
            f"step {step}: {ctx.name}'s weights do not move: each of the last {self.small[ctx.name]} updates changed "
            f"them by {ratio:.1e} of their norm ({cause})",
            "check the learning rate and its schedule (warmup_ratio, not warmup_steps, for a fraction), the "
            "optimizer's param groups, and LoRA's lora_alpha (scaling = lora_alpha / r must not be 0)",
            ctx.name,
            severity="error" if ctx.expected else "warning",
            step=step,
            phase="optimizer",
        )

    @staticmethod
    def _large(step: int, name: str, ratio: float, lr: float | None) -> Finding:
        at = f" at learning rate {lr:.2g}" if lr is not None else ""
        return Finding.of(
            "update_too_large",
            f"step {step}: one update moved {name}'s weights by {ratio:.2g} of their norm{at}: healthy fine-tunes "
            "move them by about 1e-3 per step",
            "lower the learning rate (or this group's), add warm-up, keep max_grad_norm on",
            name,
            step=step,
            phase="optimizer",
        )


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
        self.loss, self.norms, self.groups = LossWatch(th), NormWatch(th), GroupWatch(th)
        self.updates, self.scaler = UpdateWatch(th), ScalerWatch(th)

    def update(self, stats: StepStats, groups: Mapping[str, GroupContext]) -> list[Finding]:
        out: list[Finding] = []
        step, loss = stats.step, stats.loss
        if loss is not None and math.isfinite(loss):
            out += self.loss.update(step, loss, stats.vocab)
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
        out += self.updates.update(stats, groups)
        if stats.scaler_active:
            out += self.scaler.update(stats)
        return out

    def finish(self, groups: Mapping[str, GroupContext]) -> list[Finding]:
        """Findings only the end of the run can tell."""
        return self.groups.finish(groups)

    def _parts(self) -> dict[str, _Saved]:
        return {
            "loss": self.loss,
            "norms": self.norms,
            "groups": self.groups,
            "updates": self.updates,
            "scaler": self.scaler,
        }

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state() for name, part in self._parts().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, part in self._parts().items():
            part.load(state.get(name, {}))
