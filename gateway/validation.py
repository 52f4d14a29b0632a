"""The document-type registry, compiled schemas, and precise schema error reports.

Two validators, one verdict:

* the fast path is libxml2 (``lxml.etree.XMLSchema``), compiled once per schema set when a
  ``Validator`` is built; a valid message never touches anything slower;
* when libxml2 says *invalid*, ``xmlschema`` re-validates to write the report: its first error's
  XPath becomes ``Rejected.location`` and its reason (plus the line) the detail. If xmlschema finds
  nothing wrong, the message is still refused with libxml2's own message (fail closed) and the
  disagreement is logged.

Schemas are trusted local files, but every file they pull in must lie under the schema folder: lxml
loads through a resolver that refuses anything else (and no network), xmlschema through an opener
that does the same. Messages never come near this code's parsers; they arrive as trees from
``gateway.security.parse``, and ``xsi:schemaLocation`` hints in them are ignored.
"""

from __future__ import annotations

import re
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit
from urllib.request import url2pathname

import structlog
import xmlschema
import yaml
from lxml import etree

from gateway.envelope import content_document
from gateway.errors import ConfigError, ErrorCode, Rejected
from gateway.model import ValidatedMessage, VerifiedMessage
from schemas import SCHEMAS_DIR

log = structlog.get_logger("nsw.validation")

FUNCTION_CODES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "01": "new",
        "02": "amend",
        "03": "cancel",
        "04": "supplement",
        "11": "confirm completed",
        "20": "agency requests amendment",
        "21": "validation reject",
        "22": "reject dossier",
        "23": "accept dossier",
        "24": "confirm cancel",
        "25": "procedure completed",
        "26": "query result",
        "27": "approval",
        "29": "processing result",
        "30": "processing result",
        "99": "system acknowledgement",
    }
)
ROLES: Final = frozenset({"trader", "agency", "customs", "nsw", "peer"})
DEFAULT_REGISTRY: Final = SCHEMAS_DIR / "registry.yaml"
ENVELOPE_SCHEMA: Final = SCHEMAS_DIR / "envelope.xsd"
DOCUMENT_TYPE_LOCATION: Final = "/Envelope/Header/Subject/documentType"

_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]*")  # envelope.xsd DocumentTypeName
_CLARK = re.compile(r"\{[^{}\s]+\}[A-Za-z_][\w.\-]*")
_ENTRY_KEYS = frozenset({"description", "root", "schema", "functions", "body_signature_required"})
_XS = "http://www.w3.org/2001/XMLSchema"


@dataclass(frozen=True, slots=True)
class DocumentType:
    name: str
    description: str
    root: str  # Clark name of the business document's root element
    schema_files: tuple[Path, ...]  # absolute; loaded together, in this order
    functions: Mapping[str, frozenset[str]]  # function code -> roles allowed to send it
    # function code -> roles that must send it with the issuing authority's signature over Body/Content
    body_signature_required: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))

    def roles_for(self, function: str) -> frozenset[str]:
        """The party roles that may send ``function`` of this type; empty if nobody may."""
        return self.functions.get(function, frozenset())

    def needs_body_signature(self, function: str, role: str) -> bool:
        """Whether a ``role`` sending ``function`` of this type must include the Body signature."""
        return role in self.body_signature_required.get(function, frozenset())


class DocumentTypeRegistry:
    """The document types a gateway accepts, read once from ``registry.yaml``."""

    def __init__(self, types: Mapping[str, DocumentType], path: Path) -> None:
        self.path = path
        self.base_dir = path.parent  # schema paths in the file are relative to it
        self._types = dict(types)

    @classmethod
    def load(cls, path: Path | None = None) -> DocumentTypeRegistry:
        """Read and check a registry file (default ``schemas/registry.yaml``); ``ConfigError`` names the entry."""
        path = (path or DEFAULT_REGISTRY).resolve()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read the document-type registry: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != 1:
            raise ConfigError(f"{path}: expected a mapping with 'version: 1' and 'document_types'")
        unknown = set(data) - {"version", "document_types"}
        if unknown:
            raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}")
        entries = data.get("document_types")
        if not isinstance(entries, dict) or not entries:
            raise ConfigError(f"{path}: 'document_types' must map names to entries")
        types = {str(name): _document_type(path, str(name), entry) for name, entry in entries.items()}
        return cls(types, path)

    def get(self, name: str) -> DocumentType:
        try:
            return self._types[name]
        except KeyError:
            raise Rejected(
                ErrorCode.UNKNOWN_DOCUMENT_TYPE,
                f"unknown document type {name!r}: the gateway has no schema for it",
                DOCUMENT_TYPE_LOCATION,
            ) from None

    def by_root(self, clark: str) -> list[DocumentType]:
        """Every type whose documents have this root element (several types may share one), by name."""
        return sorted((t for t in self._types.values() if t.root == clark), key=lambda t: t.name)

    def names(self) -> list[str]:
        return sorted(self._types)

    def __iter__(self) -> Iterator[DocumentType]:
        return iter([self._types[name] for name in self.names()])

    def __len__(self) -> int:
        return len(self._types)

    def __contains__(self, name: object) -> bool:
        return name in self._types


def _document_type(path: Path, name: str, entry: Any) -> DocumentType:
    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{path}: document type {name!r}: {problem}")

    if not _NAME.fullmatch(name):
        raise fail("the name must match [a-z0-9][a-z0-9.-]* (it travels in the envelope's documentType)")
    if not isinstance(entry, dict):
        raise fail("must be a mapping with root, schema and functions")
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise fail(f"unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    root = entry.get("root")
    if not isinstance(root, str) or not _CLARK.fullmatch(root):
        raise fail(f"root must be a Clark name such as '{{urn:nsw:licence:1}}ImportLicence', got {root!r}")
    functions = _functions(entry.get("functions"), fail)
    required = _body_signature_required(entry.get("body_signature_required"), functions, fail)
    return DocumentType(
        name=name,
        description=str(entry.get("description") or ""),
        root=root,
        schema_files=_schema_files(path.parent, entry.get("schema"), fail),
        functions=functions,
        body_signature_required=required,
    )


def _schema_files(base: Path, value: Any, fail: Any) -> tuple[Path, ...]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise fail("schema must be a file name or a non-empty list of file names")
    files = tuple((base / name).resolve() for name in names)
    for name, file in zip(names, files, strict=True):
        if not file.is_file():
            raise fail(f"schema file {name!r} does not exist (looked for {file})")
    return files


def _functions(value: Any, fail: Any) -> Mapping[str, frozenset[str]]:
    if not isinstance(value, dict) or not value:
        raise fail("functions must map function codes to lists of roles")
    table: dict[str, frozenset[str]] = {}
    for code, roles in value.items():
        if not isinstance(code, str):
            raise fail(f"function code {code!r} must be quoted (YAML reads 01 as the number 1)")
        if code not in FUNCTION_CODES:
            raise fail(f"unknown function code {code!r} (VNSW codes: {', '.join(FUNCTION_CODES)})")
        if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
            raise fail(f"function {code}: roles must be a non-empty list")
        bad = sorted(set(roles) - ROLES)
        if bad:
            raise fail(f"function {code}: unknown role(s) {', '.join(bad)} (roles: {', '.join(sorted(ROLES))})")
        table[code] = frozenset(roles)
    return MappingProxyType(table)


def _body_signature_required(
    value: Any, functions: Mapping[str, frozenset[str]], fail: Any
) -> Mapping[str, frozenset[str]]:
    """Same shape as ``functions``; each role listed must also be allowed to send that function."""
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict) or not value:
        raise fail("body_signature_required must map function codes to lists of roles")
    table = _functions(value, lambda problem: fail(f"body_signature_required: {problem}"))
    for code, roles in table.items():
        stray = sorted(roles - functions.get(code, frozenset()))
        if stray:
            raise fail(f"body_signature_required: function {code}: {', '.join(stray)} may not send it (see functions)")
    return table


# -- schema sets: loading confined to one folder, compiled once per process ------------------------------


@dataclass(frozen=True, slots=True)
class SchemaSet:
    """The files of one schema (loaded together, in order) and the folder everything they load must lie in."""

    files: tuple[Path, ...]
    sandbox: Path  # every file the set pulls in must lie below this folder
    stamp: tuple[tuple[int, int], ...]  # (mtime_ns, size) per file: an edited schema is compiled again

    @classmethod
    def of(cls, files: Sequence[Path], sandbox: Path) -> SchemaSet:
        resolved = tuple(f.resolve() for f in files)
        for file in resolved:
            if not file.is_relative_to(sandbox):
                raise ConfigError(f"schema {file} lies outside the schema folder {sandbox}")
        return cls(resolved, sandbox, tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in resolved))

    @property
    def label(self) -> str:
        return " + ".join(str(f.relative_to(self.sandbox)) for f in self.files)


def _local_path(url: str) -> Path | None:
    """The local file a URL or path names, or None for anything that is not a local file."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(url2pathname(parts.path))
    if parts.scheme == "" and url:
        return Path(url)
    return None


def _inside(url: str, sandbox: Path) -> bool:
    path = _local_path(url)
    return path is not None and path.is_absolute() and path.resolve().is_relative_to(sandbox)


class _ConfinedResolver(etree.Resolver):  # type: ignore[misc]
    """lxml: refuse to load any schema document from outside the sandbox."""

    def __init__(self, sandbox: Path) -> None:
        super().__init__()
        self.sandbox = sandbox
        self.refused: list[str] = []

    def resolve(self, system_url: str | None, public_id: str | None, context: object) -> Any:
        if system_url is not None and not _inside(system_url, self.sandbox):
            self.refused.append(system_url)
            return self.resolve_string("<refused/>", context)  # not a schema: compilation fails
        return None  # libxml2 loads it (no_network=True)


class _ConfinedFileHandler(urllib.request.FileHandler):
    """xmlschema: open local files below the sandbox only (the opener has no network handlers at all)."""

    def __init__(self, sandbox: Path) -> None:
        super().__init__()
        self.sandbox = sandbox
        self.refused: list[str] = []

    def file_open(self, req: urllib.request.Request) -> Any:
        if not _inside(req.full_url, self.sandbox):
            self.refused.append(req.full_url)
            raise urllib.error.URLError(f"outside the schema folder {self.sandbox}")
        return super().file_open(req)


def _refused(sset: SchemaSet, urls: Sequence[str]) -> ConfigError:
    return ConfigError(f"schema {sset.label} tries to load {urls[0]}, outside the schema folder {sset.sandbox}")


def _set_wrapper(sset: SchemaSet) -> bytes:
    """libxml2 compiles one document: a schema that imports each file of a multi-file set, in order."""
    root = etree.Element(f"{{{_XS}}}schema", nsmap={"xs": _XS})
    seen: set[str] = set()
    for file in sset.files:
        namespace = etree.parse(str(file), etree.XMLParser(no_network=True)).getroot().get("targetNamespace")
        if namespace is None or namespace in seen:
            raise ConfigError(
                f"schema set {sset.label}: lxml loads a list of files only when each has its own "
                "targetNamespace; write a wrapper XSD that includes them instead"
            )
        seen.add(namespace)
        etree.SubElement(root, f"{{{_XS}}}import", namespace=namespace, schemaLocation=file.as_uri())
    return bytes(etree.tostring(root))


def _compile_lxml(sset: SchemaSet) -> etree.XMLSchema:
    resolver = _ConfinedResolver(sset.sandbox)
    parser = etree.XMLParser(no_network=True)
    parser.resolvers.add(resolver)
    try:
        if len(sset.files) == 1:
            doc = etree.parse(str(sset.files[0]), parser)  # trusted schema file; loads confined
        else:
            base = str(sset.sandbox / "schema-set.xsd")
            doc = etree.ElementTree(etree.fromstring(_set_wrapper(sset), parser, base_url=base))
        schema = etree.XMLSchema(doc)
    except (etree.XMLSchemaParseError, etree.XMLSyntaxError, OSError) as exc:
        if resolver.refused:
            raise _refused(sset, resolver.refused) from exc
        raise ConfigError(f"schema {sset.label} does not compile: {exc}") from exc
    if resolver.refused:
        raise _refused(sset, resolver.refused)
    return schema


def _build_xmlschema(sset: SchemaSet) -> xmlschema.XMLSchema:
    # allow="sandbox" would be the obvious choice, but xmlschema confines every imported file to the folder
    # of the file that imports it, so real sets (customs/wrapper_submit.xsd -> ../wco/...) cannot load.
    # "local" forbids remote URLs; the opener confines local ones to the whole schema folder.
    handler = _ConfinedFileHandler(sset.sandbox)
    opener = urllib.request.OpenerDirector()
    opener.add_handler(handler)
    opener.add_handler(urllib.request.UnknownHandler())
    sources: list[Any] = [str(f) for f in sset.files]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            schema = xmlschema.XMLSchema(sources if len(sources) > 1 else sources[0], allow="local", opener=opener)
        except (xmlschema.XMLSchemaException, OSError) as exc:
            raise _load_failure(sset, handler.refused, _failed_loads(caught), exc) from exc
    failed = _failed_loads(caught)
    if handler.refused or failed:
        raise _load_failure(sset, handler.refused, failed, None)
    for other in caught:
        if other not in failed:
            log.warning("schema_load_warning", schema=sset.label, warning=str(other.message))
    return schema


def _failed_loads(caught: Sequence[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    kinds = (xmlschema.XMLSchemaImportWarning, xmlschema.XMLSchemaIncludeWarning)
    return [w for w in caught if issubclass(w.category, kinds)]


def _load_failure(
    sset: SchemaSet, refused: Sequence[str], caught: Sequence[warnings.WarningMessage], exc: Exception | None
) -> ConfigError:
    if refused:
        return _refused(sset, refused)
    if caught:  # an import that failed (e.g. a remote URL, blocked by allow="local"): the set is incomplete
        return ConfigError(f"schema {sset.label} cannot load all it imports: {caught[0].message}")
    return ConfigError(f"schema {sset.label} does not load in xmlschema: {exc}")


# One compiled schema per schema set per process: tests start many gateways, each with its own Validator.
_LXML_SCHEMAS: dict[SchemaSet, etree.XMLSchema | ConfigError] = {}
_XMLSCHEMAS: dict[SchemaSet, xmlschema.XMLSchema | ConfigError] = {}
_CACHE_LOCK = threading.Lock()
_BUILD_LOCKS: dict[SchemaSet, threading.Lock] = {}


def _cached(cache: dict[SchemaSet, Any], sset: SchemaSet, build: Any) -> Any:
    found = cache.get(sset)
    if found is None:
        with _CACHE_LOCK:
            lock = _BUILD_LOCKS.setdefault(sset, threading.Lock())
        with lock:  # one build per set; other sets build in parallel
            if sset not in cache:
                try:
                    cache[sset] = build(sset)
                except ConfigError as exc:  # remembered: a broken set must not be rebuilt on every message
                    cache[sset] = exc
            found = cache[sset]
    if isinstance(found, ConfigError):
        raise found
    return found


def lxml_schema(sset: SchemaSet) -> etree.XMLSchema:
    """The fast-path validator of a set, compiled once per process; ``ConfigError`` if it does not compile."""
    return _cached(_LXML_SCHEMAS, sset, _compile_lxml)


def xmlschema_schema(sset: SchemaSet) -> xmlschema.XMLSchema:
    """The error-report schema of a set, built on first use and kept; ``ConfigError`` if it does not load."""
    return _cached(_XMLSCHEMAS, sset, _build_xmlschema)  # type: ignore[no-any-return]


# -- validation ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SchemaIssue:
    """One schema error as xmlschema reports it: ``path`` is an XPath relative to the validated element."""

    path: str
    reason: str
    line: int | None
    value: str | None = None  # the offending text, for a simple-type error

    def text(self) -> str:
        where = [f"value {self.value[:80]!r}"] if self.value is not None else []
        where += [f"line {self.line}"] if self.line else []
        return self.reason + (f" ({', '.join(where)})" if where else "")


def first_issue(schema: xmlschema.XMLSchema, element: etree._Element) -> SchemaIssue | None:
    """xmlschema's first error for ``element`` (validated as a document root), or None if it is valid."""
    # the in-scope prefixes, so that a document inside the envelope is written with the prefixes it was sent
    # with, even those declared on the Envelope (xmlschema alone would fall back to {namespace}name steps)
    namespaces = {prefix or "": uri for prefix, uri in element.nsmap.items()}
    for error in schema.iter_errors(element, use_location_hints=False, namespaces=namespaces):
        value = error.obj if isinstance(error.obj, str) else None
        return SchemaIssue(error.path or "/", error.reason or error.message, error.sourceline, value)
    return None


def root_step(element: etree._Element) -> str:
    """``/prefix:local`` for a root element, written the way xmlschema writes its paths."""
    qname = etree.QName(element)
    prefix = next((p for p, ns in element.nsmap.items() if p and ns == qname.namespace), None)
    return f"/{prefix}:{qname.localname}" if prefix else f"/{qname.localname}"


class Validator:
    """Envelope and business-document validation; build one at start-up (it compiles every schema)."""

    def __init__(self, registry: DocumentTypeRegistry, schemas_dir: Path | None = None) -> None:
        """``schemas_dir`` confines what the registry's schemas may load; default: the registry file's folder."""
        self.registry = registry
        self.schemas_dir = (schemas_dir or registry.base_dir).resolve()
        self._envelope = SchemaSet.of([ENVELOPE_SCHEMA], SCHEMAS_DIR)
        self._envelope_lxml = lxml_schema(self._envelope)
        self._sets: dict[str, SchemaSet] = {}
        self._lxml: dict[str, etree.XMLSchema] = {}
        for doc_type in registry:
            where = f"{registry.path}: document type {doc_type.name!r}"
            try:
                sset = SchemaSet.of(doc_type.schema_files, self.schemas_dir)
                compiled = lxml_schema(sset)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
            if not _declares_root(compiled, doc_type.root):
                raise ConfigError(f"{where}: root {doc_type.root} is not a global element of {sset.label}")
            self._sets[doc_type.name] = sset
            self._lxml[doc_type.name] = compiled

    def validate(self, verified: VerifiedMessage) -> ValidatedMessage:
        """Envelope XSD, then the Content's single document against the header's documentType."""
        self.validate_envelope(verified.envelope)
        document = content_document(verified.envelope)
        doc_type = self.validate_document(verified.header.document_type, document)
        return ValidatedMessage(verified=verified, document_type=doc_type.name, content=document)

    def validate_envelope(self, envelope: etree._Element) -> None:
        if self._envelope_lxml.validate(envelope):
            return
        raise self._invalid(self._envelope, self._envelope_lxml, envelope, "envelope")

    def validate_document(self, document_type: str, document: etree._Element) -> DocumentType:
        doc_type = self.registry.get(document_type)
        compiled = self._lxml[doc_type.name]
        if document.tag != doc_type.root:
            raise self._wrong_root(doc_type, document)
        if compiled.validate(document):
            return doc_type
        raise self._invalid(self._sets[doc_type.name], compiled, document, f"document type {doc_type.name}")

    def warm_up(self) -> None:
        """Build every xmlschema report schema now instead of on each type's first rejection (CLI checks, tests)."""
        xmlschema_schema(self._envelope)
        for sset in self._sets.values():
            xmlschema_schema(sset)

    def _issue(self, sset: SchemaSet, element: etree._Element) -> SchemaIssue | None:
        try:
            return first_issue(xmlschema_schema(sset), element)
        except ConfigError as exc:  # libxml2 compiled it, xmlschema cannot: still refuse, with libxml2's words
            log.exception("schema_report_unavailable", schema=sset.label, error=str(exc))
            return None

    def _wrong_root(self, doc_type: DocumentType, document: etree._Element) -> Rejected:
        issue = self._issue(self._sets[doc_type.name], document)
        detail = f"document type {doc_type.name}: the root element is {document.tag}, expected {doc_type.root}"
        if issue is not None:
            return Rejected(ErrorCode.SCHEMA_INVALID, f"{detail}: {issue.text()}", issue.path)
        # a global element of the same schema set, but another document type's (e.g. ExportLicence)
        return Rejected(ErrorCode.SCHEMA_INVALID, detail, root_step(document))

    def _invalid(self, sset: SchemaSet, compiled: etree.XMLSchema, element: etree._Element, what: str) -> Rejected:
        issue = self._issue(sset, element)
        if issue is not None:
            return Rejected(ErrorCode.SCHEMA_INVALID, f"{what}: {issue.text()}", issue.path)
        # xmlschema finds nothing wrong, or cannot say: refuse anyway (fail closed) with libxml2's own words.
        # A private compilation, because a shared schema's error_log is cleared by every other thread's call.
        private = _compile_lxml(sset)
        private.validate(element)
        errors = private.error_log.filter_from_errors()
        message, line = (errors[0].message, errors[0].line) if errors else ("not valid", 0)
        log.warning("schema_validators_disagree", schema=sset.label, what=what, lxml_error=message, line=line)
        return Rejected(ErrorCode.SCHEMA_INVALID, f"{what}: {message} (line {line})", f"line {line}")


def _declares_root(schema: etree.XMLSchema, root: str) -> bool:
    # An empty element fails, but the log says why. The log is shared with other threads' calls; a clear in
    # between only hides this start-up check's answer, and the fast path never logs CVC_ELT_1 (roots are
    # compared before it validates).
    schema.validate(etree.Element(root))
    return not any(e.type_name == "SCHEMAV_CVC_ELT_1" for e in schema.error_log)
