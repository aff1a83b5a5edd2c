"""Small number formats shared by the renderers and the audit's sentences."""

from __future__ import annotations

import math
from typing import Any

# How a non-finite number reads in every human rendering (console, text, Markdown, CLI). The JSON file keeps
# strict JSON's spellings ("NaN", "Infinity", "-Infinity"); people get the short forms, one way everywhere.
_NONFINITE = {"nan": "NaN", "inf": "Inf", "-inf": "-Inf"}
_JSON_NONFINITE = {"NaN": "NaN", "Infinity": "Inf", "-Infinity": "-Inf"}


def fmt_count(n: int) -> str:
    """Human-sized parameter count.

    >>> fmt_count(1234567), fmt_count(23680), fmt_count(12)
    ('1.2M', '23.7K', '12')
    """
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def fmt_float(x: Any, spec: str = ".4g") -> str:
    """A number for people: ``spec`` for finite values, ``NaN`` / ``Inf`` / ``-Inf`` otherwise.

    Takes floats, 0-d tensors and the strings a report's JSON holds for non-finite values (``"NaN"``,
    ``"Infinity"``), so a report reads the same loaded from disk as in memory.

    >>> fmt_float(5.52638), fmt_float(float("nan")), fmt_float("Infinity"), fmt_float(float("-inf"), ".3g")
    ('5.526', 'NaN', 'Inf', '-Inf')
    >>> fmt_float(None), fmt_float("n/a")
    ('-', 'n/a')
    """
    if x is None:
        return "-"
    if isinstance(x, str):
        if x in _JSON_NONFINITE:
            return _JSON_NONFINITE[x]
        return x
    try:
        value = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(value):
        return _NONFINITE[str(value)]
    return format(value, spec)


def fmt_value(v: Any) -> str:
    """Any report value for people: numbers by :func:`fmt_float` (also inside lists), the rest as ``str``.

    >>> fmt_value([5.5264, float("nan")]), fmt_value(["NaN"]), fmt_value("vpm: 3.37"), fmt_value(3)
    ('[5.526, NaN]', '[NaN]', 'vpm: 3.37', '3')
    """
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float) or (isinstance(v, str) and v in _JSON_NONFINITE) or hasattr(v, "item"):
        return fmt_float(v)
    return str(v)
