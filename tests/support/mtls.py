"""A throwaway PKI for mutual-TLS tests: a CA, server and client certificates (ECDSA P-256, one day)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    """A certificate for ``subject``: self-signed when ``issuer`` is None; a server one is for 127.0.0.1."""
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def write_pem(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    """``stem.pem`` and ``stem.key`` (PKCS#8, unencrypted) in ``folder``, replaced if they exist."""
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_context: ssl.SSLContext  # 127.0.0.1's certificate; requires a client certificate from the CA
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # self-signed: not from the CA
    stranger_key: Path
    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey

    def issue_pair(self, folder: Path, stem: str, subject: str, *, server: bool = False) -> tuple[Path, Path]:
        """A further certificate from the CA (a client one unless ``server``), as ``stem.pem`` / ``stem.key``."""
        key = ec.generate_private_key(ec.SECP256R1())
        return write_pem(folder, stem, issue(subject, key, self.ca_cert.subject, self.ca_key, server=server), key)


def make_pki(folder: Path, ca_name: str = "test agency CA") -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue(ca_name, ca_key, None, ca_key, ca=True)
    ca_path, _ = write_pem(folder, "ca", ca, ca_key)
    server_key, client_key, stranger_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    server_cert, server_key_path = write_pem(
        folder, "server", issue("127.0.0.1", server_key, ca.subject, ca_key, server=True), server_key
    )
    client_cert, client_key_path = write_pem(folder, "client", issue("nsw", client_key, ca.subject, ca_key), client_key)
    stranger_cert, stranger_key_path = write_pem(
        folder, "stranger", issue("stranger", stranger_key, None, stranger_key), stranger_key
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca_path))
    context.load_cert_chain(server_cert, server_key_path)
    context.verify_mode = ssl.CERT_REQUIRED
    return Pki(ca_path, context, client_cert, client_key_path, stranger_cert, stranger_key_path, ca, ca_key)


def peer_common_name(transport: object) -> str | None:
    """The commonName of the client certificate a TLS connection presented (None: no TLS, no certificate)."""
    get = getattr(transport, "get_extra_info", None)
    cert = get("peercert") if get is not None else None
    if not cert:
        return None
    return str(dict(pair[0] for pair in cert["subject"])["commonName"])
