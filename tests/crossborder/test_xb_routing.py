"""Routing answers across the border: templates that read header fields (``asw:{toCountry}``) and the
shipped answer rules."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from lxml import etree

from gateway.errors import ConfigError, ErrorCode, Rejected
from gateway.model import Header, PartyRef, RouteDecision
from gateway.samples import ECO_NS
from routing.engine import RoutingTable, default_rules_path

PEERS = frozenset({"asw:TH", "asw:MY"})


def answer(function: str = "23", *, sender: str = "VN-CUSTOMS", to: str = "TH-DFT", to_country: str = "TH") -> Header:
    return Header(
        version="1",
        message_id="answer-1",
        sender=PartyRef(sender, name=sender, country_code=sender[:2]),
        recipient=PartyRef(to, name=to, country_code=to_country),
        document_type="eco.atiga-form-d",
        function=function,
        reference="TH-VN 26/01/00077",
        pre_reference="certificate-1",
        send_date=datetime(2026, 11, 24, 10, 0, tzinfo=UTC),
    )


def certificate(importing: str = "VN") -> etree._Element:
    document = etree.Element(f"{{{ECO_NS}}}CertificateOfOrigin")
    etree.SubElement(document, f"{{{ECO_NS}}}importingCountry").text = importing
    return document


def table(*rules: dict[str, Any], fields: dict[str, str] | None = None) -> RoutingTable:
    return RoutingTable.from_mapping(
        {
            "version": 1,
            "namespaces": {"eco": ECO_NS},
            "fields": {"eco.atiga-form-d": fields or {"importingCountry": "string(eco:importingCountry)"}},
            "destinations": {"moit": {"adapter": "http", "url": "http://127.0.0.1:9/moit"}},
            "rules": list(rules),
        }
    )


BACK_ABROAD = {"name": "answers-abroad", "when": {"toCountry": {"not_in": ["VN"]}}, "to": ["asw:{toCountry}"]}


def test_a_template_reads_a_header_field() -> None:
    decisions = table(BACK_ABROAD).route(answer(), certificate(), extra_destinations=PEERS)
    assert decisions == (RouteDecision("asw:TH", "answers-abroad"),)


def test_header_and_business_fields_mix_in_one_template() -> None:
    rule = {"name": "both", "when": {"function": "23"}, "to": ["asw:{toCountry}", "asw:{importingCountry}"]}
    decisions = table(rule).route(answer(), certificate("MY"), extra_destinations=PEERS)
    assert [d.destination for d in decisions] == ["asw:TH", "asw:MY"]


def test_an_empty_header_field_gives_no_destination_and_says_why() -> None:
    rule = {"name": "back", "when": {"function": "23"}, "to": ["asw:{toCountry}"]}
    with pytest.raises(Rejected) as raised:
        table(rule).route(answer(to_country=""), certificate(), extra_destinations=PEERS)
    assert raised.value.code is ErrorCode.NO_ROUTE
    assert "field toCountry is empty in the header" in raised.value.detail


def test_a_header_template_naming_no_peer_is_no_route_at_the_header_field() -> None:
    with pytest.raises(Rejected) as raised:
        table(BACK_ABROAD).route(answer(to_country="KH"), certificate(), extra_destinations=PEERS)
    assert raised.value.code is ErrorCode.NO_ROUTE
    assert "'asw:KH'" in raised.value.detail
    assert raised.value.location == "header field toCountry"


def test_explain_shows_what_a_header_template_gave() -> None:
    explanation = table(BACK_ABROAD).explain(answer(), certificate(), extra_destinations=PEERS)
    assert explanation.decisions == (RouteDecision("asw:TH", "answers-abroad"),)
    assert "answers-abroad: MATCHED -> asw:TH" in explanation.render()


def test_a_business_field_may_not_take_a_header_fields_name() -> None:
    with pytest.raises(ConfigError, match=r"toCountry.*header field"):
        table(BACK_ABROAD, fields={"toCountry": "string(eco:importingCountry)"})


@pytest.fixture(scope="module")
def shipped() -> RoutingTable:
    return RoutingTable.load(default_rules_path())


@pytest.mark.parametrize(
    ("case", "header", "expected"),
    [
        ("VN customs accepts a Thai e-C/O", answer("23"), ["asw:TH"]),
        ("VN customs rejects a Thai e-C/O", answer("22"), ["asw:TH"]),
        ("TH-NSW forwards TH customs' answer", answer("23", sender="TH-NSW", to="VN-NSW", to_country="VN"), ["moit"]),
        ("VN customs answers VN-MOIT", answer("23", to="VN-MOIT", to_country="VN"), ["moit"]),
    ],
)
def test_the_shipped_rules_send_answers_back_to_the_issuing_country(
    shipped: RoutingTable, case: str, header: Header, expected: list[str]
) -> None:
    decisions = shipped.route(header, certificate(), extra_destinations=PEERS)
    assert [d.destination for d in decisions] == expected, case


def test_the_shipped_rules_send_an_ephyto_answer_back_abroad(shipped: RoutingTable) -> None:
    header = dataclasses.replace(answer("22", to="TH-DOA"), document_type="sps.ephyto")
    document = etree.Element("{urn:un:unece:uncefact:data:standard:SPSCertificate:17}SPSCertificate")
    decisions = shipped.route(header, document, extra_destinations=PEERS)
    assert [(d.destination, d.rule) for d in decisions] == [("asw:TH", "ephyto-answers-abroad")]
