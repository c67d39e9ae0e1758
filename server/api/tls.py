"""TLS for charstream-serve: server credentials that follow certificate renewals.

    credentials = server_credentials("cert.pem", "key.pem", client_ca_path=None)
    server.add_secure_port("0.0.0.0:50051", credentials)

The certificate chain and key are re-read whenever a file on disk changes (its
mtime, size or inode: an atomic rename of a renewed file counts), and the new
pair is served to connections made from then on; running connections keep the
pair they started with. A replacement that does not load (half-written, a key
that does not match the certificate) is not served: the previous pair stays in
use and one warning is logged per change, until the files load again.

With a client CA bundle, clients must present a certificate signed by it
(mutual TLS); the bundle is watched and reloaded the same way.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Optional

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server.clients.credentials import read_file
from server.structured_log import log_event

logger = logging.getLogger("charstream.server")

# (mtime_ns, size, inode) of one file; None when it cannot be stat'ed.
FileStamp = Optional[tuple[int, int, int]]


class TlsConfigError(OSError):
    """A TLS file that cannot be served. An OSError so that charstream-serve reports
    it like its other start-up failures (one line, exit status 2)."""


@dataclass(frozen=True)
class TlsFiles:
    """The PEM bytes of one consistent set of TLS files, as checked and served."""

    cert_chain: bytes
    key: bytes
    client_ca: bytes | None
    leaf: x509.Certificate


def _read(path: str, what: str) -> bytes:
    try:
        return read_file(path, what)
    except OSError as exc:
        raise TlsConfigError(str(exc)) from None


def _certificates(data: bytes, path: str, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TlsConfigError(f"{what} {path}: not a PEM certificate file ({exc})") from None


def _public_key_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_tls_files(cert_path: str, key_path: str, client_ca_path: str | None) -> TlsFiles:
    """Read and check the files; TlsConfigError names the file and what is wrong with it."""
    cert_chain = _read(cert_path, "TLS certificate")
    key_data = _read(key_path, "TLS key")
    client_ca = _read(client_ca_path, "TLS client CA") if client_ca_path else None
    leaf = _certificates(cert_chain, cert_path, "TLS certificate")[0]
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as exc:
        # TypeError: an encrypted key; the server has no way to ask for its password.
        raise TlsConfigError(f"TLS key {key_path}: not an unencrypted PEM private key ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - e.g. UnsupportedAlgorithm: still a bad key file
        raise TlsConfigError(f"TLS key {key_path}: cannot be used ({exc})") from None
    if _public_key_der(key.public_key()) != _public_key_der(leaf.public_key()):
        raise TlsConfigError(f"TLS key {key_path} does not match the certificate in {cert_path}")
    if client_ca_path and client_ca is not None:  # both or neither; the test narrows the type
        _certificates(client_ca, client_ca_path, "TLS client CA")
    return TlsFiles(cert_chain, key_data, client_ca, leaf)


def _stamp(path: str | None) -> FileStamp:
    if path is None:
        return None
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino)


def _certificate_configuration(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(files.key, files.cert_chain)], files.client_ca)


def _describe(leaf: x509.Certificate) -> dict[str, str]:
    return {"serial": format(leaf.serial_number, "x"), "expires": leaf.not_valid_after_utc.isoformat()}


class CertificateWatcher:
    """The certificate-configuration fetcher: gRPC calls it before each new TLS handshake.

    It returns a new configuration when the files changed and load, else None
    (gRPC then keeps the one it has).
    """

    def __init__(self, cert_path: str, key_path: str, client_ca_path: str | None):
        self.paths = (cert_path, key_path, client_ca_path)
        # Stamps taken before reading: a file replaced while being read differs from
        # them at the next handshake and is read again.
        self._stamps = self._current_stamps()
        self.files = load_tls_files(*self.paths)
        self._rejected: tuple[FileStamp, ...] | None = None
        self._grpc_served = self.files  # what gRPC serves: the HTTP port may have seen a renewal first
        # Handshakes may run on several gRPC threads at once.
        self._lock = threading.Lock()

    def _current_stamps(self) -> tuple[FileStamp, ...]:
        return tuple(_stamp(path) for path in self.paths)

    def initial_configuration(self) -> grpc.ServerCertificateConfiguration:
        return _certificate_configuration(self.files)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        self.renewed_files()
        files = self.files  # compared with what gRPC serves, not with the last check: with the HTTP
        if files is self._grpc_served:  # port sharing the watcher, its handshake may have seen the renewal
            return None
        self._grpc_served = files
        return _certificate_configuration(files)

    def renewed_files(self) -> TlsFiles | None:
        """The files, when they changed since the last call and load; else None (keep serving the
        current ones). gRPC's fetcher above and the HTTP front end (server/http/tls.py) both ask here,
        and each compares `files` with what it serves itself: only one of them sees a change here."""
        try:
            with self._lock:
                return self._reload_if_changed()
        except Exception:  # noqa: BLE001 - an error here would fail the handshake: keep serving
            logger.exception("TLS certificate check failed; serving the current certificate")
            return None

    def _reload_if_changed(self) -> TlsFiles | None:
        stamps = self._current_stamps()
        if stamps == self._stamps or stamps == self._rejected:
            return None
        try:
            files = load_tls_files(*self.paths)
        except TlsConfigError as exc:
            # Warn once per change: the next handshakes see the same stamps and stay quiet.
            self._rejected = stamps
            log_event(logger, "tls_reload_failed", logging.WARNING, error=str(exc),
                      serving=_describe(self.files.leaf)["serial"])
            return None
        self._stamps, self._rejected, self.files = stamps, None, files
        log_event(logger, "tls_reloaded", cert=self.paths[0], **_describe(files.leaf))
        return files


def certificate_watcher(cert_path: str, key_path: str, client_ca_path: str | None) -> CertificateWatcher:
    """A watcher of the files, loaded and checked once (TlsConfigError as below). One watcher can
    serve the gRPC port and the HTTP port: a renewal is then read, checked and logged once."""
    watcher = CertificateWatcher(cert_path, key_path, client_ca_path or None)  # "": no mutual TLS
    log_event(logger, "tls_enabled", mutual=watcher.paths[2] is not None, cert=cert_path,
              **_describe(watcher.files.leaf))
    return watcher


def server_credentials(cert_path: str, key_path: str, client_ca_path: str | None,
                       watcher: CertificateWatcher | None = None) -> grpc.ServerCredentials:
    """TLS credentials serving `cert_path`/`key_path`, renewed files included.

    With `client_ca_path`, clients must present a certificate signed by one of
    its CAs. Raises TlsConfigError when a file is unreadable, not PEM, or the
    key does not match the certificate. `watcher`: one made by certificate_watcher
    for the same files, to share.
    """
    if watcher is None:
        watcher = certificate_watcher(cert_path, key_path, client_ca_path)
    return grpc.dynamic_ssl_server_credentials(
        watcher.initial_configuration(), watcher, require_client_authentication=watcher.paths[2] is not None
    )
