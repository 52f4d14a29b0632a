"""The conditions of a rule's ``when``: a subject (a header field or a business field) and its operators.

Every value a condition sees is a tuple of non-empty strings: a header field gives one value or none,
a business field gives as many as its XPath selects. Operators read "any value ...":

=========  ==================  ===============================================================
operator   argument            holds when
=========  ==================  ===============================================================
equals     "X"                 some value is X
in         ["X", "Y"]          some value is one of them
not_in     ["X", "Y"]          there is a value and none of them is listed (absent never passes)
prefix     "44" or ["44", ...] some value starts with one of the prefixes
exists     true / false        the field has a value / has none
matches    "regex"             some value matches the regex as a whole (anchored)
=========  ==================  ===============================================================

A plain string is shorthand for ``equals``, a plain list for ``in``; several operators in one mapping
must all hold. Arguments must be strings: YAML reads ``01`` as the integer 1, so unquoted numbers are
refused at load time rather than silently never matching.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Protocol

from gateway.model import Header

Values = tuple[str, ...]

#: Header condition keys and how each is read from the envelope header.
HEADER_SUBJECTS: Mapping[str, Callable[[Header], str]] = {
    "documentType": attrgetter("document_type"),
    "function": attrgetter("function"),
    "from": attrgetter("sender.identity"),
    "to": attrgetter("recipient.identity"),
    "fromCountry": attrgetter("sender.country_code"),
    "toCountry": attrgetter("recipient.country_code"),
}

OPERATORS = ("equals", "in", "not_in", "prefix", "exists", "matches")


def show(values: Values) -> str:
    """How a seen value is printed in explanations and errors."""
    if not values:
        return "(no value)"
    if len(values) == 1:
        return repr(values[0])
    return "[" + ", ".join(repr(v) for v in values) + "]"


def _listing(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(repr(i) for i in items) + "]"


class Operator(Protocol):
    def test(self, values: Values) -> bool: ...

    def describe(self) -> str: ...

    def why_not(self, values: Values) -> str: ...


@dataclass(frozen=True, slots=True)
class Equals:
    value: str

    def test(self, values: Values) -> bool:
        return self.value in values

    def describe(self) -> str:
        return f"= {self.value!r}"

    def why_not(self, values: Values) -> str:
        return f"{show(values)} is not {self.value!r}"


@dataclass(frozen=True, slots=True)
class In:
    ordered: tuple[str, ...]
    members: frozenset[str]

    def test(self, values: Values) -> bool:
        members = self.members
        return any(v in members for v in values)

    def describe(self) -> str:
        return f"in {_listing(self.ordered)}"

    def why_not(self, values: Values) -> str:
        return f"{show(values)} is not one of {_listing(self.ordered)}"


@dataclass(frozen=True, slots=True)
class NotIn:
    ordered: tuple[str, ...]
    members: frozenset[str]

    def test(self, values: Values) -> bool:
        members = self.members
        return bool(values) and not any(v in members for v in values)

    def describe(self) -> str:
        return f"not in {_listing(self.ordered)}"

    def why_not(self, values: Values) -> str:
        if not values:
            return "there is no value (not_in needs one)"
        hit = next(v for v in values if v in self.members)
        return f"{hit!r} is one of {_listing(self.ordered)}"


@dataclass(frozen=True, slots=True)
class Prefix:
    prefixes: tuple[str, ...]

    def test(self, values: Values) -> bool:
        prefixes = self.prefixes
        return any(v.startswith(prefixes) for v in values)

    def describe(self) -> str:
        return f"starts with one of {_listing(self.prefixes)}"

    def why_not(self, values: Values) -> str:
        return f"{show(values)}: no value starts with any of {_listing(self.prefixes)}"


@dataclass(frozen=True, slots=True)
class Exists:
    expected: bool

    def test(self, values: Values) -> bool:
        return bool(values) is self.expected

    def describe(self) -> str:
        return "has a value" if self.expected else "has no value"

    def why_not(self, values: Values) -> str:
        return "there is no value" if self.expected else f"it has the value {show(values)}"


@dataclass(frozen=True, slots=True)
class Matches:
    pattern: re.Pattern[str]

    def test(self, values: Values) -> bool:
        fullmatch = self.pattern.fullmatch
        return any(fullmatch(v) for v in values)

    def describe(self) -> str:
        return f"matches /{self.pattern.pattern}/"

    def why_not(self, values: Values) -> str:
        return f"{show(values)} does not match /{self.pattern.pattern}/"


@dataclass(frozen=True, slots=True)
class Condition:
    """One subject and the operators that must all hold on its values."""

    subject: str  # "function", "field hsCodes", ...
    operators: tuple[Operator, ...]

    def test(self, values: Values) -> bool:
        return all(op.test(values) for op in self.operators)

    @property
    def check(self) -> Callable[[Values], bool]:
        """``test``, without a level of indirection when there is one operator (the hot path)."""
        return self.operators[0].test if len(self.operators) == 1 else self.test

    def describe(self) -> str:
        return " and ".join(op.describe() for op in self.operators)

    def failures(self, values: Values) -> tuple[str, ...]:
        return tuple(op.why_not(values) for op in self.operators if not op.test(values))


class ConditionSpecError(ValueError):
    """A condition written wrongly; the loader adds the file and rule to the message."""


def _string(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise ConditionSpecError(
            f"{what} must be a quoted string, got {value!r} (YAML reads yes/no/on/off, and so the country "
            "code NO, as booleans: quote it)"
        )
    if value is None:
        raise ConditionSpecError(f"{what} must be a string, got nothing")
    if isinstance(value, int | float):
        raise ConditionSpecError(
            f"{what} must be a quoted string, got the number {value!r} "
            f'(YAML reads 01 as 1: write "{value}" or the code exactly as sent, in quotes)'
        )
    raise ConditionSpecError(f"{what} must be a string, got {type(value).__name__}")


def _strings(value: Any, what: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConditionSpecError(f"{what} must not be an empty list")
    return tuple(_string(item, what) for item in items)


def _operator(name: str, arg: Any, subject: str) -> Operator:
    what = f"{subject}: {name}"
    if name == "equals":
        return Equals(_string(arg, what))
    if name in ("in", "not_in"):
        ordered = _strings(arg, what)
        return (In if name == "in" else NotIn)(ordered, frozenset(ordered))
    if name == "prefix":
        return Prefix(_strings(arg, what))
    if name == "exists":
        if not isinstance(arg, bool):
            raise ConditionSpecError(f"{what} must be true or false, got {arg!r}")
        return Exists(arg)
    if name == "matches":
        pattern = _string(arg, what)
        try:
            return Matches(re.compile(pattern))
        except re.error as exc:
            raise ConditionSpecError(f"{what}: invalid regular expression {pattern!r}: {exc}") from exc
    raise ConditionSpecError(f"{subject}: unknown operator {name!r} (known: {', '.join(OPERATORS)})")


def parse_condition(subject: str, spec: Any) -> Condition:
    """Build a condition from its YAML form: a string, a list of strings, or ``{operator: argument}``."""
    if isinstance(spec, Mapping):
        if not spec:
            raise ConditionSpecError(f"{subject}: empty condition (give an operator: {', '.join(OPERATORS)})")
        return Condition(subject, tuple(_operator(str(k), v, subject) for k, v in spec.items()))
    if isinstance(spec, list):
        ordered = _strings(spec, subject)
        return Condition(subject, (In(ordered, frozenset(ordered)),))
    return Condition(subject, (Equals(_string(spec, subject)),))


def only_positive(condition: Condition) -> bool:
    """Whether the condition is nothing but equals/in (so membership of ``positive_set`` decides it)."""
    return all(isinstance(op, Equals | In) for op in condition.operators)


def positive_set(condition: Condition) -> frozenset[str] | None:
    """The values a condition restricts its subject to, when it is a plain equals/in; else None."""
    allowed: frozenset[str] | None = None
    for op in condition.operators:
        if isinstance(op, Equals):
            members = frozenset((op.value,))
        elif isinstance(op, In):
            members = op.members
        else:
            continue
        allowed = members if allowed is None else allowed & members
    return allowed
