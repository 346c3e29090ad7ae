"""What the benchmark scripts share: the machine line, timings, geometric means, failure reasons in table cells."""
from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import dataclass


def machine() -> str:
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def failure_cell(exc: Exception) -> str:
    """An exception as one short markdown-safe table cell."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:120]}".replace("|", "/")


@dataclass
class Timing:
    """Median and quartiles of repeated timings, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float

    @staticmethod
    def of(times_ms: list[float]) -> Timing:
        q1, median, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
        return Timing(median, q1, q3)

    def cell(self) -> str:
        """The median with the interquartile range in brackets."""
        return f"{self.median_ms:.2f} ({self.q3_ms - self.q1_ms:.2f})"
