"""The examples in public docstrings run (every public function has one)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import gradguard

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(gradguard.__path__, "gradguard.")
    if not m.name.endswith(("pytest_plugin", "__main__"))
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
