"""``track_requires_grad``: what a wrapping call (such as ``get_peft_model``) froze or unfroze."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from gradguard.core.groups import GroupMap, build_groups, is_saved_copy
from gradguard.report.format import fmt_count

log = logging.getLogger("gradguard")


class FrozenByWrapWarning(UserWarning):
    """A wrapping call froze parameters that had been made trainable on purpose."""


@dataclass
class GroupChange:
    group: str
    role: str
    frozen: int = 0  # base params that went requires_grad True -> False
    unfrozen: int = 0  # base params that went False -> True
    added_trainable: int = 0  # new parameters (adapters) that require grad
    added_frozen: int = 0
    copied: int = 0  # new trainable modules_to_save copies, which stand in for their (now frozen) originals
    was_trainable: bool = False
    now_trainable: bool = False


@dataclass
class RequiresGradChanges:
    """Per-group changes of ``requires_grad`` across a ``with track_requires_grad(model):`` block."""

    groups: dict[str, GroupChange] = field(default_factory=dict)
    suspicious: list[str] = field(default_factory=list)  # groups frozen against apparent intent

    @property
    def frozen(self) -> dict[str, int]:
        return {g: c.frozen for g, c in self.groups.items() if c.frozen}

    @property
    def unfrozen(self) -> dict[str, int]:
        return {g: c.unfrozen for g, c in self.groups.items() if c.unfrozen}

    @property
    def added(self) -> dict[str, int]:
        return {g: c.added_trainable for g, c in self.groups.items() if c.added_trainable}

    @property
    def copied(self) -> dict[str, int]:
        """Groups now trained through a ``modules_to_save`` copy, with its size."""
        return {g: c.copied for g, c in self.groups.items() if c.copied}

    def lines(self) -> list[str]:
        out = []
        for c in self.groups.values():
            parts = []
            if c.frozen:
                parts.append(f"froze {fmt_count(c.frozen)}")
            if c.unfrozen:
                parts.append(f"unfroze {fmt_count(c.unfrozen)}")
            if c.copied:
                parts.append(f"trains {fmt_count(c.copied)} as a modules_to_save copy (the original is kept frozen)")
            if c.added_trainable:
                parts.append(f"added {fmt_count(c.added_trainable)} trainable adapter params")
            if parts:
                mark = "  <- was trainable, now frozen" if c.group in self.suspicious else ""
                out.append(f"{c.group} ({c.role}): {', '.join(parts)}{mark}")
        return out or ["no requires_grad changes"]

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def __rich__(self) -> Any:
        from gradguard.report.render import changes_renderable

        return changes_renderable(self)


def _count_changes(
    after: GroupMap, before: dict[int, bool], was_trainable: dict[str, bool], changes: RequiresGradChanges
) -> None:
    """Fill ``changes`` per group: what went frozen, trainable, or was added, by numel."""
    for g in after:
        c = changes.groups.setdefault(g.name, GroupChange(g.name, g.role))
        c.was_trainable = was_trainable.get(g.name, False)
        c.now_trainable = g.trainable
        # A modules_to_save copy is the module's weights from now on (see audit.counted_params): its original
        # going frozen is not "froze", and the copy is not an "adapter".
        copies = {info.path for info in g.adapters if is_saved_copy(info) and before.get(id(info.param)) is None}
        for info in g.params:
            p = info.param
            old = before.get(id(p))
            if old is None:
                if p.requires_grad and info.path in copies:
                    c.copied += p.numel()
                elif p.requires_grad:
                    c.added_trainable += p.numel()
                else:
                    c.added_frozen += p.numel()
            elif old and not p.requires_grad and info.path not in copies:
                c.frozen += p.numel()
            elif not old and p.requires_grad:
                c.unfrozen += p.numel()


@contextmanager
def track_requires_grad(
    model: nn.Module, expect_trainable: str | Sequence[str] | None = None
) -> Iterator[RequiresGradChanges]:
    """Report, by group, what the wrapped block froze or unfroze.

    Warns (``FrozenByWrapWarning`` and the ``gradguard`` logger) when the block froze a group that was
    trainable before while other groups were frozen (a deliberate choice, such as MiniCPM-V's
    ``tune_vision=True``), or a group named in ``expect_trainable``. Freezing a fully trainable fresh
    model is what LoRA is for, and is only reported.

    >>> from peft import LoraConfig, get_peft_model
    >>> from gradguard.testing.models import tiny_minicpmv2
    >>> model = tiny_minicpmv2(); model.requires_grad_(False)  # doctest: +ELLIPSIS
    MiniCPMV2(...)
    >>> _ = model.vpm.requires_grad_(True)
    >>> with track_requires_grad(model) as changes:  # doctest: +SKIP
    ...     model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    >>> changes.suspicious  # doctest: +SKIP
    ['vpm']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"track_requires_grad expects a torch.nn.Module, got {type(model).__name__}")
    before = {id(p): p.requires_grad for p in model.parameters()}
    before_groups = build_groups(model)
    was_trainable = {g.name: g.trainable for g in before_groups}
    # Resolved before the block runs (a bad name fails before the wrapping call, not after it), by the
    # rule of every entry point; wrapping does not change group names (wrapper segments are ignored).
    expected: set[str] = set()
    wanted = [expect_trainable] if isinstance(expect_trainable, str) else expect_trainable or []
    for sel in wanted:
        expected |= {g.name for g in before_groups.resolve(sel, "expect_trainable entry")}
    changes = RequiresGradChanges()
    yield changes
    _count_changes(build_groups(model), before, was_trainable, changes)
    deliberate = any(not t for t in was_trainable.values())  # something was frozen on purpose before
    for c in changes.groups.values():
        if c.frozen and c.was_trainable and not c.now_trainable and (deliberate or c.group in expected):
            changes.suspicious.append(c.group)
    if changes.suspicious:
        msg = (
            f"the wrapped call froze {', '.join(changes.suspicious)}, which had been trainable: "
            "get_peft_model freezes everything that is not an adapter or in modules_to_save. Pass "
            f"modules_to_save={[s.rsplit('.', 1)[-1] for s in changes.suspicious]!r} to LoraConfig, or call "
            "requires_grad_(True) on them after wrapping."
        )
        log.warning(msg)
        warnings.warn(msg, FrozenByWrapWarning, stacklevel=3)
