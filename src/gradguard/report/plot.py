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
    below it and, when measured, each group's update-to-weight ratio; non-finite points as red crosses at the
    top of each panel, the fault step as a vertical line.

    >>> from gradguard import Report
    >>> report = Report.load("out/gradguard-report.json")  # doctest: +SKIP
    >>> plot_report(report, "gradguard.png")  # doctest: +SKIP
    PosixPath('gradguard.png')
    """
    figure_cls, canvas_cls = _import_matplotlib()
    from matplotlib.ticker import MaxNLocator

    history = report.history or {}
    steps = [int(s) for s in history.get("steps") or []]
    ratios: dict[str, list[Any]] = history.get("update_ratio") or {}
    has_ratios = any(v is not None for series in ratios.values() for v in series or [])
    fig = figure_cls(figsize=(9.5, 7.6 if has_ratios else 6.2), dpi=dpi, layout="constrained")
    canvas_cls(fig)
    heights = [2, 1, 1] if has_ratios else [2, 1]
    axes = fig.subplots(len(heights), 1, sharex=True, height_ratios=heights)
    colors = _colors(report, history)
    handles = _norm_panel(axes[0], report, steps, history.get("grad_norm") or {}, colors)
    _loss_panel(axes[1], steps, history.get("loss") or [], handles)
    if has_ratios:
        _ratio_panel(axes[2], steps, ratios, colors)
    axes[-1].set_xlabel("optimizer step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
    if not steps:
        for ax in axes:
            ax.text(0.5, 0.5, "no steps recorded", ha="center", va="center", transform=ax.transAxes, color="gray")
        axes[-1].set_xlim(0, 1)
    _mark_fault(list(axes), report, steps)
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="group (role)", title_fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _colors(report: Report, history: dict[str, Any]) -> dict[str, str]:
    """One colour per group, the same in every panel."""
    import matplotlib

    names = [g.name for g in report.groups] + [n for n in history.get("grad_norm") or {} if n]
    cycle = itertools.cycle(matplotlib.rcParams["axes.prop_cycle"].by_key()["color"])
    return {name: next(cycle) for name in dict.fromkeys(names)}


def _norm_panel(
    ax: Axes, report: Report, steps: list[int], norms: dict[str, list[Any]], colors: dict[str, str]
) -> list[Any]:
    """Pre-clip gradient norm per group (log scale); returns the legend handles."""
    from matplotlib.lines import Line2D

    roles = {g.name: g.role for g in report.groups}
    handles: list[Any] = []
    no_grad: list[str] = []
    any_bad = any_zero = False
    ax.set_yscale("log")
    for name in colors:
        values = [_num(v) for v in norms.get(name) or []]
        role = roles.get(name, "?")
        if not any(v is not None for v in values):
            no_grad.append(f"{name} ({role})")  # frozen, or no gradient reached it
            continue
        bad, zero = _series(ax, steps, values, log=True, color=colors[name], label=name)
        any_bad, any_zero = any_bad or bad, any_zero or zero
        handles.append(Line2D([], [], color=colors[name], marker="o", markersize=3, label=f"{name} ({role})"))
    if any_bad:
        handles.append(
            Line2D([], [], color=_NONFINITE, marker="x", linestyle="", markersize=7, label="non-finite (NaN / Inf)")
        )
    if any_zero:
        handles.append(Line2D([], [], color="gray", marker="v", linestyle="", markersize=6, label="all-zero gradient"))
    ax.set_ylabel("grad norm (pre-clip)")
    if not ax.has_data() or not any(v is not None and math.isfinite(v) and v > 0 for v in _all(norms)):
        ax.set_ylim(1e-3, 1e1)  # nothing finite to scale to: a sensible empty log axis
    # Groups without any gradient (frozen, or cut off from the loss) have no line; the legend names them.
    return handles + [Line2D([], [], color="#bbbbbb", linestyle=":", label=f"{n}: no gradient") for n in no_grad]


def _loss_panel(ax: Axes, steps: list[int], raw: list[Any], handles: list[Any]) -> None:
    """The raw loss; "not recorded" when the guard never saw one (a loss computed outside the model)."""
    from matplotlib.lines import Line2D

    losses = [_num(v) for v in raw]
    ax.set_ylabel("raw loss")
    if steps and not any(v is not None for v in losses):
        ax.text(
            0.5,
            0.5,
            "loss not recorded (pass it with guard.record_loss(loss))",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="gray",
        )
        return
    bad, _ = _series(ax, steps, losses, log=False, color="#333333")
    if bad and not any(getattr(h, "get_label", lambda: "")() == "non-finite (NaN / Inf)" for h in handles):
        handles.append(
            Line2D([], [], color=_NONFINITE, marker="x", linestyle="", markersize=7, label="non-finite (NaN / Inf)")
        )


def _ratio_panel(ax: Axes, steps: list[int], ratios: dict[str, list[Any]], colors: dict[str, str]) -> None:
    """Each group's update-to-weight ratio |dW| / |W| per step (log scale), with the 1e-3 of a typical fine-tune."""
    ax.set_yscale("log")
    for name, series in ratios.items():
        values = [_num(v) for v in series or []]
        if any(v is not None for v in values):
            _series(ax, steps, values, log=True, color=colors.get(name, "gray"), label=name)
    ax.axhline(1e-3, color="gray", linestyle=":", linewidth=1)
    ax.set_ylabel("update / weight")


def _mark_fault(axes: list[Axes], report: Report, steps: list[int]) -> None:
    """The title (status, fault, origin) and the fault's step as a vertical line in every panel."""
    fault = report.fault
    title = f"gradguard report: {report.status}"
    if fault is not None:
        origin = fault.origin
        where = origin.group or origin.module or "unknown module"
        trainable = {True: "trainable", False: "frozen", None: None}[origin.trainable]
        detail = ", ".join(x for x in (origin.role, trainable, f"{origin.phase} phase") if x)
        when = f"at step {fault.step}" if fault.step > 0 else "before step 1 (static audit)"
        weights = "weights intact" if fault.weights_intact else "weights MODIFIED"
        title = f"gradguard report: fault {when}: {fault.code} {fault.kind}\norigin: {where} ({detail}); {weights}"
    axes[0].set_title(title, fontsize=10.5, loc="left")
    if fault is None or not steps:
        return
    x = fault.step if fault.step > 0 else steps[0] - 0.5
    for ax in axes:
        ax.axvline(x, color=_FAULT, linestyle="--", linewidth=1.2, zorder=1)
    # A short tag along the line (it hides no data); the full description goes in the title.
    axes[0].annotate(
        f"{fault.code} {fault.kind}",
        xy=(x, 0.92),
        xycoords=axes[0].get_xaxis_transform(),
        xytext=(-4, 0),
        textcoords="offset points",
        rotation=90,
        ha="right",
        va="top",
        fontsize=8,
        color=_FAULT,
    )
    if fault.step > 0:
        lo, hi = min(steps[0], fault.step), max(steps[-1], fault.step)
        pad = max(0.5, (hi - lo) * 0.04)
        axes[-1].set_xlim(lo - pad, hi + pad)


def _all(norms: dict[str, list[Any]]) -> list[float | None]:
    return [_num(v) for series in norms.values() for v in series or []]
