"""A diagnosed fault: what went wrong (a finding), where it began (an origin), the evidence, and the replay's
localisation. The detectors make one, the ranks exchange them, the policy decides on one, the report keeps it.

A :class:`Diagnosis` is immutable: a step that learns more makes a new one (:meth:`Diagnosis.with_evidence`,
:func:`dataclasses.replace`), so what one part of the pipeline saw cannot be edited behind another's back.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from gradguard.engine.stats import GroupContext
from gradguard.report.model import Finding, Origin, Phase


def origin_for(
    phase: Phase,
    group: str | None,
    contexts: Mapping[str, GroupContext],
    *,
    module: str | None = None,
    micro_batch: int | None = None,
) -> Origin:
    """Where a fault began, in the user's terms: the group's role and whether it trains come from its context.

    >>> ctx = {"resampler": GroupContext("resampler", "connector", True, False)}
    >>> o = origin_for("forward", "resampler", ctx, micro_batch=0)
    >>> o.module, o.role, o.trainable
    ('resampler', 'connector', True)
    """
    ctx = contexts.get(group) if group else None
    return Origin(
        phase=phase,
        module=module or group,
        group=group,
        role=ctx.role if ctx else None,
        trainable=ctx.trainable if ctx else None,
        micro_batch=micro_batch,
    )


@dataclass(frozen=True)
class Diagnosis:
    """One fault, as diagnosed on one rank (or agreed by all of them).

    >>> d = Diagnosis(Finding.of("nonfinite_loss", "step 3: the raw loss is nan", "check the loss"), Origin("forward"))
    >>> Diagnosis.from_plain(d.with_evidence(ranks=2).to_plain()) == d.with_evidence(ranks=2)
    True
    """

    finding: Finding
    origin: Origin
    evidence: Mapping[str, Any] = field(default_factory=dict)
    localization: Mapping[str, Any] | None = None  # the replay's result; fields: docs/localization.md

    def __post_init__(self) -> None:
        object.__setattr__(self, "evidence", MappingProxyType(dict(self.evidence)))

    @property
    def kind(self) -> str:
        return self.finding.kind

    def with_evidence(self, **more: Any) -> Diagnosis:
        """The same diagnosis with more evidence after its own (keys that are already there are kept)."""
        added = {k: v for k, v in more.items() if k not in self.evidence}
        return dataclasses.replace(self, evidence={**self.evidence, **added})

    def to_plain(self) -> dict[str, Any]:
        """JSON-safe plain data: what crosses ranks on the fault path (it cannot fail to pickle)."""
        return plain(
            {
                "finding": dataclasses.asdict(self.finding),
                "origin": dataclasses.asdict(self.origin),
                "evidence": dict(self.evidence),
                "localization": dict(self.localization) if self.localization is not None else None,
            }
        )

    @classmethod
    def from_plain(cls, data: Mapping[str, Any]) -> Diagnosis:
        return cls(
            Finding(**data["finding"]),
            Origin(**data["origin"]),
            data.get("evidence") or {},
            data.get("localization"),
        )


def plain(value: Any) -> Any:
    """``value`` as JSON-safe plain data (dataclasses as dicts, anything unknown as its ``str``).

    >>> import torch
    >>> plain({"norms": (1.0, float("nan")), "device": torch.device("cpu")})
    {'norms': [1.0, nan], 'device': 'cpu'}
    """

    def default(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        if isinstance(obj, Mapping):
            return dict(obj)
        return str(obj)

    return json.loads(json.dumps(value, default=default))
