"""Exceptions raised by gradguard."""

from __future__ import annotations

from typing import Any


class TrainingHealthError(RuntimeError):
    """Raised by ``on_fault="raise"`` after the poisoned update was skipped and the report written.

    ``.report`` is the report as a dict (the JSON schema in DESIGN.md); ``.fault`` is its fault.
    """

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report

    @property
    def fault(self) -> dict[str, Any] | None:
        return self.report.get("fault")
