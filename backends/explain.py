"""What lowering decided and why, as a table and as JSON (``graphopt explain``)."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from .lower import Decision


def explain_table(decisions: Sequence[Decision]) -> str:
    """One block per region: its ops, then one row per candidate (predictions, measurement, choice)."""
    lines = []
    for d in decisions:
        ops = ", ".join(f"{op}×{k}" if k > 1 else op for op, k in sorted(d.ops.items(), key=lambda kv: -kv[1])[:6])
        more = "" if len(d.ops) <= 6 else f", … ({len(d.ops) - 6} more kinds)"
        lines.append(f"region {d.region} [{d.hash}]: {d.nodes} nodes, {d.flops / 1e6:.1f} MFLOP — {ops}{more}")
        lines.append(f"  {'backend':<12} {'analytical':>11} {'learned':>9} {'measured':>9} {'±':>7} {'compile':>9}  ")
        for c in d.candidates:
            mark = "→" if c.backend == d.chosen else " "
            if c.status != "ok":
                lines.append(f"{mark} {c.backend:<12} {c.status}: {c.reason}")
                continue
            lines.append(f"{mark} {c.backend:<12} {_ms(c.predicted.get('analytical')):>11} "
                         f"{_ms(c.predicted.get('learned')):>9} {_ms(c.measured):>9} {_ms(c.spread):>7} "
                         f"{_seconds(c.compile_seconds):>9}")
        chosen = d.chosen or "eager (not lowered)"
        lines.append(f"  chosen: {chosen} by the {d.cost_model} cost model{'; ' + d.note if d.note else ''}")
    if not decisions:
        lines.append("no region to lower: every node is either shape bookkeeping or unsupported by every backend")
    return "\n".join(lines)


def explain_json(decisions: Sequence[Decision]) -> str:
    return json.dumps([dataclasses.asdict(d) for d in decisions], indent=2)


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.3f}ms"


def _seconds(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds:.2f}s"
