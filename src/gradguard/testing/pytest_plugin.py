"""gradguard's pytest plugin (registered through the ``pytest11`` entry point; nothing to configure).

- the ``gradguard_smoke`` fixture: a training-health assertion in one line::

      def test_training_is_healthy(gradguard_smoke):
          gradguard_smoke(build_model(), [batch], expect_trainable=["vision", "connector"])

  It runs :func:`gradguard.testing.smoke_test` (the model's weights are restored afterwards) and fails the
  test with the rendered report unless the run is healthy; it returns the report.
- a failing test that raised :class:`gradguard.TrainingHealthError` (e.g. ``GradGuard(on_fault="raise")``
  inside a real ``Trainer``) gets the rendered report as a ``gradguard report`` section of its output.
- ``assert report_a == report_b`` between two reports explains which fault fields differ.

pytest loads this module in every session of an environment where gradguard is installed, so it adds
nothing to the import of the ``gradguard`` package itself (torch): the engine, the renderers and
transformers are imported only when a fixture or hook needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import pytest


@pytest.fixture
def gradguard_smoke(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """``gradguard_smoke(model, batches, **smoke_test_kwargs) -> Report``; fails the test unless healthy.

    The report is also written (JSON + Markdown) to a temporary folder named in the failure message.
    """
    from gradguard.testing.smoke import assert_healthy, smoke_test

    def run(model: Any, batches: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("report_dir", tmp_path_factory.mktemp("gradguard"))
        report = smoke_test(model, batches, **kwargs)
        __tracebackhide__ = True  # the failure points at the user's line, not at this helper
        try:
            return assert_healthy(report)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n(report files: {kwargs['report_dir']})") from None

    return run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    # Before the report is built: add the rendered gradguard report to a test that died of a fault.
    excinfo = call.excinfo
    if excinfo is not None and _is_health_error(excinfo.value):
        try:
            from gradguard.report.model import Report
            from gradguard.report.render import to_text

            text = to_text(Report.from_dict(excinfo.value.report))  # type: ignore[attr-defined]
        except Exception as exc:  # never let the plugin hide the user's failure
            text = f"(gradguard could not render the report: {type(exc).__name__}: {exc})"
        item.add_report_section(call.when, "gradguard report", text)
    yield


def pytest_assertrepr_compare(config: pytest.Config, op: str, left: Any, right: Any) -> list[str] | None:
    """``assert report == expected``: say which fault fields differ instead of two dataclass reprs."""
    if op != "==" or not (_is_report(left) and _is_report(right)):
        return None
    a, b = _summary(left), _summary(right)
    lines = ["gradguard reports differ:"]
    lines += [f"  {k}: {a.get(k)!r} != {b.get(k)!r}" for k in a if a.get(k) != b.get(k)]
    if len(lines) == 1:
        lines.append("  (same status and fault; they differ in findings, groups, history or environment)")
    return lines


def _is_health_error(exc: BaseException) -> bool:
    from gradguard.errors import TrainingHealthError

    return isinstance(exc, TrainingHealthError) and isinstance(exc.report, dict)


def _is_report(obj: Any) -> bool:
    from gradguard.report.model import Report

    return isinstance(obj, Report)


def _summary(report: Any) -> dict[str, Any]:
    fault = report.fault
    origin = fault.origin if fault is not None else None
    return {
        "status": report.status,
        "step": fault and fault.step,
        "kind": fault and fault.kind,
        "code": fault and fault.code,
        "phase": origin and origin.phase,
        "group": origin and origin.group,
        "role": origin and origin.role,
        "trainable": origin and origin.trainable,
        "weights_intact": fault and fault.weights_intact,
        "errors": [f.code for f in report.errors()],
    }
