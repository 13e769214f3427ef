"""How a number with its 95% interval and n is written in every page and terminal line.

    rate(0.42, [0.3, 0.55], 20)      -> "42% [30%, 55%] n=20"
    value(0.913, [0.85, 0.96], 40)   -> "0.913 [0.850, 0.960] n=40"

Missing values print as "–", so a page never shows "nan" for a number that was not measured.
"""
from __future__ import annotations

import math


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def _n(n) -> str:
    return "" if n is None else f" n={n}"


def rate(value, ci=None, n=None, digits: int = 0) -> str:
    """A proportion as a percentage with its interval and n."""
    if _missing(value):
        return "–"
    f = lambda v: "–" if _missing(v) else f"{100 * v:.{digits}f}%"  # noqa: E731
    interval = f" [{f(ci[0])}, {f(ci[1])}]" if ci is not None and len(ci) == 2 else ""
    return f"{f(value)}{interval}{_n(n)}"


def value(v, ci=None, n=None, digits: int = 3) -> str:
    """A number (AUC, rho, a score) with its interval and n."""
    if _missing(v):
        return "–"
    f = lambda x: "–" if _missing(x) else f"{x:.{digits}f}"  # noqa: E731
    interval = f" [{f(ci[0])}, {f(ci[1])}]" if ci is not None and len(ci) == 2 else ""
    return f"{f(v)}{interval}{_n(n)}"
