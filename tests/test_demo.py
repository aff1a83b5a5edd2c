"""``gradguard demo`` end to end, as a user runs it: a subprocess, offline, real HF Trainer, real PEFT.

The demo runs the way ``./scripts/demo.sh`` runs it (``.venv/bin/gradguard demo`` from the repository root, the
venv not activated, the output redirected to a file as in CI or ``tee``), and the commands it prints as next steps
are then run verbatim.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gradguard.cli import main
from gradguard.report.model import Report

ROOT = Path(__file__).parents[1]
SCHEMA = json.loads((ROOT / "src/gradguard/report/schema.json").read_text())
GRADGUARD = Path(sys.executable).parent / "gradguard"  # the console script of this environment
BOX = re.compile(r"[│╭╮╰╯─┃━┏┓┗┛┡┩┣┫╇╈╋┳┻└┘┌┐├┤┼]")


def _env(**extra: str) -> dict[str, str]:
    # A shell without the venv on the PATH (./scripts/demo.sh does not activate it), and no COLUMNS: a log file.
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != GRADGUARD.parent)
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, str, Path]:
    """``.venv/bin/gradguard demo > log.txt`` in a folder shaped like the repository root."""
    if not GRADGUARD.exists():
        pytest.skip("the gradguard console script is not installed in this environment")
    root = tmp_path_factory.mktemp("clone")
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "gradguard").symlink_to(GRADGUARD)
    log = root / "log.txt"
    # The timeout only guards against a hang (the demo takes ~15 s of CPU here); it is not a speed test.
    with open(log, "w") as fh:
        proc = subprocess.run(
            [".venv/bin/gradguard", "demo"],
            stdout=fh,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            env=_env(),
            cwd=root,
        )
    return proc.returncode, log.read_text(), proc.stderr, root


def _flat(text: str) -> str:
    """The text without rich's box drawing and with whitespace collapsed: what a person reads."""
    return " ".join(BOX.sub(" ", text).split())


def test_demo_tells_the_story(demo):
    code, out, err, root = demo
    assert code == 0, out[-3000:] + err[-3000:]
    text = _flat(out)
    assert "Traceback" not in err
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
    # The stable, named folder, said at the start and at the end.
    assert "The report goes to gradguard-demo/" in text
    assert "report: gradguard-demo/gradguard-report.json" in text
    assert (root / "gradguard-demo" / "gradguard-report.json").is_file()


def test_the_printed_next_steps_work_verbatim(demo):
    """Issue 15: every `next:` line, copied into the shell from the same directory, exits 0."""
    _, out, _, root = demo
    commands = [line.removeprefix("next:").strip() for line in out.splitlines() if line.startswith("next:")]
    assert len(commands) == 2, out[-2000:]
    assert all(c.startswith(".venv/bin/gradguard ") for c in commands), commands  # not on the PATH: its path
    for command in commands:
        proc = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=300, env=_env(), cwd=root
        )
        assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-2000:])
    assert (root / "gradguard.png").stat().st_size > 20_000


def test_redirected_output_cuts_no_name(demo):
    """Issue 15: `gradguard demo > log.txt` (not a terminal): no group name is cut with `…`; tables stay tables."""
    _, out, _, root = demo
    assert not re.search(r"\w…", out), [line for line in out.splitlines() if "…" in line]
    report = Report.load(root / "gradguard-demo")
    rows = [line for line in out.splitlines() if line.startswith("│ ")]
    for g in report.groups:  # each group has its table row, its name whole
        assert any(line.split("│")[1].strip() == g.name for line in rows), g.name
    # Non-finite numbers read one way: `NaN` in gradguard's renderings (the Trainer's own logs say `nan`).
    panel = out[out.index("gradguard: fault") :]
    assert "[NaN]" in panel and "['NaN']" not in panel and "[nan]" not in panel


def test_ramp_and_localized_say_each_thing_once(demo):
    _, out, _, _ = demo
    text = _flat(out)
    ramp = re.search(r"ramp: (.*?) verdict:", text)
    assert ramp, text[-3000:]
    modules = [entry.split(" in ")[0].strip() for entry in ramp.group(1).split(" | ")]
    assert len(modules) == len(set(modules)), modules  # PEFT's wrapper and its copy: one entry
    assert modules[-1] == "resampler" and ramp.group(1).endswith("-> out NaN")
    assert "localized: resampler (ModulesToSaveWrapper" not in text  # the origin line already says it


def test_readme_shows_what_the_demo_prints(demo):
    """The README's "gradguard turns that into" block is an excerpt of the demo's output, line for line."""
    _, out, _, _ = demo
    readme = (ROOT / "README.md").read_text()
    block = readme.split("gradguard turns that into", 1)[1].split("```", 2)[1]
    lines = [line for line in block.splitlines()[1:] if line.strip() and line.strip() != "..."]
    assert len(lines) >= 5
    text = _flat(out)
    missing = [line for line in lines if _flat(line) not in text]
    assert not missing, missing


def test_demo_report_is_valid_and_plots(demo, capsys):
    import jsonschema

    _, _, _, root = demo
    out = root / "gradguard-demo"
    data = json.loads((out / "gradguard-report.json").read_text())
    jsonschema.validate(data, SCHEMA)
    report = Report.from_dict(data)
    assert report.fault is not None
    assert (report.fault.step, report.fault.code, report.fault.origin.group) == (3, "GG101", "resampler")
    assert report.fault.weights_intact
    resampler = next(g for g in report.groups if g.name == "resampler")  # modules_to_save: trains in full
    assert (resampler.params, resampler.trainable, resampler.frozen, resampler.adapter_params) == (23680, 23680, 0, 0)
    png = out / "plot.png"
    assert main(["report", str(out), "--plot", str(png)]) == 1  # a fault report: exit 1 (a CI gate) ...
    assert main(["report", str(out), "--plot", str(png), "--exit-zero"]) == 0  # ... unless asked not to
    assert png.stat().st_size > 20_000


def test_command_prefix_is_what_this_shell_can_run(monkeypatch, tmp_path):
    from gradguard.demo import command_prefix

    script = tmp_path / "bin" / "gradguard"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(sys, "argv", ["bin/gradguard", "demo"])
    assert command_prefix() == "./bin/gradguard"  # not on the PATH: the path it was run by
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    monkeypatch.setattr(sys, "argv", [str(script), "demo"])
    assert command_prefix() == "gradguard"  # the PATH finds this very script
    monkeypatch.setattr(sys, "argv", ["-c"])
    assert command_prefix().endswith("-m gradguard.cli") and shutil.which(command_prefix().split()[0])
