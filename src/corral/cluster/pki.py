"""The cluster CA and node certificates (ECDSA P-256), and certificate fingerprints.

The CA signs every node's certificate; the join API serves TLS with the node
certificate, and joining nodes pin its SHA-256 fingerprint (colon-separated
upper-case hex, as `pvecm add --fingerprint` takes it).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from corral.errors import CorralError

CA_LIFETIME_DAYS = 3650
NODE_LIFETIME_DAYS = 730
MAX_CSR_BYTES = 16384


class CertError(CorralError):
    """A certificate or request is malformed or does not fit."""


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError("expected an EC private key")
    return key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_ca(cluster_name: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a new self-signed cluster CA."""
    key = new_key()
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Corral"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"Corral cluster CA {cluster_name}"),
    ])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_LIFETIME_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert_pem(cert), key_pem(key)


def new_csr(node_name: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def sign_csr(csr_pem: bytes, node_name: str, addresses: list[str], ca_cert_pem: bytes,
             ca_key_pem: bytes) -> bytes:
    """A node certificate for `node_name` (DNS SAN) and its link addresses (IP SANs)."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CertError("certificate request too large")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as error:
        raise CertError(f"malformed certificate request: {error}") from None
    if not csr.is_signature_valid:
        raise CertError("certificate request signature is invalid")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = load_key(ca_key_pem)
    names: list[x509.GeneralName] = [x509.DNSName(node_name), x509.DNSName("localhost")]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Corral"),
            x509.NameAttribute(NameOID.COMMON_NAME, node_name),
        ]))
        .issuer_name(ca_cert.subject).public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=NODE_LIFETIME_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                              x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert_pem(cert)


def issue_node_cert(node_name: str, addresses: list[str], ca_cert_pem: bytes,
                    ca_key_pem: bytes) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for a node, signed by the CA (used on the CA's host)."""
    key = new_key()
    cert = sign_csr(new_csr(node_name, key), node_name, addresses, ca_cert_pem, ca_key_pem)
    return cert, key_pem(key)


def fingerprint_der(der: bytes) -> str:
    """SHA-256 of a DER certificate as colon-separated upper-case hex."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def fingerprint_pem(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return fingerprint_der(cert.public_bytes(serialization.Encoding.DER))


def normalize_fingerprint(text: str) -> str:
    """Accept 'AA:BB:..', 'aabb..' or 'sha256:...'; raise CertError if not 32 bytes of hex."""
    cleaned = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(cleaned) != 64 or any(c not in "0123456789abcdef" for c in cleaned):
        raise CertError(f"not a SHA-256 fingerprint: {text!r}")
    upper = cleaned.upper()
    return ":".join(upper[i:i + 2] for i in range(0, 64, 2))


def verify_signed_by(cert_pem_bytes: bytes, ca_cert_pem: bytes) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem_bytes)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, Exception):
        return False
    return True
