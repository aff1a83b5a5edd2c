"""Docs stay in sync with their single sources."""

from __future__ import annotations

import re
from pathlib import Path

from gradguard.codes import RULES, docs_index, rule

ROOT = Path(__file__).resolve().parents[1]


def test_every_code_has_a_generated_page_in_sync() -> None:
    folder = ROOT / "docs" / "codes"
    for code, r in RULES.items():
        page = folder / f"{code}.md"
        assert page.exists(), f"missing {page}: run `python -m gradguard.codes docs/codes`"
        assert page.read_text() == r.markdown(), f"{page} is stale: run `python -m gradguard.codes docs/codes`"
    assert (folder / "README.md").read_text() == docs_index()


def test_every_code_used_in_the_source_is_a_rule() -> None:
    used = set()
    for f in (ROOT / "src" / "gradguard").rglob("*.py"):
        used |= set(re.findall(r"\bGG\d{3}\b", f.read_text()))
    assert used <= set(RULES), used - set(RULES)


def test_every_kind_emitted_is_a_rule() -> None:
    kinds = set()
    for f in (ROOT / "src" / "gradguard").rglob("*.py"):
        kinds |= set(re.findall(r'Finding\.of\(\s*"([a-z_]+)"', f.read_text()))
    for kind in kinds:
        assert rule(kind).kind == kind


def test_readme_names_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "./scripts/demo.sh" in readme and "./scripts/test.sh" in readme
    assert "./scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_import_gradguard_is_lazy() -> None:
    # The pytest11 plugin loads gradguard in every pytest session of every project that has it installed:
    # `import gradguard` must import neither torch nor transformers nor peft.
    import subprocess
    import sys

    code = "import sys, gradguard, gradguard.testing.pytest_plugin; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
