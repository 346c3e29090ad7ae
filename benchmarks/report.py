"""What the benchmark scripts share: the machine line, geometric means, failure reasons in table cells."""
from __future__ import annotations

import math
import os
import platform


def machine() -> str:
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def failure_cell(exc: Exception) -> str:
    """An exception as one short markdown-safe table cell."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:120]}".replace("|", "/")
