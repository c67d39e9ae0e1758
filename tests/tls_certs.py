"""Test certificates, made on the spot with `cryptography`: a CA, a server
certificate for 127.0.0.1 / ::1 / localhost, a client certificate, and an
unrelated second CA with a client certificate of its own.

    pki = make_pki(tmp_path)
    config = ServerConfig(..., tls_cert=str(pki.server.cert_path), tls_key=str(pki.server.key_path),
                          tls_client_ca=str(pki.ca.cert_path))
    credentials = grpc.ssl_channel_credentials(pki.ca.cert_pem, pki.client.key_pem, pki.client.cert_pem)

Keys are EC P-256 (quick to make); certificates are valid for a day.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1", "::1")
VALIDITY = datetime.timedelta(days=1)
# Some slack for clocks that disagree by a little (containers, CI).
BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as objects, PEM bytes, and files."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes
    key_pem: bytes
    cert_path: Path
    key_path: Path

    @property
    def serial(self) -> int:
        return self.certificate.serial_number


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Issued
    server: Issued
    client: Issued
    other_ca: Issued  # unrelated to `ca`: neither side should trust what it signs
    other_client: Issued

    def new_server(self, stem: str) -> Issued:
        """Another server certificate (new key, new serial) from the same CA, in stem.crt/stem.key."""
        return issue(self.ca, self.directory, stem, "charstream test server", server=True)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def write_pem(directory: Path, stem: str, certificate: x509.Certificate,
              key: ec.EllipticCurvePrivateKey) -> Issued:
    """Write stem.crt and stem.key into `directory`."""
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return Issued(certificate, key, cert_pem, key_pem, cert_path, key_path)


def make_ca(directory: Path, stem: str, common_name: str) -> Issued:
    """A self-signed CA certificate that may sign leaf certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        _builder(common_name, _name(common_name), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return write_pem(directory, stem, certificate, key)


def issue(ca: Issued, directory: Path, stem: str, common_name: str, *, server: bool) -> Issued:
    """A leaf certificate signed by `ca`: for a server (with SANs for this machine) or a client."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(common_name, ca.certificate.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.certificate.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if server:
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in SERVER_NAMES]
        names += [x509.IPAddress(ipaddress.ip_address(address)) for address in SERVER_ADDRESSES]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(ca.key, hashes.SHA256())
    return write_pem(directory, stem, certificate, key)


def make_pki(directory: Path) -> Pki:
    """Every certificate the TLS tests need, written into `directory` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory, "ca", "charstream test CA")
    other_ca = make_ca(directory, "other-ca", "unrelated test CA")
    return Pki(
        directory=directory,
        ca=ca,
        server=issue(ca, directory, "server", "charstream test server", server=True),
        client=issue(ca, directory, "client", "charstream test client", server=False),
        other_ca=other_ca,
        other_client=issue(other_ca, directory, "other-client", "unrelated test client", server=False),
    )
