"""Renderers for people: rich console and Markdown (JSON lives on the model itself)."""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gradguard.report.format import fmt_count, fmt_float, fmt_value

if TYPE_CHECKING:  # types only: the model and the audit import this module when they are rendered
    from gradguard.core.audit import Audit
    from gradguard.core.track import RequiresGradChanges
    from gradguard.report.model import Finding, GroupSummary, Origin, Report

_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_STATE_STYLE = {"trainable": "green", "adapters": "green", "partial": "yellow", "frozen": "dim"}
_SPARK = "▁▂▃▄▅▆▇█"
# The width for output that is not a terminal (a log file, `tee`, CI) when COLUMNS does not say: rich's own
# fallback of 80 columns made tables cut module paths (`resamp…`), and training logs are almost always redirected.
NON_TTY_WIDTH = 120


def make_console(stderr: bool = False, file: IO[str] | None = None) -> Console:
    """The console every gradguard rendering goes through (the CLI, ``Guard.print``, the demo).

    A terminal gets its own width; otherwise ``COLUMNS`` when set (rich reads it), else :data:`NON_TTY_WIDTH`.
    Tables never cut a group name whatever the width (see :class:`_GroupTable`).

    >>> make_console(file=io.StringIO()).width >= 80
    True
    """
    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    isatty = getattr(stream, "isatty", None)
    tty = bool(isatty and isatty())
    width = None if tty or os.environ.get("COLUMNS", "").strip().isdigit() else NON_TTY_WIDTH
    return Console(file=file, stderr=stderr, highlight=False, width=width)


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def sparkline(values: Sequence[Any], width: int = 24) -> str:
    """Log-scale sparkline; non-finite values show as ``!``, missing ones as a space."""
    # None = no value that step (a frozen group has no gradient): a space, not a non-finite "!".
    vals = [None if v is None else _num(v) for v in values][-width:]
    finite = [math.log10(v) for v in vals if v is not None and math.isfinite(v) and v > 0]
    if not finite:
        return "".join(" " if v is None else "!" if not math.isfinite(v) else "·" for v in vals)
    lo, hi = min(finite), max(finite)
    out = []
    for v in vals:
        if v is None:
            out.append(" ")
        elif not math.isfinite(v):
            out.append("!")
        elif v <= 0:
            out.append("·")
        else:
            k = 0 if hi == lo else round((math.log10(v) - lo) / (hi - lo) * (len(_SPARK) - 1))
            out.append(_SPARK[k])
    return "".join(out)


def _group_label(g: GroupSummary, quote: str = "") -> str:
    """The group's full path, and the short name the user wrote for it where that differs."""
    name = f"{quote}{g.name}{quote}"
    return f"{name} ({quote}{g.alias}{quote})" if getattr(g, "alias", None) else name


# Column headers say what each count is (the schema's `groups` items say the same): `base params` are the module's
# own weights (a `modules_to_save` module counts its trained copy in place of the frozen original PEFT keeps
# beside it), `base trainable` the part of them that trains, `adapters` the added (LoRA-style) parameters.
_COUNT_HEADERS = ("base params", "base trainable", "adapters")
_COUNT_HEADERS_2LINE = ("base\nparams", "base\ntrainable", "adapters")  # narrow columns for an 80-column terminal


def _adapters_cell(g: GroupSummary) -> str:
    if not g.adapter_params:
        return "-"
    if g.adapter_trainable == g.adapter_params:
        return fmt_count(g.adapter_params)
    return f"{fmt_count(g.adapter_trainable)} of {fmt_count(g.adapter_params)}"


def _group_rows(groups: Sequence[GroupSummary], norms: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for g in groups:
        row: list[Any] = [
            _group_label(g),
            g.role,
            Text(g.state, style=_STATE_STYLE.get(g.state, "")),
            fmt_count(g.params),
            fmt_count(g.trainable),
            _adapters_cell(g),
        ]
        if norms:
            series = norms.get(g.name) or []
            present = [v for v in series if v is not None]
            if present:
                row += [sparkline(series), fmt_float(present[-1], ".3g")]
            else:
                row += ["", "frozen" if g.trainable + g.adapter_trainable == 0 else "no grad"]
        rows.append(row)
    return rows


class _GroupTable:
    """The module-group table, which never cuts a group name.

    Rich shrinks a table that is wider than the console and ends cut cells with `…`: in a three-group VLM the
    groups could no longer be told apart. Here the name and the short columns never shrink; when even that does
    not fit the width, each group is written as a name line and a details line instead of a table row.
    """

    def __init__(self, groups: Sequence[GroupSummary], history: dict[str, Any] | None = None) -> None:
        self.norms = (history or {}).get("grad_norm") or {}
        self.headers = ["group", "role", "state", *_COUNT_HEADERS_2LINE]
        if self.norms:
            self.headers += ["grad norm (pre-clip, log)", "last"]
        self.rows = _group_rows(groups, self.norms)

    def _widths(self, columns: Sequence[int]) -> list[int]:
        """The narrowest each column may be: its widest cell and header line (the sparkline may wrap)."""
        widths = []
        for i in columns:
            header = self.headers[i]
            if header.startswith("grad norm"):
                widths.append(max(len(w) for w in header.split()))
                continue
            cells = [len(str(row[i])) for row in self.rows]
            widths.append(max([*cells, *(len(line) for line in header.split("\n"))]))
        return widths

    def _layouts(self) -> list[list[int]]:
        """Column sets to try, widest first: all of them; without the sparkline (an 80-column terminal)."""
        every = list(range(len(self.headers)))
        spark = [i for i, h in enumerate(self.headers) if h.startswith("grad norm")]
        return [every, [i for i in every if i not in spark]] if spark else [every]

    def table(self, columns: Sequence[int] | None = None) -> Table:
        columns = list(range(len(self.headers))) if columns is None else columns
        table = Table(title="module groups", title_justify="left", expand=False)
        spark = any(self.headers[i].startswith("grad norm") for i in columns)
        for i, width in zip(columns, self._widths(columns)):
            header = self.headers[i]
            if header == "last" and not spark:
                header = "grad\nnorm"  # without the sparkline beside it, "last" would not say what
            sparkline_column = header.startswith("grad norm")
            table.add_column(
                header,
                justify="right" if header.split("\n")[0] in ("base", "adapters", "last", "grad") else "left",
                no_wrap=not sparkline_column,
                min_width=width,
            )
        for row in self.rows:
            table.add_row(*(row[i] for i in columns))
        return table

    def stacked(self) -> Text:
        out = Text("module groups\n")
        for row in self.rows:
            out.append(f"{row[0]}\n", style="bold")
            details = [f"{h.replace(chr(10), ' ')} {c}" for h, c in zip(self.headers[1:], row[1:]) if str(c)]
            out.append("    " + " · ".join(details) + "\n")
        out.rstrip()
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for columns in self._layouts():
            # One space of padding each side of a cell, and a border between and around the columns.
            needed = sum(w + 2 for w in self._widths(columns)) + len(columns) + 1
            if needed <= options.max_width:
                yield self.table(columns)
                return
        yield self.stacked()

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.table()).clamp(max_width=options.max_width)


def _group_table(groups: Sequence[GroupSummary], history: dict[str, Any] | None = None) -> _GroupTable:
    return _GroupTable(groups, history)


class _Findings:
    """The findings: a severity, a code with its group, and the message with its fix beside them.

    The code and group column never shrinks (a group name is never cut); when the message column would get
    narrower than :attr:`MIN_MESSAGE`, each finding is written as a heading line and the wrapped text below it.
    """

    MIN_MESSAGE = 30

    def __init__(self, findings: Sequence[Finding]) -> None:
        self.rows = []
        for f in findings:
            where = f" [{f.group}]" if f.group else ""
            step = f" step {f.step}" if f.step is not None else ""
            self.rows.append((f.severity, f"{f.code}{step}{where}", f.message, f"fix: {f.hint}"))

    def grid(self) -> Table:
        table = Table.grid(padding=(0, 1))
        table.add_column(no_wrap=True)
        table.add_column(no_wrap=True)  # the code and the group name: never cut, never broken
        table.add_column()
        for severity, code, message, fix in self.rows:
            table.add_row(Text(severity, style=_SEVERITY_STYLE[severity]), Text(code, style="bold"), Text(message))
            table.add_row("", "", Text(fix, style="dim"))
        return table

    def stacked(self) -> Text:
        out = Text()
        for severity, code, message, fix in self.rows:
            out.append(severity, style=_SEVERITY_STYLE[severity])
            out.append(f" {code}\n", style="bold")
            out.append(f"  {message}\n")
            out.append(f"  {fix}\n", style="dim")
        out.rstrip()
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        fixed = max((len(r[0]) for r in self.rows), default=0) + max((len(r[1]) for r in self.rows), default=0) + 2
        yield self.grid() if fixed + self.MIN_MESSAGE <= options.max_width else self.stacked()


def _finding_lines(findings: Sequence[Finding]) -> _Findings:
    return _Findings(findings)


def _ramp(frames: Sequence[dict[str, Any]]) -> str:
    """The last few module calls into the origin, oldest first, one entry per module path.

    A PEFT ``ModulesToSaveWrapper`` and the copy it calls share the user-facing path (``resampler``): the
    wrapper's call, which completes last, is the one kept.
    """
    last: dict[str, dict[str, Any]] = {}
    for fr in frames:
        key = str(fr.get("parameter") or fr.get("module"))
        last.pop(key, None)  # re-inserted: dict order is the order of each path's last call
        last[key] = fr
    out = []
    for fr in list(last.values())[-4:]:
        if "output_absmax" in fr:
            inp, outp = fmt_float(fr["input_absmax"], ".3g"), fmt_float(fr["output_absmax"], ".3g")
            out.append(f"{fr['module']} in {inp} -> out {outp}")
        else:
            size = fmt_float(fr.get("absmax", fr.get("norm")), ".3g")
            out.append(f"{fr.get('parameter') or fr['module']} grad {size}")
    return " | ".join(out)


def _localized(loc: dict[str, Any], origin: Origin | None) -> str | None:
    """The replay's exact module, or ``None`` where it only repeats the fault's ``origin`` line."""
    same_place = origin is not None and loc.get("module") in (origin.module, None) and loc.get("phase") == origin.phase
    if same_place and loc.get("parameter") is None:
        return None
    trainable = {True: "trainable", False: "frozen", None: "trainability unknown"}[loc.get("trainable")]
    how = f"{loc.get('phase') or '?'} phase"
    if loc.get("micro_batch") is not None:
        how += f", micro-batch {loc['micro_batch']}"
    if loc.get("parameter"):
        how += f", parameter {loc['parameter']}"
    if loc.get("source") == "trace":
        how += ", seen by the trace of the original step"
    return (
        f"{loc['module']} ({loc.get('class') or '?'}; group {loc.get('group') or '-'}, "
        f"role {loc.get('role') or '-'}, {trainable}), {how}"
    )


def _localization_lines(loc: dict[str, Any] | None, origin: Origin | None = None) -> list[tuple[str, str]]:
    """``(label, text)`` lines for a fault's localisation (fields: docs/localization.md)."""
    if not loc:
        return []
    out: list[tuple[str, str]] = []
    if loc.get("module"):
        localized = _localized(loc, origin)
        if localized:
            out.append(("localized", localized))
        ramp = _ramp(loc.get("frames") or [])
        if ramp:
            out.append(("ramp", ramp))
    if loc.get("verdict"):
        text = loc.get("advice") or loc.get("message") or ""
        prefix = f"{loc['verdict']}: "  # the advice may already start with the verdict: say it once
        out.append(("verdict", text if text.startswith(prefix) else prefix + text))
    return out


def _evidence_lines(evidence: Any) -> list[str]:
    """One sentence per fact of a fault's evidence (its ``text``; a version-1 report's ``{sentence: value}``
    object, numbers written by :func:`fmt_value`)."""
    if isinstance(evidence, dict):
        return [f"{k}: {fmt_value(v)}" for k, v in evidence.items()]
    return [str(e.get("text") or e.get("kind")) if isinstance(e, dict) else fmt_value(e) for e in evidence or []]


def _fault_panel(report: Report) -> Panel:
    f = report.fault
    assert f is not None
    o = f.origin
    lines = Text()
    static = o.phase == "static"
    when = "before step 1 (static check)" if static else f"step {f.step}"
    lines.append(f"{when}: {f.code} {f.kind}\n", style="bold red")
    lines.append(f"{f.message}\n")
    where = o.module or o.group or "(unknown module)"
    trainable = {True: "trainable", False: "frozen", None: "unknown"}[o.trainable]
    role = f", role {o.role}" if o.role else ""
    lines.append("origin: ", style="bold")
    lines.append(f"{o.phase} phase, {where} (group {o.group or '-'}{role}, {trainable})")
    if o.rank is not None:
        lines.append(f", rank {o.rank}")
    if o.micro_batch is not None:
        lines.append(f", micro-batch {o.micro_batch}")
    lines.append("\n")
    for label, text in _localization_lines(f.localization, o):
        lines.append(f"{label}: ", style="bold")
        lines.append(f"{text}\n")
    lines.append("weights: " + _weights(report) + "\n", style="green" if f.weights_intact else "bold red")
    for text in _evidence_lines(f.evidence):
        label, _, rest = text.partition(": ")
        lines.append(f"{label}: " if rest else "", style="bold")
        lines.append(f"{rest or label}\n")
    return Panel(lines, title="gradguard: fault", border_style="red")


def _weights(report: Report) -> str:
    f = report.fault
    assert f is not None
    if f.origin.phase == "static":
        if not report.environment.get("steps"):
            return "untouched (training stopped before its first step: nothing was trained)"
        return "trained on (on_fault='warn': the static error did not stop the run)"
    return "intact (the poisoned update was skipped)" if f.weights_intact else "MODIFIED"


def _exit_line(report: Report) -> str:
    e = report.exit or {}
    return f"gradguard: {report.status} after step {e.get('last_step', 0)}: {e.get('type')}: {e.get('message')}"


def console_renderable(report: Report) -> Group:
    parts: list[Any] = []
    if report.fault is not None:
        parts.append(_fault_panel(report))
    elif report.exit:
        parts.append(Text(_exit_line(report), style="bold red"))
    else:
        style = "green" if report.ok else "yellow"
        steps = report.history.get("steps") or []
        parts.append(Text(f"gradguard: {report.status}" + (f" after {steps[-1]} steps" if steps else ""), style=style))
    if report.groups:
        parts.append(_group_table(report.groups, report.history))
    if report.findings:
        parts.append(_finding_lines(report.findings))
    return Group(*parts)


def audit_renderable(audit: Audit) -> Group:
    verdict = Text("audit: ok", style="green") if audit.ok else Text("audit: NOT ok", style="bold red")
    parts: list[Any] = [verdict, _group_table(audit.groups)]
    if audit.findings:
        parts.append(_finding_lines(audit.findings))
    return Group(*parts)


def changes_renderable(changes: RequiresGradChanges) -> Text:
    return Text("\n".join(changes.lines()))


def render_text(obj: Any, width: int = 110) -> str:
    """Plain-text rendering of anything with ``__rich__`` (no colour codes)."""
    buf = io.StringIO()
    Console(file=buf, width=width, no_color=True, color_system=None).print(obj)
    return buf.getvalue().rstrip()


def to_text(report: Report) -> str:
    return render_text(console_renderable(report))


# -- Markdown -----------------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_groups(report: Report) -> list[str]:
    norms = report.history.get("grad_norm") or {}
    out = [
        "## Module groups",
        "",
        f"| group | role | state | {' | '.join(_COUNT_HEADERS)} | grad norm (last) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for g in report.groups:
        series = [v for v in norms.get(g.name) or [] if v is not None]
        last = fmt_float(series[-1], ".3g") if series else "-"
        out.append(
            f"| {_group_label(g, '`')} | {g.role} | {g.state} | {fmt_count(g.params)} | {fmt_count(g.trainable)} | "
            f"{_adapters_cell(g)} | {last} |"
        )
    out.append("")
    return out


def to_markdown(report: Report) -> str:
    out = [f"# gradguard report: {report.status}", ""]
    f = report.fault
    if f is not None:
        o = f.origin
        trainable = {True: "trainable", False: "frozen", None: "unknown"}[o.trainable]
        when = "before step 1 (static check)" if o.phase == "static" else f"at step {f.step}"
        out += [
            f"## Fault {when}: `{f.code}` {f.kind}",
            "",
            f.message,
            "",
            f"- **origin**: {o.phase} phase, `{o.module or o.group or '?'}` (group `{o.group}`, role "
            f"{o.role}, {trainable})" + (f", rank {o.rank}" if o.rank is not None else ""),
            f"- **weights**: {_weights(report)}",
        ]
        out += [f"- **{label}**: {_md_escape(text)}" for label, text in _localization_lines(f.localization, o)]
        out += [f"- {_md_escape(text)}" for text in _evidence_lines(f.evidence)]
        out.append("")
    elif report.exit:
        out += [_exit_line(report).removeprefix("gradguard: "), ""]
    if report.groups:
        out += _md_groups(report)
    if report.findings:
        out += ["## Findings", "", "| severity | code | group | message | fix |", "|---|---|---|---|---|"]
        for fd in report.findings:
            step = f" (step {fd.step})" if fd.step is not None else ""
            out.append(
                f"| {fd.severity} | `{fd.code}` {fd.kind} | "
                f"{fd.group or '-'} | {_md_escape(fd.message)}{step} | {_md_escape(fd.hint)} |"
            )
        out.append("")
    losses = report.history.get("loss") or []
    if losses:
        out += [f"Raw loss over the last steps: `{sparkline(losses, 40)}` (last {fmt_float(losses[-1])})", ""]
    env = report.environment
    if env:
        out += ["## Environment", "", ", ".join(f"{k}: {v}" for k, v in env.items()), ""]
    return "\n".join(out)
