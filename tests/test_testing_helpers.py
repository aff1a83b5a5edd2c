"""``gradguard.testing`` for users' CI: ``smoke_test``, ``assert_healthy`` and the pytest plugin.

The plugin is exercised the way users meet it: a real ``pytest`` subprocess (the ``pytest11`` entry point
of the installed package) running ``examples/ci_smoke_test.py`` and a failing test file, whose output
must carry the rendered report.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from gradguard import Report
from gradguard.testing import assert_healthy, inject_nan, smoke_test
from gradguard.testing.models import make_batch, tiny_minicpmv2

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def seed_vlm() -> Any:
    return get_peft_model(
        tiny_minicpmv2(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["resampler"])
    )


class Tiny(nn.Module):
    """A plain module that returns a prediction, not a loss (the loss comes from ``loss_fn``)."""

    def __init__(self) -> None:
        super().__init__()
        self.vision_tower = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)  # a buffer that training changes: it must be restored too
        self.lm_head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.vision_tower(x)).tanh())


def mse(output: torch.Tensor, batch: Any) -> torch.Tensor:
    return nn.functional.mse_loss(output, batch[1])


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_smoke_test_trains_for_real_and_restores_everything(tmp_path) -> None:
    model = seed_vlm()
    batches = [make_batch(model, seed=i) for i in range(2)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**batches[0]).loss.backward()  # the user's optimizer already has state
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    before, opt_before = state(model), optimizer.state_dict()
    opt_before = {k: {n: v.clone() for n, v in st.items()} for k, st in opt_before["state"].items()}
    rng = torch.get_rng_state()

    report = smoke_test(
        model, batches, steps=5, optimizer=optimizer, expect_trainable=["resampler"], report_dir=tmp_path
    )
    assert assert_healthy(report) is report
    assert report.environment["steps"] == 5 and report.status == "healthy"
    assert [r["step"] for r in report.history["recent"]] == [1, 2, 3, 4, 5]
    assert len(set(report.history["loss"])) == 5  # real steps: the loss moved every step
    assert Report.load(tmp_path).to_json() == report.to_json()
    # Everything is as it was: weights, optimizer state, RNG, eval mode, no gradients, no hooks.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(opt_before[k][n], after[k][n]) for k in opt_before for n in opt_before[k])
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_smoke_test_catches_a_fault_and_assert_healthy_prints_the_report(tmp_path) -> None:
    model = seed_vlm()
    with inject_nan(model.get_base_model().resampler, start=2):
        report = smoke_test(model, [make_batch(model)], steps=4, report_dir=tmp_path)
    fault = report.fault
    assert fault is not None and fault.step == 2 and fault.origin.group == "resampler" and fault.weights_intact
    assert report.environment["steps"] == 2  # stopped at the fault
    for given in (report, report.to_dict(), tmp_path, tmp_path / "gradguard-report.json"):
        with pytest.raises(AssertionError) as info:
            assert_healthy(given)
        message = str(info.value)
        assert message.startswith("gradguard: the training run is not healthy")
        assert "GG101" in message and "resampler" in message and "module groups" in message
        assert "\x1b[" not in message  # plain text: CI logs show no colour codes
    with pytest.raises(TypeError, match="gradguard Report"):
        assert_healthy(42)  # type: ignore[arg-type]


def test_smoke_test_inputs_loss_fn_and_static_intent() -> None:
    torch.manual_seed(0)
    model = Tiny()
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(2)]
    before = state(model)
    # Tuples are called as model(*batch); the loss comes from loss_fn; a one-shot generator is cycled.
    calls = itertools.count()

    def loss_fn(output: torch.Tensor, batch: Any) -> torch.Tensor:
        next(calls)
        return mse(output, (None, torch.zeros_like(output)))

    report = smoke_test(model, ((x,) for x, _ in data), steps=5, loss_fn=loss_fn)
    assert report.status == "healthy" and next(calls) == 5, report
    assert report.history["loss"][0] > 0  # the loss was recorded although the model does not return it
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm stats too

    # The intent is checked before step 1: a frozen vision tower that must train is a fault at step 0.
    model.vision_tower.requires_grad_(False)
    report = smoke_test(model, [(x,) for x, _ in data], loss_fn=loss_fn, expect_trainable=["vision"])
    assert report.fault is not None and report.fault.step == 0 and report.fault.origin.phase == "static"

    with pytest.raises(ValueError, match="has no loss"):
        smoke_test(model, [(data[0][0],)])
    with pytest.raises(ValueError, match="batches is empty"):
        smoke_test(model, [], loss_fn=loss_fn)
    with pytest.raises(TypeError, match=r"wrap a single batch as \[batch\]"):
        smoke_test(model, {"x": data[0][0]}, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="steps must be"):
        smoke_test(model, [data[0]], steps=0, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="nothing in the model requires grad"):
        smoke_test(model.requires_grad_(False), [data[0]], loss_fn=loss_fn)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_smoke_test_is_strict_about_gradguards_own_errors(monkeypatch) -> None:
    # In training an internal error disables gradguard and training goes on; in CI it must fail loudly.
    import gradguard.engine.detectors as detectors

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug in a detector")

    monkeypatch.setattr(detectors, "diagnose", broken)
    model = Tiny()
    before = state(model)
    with pytest.raises(RuntimeError, match="a bug in a detector"):
        smoke_test(model, [(torch.randn(4, 4),)], loss_fn=lambda out, b: out.square().mean())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored on the way out
    for m in model.modules():
        assert not m._forward_hooks


def test_assertrepr_compare_explains_two_reports() -> None:
    from gradguard.testing.pytest_plugin import pytest_assertrepr_compare

    model = Tiny()
    healthy = smoke_test(model, [(torch.randn(4, 4),)], steps=1, loss_fn=lambda out, b: out.square().mean())
    with inject_nan(model.lm_head, start=1):
        faulty = smoke_test(model, [(torch.randn(4, 4),)], steps=1, loss_fn=lambda out, b: out.square().mean())
    lines = pytest_assertrepr_compare(None, "==", healthy, faulty)  # type: ignore[arg-type]
    assert lines is not None and lines[0] == "gradguard reports differ:"
    assert "  status: 'healthy' != 'fault'" in lines and any(
        line.startswith("  group: None != 'lm_head'") for line in lines
    )
    assert pytest_assertrepr_compare(None, "==", healthy, "healthy") is None  # type: ignore[arg-type]


def test_pytest_plugin_in_a_real_pytest_run(tmp_path) -> None:
    """The copied example passes; a failing smoke test and a TrainingHealthError show the report."""
    failing = tmp_path / "test_failing.py"
    failing.write_text(
        textwrap.dedent(
            """
            import torch
            from gradguard import Guard
            from gradguard.testing import inject_nan

            def net():
                return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))

            def test_smoke_fails_with_the_report(gradguard_smoke):
                model = net()
                with inject_nan(model[0], start=2):
                    gradguard_smoke(model, [torch.randn(3, 4)], steps=3, loss_fn=lambda out, b: out.mean())

            def test_training_health_error_shows_the_report():
                model = net()
                guard = Guard(model, on_fault="raise", console=False)
                (model(torch.randn(3, 4)) * float("nan")).sum().backward()
                guard.check()
            """
        )
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "pytest", str(EXAMPLES / "ci_smoke_test.py"), str(failing)]
    proc = subprocess.run(
        [*cmd, "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "-W", "ignore"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "2 failed, 2 passed" in out, out
    # The smoke assertion: the rendered report is the failure message, and where the files went.
    assert "AssertionError: gradguard: the training run is not healthy" in out
    assert "origin: forward phase, 0 (group 0" in out and "report files:" in out
    # The TrainingHealthError: the plugin adds the rendered report as a section of the failure.
    assert "Captured gradguard report call" in out
    assert "\x1b[" not in out
