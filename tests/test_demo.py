"""``gradguard demo`` end to end, as a user runs it: a subprocess, offline, real HF Trainer, real PEFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradguard.cli import main
from gradguard.report.model import Report

SCHEMA = json.loads((Path(__file__).parents[1] / "src/gradguard/report/schema.json").read_text())


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    # The timeout only guards against a hang (the demo takes ~10 s of CPU here); it is not a speed test.
    proc = subprocess.run(
        [sys.executable, "-m", "gradguard.cli", "demo", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    return proc, out


def test_demo_tells_the_story(demo):
    proc, out = demo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = " ".join(proc.stdout.split())  # rich wraps long lines: compare with whitespace collapsed
    assert "Traceback" not in proc.stderr
    # Run 1, what users see: a normal loss, then `loss 0.0, grad_norm nan`, and the weights ruined.
    assert "step 1 loss 5." in text
    assert "loss 0.0, grad_norm nan" in text
    assert "trainable weight tensors hold NaN" in text
    # The set-up: get_peft_model froze vpm, and gradguard said so.
    assert "vpm (vision): froze" in text and "was trainable, now frozen" in text
    # Run 2, what gradguard says.
    assert "the loss is NaN, not 0.0" in text
    assert "the first non-finite value appeared in the forward output of resampler (trainable)" in text
    assert "vpm was meant to train but get_peft_model froze it" in text
    assert "the poisoned update was skipped and the weights are intact" in text
    assert "bitwise identical to after step 2" in text
    assert "training stopped at step 3 of 6" in text
    assert str(out / "gradguard-report.json") in text


def test_demo_report_is_valid_and_plots(demo, capsys):
    import jsonschema

    _, out = demo
    data = json.loads((out / "gradguard-report.json").read_text())
    jsonschema.validate(data, SCHEMA)
    report = Report.from_dict(data)
    assert report.fault is not None
    assert (report.fault.step, report.fault.code, report.fault.origin.group) == (3, "GG101", "resampler")
    assert report.fault.weights_intact
    png = out / "plot.png"
    assert main(["report", str(out), "--plot", str(png)]) == 0
    assert png.stat().st_size > 20_000
