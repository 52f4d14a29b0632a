"""The one parser for untrusted XML: no DTD, no entities, no network, bounded depth.

Every message byte string enters the gateway through ``parse_untrusted``. Trusted local schema
files are loaded elsewhere (``gateway.validation``), so the two paths never share a parser.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from functools import lru_cache

from lxml import etree

from gateway.errors import ErrorCode, Rejected
from gateway.model import ParsedMessage

DEFAULT_MAX_DEPTH = 100

# A DOCTYPE can only appear in the prolog: after the XML declaration, comments and PIs. Looking for it
# in the first bytes lets us refuse DTDs (and so every entity trick) before libxml2 reads any of it.
_DOCTYPE = re.compile(rb"<!DOCTYPE", re.IGNORECASE)
_PROLOG_SCAN = 64 * 1024


def _parser() -> etree.XMLParser:
    # huge_tree: libxml2's default caps a text node at 10 MB, which refuses a real certificate with an
    # attachment (an ePhyto AttachmentBinaryObject holding an 8 MB PDF is 11 MB of base64). The caps it
    # lifts guard against entity expansion and unbounded input; here there are no DTDs or entities
    # (refused above), the body size is limited before parsing (max_body_bytes) and depth is checked below.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=True,
        remove_comments=False,
        strip_cdata=False,
    )


# lxml parsers are not thread-safe but are safe to reuse within one thread; ingress parses on the loop thread.
_PARSER = _parser()


# For re-reading our own serialisation: lxml's defaults (CDATA becomes text, as signxml's copies do,
# which keeps our signatures byte-identical to signxml's) but big text nodes allowed.
_COPY_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True)


def copy_element(element: etree._Element) -> etree._Element:
    """A detached copy of ``element``, by serialising and re-reading it: unlike ``deepcopy`` it keeps
    namespace declarations exactly as they were."""
    return etree.fromstring(etree.tostring(element), parser=_COPY_PARSER)


@lru_cache(maxsize=4)
def _deeper_than(max_depth: int) -> etree.XPath:
    # An XPath of max_depth + 1 child steps selects nothing unless the tree is deeper than max_depth.
    return etree.XPath("boolean(/" + "/".join(["*"] * (max_depth + 1)) + ")")


def _depth_exceeds(root: etree._Element, max_depth: int) -> bool:
    return bool(_deeper_than(max_depth)(root))


def parse_untrusted(raw: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> etree._Element:
    """Parse untrusted bytes into an element tree, or raise ``Rejected(MALFORMED_XML)`` naming the fault."""
    if not raw.strip():
        raise Rejected(ErrorCode.MALFORMED_XML, "the request body is empty", "line 1")
    head = raw[:_PROLOG_SCAN]
    match = _DOCTYPE.search(head)
    if match:
        line = head.count(b"\n", 0, match.start()) + 1
        raise Rejected(ErrorCode.MALFORMED_XML, "DOCTYPE declarations (DTDs, entities) are not allowed", f"line {line}")
    try:
        root = etree.fromstring(raw, parser=_PARSER)
    except etree.XMLSyntaxError as exc:
        line, column = exc.position if exc.position else (exc.lineno or 0, 0)
        raise Rejected(
            ErrorCode.MALFORMED_XML, f"not well-formed XML: {exc.msg}", f"line {line}, column {column}"
        ) from exc
    docinfo = root.getroottree().docinfo
    if docinfo.internalDTD is not None or docinfo.externalDTD is not None or docinfo.doctype:
        raise Rejected(ErrorCode.MALFORMED_XML, "DOCTYPE declarations (DTDs, entities) are not allowed", "line 1")
    for entity in root.iter(etree.Entity):
        raise Rejected(ErrorCode.MALFORMED_XML, "entity references are not allowed", f"line {entity.sourceline}")
    if _depth_exceeds(root, max_depth):
        raise Rejected(ErrorCode.MALFORMED_XML, f"the document is nested deeper than {max_depth} elements", "/")
    return root


def parse_message(raw: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> ParsedMessage:
    """First ingress stage: bytes -> ``ParsedMessage`` (hash of the exact bytes kept for audit and receipts)."""
    root = parse_untrusted(raw, max_depth=max_depth)
    return ParsedMessage(
        raw=raw,
        root=root,
        digest=hashlib.sha256(raw).hexdigest(),
        received_at=datetime.now(UTC),
    )
