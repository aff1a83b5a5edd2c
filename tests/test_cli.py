"""The ``gradguard`` command: audit, report (console, Markdown, plot), explain, usage errors.

Most tests call ``gradguard.cli.main([...])`` in-process (the same code the console script runs, without
paying transformers' import per call); one runs the real console entry point as a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradguard.cli import main
from gradguard.codes import RULES, rule
from gradguard.report.model import Report

SCHEMA = json.loads((Path(__file__).parents[1] / "src/gradguard/report/schema.json").read_text())
LLAVA_LM_ONLY = r".*language_model.*\.(q_proj|v_proj)"  # LoRA on the language model's attention only


def _vision_tower_path() -> str:
    """Where LLaVA keeps its vision tower: `model.vision_tower` since transformers 4.52, `vision_tower` before."""
    from gradguard.testing.models import tiny_llava

    return next(name for name, _ in tiny_llava().named_modules() if name.endswith("vision_tower"))


VISION = _vision_tower_path()


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not a terminal (CI, xdist): rich falls back to 80 columns and wraps the names we look for.
    monkeypatch.setenv("COLUMNS", "200")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gradguard.testing.models import tiny_llava

    path = tmp_path_factory.mktemp("llava")
    tiny_llava().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fault_report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real report: a plain-loop smoke test, a NaN in a decoder layer's forward output from step 3."""
    from gradguard.testing import inject_nan, smoke_test
    from gradguard.testing.models import make_batch, tiny_llama

    out = tmp_path_factory.mktemp("report")
    model = tiny_llama()
    with inject_nan(model.model.layers[1], start=3):
        report = smoke_test(model, [make_batch(model, seed=s) for s in range(6)], steps=6, report_dir=out)
    assert report.fault is not None and report.fault.step == 3
    return out


# -- audit ------------------------------------------------------------------------------------------------


def test_audit_saved_llava_names_the_frozen_vision_tower(capsys, llava_dir):
    code, out, err = run(capsys, "audit", llava_dir, "--lora-target", LLAVA_LM_ONLY, "--expect", "vision")
    assert code == 1, err
    assert "AutoModelForImageTextToText" in out  # loaded from the saved weights, right Auto class
    assert "module groups" in out
    assert "GG001" in out and f"[{VISION}]" in out and "expected trainable" in out
    row = next(line for line in out.splitlines() if line.startswith(f"│ {VISION} "))
    assert "frozen" in row
    assert "was trainable, now frozen" in out  # track_requires_grad on get_peft_model
    assert "Traceback" not in err


def test_audit_plain_q_v_targets_also_reach_the_vision_tower(capsys, llava_dir):
    # PEFT's list semantics: CLIP's attention has q_proj / v_proj too, so vision trains through adapters.
    code, out, _ = run(capsys, "audit", llava_dir, "--lora-target", "q_proj,v_proj", "--expect", "vision")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith(f"│ {VISION} "))
    assert "adapters" in row


def test_audit_json_follows_the_report_schema(capsys, llava_dir):
    import jsonschema

    code, out, _ = run(capsys, "audit", llava_dir, "--lora-target", LLAVA_LM_ONLY, "--expect", "vision", "--json")
    assert code == 1
    data = json.loads(out)  # stdout is nothing but the JSON
    shape = {
        "$defs": SCHEMA["$defs"],
        "type": "object",
        "required": ["ok", "groups", "findings"],
        "properties": {
            "ok": {"type": "boolean"},
            "groups": {"type": "array", "items": {"$ref": "#/$defs/group"}},
            "findings": {"type": "array", "items": {"$ref": "#/$defs/finding"}},
        },
    }
    jsonschema.validate(data, shape)
    assert data["ok"] is False
    assert data["groups"][0]["name"] == VISION
    gg001 = [f for f in data["findings"] if f["code"] == "GG001"]
    assert [f["group"] for f in gg001] == [VISION]


def test_audit_callable_reproduces_tune_vision(capsys):
    # MiniCPM-V with tune_vision=True: vpm and resampler unfrozen, then LoRA on the LLM with only the
    # resampler in modules_to_save: get_peft_model freezes vpm.
    argv = ["audit", "gradguard.testing.models:tiny_minicpmv2", "--unfreeze", "vpm,resampler"]
    argv += ["--lora-target", r"llm\..*\.(q_proj|v_proj)", "--expect", "vpm,resampler"]
    code, out, _ = run(capsys, *argv, "--modules-to-save", "resampler")
    assert code == 1
    assert "unfroze before LoRA: vpm" in out
    assert "vpm (vision): froze" in out and "was trainable, now frozen" in out
    assert "GG001 [vpm]" in out and "GG001 [resampler]" not in out
    assert "modules_to_save=['vpm']" in out  # the fix, in the warning and the hint

    code, out, _ = run(capsys, *argv, "--modules-to-save", "vpm,resampler")
    assert code == 0, out
    assert "audit: ok" in out


def test_audit_loads_gradguard_test_model_directories(capsys, tmp_path):
    from gradguard.testing.models import tiny_minicpmv2

    tiny_minicpmv2().save_pretrained(tmp_path)
    code, out, _ = run(capsys, "audit", tmp_path, "--expect", "vision")
    assert code == 0
    assert "MiniCPMV2" in out and "│ vpm" in out


# -- usage errors: exit 2, one line on stderr, never a traceback ------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["audit", "{tmp}/missing"], "neither a directory nor module:callable"),
        (["audit", "{tmp}"], "has no config.json"),
        (["audit", "{noweights}"], "no weights"),
        (["audit", "{llava}", "--expect", "visoin"], "Did you mean 'vision'"),
        (["audit", "{llava}", "--lora-target", "foo_proj"], "check --lora-target"),
        (["audit", "{llava}", "--unfreeze", "nope"], "--unfreeze 'nope'"),
        (["audit", "{llava}", "--lora-r", "x"], "invalid int value"),
        (["audit", "no_such_module_xyz:build"], "cannot import 'no_such_module_xyz'"),
        (["audit", "{llava}", "--bogus"], "unrecognized arguments"),
        (["explain", "GG999"], "known codes: GG001"),
        (["report", "{tmp}"], "no report at"),
        (["report", "{llava}/config.json"], "not a gradguard report"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_usage_exits_2_with_one_line(capsys, tmp_path, llava_dir, argv, needle):
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((llava_dir / "config.json").read_text())
    argv = [a.format(tmp=tmp_path, llava=llava_dir, noweights=noweights) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0]
    assert lines[0].startswith("gradguard")


def test_console_script_bad_usage_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gradguard.cli", "audit", str(tmp_path / "nothing-here")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "save_pretrained" in proc.stderr


def test_help_and_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"gradguard {__import__('gradguard').__version__}"
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("audit", "report", "explain", "demo"):
        assert command in out
    code, out, _ = run(capsys, "audit", "--help")
    assert code == 0 and "--lora-target" in out and "--unfreeze" in out


# -- explain ----------------------------------------------------------------------------------------------


def test_explain_prints_the_rule(capsys):
    code, out, _ = run(capsys, "explain", "GG101")
    assert code == 0
    for text in ("GG101", "nonfinite_loss", "What it means", "Why it matters", "Example", "Fix"):
        assert text in out
    code, plain, _ = run(capsys, "explain", "nonfinite_loss", "--plain")  # a kind works too
    assert code == 0 and plain == rule("GG101").markdown()


def test_explain_list(capsys):
    code, out, _ = run(capsys, "explain", "--list", "--plain")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == list(RULES)
    code, out, _ = run(capsys, "explain", "--list")
    assert code == 0 and all(c in out for c in RULES)


# -- report -----------------------------------------------------------------------------------------------


def test_report_console_and_markdown(capsys, fault_report_dir):
    code, out, err = run(capsys, "report", fault_report_dir)
    assert code == 1  # a fault: CI gates on it
    assert "gradguard: fault" in out and "GG101" in out and "model.layers" in out
    assert "not healthy (status fault)" in err and "--exit-zero" in err
    code, md, _ = run(capsys, "report", fault_report_dir / "gradguard-report.json", "--markdown", "--exit-zero")
    assert code == 0
    assert md.startswith("# gradguard report: fault") and "## Module groups" in md


def _saved(tmp_path: Path, name: str, report: Report) -> Path:
    report.save(tmp_path / name)
    return tmp_path / name


def test_report_exit_status_gates_ci(capsys, tmp_path):
    """0 for a healthy report; 1 for a fault, an error finding, an aborted or interrupted run; --exit-zero: 0."""
    from gradguard.report.model import Finding, GroupSummary

    groups = [GroupSummary("llm", "language", 8, 8, 0, 0, 0, 1, "trainable")]
    error = Finding.of("dead_gradient", "llm: no gradient for 3 steps", "check", "llm", severity="error", step=3)
    warning = Finding.of("partial_freeze", "llm: 1 of 8 tensors frozen", "check", "llm")
    exit_info = {"status": "aborted", "type": "RuntimeError", "message": "boom", "last_step": 2}
    cases = {
        "healthy": (Report(groups=groups, history={"steps": [1, 2]}), 0),
        "healthy-with-a-warning": (Report(findings=[warning], groups=groups), 0),
        "error-finding": (Report(findings=[error], groups=groups), 1),
        "aborted": (Report(status="aborted", groups=groups, exit=exit_info), 1),
        "interrupted": (Report(status="interrupted", exit={**exit_info, "status": "interrupted"}), 1),
    }
    for name, (report, expected) in cases.items():
        folder = _saved(tmp_path, name, report)
        # Every output gates the same way; a plot (matplotlib, ~1 s) is drawn for one healthy and one failing case.
        outputs = [[], ["--markdown"]]
        if name in ("healthy", "error-finding"):
            outputs.append(["--plot", str(tmp_path / f"{name}.png")])
        for argv in outputs:
            code, _, err = run(capsys, "report", folder, *argv)
            assert code == expected, (name, argv, err)
            assert run(capsys, "report", folder, *argv, "--exit-zero")[0] == 0, (name, argv)


def test_report_exit_status_from_the_shell(fault_report_dir, tmp_path):
    """As in the issue: `gradguard report DIR; echo $?` through the console script."""
    healthy = _saved(tmp_path, "healthy", Report(history={"steps": [1]}))
    gradguard = Path(sys.executable).parent / "gradguard"
    if not gradguard.exists():
        pytest.skip("the gradguard console script is not installed in this environment")
    for folder, status in ((fault_report_dir, "1"), (healthy, "0")):
        proc = subprocess.run(
            ["bash", "-c", f'"{gradguard}" report "{folder}" > /dev/null; echo $?'],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.stdout.strip() == status, proc.stderr


def test_report_plot_writes_a_png(capsys, fault_report_dir, tmp_path):
    png = tmp_path / "plot" / "gradguard.png"
    code, _, err = run(capsys, "report", fault_report_dir, "--plot", png, "--exit-zero")
    assert code == 0, err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # two panels with lines, markers, legend and labels


def test_plot_handles_non_finite_and_missing_values(tmp_path):
    from gradguard.report.model import Fault, GroupSummary, Origin
    from gradguard.report.plot import plot_report

    groups = [
        GroupSummary("vpm", "vision", 8, 0, 8, 0, 0, 1, "frozen"),
        GroupSummary("llm", "language", 8, 8, 0, 0, 0, 1, "trainable"),
    ]
    history = {
        "steps": [1, 2, 3, 4],
        "loss": [2.0, 1.5, "NaN", "Infinity"],
        "grad_norm": {"vpm": [None] * 4, "llm": [1.0, 0.0, "NaN", None]},
    }
    fault = Fault(3, "nonfinite_loss", "GG101", "m", Origin("forward", "llm", "llm", "language", True), True)
    report = Report.from_dict(json.loads(Report("fault", fault, [], groups, history).to_json()))
    assert plot_report(report, tmp_path / "a.png").stat().st_size > 10_000
    static = Report("fault", Fault(0, "frozen_expected_trainable", "GG001", "m", Origin("static"), True), [], groups)
    assert plot_report(static, tmp_path / "b.png").stat().st_size > 5_000  # no steps at all


def test_plot_without_matplotlib_says_how_to_install(capsys, monkeypatch, fault_report_dir, tmp_path):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` now raises ImportError
    code, _, err = run(capsys, "report", fault_report_dir, "--plot", tmp_path / "x.png")
    assert code == 2
    assert "pip install 'gradguard[plot]'" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
