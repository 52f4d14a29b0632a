"""Realistic sample documents and unsigned envelopes for every shipped document type.

The parties are the ones the dev PKI (``nswgw certs init``) issues certificates for, so a sample
envelope signed with that party's key passes the whole ingress. Documents are built here from the
schemas in ``schemas/``; the WCO and ePhyto ones are files in ``schemas/samples/`` (real HMRC samples,
and our own minimal ePhyto certificate).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Final

from lxml import etree

from gateway.envelope import build_envelope
from gateway.model import Header, PartyRef
from gateway.security.parse import parse_untrusted
from schemas import SCHEMAS_DIR

SAMPLES_DIR: Final = SCHEMAS_DIR / "samples"
LICENCE_NS: Final = "urn:nsw:licence:1"
PERMIT_NS: Final = "urn:nsw:permit:1"
ECO_NS: Final = "urn:nsw:eco:atiga-form-d:1"
RECEIPT_NS: Final = "urn:nsw:receipt:1"


@dataclass(frozen=True, slots=True)
class SampleParty:
    ref: PartyRef  # the envelope's <From>/<To> block
    role: str  # trader, agency, customs, nsw, peer (see schemas/registry.yaml)

    @property
    def identity(self) -> str:
        return self.ref.identity


def _party(identity: str, name: str, role: str, country: str, ministry_code: str = "") -> SampleParty:
    return SampleParty(PartyRef(identity, name, country, ministry_code), role)


TRADER: Final = "VN-TRADER-0101234567"
_TRADER_NAME: Final = "An Phat Import Export JSC"
_TRADER_ADDRESS: Final = "25 Ly Thuong Kiet, Hoan Kiem, Ha Noi, Viet Nam"
_TRADER_BLOCK: Final = {"taxCode": "0101234567", "name": _TRADER_NAME, "address": _TRADER_ADDRESS}

SAMPLE_PARTIES: Final[Mapping[str, SampleParty]] = MappingProxyType(
    {
        p.identity: p
        for p in (
            _party("VN-NSW", "Viet Nam National Single Window", "nsw", "VN"),
            _party("VN-MOIT", "Ministry of Industry and Trade", "agency", "VN", "BCT"),
            _party("VN-MARD-PPD", "Plant Protection Department", "agency", "VN", "BNNPTNT"),
            _party("VN-CUSTOMS", "General Department of Viet Nam Customs", "customs", "VN", "TCHQ"),
            _party(TRADER, _TRADER_NAME, "trader", "VN"),
            _party("VN-MOH", "Ministry of Health", "agency", "VN", "BYT"),  # legacy system: RSA-SHA1
            _party("TH-NSW", "Thailand National Single Window", "peer", "TH"),
        )
    }
)

# document type -> (sender, recipient, function): who sends it into the gateway, and what routes it somewhere
SAMPLE_SENDERS: Final[dict[str, tuple[str, str, str]]] = {
    "licence.import": (TRADER, "VN-MOIT", "01"),
    "licence.export": (TRADER, "VN-MOIT", "01"),
    "permit.quarantine": ("VN-MARD-PPD", "VN-CUSTOMS", "27"),
    "eco.atiga-form-d": ("VN-MOIT", "TH-NSW", "01"),
    "sps.ephyto": ("VN-MARD-PPD", "TH-NSW", "01"),
    "wco.dec.submit": (TRADER, "VN-CUSTOMS", "01"),
    "wco.dec.amend": (TRADER, "VN-CUSTOMS", "02"),
    "wco.dec.cancel": (TRADER, "VN-CUSTOMS", "03"),
    "wco.res.notification": ("VN-CUSTOMS", TRADER, "23"),
}
# The gateways' own answers are not posted to an ingress (a peer returns them on the same connection),
# so they are not in SAMPLE_SENDERS; their samples come from a peer single window to us.
_ANSWER_SENDERS: Final[dict[str, tuple[str, str, str]]] = {
    "nsw.receipt": ("TH-NSW", "VN-NSW", "99"),
    "nsw.rejection": ("TH-NSW", "VN-NSW", "21"),
}

_SAMPLE_FILES: Final[Mapping[str, str]] = {
    "sps.ephyto": "ephyto-SPSCertificate.VN-TH.xml",
    "wco.dec.submit": "wco-dec-submit.TT_IM068a.xml",
    "wco.dec.amend": "wco-dec-amend.TT_IM068a.xml",
    "wco.dec.cancel": "wco-dec-cancel.TT_EX010a.xml",
    "wco.res.notification": "wco-res-notification.TT_EX039a-DMSACC.xml",
}


def _el(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> etree._Element:
    """A child in the parent's namespace."""
    node = etree.SubElement(parent, f"{{{etree.QName(parent).namespace}}}{tag}", attrs)
    node.text = text
    return node


def _leaves(parent: etree._Element, tag: str, **children: str) -> etree._Element:
    node = _el(parent, tag)
    for child, text in children.items():
        _el(node, child, text)
    return node


def _root(namespace: str, tag: str) -> etree._Element:
    return etree.Element(f"{{{namespace}}}{tag}", nsmap={None: namespace})


def _licence(tag: str) -> etree._Element:
    importing = tag == "ImportLicence"
    doc = _root(LICENCE_NS, tag)
    _el(doc, "applicationNumber", "BCT-NK-2026-000123" if importing else "BCT-XK-2026-000456")
    _leaves(doc, "issuingAuthority", identity="VN-MOIT", name="Ministry of Industry and Trade")
    _leaves(doc, "licensee", **_TRADER_BLOCK)
    _leaves(doc, "validity", validFrom="2026-12-01", validTo="2027-05-31")
    if importing:
        _el(doc, "countryOfOrigin", "TH")
        _leaves(doc, "portOfEntry", code="VNHPH", name="Hai Phong")
    else:
        _el(doc, "countryOfDestination", "JP")
        _leaves(doc, "portOfExit", code="VNSGN", name="Ho Chi Minh City")
    items = _el(doc, "items")
    goods = (
        [("2710193410", "Lubricating oil base stock, group II", "120", "TNE", "118800.00")]
        if importing
        else [("2523290000", "Portland cement, grey, type PC40", "5000", "TNE", "260000.00")]
    )
    for number, (hs, description, quantity, unit, value) in enumerate(goods, start=1):
        item = _el(items, "item")
        _el(item, "lineNumber", str(number))
        _el(item, "hsCode", hs)
        _el(item, "description", description)
        _el(item, "quantity", quantity, unit=unit)
        _el(item, "value", value, currency="USD")
    _leaves(doc, "conditions", condition="Goods must be declared to customs within the licence validity period.")
    return doc


def _permit() -> etree._Element:
    doc = _root(PERMIT_NS, "QuarantinePermit")
    _el(doc, "applicationNumber", "PPD-KD-2026-010203")
    _el(doc, "permitNumber", "KDTV-2026-00871")
    _el(doc, "permitKind", "plant-quarantine")
    _leaves(doc, "inspectionAgency", identity="VN-MARD-PPD", name="Plant Protection Department")
    _leaves(doc, "applicant", **_TRADER_BLOCK)
    consignment = _el(doc, "consignment")
    _leaves(
        consignment, "exporter", name="Golden Grain Co., Ltd.", address="99 Bangna-Trad Road, Bangkok", country="TH"
    )
    _el(consignment, "countryOfOrigin", "TH")
    _leaves(consignment, "portOfEntry", code="VNHPH", name="Hai Phong")
    _el(consignment, "meansOfTransport", "SITC HAIPHONG / V.2611N")
    _el(consignment, "transportDocument", "SITBKKHP2611088")
    _el(consignment, "expectedArrival", "2026-11-28")
    items = _el(doc, "items")
    item = _el(items, "item")
    _el(item, "lineNumber", "1")
    _el(item, "hsCode", "10063099")
    _el(item, "description", "Milled jasmine rice, 5% broken, in 50 kg PP bags")
    _el(item, "scientificName", "Oryza sativa")
    _el(item, "quantity", "250", unit="TNE")
    _leaves(doc, "inspection", place="Hai Phong plant quarantine station, Dinh Vu port", date="2026-11-29")
    _el(doc, "result", "pass")
    _leaves(doc, "validity", validFrom="2026-11-29", validTo="2027-02-28")
    return doc


def _eco() -> etree._Element:
    doc = _root(ECO_NS, "CertificateOfOrigin")
    _el(doc, "referenceNumber", "VN-TH 26/02/00123")
    _el(doc, "issueDate", "2026-11-24")
    _el(doc, "exportingCountry", "VN")
    _el(doc, "importingCountry", "TH")
    _leaves(doc, "exporter", name=_TRADER_NAME, address=_TRADER_ADDRESS, country="VN")
    _leaves(
        doc,
        "consignee",
        name="Siam Fresh Fruit Co., Ltd.",
        address="88 Rama IV Road, Khlong Toei, Bangkok 10110, Thailand",
        country="TH",
    )
    transport = _el(doc, "transport")
    _el(transport, "departureDate", "2026-11-26")
    _el(transport, "mode", "sea")
    _el(transport, "vesselOrFlight", "WAN HAI 288 / V.N112")
    _leaves(transport, "portOfLoading", code="VNSGN", name="Ho Chi Minh City")
    _leaves(transport, "portOfDischarge", code="THLCH", name="Laem Chabang")
    items = _el(doc, "items")
    goods = [
        ("APX/LCH/01-600", "600", "cartons", "Fresh dragon fruit, white flesh", "081090", "WO", "9000", "KGM", ""),
        ("APX/LCH/601-900", "300", "cartons", "Dried mango slices, unsweetened", "081340", "WO", "3000", "KGM", ""),
        (
            "APX/LCH/901-1100",
            "200",
            "cartons",
            "Roasted cashew kernels, salted",
            "200819",
            "RVC 40%",
            "4000",
            "KGM",
            "36800.00",
        ),
        ("APX/LCH/1101-1400", "300", "bags", "Instant coffee, freeze-dried", "210111", "CTH", "4500", "KGM", ""),
        (
            "APX/LCH/1401-1500",
            "100",
            "cartons",
            "Rice paper, dried",
            "190590",
            "RVC 40% + CTSH",
            "1500",
            "KGM",
            "5250.00",
        ),
    ]
    for number, (marks, count, kind, description, hs, criterion, weight, unit, fob) in enumerate(goods, start=1):
        item = _el(items, "item")
        _el(item, "itemNumber", str(number))
        _el(item, "marksAndNumbers", marks)
        _el(item, "packageCount", count)
        _el(item, "packageKind", kind)
        _el(item, "description", description)
        _el(item, "hsCode", hs)
        _el(item, "originCriterion", criterion)
        _el(item, "grossWeightOrQuantity", weight, unit=unit)
        if fob:
            _el(item, "fobValue", fob, currency="USD")
    _leaves(doc, "invoice", number="APX-INV-2026-1187", date="2026-11-20")
    _leaves(doc, "flags", thirdCountryInvoicing="false", backToBack="false")
    _leaves(doc, "issuingAuthority", identity="VN-MOIT", name="Ministry of Industry and Trade", country="VN")
    return doc


_ANSWERED_ID: Final = "5b7c0e2a-3f41-4d8e-9a55-0c2d7e9f1a36"  # the message a sample receipt / rejection answers


def _answer(tag: str, *fields: tuple[str, str]) -> etree._Element:
    doc = _root(RECEIPT_NS, tag)
    _el(doc, "messageId", _ANSWERED_ID)
    _el(doc, "digest", "9f2b6d1c" * 8, algorithm="sha-256")
    for name, text in fields:
        _el(doc, name, text)
    return doc


def _receipt() -> etree._Element:
    doc = _answer("Receipt", ("receivedAt", "2026-11-24T10:00:01Z"), ("status", "ACCEPTED"))
    _leaves(doc, "destinations", destination="th-customs")
    return doc


def _rejection() -> etree._Element:
    return _answer(
        "Rejection",
        ("code", "SCHEMA_INVALID"),
        ("httpStatus", "422"),
        ("detail", "document type eco.atiga-form-d: value 'T' does not match pattern [A-Z]{2} (line 14)"),
        ("location", "/CertificateOfOrigin/importingCountry"),
        ("rejectedAt", "2026-11-24T10:00:01Z"),
    )


def _from_file(document_type: str) -> Callable[[], etree._Element]:
    return lambda: parse_untrusted((SAMPLES_DIR / _SAMPLE_FILES[document_type]).read_bytes())


_BUILDERS: Final[Mapping[str, Callable[[], etree._Element]]] = {
    "licence.import": lambda: _licence("ImportLicence"),
    "licence.export": lambda: _licence("ExportLicence"),
    "permit.quarantine": _permit,
    "eco.atiga-form-d": _eco,
    **{name: _from_file(name) for name in _SAMPLE_FILES},
    "nsw.receipt": _receipt,
    "nsw.rejection": _rejection,
}
# every type with a sample; the registry's other types (HMRC file upload) have none
SAMPLE_DOCUMENT_TYPES: Final[tuple[str, ...]] = tuple(sorted(_BUILDERS))

# the sender's own reference for the business document (Subject/reference)
_REFERENCES: Final[Mapping[str, str]] = {
    "licence.import": "BCT-NK-2026-000123",
    "licence.export": "BCT-XK-2026-000456",
    "permit.quarantine": "PPD-KD-2026-010203",
    "eco.atiga-form-d": "VN-TH 26/02/00123",
    "sps.ephyto": "VN-PPD-2026-0004711",
    "wco.dec.submit": "U.7849431R66ZB",
    "wco.dec.amend": "U.7849431R66ZB",
    "wco.dec.cancel": "EX010a-cancel",
    "wco.res.notification": "4.1.0CDSP10284_TC02_18",
    "nsw.receipt": _ANSWERED_ID,
    "nsw.rejection": _ANSWERED_ID,
}


def sample_document(document_type: str) -> etree._Element:
    """A fresh, schema-valid business document of ``document_type`` (KeyError if there is no sample)."""
    try:
        build = _BUILDERS[document_type]
    except KeyError:
        raise KeyError(f"no sample for document type {document_type!r}; samples: {', '.join(_BUILDERS)}") from None
    return build()


def party_ref(identity: str) -> PartyRef:
    """The envelope block of a sample party; an unknown identity gets a plausible one (for negative tests)."""
    party = SAMPLE_PARTIES.get(identity)
    if party is not None:
        return party.ref
    country = identity[:2] if identity[:2].isalpha() and identity[:2].isupper() else "VN"
    return PartyRef(identity=identity, name=identity, country_code=country)


def sample_envelope(
    document_type: str,
    *,
    message_id: str | None = None,
    sender: str | None = None,
    recipient: str | None = None,
    function: str | None = None,
    send_date: datetime | None = None,
    pre_reference: str | None = None,
) -> etree._Element:
    """An UNSIGNED envelope around ``sample_document(document_type)``; defaults from ``SAMPLE_SENDERS``."""
    default_sender, default_recipient, default_function = {**SAMPLE_SENDERS, **_ANSWER_SENDERS}[document_type]
    header = Header(
        version="1",
        message_id=message_id or str(uuid.uuid4()),
        sender=party_ref(sender or default_sender),
        recipient=party_ref(recipient or default_recipient),
        document_type=document_type,
        function=function or default_function,
        reference=_REFERENCES[document_type],
        pre_reference=pre_reference,
        send_date=send_date or datetime.now(UTC),
    )
    return build_envelope(header, sample_document(document_type))


EPHYTO_RAM = "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:21"
EPHYTO_SPS = "urn:un:unece:uncefact:data:standard:SPSCertificate:17"


def attach_to_ephyto(envelope: etree._Element, data: bytes, filename: str, *, reference_id: str) -> None:
    """Add a referenced document with ``data`` as its ``AttachmentBinaryObject`` (base64) to the ePhyto in
    ``envelope``, where the hub schema puts it: IssueDateTime, TypeCode, RelationshipTypeCode, ID, attachment,
    in a ReferenceSPSReferencedDocument just before SignatorySPSAuthentication."""
    signatory = envelope.find(f".//{{{EPHYTO_SPS}}}SPSExchangedDocument/{{{EPHYTO_RAM}}}SignatorySPSAuthentication")
    if signatory is None:
        raise ValueError("no ePhyto SPSExchangedDocument/SignatorySPSAuthentication in this envelope")
    document = etree.Element(f"{{{EPHYTO_RAM}}}ReferenceSPSReferencedDocument")
    signatory.addprevious(document)
    for tag, text in (("IssueDateTime", "2026-11-24"), ("TypeCode", "916"), ("RelationshipTypeCode", "ZZZ")):
        etree.SubElement(document, f"{{{EPHYTO_RAM}}}{tag}").text = text
    etree.SubElement(document, f"{{{EPHYTO_RAM}}}ID").text = reference_id
    attachment = etree.SubElement(document, f"{{{EPHYTO_RAM}}}AttachmentBinaryObject", filename=filename)
    attachment.text = base64.b64encode(data).decode("ascii")


def write_samples(out_dir: Path) -> list[Path]:
    """Write ``<documentType>.xml`` (an unsigned envelope, pretty-printed UTF-8) for every sample type."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for document_type in SAMPLE_DOCUMENT_TYPES:
        envelope = sample_envelope(document_type)
        etree.indent(envelope, space="  ")
        path = out_dir / f"{document_type}.xml"
        path.write_bytes(etree.tostring(envelope, xml_declaration=True, encoding="UTF-8", pretty_print=True))
        written.append(path)
    return written
