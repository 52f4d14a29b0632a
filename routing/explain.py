"""Why a message went where it went: per rule, per condition, and the final destinations."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import Rejected
from gateway.model import RouteDecision
from routing.conditions import show
from routing.rules import ConditionTrace


@dataclass(frozen=True, slots=True)
class RuleTrace:
    rule: str
    description: str
    evaluated: bool  # False when an earlier matching rule said stop
    matched: bool
    conditions: tuple[ConditionTrace, ...]
    destinations: tuple[str, ...]  # what the rule gave, rendered (also those an earlier rule had chosen)
    skipped: tuple[str, ...]  # template targets that gave nothing, and why
    stopped: bool  # matched, and said stop


@dataclass(frozen=True, slots=True)
class Explanation:
    source: str  # the rules file
    document_type: str
    function: str
    sender: str
    recipient: str
    fields: Mapping[str, tuple[str, ...]]  # every business field defined for the document type, as read
    rules: tuple[RuleTrace, ...]
    decisions: tuple[RouteDecision, ...]  # exactly what route() returns, when it returns
    error: Rejected | None  # what route() raises (NO_ROUTE), when it raises

    @property
    def ok(self) -> bool:
        return self.error is None

    def trace(self, rule: str) -> RuleTrace:
        return next(t for t in self.rules if t.rule == rule)

    def render(self) -> str:
        lines = [
            f"message: documentType={self.document_type} function={self.function} "
            f"from={self.sender} to={self.recipient}",
            f"rules:   {self.source} (top to bottom)",
        ]
        if self.fields:
            pad = max(len(name) for name in self.fields)
            lines.append("fields:")
            lines.extend(f"  {name:<{pad}} = {show(values)}" for name, values in self.fields.items())
        lines.append("")
        width = len(str(len(self.rules)))
        for number, trace in enumerate(self.rules, start=1):
            lines.extend(_render_rule(f"{number:>{width}}.", trace))
        lines.append("")
        if self.error is not None:
            lines.append(f"result: {self.error.code}: {self.error.detail}")
        else:
            lines.append("result: routed to")
            pad = max(len(d.destination) for d in self.decisions)
            lines.extend(f"  {d.destination:<{pad}}  <- rule {d.rule}" for d in self.decisions)
        return "\n".join(lines)


def _render_rule(number: str, trace: RuleTrace) -> list[str]:
    if not trace.evaluated:
        return [f"{number} {trace.rule}: not evaluated (an earlier rule said stop)"]
    if trace.matched:
        outcome = "MATCHED -> " + (", ".join(trace.destinations) or "(nothing)")
        if trace.stopped:
            outcome += "; stop: later rules are not evaluated"
    else:
        outcome = "no match"
    kind = next((c for c in trace.conditions if c.subject == "documentType"), None)
    if not trace.matched and kind is not None and not kind.passed:
        # not a rule for this kind of document: one line is enough to say so
        return [f"{number} {trace.rule}: no match ({'; '.join(kind.reasons)})"]
    lines = [f"{number} {trace.rule}: {outcome}"]
    if trace.description:
        lines.append(f"     # {trace.description}")
    if not trace.conditions:
        lines.append("     ok    (no conditions: matches every message)")
    for condition in trace.conditions:
        if condition.passed:
            lines.append(f"     ok    {condition.subject} {condition.expected} (saw {condition.actual})")
        else:
            lines.append(f"     FAIL  {condition.subject}: {'; '.join(condition.reasons)}")
    lines.extend(f"     skip  {why}" for why in trace.skipped)
    return lines
