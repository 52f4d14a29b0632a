"""The routing engine: rules file checks, matching, templates, stop, explanations, the shipped rules."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from lxml import etree

from gateway.envelope import content_document, parse_header
from gateway.errors import ConfigError, ErrorCode, Rejected
from gateway.model import Header, PartyRef, RouteDecision
from gateway.policy import BreakerPolicy, RetryPolicy
from gateway.samples import SAMPLE_DOCUMENT_TYPES, sample_envelope
from routing import DestinationConfig, RoutingTable, default_rules_path

ECO = "urn:nsw:eco:atiga-form-d:1"
LIC = "urn:nsw:licence:1"


def header(
    document_type: str = "eco.atiga-form-d",
    function: str = "01",
    sender: str = "VN-MOIT",
    *,
    sender_country: str = "VN",
    recipient: str = "VN-NSW",
    recipient_country: str = "VN",
) -> Header:
    return Header(
        version="1",
        message_id="5b0c9a4e-0000-4000-8000-000000000001",
        sender=PartyRef(sender, name=sender, country_code=sender_country),
        recipient=PartyRef(recipient, name=recipient, country_code=recipient_country),
        document_type=document_type,
        function=function,
        reference="REF-1",
        pre_reference=None,
        send_date=datetime(2026, 11, 24, 10, 0, tzinfo=UTC),
    )


def eco(importing: str | None = "TH", hs_codes: tuple[str, ...] = ("440710",)) -> etree._Element:
    """An e-C/O business document, placed inside an envelope as the pipeline hands it over."""
    envelope = etree.Element("{urn:nsw:envelope:1}Envelope")
    content = etree.SubElement(etree.SubElement(envelope, "{urn:nsw:envelope:1}Body"), "{urn:nsw:envelope:1}Content")
    document = etree.SubElement(content, f"{{{ECO}}}CertificateOfOrigin")
    if importing is not None:
        etree.SubElement(document, f"{{{ECO}}}importingCountry").text = importing
    items = etree.SubElement(document, f"{{{ECO}}}items")
    for code in hs_codes:
        etree.SubElement(etree.SubElement(items, f"{{{ECO}}}item"), f"{{{ECO}}}hsCode").text = f"  {code}\n"
    return document


def config(rules: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "version": 1,
        "namespaces": {"eco": ECO, "lic": LIC},
        "fields": {
            "eco.atiga-form-d": {
                "importingCountry": "string(eco:importingCountry)",
                "hsCodes": "eco:items/eco:item/eco:hsCode",
                "itemCount": "count(eco:items/eco:item)",
            },
            "licence.import": {"hsCodes": "lic:items/lic:item/lic:hsCode"},
        },
        "destinations": {
            "customs": {"adapter": "http", "url": "http://127.0.0.1:9101/in", "timeout": 10},
            "moit": {"adapter": "http", "url": "http://127.0.0.1:9102/in"},
            "archive": {"adapter": "file", "directory": "var/archive"},
        },
        "rules": rules,
    }
    data.update(extra)
    return data


def table(*rules: dict[str, Any]) -> RoutingTable:
    return RoutingTable.from_mapping(config(list(rules)))


def destinations(decisions: tuple[RouteDecision, ...]) -> list[str]:
    return [d.destination for d in decisions]


def routes_to_customs(when: dict[str, Any], *, message: Header, document: etree._Element | None = None) -> bool:
    routing = table({"name": "r", "when": when, "to": ["customs"]})
    try:
        routing.route(message, eco() if document is None else document)
    except Rejected as exc:
        if exc.code is not ErrorCode.NO_ROUTE:
            raise
        return False
    return True


# -- matching on the header -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "matching", "other"),
    [
        ("documentType", header(document_type="eco.atiga-form-d"), header(document_type="licence.import")),
        ("function", header(function="02"), header(function="27")),
        ("from", header(sender="VN-MOIT"), header(sender="VN-CUSTOMS")),
        ("to", header(recipient="VN-NSW"), header(recipient="TH-NSW")),
        ("fromCountry", header(sender_country="TH"), header(sender_country="VN")),
        ("toCountry", header(recipient_country="TH"), header(recipient_country="VN")),
    ],
)
def test_each_header_field_is_matched_by_value_and_by_list(key: str, matching: Header, other: Header) -> None:
    wanted = {
        "documentType": "eco.atiga-form-d",
        "function": "02",
        "from": "VN-MOIT",
        "to": "VN-NSW",
        "fromCountry": "TH",
        "toCountry": "TH",
    }[key]
    assert routes_to_customs({key: wanted}, message=matching)
    assert not routes_to_customs({key: wanted}, message=other)
    assert routes_to_customs({key: ["XX", wanted]}, message=matching)
    assert not routes_to_customs({key: ["XX", "YY"]}, message=matching)


def test_all_conditions_of_a_rule_must_hold() -> None:
    when = {"documentType": "eco.atiga-form-d", "function": ["01", "02"], "from": "VN-MOIT"}
    assert routes_to_customs(when, message=header())
    assert not routes_to_customs(when, message=header(function="03"))
    assert not routes_to_customs(when, message=header(sender="TH-NSW"))


def test_a_rule_without_when_matches_every_message() -> None:
    assert routes_to_customs({}, message=header(document_type="anything.at.all", function="99"))


def test_header_conditions_take_operators_too() -> None:
    assert routes_to_customs({"from": {"prefix": "VN-TRADER-"}}, message=header(sender="VN-TRADER-0101234567"))
    assert not routes_to_customs({"from": {"prefix": "VN-TRADER-"}}, message=header(sender="VN-MOIT"))
    assert routes_to_customs({"fromCountry": {"not_in": ["VN"]}}, message=header(sender_country="TH"))
    assert not routes_to_customs({"fromCountry": {"not_in": ["VN"]}}, message=header(sender_country=""))
    assert routes_to_customs({"documentType": {"prefix": "wco."}}, message=header(document_type="wco.dec.submit"))


# -- operators on business fields -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "condition", "document", "expected"),
    [
        # a plain value is equals, a plain list is in
        ("importingCountry", "TH", eco("TH"), True),
        ("importingCountry", "TH", eco("MY"), False),
        ("importingCountry", ["MY", "TH"], eco("TH"), True),
        ("importingCountry", {"equals": "TH"}, eco("TH"), True),
        ("importingCountry", {"equals": "TH"}, eco(None), False),
        ("importingCountry", {"in": ["MY", "TH"]}, eco("SG"), False),
        ("importingCountry", {"not_in": ["VN"]}, eco("TH"), True),
        ("importingCountry", {"not_in": ["VN"]}, eco("VN"), False),
        ("importingCountry", {"not_in": ["VN"]}, eco(None), False),  # absent never passes not_in
        ("importingCountry", {"not_in": ["VN"]}, eco("  "), False),  # blank is absent
        ("importingCountry", {"exists": True}, eco("TH"), True),
        ("importingCountry", {"exists": True}, eco(None), False),
        ("importingCountry", {"exists": False}, eco(None), True),
        ("importingCountry", {"exists": False}, eco("TH"), False),
        ("importingCountry", {"matches": "[A-Z]{2}"}, eco("TH"), True),
        ("importingCountry", {"matches": "T"}, eco("TH"), False),  # anchored: the whole value
        # on a list field, any element decides
        ("hsCodes", {"prefix": "44"}, eco(hs_codes=("090111", "440710")), True),
        ("hsCodes", {"prefix": ["30", "44"]}, eco(hs_codes=("300490",)), True),
        ("hsCodes", {"prefix": "44"}, eco(hs_codes=("090111",)), False),
        ("hsCodes", {"prefix": "44"}, eco(hs_codes=()), False),
        ("hsCodes", {"equals": "440710"}, eco(hs_codes=("090111", "440710")), True),  # values are stripped
        ("hsCodes", {"not_in": ["999999"]}, eco(hs_codes=("090111", "440710")), True),
        ("hsCodes", {"not_in": ["090111"]}, eco(hs_codes=("090111", "440710")), False),  # none may be listed
        ("hsCodes", {"matches": r"44\d{4}"}, eco(hs_codes=("090111", "440710")), True),
        # several operators: all must hold
        ("hsCodes", {"prefix": "44", "not_in": ["440710"]}, eco(hs_codes=("440710",)), False),
        ("hsCodes", {"prefix": "44", "not_in": ["440799"]}, eco(hs_codes=("440710",)), True),
        # a number-valued XPath gives its value as text
        ("itemCount", "3", eco(hs_codes=("1", "2", "3")), True),
        ("itemCount", "3", eco(hs_codes=("1",)), False),
    ],
)
def test_field_operators(field: str, condition: Any, document: etree._Element, expected: bool) -> None:
    when = {"documentType": "eco.atiga-form-d", "field": {field: condition}}
    assert routes_to_customs(when, message=header(), document=document) is expected


def test_a_field_not_defined_for_the_message_type_has_no_value() -> None:
    routing = table({"name": "timber", "when": {"field": {"hsCodes": {"prefix": "44"}}}, "to": ["customs"]})
    document = etree.Element("{urn:example}Other")
    with pytest.raises(Rejected) as raised:
        routing.route(header(document_type="other.type"), document)
    assert raised.value.code is ErrorCode.NO_ROUTE
    trace = routing.explain(header(document_type="other.type"), document).trace("timber")
    assert "field hsCodes is not defined for other.type" in trace.conditions[0].reasons


# -- several destinations, stop -----------------------------------------------------------------------


def test_every_matching_rule_adds_its_destinations_once_in_order_of_first_appearance() -> None:
    routing = table(
        {"name": "first", "when": {"documentType": "eco.atiga-form-d"}, "to": ["customs", "archive"]},
        {"name": "not-this", "when": {"function": "27"}, "to": ["moit"]},
        {"name": "second", "when": {"from": "VN-MOIT"}, "to": ["moit", "customs"]},
    )
    assert routing.route(header(), eco()) == (
        RouteDecision("customs", "first"),
        RouteDecision("archive", "first"),
        RouteDecision("moit", "second"),
    )


def test_stop_ends_evaluation_and_only_when_the_rule_matches() -> None:
    routing = table(
        {"name": "skipped-stop", "when": {"function": "27"}, "to": ["archive"], "stop": True},
        {"name": "stopper", "when": {"from": "VN-MOIT"}, "to": ["customs"], "stop": True},
        {"name": "after", "to": ["moit"]},
    )
    assert routing.route(header(), eco()) == (RouteDecision("customs", "stopper"),)
    assert destinations(routing.route(header(sender="VN-CUSTOMS"), eco())) == ["moit"]


# -- templates ----------------------------------------------------------------------------------------

ASW_RULE = {
    "name": "to-importing-country",
    "when": {"documentType": "eco.atiga-form-d", "field": {"importingCountry": {"not_in": ["VN"]}}},
    "to": ["customs", "asw:{importingCountry}"],
}


def test_template_renders_a_peer_supplied_by_the_caller() -> None:
    decisions = table(ASW_RULE).route(header(), eco("TH"), extra_destinations={"asw:TH", "asw:MY"})
    rule = "to-importing-country"
    assert decisions == (RouteDecision("customs", rule), RouteDecision("asw:TH", rule))


def test_template_rendering_an_unknown_destination_is_no_route_naming_rule_and_name() -> None:
    with pytest.raises(Rejected) as raised:
        table(ASW_RULE).route(header(), eco("ZZ"), extra_destinations={"asw:TH"})
    assert raised.value.code is ErrorCode.NO_ROUTE
    assert "to-importing-country" in raised.value.detail
    assert "'asw:ZZ'" in raised.value.detail
    assert raised.value.location == "field importingCountry = string(eco:importingCountry)"


def test_template_with_an_empty_field_is_skipped_and_explained() -> None:
    routing = table({"name": "fan-out", "to": ["customs", "asw:{importingCountry}"]})
    assert routing.route(header(), eco(None)) == (RouteDecision("customs", "fan-out"),)
    trace = routing.explain(header(), eco(None)).trace("fan-out")
    assert trace.skipped == ("asw:{importingCountry}: field importingCountry is empty",)
    text = routing.explain(header(), eco(None)).render()
    assert "skip  asw:{importingCountry}: field importingCountry is empty" in text


def test_only_skipped_templates_is_no_route_saying_why() -> None:
    routing = table({"name": "peer-only", "to": ["asw:{importingCountry}"]})
    with pytest.raises(Rejected) as raised:
        routing.route(header(), eco(None), extra_destinations={"asw:TH"})
    assert raised.value.code is ErrorCode.NO_ROUTE
    assert "rule peer-only: asw:{importingCountry}: field importingCountry is empty" in raised.value.detail


def test_template_over_a_list_field_gives_one_destination_per_value() -> None:
    routing = RoutingTable.from_mapping(
        config(
            [{"name": "by-chapter", "when": {"documentType": "eco.atiga-form-d"}, "to": ["hs-{hsCodes}"]}],
            destinations={"hs-440710": {"adapter": "file"}, "hs-090111": {"adapter": "file"}},
        )
    )
    decisions = routing.route(header(), eco(hs_codes=("440710", "090111", "440710")))
    assert destinations(decisions) == ["hs-440710", "hs-090111"]


def test_a_fixed_asw_destination_is_resolved_per_message() -> None:
    routing = table({"name": "to-thailand", "to": ["asw:TH"]})
    assert destinations(routing.route(header(), eco(), extra_destinations=["asw:TH"])) == ["asw:TH"]
    with pytest.raises(Rejected) as raised:
        routing.route(header(), eco())
    assert raised.value.code is ErrorCode.NO_ROUTE


WITHHELD = {"asw:TH": "no peer NSW for TH has an endpoint in the partner registry"}


def named_peer_table(*rules: dict[str, Any]) -> RoutingTable:
    """``table`` with asw:TH named as a destination (adapter asw), as a rules file may name a peer."""
    data = config(list(rules))
    data["destinations"]["asw:TH"] = {"adapter": "asw", "timeout": 20}
    return RoutingTable.from_mapping(data)


@pytest.mark.parametrize(
    ("to", "location"),
    [
        (["customs", "asw:TH"], None),  # a fixed, configured destination: its decision is prebuilt
        (["customs", "asw:{importingCountry}"], "field importingCountry = string(eco:importingCountry)"),
    ],
)
def test_a_withheld_peer_is_no_route_for_the_whole_message_saying_why(to: list[str], location: str | None) -> None:
    routing = named_peer_table({"name": "to-thailand", "to": to})
    assert destinations(routing.route(header(), eco("TH"))) == ["customs", "asw:TH"]
    with pytest.raises(Rejected) as raised:
        routing.route(header(), eco("TH"), withheld=WITHHELD)
    assert raised.value.code is ErrorCode.NO_ROUTE
    assert raised.value.detail == (
        f"rule 'to-thailand' routes to 'asw:TH' (from {to[1]!r}), an ASW peer not routed to now: "
        "no peer NSW for TH has an endpoint in the partner registry"
    )
    assert raised.value.location == location
    explanation = routing.explain(header(), eco("TH"), withheld=WITHHELD)
    assert explanation.error is not None
    assert explanation.error.detail == raised.value.detail
    assert explanation.decisions == ()
    # withheld is checked before the registry's own peers: a rules file's asw:TH names one peer, not any
    with pytest.raises(Rejected):
        routing.route(header(), eco("TH"), extra_destinations={"asw:TH"}, withheld=WITHHELD)


def test_a_withheld_peer_a_message_is_not_routed_to_does_not_matter() -> None:
    routing = named_peer_table({"name": "abroad", "to": ["customs", "asw:{importingCountry}"]})
    decisions = routing.route(header(), eco("MY"), extra_destinations={"asw:MY"}, withheld=WITHHELD)
    assert destinations(decisions) == ["customs", "asw:MY"]


# -- NO_ROUTE -------------------------------------------------------------------------------------------


def test_no_matching_rule_is_no_route_with_the_header_named() -> None:
    routing = table({"name": "only-licences", "when": {"documentType": "licence.import"}, "to": ["moit"]})
    with pytest.raises(Rejected) as raised:
        routing.route(header(function="02", sender="VN-MOIT"), eco())
    assert raised.value.code is ErrorCode.NO_ROUTE
    assert raised.value.http_status == 422
    assert raised.value.detail == "no routing rule matches documentType=eco.atiga-form-d function=02 from=VN-MOIT"
    assert raised.value.location == "/Envelope/Header/Subject/documentType"


# -- load-time checks ------------------------------------------------------------------------------------

GOOD_RULE = {"name": "good", "when": {"documentType": "eco.atiga-form-d"}, "to": ["customs"]}
DELETE = object()
ECO_FIELD = "fields/eco.atiga-form-d/broken"


def broken(path: str, value: Any) -> dict[str, Any]:
    """A valid configuration with one thing changed: the value at ``path`` ("a/0/b") set, or deleted."""
    data = config([copy.deepcopy(GOOD_RULE)])
    *parents, last = path.split("/")
    node: Any = data
    for step in parents:
        node = node[int(step)] if isinstance(node, list) else node[step]
    if isinstance(node, list) and int(last) == len(node):
        node.append(value)
    elif value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("rulez", [], ["unknown top-level key(s) rulez"]),
        ("rules/0/name", DELETE, ["rule #1 has no name"]),
        ("rules/0/to", DELETE, ["rule 'good'", "has no 'to'"]),
        ("rules/1", GOOD_RULE, ["rule 'good'", "duplicate rule name (rule #2)"]),
        ("rules/0/stopp", True, ["rule 'good'", "unknown key(s) stopp"]),
        ("rules/0/when/sender", "VN-MOIT", ["rule 'good'", "unknown condition key(s) sender"]),
        ("rules/0/when/function", {"startswith": "0"}, ["rule 'good'", "function: unknown operator 'startswith'"]),
        ("rules/0/when/function", {"matches": "(0"}, ["rule 'good'", "invalid regular expression '(0'"]),
        ("rules/0/when/function", [1, 2], ["rule 'good'", "function must be a quoted string, got the number 1"]),
        (
            "rules/0/when/field",
            {"importingCountry": {"not_in": [False]}},
            ["rule 'good'", "field importingCountry: not_in must be a quoted string, got False"],
        ),
        ("rules/0/to", ["customs", "costums"], ["rule 'good'", "destination 'costums', which is not defined"]),
        (ECO_FIELD, "string(eco:importingCountry", ["fields of 'eco.atiga-form-d'", "'broken'", "does not compile"]),
        (ECO_FIELD, "string(foo:x)", ["fields of 'eco.atiga-form-d'", "'broken'", "undeclared namespace prefix"]),
        (ECO_FIELD, "nosuchfunction(eco:items)", ["fields of 'eco.atiga-form-d'", "'broken'", "does not compile"]),
        (ECO_FIELD, "string(/eco:CertificateOfOrigin/eco:x)", ["fields of 'eco.atiga-form-d'", "is absolute"]),
        (
            "rules/0/when",
            {"documentType": ["eco.atiga-form-d", "licence.import"], "field": {"importingCountry": "TH"}},
            ["rule 'good'", "'importingCountry'", "not defined for document type 'licence.import'"],
        ),
        (
            "rules/0/when",
            {"field": {"importingCuontry": "TH"}},
            ["rule 'good'", "'importingCuontry', which no document type defines"],
        ),
        (
            "rules/0/to",
            ["asw:{importCountry}"],
            ["rule 'good'", "'importCountry'", "not defined for document type 'eco.atiga-form-d'"],
        ),
        ("rules/0/to", ["asw:{importingCountry!r}"], ["rule 'good'", "write fields as {name}"]),
        (
            "destinations/customs/retry",
            {"max_attempts": 0},
            ["destination 'customs'", "retry.max_attempts must be a whole number >= 1, got 0"],
        ),
        (
            "destinations/customs/retry",
            {"tiers": [5, "soon"]},
            ["destination 'customs'", "retry.tiers[1] must be a number of seconds, got 'soon'"],
        ),
        ("destinations/customs/retry", {"attempts": 3}, ["destination 'customs'", "retry: unknown key(s) attempts"]),
        ("destinations/customs/breaker", {"reset_after": -1}, ["destination 'customs'", "reset_after must be > 0"]),
        ("destinations/customs/adapter", DELETE, ["destination 'customs'", "has no adapter"]),
        ("destinations/cus toms", {"adapter": "http"}, ["destination 'cus toms'", "only letters, digits"]),
        ("version", 2, ["version must be 1, got 2"]),
    ],
)
def test_load_time_errors_name_the_file_and_the_culprit(path: str, value: Any, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as raised:
        RoutingTable.from_mapping(broken(path, value), source="rules.yaml")
    message = str(raised.value)
    assert message.startswith("rules.yaml: ")
    for part in expected:
        assert part in message


def test_the_configuration_the_broken_ones_start_from_is_valid() -> None:
    assert RoutingTable.from_mapping(broken("rules/0/description", "fine"), source="rules.yaml").rule_names == ("good",)


def test_a_repeated_yaml_key_is_refused_not_silently_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "version: 1\n"
        "destinations:\n"
        "  customs: {adapter: http, url: http://127.0.0.1:1/a}\n"
        "  customs: {adapter: http, url: http://127.0.0.1:1/b}\n"
        "rules:\n"
        "  - {name: all, to: [customs]}\n"
    )
    with pytest.raises(ConfigError, match=r"rules\.yaml: not valid YAML at line 4, column 3: duplicate key 'customs'"):
        RoutingTable.load(path)


def test_unreadable_and_malformed_files_are_config_errors_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read"):
        RoutingTable.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        RoutingTable.load(bad)


def test_load_reads_a_file_and_remembers_where_from(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "version: 1\n"
        "destinations:\n"
        "  customs: {adapter: http, url: 'http://127.0.0.1:9101/in'}\n"
        "rules:\n"
        "  - name: eco\n"
        "    when: {documentType: eco.atiga-form-d, function: ['01', '02']}\n"
        "    to: [customs]\n"
    )
    routing = RoutingTable.load(path)
    assert routing.source == str(path)
    assert routing.rule_names == ("eco",)
    assert destinations(routing.route(header(), eco())) == ["customs"]


# -- destinations --------------------------------------------------------------------------------------


def test_destination_config_separates_adapter_options_and_policies() -> None:
    data = config([GOOD_RULE])
    data["destinations"]["customs"]["retry"] = {"tiers": [1, 2.5], "max_attempts": 4}
    data["destinations"]["customs"]["breaker"] = {"failure_threshold": 2}
    routing = RoutingTable.from_mapping(data)
    customs = routing.destinations["customs"]
    assert customs == DestinationConfig(
        name="customs",
        adapter="http",
        options={"url": "http://127.0.0.1:9101/in", "timeout": 10},
        retry=RetryPolicy(tiers=(1.0, 2.5), max_attempts=4),
        breaker=BreakerPolicy(failure_threshold=2),
    )
    assert routing.destinations["archive"].retry == RetryPolicy()


def test_overrides_replace_options_merge_policies_and_leave_the_original_alone() -> None:
    data = config([GOOD_RULE])
    data["destinations"]["customs"]["retry"] = {"max_attempts": 7}
    original = RoutingTable.from_mapping(data)
    changed = original.with_destination_overrides(
        {"customs": {"url": "http://127.0.0.1:53211/inbox", "retry": {"tiers": [0.1]}}}
    )
    assert changed.destinations["customs"].options == {"url": "http://127.0.0.1:53211/inbox", "timeout": 10}
    assert changed.destinations["customs"].retry == RetryPolicy(tiers=(0.1,), max_attempts=7)
    assert original.destinations["customs"].options["url"] == "http://127.0.0.1:9101/in"
    assert changed.route(header(), eco()) == original.route(header(), eco())


def test_overrides_are_checked() -> None:
    routing = table(GOOD_RULE)
    with pytest.raises(ConfigError, match="override for destination 'nowhere', which is not defined"):
        routing.with_destination_overrides({"nowhere": {"url": "http://127.0.0.1:1/"}})
    with pytest.raises(ConfigError, match=r"destination 'customs': breaker\.failure_threshold"):
        routing.with_destination_overrides({"customs": {"breaker": {"failure_threshold": 0}}})


def test_the_table_does_not_change_when_the_callers_mapping_does() -> None:
    data = config([GOOD_RULE])
    routing = RoutingTable.from_mapping(data)
    data["destinations"]["customs"]["url"] = "http://127.0.0.1:1/changed"
    changed = routing.with_destination_overrides({"moit": {"timeout": 3}})
    assert changed.destinations["customs"].options["url"] == "http://127.0.0.1:9101/in"


# -- explain ---------------------------------------------------------------------------------------------


def test_explain_names_the_rule_behind_each_destination_and_why_others_failed() -> None:
    routing = table(
        {"name": "licences", "when": {"documentType": "licence.import", "function": "01"}, "to": ["moit"]},
        ASW_RULE,
        {
            "name": "timber-answers",
            "when": {"documentType": "eco.atiga-form-d", "function": "23", "field": {"hsCodes": {"prefix": "44"}}},
            "to": ["moit"],
        },
        {"name": "archive-all", "to": ["archive", "customs"]},
    )
    explanation = routing.explain(header(), eco("TH", ("090111",)), extra_destinations={"asw:TH"})
    assert explanation.ok
    assert explanation.decisions == (
        RouteDecision("customs", "to-importing-country"),
        RouteDecision("asw:TH", "to-importing-country"),
        RouteDecision("archive", "archive-all"),
    )
    assert explanation.fields == {"importingCountry": ("TH",), "hsCodes": ("090111",), "itemCount": ("1",)}
    licences = explanation.trace("licences")
    assert not licences.matched
    assert [(c.subject, c.actual, c.passed) for c in licences.conditions] == [
        ("documentType", "'eco.atiga-form-d'", False),
        ("function", "'01'", True),
    ]
    assert licences.conditions[0].reasons == ("'eco.atiga-form-d' is not 'licence.import'",)
    timber = explanation.trace("timber-answers")
    assert [(c.subject, c.passed) for c in timber.conditions] == [
        ("documentType", True),
        ("function", False),
        ("field hsCodes", False),
    ]
    assert explanation.trace("archive-all").destinations == ("archive", "customs")
    text = explanation.render()
    assert "  hsCodes          = '090111'" in text
    assert "1. licences: no match ('eco.atiga-form-d' is not 'licence.import')" in text
    assert "2. to-importing-country: MATCHED -> customs, asw:TH" in text
    assert "ok    field importingCountry not in ['VN'] (saw 'TH')" in text
    assert "3. timber-answers: no match\n" in text
    assert "FAIL  function: '01' is not '23'" in text
    assert "FAIL  field hsCodes: '090111': no value starts with any of ['44']" in text
    assert "asw:TH   <- rule to-importing-country" in text
    assert "archive  <- rule archive-all" in text


def test_explain_reports_no_route_instead_of_raising_and_marks_rules_after_stop() -> None:
    routing = table(
        {"name": "stopper", "when": {"from": "VN-MOIT"}, "to": ["asw:{importingCountry}"], "stop": True},
        {"name": "later", "to": ["customs"]},
    )
    explanation = routing.explain(header(), eco(None))
    assert explanation.error is not None
    assert explanation.error.code is ErrorCode.NO_ROUTE
    assert explanation.decisions == ()
    assert explanation.trace("stopper").stopped
    assert not explanation.trace("later").evaluated
    text = explanation.render()
    assert "2. later: not evaluated (an earlier rule said stop)" in text
    assert text.endswith(f"result: NO_ROUTE: {explanation.error.detail}")


def test_explain_reports_an_unknown_rendered_destination() -> None:
    explanation = table(ASW_RULE).explain(header(), eco("ZZ"))
    assert explanation.error is not None
    assert "'asw:ZZ'" in explanation.error.detail


# -- the shipped rules ------------------------------------------------------------------------------------


def lic(root: str, *hs_codes: str) -> etree._Element:
    document = etree.Element(f"{{{LIC}}}{root}")
    items = etree.SubElement(document, f"{{{LIC}}}items")
    for code in hs_codes:
        etree.SubElement(etree.SubElement(items, f"{{{LIC}}}item"), f"{{{LIC}}}hsCode").text = code
    return document


SPS = "urn:un:unece:uncefact:data:standard:SPSCertificate:17"
RAM = "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:21"


def ephyto(import_country: str) -> etree._Element:
    document = etree.Element(f"{{{SPS}}}SPSCertificate")
    consignment = etree.SubElement(document, f"{{{SPS}}}SPSConsignment")
    etree.SubElement(etree.SubElement(consignment, f"{{{RAM}}}ImportSPSCountry"), f"{{{RAM}}}ID").text = import_country
    return document


def other(tag: str) -> etree._Element:
    return etree.Element(tag)


PEERS = frozenset({"asw:TH", "asw:MY", "asw:SG"})
TRADER = "VN-TRADER-0101234567"
PERMIT = "{urn:nsw:permit:1}QuarantinePermit"
WCO = "{urn:wco:datamodel:WCO:DocumentMetaData-DMS:2}MetaData"
DEFAULT_CASES = [
    # licences
    ("licence application", header("licence.import", "01", TRADER), lic("ImportLicence", "847130"), ["moit"]),
    (
        "pharmaceutical import",
        header("licence.import", "02", TRADER),
        lic("ImportLicence", "847130", "300490"),
        ["moit", "moh"],
    ),
    ("pharmaceutical export", header("licence.export", "01", TRADER), lic("ExportLicence", "300490"), ["moit"]),
    ("licence answer", header("licence.export", "22", "VN-MOIT"), lic("ExportLicence"), ["trader-portal"]),
    (
        "licence approval",
        header("licence.import", "27", "VN-MOIT"),
        lic("ImportLicence"),
        ["trader-portal", "customs", "archive"],
    ),
    (
        "licence issued by MOH",
        header("licence.import", "01", "VN-MOH"),
        lic("ImportLicence"),
        ["trader-portal", "customs", "archive"],
    ),
    ("licence used at customs", header("licence.import", "11", "VN-CUSTOMS"), lic("ImportLicence"), ["moit"]),
    # permits
    ("permit application", header("permit.quarantine", "01", TRADER), other(PERMIT), ["mard-ppd", "customs"]),
    ("permit approval", header("permit.quarantine", "27", "VN-MARD-PPD"), other(PERMIT), ["trader-portal", "customs"]),
    ("permit customs feedback", header("permit.quarantine", "26", "VN-CUSTOMS"), other(PERMIT), ["mard-ppd"]),
    # e-C/O
    ("e-C/O application", header("eco.atiga-form-d", "01", TRADER), eco("TH"), ["moit"]),
    ("e-C/O approval", header("eco.atiga-form-d", "27", "VN-MOIT"), eco("TH"), ["trader-portal"]),
    (
        "e-C/O issued for an ASEAN peer",
        header("eco.atiga-form-d", "01", "VN-MOIT"),
        eco("TH"),
        ["customs", "archive", "asw:TH"],
    ),
    ("e-C/O issued for VN", header("eco.atiga-form-d", "01", "VN-MOIT"), eco("VN"), ["customs", "archive"]),
    (
        "e-C/O from a peer",
        header("eco.atiga-form-d", "01", "TH-NSW", sender_country="TH"),
        eco("VN"),
        ["customs", "archive"],
    ),
    ("e-C/O answer from customs", header("eco.atiga-form-d", "23", "VN-CUSTOMS"), eco("VN"), ["moit"]),
    ("e-C/O answer from a peer", header("eco.atiga-form-d", "22", "TH-NSW", sender_country="TH"), eco("TH"), ["moit"]),
    # ePhyto
    (
        "ePhyto issued for a peer",
        header("sps.ephyto", "01", "VN-MARD-PPD"),
        ephyto("TH"),
        ["customs", "archive", "asw:TH"],
    ),
    (
        "ePhyto from a peer",
        header("sps.ephyto", "01", "TH-NSW", sender_country="TH"),
        ephyto("VN"),
        ["customs", "mard-ppd", "archive"],
    ),
    ("ePhyto customs feedback", header("sps.ephyto", "26", "VN-CUSTOMS"), ephyto("TH"), ["mard-ppd"]),
    # customs declarations
    ("customs declaration", header("wco.dec.submit", "01", TRADER), other(WCO), ["customs"]),
    ("declaration cancelled", header("wco.dec.cancel", "03", TRADER), other(WCO), ["customs"]),
    ("customs notification", header("wco.res.notification", "29", "VN-CUSTOMS"), other(WCO), ["trader-portal"]),
    (
        "upload locations",
        header("wco.fileupload.response", "29", "VN-CUSTOMS"),
        other("{hmrc:fileupload}X"),
        ["trader-portal"],
    ),
    # a peer gateway's asynchronous receipt
    (
        "peer receipt",
        header("nsw.receipt", "99", "TH-NSW", sender_country="TH"),
        other("{urn:nsw:receipt:1}Receipt"),
        ["archive"],
    ),
]


def test_the_shipped_rules_load_and_name_every_registered_document_type() -> None:
    routing = RoutingTable.load(default_rules_path())
    assert set(routing.destinations) == {"customs", "moit", "mard-ppd", "moh", "trader-portal", "archive"}
    assert routing.destinations["archive"].adapter == "file"
    assert {d.adapter for name, d in routing.destinations.items() if name != "archive"} == {"http"}
    registry = yaml.safe_load((Path(__file__).parents[1] / "schemas" / "registry.yaml").read_text(encoding="utf-8"))
    assert set(registry["document_types"]) <= routing.document_types


@pytest.fixture(scope="module")
def shipped() -> RoutingTable:
    return RoutingTable.load(default_rules_path())


@pytest.mark.parametrize(("case", "message", "document", "expected"), DEFAULT_CASES, ids=[c[0] for c in DEFAULT_CASES])
def test_the_shipped_rules_route_the_known_document_types(
    shipped: RoutingTable, case: str, message: Header, document: etree._Element, expected: list[str]
) -> None:
    routing = shipped
    decisions = routing.route(message, document, extra_destinations=PEERS)
    assert destinations(decisions) == expected
    assert routing.explain(message, document, extra_destinations=PEERS).decisions == decisions


@pytest.mark.parametrize(
    "message",
    [
        header("licence.import", "99", TRADER),  # an acknowledgement is nobody's business
        header("eco.atiga-form-d", "01", "VN-CUSTOMS"),  # customs does not issue e-C/O
        header("unknown.type", "01", TRADER),
    ],
)
def test_the_shipped_rules_refuse_what_no_rule_covers(shipped: RoutingTable, message: Header) -> None:
    with pytest.raises(Rejected) as raised:
        shipped.route(message, eco(), extra_destinations=PEERS)
    assert raised.value.code is ErrorCode.NO_ROUTE


def test_the_shipped_field_xpaths_read_the_shipped_sample_documents(shipped: RoutingTable) -> None:
    seen: dict[str, Any] = {}
    for document_type in SAMPLE_DOCUMENT_TYPES:
        envelope = sample_envelope(document_type)
        explanation = shipped.explain(parse_header(envelope), content_document(envelope), extra_destinations=PEERS)
        assert explanation.ok, explanation.render()
        seen[document_type] = explanation.fields
    assert seen["eco.atiga-form-d"]["importingCountry"] == ("TH",)
    assert seen["sps.ephyto"]["importCountry"] == ("TH",)
    assert seen["sps.ephyto"]["hsCodes"] == ("081090",)
    for document_type in ("licence.import", "licence.export", "permit.quarantine", "eco.atiga-form-d"):
        assert seen[document_type]["hsCodes"], document_type
        assert all(code.isdigit() for code in seen[document_type]["hsCodes"]), document_type
    assert seen["permit.quarantine"]["permitKind"] == ("plant-quarantine",)
