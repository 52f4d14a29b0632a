"""Signing envelopes: the SystemSignature over the whole Envelope, and an issuer's signature over Content.

Keys and certificates are loaded once (``Signer.from_files``) and reused: reloading a key per
message is one of the costs that make naive gateways slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from lxml import etree
from signxml.algorithms import CanonicalizationMethod, DigestAlgorithm, SignatureMethod
from signxml.signer import XMLSigner

from gateway.envelope import BODY, CONTENT, CONTENT_ID, DS, SIGNATURE

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


def load_private_key(path: Path) -> PrivateKey:
    key = load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise TypeError(f"{path}: only RSA and ECDSA keys are supported")
    return key


def load_cert_chain(path: Path) -> list[x509.Certificate]:
    chain = x509.load_pem_x509_certificates(path.read_bytes())
    if not chain:
        raise ValueError(f"{path}: no certificate found")
    return chain


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


@dataclass(frozen=True, slots=True)
class Signer:
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]  # leaf first
    legacy_sha1: bool = False

    @classmethod
    def from_files(cls, key_path: Path, cert_path: Path, *, legacy_sha1: bool = False) -> Signer:
        return cls(load_private_key(key_path), tuple(load_cert_chain(cert_path)), legacy_sha1)

    @property
    def identity(self) -> str:
        return common_name(self.chain[0])

    @property
    def _signing_key(self) -> Any:
        return _DeterministicEcKey(self.key) if isinstance(self.key, ec.EllipticCurvePrivateKey) else self.key

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

    def sign_envelope(self, envelope: etree._Element) -> etree._Element:
        """Return a copy of ``envelope`` carrying an enveloped SystemSignature over the whole Envelope.

        An existing SystemSignature (a forwarded message) is replaced; a Body signature is kept untouched.
        """
        unsigned = _copy(envelope)
        for old in unsigned.findall(SIGNATURE):
            unsigned.remove(old)
        return self._signer().sign(unsigned, key=self._signing_key, cert=list(self.chain))

    def sign_content(self, envelope: etree._Element) -> etree._Element:
        """Return a copy of ``envelope`` with the issuing authority's signature over ``Body/Content``."""
        unsigned = _copy(envelope)
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


def _copy(element: etree._Element) -> etree._Element:
    # Serialise and re-read rather than deepcopy: keeps namespace declarations exactly as they were.
    return etree.fromstring(etree.tostring(element))
