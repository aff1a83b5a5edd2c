"""The report: one model that every output (console, JSON, Markdown, plot) is rendered from.

The JSON form follows ``schema.json`` beside this file (``"schema": "gradguard.report/2"``). Fields are
only ever added within a schema version; ``Report.from_dict(report.to_dict()) == report``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from gradguard.codes import Severity, rule
from gradguard.report.format import fmt_value

SCHEMA = "gradguard.report/2"
# Version 1 wrote a fault's evidence as a free-form object of sentences; it is still read (as facts).
_READS = ("gradguard.report/1", SCHEMA)
Phase = Literal["static", "data", "forward", "backward", "optimizer"]
Status = Literal["healthy", "fault", "aborted", "interrupted"]


@dataclass
class Finding:
    """One thing gradguard noticed. ``code`` and ``kind`` come from :mod:`gradguard.codes`."""

    code: str
    kind: str
    severity: Severity
    group: str | None
    message: str
    hint: str
    step: int | None = None
    phase: Phase | None = None

    @classmethod
    def of(
        cls,
        kind: str,
        message: str,
        hint: str,
        group: str | None = None,
        *,
        severity: Severity | None = None,
        step: int | None = None,
        phase: Phase | None = None,
    ) -> Finding:
        """Build a finding of ``kind``, taking code and default severity from the rule table."""
        r = rule(kind)
        return cls(r.code, r.kind, severity or r.severity, group, message, hint, step, phase)


@dataclass
class Origin:
    """Where a fault began: the phase, and the module / group it was first seen in."""

    phase: Phase
    module: str | None = None
    group: str | None = None
    role: str | None = None
    trainable: bool | None = None
    rank: int | None = None
    micro_batch: int | None = None


@dataclass
class Fault:
    step: int
    kind: str
    code: str
    message: str
    origin: Origin
    weights_intact: bool
    # Facts behind the diagnosis: {"kind", "text", and where they apply "group", "module", "micro_batch", "rank",
    # "value"} (schema.json, $defs/fact).
    evidence: list[dict[str, Any]] = field(default_factory=list)
    localization: dict[str, Any] | None = None  # the replay's module and verdict; fields: docs/localization.md

    def fact(self, kind: str) -> dict[str, Any] | None:
        """The piece of evidence of ``kind`` (``"raw_loss"``, ``"first_nonfinite_output"`` …), if there is one."""
        return next((e for e in self.evidence if e.get("kind") == kind), None)


@dataclass
class GroupSummary:
    """A group's parameter counts (numels): ``params == trainable + frozen``, adapters counted apart.

    ``params`` are the module's own (base) weights, each counted once: a PEFT ``modules_to_save`` module counts
    its trained copy, not the frozen original PEFT keeps beside it. ``adapter_params`` are added weights (LoRA
    A/B and the like), ``adapter_trainable`` the trainable part of them.
    """

    name: str
    role: str
    params: int  # base parameters (a modules_to_save copy in place of its original; adapters excluded)
    trainable: int  # base parameters that train
    frozen: int  # base parameters that do not: params - trainable
    adapter_params: int
    adapter_trainable: int
    tensors: int  # parameter tensors counted above
    state: Literal["trainable", "frozen", "partial", "adapters"]
    dtypes: list[str] = field(default_factory=list)
    in_optimizer: int | None = None  # trainable numel (base + adapters) found in the optimizer, when one was given
    alias: str | None = None  # the short name the user wrote for it (expect_trainable), where it differs


@dataclass
class Report:
    status: Status = "healthy"
    fault: Fault | None = None
    findings: list[Finding] = field(default_factory=list)
    groups: list[GroupSummary] = field(default_factory=list)
    history: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA
    # How a run that did not finish ended: {"status", "type", "message", "last_step"} (see schema.json).
    exit: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """No fault and no error finding."""
        return self.fault is None and not any(f.severity == "error" for f in self.findings)

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    # -- (de)serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # schema first, for people reading the file
        return {"schema": d.pop("schema"), **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        if not isinstance(data, dict) or data.get("schema") not in _READS:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"not a gradguard report (schema {found!r}, expected {SCHEMA!r}); "
                "pass the gradguard-report.json written by GradGuard or Guard"
            )
        fault = data.get("fault")
        if fault is not None:
            evidence = fault.get("evidence") or []
            if isinstance(evidence, dict):  # version 1: {sentence: value}
                evidence = [{"kind": "note", "text": f"{k}: {fmt_value(v)}", "value": v} for k, v in evidence.items()]
            fault = Fault(**{**fault, "origin": Origin(**fault["origin"]), "evidence": evidence})
        return cls(
            status=data["status"],
            fault=fault,
            findings=[Finding(**f) for f in data.get("findings", [])],
            groups=[GroupSummary(**g) for g in data.get("groups", [])],
            history=data.get("history", {}),
            environment=data.get("environment", {}),
            exit=data.get("exit"),
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(_jsonable(self.to_dict()), indent=indent, allow_nan=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        p = Path(path)
        if p.is_dir():
            p = p / "gradguard-report.json"
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no report at {p}: GradGuard writes gradguard-report.json into report_dir "
                "(default: the Trainer's output_dir)"
            ) from None
        return cls.from_dict(data)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``gradguard-report.json`` and ``gradguard-report.md`` into ``folder`` atomically."""
        from gradguard.report.render import to_markdown

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "gradguard-report.json"
        atomic_write(path, self.to_json())
        atomic_write(out / "gradguard-report.md", to_markdown(self))
        return path

    def __rich__(self) -> Any:
        from gradguard.report.render import console_renderable

        return console_renderable(self)

    def __str__(self) -> str:
        from gradguard.report.render import to_text

        return to_text(self)


def _jsonable(obj: Any) -> Any:
    """Strict JSON: NaN and Inf (the values this library exists to report) become the strings
    ``"NaN"``, ``"Infinity"``, ``"-Infinity"``; ``float()`` reads them back."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj).replace("nan", "NaN").replace("inf", "Infinity")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # a 0-d tensor or numpy scalar
        return _jsonable(obj.item())
    return obj


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader never sees a half-written file (temp file + rename).

    The file gets the permissions any file the user creates gets (0666 minus the umask), not ``mkstemp``'s 0600.
    """
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
