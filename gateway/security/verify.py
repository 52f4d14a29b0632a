"""Verification stage: ``ParsedMessage -> VerifiedMessage``.

Policy, in order (each step fails closed with its own code):

1. The SystemSignature is the ``ds:Signature`` child of ``Envelope`` (exactly one), and its single
   Reference covers the whole envelope (``URI=""`` with the enveloped transform). Anything else --
   a reference to an Id, several references -- is refused, which is what defeats signature wrapping:
   no part of the envelope can be outside what was signed.
2. The signer's certificate (KeyInfo/X509Data) chains to a trust anchor, is within its validity and
   not revoked (``TrustStore``, decisions cached per fingerprint).
3. The certificate is bound to a registered party (``PartnerRegistry``); that party's entry decides
   whether legacy RSA-SHA1 is acceptable.
4. Digest and signature value verify with exactly that certificate (``dsig.verify_signature``: signxml's
   algorithms and checks, without its copies of the document).
5. From here on only the *signed* tree is used. Its ``From/identity`` must be the bound party.
6. An issuing authority's signature over ``Body/Content``, when present, must verify too, reference
   ``Body/Content`` itself, come from a trusted certificate and, where the registry names authorities
   for the document type, from one of them.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Final

from cryptography import x509
from lxml import etree
from signxml.algorithms import DigestAlgorithm, SignatureMethod
from signxml.exceptions import InvalidCertificate, InvalidInput, SignXMLException
from signxml.verifier import SignatureConfiguration

from gateway.envelope import CONTENT, ENVELOPE, NSMAP, parse_header
from gateway.errors import ErrorCode, Rejected
from gateway.model import BodySignature, Header, ParsedMessage, VerifiedMessage
from gateway.security.dsig import ENVELOPED, SignedData, verify_signature

if TYPE_CHECKING:
    from gateway.partners import PartnerRegistry, Party
    from gateway.security.trust import TrustStore

ENVELOPED_TRANSFORM: Final = ENVELOPED
SYSTEM_SIGNATURE_AT: Final = "/Envelope/ds:Signature"
ISSUING_FUNCTIONS: Final = frozenset({"01", "02", "03", "04"})  # new, amend, cancel, supplement a document
BODY_SIGNATURE_AT: Final = "/Envelope/Body/ds:Signature"

# Algorithm policy only: where each signature sits is decided by _system_signature / _body_signature.
STRICT: Final = SignatureConfiguration(location="./", expect_references=1)
LEGACY: Final = replace(
    STRICT,
    signature_methods=frozenset(SignatureMethod),
    digest_algorithms=frozenset(DigestAlgorithm),
)


@dataclass(frozen=True, slots=True)
class _SignatureInfo:
    element: etree._Element
    algorithm: str
    legacy: bool
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]


def _is_legacy(signature: etree._Element) -> tuple[str, bool]:
    method = signature.find("ds:SignedInfo/ds:SignatureMethod", NSMAP)
    algorithm = method.get("Algorithm", "") if method is not None else ""
    digests = [d.get("Algorithm", "") for d in signature.findall("ds:SignedInfo/ds:Reference/ds:DigestMethod", NSMAP)]
    return algorithm, any("sha1" in a.lower() for a in [algorithm, *digests])


def _read_signature(signature: etree._Element, where: str) -> _SignatureInfo:
    algorithm, legacy = _is_legacy(signature)
    blobs = tuple(el.text or "" for el in signature.findall("ds:KeyInfo/ds:X509Data/ds:X509Certificate", NSMAP))
    if not blobs:
        raise Rejected(ErrorCode.SIGNATURE_INVALID, "the signature carries no X509Certificate in KeyInfo", where)
    try:
        certs = _load_certificates(blobs)
    except ValueError as exc:
        raise Rejected(ErrorCode.SIGNATURE_INVALID, f"KeyInfo certificate cannot be read: {exc}", where) from exc
    return _SignatureInfo(signature, algorithm, legacy, certs[0], certs[1:])


@lru_cache(maxsize=256)
def _load_certificates(blobs: tuple[str, ...]) -> tuple[x509.Certificate, ...]:
    # A party sends the same KeyInfo with every message: decoding it once saves ~15 us per message.
    return tuple(x509.load_der_x509_certificate(_b64(blob)) for blob in blobs)


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad base64: {exc}") from exc


def _system_signature(root: etree._Element) -> etree._Element:
    if root.tag != ENVELOPE:
        raise Rejected(ErrorCode.SCHEMA_INVALID, f"root element is {root.tag}, expected {ENVELOPE}", "/*[1]")
    signatures = root.findall("ds:Signature", NSMAP)
    if not signatures:
        raise Rejected(
            ErrorCode.SIGNATURE_MISSING,
            "the envelope is not signed: expected a SystemSignature (ds:Signature) as a child of Envelope",
            SYSTEM_SIGNATURE_AT,
        )
    if len(signatures) > 1:
        raise Rejected(ErrorCode.SIGNATURE_INVALID, "more than one SystemSignature", SYSTEM_SIGNATURE_AT)
    signature = signatures[0]
    references = signature.findall("ds:SignedInfo/ds:Reference", NSMAP)
    uris = [ref.get("URI") for ref in references]
    transforms = [
        t.get("Algorithm") for t in signature.findall("ds:SignedInfo/ds:Reference/ds:Transforms/ds:Transform", NSMAP)
    ]
    if uris != [""] or ENVELOPED_TRANSFORM not in transforms:
        raise Rejected(
            ErrorCode.SIGNATURE_INVALID,
            'the SystemSignature must have exactly one Reference, URI="" with the enveloped-signature transform, '
            f"covering the whole envelope; found URIs {uris}",
            f"{SYSTEM_SIGNATURE_AT}/ds:SignedInfo/ds:Reference",
        )
    return signature


class Verifier:
    """Stateless apart from the trust store and registry it consults; safe to share across requests."""

    def __init__(self, trust: TrustStore, partners: PartnerRegistry) -> None:
        self.trust = trust
        self.partners = partners

    def verify(self, parsed: ParsedMessage, *, at: datetime | None = None) -> VerifiedMessage:
        info = _read_signature(_system_signature(parsed.root), SYSTEM_SIGNATURE_AT)
        decision = self.trust.evaluate(info.leaf, info.chain, at=at)
        party = self.partners.by_fingerprint(decision.fingerprint)
        if party is None:
            raise Rejected(
                ErrorCode.SENDER_MISMATCH,
                f"the signing certificate {decision.subject} (sha256 {decision.fingerprint}) "
                "is not bound to any registered party",
                SYSTEM_SIGNATURE_AT,
            )
        if info.legacy and not party.allow_legacy_sha1:
            raise Rejected(
                ErrorCode.SIGNATURE_INVALID,
                f"SHA-1 signatures ({info.algorithm}) are accepted only from parties registered for legacy "
                f"algorithms; {party.identity} is not",
                f"{SYSTEM_SIGNATURE_AT}/ds:SignedInfo/ds:SignatureMethod",
            )
        signed = _check_signature(parsed.root, info, LEGACY if info.legacy else STRICT, SYSTEM_SIGNATURE_AT).root
        if signed is None:
            raise Rejected(ErrorCode.SIGNATURE_INVALID, "the signed data is not XML", SYSTEM_SIGNATURE_AT)
        header = parse_header(signed)
        if header.sender.identity != party.identity:
            raise Rejected(
                ErrorCode.SENDER_MISMATCH,
                f"the message is signed by {party.identity} but its From/identity is {header.sender.identity}",
                "/Envelope/Header/From/identity",
            )
        return VerifiedMessage(
            raw=parsed.raw,
            digest=parsed.digest,
            received_at=parsed.received_at,
            envelope=signed,
            header=header,
            party=party.identity,
            signer=info.leaf,
            signature_algorithm=info.algorithm,
            legacy_algorithm=info.legacy,
            body_signature=self._body_signature(signed, header, at),
        )

    def _body_signature(self, signed: etree._Element, header: Header, at: datetime | None) -> BodySignature:
        element = signed.find("e:Body/ds:Signature", NSMAP)
        if element is None:
            return BodySignature(present=False, valid=False)
        info = _read_signature(element, BODY_SIGNATURE_AT)
        content = signed.find("e:Body/e:Content", NSMAP)
        content_id = content.get("Id") if content is not None else None
        uris = [ref.get("URI") for ref in element.findall("ds:SignedInfo/ds:Reference", NSMAP)]
        if not content_id or uris != [f"#{content_id}"]:
            raise Rejected(
                ErrorCode.SIGNATURE_INVALID,
                f"the Body signature must reference Body/Content (#{content_id}) and nothing else; found {uris}",
                f"{BODY_SIGNATURE_AT}/ds:SignedInfo/ds:Reference",
            )
        decision = self.trust.evaluate(info.leaf, info.chain, at=at)
        issuer = self.partners.by_fingerprint(decision.fingerprint)
        if info.legacy and not (issuer is not None and issuer.allow_legacy_sha1):
            raise Rejected(
                ErrorCode.SIGNATURE_INVALID,
                f"SHA-1 Body signature ({info.algorithm}) from an issuer not registered for legacy algorithms",
                f"{BODY_SIGNATURE_AT}/ds:SignedInfo/ds:SignatureMethod",
            )
        config = LEGACY if info.legacy else STRICT
        # Only the name of what it signs is needed (no parse): the Content in ``signed`` is signed data already.
        signed_content = _check_signature(signed, info, config, BODY_SIGNATURE_AT, parse=False)
        if signed_content.tag != CONTENT:
            raise Rejected(
                ErrorCode.SIGNATURE_INVALID, "the Body signature does not cover Body/Content", BODY_SIGNATURE_AT
            )
        # The issuing authority is of the sending country: a peer NSW forwards certificates its own ministries issued.
        if header.function in ISSUING_FUNCTIONS:  # an answer (22/23...) is signed by whoever answers
            authorities = self.partners.authorities_for(header.document_type, header.sender.country_code or None)
            _check_authority(issuer, authorities, header.document_type)
        return BodySignature(
            present=True,
            valid=True,
            signer_subject=decision.subject,
            authority=issuer.identity if issuer is not None else None,
            detail="issuing authority verified" if issuer is not None else "issuer trusted but not registered",
        )


def _check_authority(issuer: Party | None, authorities: list[Party], document_type: str) -> None:
    if not authorities:
        return
    names = {p.identity for p in authorities}
    if issuer is None or issuer.identity not in names:
        who = issuer.identity if issuer is not None else "an unregistered certificate"
        raise Rejected(
            ErrorCode.SENDER_MISMATCH,
            f"the Body of a {document_type} must be signed by its issuing authority ({', '.join(sorted(names))}); "
            f"it is signed by {who}",
            BODY_SIGNATURE_AT,
        )


def _check_signature(
    root: etree._Element, info: _SignatureInfo, config: SignatureConfiguration, where: str, *, parse: bool = True
) -> SignedData:
    try:
        return verify_signature(root, info.element, info.leaf, config, parse=parse)
    except InvalidCertificate as exc:
        raise Rejected(ErrorCode.CERT_UNTRUSTED, str(exc), where) from exc
    except InvalidInput as exc:
        raise Rejected(ErrorCode.SIGNATURE_INVALID, f"signature cannot be checked: {exc}", where) from exc
    except SignXMLException as exc:  # InvalidSignature, InvalidDigest
        raise Rejected(ErrorCode.SIGNATURE_INVALID, f"signature does not verify: {exc}", where) from exc
