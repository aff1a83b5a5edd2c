"""Test helpers for gradguard: tiny random-weight models and batches (see :mod:`gradguard.testing.models`)."""

# Lazy exports: the pytest plugin (gradguard.testing.pytest_plugin) is loaded by pytest in every session,
# and importing it imports this package, so nothing here may import transformers (models.py) eagerly.
from typing import Any

_EXPORTS = {
    "smoke_test": "gradguard.testing.smoke",
    "assert_healthy": "gradguard.testing.smoke",
    "inject_nan": "gradguard.testing.faults",
    "inject_inf": "gradguard.testing.faults",
    "zero_grad": "gradguard.testing.faults",
    "detach_output": "gradguard.testing.faults",
    "mask_labels": "gradguard.testing.faults",
    "corrupt_input": "gradguard.testing.faults",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gradguard.testing' has no attribute {name!r}")
