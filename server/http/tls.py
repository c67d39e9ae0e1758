"""TLS for the HTTP port, from the gRPC port's certificate watcher (server/api/tls.py).

Python's ssl module cannot swap a context's certificate in place safely (a failed
load leaves a half-replaced pair), so each change of the files builds a new
context, and every new connection is handed to the newest one. The watcher reads,
checks and logs a renewal once for both ports; a replacement that does not load is
not served here either (the previous pair stays), exactly as on the gRPC port.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from typing import Any

from server.api.tls import CertificateWatcher, TlsFiles


def context_of(files: TlsFiles) -> ssl.SSLContext:
    """A server context serving `files` (HTTP/1.1 over TLS 1.2 or later)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    # load_cert_chain reads files only; the bytes are the ones the watcher checked (key matches
    # the certificate), so they go through a private directory that lives for this call.
    with tempfile.TemporaryDirectory(prefix="charstream-tls-") as directory:
        cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        for path, data in ((cert_path, files.cert_chain), (key_path, files.key)):
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as out:
                out.write(data)
        context.load_cert_chain(cert_path, key_path)
    if files.client_ca is not None:
        context.load_verify_locations(cadata=files.client_ca.decode("ascii", "replace"))
        context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no certificate from this CA, no connection
    return context


class RenewingContext(ssl.SSLContext):
    """What the HTTP site is given: each connection is wrapped by the context of the current files.

    asyncio's TLS transport calls only wrap_bio on the context it was given."""

    def __new__(cls, watcher: CertificateWatcher) -> "RenewingContext":
        return super().__new__(cls, ssl.PROTOCOL_TLS_SERVER)

    def __init__(self, watcher: CertificateWatcher):
        self._watcher = watcher
        self._files = watcher.files
        self._current = context_of(self._files)

    def current(self) -> ssl.SSLContext:
        """The context of the files the watcher serves now (checking the files for a renewal first)."""
        self._watcher.renewed_files()
        files = self._watcher.files
        if files is not self._files:
            self._current, self._files = context_of(files), files
        return self._current

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | None = None, session: Any = None) -> ssl.SSLObject:
        return self.current().wrap_bio(incoming, outgoing, server_side=server_side,
                                       server_hostname=server_hostname, session=session)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        return self.current().wrap_socket(*args, **kwargs)
