"""gradguard: training-health diagnostics for PyTorch.

Catch a NaN loss, a dead gradient or a silently frozen module at the step it happens, say where (vision
tower, connector, language model, adapters; frozen or trainable; data, forward or backward), stop before
the bad update reaches the weights, and leave a report for people and programs.

    from gradguard import GradGuard, audit_requires_grad
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[GradGuard()])

``import gradguard`` is cheap (no torch, transformers or peft): public names load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it. Loaded on first access, so `import gradguard` costs
# nothing: it imports neither torch nor transformers (gradguard's pytest plugin is loaded by pytest in
# every session of every project that has gradguard installed).
_EXPORTS = {
    "GradGuard": "gradguard.integrations.transformers",
    "Guard": "gradguard.engine.guard",
    "audit_requires_grad": "gradguard.core.audit",
    "Audit": "gradguard.core.audit",
    "track_requires_grad": "gradguard.core.track",
    "build_groups": "gradguard.core.groups",
    "Group": "gradguard.core.groups",
    "GroupMap": "gradguard.core.groups",
    "TrainingHealthError": "gradguard.errors",
    "Report": "gradguard.report.model",
    "Fault": "gradguard.report.model",
    "Finding": "gradguard.report.model",
    "Origin": "gradguard.report.model",
    "RULES": "gradguard.codes",
    "rule": "gradguard.codes",
}

if TYPE_CHECKING:
    from gradguard.codes import RULES, rule
    from gradguard.core.audit import Audit, audit_requires_grad
    from gradguard.core.groups import Group, GroupMap, build_groups
    from gradguard.core.track import track_requires_grad
    from gradguard.engine.guard import Guard
    from gradguard.errors import TrainingHealthError
    from gradguard.integrations.transformers import GradGuard
    from gradguard.report.model import Fault, Finding, Origin, Report

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
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
