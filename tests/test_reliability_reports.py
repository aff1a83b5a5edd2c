"""Reports that survive: atomic writes, a report after SIGTERM / Ctrl-C / exit, and a JSON that always
validates against the published schema (``src/gradguard/report/schema.json``)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from test_reliability_bitwise import SCHEMA_PATH, Config, train, validate_report

from gradguard import GradGuard, Guard
from gradguard.report import model as report_model
from gradguard.report.model import Fault, Finding, GroupSummary, Origin, Report
from gradguard.testing.faults import inject_nan

TESTS = Path(__file__).resolve().parent
SCHEMA = json.loads(SCHEMA_PATH.read_text())


# -- the schema -------------------------------------------------------------------------------------------------
def test_schema_is_a_valid_draft_2020_12_schema_and_ships_with_the_package() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    shipped = resources.files("gradguard.report").joinpath("schema.json")
    assert json.loads(shipped.read_text()) == SCHEMA
    assert SCHEMA["properties"]["schema"]["const"] == report_model.SCHEMA


@pytest.mark.parametrize(
    ("cls", "pointer"),
    [(Report, None), (Fault, "fault"), (Origin, "origin"), (Finding, "finding"), (GroupSummary, "group")],
)
def test_schema_follows_the_report_model(cls: type, pointer: str | None) -> None:
    """A field added to the model must be documented in the schema (and the schema invents nothing)."""
    node = SCHEMA if pointer is None else SCHEMA["$defs"][pointer]
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(node["properties"]) == fields
    assert set(node["required"]) <= fields


def test_every_rule_fits_the_schema() -> None:
    from gradguard.codes import RULES

    rules = RULES.values() if isinstance(RULES, dict) else RULES
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for r in rules:
        finding = Finding.of(r.kind, "a message", "a hint", step=1)
        errors = list(validator.iter_errors(json.loads(Report(findings=[finding]).to_json())))
        assert not errors, (r.code, errors[0].message)


def test_nonfinite_values_are_strict_json_strings() -> None:
    nan, inf = float("nan"), float("inf")
    report = Report(
        status="fault",
        fault=Fault(
            step=3,
            kind="nonfinite_loss",
            code="GG101",
            message="step 3: the raw loss is nan",
            origin=Origin(phase="forward", module="resampler", group="resampler", role="connector", trainable=True),
            weights_intact=True,
            evidence=[
                {"kind": "raw_loss", "text": "raw loss per micro-batch: [NaN, 1.5]", "value": [nan, 1.5]},
                {"kind": "norm", "text": "norm: -Inf", "value": -inf},
            ],
            localization={"module": "resampler.attn", "anything": {"nested": [inf]}},
        ),
        history={"stride": 1, "steps": [1, 2, 3], "loss": [1.0, inf, nan], "grad_norm": {"llm": [1.0, None, nan]}},
    )
    text = report.to_json()
    data = json.loads(text)  # strict: json.loads would accept NaN, so check the text itself too
    assert "NaN" in text and "Infinity" in text and ": NaN" not in text
    assert data["history"]["loss"] == [1.0, "Infinity", "NaN"]
    assert data["fault"]["evidence"][1]["value"] == "-Infinity"
    validate_report(data)
    assert math.isnan(float(data["history"]["loss"][2]))
    # the schema rejects what is not a report
    with pytest.raises(jsonschema.ValidationError):
        validate_report({**data, "status": "fault", "fault": None})
    with pytest.raises(jsonschema.ValidationError):
        validate_report({**data, "history": {**data["history"], "loss": ["nan"]}})


def test_fault_report_from_a_real_run_validates(tmp_path: Path) -> None:
    cfg = Config("minicpmv2", steps=4)
    from test_reliability_bitwise import build_model

    model = build_model(cfg)
    with inject_nan(model.resampler, start=2):
        run = train(cfg, [GradGuard(console=False, report_dir=str(tmp_path))], model=model)
    data = json.loads((tmp_path / "gradguard-report.json").read_text())
    validate_report(data)
    assert data["status"] == "fault" and data["fault"]["code"] == "GG101" and data["fault"]["step"] == 2
    assert run.trainer.state.global_step == 2
    assert Report.load(tmp_path).fault is not None  # and it reads back


# -- atomic writes -----------------------------------------------------------------------------------------------
def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("crash_in", ["fsync", "replace"])
def test_a_crash_while_writing_leaves_the_old_report_intact(
    crash_in: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = Report(findings=[Finding.of("partial_freeze", "the old report", "")])
    old.save(tmp_path)
    before = (tmp_path / "gradguard-report.json").read_text()

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full (injected)")

    monkeypatch.setattr(report_model.os, crash_in, crash)
    with pytest.raises(OSError, match="injected"):
        Report(status="healthy", history={"loss": [1.0] * 10_000}).save(tmp_path)
    assert (tmp_path / "gradguard-report.json").read_text() == before
    assert not _leftovers(tmp_path)


_WRITER = """
import sys, pathlib
from gradguard.report.model import Report, Finding
folder, ready = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
i = 0
while True:  # big reports, so that most of the time is spent inside a write
    i += 1
    Report(findings=[Finding.of("partial_freeze", f"write {i}", "")], history={"loss": [i * 1.0] * 100_000}).save(folder)
    if i == 5:
        ready.write_text("ok")
"""


@pytest.mark.slow
def test_report_survives_sigkill_during_writes(tmp_path: Path) -> None:
    """A process killed (SIGKILL: no handler, no cleanup) in the middle of writing leaves a whole report."""
    folder, ready = tmp_path / "out", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(folder), str(ready)])
    try:
        _wait_for(ready, proc)
        time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait(30)
    report = Report.load(folder)  # parses: never a half-written file
    validate_report(json.loads((folder / "gradguard-report.json").read_text()))
    assert report.findings[0].message.startswith("write ")
    # a SIGKILL can leave at most the one temporary file it interrupted (never read by anyone)
    assert len(_leftovers(folder)) <= 1


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the child exited early with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError("the child never got ready")
        time.sleep(0.05)


# -- a report however the run ends ---------------------------------------------------------------------------------
_TRAINER_SCRIPT = """
import pathlib, sys
sys.path.insert(0, {tests!r})
from transformers import TrainerCallback
from test_reliability_bitwise import Config, train
from gradguard import GradGuard

class Ready(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            pathlib.Path({ready!r}).write_text("ok")

train(Config("llama", steps=4), [GradGuard(console=False, report_dir={out!r}), Ready()], max_steps=100_000)
"""


@pytest.mark.slow
def test_sigterm_mid_training_still_writes_the_report(tmp_path: Path) -> None:
    """A scheduler's SIGTERM in the middle of a real Trainer run: the process still ends by SIGTERM (as it
    would without gradguard), and a valid report of the steps run so far is on disk."""
    out, ready = tmp_path / "out", tmp_path / "ready"
    script = _TRAINER_SCRIPT.format(tests=str(TESTS), ready=str(ready), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(ready, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, err.decode()[-2000:]
    data = json.loads((out / "gradguard-report.json").read_text())
    validate_report(data)
    assert data["status"] == "interrupted" and data["environment"]["steps"] >= 3
    assert data["exit"]["type"] == "SIGTERM" and data["exit"]["last_step"] >= 3
    assert len(data["history"]["steps"]) >= 3


_LOOP_SCRIPT = """
import torch
from gradguard import Guard
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
guard = Guard(model, opt, console=False, report_dir={out!r})   # never closed by this script
for step in range(10):
    model(torch.randn(8, 4)).pow(2).mean().backward()
    guard.check()
    opt.step()
    opt.zero_grad()
    if step == 4:
        {ending}
"""


@pytest.mark.slow
def test_interrupted_unclosed_plain_loop_writes_the_report_at_exit(tmp_path: Path) -> None:
    """An uncaught ``KeyboardInterrupt`` raised by code (no signal) in a script that never calls
    ``guard.close()``: the exit handler closes the guard. (A script that just forgets ``close()`` takes
    the same path; Ctrl-C's signal path is tested in-process in test_reliability_hygiene.)"""
    script = _LOOP_SCRIPT.format(out=str(tmp_path), ending="raise KeyboardInterrupt")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=240)
    assert proc.returncode in (1, 130, -signal.SIGINT), proc.stderr.decode()[-2000:]
    assert b"KeyboardInterrupt" in proc.stderr  # the user's traceback is untouched
    data = json.loads((tmp_path / "gradguard-report.json").read_text())
    validate_report(data)
    assert data["status"] == "interrupted" and data["environment"]["steps"] == 5
    assert data["exit"] == {"status": "interrupted", "type": "KeyboardInterrupt", "message": "", "last_step": 5}


def test_guard_reports_in_process_are_schema_valid(tmp_path: Path) -> None:
    """The plain-loop Guard's report (healthy and fault) validates too."""
    for nan_at in (None, 2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        folder = tmp_path / str(nan_at)
        with Guard(model, opt, console=False, report_dir=folder) as guard:
            for step in range(1, 5):
                x = torch.randn(8, 4)
                if step == nan_at:
                    x[0, 0] = math.nan
                model(x).pow(2).mean().backward()
                if not guard.check():
                    break
                opt.step()
                opt.zero_grad()
        data = json.loads((folder / "gradguard-report.json").read_text())
        validate_report(data)
        assert data["status"] == ("healthy" if nan_at is None else "fault")


def test_signal_handlers_are_restored_after_close() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    model = torch.nn.Linear(2, 2)
    guard = Guard(model, console=False)
    if os.name == "posix":
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    guard.close()
    assert {sig: signal.getsignal(sig) for sig in before} == before
