"""Reading and checking the routing rules file. Every problem is a ``ConfigError`` naming the file and the
rule, destination or field at fault; nothing half-checked is ever returned.

File shape (see ``routing/default.yaml`` for a full example)::

    version: 1
    namespaces: {prefix: uri, ...}                      # prefixes usable in field XPaths
    fields: {documentType: {fieldName: XPath, ...}}     # business fields, relative to the document root
    destinations: {name: {adapter: kind, retry: {...}, breaker: {...}, <adapter options>...}}
    rules: [{name, description?, when?: {<header key>: cond, field: {name: cond}}, to: [...], stop?}]
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from gateway.errors import ConfigError
from gateway.policy import BreakerPolicy, RetryPolicy
from routing.conditions import HEADER_SUBJECTS, ConditionSpecError, parse_condition, positive_set
from routing.fields import FieldDef, FieldSpecError, compile_field
from routing.rules import Rule, Target, TargetSpecError, parse_target

VERSION = 1
TOP_LEVEL_KEYS = ("version", "namespaces", "fields", "destinations", "rules")
RULE_KEYS = ("name", "description", "when", "to", "stop")
WHEN_KEYS = (*HEADER_SUBJECTS, "field")
# Destination names become queue names: keep them to a safe alphabet. ":" is for "asw:<CC>".
DESTINATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*\Z")
NS_PREFIX = re.compile(r"[A-Za-z_][\w.-]*\Z")


@dataclass(frozen=True)
class DestinationConfig:
    """One destination: which adapter delivers to it, with what options and delivery policies."""

    name: str
    adapter: str
    options: Mapping[str, Any]  # every key of the destination except adapter, retry and breaker
    retry: RetryPolicy
    breaker: BreakerPolicy


@dataclass(frozen=True)
class CompiledConfig:
    destinations: Mapping[str, DestinationConfig]
    fields: Mapping[str, Mapping[str, FieldDef]]  # document type -> field name -> definition
    rules: tuple[Rule, ...]


# libyaml's parser when PyYAML was built with it: several times faster on a file of this size.
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_SafeLoader):  # type: ignore[misc,unused-ignore]  # no PyYAML stubs installed
    """SafeLoader that refuses a key repeated in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep)
        return mapping


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the routing rules: {exc.strerror or exc}") from exc
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def _mapping(value: Any, where: str, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {what} must be a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: {what} has a non-string key {key!r} (quote it)")
    return value


def _int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} must be a whole number >= {minimum}, got {value!r}")
    return value


def _seconds(value: Any, where: str, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:  # noqa: PLR0124 -- NaN
        raise ConfigError(f"{where} must be a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero) or value == float("inf"):
        raise ConfigError(f"{where} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value!r}")
    return float(value)


def _policy_keys(spec: Mapping[str, Any], policy: type[Any], where: str) -> None:
    known = [f.name for f in fields(policy)]
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})")


def _retry(value: Any, where: str) -> RetryPolicy:
    spec = _mapping(value, where, "retry")
    _policy_keys(spec, RetryPolicy, f"{where}: retry")
    default = RetryPolicy()
    tiers = spec.get("tiers", list(default.tiers))
    if not isinstance(tiers, list) or not tiers:
        raise ConfigError(f"{where}: retry.tiers must be a non-empty list of seconds, got {tiers!r}")
    return RetryPolicy(
        in_process_attempts=_int(
            spec.get("in_process_attempts", default.in_process_attempts), f"{where}: retry.in_process_attempts", 1
        ),
        in_process_wait=_seconds(
            spec.get("in_process_wait", default.in_process_wait), f"{where}: retry.in_process_wait", allow_zero=True
        ),
        tiers=tuple(_seconds(t, f"{where}: retry.tiers[{i}]", allow_zero=False) for i, t in enumerate(tiers)),
        max_attempts=_int(spec.get("max_attempts", default.max_attempts), f"{where}: retry.max_attempts", 1),
        max_age=_seconds(spec.get("max_age", default.max_age), f"{where}: retry.max_age", allow_zero=False),
    )


def _breaker(value: Any, where: str) -> BreakerPolicy:
    spec = _mapping(value, where, "breaker")
    _policy_keys(spec, BreakerPolicy, f"{where}: breaker")
    default = BreakerPolicy()
    return BreakerPolicy(
        failure_threshold=_int(
            spec.get("failure_threshold", default.failure_threshold), f"{where}: breaker.failure_threshold", 1
        ),
        reset_after=_seconds(
            spec.get("reset_after", default.reset_after), f"{where}: breaker.reset_after", allow_zero=False
        ),
    )


def _destination(name: str, value: Any, source: str) -> DestinationConfig:
    where = f"{source}: destination {name!r}"
    if not DESTINATION_NAME.match(name):
        raise ConfigError(f"{where}: a name may hold only letters, digits and . _ : - (it names queues)")
    spec = _mapping(value, where, "the destination")
    adapter = spec.get("adapter")
    if not isinstance(adapter, str) or not adapter:
        raise ConfigError(f"{where}: has no adapter (e.g. adapter: http)")
    options = {k: v for k, v in spec.items() if k not in ("adapter", "retry", "breaker")}
    return DestinationConfig(
        name=name,
        adapter=adapter,
        options=MappingProxyType(options),
        retry=_retry(spec.get("retry"), where),
        breaker=_breaker(spec.get("breaker"), where),
    )


def _namespaces(value: Any, source: str) -> dict[str, str]:
    spec = _mapping(value, source, "namespaces")
    for prefix, uri in spec.items():
        if not NS_PREFIX.match(prefix):
            raise ConfigError(f"{source}: namespace prefix {prefix!r} is not a valid XML prefix")
        if not isinstance(uri, str) or not uri:
            raise ConfigError(f"{source}: namespace {prefix!r} must be a URI string, got {uri!r}")
    return dict(spec)


def _fields(value: Any, namespaces: Mapping[str, str], source: str) -> dict[str, Mapping[str, FieldDef]]:
    compiled: dict[str, Mapping[str, FieldDef]] = {}
    for document_type, defs in _mapping(value, source, "fields").items():
        where = f"{source}: fields of {document_type!r}"
        try:
            compiled[document_type] = MappingProxyType(
                {name: compile_field(name, expr, namespaces) for name, expr in _mapping(defs, where, "").items()}
            )
        except FieldSpecError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return compiled


def _check_field_use(
    rule: Rule, document_types: frozenset[str] | None, field_defs: Mapping[str, Mapping[str, FieldDef]], where: str
) -> None:
    for name in sorted(rule.fields):
        if document_types is None:
            if not any(name in defs for defs in field_defs.values()):
                raise ConfigError(f"{where}: uses field {name!r}, which no document type defines under fields:")
            continue
        for document_type in sorted(document_types):
            if name not in field_defs.get(document_type, {}):
                raise ConfigError(
                    f"{where}: uses field {name!r}, which is not defined for document type {document_type!r} "
                    f"(add it under fields: {document_type}:)"
                )


def _rule(
    index: int,
    value: Any,
    configured: frozenset[str],
    field_defs: Mapping[str, Mapping[str, FieldDef]],
    source: str,
) -> Rule:
    spec = _mapping(value, f"{source}: rule #{index}", "a rule")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: rule #{index} has no name")
    where = f"{source}: rule {name!r}"
    unknown = sorted(set(spec) - set(RULE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(RULE_KEYS)})")
    when = _mapping(spec.get("when"), where, "when")
    unknown = sorted(set(when) - set(WHEN_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown condition key(s) {', '.join(unknown)} (known: {', '.join(WHEN_KEYS)})")
    to = spec.get("to")
    if to is None or to == []:
        raise ConfigError(f"{where}: has no 'to' (the destinations it routes to)")
    stop = spec.get("stop", False)
    if not isinstance(stop, bool):
        raise ConfigError(f"{where}: stop must be true or false, got {stop!r}")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{where}: description must be text")
    try:
        header = tuple(
            (HEADER_SUBJECTS[key], parse_condition(key, cond)) for key, cond in when.items() if key != "field"
        )
        field_conditions = tuple(
            (field, parse_condition(f"field {field}", cond))
            for field, cond in _mapping(when.get("field"), where, "when.field").items()
        )
        targets: tuple[Target, ...] = tuple(
            parse_target(item, name, configured) for item in (to if isinstance(to, list) else [to])
        )
    except (ConditionSpecError, TargetSpecError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    document_types = None
    for _, condition in header:
        if condition.subject == "documentType":
            document_types = positive_set(condition)
    rule = Rule(name, description, header, field_conditions, targets, stop, document_types)
    _check_field_use(rule, document_types, field_defs, where)
    return rule


def compile_config(data: Any, source: str) -> CompiledConfig:
    """Check and compile a parsed rules file."""
    top = _mapping(data, source, "the rules file")
    if not top:
        raise ConfigError(f"{source}: the rules file is empty")
    unknown = sorted(set(top) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {', '.join(unknown)} (known: {', '.join(TOP_LEVEL_KEYS)})"
        )
    if top.get("version") != VERSION:
        raise ConfigError(f"{source}: version must be {VERSION}, got {top.get('version')!r}")
    namespaces = _namespaces(top.get("namespaces"), source)
    field_defs = _fields(top.get("fields"), namespaces, source)
    destinations = {
        name: _destination(name, spec, source)
        for name, spec in _mapping(top.get("destinations"), source, "destinations").items()
    }
    if not destinations:
        raise ConfigError(f"{source}: no destinations are defined")
    rules_spec = top.get("rules")
    if not isinstance(rules_spec, list) or not rules_spec:
        raise ConfigError(f"{source}: rules must be a non-empty list")
    configured = frozenset(destinations)
    rules: list[Rule] = []
    names: set[str] = set()
    for index, spec in enumerate(rules_spec, start=1):
        rule = _rule(index, spec, configured, field_defs, source)
        if rule.name in names:
            raise ConfigError(f"{source}: rule {rule.name!r}: duplicate rule name (rule #{index})")
        names.add(rule.name)
        rules.append(rule)
    return CompiledConfig(MappingProxyType(destinations), MappingProxyType(field_defs), tuple(rules))
