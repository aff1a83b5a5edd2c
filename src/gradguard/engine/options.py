"""The knobs every front door shares, declared and checked once.

:class:`~gradguard.engine.guard.Guard` takes them as keyword arguments; the HF ``GradGuard`` callback and the
Lightning ``GradGuardCallback`` *are* :class:`Options` (they inherit its fields, so their signatures, defaults
and checks cannot drift apart). Every value is checked when the object is built: a typo fails when the trainer
is built, not after the data has loaded.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

from gradguard.codes import Severity, rule
from gradguard.engine.detectors import Thresholds
from gradguard.engine.policy import ON_FAULT, OnFault
from gradguard.errors import ConfigurationError
from gradguard.report.model import Finding


@dataclass(eq=False)
class Options:
    """What to watch and what to do about it.

    Args:
        expect_trainable: group names, roles or globs that must train (``["vpm", "resampler"]``,
            ``["vision", "connector"]``). Violations are errors; without it, gradguard only warns.
        on_fault: ``"stop"`` (skip the poisoned update, stop, write the report), ``"raise"`` (the same, then
            raise :class:`~gradguard.errors.TrainingHealthError`), ``"warn"`` (record and go on).
        report_dir: where ``gradguard-report.json`` / ``.md`` go (``None``: the front door's default; the
            HF callback uses the Trainer's ``output_dir``, a plain ``Guard`` writes nothing).
        groups: overrides of group detection, ``{"glob over param paths": "group[:role]"}``.
        thresholds: :class:`~gradguard.engine.detectors.Thresholds` or a dict of its fields.
        strict: let gradguard's own exceptions propagate (tests); by default an internal error disables
            gradguard loudly and training goes on.
        console: print the summary at the end of the run.
        localize: on a non-finite fault, replay the step to name the exact module.
        trace: ``"full"``: check every module's output on every step (for faults a replay cannot reproduce).
        severity: a finding kind's (or code's) severity, changed: ``{"loss_divergence": "warning"}`` warns
            instead of stopping; ``{"GG002": "error"}`` makes a trainable group you did not list stop the run.

    >>> Options(on_fault="halt")
    Traceback (most recent call last):
    ...
    gradguard.errors.ConfigurationError: on_fault must be one of 'stop', 'raise', 'warn', got 'halt'
    """

    expect_trainable: str | Sequence[str] | None = None
    on_fault: OnFault = "stop"
    report_dir: str | os.PathLike[str] | None = None
    groups: Mapping[str, str] | None = None
    thresholds: Thresholds | Mapping[str, Any] | None = None
    strict: bool = False
    console: bool = True
    localize: bool = True
    trace: Literal["full"] | None = None
    severity: Mapping[str, Severity] | None = None

    def __post_init__(self) -> None:
        self.check_options()

    def check_options(self) -> None:
        """Raise :class:`~gradguard.errors.ConfigurationError` (a ``ValueError``) naming a bad value."""
        if self.on_fault not in ON_FAULT:
            raise ConfigurationError(f"on_fault must be one of {', '.join(map(repr, ON_FAULT))}, got {self.on_fault!r}")
        if self.trace not in (None, "full"):
            raise ConfigurationError(f"trace must be None or 'full', got {self.trace!r}")
        wanted = self.expect_trainable
        listed = isinstance(wanted, Sequence) and all(isinstance(w, str) and w for w in wanted)
        if wanted is not None and not isinstance(wanted, str) and not listed:
            raise ConfigurationError(
                "expect_trainable entries must be non-empty strings (group names, roles or globs, e.g. "
                f"['vision_tower', 'connector']); got {wanted!r}"
            )
        if self.groups is not None and not isinstance(self.groups, Mapping):
            raise ConfigurationError(
                "groups must be a dict {'glob over parameter paths': 'group name[:role]'}, e.g. "
                f"{{'vision_encoder.*': 'vision'}}; got {type(self.groups).__name__}"
            )
        Thresholds.from_dict(self.thresholds)
        for key, level in (self.severity or {}).items():
            try:
                rule(key)
            except KeyError:
                raise ConfigurationError(
                    f"severity: unknown finding {key!r}; use a kind or a code (gradguard explain lists them)"
                ) from None
            if level not in ("error", "warning", "info"):
                raise ConfigurationError(f"severity[{key!r}] must be 'error', 'warning' or 'info', got {level!r}")

    def rated(self, finding: Finding) -> Finding:
        """``finding`` with the severity the user asked for its kind, if they asked."""
        wanted = self.severity or {}
        level = wanted.get(finding.kind, wanted.get(finding.code))
        return dataclasses.replace(finding, severity=level) if level and level != finding.severity else finding

    @classmethod
    def of(cls, options: Options | None, knobs: Mapping[str, Any], **sizes: int) -> Options:
        """The options a :class:`~gradguard.engine.guard.Guard` was given: an :class:`Options`, or its fields as
        keywords (an unknown one is an error listing the known); ``sizes``: integer knobs that must be >= 1."""
        if options is not None and knobs:
            raise ConfigurationError(f"pass either options= or keyword options, not both (got {', '.join(knobs)})")
        unknown = sorted(set(knobs) - {f.name for f in fields(cls)})
        if unknown:
            known = ", ".join(f.name for f in fields(cls))
            raise ConfigurationError(f"unknown Guard option(s) {unknown}; the options are: {known}")
        for name, value in sizes.items():
            low = 4 if name == "history_size" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(f"{name} must be an integer >= {low}, got {value!r}")
        return options if options is not None else cls(**knobs)

    @property
    def expected(self) -> list[str]:
        """``expect_trainable`` as a list (a single name is one entry)."""
        wanted = self.expect_trainable
        return [wanted] if isinstance(wanted, str) else list(wanted or [])

    def as_options(self) -> Options:
        """A plain :class:`Options` with these values (for a front door that is one)."""
        return Options(**{f.name: getattr(self, f.name) for f in fields(Options)})
