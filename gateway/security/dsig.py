"""XML-DSig verification on the tree, for the two signature shapes our policy admits.

Why this module exists: stock ``signxml.XMLVerifier.verify`` serialises and re-parses the document
about four times per signature (the ``get_root`` copy, the Signature copy, the ``_verify_reference``
copy, the ``_apply_transforms`` copy) before the one canonicalisation that matters, and re-reads the
certificate's subject for a message nobody sees. Measured on a 5 KB envelope: ~460 us per message,
of which the RSA check is ~35 us. Here each step runs once, on the tree ``parse_untrusted`` built:

1. the Signature element is valid against signxml's xmldsig schema (validated in place, no copy);
2. SignedInfo is canonicalised with its declared CanonicalizationMethod; the signature method must
   be one the configuration allows (STRICT or LEGACY) and the SignatureValue must verify with the
   given certificate's key (signxml's ``_verify_signature_with_pubkey``: RSA, ECDSA, DSA encodings;
   HMAC is refused there); a KeyValue next to the certificate must be the certificate's key;
3. only the *verified* canonical SignedInfo is read from then on. Its single Reference is ``URI=""``
   (the whole document, enveloped transform required) or ``#id`` (resolved by signxml, ambiguity
   refused); its transforms are at most one enveloped-signature and at most one canonicalisation,
   nothing else; the enveloped Signature is detached for the canonicalisation only and put back,
   tail and all, in ``finally``;
4. the digest is compared in constant time, and the signed bytes are parsed once: that tree, and
   only it, is what the caller may use (signxml's ``signed_xml``).

Algorithm tables, canonicalisation, digests, signature checks, reference resolution and the schema
are signxml's own code; only the copies are gone. ``tests/security/test_dsig_differential.py``
checks this module against stock ``XMLVerifier`` on every sample message and a table of mutations.
Narrower than signxml, on purpose: transforms other than the above (signxml ignores unknown ones and
would apply base64), several references, and text around the Signature or the referenced element
(where signxml's own re-parse fails with an lxml error instead of a verdict).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final, cast

import cryptography.exceptions
from cryptography import x509
from lxml import etree
from signxml import util as signxml_util
from signxml.algorithms import CanonicalizationMethod, DigestAlgorithm, SignatureMethod
from signxml.exceptions import InvalidDigest, InvalidInput, InvalidSignature
from signxml.util import namespaces
from signxml.verifier import SignatureConfiguration, XMLVerifier

DS: Final = "http://www.w3.org/2000/09/xmldsig#"
ENVELOPED: Final = f"{DS}enveloped-signature"
_C14N_METHODS: Final = frozenset(m.value for m in CanonicalizationMethod)
_XML_SPACE: Final = " \t\n"  # what signxml's serialise-and-reparse copies survive next to an element
_remove_sig: Final = cast(Callable[[etree._Element], None], signxml_util._remove_sig)  # unannotated in signxml

# The settings of gateway.security.parse (no DTD, no entities, no network; huge text nodes allowed, as
# for attachments). The input is canonical XML this module produced itself, from a tree that parser built;
# lxml serialises concurrent use of one parser with a lock.
_PARSER: Final = etree.XMLParser(
    resolve_entities=False, no_network=True, load_dtd=False, huge_tree=True, remove_comments=False
)


@dataclass(frozen=True, slots=True)
class SignedData:
    """What a verified Reference covers. Nothing outside ``data`` was signed."""

    data: bytes  # the canonical bytes the digest was computed over
    tag: str  # the expanded name of the element ``data`` renders
    root: etree._Element | None  # ``data`` parsed (None if not asked for, or not XML: signxml's ``signed_xml``)


@lru_cache(maxsize=8)
def _signxml(config: SignatureConfiguration) -> Any:
    # Typed as Any: most of signxml's helper methods carry no annotations (mypy --strict refuses the calls).
    processor = XMLVerifier()
    processor.config = config  # what XMLVerifier.verify sets before it calls these helpers
    return processor


def verify_signature(
    root: etree._Element,
    signature: etree._Element,
    cert: x509.Certificate,
    config: SignatureConfiguration,
    *,
    parse: bool = True,
) -> SignedData:
    """Verify ``signature`` (an element of ``root``'s document) with ``cert``'s key under ``config``.

    ``root`` must be the document's root element, as it is for the ``data`` given to signxml, and
    ``signature`` the element signxml's ``config.location`` would find. The tree is modified while
    the digest is computed and restored before returning (no other thread may read it meanwhile).
    Raises signxml's exceptions where ``XMLVerifier.verify(root, x509_cert=cert, expect_config=config)`` does:
    ``InvalidCertificate`` (certificate not valid now), ``InvalidInput`` (shape or algorithm refused),
    ``InvalidSignature`` / ``InvalidDigest`` (the cryptography fails). ``parse=False`` skips parsing
    the signed bytes, for a caller that only needs to know which element was signed.
    """
    if root.getroottree().getroot() is not root:
        raise ValueError("verify_signature needs the root element of the document")
    processor = _signxml(config)
    signed_info = _checked_signature(processor, signature)
    verified = _verify_signed_info(processor, signature, signed_info, cert)
    references = verified.findall(f"{{{DS}}}Reference")
    if len(references) != 1:  # our shapes have one; signxml's STRICT says the same (expect_references=1)
        raise InvalidSignature(f"Expected to find 1 references, but found {len(references)}")
    data, tag = _verify_reference(processor, root, signature, references[0])
    return SignedData(data, tag, _parse_signed(data) if parse else None)


def _parse_signed(data: bytes) -> etree._Element | None:
    try:
        return etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError:  # canonical XML of an element always parses; signxml answers None too
        return None


def _checked_signature(processor: Any, signature: etree._Element) -> etree._Element:
    _require_space_after(signature)
    try:
        processor.validate_schema(signature)
    except etree.DocumentInvalid as exc:
        raise InvalidInput(f"the Signature element is not valid xmldsig: {exc}") from exc
    return _required(signature, "SignedInfo")


def _verify_signed_info(
    processor: Any, signature: etree._Element, signed_info: etree._Element, cert: x509.Certificate
) -> etree._Element:
    """signxml's order: c14n and signature method, SignatureValue, certificate validity, key, KeyValue."""
    c14n_method = _required(signed_info, "CanonicalizationMethod")
    c14n_algorithm = CanonicalizationMethod(c14n_method.get("Algorithm"))
    signature_alg = SignatureMethod(_required(signed_info, "SignatureMethod").get("Algorithm"))
    processor.check_signature_alg_expected(signature_alg)
    raw_signature = _b64(_required(signature, "SignatureValue").text, "SignatureValue")
    signed_info_c14n: bytes = processor._c14n(
        signed_info,
        algorithm=c14n_algorithm,
        inclusive_ns_prefixes=processor._get_inclusive_ns_prefixes(c14n_method),
    )
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        processor._check_cert_validity(cert, "provided x509_cert")  # raises InvalidCertificate, signxml's words
    try:
        processor._verify_signature_with_pubkey(
            signed_info_c14n=signed_info_c14n,
            raw_signature=raw_signature,
            signing_certificate=cert,
            signature_alg=signature_alg,
        )
    except cryptography.exceptions.InvalidSignature as exc:
        if isinstance(exc, InvalidSignature):  # signxml's own, e.g. a wrong-length ECDSA value
            raise
        raise InvalidSignature(f"Signature verification failed: {exc}") from exc
    processor._match_key_values(
        key_value=signature.find("ds:KeyInfo/ds:KeyValue", namespaces=namespaces),
        der_encoded_key_value=signature.find("ds:KeyInfo/dsig11:DEREncodedKeyValue", namespaces=namespaces),
        signing_cert=cert,
        signature_alg=signature_alg,
    )
    return etree.fromstring(signed_info_c14n, _PARSER)


def _verify_reference(
    processor: Any, root: etree._Element, signature: etree._Element, reference: etree._Element
) -> tuple[bytes, str]:
    """Digest what the verified ``reference`` names, canonicalised on the tree."""
    enveloped, c14n = _transforms(reference)
    if reference.get("URI") == "" and not enveloped:
        raise InvalidInput('a Reference URI="" must carry the enveloped-signature transform')
    payload: etree._Element = processor._resolve_reference(root, reference)
    if payload is not root:
        _require_space_after(payload)
    algorithm = processor.config.default_reference_c14n_method
    prefixes = None
    if c14n is not None:
        algorithm = CanonicalizationMethod(c14n.get("Algorithm"))
        prefixes = processor._get_inclusive_ns_prefixes(c14n)
    digest_alg = DigestAlgorithm(_required(reference, "DigestMethod").get("Algorithm"))
    processor.check_digest_alg_expected(digest_alg)
    with _detached(signature) if enveloped else nullcontext():
        data: bytes = processor._c14n(payload, algorithm=algorithm, inclusive_ns_prefixes=prefixes)
    expected = _b64(_required(reference, "DigestValue").text, "DigestValue")
    if not hmac.compare_digest(expected, processor._get_digest(data, digest_alg)):
        raise InvalidDigest(f"Digest mismatch for reference 0 ({reference.get('URI')})")
    return data, str(payload.tag)  # c14n renders the element under its own expanded name


def _transforms(reference: etree._Element) -> tuple[bool, etree._Element | None]:
    """(enveloped?, the c14n Transform or None); anything beyond one of each is refused."""
    container = reference.find(f"{{{DS}}}Transforms")  # the first, as signxml reads it (the schema allows one)
    transforms = container.findall(f"{{{DS}}}Transform") if container is not None else []
    algorithms = [t.get("Algorithm") for t in transforms]
    c14n = [t for t in transforms if t.get("Algorithm") in _C14N_METHODS]
    enveloped = algorithms.count(ENVELOPED)
    if enveloped > 1 or len(c14n) > 1 or enveloped + len(c14n) != len(transforms):
        raise InvalidInput(f"unsupported Reference transforms {algorithms}: at most enveloped-signature and one c14n")
    return enveloped == 1, c14n[0] if c14n else None


@contextmanager
def _detached(signature: etree._Element) -> Iterator[None]:
    """The enveloped-signature transform, on the tree: signxml's ``_remove_sig`` (its tail joins the
    preceding text, as in the copy signxml would make), undone on the way out."""
    parent = signature.getparent()
    if parent is None:
        yield
        return
    index = parent.index(signature)
    previous = next(signature.itersiblings(preceding=True), None)
    text_before = previous.tail if previous is not None else parent.text
    try:
        _remove_sig(signature)
        yield
    finally:
        if previous is not None:
            previous.tail = text_before
        else:
            parent.text = text_before
        if signature.getparent() is None:
            parent.insert(index, signature)  # lxml keeps the tail on the detached element and puts it back with it


def _require_space_after(element: etree._Element) -> None:
    # signxml serialises the element with its tail and re-parses it alone: anything but plain XML
    # whitespace there ends its verification with an lxml parse error. Refuse it as a verdict instead.
    if element.tail is not None and element.tail.strip(_XML_SPACE):
        raise InvalidInput(f"text after {etree.QName(element).localname} is not allowed")


def _required(parent: etree._Element, local_name: str) -> etree._Element:
    found = parent.find(f"{{{DS}}}{local_name}")
    if found is None:
        raise InvalidInput(f"Expected to find XML element {local_name} in {parent.tag}")
    return found


def _b64(text: str | None, what: str) -> bytes:
    if text is None:
        raise InvalidInput(f"empty {what}")
    try:
        return base64.b64decode(text)  # lenient like signxml: characters outside the alphabet are dropped
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{what} is not base64: {exc}") from exc
