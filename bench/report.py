"""Medians over rounds, ratios against bare aiohttp, and the printed tables."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from load import LoadResult

__all__ = ("Measurement", "RegimeSummary", "Target", "format_table", "summarize")


@dataclass(frozen=True, slots=True)
class Measurement:
    """One wrk run against one server, with the server's CPU over the run."""

    regime: str
    load: LoadResult
    server_cpu_seconds: float
    foreign_cpu: float  # share of a core other processes used during the run
    attempts: int

    @property
    def cpu_us_per_request(self) -> float:
        return self.server_cpu_seconds / max(1, self.load.requests) * 1e6


@dataclass(frozen=True, slots=True)
class RegimeSummary:
    """The medians of one regime over the rounds, and its ratios to bare."""

    regime: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    rps_ratio: float
    p99_ratio: float
    rounds: int
    disturbed: int


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    measured: str
    wanted: str
    met: bool
    note: str = field(default="")
    # A stricter view printed beside the targets, not part of the exit status.
    informational: bool = False


def summarize(
    rounds: Sequence[dict[str, Measurement]], regime: str, baseline: str
) -> RegimeSummary:
    """Medians across rounds; each ratio is taken within its round, then the median."""
    runs = [r[regime] for r in rounds if regime in r]
    pairs = [(r[regime], r[baseline]) for r in rounds if regime in r and baseline in r]
    return RegimeSummary(
        regime=regime,
        requests_per_second=statistics.median(m.load.requests_per_second for m in runs),
        p50_ms=statistics.median(m.load.p50_ms for m in runs),
        p99_ms=statistics.median(m.load.p99_ms for m in runs),
        cpu_us_per_request=statistics.median(m.cpu_us_per_request for m in runs),
        rps_ratio=statistics.median(
            m.load.requests_per_second / b.load.requests_per_second for m, b in pairs
        ),
        p99_ratio=statistics.median(m.load.p99_ms / b.load.p99_ms for m, b in pairs),
        rounds=len(runs),
        disturbed=sum(1 for m in runs if m.attempts > 1),
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, first column left-aligned and the rest right-aligned."""
    widths = [
        max(len(row[column]) for row in (headers, *rows))
        for column in range(len(headers))
    ]
    lines = []
    for number, row in enumerate((headers, *rows)):
        cells = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)
