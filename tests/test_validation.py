"""Document-type registry, the two validators, precise rejections, and confined schema loading."""

from __future__ import annotations

import http.server
import os
import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from structlog.testing import capture_logs

from gateway import validation
from gateway.envelope import content_document, parse_header
from gateway.errors import ConfigError, ErrorCode, Rejected
from gateway.model import BodySignature, VerifiedMessage
from gateway.samples import SAMPLE_DOCUMENT_TYPES, sample_document, sample_envelope
from gateway.security.parse import parse_untrusted
from gateway.validation import (
    DocumentTypeRegistry,
    SchemaSet,
    Validator,
    lxml_schema,
    xmlschema_schema,
)
from schemas import SCHEMAS_DIR

XS = "http://www.w3.org/2001/XMLSchema"


@pytest.fixture(scope="module")
def registry() -> DocumentTypeRegistry:
    return DocumentTypeRegistry.load()


@pytest.fixture(scope="module")
def validator(registry: DocumentTypeRegistry) -> Validator:
    return Validator(registry)


def reparse(element: etree._Element) -> etree._Element:
    """Through the hardened parser, pretty-printed, so line numbers mean something."""
    etree.indent(element)
    return parse_untrusted(etree.tostring(element))


def verified(envelope: etree._Element) -> VerifiedMessage:
    return VerifiedMessage(
        raw=b"",
        digest="0" * 64,
        received_at=datetime.now(UTC),
        envelope=envelope,
        header=parse_header(envelope),
        party=parse_header(envelope).sender.identity,
        signer=None,  # type: ignore[arg-type]  # validation never looks at the certificate
        signature_algorithm="ecdsa-sha256",
        legacy_algorithm=False,
        body_signature=BodySignature(present=False, valid=False),
    )


def rejection(call: Callable[[], object]) -> Rejected:
    with pytest.raises(Rejected) as raised:
        call()
    return raised.value


def line_of(root: etree._Element, xpath: str) -> int:
    return int(root.xpath(xpath, namespaces={"l": "urn:nsw:licence:1", "e": "urn:nsw:envelope:1"})[0].sourceline)


# -- valid messages ------------------------------------------------------------------------------------


@pytest.mark.parametrize("document_type", SAMPLE_DOCUMENT_TYPES)
def test_every_sample_envelope_validates(validator: Validator, document_type: str) -> None:
    envelope = reparse(sample_envelope(document_type))
    validated = validator.validate(verified(envelope))
    assert validated.document_type == document_type
    assert validated.content is content_document(envelope)
    assert validated.content.tag == validator.registry.get(document_type).root


def test_the_envelope_validates_with_and_without_body_signature(validator: Validator) -> None:
    envelope = sample_envelope("eco.atiga-form-d")
    body = envelope.find("{urn:nsw:envelope:1}Body")
    assert body is not None
    etree.SubElement(body, "{http://www.w3.org/2000/09/xmldsig#}Signature")
    validator.validate_envelope(envelope)
    etree.SubElement(envelope, "{http://www.w3.org/2000/09/xmldsig#}Signature")  # a SystemSignature left in
    validator.validate_envelope(envelope)


def test_a_document_using_a_prefix_declared_on_the_envelope_validates(validator: Validator) -> None:
    document = etree.tostring(sample_document("licence.import")).decode().replace(' xmlns="urn:nsw:licence:1"', "")
    document = re.sub(r"<(/?)(\w+)", r"<\1l:\2", document)  # every element as l:name, l declared nowhere
    raw = etree.tostring(sample_envelope("licence.import")).decode()
    raw = raw[: raw.index("<ImportLicence")] + document + raw[raw.index("</ImportLicence>") + 16 :]
    raw = raw.replace("<Envelope ", '<Envelope xmlns:l="urn:nsw:licence:1" ')
    envelope = parse_untrusted(raw.encode())
    validator.validate_envelope(envelope)
    licence = content_document(envelope)
    validator.validate_document("licence.import", licence)
    etree.strip_elements(licence, "{urn:nsw:licence:1}hsCode")
    where = rejection(lambda: validator.validate_document("licence.import", licence)).location
    assert where == "/l:ImportLicence/l:items/l:item"  # the prefixes the sender used


# -- rejections: the exact xmlschema path, relative to the document ---------------------------------


def test_a_missing_hs_code_is_located_by_xpath_and_line(validator: Validator) -> None:
    envelope = reparse(sample_envelope("licence.import"))
    etree.strip_elements(envelope, "{urn:nsw:licence:1}hsCode")
    document = content_document(envelope)
    error = rejection(lambda: validator.validate_document("licence.import", document))
    assert error.code == ErrorCode.SCHEMA_INVALID
    assert error.http_status == 422
    assert error.location == "/ImportLicence/items/item"
    assert error.detail.startswith("document type licence.import: Unexpected child with tag")
    assert "hsCode' expected" in error.detail
    assert error.detail.endswith(f"hsCode' expected. (line {line_of(envelope, '//l:items/l:item')})")


def test_the_second_of_several_items_is_indexed_in_the_path(validator: Validator) -> None:
    document = sample_document("eco.atiga-form-d")
    hs_codes = document.findall("{*}items/{*}item/{*}hsCode")
    hs_codes[1].text = "0813"  # Form D wants at least six digits
    error = rejection(lambda: validator.validate_document("eco.atiga-form-d", document))
    assert error.location == "/CertificateOfOrigin/items/item[2]/hsCode"
    assert error.detail.endswith("doesn't match any pattern of ['[0-9]{6,10}'] (value '0813')")


def test_an_invalid_header_field_is_located_in_the_envelope(validator: Validator) -> None:
    envelope = reparse(sample_envelope("licence.import", function="1"))
    error = rejection(lambda: validator.validate(verified(envelope)))
    assert error.code == ErrorCode.SCHEMA_INVALID
    assert error.location == "/Envelope/Header/Subject/function"
    line = line_of(envelope, "//e:function")
    assert error.detail == f"envelope: value doesn't match any pattern of ['[0-9]{{2}}'] (value '1', line {line})"


def test_a_namespace_less_document_in_the_content_fails_the_envelope(validator: Validator) -> None:
    envelope = sample_envelope("licence.import")
    content = content_document(envelope).getparent()
    assert content is not None
    content[0] = etree.Element("ImportLicence")
    error = rejection(lambda: validator.validate_envelope(envelope))
    assert error.location == "/Envelope/Body/Content"


def test_two_documents_in_the_content_fail_the_envelope(validator: Validator) -> None:
    envelope = sample_envelope("licence.import")
    content = content_document(envelope).getparent()
    assert content is not None
    content.append(sample_document("licence.export"))
    assert rejection(lambda: validator.validate_envelope(envelope)).location == "/Envelope/Body/Content"


def test_a_send_date_without_time_zone_fails_the_envelope(validator: Validator) -> None:
    envelope = sample_envelope("licence.import")
    send_date = envelope.find(".//{*}sendDate")
    assert send_date is not None
    send_date.text = "2026-11-24T10:00:00"
    assert rejection(lambda: validator.validate_envelope(envelope)).location == "/Envelope/Header/Subject/sendDate"


def test_another_types_root_from_the_same_schema_is_refused(validator: Validator) -> None:
    # ExportLicence is valid against licence.xsd, but the header says licence.import
    error = rejection(lambda: validator.validate_document("licence.import", sample_document("licence.export")))
    assert error.code == ErrorCode.SCHEMA_INVALID
    assert error.location == "/ExportLicence"
    assert "expected {urn:nsw:licence:1}ImportLicence" in error.detail


def test_a_root_the_schema_does_not_know_is_refused_with_xmlschemas_path(validator: Validator) -> None:
    error = rejection(lambda: validator.validate_document("licence.import", sample_document("eco.atiga-form-d")))
    assert error.code == ErrorCode.SCHEMA_INVALID
    assert error.location == "/CertificateOfOrigin"
    assert "is not an element of the schema" in error.detail


def test_an_unknown_document_type_is_its_own_code(validator: Validator) -> None:
    envelope = sample_envelope("licence.import")
    subject = envelope.find(".//{*}documentType")
    assert subject is not None
    subject.text = "licence.unheard-of"
    error = rejection(lambda: validator.validate(verified(envelope)))
    assert error.code == ErrorCode.UNKNOWN_DOCUMENT_TYPE
    assert error.location == "/Envelope/Header/Subject/documentType"
    assert "licence.unheard-of" in error.detail


def test_when_xmlschema_finds_nothing_wrong_the_message_is_still_refused(
    validator: Validator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validation, "first_issue", lambda schema, element: None)
    envelope = reparse(sample_envelope("licence.import"))
    etree.strip_elements(envelope, "{urn:nsw:licence:1}hsCode")
    with capture_logs() as logs:
        error = rejection(lambda: validator.validate_document("licence.import", content_document(envelope)))
    line = line_of(envelope, "//l:item/l:description")  # libxml2 points at the unexpected element
    assert error.code == ErrorCode.SCHEMA_INVALID
    assert error.location == f"line {line}"
    assert "This element is not expected" in error.detail
    assert [e["event"] for e in logs] == ["schema_validators_disagree"]
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["line"] == line


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []  # reset by the fixture

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(f'<xs:schema xmlns:xs="{XS}" targetNamespace="urn:evil"/>'.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[str]]]:
    _Recorder.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.requests
    finally:
        server.shutdown()
        server.server_close()


def test_schema_location_hints_in_messages_are_never_followed(
    validator: Validator, recorder: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, requests = recorder
    local = tmp_path / "hint.xsd"
    local.write_text(f'<xs:schema xmlns:xs="{XS}" targetNamespace="urn:nsw:licence:1"/>')
    xsi = "http://www.w3.org/2001/XMLSchema-instance"
    hints = f"urn:nsw:licence:1 {url}/licence.xsd urn:evil {local.as_uri()}"
    good = sample_document("licence.import")
    good.set(f"{{{xsi}}}schemaLocation", hints)
    validator.validate_document("licence.import", good)
    bad = sample_document("licence.import")
    bad.set(f"{{{xsi}}}schemaLocation", hints)
    etree.strip_elements(bad, "{urn:nsw:licence:1}hsCode")
    assert rejection(lambda: validator.validate_document("licence.import", bad)).code == ErrorCode.SCHEMA_INVALID
    assert requests == []


# -- the registry ----------------------------------------------------------------------------------


def test_the_shipped_registry(registry: DocumentTypeRegistry) -> None:
    assert set(registry.names()) >= {
        "licence.import",
        "licence.export",
        "permit.quarantine",
        "eco.atiga-form-d",
        "sps.ephyto",
        "wco.dec.submit",
        "wco.dec.amend",
        "wco.dec.cancel",
        "wco.res.notification",
        "wco.fileupload.request",
        "wco.fileupload.response",
        "nsw.receipt",
        "nsw.rejection",
    }
    assert [t.name for t in registry] == registry.names()
    assert len(registry) == len(registry.names())
    licence = registry.get("licence.import")
    assert licence.roles_for("01") == {"trader", "agency"}
    assert licence.roles_for("27") == {"agency"}
    assert licence.roles_for("99") == frozenset()
    assert registry.get("nsw.receipt").functions == {"99": {"nsw", "peer"}}
    assert registry.get("nsw.rejection").functions == {"21": {"nsw", "peer"}}
    assert registry.get("sps.ephyto").schema_files == (SCHEMAS_DIR / "vendor/ephyto/SPSCertificate_17.xsd",)
    metadata = "{urn:wco:datamodel:WCO:DocumentMetaData-DMS:2}MetaData"
    assert [t.name for t in registry.by_root(metadata)] == [
        "wco.dec.amend",
        "wco.dec.cancel",
        "wco.dec.submit",
        "wco.res.notification",
    ]
    assert registry.by_root("{urn:nowhere}Nothing") == []
    assert "licence.import" in registry
    assert "nope" not in registry
    eco = registry.get("eco.atiga-form-d")
    assert eco.body_signature_required == {code: {"agency", "peer"} for code in ("01", "02", "03")}
    assert eco.needs_body_signature("01", "peer")
    assert eco.needs_body_signature("03", "agency")
    assert not eco.needs_body_signature("01", "trader")  # an application, not a certificate
    assert not eco.needs_body_signature("23", "peer")  # an answer
    assert licence.body_signature_required == {}


def test_every_registered_schema_set_also_loads_for_error_reports(validator: Validator) -> None:
    with capture_logs() as logs:
        validator.warm_up()
    assert logs == []  # no import warnings: every file each set needs is inside schemas/


def test_validators_share_compiled_schemas(registry: DocumentTypeRegistry) -> None:
    first, second = Validator(registry), Validator(registry)
    sset = SchemaSet.of(registry.get("wco.dec.submit").schema_files, SCHEMAS_DIR)
    assert lxml_schema(sset) is lxml_schema(sset)
    assert first._lxml["wco.dec.submit"] is second._lxml["wco.dec.submit"] is lxml_schema(sset)


def write_registry(folder: Path, entry: str, name: str = "x.doc") -> Path:
    (folder / "doc.xsd").write_text(
        f'<xs:schema xmlns:xs="{XS}" targetNamespace="urn:x" elementFormDefault="qualified">'
        '<xs:element name="Doc" type="xs:string"/></xs:schema>'
    )
    path = folder / "registry.yaml"
    path.write_text(
        f"version: 1\ndocument_types:\n  {name}:\n" + "".join(f"    {line}\n" for line in entry.splitlines())
    )
    return path


GOOD_ENTRY = 'root: "{urn:x}Doc"\nschema: doc.xsd\nfunctions:\n  "01": [trader]'


def test_a_registry_entry_may_require_the_body_signature_per_function_and_role(tmp_path: Path) -> None:
    entry = GOOD_ENTRY.replace("[trader]", "[trader, agency]") + '\nbody_signature_required:\n  "01": [agency]'
    doc = DocumentTypeRegistry.load(write_registry(tmp_path, entry)).get("x.doc")
    assert doc.needs_body_signature("01", "agency")
    assert not doc.needs_body_signature("01", "trader")
    assert not doc.needs_body_signature("02", "agency")


def test_a_minimal_registry_of_ones_own_loads_and_validates(tmp_path: Path) -> None:
    registry = DocumentTypeRegistry.load(write_registry(tmp_path, GOOD_ENTRY))
    validator = Validator(registry)
    assert validator.schemas_dir == tmp_path.resolve()
    validator.validate_document("x.doc", etree.fromstring(b'<Doc xmlns="urn:x">hello</Doc>'))
    error = rejection(lambda: validator.validate_document("x.doc", etree.fromstring(b'<Doc xmlns="urn:x"><a/></Doc>')))
    assert error.location == "/Doc"


def test_an_edited_schema_is_compiled_again_by_the_next_validator(tmp_path: Path) -> None:
    path = write_registry(tmp_path, GOOD_ENTRY)
    number = etree.fromstring(b'<Doc xmlns="urn:x">42</Doc>')
    Validator(DocumentTypeRegistry.load(path)).validate_document("x.doc", number)
    schema = tmp_path / "doc.xsd"
    schema.write_text(schema.read_text().replace('type="xs:string"', 'type="xs:date"'))
    error = rejection(lambda: Validator(DocumentTypeRegistry.load(path)).validate_document("x.doc", number))
    assert error.location == "/Doc"
    assert "Invalid datetime string '42'" in error.detail


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (GOOD_ENTRY.replace('"{urn:x}Doc"', "Doc"), "root must be a Clark name"),
        (GOOD_ENTRY.replace("[trader]", "[trader, smuggler]"), "unknown role(s) smuggler"),
        (GOOD_ENTRY.replace('"01"', "01"), "function code 1 must be quoted"),
        (GOOD_ENTRY.replace('"01"', '"05"'), "unknown function code '05'"),
        (GOOD_ENTRY.replace("[trader]", "[]"), "roles must be a non-empty list"),
        (GOOD_ENTRY.replace("doc.xsd", "missing.xsd"), "schema file 'missing.xsd' does not exist"),
        (GOOD_ENTRY + "\nschemas: doc.xsd", "unknown key(s) schemas"),
        ('root: "{urn:x}Doc"\nschema: doc.xsd', "functions must map function codes"),
        (GOOD_ENTRY + "\nbody_signature_required: [trader]", "body_signature_required must map function codes"),
        (GOOD_ENTRY + '\nbody_signature_required:\n  "01": [peer]', "function 01: peer may not send it"),
        (GOOD_ENTRY + '\nbody_signature_required:\n  "02": [trader]', "function 02: trader may not send it"),
        (GOOD_ENTRY + "\nbody_signature_required:\n  01: [trader]", "body_signature_required: function code 1 must"),
        (GOOD_ENTRY + '\nbody_signature_required:\n  "01": [spy]', "body_signature_required: function 01: unknown"),
    ],
)
def test_registry_errors_name_the_entry(tmp_path: Path, entry: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        DocumentTypeRegistry.load(write_registry(tmp_path, entry))
    assert "document type 'x.doc'" in str(raised.value)
    assert problem in str(raised.value)


def test_registry_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        DocumentTypeRegistry.load(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="the name must match"):
        DocumentTypeRegistry.load(write_registry(tmp_path, GOOD_ENTRY, name="Bad_Name"))
    (tmp_path / "v2.yaml").write_text("version: 2\ndocument_types: {}\n")
    with pytest.raises(ConfigError, match="version: 1"):
        DocumentTypeRegistry.load(tmp_path / "v2.yaml")


def test_a_root_the_schema_does_not_declare_is_a_config_error(tmp_path: Path) -> None:
    registry = DocumentTypeRegistry.load(write_registry(tmp_path, GOOD_ENTRY.replace("}Doc", "}Dock")))
    with pytest.raises(ConfigError) as raised:
        Validator(registry)
    assert "document type 'x.doc'" in str(raised.value)
    assert "{urn:x}Dock is not a global element of doc.xsd" in str(raised.value)


# -- confined schema loading -------------------------------------------------------------------------


def importing_schema(location: str) -> str:
    return (
        f'<xs:schema xmlns:xs="{XS}" xmlns:ev="urn:evil" targetNamespace="urn:x" elementFormDefault="qualified">'
        f'<xs:import namespace="urn:evil" schemaLocation="{location}"/>'
        '<xs:element name="Doc"><xs:complexType><xs:sequence><xs:element ref="ev:E"/></xs:sequence>'
        "</xs:complexType></xs:element></xs:schema>"
    )


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """tmp/schemas is the schema folder; tmp/outside/evil.xsd is a valid schema next to it."""
    (tmp_path / "schemas").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "evil.xsd").write_text(
        f'<xs:schema xmlns:xs="{XS}" targetNamespace="urn:evil"><xs:element name="E"/></xs:schema>'
    )
    return tmp_path


def test_a_schema_that_imports_a_file_outside_the_schema_folder_is_refused(outside: Path) -> None:
    folder = outside / "schemas"
    (folder / "a.xsd").write_text(importing_schema("../outside/evil.xsd"))
    registry = DocumentTypeRegistry.load(write_registry(folder, GOOD_ENTRY.replace("doc.xsd", "a.xsd")))
    with pytest.raises(ConfigError) as raised:
        Validator(registry)
    assert "document type 'x.doc'" in str(raised.value)
    assert "outside/evil.xsd, outside the schema folder" in str(raised.value)
    with pytest.raises(ConfigError, match="outside the schema folder"):  # and xmlschema refuses it too
        xmlschema_schema(SchemaSet.of([folder / "a.xsd"], folder.resolve()))


def test_a_symlink_out_of_the_schema_folder_is_refused(outside: Path) -> None:
    folder = outside / "schemas"
    os.symlink(outside / "outside" / "evil.xsd", folder / "linked.xsd")
    (folder / "a.xsd").write_text(importing_schema("linked.xsd"))
    sset = SchemaSet.of([folder / "a.xsd"], folder.resolve())
    with pytest.raises(ConfigError, match="outside the schema folder"):
        lxml_schema(sset)
    with pytest.raises(ConfigError, match="outside the schema folder"):
        xmlschema_schema(sset)


def test_a_schema_that_imports_over_the_network_is_refused(outside: Path, recorder: tuple[str, list[str]]) -> None:
    url, requests = recorder
    folder = outside / "schemas"
    (folder / "a.xsd").write_text(importing_schema(f"{url}/evil.xsd"))
    sset = SchemaSet.of([folder / "a.xsd"], folder.resolve())
    with pytest.raises(ConfigError, match="outside the schema folder"):
        lxml_schema(sset)
    with pytest.raises(ConfigError, match=f"cannot load all it imports: .*block access to remote resource {url}"):
        xmlschema_schema(sset)
    assert requests == []


def test_a_schema_file_outside_the_folder_is_refused_before_loading(outside: Path) -> None:
    with pytest.raises(ConfigError, match="lies outside the schema folder"):
        SchemaSet.of([outside / "outside" / "evil.xsd"], (outside / "schemas").resolve())
