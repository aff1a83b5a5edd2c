"""Renderings for logs (issue 15): output that is not a terminal never cuts a name; numbers read one way.

Training logs are almost always redirected (a file, ``tee``, a cluster job, CI). There rich falls back to 80
columns and its tables ended cut cells with ``…``: ``resamp…``, ``model.…``. gradguard's console respects
``COLUMNS``, else uses a generous width, and its group table never cuts a name at any width.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest

from gradguard.report.format import fmt_float, fmt_value
from gradguard.report.model import Fault, Finding, GroupSummary, Origin, Report
from gradguard.report.render import NON_TTY_WIDTH, make_console, render_text, to_markdown, to_text

LONG = ["model.vision_tower", "model.multi_modal_projector", "model.language_model", "lm_head"]


def _report(loss: float | str = math.nan) -> Report:
    """A fault report with the long group names of a transformers-5 LLaVA and a NaN loss (in memory)."""
    groups = [
        GroupSummary(LONG[0], "vision", 23900, 0, 23900, 0, 0, 10, "frozen", alias="vision_tower"),
        GroupSummary(LONG[1], "connector", 6300, 6300, 0, 0, 0, 4, "trainable"),
        GroupSummary(LONG[2], "language", 90400, 0, 90400, 3600, 3600, 30, "adapters"),
        GroupSummary(LONG[3], "head", 16400, 0, 16400, 0, 0, 1, "frozen"),
    ]
    norms = {LONG[0]: [None, None, None], LONG[1]: [1.5, 2.0, math.nan], LONG[2]: [0.3, 0.2, math.inf], LONG[3]: []}
    origin = Origin("forward", LONG[1], LONG[1], "connector", True, micro_batch=0)
    frames = [
        {"module": "model.vision_tower", "input_absmax": 5.2, "output_absmax": 3.3},
        {"module": LONG[1], "input_absmax": 3.3, "output_absmax": 3.4},  # a wrapper and its copy: one path
        {"module": LONG[1], "input_absmax": 3.3, "output_absmax": math.nan},
    ]
    localization = {"module": LONG[1], "phase": "forward", "class": "ModulesToSaveWrapper", "group": LONG[1],
                    "role": "connector", "trainable": True, "micro_batch": 0, "frames": frames,
                    "verdict": "deterministic", "advice": "deterministic: the same batch reproduces it"}  # fmt: skip
    evidence = [  # facts, as the detectors write them: the sentence says NaN / Inf, the value keeps the float
        {"kind": "raw_loss", "text": f"raw loss per micro-batch: {fmt_value([loss])}", "value": [loss]},
        {"kind": "grad_norm", "text": f"grad norm: {fmt_float(-math.inf)}", "value": -math.inf},
    ]
    fault = Fault(3, "nonfinite_loss", "GG101", "step 3: the raw loss is not finite", origin, True, evidence)
    fault.localization = localization
    finding = Finding.of("nonfinite_loss", fault.message, "look inside it", LONG[1], step=3)
    history = {"steps": [1, 2, 3], "loss": [5.5, 5.4, loss], "grad_norm": norms}
    return Report("fault", fault, [finding], groups, history)


@pytest.mark.parametrize("width", [200, 120, 100, 80, 60, 40])
def test_no_width_cuts_a_group_name(width: int) -> None:
    out = io.StringIO()
    console = make_console(file=out)
    console.width = width
    console.print(_report())
    text = out.getvalue()
    assert "…" not in text, text
    for name in LONG:  # each name whole, on one line
        assert any(name in line for line in text.splitlines()), (width, name, text)
    if width >= 120:
        assert "┃ group " in text and "(pre-clip, log)" in text  # the full table when it fits
    if width <= 80:  # these names are long: each group on its own lines instead of a table row
        assert "┃ group " not in text and "model.multi_modal_projector\n" in text


def test_an_80_column_terminal_keeps_the_table_without_the_sparkline() -> None:
    report = _report()
    short = {LONG[0]: "vpm", LONG[1]: "resampler", LONG[2]: "llm", LONG[3]: "llm.lm_head"}  # MiniCPM-V's names
    for g in report.groups:
        g.name, g.alias = short[g.name], None
    report.history["grad_norm"] = {short[k]: v for k, v in report.history["grad_norm"].items()}
    out = io.StringIO()
    console = make_console(file=out)
    console.width = 80
    console.print(report)
    text = out.getvalue()
    assert "┃ group " in text and "(pre-clip, log)" not in text and "grad" in text and "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_console_width_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert make_console(file=io.StringIO()).width == NON_TTY_WIDTH  # rich alone would say 80
    monkeypatch.setenv("COLUMNS", "97")
    assert make_console(file=io.StringIO()).width == 97  # COLUMNS is respected

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("COLUMNS")
    assert make_console(file=Terminal()).width != NON_TTY_WIDTH  # a terminal: rich asks it (here: its fallback)


def test_plain_text_and_markdown_stay_greppable() -> None:
    report = _report()
    for text in (to_text(report), to_markdown(report), render_text(report, width=60)):
        assert "…" not in text
        for name in LONG:
            assert re.search(rf"(^|[\s`|(\[]){re.escape(name)}($|[\s`|)\]])", text, re.M), (name, text)


def test_non_finite_numbers_read_one_way_in_memory_and_from_json() -> None:
    """The raw loss was `[nan]` in a plain loop (floats in memory) and `['NaN']` under the Trainer (read back
    from JSON); every human rendering now says `NaN`, `Inf`, `-Inf`, the same both ways."""
    in_memory = _report()
    from_json = Report.from_dict(json.loads(in_memory.to_json()))
    assert from_json.history["loss"][-1] == "NaN"  # the JSON keeps strict JSON's spelling
    for render in (to_text, to_markdown):
        a, b = render(in_memory), render(from_json)
        assert a == b
        assert "raw loss per micro-batch: [NaN]" in a.replace("**", "")
        assert "grad norm: -Inf" in a.replace("**", "")
        assert "'NaN'" not in a and "[nan]" not in a and " nan" not in a and "Infinity" not in a
    assert "(last NaN)" in to_markdown(in_memory)
    assert fmt_float(math.inf) == fmt_float("Infinity") == "Inf"
    assert fmt_value([1.0, math.nan, "-Infinity"]) == "[1, NaN, -Inf]"


def test_ramp_lists_each_module_once_and_localized_does_not_repeat_origin() -> None:
    text = to_text(_report())
    ramp = next(line for line in text.splitlines() if line.startswith("│ ramp:") or line.startswith("ramp:"))
    assert ramp.count(LONG[1]) == 1 and "-> out NaN" in ramp
    assert "localized:" not in text  # the replay found the module the origin already names
    other = _report()
    assert other.fault is not None and other.fault.localization is not None
    other.fault.localization["module"] = f"{LONG[1]}.linear_1"
    assert f"localized: {LONG[1]}.linear_1" in " ".join(to_text(other).split())


def test_guard_summary_in_a_log_file_cuts_no_name(tmp_path) -> None:
    """`Guard.print` (the summary a plain loop gets on stderr), with stderr redirected to a file."""
    script = textwrap.dedent(
        """
        import torch
        from gradguard import Guard
        from gradguard.testing.faults import inject_nan
        from gradguard.testing.models import make_batch, tiny_llava

        model = tiny_llava()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        guard = Guard(model, optimizer, report_dir="out")
        with inject_nan(model.model.multi_modal_projector, start=2):
            for step in range(3):
                model(**make_batch(model, seed=step)).loss.backward()
                if not guard.check():
                    break
                optimizer.step()
                optimizer.zero_grad()
        guard.close()
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.run(
            [sys.executable, "-c", script], stdout=log, stderr=log, cwd=tmp_path, env=env, timeout=300, text=True
        )
    text = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "gradguard: fault" in text and not re.search(r"\w…", text), text
    rows = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│ ") and line.count("│") > 3]
    assert set(LONG) <= set(rows), rows
