"""Goals, and the Markdown tables of one run.

Sizes are decimal: 1 MB is 10**6 bytes, in throughput and in peak RSS alike.
"""

from dataclasses import dataclass
from typing import Any, Final

from bench.inputs import Layer
from bench.timing import CaseResult

MB: Final = 1_000_000
RSS_BASE_BYTES: Final = 64 * MB
RSS_PER_ENTRY_BYTES: Final = 400


@dataclass(frozen=True, slots=True)
class Goal:
    """A limit for one lcow case: a ratio to a reference's median, or an absolute one.

    ``kind`` is ``ratio`` (``limit`` x the reference's median time), ``seconds`` (median
    time) or ``rss`` (largest peak RSS, ``limit`` bytes).
    """

    case: str
    kind: str
    limit: float
    reference: str | None = None

    def describe(self) -> str:
        if self.kind == "ratio":
            return f"{self.case} ≤ {self.limit:g} x {self.reference}"
        if self.kind == "seconds":
            return f"{self.case} ≤ {self.limit * 1000:g} ms"
        return f"{self.case} peak RSS ≤ {self.limit / MB:.1f} MB"


@dataclass(frozen=True, slots=True)
class GoalResult:
    """A goal with the measured value, the value allowed and whether the run met it."""

    goal: Goal
    measured: float | None  # a ratio, seconds or bytes, as the goal's kind sets
    allowed: float
    met: bool | None  # None when a case it needs has no result


@dataclass(slots=True)
class GroupResult:
    """The cases of one group on one input, with the goals that apply to it."""

    group_id: str
    layer: Layer | None
    cases: list[CaseResult]
    goals: list[GoalResult]


def rss_goal(layer: Layer, case: str = "ApplyDiff") -> Goal:
    return Goal(case, "rss", RSS_BASE_BYTES + RSS_PER_ENTRY_BYTES * layer.entries)


def evaluate(goal: Goal, cases: list[CaseResult]) -> GoalResult:
    by_name = {case.name: case for case in cases if case.samples}
    subject = by_name.get(goal.case)
    if goal.kind == "ratio":
        reference = by_name.get(goal.reference or "")
        if subject is None or reference is None:
            return GoalResult(goal, None, goal.limit, None)
        ratio = subject.median_s / reference.median_s
        return GoalResult(goal, ratio, goal.limit, ratio <= goal.limit)
    if subject is None:
        return GoalResult(goal, None, goal.limit, None)
    if goal.kind == "seconds":
        return GoalResult(goal, subject.median_s, goal.limit, subject.median_s <= goal.limit)
    peak = subject.peak_rss_bytes
    if peak is None:
        return GoalResult(goal, None, goal.limit, None)
    return GoalResult(goal, peak, goal.limit, peak <= goal.limit)


def _seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _rate(count: float, seconds: float) -> str:
    rate = count / seconds
    return f"{rate / 1000:,.0f} k" if rate >= 10_000 else f"{rate:,.0f}"


def case_rows(group: GroupResult) -> list[list[str]]:
    """Build one row per case: time, throughput, peak RSS and the ratio to each reference."""
    references = [case for case in group.cases if case.is_reference and case.samples]
    rows = []
    for case in group.cases:
        if case.error is not None or not case.samples:
            rows.append([group.group_id, case.name, "failed", "", "", "", "", case.error or ""])
            continue
        entries_rate = mb_rate = ""
        layer = group.layer
        if layer is not None and not group.group_id.startswith("changes"):
            entries_rate = _rate(layer.entries, case.median_s)
            mb_rate = f"{layer.tar_bytes / MB / case.median_s:,.0f}"
        peak = case.peak_rss_bytes
        peak_text = "" if peak is None else f"{peak / MB:,.0f}"
        if peak is not None and layer is not None and not case.is_reference:
            peak_text += f" ({peak / layer.entries:,.0f} B/entry)"
        ratios = ""
        if not case.is_reference:
            ratios = "; ".join(
                f"{case.median_s / reference.median_s:.2f} x {reference.name}"
                for reference in references
            )
        rows.append(
            [
                group.group_id,
                ("" if case.is_reference else "**lcow** ") + case.name,
                _seconds(case.median_s),
                f"{_seconds(case.min_s)} - {_seconds(case.max_s)}",
                entries_rate,
                mb_rate,
                peak_text,
                ratios,
            ]
        )
    return rows


def goal_rows(groups: list[GroupResult]) -> list[list[str]]:
    rows = []
    for group in groups:
        for result in group.goals:
            goal = result.goal
            if result.measured is None:
                rows.append([group.group_id, goal.describe(), "no result", "not measured"])
                continue
            if goal.kind == "ratio":
                measured = f"{result.measured:.2f} x"
            elif goal.kind == "seconds":
                measured = _seconds(result.measured)
            else:
                measured = f"{result.measured / MB:.1f} MB of {result.allowed / MB:.1f} MB"
            excess = result.measured / result.allowed
            # Two decimals, or three when two would print a miss as 1.00.
            digits = 3 if excess < 1.005 else 2
            verdict = "met" if result.met else f"missed: {excess:.{digits}f} x the limit"
            rows.append([group.group_id, goal.describe(), measured, verdict])
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


CASE_HEADER: Final = [
    "group",
    "measurement",
    "median",
    "min - max",
    "entries/s",
    "MB/s",
    "peak RSS MB",
    "ratio to reference (medians)",
]
GOAL_HEADER: Final = ["group", "goal", "measured", "verdict"]


def to_json(group: GroupResult) -> dict[str, Any]:
    """Return every sample of every case, and the goals, for ``--json``."""
    layer = group.layer
    return {
        "group": group.group_id,
        "input": None
        if layer is None
        else {
            "name": layer.name,
            "path": str(layer.path),
            "entries": layer.entries,
            "file_bytes": layer.file_bytes,
            "tar_bytes": layer.tar_bytes,
        },
        "cases": [
            {
                "name": case.name,
                "is_reference": case.is_reference,
                "error": case.error,
                "seconds": [sample.seconds for sample in case.samples],
                "peak_rss_bytes": [sample.peak_rss_bytes for sample in case.samples],
                "detail": [sample.detail for sample in case.samples],
            }
            for case in group.cases
        ],
        "goals": [
            {
                "goal": result.goal.describe(),
                "measured": result.measured,
                "allowed": result.allowed,
                "met": result.met,
            }
            for result in group.goals
        ],
    }
