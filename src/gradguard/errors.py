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


class ConfigurationError(ValueError, TypeError):
    """Bad input to gradguard (an unknown group in ``expect_trainable``, an unknown role, not an optimizer).

    Raised at the start, before a step runs, and never contained: everything else that goes wrong inside
    gradguard is a bug of gradguard, which disables itself and lets training go on. It is both a
    ``ValueError`` and a ``TypeError`` so that code catching either keeps working.

    >>> from gradguard import audit_requires_grad
    >>> import torch
    >>> try:
    ...     audit_requires_grad(torch.nn.Linear(2, 2), expect_trainable=["vision_towr"])
    ... except ValueError as exc:
    ...     print(type(exc).__name__)
    ConfigurationError
    """
