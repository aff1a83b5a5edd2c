"""The report as a picture: per-group gradient norms and the raw loss over steps, the fault marked.

Needs the optional extra ``plot`` (``pip install 'gradguard[plot]'``, i.e. matplotlib). The figure is drawn
on matplotlib's Agg canvas directly, without pyplot, so plotting never changes the backend or the
global state of a notebook or training script that imports gradguard.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradguard.report.model import Report

if TYPE_CHECKING:
    from matplotlib.axes import Axes

PLOT_EXTRA_HINT = "pip install 'gradguard[plot]'"
_NONFINITE = "#d62728"  # red: the colour of a NaN / Inf point, in both panels
_FAULT = "#b2182b"


def _num(value: Any) -> float | None:
    """A history value as a float: ``None`` stays missing; "NaN" / "Infinity" strings become floats."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _import_matplotlib() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # optional dependency
        raise ImportError(f"plotting a report needs matplotlib: {PLOT_EXTRA_HINT}") from exc
    return Figure, FigureCanvasAgg


def _series(ax: Axes, steps: list[int], values: list[float | None], *, log: bool, **style: Any) -> tuple[bool, bool]:
    """Plot the finite points of one series; mark non-finite ones with a red x at the top of the axes
    and, on a log axis, exact zeros with a triangle at the bottom.

    Returns whether any non-finite / zero point was marked (for the legend).
    """
    xs = [s for s, v in zip(steps, values) if v is not None and math.isfinite(v) and (v > 0 or not log)]
    ys = [v for v in values if v is not None and math.isfinite(v) and (v > 0 or not log)]
    if xs:
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.4, **style)
    bad = [s for s, v in zip(steps, values) if v is not None and not math.isfinite(v)]
    if bad:
        # x in data coordinates, y at the top of the axes: NaN has no place on a y axis.
        ax.scatter(
            bad,
            [0.97] * len(bad),
            marker="x",
            color=_NONFINITE,
            s=48,
            linewidths=2,
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            zorder=5,
        )
    zero = [s for s, v in zip(steps, values) if v is not None and v == 0] if log else []
    if zero:  # an all-zero gradient cannot sit on a log axis: a triangle at the bottom
        ax.scatter(
            zero,
            [0.03] * len(zero),
            marker="v",
            color=style.get("color", "gray"),
            s=30,
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            zorder=5,
        )
    return bool(bad), bool(zero)


def plot_report(report: Report, path: str | os.PathLike[str], *, dpi: int = 130) -> Path:
    """Write a PNG of ``report``: pre-clip gradient norm per group (log scale) over steps, the raw loss
    below it, non-finite points as red crosses at the top of each panel, the fault step as a vertical line.

    >>> from gradguard import Report
    >>> report = Report.load("out/gradguard-report.json")  # doctest: +SKIP
    >>> plot_report(report, "gradguard.png")  # doctest: +SKIP
    PosixPath('gradguard.png')
    """
    figure_cls, canvas_cls = _import_matplotlib()
    import matplotlib
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    history = report.history or {}
    steps = [int(s) for s in history.get("steps") or []]
    norms: dict[str, list[Any]] = history.get("grad_norm") or {}
    losses = [_num(v) for v in history.get("loss") or []]
    roles = {g.name: g.role for g in report.groups}
    order = [g.name for g in report.groups] + [n for n in norms if n not in roles]

    fig = figure_cls(figsize=(9.5, 6.2), dpi=dpi, layout="constrained")
    canvas_cls(fig)
    ax_norm, ax_loss = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])

    handles: list[Any] = []
    no_grad: list[str] = []
    any_bad = any_zero = False
    colors = itertools.cycle(matplotlib.rcParams["axes.prop_cycle"].by_key()["color"])
    ax_norm.set_yscale("log")
    for name in order:
        values = [_num(v) for v in norms.get(name) or []]
        role = roles.get(name, "?")
        if not any(v is not None for v in values):
            no_grad.append(f"{name} ({role})")  # frozen, or no gradient reached it
            continue
        color = next(colors)
        bad, zero = _series(ax_norm, steps, values, log=True, color=color, label=name)
        any_bad, any_zero = any_bad or bad, any_zero or zero
        handles.append(Line2D([], [], color=color, marker="o", markersize=3, label=f"{name} ({role})"))
    any_bad |= _series(ax_loss, steps, losses, log=False, color="#333333")[0]

    if any_bad:
        handles.append(
            Line2D([], [], color=_NONFINITE, marker="x", linestyle="", markersize=7, label="non-finite (NaN / Inf)")
        )
    if any_zero:
        handles.append(Line2D([], [], color="gray", marker="v", linestyle="", markersize=6, label="all-zero gradient"))
    ax_norm.set_ylabel("grad norm (pre-clip)")
    ax_loss.set_ylabel("raw loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_norm, ax_loss):
        ax.grid(True, which="major", alpha=0.3)
    if not ax_norm.has_data() or not any(v is not None and math.isfinite(v) and v > 0 for v in _all(norms)):
        ax_norm.set_ylim(1e-3, 1e1)  # nothing finite to scale to: a sensible empty log axis
    if not steps:
        for ax in (ax_norm, ax_loss):
            ax.text(0.5, 0.5, "no steps recorded", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax_loss.set_xlim(0, 1)

    fault = report.fault
    title = f"gradguard report: {report.status}"
    if fault is not None:
        origin = fault.origin
        where = origin.group or origin.module or "unknown module"
        detail = ", ".join(
            x
            for x in (
                origin.role,
                {True: "trainable", False: "frozen", None: None}[origin.trainable],
                f"{origin.phase} phase",
            )
            if x
        )
        when = f"at step {fault.step}" if fault.step > 0 else "before step 1 (static audit)"
        weights = "weights intact" if fault.weights_intact else "weights MODIFIED"
        title = f"gradguard report: fault {when}: {fault.code} {fault.kind}\norigin: {where} ({detail}); {weights}"
    if fault is not None and steps:
        x = fault.step if fault.step > 0 else steps[0] - 0.5
        for ax in (ax_norm, ax_loss):
            ax.axvline(x, color=_FAULT, linestyle="--", linewidth=1.2, zorder=1)
        # A short tag along the line (it hides no data); the full description goes in the title.
        ax_norm.annotate(
            f"{fault.code} {fault.kind}",
            xy=(x, 0.92),
            xycoords=ax_norm.get_xaxis_transform(),
            xytext=(-4, 0),
            textcoords="offset points",
            rotation=90,
            ha="right",
            va="top",
            fontsize=8,
            color=_FAULT,
        )
    if steps and fault is not None and fault.step > 0:
        lo = min(steps[0], fault.step)
        hi = max(steps[-1], fault.step)
        pad = max(0.5, (hi - lo) * 0.04)
        ax_loss.set_xlim(lo - pad, hi + pad)
    ax_norm.set_title(title, fontsize=10.5, loc="left")
    # Groups without any gradient (frozen, or cut off from the loss) have no line; the legend names them.
    handles += [Line2D([], [], color="#bbbbbb", linestyle=":", label=f"{n}: no gradient") for n in no_grad]
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="group (role)", title_fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _all(norms: dict[str, list[Any]]) -> list[float | None]:
    return [_num(v) for series in norms.values() for v in series or []]
