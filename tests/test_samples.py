"""Sample documents and envelopes: valid, sent by a party allowed to send them, written by ``write_samples``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from lxml import etree

from gateway.envelope import content_document, parse_header
from gateway.samples import (
    SAMPLE_DOCUMENT_TYPES,
    SAMPLE_PARTIES,
    SAMPLE_SENDERS,
    party_ref,
    sample_document,
    sample_envelope,
    write_samples,
)
from gateway.security.parse import parse_untrusted
from gateway.validation import DocumentTypeRegistry, Validator


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator(DocumentTypeRegistry.load())


def test_write_samples_writes_one_valid_envelope_per_shipped_type(validator: Validator, tmp_path: Path) -> None:
    out = tmp_path / "samples" / "nested"
    written = write_samples(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{t}.xml" for t in SAMPLE_DOCUMENT_TYPES)
    assert sorted(written) == sorted(out.iterdir())
    for path in written:
        raw = path.read_bytes()
        assert raw.startswith(b"<?xml version='1.0' encoding='UTF-8'?>\n<Envelope")
        assert b"\n  <Header>\n    <Reference>" in raw  # pretty-printed
        envelope = parse_untrusted(raw)
        header = parse_header(envelope)
        assert f"{header.document_type}.xml" == path.name
        validator.validate_envelope(envelope)
        validator.validate_document(header.document_type, content_document(envelope))


def test_every_registered_type_but_hmrc_file_upload_has_a_sample(validator: Validator) -> None:
    registered = set(validator.registry.names())
    assert set(SAMPLE_DOCUMENT_TYPES) == registered - {"wco.fileupload.request", "wco.fileupload.response"}
    assert set(SAMPLE_SENDERS) <= set(SAMPLE_DOCUMENT_TYPES)


@pytest.mark.parametrize("document_type", sorted(SAMPLE_SENDERS))
def test_each_sample_sender_may_send_its_function(validator: Validator, document_type: str) -> None:
    sender, recipient, function = SAMPLE_SENDERS[document_type]
    assert {sender, recipient} <= set(SAMPLE_PARTIES)
    assert SAMPLE_PARTIES[sender].role in validator.registry.get(document_type).roles_for(function)
    header = parse_header(sample_envelope(document_type))
    assert (header.sender.identity, header.recipient.identity, header.function) == (sender, recipient, function)


def test_the_sample_parties_are_the_dev_pki_parties() -> None:
    roles = {identity: party.role for identity, party in SAMPLE_PARTIES.items()}
    assert roles == {
        "VN-NSW": "nsw",
        "VN-MOIT": "agency",
        "VN-MARD-PPD": "agency",
        "VN-CUSTOMS": "customs",
        "VN-TRADER-0101234567": "trader",
        "VN-MOH": "agency",
        "TH-NSW": "peer",
    }
    assert party_ref("VN-MOIT").ministry_code == "BCT"
    assert party_ref("VN-CUSTOMS").ministry_code == "TCHQ"
    assert party_ref("TH-NSW").country_code == "TH"


def test_overrides_reach_the_header() -> None:
    sent = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    envelope = sample_envelope(
        "licence.import",
        message_id="7f1c0000-0000-4000-8000-000000000001",
        sender="VN-MOH",
        recipient="VN-NSW",
        function="27",
        send_date=sent,
        pre_reference="7f1c0000-0000-4000-8000-000000000000",
    )
    header = parse_header(envelope)
    assert header.message_id == "7f1c0000-0000-4000-8000-000000000001"
    assert header.sender == party_ref("VN-MOH")
    assert header.recipient.identity == "VN-NSW"
    assert (header.function, header.send_date, header.pre_reference) == (
        "27",
        sent,
        "7f1c0000-0000-4000-8000-000000000000",
    )
    assert header.reference == "BCT-NK-2026-000123"


def test_fresh_ids_and_an_unknown_party_for_negative_tests() -> None:
    first, second = (parse_header(sample_envelope("licence.import")) for _ in range(2))
    assert first.message_id != second.message_id
    stranger = parse_header(sample_envelope("licence.import", sender="LA-NSW")).sender
    assert (stranger.identity, stranger.country_code) == ("LA-NSW", "LA")


def test_the_eco_sample_is_for_thailand_and_documents_are_fresh_copies() -> None:
    eco = sample_document("eco.atiga-form-d")
    assert eco.findtext("{urn:nsw:eco:atiga-form-d:1}importingCountry") == "TH"
    assert sample_document("eco.atiga-form-d") is not eco
    with pytest.raises(KeyError, match=r"no sample for document type 'wco\.fileupload\.request'"):
        sample_document("wco.fileupload.request")


def test_the_licence_is_in_its_default_namespace_inside_the_envelope() -> None:
    # the demo tampers with a signed licence by editing b"<hsCode>": keep that spelling
    raw = etree.tostring(sample_envelope("licence.import"))
    assert b'<ImportLicence xmlns="urn:nsw:licence:1">' in raw
    assert b"<hsCode>" in raw
