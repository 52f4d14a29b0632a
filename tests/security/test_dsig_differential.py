"""Differential proof for ``gateway.security.dsig``: on every sample message and on a table of hostile and
benign mutations (plus random ones from hypothesis), the verifier must decide exactly as it did when
it called stock ``signxml.XMLVerifier`` -- the oracle below is verify.py's ``_check_signature`` as it was.

Two levels are compared for every input:

* ``Verifier.verify`` with the new path vs the same policy code with the stock path swapped in: the
  same rejection code, or on acceptance the same signed envelope (c14n bytes), header, party and
  Body-signature verdict. The input tree must be byte-for-byte unchanged afterwards (the new path
  detaches the enveloped Signature while it digests).
* ``dsig.verify_signature`` vs ``XMLVerifier().verify`` for the SystemSignature (STRICT and LEGACY) and,
  on the stock-signed tree, the Body signature: same verdict; on acceptance identical signed bytes and
  identical c14n of the signed tree.

The only differences allowed are listed per case, each with its reason: where the stock path let an
lxml or Python error escape (an HTTP 500, not a verdict) the new path rejects with SIGNATURE_INVALID,
and a few transform lists signxml silently ignores or half-applies are refused on purpose.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st
from lxml import etree
from signxml import XMLSigner, XMLVerifier
from signxml.algorithms import (
    CanonicalizationMethod,
    DigestAlgorithm,
    SignatureMethod,
    digest_algorithm_implementations,
)
from signxml.exceptions import InvalidCertificate, InvalidInput, SignXMLException
from signxml.verifier import SignatureConfiguration

from gateway.envelope import BODY, DS, NS, parse_header
from gateway.errors import ErrorCode, Rejected
from gateway.partners import PartnerRegistry
from gateway.samples import SAMPLE_SENDERS, sample_envelope
from gateway.security import dsig
from gateway.security import verify as verify_module
from gateway.security.parse import parse_message
from gateway.security.sign import Signer, to_bytes
from gateway.security.trust import TrustStore
from gateway.security.verify import LEGACY, STRICT, Verifier

N = {"ds": DS, "e": NS}
ACCEPT = "accept"
INVALID = ErrorCode.SIGNATURE_INVALID.value
SYSTEM_AT = "./"
BODY_AT = f"./{BODY}/"
ANSWERS = {"nsw.receipt": "TH-NSW", "nsw.rejection": "TH-NSW"}  # EC-signed (ECDSA-SHA256)
DSIG11 = "http://www.w3.org/2009/xmldsig11#"
TRADER = "VN-TRADER-0101234567"
SENDERS = {"licence": TRADER, "eco": "VN-MOIT", "receipt": "TH-NSW", "legacy": "VN-MOH"}
SYSTEM = "/e:Envelope/ds:Signature"
SIGNED_INFO = f"{SYSTEM}/ds:SignedInfo"
DS_ON_ENVELOPE = (b' xmlns:ds="http://www.w3.org/2000/09/xmldsig#"', b'<Envelope xmlns="urn:nsw:envelope:1"')
_MUTABLE = etree.XMLParser(resolve_entities=False, strip_cdata=False, remove_blank_text=False)


# -- the oracle: verify.py's signature step as it was, on stock signxml ----------------------------------


@dataclass(frozen=True)
class _StockSigned:
    data: bytes
    tag: str
    root: etree._Element | None


def _stock_check_signature(
    root: etree._Element, info: Any, config: SignatureConfiguration, where: str, *, parse: bool = True
) -> _StockSigned:
    """verify.py's ``_check_signature`` before dsig: stock ``XMLVerifier`` told where the signature sits."""
    location = BODY_AT if where == verify_module.BODY_SIGNATURE_AT else SYSTEM_AT
    try:
        result = XMLVerifier().verify(root, x509_cert=info.leaf, expect_config=replace(config, location=location))
    except InvalidCertificate as exc:
        raise Rejected(ErrorCode.CERT_UNTRUSTED, str(exc), where) from exc
    except InvalidInput as exc:
        raise Rejected(ErrorCode.SIGNATURE_INVALID, f"signature cannot be checked: {exc}", where) from exc
    except SignXMLException as exc:
        raise Rejected(ErrorCode.SIGNATURE_INVALID, f"signature does not verify: {exc}", where) from exc
    signed = result.signed_xml  # type: ignore[union-attr]
    if signed is None:
        raise Rejected(ErrorCode.SIGNATURE_INVALID, "the signed data is not XML", where)
    return _StockSigned(result.signed_data, signed.tag, signed)  # type: ignore[union-attr]


@dataclass(frozen=True)
class Outcome:
    verdict: str  # ACCEPT, an ErrorCode value, or "crash:<exception type>"
    signed: bytes = b""  # on ACCEPT: c14n of the signed envelope
    facts: tuple[object, ...] = ()  # on ACCEPT: header, party, algorithm, legacy flag, Body signature


def c14n(element: etree._Element) -> bytes:
    return bytes(etree.tostring(element, method="c14n", with_comments=True))  # comments too: nothing may differ


def outcome(verifier: Verifier, body: bytes, *, stock: bool) -> Outcome:
    try:
        parsed = parse_message(body)
    except Rejected as rejected:
        return Outcome(rejected.code.value)
    before = etree.tostring(parsed.root)
    swap = mock.patch.object(verify_module, "_check_signature", _stock_check_signature) if stock else nullcontext()
    try:
        with swap:
            verified = verifier.verify(parsed)
    except Rejected as rejected:
        result = Outcome(rejected.code.value)
    except Exception as exc:  # the stock path's escapes are part of what is compared
        result = Outcome(f"crash:{type(exc).__name__}")
    else:
        facts = (
            verified.header,
            verified.party,
            verified.signature_algorithm,
            verified.legacy_algorithm,
            verified.body_signature,
        )
        result = Outcome(ACCEPT, c14n(verified.envelope), facts)
    assert etree.tostring(parsed.root) == before, "verification must leave the input tree as it found it"
    return result


def _dsig_verdict(run: Callable[[], tuple[bytes, etree._Element | None]]) -> tuple[str, bytes, bytes]:
    try:
        data, tree = run()
    except InvalidCertificate:
        return "certificate", b"", b""
    except SignXMLException:
        return "reject", b"", b""
    except Exception as exc:  # stock escapes: compared below
        return f"crash:{type(exc).__name__}", b"", b""
    return ACCEPT, data, c14n(tree) if tree is not None else b""


def _stock_dsig(root: etree._Element, cert: Any, config: SignatureConfiguration) -> tuple[bytes, etree._Element | None]:
    result = XMLVerifier().verify(root, x509_cert=cert, expect_config=config)
    return result.signed_data, result.signed_xml  # type: ignore[union-attr]


def _new_dsig(
    root: etree._Element, signature: etree._Element, cert: Any, config: SignatureConfiguration
) -> tuple[bytes, etree._Element | None]:
    signed = dsig.verify_signature(root, signature, cert, config)
    return signed.data, signed.root


def compare_dsig(body: bytes, *, refused_at: str | None = None) -> None:
    """The two cores on the SystemSignature and, inside the envelope stock signxml returns as signed, on
    the Body signature; each under STRICT and LEGACY. ``refused_at``: the one location where the new core
    refuses on purpose what signxml accepts."""
    try:
        root: etree._Element | None = parse_message(body).root
    except Rejected:
        return
    for path, location in (("ds:Signature", SYSTEM_AT), ("e:Body/ds:Signature", BODY_AT)):
        signature = root.find(path, N) if root is not None else None
        cert = _leaf(signature)
        if root is None or signature is None or cert is None:
            return
        for policy in (STRICT, LEGACY):
            config = replace(policy, location=location)
            before = etree.tostring(root)
            stock = _dsig_verdict(partial(_stock_dsig, root, cert, config))
            new = _dsig_verdict(partial(_new_dsig, root, signature, cert, config))
            assert etree.tostring(root) == before
            if stock[0].startswith("crash:") or (location == refused_at and stock[0] == ACCEPT):
                assert new[0] == "reject", (location, stock[0], new[0])
            else:
                assert new == stock, (location, stock[0], new[0])
        signed = _dsig_verdict(partial(_stock_dsig, root, cert, replace(LEGACY, location=location)))
        root = etree.fromstring(signed[1]) if signed[0] == ACCEPT and location == SYSTEM_AT else None


def _leaf(signature: etree._Element | None) -> Any:
    if signature is None:
        return None
    blob = signature.findtext("ds:KeyInfo/ds:X509Data/ds:X509Certificate", namespaces=N)
    try:
        return verify_module._load_certificates((blob or "",))[0]
    except ValueError:
        return None


# -- building signed messages ---------------------------------------------------------------------------


@dataclass(repr=False)  # its cache of signed messages would flood hypothesis' reports
class Kit:
    signer: Callable[..., Signer]
    verifier: Verifier
    cache: dict[str, bytes] = field(default_factory=dict)

    def envelope(self, document_type: str, **overrides: Any) -> etree._Element:
        overrides.setdefault("message_id", str(uuid.uuid4()))
        overrides.setdefault("send_date", datetime.now(UTC))
        return sample_envelope(document_type, **overrides)

    def signed(
        self,
        document_type: str,
        *,
        body_signer: str | None = None,
        body_legacy: bool = False,
        legacy: bool = False,
        **overrides: Any,
    ) -> bytes:
        root = self.envelope(document_type, **overrides)
        if body_signer is not None:
            root = self.signer(body_signer, legacy_sha1=body_legacy).sign_content(root)
        return self.resign(root, legacy=legacy)

    def resign(self, root: etree._Element, *, legacy: bool = False, identity: str | None = None) -> bytes:
        """A fresh SystemSignature by the envelope's sender (or ``identity``) over ``root`` as it stands."""
        sender = identity or parse_header(root).sender.identity
        return to_bytes(self.signer(sender, legacy_sha1=legacy).sign_envelope(root))

    def base(self, name: str) -> bytes:
        """The few messages mutations start from, signed once per module."""
        if name not in self.cache:
            self.cache[name] = {
                "licence": lambda: self.signed("licence.import"),
                "eco": lambda: self.signed("eco.atiga-form-d", body_signer="VN-MOIT"),
                "receipt": lambda: self.signed("nsw.receipt"),
                "legacy": lambda: self.signed(
                    "licence.import", sender="VN-MOH", recipient="VN-NSW", function="27", legacy=True
                ),
            }[name]()
        return self.cache[name]

    def with_signer(self, identity: str, root: etree._Element, **options: Any) -> bytes:
        """Sign with stock ``XMLSigner`` and chosen algorithms (shapes ``Signer`` never makes)."""
        signer = self.signer(identity)
        is_ec = isinstance(signer.key, ec.EllipticCurvePrivateKey)
        sign_options = {
            k: options.pop(k)
            for k in list(options)
            if k in {"always_add_key_value", "inclusive_ns_prefixes", "exclude_c14n_transform_element"}
        }
        xml_signer = _AnyAlgorithmSigner(
            signature_algorithm=options.pop(
                "signature_algorithm", SignatureMethod.ECDSA_SHA256 if is_ec else SignatureMethod.RSA_SHA256
            ),
            digest_algorithm=options.pop("digest_algorithm", DigestAlgorithm.SHA256),
            c14n_algorithm=options.pop("c14n_algorithm", CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0),
        )
        assert not options, options
        return to_bytes(xml_signer.sign(root, key=signer.key, cert=list(signer.chain), **sign_options))


class _AnyAlgorithmSigner(XMLSigner):
    """signxml refuses to make SHA-1 signatures; the legacy policy needs them to be tested."""

    def check_deprecated_methods(self) -> None:
        return None


def tree(body: bytes) -> etree._Element:
    return etree.fromstring(body, _MUTABLE)


def out(root: etree._Element) -> bytes:
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


def system(root: etree._Element) -> etree._Element:
    found = root.find("ds:Signature", N)
    assert found is not None
    return found


def body_signature(root: etree._Element) -> etree._Element:
    found = root.find("e:Body/ds:Signature", N)
    assert found is not None
    return found


def edit(body: bytes, change: Callable[[etree._Element], object]) -> bytes:
    root = tree(body)
    change(root)
    return out(root)


def resign_signed_info(signature: etree._Element, signer: Signer) -> None:
    """A new SignatureValue over SignedInfo as it now stands (c14n of a standalone copy, as signxml does)."""
    signed_info = etree.fromstring(etree.tostring(signature)).find("ds:SignedInfo", N)
    method = signed_info.find("ds:CanonicalizationMethod", N).get("Algorithm")
    data = XMLVerifier()._c14n(signed_info, algorithm=CanonicalizationMethod(method))
    algorithm = SignatureMethod(signed_info.find("ds:SignatureMethod", N).get("Algorithm"))
    digest = digest_algorithm_implementations[algorithm]()
    if isinstance(signer.key, rsa.RSAPrivateKey):
        value = signer.key.sign(data, padding.PKCS1v15(), digest)
    else:
        r, s = utils.decode_dss_signature(signer.key.sign(data, ec.ECDSA(digest)))
        size = (signer.key.curve.key_size + 7) // 8
        value = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    signature.find("ds:SignatureValue", N).text = base64.b64encode(value).decode()


def ds(local: str, **attrs: str) -> etree._Element:
    return etree.Element(f"{{{DS}}}{local}", attrs, nsmap={"ds": DS})


def add_transform(algorithm: str, *, at: int | None = None) -> Callable[[etree._Element], None]:
    def change(signature: etree._Element) -> None:
        transforms = signature.find("ds:SignedInfo/ds:Reference/ds:Transforms", N)
        element = ds("Transform", Algorithm=algorithm)
        if at is None:
            transforms.append(element)
        else:
            transforms.insert(at, element)

    return change


def system_signed_info_edit(base: str, change: Callable[[etree._Element], object]) -> Callable[[Kit], bytes]:
    """Change the SystemSignature's SignedInfo and sign it again: a *valid* signature over an odd shape."""

    def build(kit: Kit) -> bytes:
        root = tree(kit.base(base))
        change(system(root))
        resign_signed_info(system(root), kit.signer(SENDERS[base], legacy_sha1=base == "legacy"))
        return out(root)

    return build


def body_signed_info_edit(change: Callable[[etree._Element], object]) -> Callable[[Kit], bytes]:
    """Change the Body signature's SignedInfo, sign it again, then a fresh SystemSignature over it all."""

    def build(kit: Kit) -> bytes:
        root = tree(kit.base("eco"))
        change(body_signature(root))
        resign_signed_info(body_signature(root), kit.signer("VN-MOIT"))
        return kit.resign(root)

    return build


def under_body_signature(change: Callable[[etree._Element], object]) -> Callable[[Kit], bytes]:
    """Mutate the e-C/O, then a fresh SystemSignature: only the Body signature can notice."""

    def build(kit: Kit) -> bytes:
        root = tree(kit.base("eco"))
        change(root)
        return kit.resign(root)

    return build


def other_signature_value(kit: Kit) -> bytes:
    donor = system(tree(kit.signed("licence.import"))).find("ds:SignatureValue", N).text
    return edit(kit.base("licence"), lambda r: setattr(system(r).find("ds:SignatureValue", N), "text", donor))


def foreign_certificate(base: str, identity: str) -> Callable[[Kit], bytes]:
    def build(kit: Kit) -> bytes:
        der = base64.b64encode(kit.signer(identity).chain[0].public_bytes(Encoding.DER)).decode()
        return edit(kit.base(base), lambda r: setattr(system(r).find(".//ds:X509Certificate", N), "text", der))

    return build


def swap_certificates(root: etree._Element) -> None:
    leaf, issuer = system(root).findall(".//ds:X509Certificate", N)
    leaf.text, issuer.text = issuer.text, leaf.text


def der_key_value_of(identity: str) -> Callable[[Kit], bytes]:
    def build(kit: Kit) -> bytes:
        root = tree(kit.base("licence"))
        key = kit.signer(identity).chain[0].public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        value = etree.Element(f"{{{DSIG11}}}DEREncodedKeyValue", nsmap={"dsig11": DSIG11})
        value.text = base64.b64encode(key).decode()
        system(root).find("ds:KeyInfo", N).append(value)
        return out(root)

    return build


def key_value_of(identity: str) -> Callable[[Kit], bytes]:
    def build(kit: Kit) -> bytes:
        root = tree(kit.base("licence"))
        numbers = kit.signer(identity).chain[0].public_key().public_numbers()
        value = ds("KeyValue")
        rsa_value = etree.SubElement(value, f"{{{DS}}}RSAKeyValue")
        for tag, number in (("Modulus", numbers.n), ("Exponent", numbers.e)):
            etree.SubElement(rsa_value, f"{{{DS}}}{tag}").text = base64.b64encode(
                number.to_bytes((number.bit_length() + 7) // 8, "big")
            ).decode()
        system(root).find("ds:KeyInfo", N).insert(0, value)
        return out(root)

    return build


def rebytes(base: str, pattern: bytes, replacement: bytes, count: int = 1) -> Callable[[Kit], bytes]:
    def build(kit: Kit) -> bytes:
        body = kit.base(base)
        changed = re.sub(pattern, replacement, body, count=count)
        assert changed != body, pattern
        return changed

    return build


def ds_on_envelope(base: str) -> Callable[[Kit], bytes]:
    declaration, envelope = DS_ON_ENVELOPE
    return lambda kit: kit.base(base).replace(declaration, b"").replace(envelope, envelope + declaration, 1)


def tree_edit(base: str, change: Callable[[etree._Element], object]) -> Callable[[Kit], bytes]:
    return lambda kit: edit(kit.base(base), change)


def text_of(path: str, text: str) -> Callable[[etree._Element], None]:
    def change(root: etree._Element) -> None:
        root.xpath(path, namespaces=N)[0].text = text

    return change


def set_attr(path: str, name: str, value: str) -> Callable[[etree._Element], None]:
    def change(root: etree._Element) -> None:
        root.xpath(path, namespaces=N)[0].set(name, value)

    return change


def insert(path: str, make: Callable[[], etree._Element], index: int = 0) -> Callable[[etree._Element], None]:
    def change(root: etree._Element) -> None:
        root.xpath(path, namespaces=N)[0].insert(index, make())

    return change


def tail_of(path: str, tail: str) -> Callable[[etree._Element], None]:
    def change(root: etree._Element) -> None:
        root.xpath(path, namespaces=N)[0].tail = tail

    return change


def move_system_signature_first(root: etree._Element) -> None:
    root.insert(0, system(root))


def move_body_signature_first(root: etree._Element) -> None:
    body_signature(root).getparent().insert(0, body_signature(root))


def duplicate_system_signature(root: etree._Element) -> None:
    root.append(etree.fromstring(etree.tostring(system(root))))


def move_system_signature_into_header(root: etree._Element) -> None:
    root.find("e:Header", N).append(system(root))


def second_reference(signature: etree._Element) -> None:
    signed_info = signature.find("ds:SignedInfo", N)
    signed_info.append(etree.fromstring(etree.tostring(signed_info.find("ds:Reference", N))))


def reference_uri(uri: str) -> Callable[[etree._Element], None]:
    return lambda signature: signature.find("ds:SignedInfo/ds:Reference", N).set("URI", uri)


def signed_info_attr(path: str, name: str, value: str) -> Callable[[etree._Element], None]:
    return lambda signature: signature.find(path, N).set(name, value)


def stock_variant(
    identity: str,
    document_type: str,
    *,
    sender: str | None = None,
    prepare: Callable[[etree._Element], etree._Element] | None = None,
    **options: Any,
) -> Callable[[Kit], bytes]:
    """A message signed by stock ``XMLSigner`` with ``options``, ``prepare`` changing the envelope first."""

    def build(kit: Kit) -> bytes:
        root = kit.envelope(document_type, **({"sender": sender} if sender else {}))
        return kit.with_signer(identity, prepare(root) if prepare else root, **options)

    return build


def declare_x(root: etree._Element) -> etree._Element:
    """Envelope also declares an unused ``xmlns:x``: exclusive and inclusive c14n differ on it."""
    declared = etree.Element(root.tag, nsmap={None: NS, "x": "urn:x"})
    declared.extend(list(root))
    return declared


def with_comment(root: etree._Element) -> etree._Element:
    root.find("e:Header", N).insert(0, etree.Comment("signed comment"))
    return root


C14N = CanonicalizationMethod


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Kit], bytes]
    expect: str  # the verdict of the new path
    stock: str | None = None  # the stock path's verdict where it differs (why says why)
    why: str = ""
    refused_at: str | None = None  # where the new core refuses on purpose what stock signxml accepts


CRASH_WHY = "stock signxml let an lxml/Python error escape verify.py (HTTP 500); now a SIGNATURE_INVALID verdict"
REFUSED_WHY = "transform lists signxml ignores or half-applies are refused: only enveloped + one c14n are ours"


def crashed(name: str, build: Callable[[Kit], bytes], error: str) -> Case:
    """The stock path raised ``error`` out of verify.py; the new one rejects."""
    return Case(name, build, INVALID, f"crash:{error}", CRASH_WHY)


def refused(name: str, build: Callable[[Kit], bytes], why: str, at: str = SYSTEM_AT) -> Case:
    """Stock signxml accepts; the new core refuses on purpose, at ``at``."""
    return Case(name, build, INVALID, ACCEPT, f"{REFUSED_WHY} ({why})", refused_at=at)


def first_transform_last(signature: etree._Element) -> None:
    transforms = signature.find("ds:SignedInfo/ds:Reference/ds:Transforms", N)
    transforms.append(transforms[0])


def drop_first_transform(signature: etree._Element) -> None:
    transforms = signature.find("ds:SignedInfo/ds:Reference/ds:Transforms", N)
    transforms.remove(transforms[0])


CASES: list[Case] = [
    # untouched shapes, every signer kind
    Case("licence as signed", lambda k: k.base("licence"), ACCEPT),
    Case("e-C/O with Body signature as signed", lambda k: k.base("eco"), ACCEPT),
    Case("receipt signed with ECDSA", lambda k: k.base("receipt"), ACCEPT),
    Case("legacy RSA-SHA1 + inclusive c14n from a party allowed it", lambda k: k.base("legacy"), ACCEPT),
    Case("legacy RSA-SHA1 from a party not allowed it", lambda k: k.signed("licence.import", legacy=True), INVALID),
    Case(
        "legacy Body signature (RSA-SHA1, inclusive c14n inside the signed envelope)",
        lambda k: k.signed("eco.atiga-form-d", body_signer="VN-MOH", body_legacy=True),
        ErrorCode.SENDER_MISMATCH.value,  # VN-MOH is not the e-C/O authority: both paths get that far
    ),
    Case(
        "legacy Body signature on an answer (no authority check)",
        lambda k: k.signed("eco.atiga-form-d", body_signer="VN-MOH", body_legacy=True, function="23"),
        ACCEPT,
    ),
    Case(
        "expired certificate",
        lambda k: k.resign(k.envelope("licence.import"), identity="test/expired"),
        ErrorCode.CERT_EXPIRED.value,
    ),
    # tampering
    Case("Body text changed", tree_edit("licence", text_of("//*[local-name()='applicationNumber']", "X-1")), INVALID),
    Case("Content Id changed", tree_edit("licence", set_attr("/e:Envelope/e:Body/e:Content", "Id", "c2")), INVALID),
    Case("attribute added in Header", tree_edit("licence", set_attr("/e:Envelope/e:Header", "x", "1")), INVALID),
    Case("messageId changed", tree_edit("licence", text_of("//e:messageId", str(uuid.uuid4()))), INVALID),
    Case(
        "DigestValue changed",
        tree_edit("licence", text_of(SYSTEM + "//ds:DigestValue", base64.b64encode(b"0" * 32).decode())),
        INVALID,
    ),
    Case(
        "CanonicalizationMethod changed to inclusive",
        tree_edit(
            "licence",
            set_attr(
                SIGNED_INFO + "/ds:CanonicalizationMethod",
                "Algorithm",
                C14N.CANONICAL_XML_1_0.value,
            ),
        ),
        INVALID,
    ),
    Case(
        "SignatureMethod changed to rsa-sha512",
        tree_edit(
            "licence",
            set_attr(
                SIGNED_INFO + "/ds:SignatureMethod",
                "Algorithm",
                SignatureMethod.RSA_SHA512.value,
            ),
        ),
        INVALID,
    ),
    Case("SignatureValue of another message", other_signature_value, INVALID),
    Case("certificate of another party in KeyInfo", foreign_certificate("licence", "VN-MOIT"), INVALID),
    Case(
        "ECDSA SignatureValue truncated",
        tree_edit("receipt", text_of(SYSTEM + "/ds:SignatureValue", base64.b64encode(b"1" * 48).decode())),
        INVALID,
    ),
    # benign changes: canonicalisation makes them invisible
    Case(
        "comment in Body", tree_edit("licence", insert("//*[local-name()='items']", lambda: etree.Comment("x"))), ACCEPT
    ),
    Case(
        "comment in SignedInfo",
        tree_edit("licence", insert(SIGNED_INFO, lambda: etree.Comment("x"), 1)),
        ACCEPT,
    ),
    Case(
        "processing instruction in Header",
        tree_edit("licence", insert("/e:Envelope/e:Header", lambda: etree.PI("x", "y"))),
        INVALID,
    ),
    Case(
        "comment and PI before the root",
        rebytes("licence", rb"\?>\n<Envelope", b"?>\n<!-- c --><?x y?>\n<Envelope"),
        ACCEPT,
    ),
    Case("whitespace after the root", lambda k: k.base("licence") + b"\n \n", ACCEPT),
    Case("whitespace between Header elements", tree_edit("licence", tail_of("//e:From", "\n  ")), INVALID),
    Case(
        "whitespace inside SignatureValue",
        rebytes("licence", rb"<ds:SignatureValue>", b"<ds:SignatureValue>\n  "),
        ACCEPT,
    ),
    Case("whitespace inside KeyInfo", rebytes("licence", rb"<ds:KeyInfo>", b"<ds:KeyInfo>\n "), ACCEPT),
    Case("whitespace inside SignedInfo", rebytes("licence", rb"<ds:SignedInfo>", b"<ds:SignedInfo>\n "), INVALID),
    Case("whitespace after the SystemSignature", tree_edit("licence", tail_of(SYSTEM, "\n")), INVALID),
    Case(
        "CDATA for a text node",
        rebytes("licence", rb"<version>1</version>", b"<version><![CDATA[1]]></version>"),
        ACCEPT,
    ),
    Case("character reference for a letter", rebytes("licence", rb"<countryCode>VN<", b"<countryCode>&#86;N<"), ACCEPT),
    Case("single-quoted attribute", rebytes("licence", rb'Id="content"', b"Id='content'"), ACCEPT),
    Case(
        "empty element written open/close",
        rebytes("licence", rb'(<ds:SignatureMethod Algorithm="[^"]+")/>', rb"\1></ds:SignatureMethod>"),
        ACCEPT,
    ),
    Case(
        "Id attribute on the Signature element",
        tree_edit("licence", set_attr(SYSTEM, "Id", "sig")),
        ACCEPT,
    ),
    Case(
        "ds:Object with content in the Signature",
        tree_edit("licence", insert(SYSTEM, lambda: ds("Object"), 3)),
        ACCEPT,
    ),
    Case("KeyValue matching the certificate", key_value_of(TRADER), ACCEPT),
    Case("KeyValue of another key", key_value_of("VN-MOIT"), INVALID),
    Case("DEREncodedKeyValue matching the certificate", der_key_value_of(TRADER), ACCEPT),
    Case("DEREncodedKeyValue of another key", der_key_value_of("VN-MOIT"), INVALID),
    Case("RSA certificate under an ECDSA signature", foreign_certificate("receipt", TRADER), INVALID),
    Case(
        "certificate chain in the wrong order",
        tree_edit("licence", swap_certificates),
        ErrorCode.CERT_UNTRUSTED.value,
    ),
    Case("comment inside the Signature", tree_edit("licence", insert(SYSTEM, lambda: etree.Comment("c"))), ACCEPT),
    # namespaces
    Case("ds declared on Envelope, not on the Signatures", ds_on_envelope("licence"), ACCEPT),
    Case("ds declared on Envelope, the Body signature's too", ds_on_envelope("eco"), ACCEPT),
    Case("ds declared on Envelope, legacy inclusive c14n", ds_on_envelope("legacy"), INVALID),
    Case("ds prefix renamed", rebytes("licence", rb"(</?|xmlns:)ds([:=])", rb"\1dsig\2", 0), INVALID),
    Case(
        "unused declaration on Envelope (exclusive c14n)",
        rebytes(
            "licence", rb'<Envelope xmlns="urn:nsw:envelope:1"', b'<Envelope xmlns="urn:nsw:envelope:1" xmlns:x="urn:x"'
        ),
        ACCEPT,
    ),
    Case(
        "unused declaration on Envelope (inclusive c14n)",
        rebytes(
            "legacy", rb'<Envelope xmlns="urn:nsw:envelope:1"', b'<Envelope xmlns="urn:nsw:envelope:1" xmlns:x="urn:x"'
        ),
        INVALID,
    ),
    Case(
        "default namespace redeclared on Header",
        rebytes("licence", rb"<Header>", b'<Header xmlns="urn:nsw:envelope:1">'),
        ACCEPT,
    ),
    Case(
        "default namespace redeclared on Header (inclusive)",
        rebytes("legacy", rb"<Header>", b'<Header xmlns="urn:nsw:envelope:1">'),
        ACCEPT,
    ),
    # where the signature sits
    Case("SystemSignature moved before Header", tree_edit("licence", move_system_signature_first), ACCEPT),
    Case(
        "SystemSignature moved into Header",
        tree_edit("licence", move_system_signature_into_header),
        ErrorCode.SIGNATURE_MISSING.value,
    ),
    Case("two SystemSignatures", tree_edit("licence", duplicate_system_signature), INVALID),
    crashed("text after the SystemSignature", tree_edit("licence", tail_of(SYSTEM, "junk")), "XMLSyntaxError"),
    # references
    Case(
        "second Reference (re-signed)",
        system_signed_info_edit("licence", second_reference),
        INVALID,
    ),
    Case(
        "SystemSignature over #content (re-signed)",
        system_signed_info_edit("licence", reference_uri("#content")),
        INVALID,
    ),
    Case(
        "Reference #xpointer(/) (re-signed)",
        system_signed_info_edit("licence", reference_uri("#xpointer(/)")),
        INVALID,
    ),
    Case(
        "Reference with a Type attribute (re-signed)",
        system_signed_info_edit("licence", signed_info_attr("ds:SignedInfo/ds:Reference", "Type", "urn:t")),
        ACCEPT,
    ),
    # transforms
    Case(
        "c14n transform before enveloped (re-signed)",
        system_signed_info_edit("licence", first_transform_last),
        ACCEPT,
    ),
    refused(
        "XPath transform added (re-signed)",
        system_signed_info_edit("licence", add_transform("http://www.w3.org/TR/1999/REC-xpath-19991116")),
        "signxml skips the XPath transform and digests without it",
    ),
    refused(
        "XSLT transform added (re-signed)",
        system_signed_info_edit("licence", add_transform("http://www.w3.org/TR/1999/REC-xslt-19991116")),
        "signxml skips the XSLT transform",
    ),
    refused(
        "enveloped transform twice (re-signed)",
        system_signed_info_edit("licence", add_transform(dsig.ENVELOPED, at=0)),
        "a second enveloped transform is meaningless",
    ),
    crashed(
        "two c14n transforms (re-signed)",
        system_signed_info_edit("licence", add_transform(C14N.CANONICAL_XML_1_0.value)),
        "TypeError",
    ),
    crashed(
        "base64 transform (re-signed)",
        system_signed_info_edit("licence", add_transform("http://www.w3.org/2000/09/xmldsig#base64", at=0)),
        "TypeError",
    ),
    Case(
        "no enveloped transform (re-signed)",
        system_signed_info_edit("licence", drop_first_transform),
        INVALID,
    ),
    Case(
        "HMAC SignatureMethod (re-signed with the RSA key)",
        system_signed_info_edit(
            "licence",
            signed_info_attr("ds:SignedInfo/ds:SignatureMethod", "Algorithm", SignatureMethod.HMAC_SHA256.value),
        ),
        INVALID,
    ),
    # malformed Signature elements
    crashed("empty SignatureValue", tree_edit("licence", text_of(SYSTEM + "/ds:SignatureValue", "")), "TypeError"),
    Case(
        "SignatureValue not base64 (the schema lets it through, b64decode drops the junk)",
        tree_edit("licence", text_of(SYSTEM + "/ds:SignatureValue", "!!!!")),
        INVALID,
    ),
    crashed(
        "unknown ds element in Signature", tree_edit("licence", insert(SYSTEM, lambda: ds("Foo"), 2)), "DocumentInvalid"
    ),
    Case(
        "unknown CanonicalizationMethod",
        tree_edit(
            "licence",
            set_attr(SIGNED_INFO + "/ds:CanonicalizationMethod", "Algorithm", "urn:x"),
        ),
        INVALID,
    ),
    # stock XMLSigner variants: other canonicalisations and algorithms
    *(
        Case(
            f"stock signer, c14n {method.name}",
            stock_variant(TRADER, "licence.import", c14n_algorithm=method),
            ACCEPT,
        )
        for method in CanonicalizationMethod
    ),
    Case(
        "stock signer, exclusive c14n with comments over a comment",
        stock_variant(
            TRADER,
            "licence.import",
            prepare=with_comment,
            c14n_algorithm=C14N.EXCLUSIVE_XML_CANONICALIZATION_1_0_WITH_COMMENTS,
        ),
        ACCEPT,
    ),
    Case(
        "stock signer, inclusive c14n with comments over a comment",
        stock_variant(
            TRADER, "licence.import", prepare=with_comment, c14n_algorithm=C14N.CANONICAL_XML_1_0_WITH_COMMENTS
        ),
        ACCEPT,
    ),
    Case(
        "comment added under c14n with comments",
        lambda k: edit(
            stock_variant(
                TRADER, "licence.import", c14n_algorithm=C14N.EXCLUSIVE_XML_CANONICALIZATION_1_0_WITH_COMMENTS
            )(k),
            with_comment,
        ),
        INVALID,
    ),
    Case(
        "stock signer, RSA-SHA512 / SHA-512",
        stock_variant(
            TRADER,
            "licence.import",
            signature_algorithm=SignatureMethod.RSA_SHA512,
            digest_algorithm=DigestAlgorithm.SHA512,
        ),
        ACCEPT,
    ),
    Case(
        "stock signer, ECDSA-SHA384 / SHA-384",
        stock_variant(
            "TH-NSW",
            "nsw.receipt",
            signature_algorithm=SignatureMethod.ECDSA_SHA384,
            digest_algorithm=DigestAlgorithm.SHA384,
        ),
        ACCEPT,
    ),
    Case(
        "stock signer, RSA-PSS (SHA256-MGF1)",
        stock_variant(TRADER, "licence.import", signature_algorithm=SignatureMethod.SHA256_RSA_MGF1),
        ACCEPT,
    ),
    Case(
        "stock signer, RSA-SHA256 with a SHA-1 digest, party allowed legacy",
        stock_variant("VN-MOH", "licence.import", sender="VN-MOH", digest_algorithm=DigestAlgorithm.SHA1),
        ACCEPT,
    ),
    Case(
        "stock signer, RSA-SHA256 with a SHA-1 digest, party not allowed legacy",
        stock_variant(TRADER, "licence.import", digest_algorithm=DigestAlgorithm.SHA1),
        INVALID,
    ),
    Case(
        "stock signer, ECDSA-SHA1",
        stock_variant("TH-NSW", "nsw.receipt", signature_algorithm=SignatureMethod.ECDSA_SHA1),
        INVALID,
    ),
    Case(
        "stock signer, KeyValue next to the certificate",
        stock_variant(TRADER, "licence.import", always_add_key_value=True),
        ACCEPT,
    ),
    Case(
        "stock signer, no c14n transform, inclusive 1.1 (the default reference c14n)",
        stock_variant(
            TRADER,
            "licence.import",
            c14n_algorithm=C14N.CANONICAL_XML_1_1,
            exclude_c14n_transform_element=True,
        ),
        ACCEPT,
    ),
    Case(
        "stock signer, no c14n transform, exclusive digest (the same bytes as inclusive here)",
        stock_variant(TRADER, "licence.import", exclude_c14n_transform_element=True),
        ACCEPT,
    ),
    Case(
        "stock signer, no c14n transform, exclusive digest over an unused declaration (inclusive differs)",
        stock_variant(TRADER, "licence.import", prepare=declare_x, exclude_c14n_transform_element=True),
        INVALID,
    ),
    Case(
        "stock signer, exclusive c14n over an unused declaration",
        stock_variant(TRADER, "licence.import", prepare=declare_x),
        ACCEPT,
    ),
    crashed(
        "stock signer, InclusiveNamespaces PrefixList (signxml's xmldsig schema refuses the element)",
        stock_variant(TRADER, "licence.import", prepare=declare_x, inclusive_ns_prefixes=["x"]),
        "DocumentInvalid",
    ),
    # the Body signature (a fresh SystemSignature over each change, so only the Body signature can notice)
    Case(
        "Content text changed under the Body signature",
        under_body_signature(text_of("//*[local-name()='hsCode']", "999999")),
        INVALID,
    ),
    Case(
        "comment in Content under the Body signature",
        under_body_signature(insert("//*[local-name()='items']", lambda: etree.Comment("x"))),
        ACCEPT,
    ),
    Case("Body signature moved before Content", under_body_signature(move_body_signature_first), ACCEPT),
    Case(
        "whitespace between Content and the Body signature",
        under_body_signature(tail_of("/e:Envelope/e:Body/e:Content", "\n  ")),
        ACCEPT,
    ),
    crashed(
        "carriage return (&#13;) after Content",
        under_body_signature(tail_of("/e:Envelope/e:Body/e:Content", "\r")),
        "XMLSyntaxError",
    ),
    crashed(
        "text after Content", under_body_signature(tail_of("/e:Envelope/e:Body/e:Content", "junk")), "XMLSyntaxError"
    ),
    crashed(
        "text after the Body signature",
        under_body_signature(tail_of("/e:Envelope/e:Body/ds:Signature", "junk")),
        "XMLSyntaxError",
    ),
    Case("Id=content also on Header", under_body_signature(set_attr("/e:Envelope/e:Header", "Id", "content")), INVALID),
    Case(
        "foreign-namespace Id=content on Header",
        under_body_signature(set_attr("/e:Envelope/e:Header", "{urn:x}Id", "content")),
        INVALID,
    ),
    Case(
        "ID=content on Header (signxml looks for Id first)",
        under_body_signature(set_attr("/e:Envelope/e:Header", "ID", "content")),
        ACCEPT,
    ),
    Case(
        "xml:lang on Envelope",
        under_body_signature(set_attr("/e:Envelope", "{http://www.w3.org/XML/1998/namespace}lang", "vi")),
        ACCEPT,
    ),
    Case("Body signature over #other", body_signed_info_edit(reference_uri("#other")), INVALID),
    Case("Body signature over the whole envelope", body_signed_info_edit(reference_uri("")), INVALID),
    refused(
        "Body signature with an unknown transform",
        body_signed_info_edit(add_transform("http://www.w3.org/TR/1999/REC-xpath-19991116")),
        "signxml ignores the unknown transform",
        at=BODY_AT,
    ),
    Case(
        "Body signature DigestValue changed",
        body_signed_info_edit(
            lambda s: setattr(s.find(".//ds:DigestValue", N), "text", base64.b64encode(b"1" * 32).decode())
        ),
        INVALID,
    ),
]


@pytest.fixture(scope="module")
def kit(pki_dir: Path, signers: Callable[..., Signer]) -> Kit:
    verifier = Verifier(TrustStore.load(pki_dir / "trust"), PartnerRegistry.load(pki_dir / "partners.yaml"))
    return Kit(signers, verifier)


def check(kit: Kit, body: bytes, *, refused_at: str | None = None) -> tuple[Outcome, Outcome]:
    new = outcome(kit.verifier, body, stock=False)
    stock = outcome(kit.verifier, body, stock=True)
    compare_dsig(body, refused_at=refused_at)
    return new, stock


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_mutation_table(kit: Kit, case: Case) -> None:
    body = case.build(kit)
    new, stock = check(kit, body, refused_at=case.refused_at)
    assert new.verdict == case.expect, (new.verdict, stock.verdict)
    assert stock.verdict == (case.stock or case.expect), (new.verdict, stock.verdict)
    if case.stock is None:
        assert new == stock
    else:
        assert case.why


@pytest.mark.parametrize("document_type", sorted({*SAMPLE_SENDERS, *ANSWERS}))
@pytest.mark.parametrize("body_signed", [False, True], ids=["system-signature", "with-body-signature"])
def test_every_sample_message(kit: Kit, document_type: str, body_signed: bool) -> None:
    sender = {**{t: s[0] for t, s in SAMPLE_SENDERS.items()}, **ANSWERS}[document_type]
    body = kit.signed(document_type, body_signer=sender if body_signed else None)  # the sender is its authority
    new, stock = check(kit, body)
    assert new.verdict == ACCEPT
    assert new == stock
    assert new.facts[-1].present is body_signed


# -- random mutations --------------------------------------------------------------------------------------

_OPS = ("text", "tail", "comment", "pi", "attr", "remove", "move", "duplicate", "cdata", "nsdecl")


def _mutate(root: etree._Element, op: str, pick: int, other: int) -> None:
    elements = [e for e in root.iter() if isinstance(e.tag, str)]
    target = elements[pick % len(elements)]
    destination = elements[other % len(elements)]
    if op == "text":
        target.text = (target.text or "") + "z"
    elif op == "tail" and target is not root:
        target.tail = (target.tail or "") + "\n "
    elif op == "comment":
        target.insert(other % (len(target) + 1), etree.Comment("c"))
    elif op == "pi":
        target.insert(other % (len(target) + 1), etree.PI("p", "q"))
    elif op == "attr":
        target.set("Id" if other % 2 else "x", "content" if other % 3 == 0 else "v")
    elif op == "remove" and target is not root:
        target.getparent().remove(target)
    elif (
        op == "move" and target is not root and target not in destination.iterancestors() and target is not destination
    ):
        destination.append(target)
    elif op == "duplicate" and target is not root:
        target.addnext(etree.fromstring(etree.tostring(target)))
    elif op == "cdata" and target.text and len(target) == 0:
        target.text = etree.CDATA(target.text)
    elif op == "nsdecl":
        replacement = etree.Element(target.tag, dict(target.attrib), nsmap={**target.nsmap, "zz": "urn:zz"})
        replacement.text, replacement.tail = target.text, target.tail
        replacement.extend(list(target))
        if target is not root:
            target.getparent().replace(target, replacement)


@settings(
    max_examples=1000, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    base=st.sampled_from(sorted(SENDERS)),
    ops=st.lists(
        st.tuples(st.sampled_from(_OPS), st.integers(0, 10_000), st.integers(0, 10_000)), min_size=1, max_size=3
    ),
    resign=st.sampled_from(["none", "system", "body and system"]),
)
def test_random_mutations(kit: Kit, base: str, ops: list[tuple[str, int, int]], resign: str) -> None:
    """Random edits of the tree, signed again or not: whatever each path decides, they decide alike."""
    root = tree(kit.base(base))
    for op, pick, other in ops:
        _mutate(root, op, pick, other)
    try:
        if resign == "body and system" and root.find("e:Body/e:Content", N) is not None:
            root = kit.signer(SENDERS[base], legacy_sha1=base == "legacy").sign_content(root)
        body = out(root) if resign == "none" else kit.resign(root, legacy=base == "legacy", identity=SENDERS[base])
    except InvalidInput:  # e.g. two elements with Id="content": the signer refuses, nothing to verify
        reject()
    new, stock = check(kit, body)
    event(f"{base}, re-signed {resign}: {new.verdict} / stock {stock.verdict}")
    if stock.verdict.startswith("crash:"):
        assert new.verdict == INVALID, (new, stock)
    else:
        assert new == stock


def test_the_tree_is_restored_when_canonicalisation_fails(kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    root = parse_message(kit.base("legacy")).root  # a Signature tail and a preceding sibling to put back
    system(root).tail = "\n"
    before = etree.tostring(root)
    signature = system(root)
    processor = dsig._signxml(LEGACY)
    canonicalise = processor._c14n

    def fails_while_detached(nodes: etree._Element, **options: Any) -> bytes:
        if signature.getparent() is None:  # only the digest of the envelope runs with the Signature detached
            raise RuntimeError("c14n failed")
        return bytes(canonicalise(nodes, **options))

    monkeypatch.setattr(processor, "_c14n", fails_while_detached)
    with pytest.raises(RuntimeError, match="c14n failed"):
        dsig.verify_signature(root, signature, _leaf(signature), LEGACY)
    assert etree.tostring(root) == before
    assert signature.getparent() is root


def test_signed_tree_is_the_only_signed_data(kit: Kit) -> None:
    """An unsigned ds:Object (or anything else outside the Reference) never reaches the signed tree."""
    body = edit(kit.base("licence"), insert(SYSTEM, lambda: _object_with("secret"), 3))
    verified = kit.verifier.verify(parse_message(body))
    assert b"secret" not in etree.tostring(verified.envelope)
    assert verified.envelope.find("ds:Signature", N) is None


def _object_with(text: str) -> etree._Element:
    element = ds("Object")
    element.text = text
    return element


def test_only_a_document_root_is_accepted(kit: Kit) -> None:
    root = parse_message(kit.base("licence")).root
    with pytest.raises(ValueError, match="root element"):
        dsig.verify_signature(root.find("e:Body", N), system(root), _leaf(system(root)), STRICT)
