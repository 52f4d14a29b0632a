"""Business fields: XPaths compiled once at load, evaluated lazily per message.

A field's XPath is evaluated with the business document's root element (the single child of
``Body/Content``) as the context node, so it is written relative to it: ``string(eco:importingCountry)``,
``eco:items/eco:item/eco:hsCode``. Absolute paths are refused at load: the document usually sits inside
the envelope tree, where ``/`` is the Envelope, so they would silently never select anything.

Whatever the XPath returns becomes a tuple of non-empty, stripped strings: a string or number gives
at most one, a node-set gives one per node (element string-value, attribute or text), duplicates dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lxml import etree

from routing.conditions import HEADER_SUBJECTS, Values

FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_LITERAL = re.compile(r"\"[^\"]*\"|'[^']*'")
# A QName prefix: "p:name" or "p:*", but not an axis ("child::").
_PREFIX = re.compile(r"(?<![\w.:-])([A-Za-z_][\w.-]*):(?=[A-Za-z_*])")
# A location path starting at the root: at the start, or after "(", "[", ",", "|", a comparison, or a keyword.
_ABSOLUTE = re.compile(r"(?:^|[(\[,|=<>+]|\b(?:and|or|div|mod)\s)\s*/")
_PROBE = etree.Element("probe")


class FieldSpecError(ValueError):
    """A field written wrongly; the loader adds the file and document type to the message."""


@dataclass(frozen=True, slots=True)
class FieldDef:
    name: str
    expression: str  # as written in the rules file
    xpath: etree.XPath


def compile_field(name: str, expression: Any, namespaces: Mapping[str, str]) -> FieldDef:
    if not FIELD_NAME.match(name):
        raise FieldSpecError(f"field name {name!r} must be letters, digits and _ (it is used in {{templates}})")
    if name in HEADER_SUBJECTS:
        raise FieldSpecError(f"field name {name!r} is a header field's name; {{{name}}} in a template reads the header")
    if not isinstance(expression, str) or not expression.strip():
        raise FieldSpecError(f"field {name!r}: the XPath must be a non-empty string, got {expression!r}")
    code = _LITERAL.sub("''", expression)
    undeclared = sorted({p for p in _PREFIX.findall(code) if p not in namespaces})
    if undeclared:
        raise FieldSpecError(
            f"field {name!r}: XPath {expression!r} uses undeclared namespace prefix(es) "
            f"{', '.join(undeclared)} (declare them under namespaces:)"
        )
    if _ABSOLUTE.search(code):
        raise FieldSpecError(
            f"field {name!r}: XPath {expression!r} is absolute; write it relative to the business "
            "document's root element (e.g. string(eco:importingCountry), not "
            "string(/eco:CertificateOfOrigin/eco:importingCountry))"
        )
    try:
        xpath = etree.XPath(expression, namespaces=dict(namespaces), smart_strings=False)
        xpath(_PROBE)  # catches what only evaluation reports: unknown functions, bad arity
    except etree.XPathError as exc:
        raise FieldSpecError(f"field {name!r}: XPath {expression!r} does not compile: {exc}") from exc
    return FieldDef(name, expression, xpath)


def _node_text(node: Any) -> str:
    if isinstance(node, str):
        return node
    if isinstance(node, etree._Element):
        if len(node) == 0:  # a leaf (the usual case, e.g. an hsCode): its text, without itertext's cost
            return node.text or ""
        return "".join(node.itertext())
    return str(node)


def normalize(result: Any) -> Values:
    """An XPath result as a tuple of non-empty stripped strings."""
    if isinstance(result, bool):
        return ("true",) if result else ("false",)
    if isinstance(result, float):
        if math.isnan(result) or math.isinf(result):
            return ()
        return (str(int(result)) if result.is_integer() else repr(result),)
    if isinstance(result, str):
        text = result.strip()
        return (text,) if text else ()
    values: dict[str, None] = {}
    for node in result:
        text = _node_text(node).strip()
        if text:
            values[text] = None
    return tuple(values)


class FieldValues:
    """The business fields of one message, each extracted on first use and then kept."""

    __slots__ = ("_cache", "_defs", "_document", "document_type")

    def __init__(self, defs: Mapping[str, FieldDef], document: etree._Element, document_type: str) -> None:
        self._defs = defs
        self._document = document
        self._cache: dict[str, Values] = {}
        self.document_type = document_type

    def get(self, name: str) -> Values:
        try:
            return self._cache[name]
        except KeyError:
            pass
        definition = self._defs.get(name)
        values = normalize(definition.xpath(self._document)) if definition is not None else ()
        self._cache[name] = values
        return values

    def defined(self, name: str) -> bool:
        return name in self._defs

    def expression(self, name: str) -> str | None:
        definition = self._defs.get(name)
        return definition.expression if definition is not None else None
