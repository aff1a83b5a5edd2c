"""Containment: a bug inside gradguard never kills the user's training.

Every hook, detector, writer and callback method of gradguard is made to raise in a real HF ``Trainer``
run. Training must complete every step with the same weights as a run without gradguard; gradguard
disables itself, says so once (a ``RuntimeWarning``, an error log and finding GG901 ``internal_error``
in the report); ``strict=True`` lets the exception through instead. Bad user input is not a bug: it
still raises a clear error at the start.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from test_reliability_bitwise import Config, Run, assert_identical, train, validate_report

from gradguard import GradGuard, Guard
from gradguard.engine import shutdown
from gradguard.errors import ConfigurationError

CFG = Config("llama", steps=3, lora=True, accum=2)
STEPS = CFG.steps


class InjectedBug(RuntimeError):
    """The exception every patched function raises."""


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise InjectedBug("injected gradguard bug")


# (dotted target, where it runs). Every function gradguard calls during training, by the path it is
# looked up at (``guard.audit_requires_grad`` is imported by name into the guard module).
TARGETS = {
    "gradguard.engine.probes.Probes.take_norms": "gradient norms (end of backward)",
    "gradguard.engine.probes._absmax": "forward hooks (input / group output abs-max)",
    "gradguard.engine.probes.find_loss": "top-model forward hook",
    "gradguard.engine.probes.primary_tensor": "group forward hooks",
    "gradguard.engine.probes.rng_state": "forward pre-hook",
    "gradguard.engine.probes.Probes.reduce_grads": "per-step reduction (check)",
    "gradguard.engine.probes.Probes.fired_per_group": "per-step reduction (check)",
    "gradguard.engine.probes.Probes.attach": "start: attaching hooks",
    "gradguard.engine.detectors.diagnose": "fault detector",
    "gradguard.engine.trends.Trends.update": "trend detectors",
    "gradguard.engine.history.History.add": "history",
    "gradguard.engine.read.stack_scalars": "per-step packing (check)",
    "gradguard.engine.guard.audit_requires_grad": "start: static audit",
    "gradguard.engine.guard.environment": "start: environment",
    "gradguard.engine.read.params_bad": "close: final weight check",
    "gradguard.engine.guard.Guard.report": "close: building the report",
    "gradguard.report.model.Report.save": "writing the report",
    "gradguard.report.render.to_markdown": "writing the Markdown report",
    "gradguard.report.render.console_renderable": "printing the summary",
    "gradguard.integrations.transformers.GradGuard.log_values": "callback: on_log",
    "gradguard.integrations.transformers.GradGuard._put_first_for_logging": "callback: on_train_begin",
    "gradguard.engine.guard.Guard.state_dict": "callback: checkpoint state",
}
# Failures before training or at its end cannot change the weights' path; those in hooks must not either.


def _patch(monkeypatch: pytest.MonkeyPatch, dotted: str) -> None:
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:-1]:
            owner = getattr(owner, attr)
        monkeypatch.setattr(owner, parts[-1], _raise)
        return
    raise AssertionError(f"cannot resolve {dotted}")


@pytest.fixture(scope="module")
def bare() -> Run:
    return train(CFG)


@pytest.fixture(autouse=True)
def close_left_open() -> Iterator[None]:
    """A strict guard's exception leaves ``trainer.train()`` before ``on_train_end``: close it, as the
    process exit would."""
    yield
    shutdown.close_all()


@pytest.mark.parametrize(
    "target", list(TARGETS), ids=[t.rsplit(".", 2)[-2] + "." + t.rsplit(".", 1)[-1] for t in TARGETS]
)
def test_internal_error_is_contained(
    target: str, bare: Run, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _patch(monkeypatch, target)
    callback = GradGuard(console=target.endswith("console_renderable"))
    extra = {"save_strategy": "steps", "save_steps": 2} if target.endswith("state_dict") else {}
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.ERROR, logger="gradguard"):
        warnings.simplefilter("always")
        run = train(CFG, [callback], **extra)

    # training went on to the end, with exactly the weights of a run without gradguard
    assert run.trainer.state.global_step == STEPS
    assert_identical(bare, run) if not extra else None
    if extra:  # checkpointing changes nothing in training either; compare weights only
        assert all(torch.equal(bare.weights[k], run.weights[k]) for k in bare.weights)

    # ... and gradguard said so, once: a warning, an error log, and GG901 in the report
    guard = callback.guard
    assert guard is not None and guard.disabled
    ours = [
        w for w in caught if issubclass(w.category, RuntimeWarning) and "gradguard disabled itself" in str(w.message)
    ]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "InjectedBug" in str(ours[0].message)
    assert sum("gradguard disabled itself" in r.getMessage() for r in caplog.records) == 1
    assert [f.code for f in guard.findings].count("GG901") == 1
    if run.report is not None:
        validate_report(run.report)
        assert "GG901" in [f["code"] for f in run.report["findings"]]
        assert run.report["environment"]["disabled"] is True
    else:  # the writer itself was broken: nothing can be on disk, but nothing was lost either
        assert target.endswith("Report.save"), f"no report written when {TARGETS[target]} failed"
    # hooks are gone after a contained error
    assert guard.probes is None or not guard.probes.attached


@pytest.mark.parametrize(
    "target",
    [
        "gradguard.engine.probes.Probes.take_norms",
        "gradguard.engine.probes.find_loss",
        "gradguard.engine.detectors.diagnose",
        "gradguard.engine.guard.audit_requires_grad",
        "gradguard.report.model.Report.save",
        "gradguard.integrations.transformers.GradGuard.log_values",
    ],
)
def test_strict_lets_it_propagate(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _patch(monkeypatch, target)
    with pytest.raises(InjectedBug):
        train(CFG, [GradGuard(console=False, strict=True)])


def test_plain_loop_guard_contains_and_strict_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine on its own, in a hand-written loop: the same guarantee."""
    _patch(monkeypatch, "gradguard.engine.trends.Trends.update")

    def loop(strict: bool) -> tuple[torch.nn.Module, Guard]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        guard = Guard(model, opt, console=False, strict=strict)
        x = torch.randn(16, 8)
        for _ in range(3):
            model(x).pow(2).mean().backward()
            assert guard.check()
            opt.step()
            opt.zero_grad()
        guard.close()
        return model, guard

    with pytest.warns(RuntimeWarning, match="gradguard disabled itself"):
        _, guard = loop(strict=False)
    assert guard.disabled and guard.report().findings[-1].code == "GG901"
    with pytest.raises(InjectedBug):
        loop(strict=True)


# -- bad input is not a bug: a clear error at the start -------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"expect_trainable": ["vision_towr"]}, "matches no module group"),
        ({"expect_trainable": [3]}, "non-empty strings"),
        ({"groups": {"model.*": "body:brain"}}, "unknown role"),
    ],
)
def test_bad_user_input_raises_clearly_at_start(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        train(CFG, [GradGuard(console=False, **kwargs)])
    # still the built-in types users catch
    assert isinstance(info.value, (ValueError, TypeError))


def test_bad_on_fault_raises_when_built() -> None:
    with pytest.raises(ValueError, match="on_fault"):
        GradGuard(on_fault="explode")  # type: ignore[arg-type]
