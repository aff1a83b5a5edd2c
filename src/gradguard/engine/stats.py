"""What one optimizer step looked like, as host values: the probes' reading, the detectors' input.

:class:`StepStats` is made by :mod:`gradguard.engine.read` (one host sync) and read by the pure detectors;
:class:`GroupContext` is what the detectors know about a group besides its numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GroupContext:
    """A group as the detectors see it: its role, whether it trains, and whether the user said it must."""

    name: str
    role: str
    trainable: bool
    expected: bool  # named (directly or by role) in expect_trainable


@dataclass
class StepStats:
    """One optimizer step, as host values (read with one sync)."""

    step: int
    losses: list[float] = field(default_factory=list)  # raw loss per micro-batch (its own mean)
    loss_weights: list[float] = field(default_factory=list)  # target tokens per micro-batch, when known
    supervised: list[int | None] = field(default_factory=list)  # labels != -100 per micro-batch
    inputs: list[tuple[int, str, float]] = field(default_factory=list)  # (micro-batch, key, abs-max)
    group_outputs: list[tuple[str, int, float]] = field(default_factory=list)  # firing order, abs-max
    group_norm: dict[str, float] = field(default_factory=dict)  # pre-clip L2, trainable groups
    group_nonfinite: dict[str, int] = field(default_factory=dict)  # param tensors with a non-finite grad
    group_nonzero: dict[str, int] = field(default_factory=dict)  # param tensors with a non-zero grad
    group_fired: dict[str, int] = field(default_factory=dict)  # param tensors that received a grad
    group_ran: dict[str, bool | None] = field(default_factory=dict)  # its forward ran (None: cannot tell)
    group_unfired: dict[str, list[str]] = field(default_factory=dict)  # tensors that never got a gradient yet
    scaler_active: bool = False
    loss_scale: float | None = None
    update_ratio: dict[str, float] = field(default_factory=dict)  # |dW| / |W| of the last update, per group
    lr: dict[str, float | None] = field(default_factory=dict)  # each group's learning rate for the coming update
    vocab: int | None = None  # the loss is a cross-entropy over this many classes (its chance level: ln V)
    params_bad: int | None = None  # trainable weight tensors holding a non-finite value (every N steps)
    rank_flags: list[int] = field(default_factory=list)  # per rank: saw a non-finite value / has a stop pending

    @property
    def loss(self) -> float | None:
        """The step's raw loss: the token-weighted mean over micro-batches when the token counts are known
        (as the Trainer computes it), else the plain mean; NaN if any micro-batch's is NaN."""
        if not self.losses:
            return None
        w = self.loss_weights
        if len(w) == len(self.losses) and sum(w) > 0:
            return sum(loss * n for loss, n in zip(self.losses, w)) / sum(w)
        return sum(self.losses) / len(self.losses)

    @property
    def grads_finite(self) -> bool:
        return not any(self.group_nonfinite.values())

    @property
    def flagged(self) -> bool:
        """Whether any rank flagged this step (the same answer on every rank: the flags were all-reduced)."""
        return any(self.rank_flags)
