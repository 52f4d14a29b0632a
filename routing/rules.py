"""A compiled routing rule: its conditions and its destination targets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product
from string import Formatter

from gateway.model import Header, RouteDecision
from routing.conditions import HEADER_SUBJECTS, Condition, Values, only_positive, show
from routing.fields import FIELD_NAME, FieldValues

#: Destinations with this prefix are ASW peers, resolved per message (configured or supplied by the caller).
DYNAMIC_PREFIX = "asw:"


class TargetSpecError(ValueError):
    """A ``to`` entry written wrongly; the loader adds the file and rule to the message."""


@dataclass(frozen=True, slots=True)
class Target:
    """One entry of a rule's ``to``: a destination name, or a template such as ``asw:{importingCountry}``.

    A template reads business fields, or header fields by their condition names (``asw:{toCountry}``:
    answers go back to the country they are addressed to)."""

    text: str
    parts: tuple[tuple[str, str | None], ...]  # (literal, field or None), in order
    fields: tuple[str, ...]  # business fields it reads
    decision: RouteDecision | None  # prebuilt for a fixed, configured destination
    header_fields: tuple[str, ...] = ()  # header fields it reads (keys of HEADER_SUBJECTS)

    @property
    def is_template(self) -> bool:
        return bool(self.fields or self.header_fields)

    def render(self, values: FieldValues, header: Header) -> tuple[tuple[str, ...], str]:
        """The destination names this target gives for one message, or () and why none."""
        if not self.is_template:
            return (self.text,), ""
        seen: dict[str, Values] = {}
        for key in (*self.fields, *self.header_fields):
            if key in self.header_fields:
                value = HEADER_SUBJECTS[key](header)
                found: Values = (value,) if value else ()
                why = "is empty in the header"
            else:
                found = values.get(key)
                why = "is not defined for this document type" if not values.defined(key) else "is empty"
            if not found:
                return (), f"{self.text}: field {key} {why}"
            seen[key] = found
        names: dict[str, None] = {}
        keys = tuple(seen)
        for combination in product(*(seen[key] for key in keys)):
            chosen = dict(zip(keys, combination, strict=True))
            names["".join(lit + (chosen[f] if f else "") for lit, f in self.parts)] = None
        return tuple(names), ""


def parse_target(text: object, rule: str, configured: frozenset[str]) -> Target:
    if not isinstance(text, str) or not text:
        raise TargetSpecError(f"every 'to' entry must be a destination name, got {text!r}")
    parts: list[tuple[str, str | None]] = []
    try:
        parsed = list(Formatter().parse(text))
    except ValueError as exc:
        raise TargetSpecError(f"destination template {text!r} is malformed: {exc}") from exc
    for literal, key, spec, conversion in parsed:
        if literal:
            parts.append((literal, None))
        if key is None:
            continue
        if spec or conversion or not FIELD_NAME.match(key):
            raise TargetSpecError(f"destination template {text!r}: write fields as {{name}}, got {{{key}}}")
        parts.append(("", key))
    keys = tuple(dict.fromkeys(f for _, f in parts if f is not None))
    fields = tuple(k for k in keys if k not in HEADER_SUBJECTS)
    header_fields = tuple(k for k in keys if k in HEADER_SUBJECTS)
    if not keys and text not in configured and not text.startswith(DYNAMIC_PREFIX):
        known = ", ".join(sorted(configured))
        raise TargetSpecError(f"'to' names destination {text!r}, which is not defined (defined: {known})")
    decision = RouteDecision(text, rule) if not keys and text in configured else None
    return Target(text, tuple(parts), fields, decision, header_fields)


@dataclass(frozen=True, slots=True)
class ConditionTrace:
    """How one condition fared on one message."""

    subject: str
    expected: str
    actual: str
    passed: bool
    reasons: tuple[str, ...]  # why it failed; empty when it passed


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    description: str
    header_conditions: tuple[tuple[Callable[[Header], str], Condition], ...]
    field_conditions: tuple[tuple[str, Condition], ...]
    targets: tuple[Target, ...]
    stop: bool
    document_types: frozenset[str] | None  # the only types it can match, when its documentType says so
    # What ``matches`` runs: the same conditions, minus a documentType test that the engine's index by
    # document type already decides, each reduced to one callable.
    _header_checks: tuple[tuple[Callable[[Header], str], Callable[[Values], bool]], ...] = field(
        init=False, repr=False, compare=False
    )
    _field_checks: tuple[tuple[str, Callable[[Values], bool]], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        indexed = self.document_types is not None
        header_checks = tuple(
            (read, condition.check)
            for read, condition in self.header_conditions
            if not (indexed and condition.subject == "documentType" and only_positive(condition))
        )
        object.__setattr__(self, "_header_checks", header_checks)
        object.__setattr__(self, "_field_checks", tuple((n, c.check) for n, c in self.field_conditions))

    @property
    def fields(self) -> frozenset[str]:
        used = {name for name, _ in self.field_conditions}
        for target in self.targets:
            used.update(target.fields)
        return frozenset(used)

    def matches(self, header: Header, values: FieldValues) -> bool:
        """Whether the rule matches a message of one of its ``document_types`` (the engine's index says so)."""
        for read, check in self._header_checks:
            value = read(header)
            if not check((value,) if value else ()):
                return False
        get = values.get
        for name, check in self._field_checks:  # noqa: SIM110 -- hot path: a plain loop is cheaper than all()
            if not check(get(name)):
                return False
        return True

    def trace(self, header: Header, values: FieldValues) -> tuple[ConditionTrace, ...]:
        """Every condition evaluated (no short cut), for explanations."""
        traces = []
        for read, condition in self.header_conditions:
            value = read(header)
            traces.append(_trace(condition, (value,) if value else ()))
        for name, condition in self.field_conditions:
            undefined = "" if values.defined(name) else f"field {name} is not defined for {values.document_type}"
            traces.append(_trace(condition, values.get(name), undefined))
        return tuple(traces)


def _trace(condition: Condition, seen: Values, note: str = "") -> ConditionTrace:
    reasons = condition.failures(seen)
    if reasons and note:
        reasons = (*reasons, note)
    return ConditionTrace(condition.subject, condition.describe(), show(seen), not reasons, reasons)
