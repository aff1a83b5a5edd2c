"""Renderers for people: rich console and Markdown (JSON lives on the model itself)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gradguard.report.format import fmt_count

if TYPE_CHECKING:  # types only: the model and the audit import this module when they are rendered
    from gradguard.core.audit import Audit
    from gradguard.core.track import RequiresGradChanges
    from gradguard.report.model import Finding, GroupSummary, Report

_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_STATE_STYLE = {"trainable": "green", "adapters": "green", "partial": "yellow", "frozen": "dim"}
_SPARK = "▁▂▃▄▅▆▇█"


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


def _group_table(groups: Sequence[GroupSummary], history: dict[str, Any] | None = None) -> Table:
    table = Table(title="module groups", title_justify="left", expand=False)
    table.add_column("group")
    table.add_column("role")
    table.add_column("state")
    table.add_column("base params", justify="right")
    table.add_column("trainable", justify="right")
    table.add_column("adapters", justify="right")
    norms = (history or {}).get("grad_norm") or {}
    if norms:
        table.add_column("grad norm (pre-clip, log)")
        table.add_column("last", justify="right")
    for g in groups:
        row: list[Any] = [
            _group_label(g),
            g.role,
            Text(g.state, style=_STATE_STYLE.get(g.state, "")),
            fmt_count(g.params),
            fmt_count(g.trainable),
            fmt_count(g.adapter_params) if g.adapter_params else "-",
        ]
        if norms:
            series = norms.get(g.name) or []
            present = [v for v in series if v is not None]
            if present:
                last = _num(present[-1])
                row += [sparkline(series), f"{last:.3g}"]
            else:
                row += ["", "frozen" if g.trainable == 0 else "no grad"]
        table.add_row(*row)
    return table


def _finding_lines(findings: Sequence[Finding]) -> Table:
    table = Table.grid(padding=(0, 1))
    for f in findings:
        where = f" [{f.group}]" if f.group else ""
        step = f" step {f.step}" if f.step is not None else ""
        table.add_row(
            Text(f.severity, style=_SEVERITY_STYLE[f.severity]),
            Text(f"{f.code}{step}{where}", style="bold"),
            Text(f.message),
        )
        table.add_row("", "", Text(f"fix: {f.hint}", style="dim"))
    return table


def _localization_lines(loc: dict[str, Any] | None) -> list[tuple[str, str]]:
    """``(label, text)`` lines for a fault's localisation (fields: docs/localization.md)."""
    if not loc:
        return []
    out: list[tuple[str, str]] = []
    if loc.get("module"):
        trainable = {True: "trainable", False: "frozen", None: "trainability unknown"}[loc.get("trainable")]
        how = f"{loc.get('phase') or '?'} phase"
        if loc.get("micro_batch") is not None:
            how += f", micro-batch {loc['micro_batch']}"
        if loc.get("parameter"):
            how += f", parameter {loc['parameter']}"
        if loc.get("source") == "trace":
            how += ", seen by the trace of the original step"
        out.append(
            (
                "localized",
                f"{loc['module']} ({loc.get('class') or '?'}; group {loc.get('group') or '-'}, "
                f"role {loc.get('role') or '-'}, {trainable}), {how}",
            )
        )

        def fmt(v: Any) -> str:
            return "-" if v is None else f"{_num(v):.3g}"

        frames = []
        for fr in (loc.get("frames") or [])[-4:]:  # the ramp into the origin, oldest first
            if "output_absmax" in fr:
                frames.append(f"{fr['module']} in {fmt(fr['input_absmax'])} -> out {fmt(fr['output_absmax'])}")
            else:
                size = fmt(fr.get("absmax", fr.get("norm")))
                frames.append(f"{fr.get('parameter') or fr['module']} grad {size}")
        if frames:
            out.append(("ramp", " | ".join(frames)))
    if loc.get("verdict"):
        text = loc.get("advice") or loc.get("message") or ""
        prefix = f"{loc['verdict']}: "  # the advice may already start with the verdict: say it once
        out.append(("verdict", text if text.startswith(prefix) else prefix + text))
    return out


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
    for label, text in _localization_lines(f.localization):
        lines.append(f"{label}: ", style="bold")
        lines.append(f"{text}\n")
    lines.append("weights: " + _weights(report) + "\n", style="green" if f.weights_intact else "bold red")
    for entry in f.evidence:
        lines.append(f"{entry.get('text')}\n")
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
        out += [f"- **{label}**: {_md_escape(text)}" for label, text in _localization_lines(f.localization)]
        out += [f"- {e.get('text')}" for e in f.evidence]
        out.append("")
    elif report.exit:
        out += [_exit_line(report).removeprefix("gradguard: "), ""]
    if report.groups:
        norms = report.history.get("grad_norm") or {}
        out += [
            "## Module groups",
            "",
            "| group | role | state | base params | trainable | adapters | grad norm (last) |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for g in report.groups:
            series = [v for v in norms.get(g.name) or [] if v is not None]
            last = f"{_num(series[-1]):.3g}" if series else "-"
            out.append(
                f"| {_group_label(g, '`')} | {g.role} | {g.state} | {fmt_count(g.params)} | {fmt_count(g.trainable)} | "
                f"{fmt_count(g.adapter_params) if g.adapter_params else '-'} | {last} |"
            )
        out.append("")
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
        out += [f"Raw loss over the last steps: `{sparkline(losses, 40)}` (last {_num(losses[-1]):.4g})", ""]
    env = report.environment
    if env:
        out += ["## Environment", "", ", ".join(f"{k}: {v}" for k, v in env.items()), ""]
    return "\n".join(out)
