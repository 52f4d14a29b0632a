"""Signing envelopes: the SystemSignature over the whole Envelope, and an issuer's signature over Content.

Keys and certificates are loaded once (``Signer.from_files``) and reused: reloading a key per
message is one of the costs that make naive gateways slow.

The SystemSignature is on the hot path (every receipt and rejection, every forward to a peer), so it
does not go through ``XMLSigner.sign`` each time: that serialises and re-parses the envelope three times
and rebuilds the same Signature element for every message. ``_SystemSignatureTemplate`` keeps the
Signature that stock signxml produced once for this signer (its KeyInfo never changes) and per envelope
fills in the two values that do change, computed with signxml's own c14n and digest. The output is
byte-identical to ``XMLSigner.sign`` (``tests/security/test_sign_differential.py`` holds it to that).
Shapes that signxml would treat specially (a signature placeholder, an Id on the root) and the legacy
SHA-1 partner tool still take the stock path, as does ``sign_content``.
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key
from lxml import etree
from signxml.algorithms import (
    CanonicalizationMethod,
    DigestAlgorithm,
    SignatureMethod,
    digest_algorithm_implementations,
)
from signxml.signer import XMLSigner

from gateway.envelope import BODY, CONTENT, CONTENT_ID, DS, SIGNATURE
from gateway.security.parse import copy_element

EXC_C14N: Final = CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0
LEGACY_C14N: Final = CanonicalizationMethod.CANONICAL_XML_1_0

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class _LegacySha1Signer(XMLSigner):
    """signxml refuses to create SHA-1 signatures. Some VNSW partner systems still send them, and the
    partner tool must be able to reproduce one (``nswgw sign --legacy-sha1``) so the policy that
    accepts them only for registered legacy parties can be exercised. Never used for our own receipts."""

    def check_deprecated_methods(self) -> None:
        return None


class _DeterministicEcKey:
    """Makes signxml's ECDSA signatures deterministic (RFC 6979): no per-signature nonce to get wrong, and
    signing the same envelope twice gives the same bytes -- so a retried forward to a peer gateway is the
    *same* message there (its duplicate check answers with the original receipt, not DUPLICATE)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    def sign(self, data: bytes, signature_algorithm: ec.ECDSA) -> bytes:
        return self._key.sign(data, ec.ECDSA(signature_algorithm.algorithm, deterministic_signing=True))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._key, name)


def _signxml_key(key: PrivateKey) -> Any:
    """The key as signxml gets it: ECDSA keys sign with RFC 6979 nonces."""
    return _DeterministicEcKey(key) if isinstance(key, ec.EllipticCurvePrivateKey) else key


def _digest_value(signature: etree._Element) -> etree._Element:
    return signature[0][2][2]  # SignedInfo / Reference / DigestValue


def _value(signature: etree._Element) -> etree._Element:
    return signature[1]  # SignatureValue


class _SystemSignatureTemplate:
    """What ``XMLSigner.sign`` builds for this signer's enveloped signatures, built once.

    For an envelope (a document root without an Id, so the Reference URI is "") signxml's Signature
    differs between messages only in DigestValue and SignatureValue. The template is the ds:Signature of
    a stock signature over an empty, namespace-free element (so it carries no inherited namespace
    declarations); ``sign`` repeats signxml's steps on the envelope itself.
    """

    __slots__ = ("_ecdsa", "_hash", "_key", "_signature", "_signer")

    def __init__(self, signer: XMLSigner, key: PrivateKey, chain: Sequence[x509.Certificate]) -> None:
        stock = signer.sign(etree.Element("template"), key=_signxml_key(key), cert=list(chain))
        signature = stock[0]
        stock.remove(signature)
        # sign() fills these by position; a signxml that builds the Signature differently fails here
        if _digest_value(signature).tag != f"{{{DS}}}DigestValue" or _value(signature).tag != f"{{{DS}}}SignatureValue":
            raise RuntimeError("signxml's Signature layout changed: the SystemSignature template no longer fits")
        _digest_value(signature).text = None
        _value(signature).text = None
        self._signer = signer
        self._key = key
        self._signature = signature
        # made once, not per message: both are immutable (RFC 6979 nonces, as _DeterministicEcKey signs)
        self._hash = digest_algorithm_implementations[signer.sign_alg]()
        self._ecdsa = ec.ECDSA(self._hash, deterministic_signing=True)

    def sign(self, envelope: etree._Element) -> etree._Element:
        """Append the signature to ``envelope`` (a document root without a SystemSignature) and return it."""
        signer = self._signer
        digest = signer._get_digest(signer._c14n(envelope, algorithm=signer.c14n_alg), algorithm=signer.digest_alg)
        signature = deepcopy(self._signature)
        _digest_value(signature).text = b64encode(digest).decode()
        envelope.append(signature)
        signed_info = signer._c14n(signature[0], algorithm=signer.c14n_alg)
        _value(signature).text = b64encode(self._signature_value(signed_info)).decode()
        return envelope

    def _signature_value(self, signed_info: bytes) -> bytes:
        """What ``XMLSigner.sign`` signs with: PKCS#1 v1.5 for RSA; for ECDSA (RFC 6979 nonces) the
        fixed-size r || s that XML-DSig wants, not the DER sequence cryptography returns."""
        if isinstance(self._key, rsa.RSAPrivateKey):
            return self._key.sign(signed_info, PKCS1v15(), self._hash)
        r, s = decode_dss_signature(self._key.sign(signed_info, self._ecdsa))
        size = (self._key.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def load_private_key(path: Path) -> PrivateKey:
    return private_key_from_pem(path.read_bytes(), str(path))


def private_key_from_pem(data: bytes, source: str) -> PrivateKey:
    key = load_pem_private_key(data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise TypeError(f"{source}: only RSA and ECDSA keys are supported")
    return key


def load_cert_chain(path: Path) -> list[x509.Certificate]:
    return cert_chain_from_pem(path.read_bytes(), str(path))


def cert_chain_from_pem(data: bytes, source: str) -> list[x509.Certificate]:
    chain = x509.load_pem_x509_certificates(data)
    if not chain:
        raise ValueError(f"{source}: no certificate found")
    return chain


def key_matches(key: PrivateKey, cert: x509.Certificate) -> bool:
    """True if ``cert`` certifies ``key``'s public half (a signature by ``key`` verifies against ``cert``)."""

    def spki(public: Any) -> bytes:
        return bytes(public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))

    return spki(key.public_key()) == spki(cert.public_key())


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


class EnvelopeSigner(Protocol):
    """What signs the gateway's own envelopes (receipts, rejections, forwards to peers): a ``Signer``, or
    the gateway's renewable one (``gateway.signing_renewal.RenewingSigner``)."""

    def sign_envelope(self, envelope: etree._Element, *, copy: bool = True) -> etree._Element: ...


@dataclass(frozen=True, slots=True)
class Signer:
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]  # leaf first
    legacy_sha1: bool = False
    # None for legacy SHA-1: that partner tool stays on the stock signxml path
    _template: _SystemSignatureTemplate | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        template = None if self.legacy_sha1 else _SystemSignatureTemplate(self._signer(), self.key, self.chain)
        object.__setattr__(self, "_template", template)

    @classmethod
    def from_files(cls, key_path: Path, cert_path: Path, *, legacy_sha1: bool = False) -> Signer:
        return cls(load_private_key(key_path), tuple(load_cert_chain(cert_path)), legacy_sha1)

    @classmethod
    def from_pem(cls, key: bytes, cert: bytes, *, source: str = "the signing key and certificate") -> Signer:
        """From the files' bytes as read once (a renewal must check and use the very bytes it read)."""
        return cls(private_key_from_pem(key, source), tuple(cert_chain_from_pem(cert, source)))

    @property
    def identity(self) -> str:
        return common_name(self.chain[0])

    @property
    def _signing_key(self) -> Any:
        return _signxml_key(self.key)

    def _signer(self) -> XMLSigner:
        if self.legacy_sha1:
            if not isinstance(self.key, rsa.RSAPrivateKey):
                raise ValueError("legacy SHA-1 signing needs an RSA key")
            return _LegacySha1Signer(
                signature_algorithm=SignatureMethod.RSA_SHA1,
                digest_algorithm=DigestAlgorithm.SHA1,
                c14n_algorithm=LEGACY_C14N,
            )
        algorithm = (
            SignatureMethod.ECDSA_SHA256
            if isinstance(self.key, ec.EllipticCurvePrivateKey)
            else (SignatureMethod.RSA_SHA256)
        )
        return XMLSigner(
            signature_algorithm=algorithm, digest_algorithm=DigestAlgorithm.SHA256, c14n_algorithm=EXC_C14N
        )

    def sign_envelope(self, envelope: etree._Element, *, copy: bool = True) -> etree._Element:
        """Return ``envelope`` carrying an enveloped SystemSignature over the whole Envelope.

        An existing SystemSignature (a forwarded message) is replaced; a Body signature is kept untouched.
        By default a copy is signed and ``envelope`` is left as it was. ``copy=False`` is for an envelope
        nobody else holds (just built, or just parsed): it is then signed in place when it can be (the
        copy costs as much as the rest of the signing), so use only the returned element afterwards. The
        one visible difference: CDATA sections stay CDATA, where the copy's re-parse turns them into
        escaped text -- the canonical form, and so the signature, is the same.
        """
        template = self._template
        # signxml signs a copy of the element as a document of its own: an element inside another document
        # (with a tail, ancestors) is copied here too, so that it is what gets signed and serialised
        unsigned = envelope if not copy and envelope.getparent() is None else copy_element(envelope)
        for old in unsigned.findall(SIGNATURE):
            unsigned.remove(old)
        if template is None or _stock_only(unsigned):
            return self._signer().sign(unsigned, key=self._signing_key, cert=list(self.chain))
        return template.sign(unsigned)

    def sign_content(self, envelope: etree._Element) -> etree._Element:
        """Return a copy of ``envelope`` with the issuing authority's signature over ``Body/Content``."""
        unsigned = copy_element(envelope)
        body = unsigned.find(BODY)
        content = body.find(CONTENT) if body is not None else None
        if body is None or content is None:
            raise ValueError("the envelope has no Body/Content to sign")
        content.set("Id", content.get("Id") or CONTENT_ID)
        for old in body.findall(SIGNATURE):
            body.remove(old)
        placeholder = etree.SubElement(body, SIGNATURE, Id="placeholder", nsmap={"ds": DS})
        content.addnext(placeholder)
        return self._signer().sign(
            unsigned, key=self._signing_key, cert=list(self.chain), reference_uri=f"#{content.get('Id')}"
        )


def to_bytes(root: etree._Element) -> bytes:
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


def _stock_only(unsigned: etree._Element) -> bool:
    """Shapes for which ``XMLSigner.sign`` does not produce the template's signature: an Id on the root
    (the Reference URI would name it) or a ``ds:Signature Id="placeholder"`` (signxml fills that in)."""
    if unsigned.get("Id") is not None or unsigned.get("ID") is not None:
        return True
    return any(sig.get("Id") == "placeholder" for sig in unsigned.iter(SIGNATURE))
