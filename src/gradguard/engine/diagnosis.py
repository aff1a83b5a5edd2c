"""A diagnosed fault: what went wrong (a finding), where it began (an origin), the evidence, and the replay's
localisation. The detectors make one, the ranks exchange them, the policy decides on one, the report keeps it.

A :class:`Diagnosis` is immutable: a step that learns more makes a new one (:meth:`Diagnosis.with_evidence`,
:func:`dataclasses.replace`), so what one part of the pipeline saw cannot be edited behind another's back.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
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


def fact(kind: str, text: str, **fields: Any) -> dict[str, Any]:
    """One piece of evidence: what kind of fact it is, its fields for programs (``group``, ``module``,
    ``micro_batch``, ``rank``, ``value``; the ones that apply), and the sentence for people (``text``).

    >>> fact("first_nonfinite_output", "first non-finite forward output: resampler", group="resampler", rank=None)
    {'kind': 'first_nonfinite_output', 'group': 'resampler', 'text': 'first non-finite forward output: resampler'}
    """
    return {"kind": kind, **{k: v for k, v in fields.items() if v is not None}, "text": text}


@dataclass(frozen=True)
class Diagnosis:
    """One fault, as diagnosed on one rank (or agreed by all of them).

    >>> d = Diagnosis(Finding.of("nonfinite_loss", "step 3: the raw loss is nan", "check the loss"), Origin("forward"))
    >>> d = d.with_evidence(fact("raw_loss", "raw loss per micro-batch: [nan]", value=[float("nan")]))
    >>> Diagnosis.from_plain(d.to_plain()).evidence[0]["kind"]
    'raw_loss'
    """

    finding: Finding
    origin: Origin
    evidence: tuple[Mapping[str, Any], ...] = ()  # facts (see fact()), in the order they were found
    localization: Mapping[str, Any] | None = None  # the replay's result; fields: docs/localization.md

    def __post_init__(self) -> None:
        object.__setattr__(self, "evidence", tuple(MappingProxyType(dict(e)) for e in self.evidence))

    @property
    def kind(self) -> str:
        return self.finding.kind

    def with_evidence(self, *facts: Mapping[str, Any]) -> Diagnosis:
        """The same diagnosis with more facts after its own (a kind of fact it already has is not added again)."""
        have = {e["kind"] for e in self.evidence}
        return dataclasses.replace(self, evidence=(*self.evidence, *(f for f in facts if f["kind"] not in have)))

    def to_plain(self) -> dict[str, Any]:
        """JSON-safe plain data: what crosses ranks on the fault path (it cannot fail to pickle)."""
        return plain(
            {
                "finding": dataclasses.asdict(self.finding),
                "origin": dataclasses.asdict(self.origin),
                "evidence": [dict(e) for e in self.evidence],
                "localization": dict(self.localization) if self.localization is not None else None,
            }
        )

    @classmethod
    def from_plain(cls, data: Mapping[str, Any]) -> Diagnosis:
        return cls(
            Finding(**data["finding"]),
            Origin(**data["origin"]),
            tuple(data.get("evidence") or ()),
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
