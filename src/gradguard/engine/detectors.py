"""Detectors: pure functions of one step's statistics. No hooks, no I/O.

:func:`diagnose` answers "is this step poisoned, and where did it begin?" (the errors that stop a run); the
run's history is watched by :mod:`gradguard.engine.trends`. :class:`Thresholds` holds the knobs of both. The
guard's own findings (internal errors, weights found non-finite, a flag no detector could attribute) are built
here too, once each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradguard.engine.diagnosis import Diagnosis, fact, origin_for
from gradguard.engine.stats import GroupContext, StepStats
from gradguard.errors import ConfigurationError
from gradguard.report.format import fmt_float, fmt_value
from gradguard.report.model import Finding, Origin

FP16_MAX = 65504.0


@dataclass(frozen=True)
class Thresholds:
    """The few knobs of the detectors. Defaults are tuned to stay quiet on healthy runs."""

    window: int = 50  # steps of history the robust statistics look at
    warmup: int = 20  # steps before spikes / explosions can be called
    spike_z: float = 8.0  # robust z-score (MAD units) for a loss spike or gradient explosion
    spike_ratio: float = 1.5  # … and at least this factor above the median (loss)
    explosion_ratio: float = 10.0  # … and at least this factor above the median (grad norm)
    dead_steps: int = 3  # consecutive steps with a forward but no gradient before a group is called dead
    idle_steps: int = 50  # consecutive steps without a forward before a trainable group is called idle (info)
    collapse_steps: int = 5  # consecutive near-zero loss steps before "collapse"
    collapse_fraction: float = 1e-3  # "near zero" = below this fraction of the starting loss
    collapse_drop: float = 10.0  # a collapse is sudden (labels leaking) when the loss fell this much in 3 steps
    scaler_skips: int = 8  # consecutive fp16 skipped steps before the loss scale counts as collapsed
    # Divergence from the first steps (before any warm-up of the robust statistics):
    divergence_steps: int = 3  # consecutive diverged steps before loss_divergence (an error)
    chance_factor: float = 2.0  # a loss over a vocabulary this far above ln(V) is worse than guessing
    divergence_ratio: float = 10.0  # … or this far above the run's own first losses
    early_explosion_ratio: float = 100.0  # a gradient norm this far above its first steps' median
    # The update-to-weight ratio |dW| / |W| of each trainable group, per optimizer step:
    no_update_ratio: float = 1e-8  # below this, the weights do not move (lr 1e-8 moves them by ~3e-8)
    no_update_steps: int = 5  # consecutive steps that small (at a learning rate that is not warming up)
    update_too_large: float = 0.5  # above this, one step rewrites a large part of the weights

    @classmethod
    def from_dict(cls, data: Thresholds | Mapping[str, Any] | None) -> Thresholds:
        if data is None:
            return cls()
        if isinstance(data, Thresholds):
            return data
        if not isinstance(data, Mapping):
            raise ConfigurationError(f"thresholds must be a dict of Thresholds fields, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ConfigurationError(f"unknown threshold(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def __post_init__(self) -> None:
        for name, (valid, what) in _VALID.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
                raise ConfigurationError(f"thresholds[{name!r}] must be {what}, got {value!r}")


# What each threshold accepts, and the range in words for the error message.
_VALID: dict[str, tuple[Callable[[Any], bool], str]] = {
    "window": (lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
    "warmup": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "spike_z": (lambda v: v > 0, "a number > 0"),
    "spike_ratio": (lambda v: v > 1, "a number > 1"),
    "explosion_ratio": (lambda v: v > 1, "a number > 1"),
    "dead_steps": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "idle_steps": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "collapse_steps": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "collapse_fraction": (lambda v: 0 < v < 1, "a number between 0 and 1 (exclusive)"),
    "collapse_drop": (lambda v: v > 1, "a number > 1"),
    "scaler_skips": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "divergence_steps": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "chance_factor": (lambda v: v > 1, "a number > 1"),
    "divergence_ratio": (lambda v: v > 1, "a number > 1"),
    "early_explosion_ratio": (lambda v: v > 1, "a number > 1"),
    "no_update_ratio": (lambda v: v >= 0, "a number >= 0"),
    "no_update_steps": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "update_too_large": (lambda v: v > 0, "a number > 0"),
}


def diagnose(
    stats: StepStats, groups: Mapping[str, GroupContext], first_bad_grad: tuple[str, str] | None = None
) -> Diagnosis | None:
    """The poisoning fault of this step, if any: kind, origin and evidence.

    The order of checks is the order in which a non-finite value can be born: the data, the forward
    pass (the first group, in execution order, whose output is not finite), the loss, then backward.
    Under an fp16 GradScaler a non-finite gradient with a finite loss is an ordinary overflow that the
    scaler handles (the step is skipped), so it is not a fault here. ``first_bad_grad`` is the (group,
    parameter) of the first non-finite gradient in backward order, when the gradients were not finite.

    >>> ctx = {"proj": GroupContext("proj", "connector", True, False)}
    >>> s = StepStats(step=3, losses=[float("nan")], group_outputs=[("proj", 0, float("inf"))])
    >>> d = diagnose(s, ctx)
    >>> d.kind, d.origin.phase, d.origin.group, d.origin.role
    ('nonfinite_loss', 'forward', 'proj', 'connector')
    """
    return _data_fault(stats, groups) or _nonfinite_fault(stats, groups, first_bad_grad)


def _data_fault(stats: StepStats, groups: Mapping[str, GroupContext]) -> Diagnosis | None:
    """A fault born in the batch itself: a non-finite input, or no target token to learn from."""
    step = stats.step
    bad_inputs = [(m, k, v) for m, k, v in stats.inputs if not math.isfinite(v)]
    if bad_inputs:
        micro, key, value = bad_inputs[0]
        keys = sorted({k for _, k, _ in bad_inputs})
        # Which part of the model took it in: the first group, in execution order, whose output in that
        # micro-batch is not finite (the vision tower for `pixel_values`, the embeddings for `inputs_embeds`).
        consumer = next((g for g, m, a in stats.group_outputs if m == micro and not math.isfinite(a)), None)
        o = origin_for("data", consumer, groups, module=key, micro_batch=micro)
        into = ""
        if consumer is not None:
            into = f", and it reached `{consumer}` ({o.role}, {'trainable' if o.trainable else 'frozen'})"
        f = Finding.of(
            "nonfinite_input",
            f"step {step}: the batch input `{key}` contains {'NaN' if math.isnan(value) else 'Inf'} "
            f"(micro-batch {micro}){into}; the fault is in the data, not the model",
            f"check the data pipeline for `{key}` (e.g. a division by a zero std in normalisation); "
            "filter such samples in the collator",
            consumer,
            step=step,
            phase="data",
        )
        evidence = [fact("nonfinite_inputs", f"non-finite inputs: {', '.join(keys)}", value=keys)]
        if consumer is not None:
            text = f"first non-finite forward output: {consumer} (micro-batch {micro})"
            evidence.append(fact("first_nonfinite_output", text, group=consumer, module=consumer, micro_batch=micro))
        return Diagnosis(f, o, tuple(evidence))
    loss_bad = any(not math.isfinite(v) for v in stats.losses)
    unsupervised = [i for i, n in enumerate(stats.supervised) if n == 0]
    if unsupervised and (loss_bad or not stats.losses):
        micro = unsupervised[0]
        f = Finding.of(
            "no_supervision",
            f"step {step}: micro-batch {micro} has no target tokens (all labels are -100)"
            + (f", so its loss is {fmt_float(stats.losses[micro])}" if micro < len(stats.losses) else ""),
            "image tokens or a long prompt probably filled model_max_length and truncation cut the answer: "
            "raise model_max_length or drop samples whose labels are all -100",
            step=step,
            phase="data",
        )
        o = Origin(phase="data", module="labels", micro_batch=micro)
        text = f"supervised tokens per micro-batch: {stats.supervised}"
        return Diagnosis(f, o, (fact("supervised_tokens", text, value=list(stats.supervised)),))
    return None


def _nonfinite_fault(
    stats: StepStats, groups: Mapping[str, GroupContext], first_bad_grad: tuple[str, str] | None
) -> Diagnosis | None:
    """A non-finite loss or gradient, and the phase and group it was born in."""
    loss_bad = [(i, v) for i, v in enumerate(stats.losses) if not math.isfinite(v)]
    bad_grads = {g: n for g, n in stats.group_nonfinite.items() if n}
    if not loss_bad and not (bad_grads and not stats.scaler_active):
        return None
    evidence: list[dict[str, Any]] = []
    if loss_bad:
        micro, value = loss_bad[0]
        kind, what = "nonfinite_loss", f"the raw loss is {fmt_float(value)} (micro-batch {micro})"
        evidence.append(
            fact("raw_loss", f"raw loss per micro-batch: {fmt_value(stats.losses)}", value=list(stats.losses))
        )
    elif stats.losses:
        kind, what = "nonfinite_grad", "the loss is finite but gradients are not"
    else:  # never say what was not observed: the loss may be NaN too
        kind, what = (
            "nonfinite_grad",
            (
                "gradients are not finite (the loss was not recorded: pass it with `guard.record_loss(loss)` to tell a "
                "NaN loss from a NaN gradient)"
            ),
        )
    if bad_grads:
        text = "groups with non-finite gradients: " + ", ".join(f"{g} ({n} tensors)" for g, n in bad_grads.items())
        evidence.append(fact("nonfinite_gradients", text, value=bad_grads))
    bad_out = next(((g, m) for g, m, a in stats.group_outputs if not math.isfinite(a)), None)
    if bad_out is not None:
        o, where, hint = _forward_origin(stats, groups, *bad_out, evidence)
    elif loss_bad:
        o, where, hint = _loss_origin(stats, groups, loss_bad[0][0])
    else:  # born in the backward pass: the first group, in backward order, with a non-finite gradient
        group = first_bad_grad[0] if first_bad_grad is not None else next(iter(bad_grads))
        where = f"in backward order the first non-finite gradient belongs to `{group}`"
        o = origin_for("backward", group, groups)
        hint = (
            f"a backward-only failure in `{group}`: fully masked attention rows, a custom autograd function, "
            "or an attention-kernel backward bug"
        )
    if first_bad_grad is not None:
        group, param = first_bad_grad
        text = f"first non-finite gradient (backward order): {param}"
        evidence.append(fact("first_nonfinite_gradient", text, group=group, module=param))
    f = Finding.of(kind, f"step {stats.step}: {what}; {where}", hint, o.group, step=stats.step, phase=o.phase)
    return Diagnosis(f, o, tuple(evidence))


def _forward_origin(
    stats: StepStats, groups: Mapping[str, GroupContext], group: str, micro: int, evidence: list[dict[str, Any]]
) -> tuple[Origin, str, str]:
    """Born in the forward pass: the first group, in execution order, whose output is not finite."""
    ctx = groups.get(group)
    state = "trainable" if ctx and ctx.trainable else "frozen"
    text = f"first non-finite forward output: {group} (micro-batch {micro})"
    evidence.append(fact("first_nonfinite_output", text, group=group, module=group, micro_batch=micro))
    before = {g: a for g, m, a in stats.group_outputs if m == micro and math.isfinite(a)}
    if before:
        text = "finite outputs before it (abs-max): " + ", ".join(f"{g}: {a:.3g}" for g, a in before.items())
        evidence.append(fact("finite_outputs_before", text, value=before))
    return (
        origin_for("forward", group, groups, micro_batch=micro),
        f"the first non-finite value appeared in the forward output of `{group}` ({state})",
        f"look inside `{group}`: fp16 overflow (switch to bf16 or keep it in fp32), a too-high learning "
        "rate, or a numerically unsafe op (log, sqrt, division) in its forward",
    )


def _loss_origin(stats: StepStats, groups: Mapping[str, GroupContext], micro: int) -> tuple[Origin, str, str]:
    """Every checked forward output was finite: the head (whose logits the loss check covers) or the loss."""
    seen = {g for g, m, _ in stats.group_outputs if m == micro}
    unchecked = [g for g, c in groups.items() if c.role == "head" and g not in seen]
    if unchecked:
        where = (
            f"every checked forward output was finite, so the head (`{unchecked[0]}`, whose logits the loss "
            "check covers) or the loss computation produced it"
        )
    else:
        where = "every group's forward output was finite, so the loss computation itself produced it"
    hint = "check the loss inputs: logits overflowing in fp16, labels out of range, or a custom loss"
    return origin_for("forward", None, groups, micro_batch=micro), where, hint


def top_modules(modules: Sequence[str], rows: Sequence[Sequence[float]], k: int = 5) -> list[dict[str, Any]]:
    """Evidence for a fault: the modules with the largest (or non-finite) gradient norms at this step (the last
    row) and the ones whose norm grew most against the earlier rows (the recent window).

    >>> top_modules(["a", "b"], [[1.0, 1.0], [1.0, 50.0]])[0]["value"]
    {'b': 50.0}
    """
    if not rows or not modules:
        return []
    norms, past = rows[-1], rows[:-1]
    out: list[dict[str, Any]] = []
    if past:
        growth = []
        for i, m in enumerate(modules):
            before = sorted(row[i] for row in past if math.isfinite(row[i]))
            ref = before[len(before) // 2] if before else 0.0
            if ref > 0 and math.isfinite(norms[i]):
                growth.append((norms[i] / ref, m))
        top = {m: g for g, m in sorted(growth, reverse=True)[:k] if g > 2}
        if top:
            text = f"fastest-growing gradient norms (vs median of last {len(past)} steps): " + ", ".join(
                f"{m}: {g:.3g}x" for m, g in top.items()
            )
            out.append(fact("fastest_growing_gradients", text, value=top))
    bad = [m for m, v in zip(modules, norms) if not math.isfinite(v)]
    finite = {m: v for v, m in sorted(((v, m) for m, v in zip(modules, norms) if math.isfinite(v)), reverse=True)[:k]}
    if bad:
        more = f" (+{len(bad) - k})" if len(bad) > k else ""
        out.append(
            fact(
                "nonfinite_gradient_modules",
                f"modules with non-finite gradients: {', '.join(bad[:k])}{more}",
                value=bad,
            )
        )
    if finite:
        text = "largest finite gradient norms: " + ", ".join(f"{m}: {v:.3g}" for m, v in finite.items())
        out.append(fact("largest_gradient_norms", text, value=finite))
    return out


def static_fault(findings: Sequence[Finding], groups: Mapping[str, GroupContext]) -> Diagnosis | None:
    """The fault the static audit found before step 1, if any: its first error, with how many there are."""
    errors = [f for f in findings if f.severity == "error"]
    if not errors:
        return None
    text = f"static errors: {len(errors)} ({', '.join(f.code for f in errors)})"
    origin = origin_for("static", errors[0].group, groups)
    return Diagnosis(errors[0], origin, (fact("static_errors", text, value=len(errors)),))


def from_finding(finding: Finding, groups: Mapping[str, GroupContext]) -> Diagnosis:
    """A trend or deferred finding as a diagnosis (its origin: the finding's group and phase)."""
    return Diagnosis(finding, origin_for(finding.phase or "backward", finding.group, groups))


# -- the guard's own findings (one builder each) ---------------------------------------------------------


def nonfinite_params(step: int, when: str = "before") -> Finding:
    """Trainable weights that hold NaN/Inf (checked every ``param_check_every`` steps and at the end)."""
    return Finding.of(
        "nonfinite_param",
        f"{when} step {step}: some trainable weights are not finite",
        "resume from a checkpoint taken before the first fault",
        step=step,
        phase="optimizer",
    )


def unattributed(step: int) -> Finding:
    """A rank flagged a non-finite value on the device that no detector could attribute."""
    return Finding.of(
        "nonfinite_grad",
        f"step {step}: a non-finite value was seen in this step's statistics",
        "rerun with GradGuard(trace='full') to find where it appears",
        step=step,
        phase="backward",
    )


def flagged_elsewhere(step: int) -> Finding:
    """Under on_fault="warn", after the first fault: another rank saw a non-finite value again."""
    return Finding.of(
        "nonfinite_grad",
        f"step {step}: another rank saw a non-finite value again",
        "read the report written by rank 0: it names the rank where the fault began",
        step=step,
        phase="backward",
    )


def internal_error(exc: BaseException, step: int) -> Finding:
    """gradguard itself failed: it disables itself and training goes on."""
    return Finding.of(
        "internal_error",
        f"gradguard disabled itself after an internal error ({type(exc).__name__}: {exc}); training goes on",
        "please report it; GradGuard(strict=True) re-raises it",
        step=step,
    )
