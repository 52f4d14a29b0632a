"""The routing table: a message's header and business fields in, its destinations out.

Every rule is evaluated top to bottom; a message goes to the destinations of every rule it matches
(each once, in order of first appearance, credited to the first rule that chose it) until a matching
rule says ``stop``. Rules are indexed by the document types they name, so a message only meets the
rules that could match it, and a business field is extracted only when a rule it reaches reads it.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from lxml import etree

from gateway.errors import ConfigError, ErrorCode, Rejected
from gateway.model import Header, RouteDecision
from routing.config import CompiledConfig, DestinationConfig, compile_config, read_yaml
from routing.explain import Explanation, RuleTrace
from routing.fields import FieldDef, FieldValues
from routing.rules import Rule, Target

_NO_FIELDS: Mapping[str, FieldDef] = {}
_POLICY_KEYS = ("retry", "breaker")
_SHOWN_VALUE = 64  # a rendered destination comes from the document: never echo more than this of it
_NONE_WITHHELD: Mapping[str, str] = MappingProxyType({})


def default_rules_path() -> Path:
    """The rules shipped with the package."""
    return Path(__file__).with_name("default.yaml")


def _no_route(header: Header, skipped: list[str]) -> Rejected:
    detail = (
        f"no routing rule matches documentType={header.document_type} "
        f"function={header.function} from={header.sender.identity}"
    )
    if skipped:
        detail += f" (matched, but gave no destination: {'; '.join(skipped)})"
    return Rejected(ErrorCode.NO_ROUTE, detail, "/Envelope/Header/Subject/documentType")


def _target_location(target: Target, values: FieldValues) -> str | None:
    if target.fields:
        field = target.fields[0]
        return f"field {field} = {values.expression(field)}"
    if target.header_fields:
        return f"header field {target.header_fields[0]}"
    return None


def _unknown_destination(rule: Rule, target: Target, name: str, values: FieldValues) -> Rejected:
    shown = name if len(name) <= _SHOWN_VALUE else name[:_SHOWN_VALUE] + "..."
    return Rejected(
        ErrorCode.NO_ROUTE,
        f"rule {rule.name!r} routes to {shown!r} (from {target.text!r}), which is not a configured destination",
        _target_location(target, values),
    )


def _withheld_destination(rule: Rule, target: Target, name: str, why: str, values: FieldValues) -> Rejected:
    return Rejected(
        ErrorCode.NO_ROUTE,
        f"rule {rule.name!r} routes to {name!r} (from {target.text!r}), an ASW peer not routed to now: {why}",
        _target_location(target, values),
    )


class RoutingTable:
    """An immutable, checked set of destinations and rules. Reloading means building a new one."""

    def __init__(self, compiled: CompiledConfig, data: Mapping[str, Any], source: str) -> None:
        self.source = source
        self.destinations: Mapping[str, DestinationConfig] = compiled.destinations
        self._rules = compiled.rules
        self._fields = compiled.fields
        self._data = data
        self._any_type = tuple(r for r in self._rules if r.document_types is None)
        typed = {t for r in self._rules if r.document_types is not None for t in r.document_types}
        self._by_type = {
            t: tuple(r for r in self._rules if r.document_types is None or t in r.document_types) for t in typed
        }

    @classmethod
    def load(cls, path: Path) -> RoutingTable:
        return cls.from_mapping(read_yaml(path), source=str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "<mapping>") -> RoutingTable:
        snapshot = copy.deepcopy(data)  # overrides rebuild from it; the caller may keep mutating theirs
        return cls(compile_config(snapshot, source), snapshot, source)

    @property
    def rule_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self._rules)

    @property
    def document_types(self) -> frozenset[str]:
        """Document types that rules name (documentType equals / in) or define fields for.

        For cross-checking against the document-type registry; a documentType prefix / regex is not counted.
        """
        return frozenset(self._by_type) | frozenset(self._fields)

    def route(
        self,
        header: Header,
        document: etree._Element,
        *,
        extra_destinations: Collection[str] = (),
        withheld: Mapping[str, str] = _NONE_WITHHELD,
    ) -> tuple[RouteDecision, ...]:
        """The destinations for one message. Raises ``Rejected(NO_ROUTE)``.

        ``extra_destinations``: names routable without being configured (the ASW peers the partner
        registry gives an endpoint). ``withheld``: configured names not routable now, with why (ASW peers
        the registry gives none: ``adapters.asw.withheld_peers``); a message routed to one is refused whole.
        """
        document_type = header.document_type
        values = FieldValues(self._fields.get(document_type, _NO_FIELDS), document, document_type)
        chosen: dict[str, RouteDecision] = {}
        skipped: list[str] = []
        for rule in self._by_type.get(document_type, self._any_type):
            if not rule.matches(header, values):
                continue
            for target in rule.targets:
                if target.decision is not None:
                    name = target.decision.destination
                    if name not in chosen:
                        if name in withheld:
                            raise _withheld_destination(rule, target, name, withheld[name], values)
                        chosen[name] = target.decision
                    continue
                names, why = target.render(values, header)
                if why:
                    skipped.append(f"rule {rule.name}: {why}")
                for name in names:
                    if name not in chosen:
                        fault = self._unroutable(
                            rule, target, name, values, extra=extra_destinations, withheld=withheld
                        )
                        if fault is not None:
                            raise fault
                        chosen[name] = RouteDecision(name, rule.name)
            if rule.stop:
                break
        if not chosen:
            raise _no_route(header, skipped)
        return tuple(chosen.values())

    def explain(
        self,
        header: Header,
        document: etree._Element,
        *,
        extra_destinations: Collection[str] = (),
        withheld: Mapping[str, str] = _NONE_WITHHELD,
    ) -> Explanation:
        """What ``route`` decides and why, rule by rule. Never raises NO_ROUTE: it is in ``error``."""
        document_type = header.document_type
        defs = self._fields.get(document_type, _NO_FIELDS)
        values = FieldValues(defs, document, document_type)
        chosen: dict[str, RouteDecision] = {}
        skipped_all: list[str] = []
        traces: list[RuleTrace] = []
        error: Rejected | None = None
        stopped = False
        for rule in self._rules:
            if stopped:
                traces.append(RuleTrace(rule.name, rule.description, False, False, (), (), (), False))
                continue
            conditions = rule.trace(header, values)
            matched = all(c.passed for c in conditions)
            given: list[str] = []
            skipped: list[str] = []
            if matched:
                for target in rule.targets:
                    names, why = target.render(values, header)
                    if why:
                        skipped.append(why)
                        skipped_all.append(f"rule {rule.name}: {why}")
                    for name in names:
                        given.append(name)
                        if name in chosen:
                            continue
                        fault = self._unroutable(
                            rule, target, name, values, extra=extra_destinations, withheld=withheld
                        )
                        if fault is not None:
                            error = error or fault
                            continue
                        chosen[name] = RouteDecision(name, rule.name)
                stopped = rule.stop
            traces.append(
                RuleTrace(
                    rule.name,
                    rule.description,
                    True,
                    matched,
                    conditions,
                    tuple(given),
                    tuple(skipped),
                    matched and rule.stop,
                )
            )
        if error is None and not chosen:
            error = _no_route(header, skipped_all)
        return Explanation(
            source=self.source,
            document_type=document_type,
            function=header.function,
            sender=header.sender.identity,
            recipient=header.recipient.identity,
            fields=MappingProxyType({name: values.get(name) for name in defs}),
            rules=tuple(traces),
            decisions=() if error is not None else tuple(chosen.values()),
            error=error,
        )

    def _unroutable(
        self,
        rule: Rule,
        target: Target,
        name: str,
        values: FieldValues,
        *,
        extra: Collection[str],
        withheld: Mapping[str, str],
    ) -> Rejected | None:
        """Why a destination a target gave cannot be routed to, or None."""
        if name in withheld:
            return _withheld_destination(rule, target, name, withheld[name], values)
        if name not in self.destinations and name not in extra:
            return _unknown_destination(rule, target, name, values)
        return None

    def with_destination_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> RoutingTable:
        """A new table whose destinations have some keys replaced (``retry`` / ``breaker`` merged key by key).

        E.g. ``{"customs": {"url": "http://127.0.0.1:53211/inbox"}}``. The result is checked like a file.
        """
        data = copy.deepcopy(dict(self._data))
        destinations = data.get("destinations") or {}
        for name, changes in overrides.items():
            if name not in destinations:
                raise ConfigError(f"{self.source}: override for destination {name!r}, which is not defined")
            merged = dict(destinations[name] or {})
            for key, value in changes.items():
                if key in _POLICY_KEYS and isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                    merged[key] = {**merged[key], **value}
                else:
                    merged[key] = value
            destinations[name] = merged
        return RoutingTable.from_mapping(data, source=self.source)

    def __repr__(self) -> str:
        return f"<RoutingTable {self.source}: {len(self._rules)} rules, {len(self.destinations)} destinations>"
