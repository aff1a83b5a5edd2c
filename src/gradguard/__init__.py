"""gradguard: training-health diagnostics for PyTorch.

Catch a NaN loss, a dead gradient or a silently frozen module at the step it happens, say where (vision
tower, connector, language model, adapters; frozen or trainable; data, forward or backward), stop before
the bad update reaches the weights, and leave a report for people and programs.

    from gradguard import GradGuard, audit_requires_grad
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[GradGuard()])

``import gradguard`` does not import transformers or peft: the Trainer callback is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradguard.codes import RULES, rule
from gradguard.core.audit import Audit, audit_requires_grad
from gradguard.core.groups import Group, GroupMap, build_groups
from gradguard.core.track import track_requires_grad
from gradguard.errors import TrainingHealthError
from gradguard.report.model import Fault, Finding, Origin, Report

__version__ = "0.1.0"

if TYPE_CHECKING:
    from gradguard.engine.guard import Guard
    from gradguard.integrations.transformers import GradGuard

__all__ = [
    "RULES",
    "Audit",
    "Fault",
    "Finding",
    "GradGuard",
    "Group",
    "GroupMap",
    "Guard",
    "Origin",
    "Report",
    "TrainingHealthError",
    "__version__",
    "audit_requires_grad",
    "build_groups",
    "rule",
    "track_requires_grad",
]


def __getattr__(name: str) -> Any:
    # Lazy: the Trainer callback needs transformers; the engine needs nothing beyond torch, but loading
    # it on demand keeps `import gradguard` cheap.
    if name == "GradGuard":
        from gradguard.integrations.transformers import GradGuard

        return GradGuard
    if name == "Guard":
        from gradguard.engine.guard import Guard

        return Guard
    raise AttributeError(f"module 'gradguard' has no attribute {name!r}")
