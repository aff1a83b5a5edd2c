"""Small number formats shared by the renderers and the audit's sentences."""

from __future__ import annotations


def fmt_count(n: int) -> str:
    """Human-sized parameter count.

    >>> fmt_count(1234567), fmt_count(23680), fmt_count(12)
    ('1.2M', '23.7K', '12')
    """
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
