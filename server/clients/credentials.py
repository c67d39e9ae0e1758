"""What a charstream client presents to the server: TLS channel credentials and an API key.

    from server.clients.client import CharstreamClient, tls_credentials

    credentials = tls_credentials("ca.pem")                            # TLS, trusting ca.pem
    credentials = tls_credentials("ca.pem", "client.crt", "client.key")  # mutual TLS
    credentials = tls_credentials()                                    # TLS, the system's roots
    with CharstreamClient("charstream.example:50051", credentials=credentials, api_key=key) as client:
        ...

The API key travels as `authorization: Bearer KEY` metadata on every call, added
by ApiKeyInterceptor on the channel. Over a channel without TLS it travels in clear.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import grpc

AUTHORIZATION = "authorization"


def read_file(path: str, what: str) -> bytes:
    """The file's bytes; OSError saying which file (`what`) could not be read, and why."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise OSError(f"{what} {path}: cannot read it: {exc.strerror or exc}") from None


def tls_credentials(ca_path: str | None = None, cert_path: str | None = None,
                    key_path: str | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials.

    `ca_path`: PEM bundle of the CAs to trust (None: the system's roots, as
    gRPC finds them). `cert_path` and `key_path` (together): the client
    certificate and key to present to a server that asks for one (mutual TLS).
    Raises OSError for an unreadable file, ValueError for half a client pair.
    """
    if bool(cert_path) != bool(key_path):
        raise ValueError("a client certificate and its key go together")
    roots = read_file(ca_path, "CA bundle") if ca_path else None
    certificate = read_file(cert_path, "client certificate") if cert_path else None
    key = read_file(key_path, "client key") if key_path else None
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=certificate)


def authorization_value(api_key: str) -> str:
    """The `authorization` metadata value for `api_key`; ValueError if it cannot be sent as one."""
    # gRPC refuses metadata values with control characters only when the call is made:
    # say what is wrong up front instead.
    if not api_key or api_key != api_key.strip() or not all(" " <= c <= "~" for c in api_key):
        raise ValueError("an API key must be non-empty printable ASCII without surrounding blanks")
    return f"Bearer {api_key}"


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class _ClientCallDetails(_CallDetails, grpc.ClientCallDetails):
    """A grpc.ClientCallDetails with its fields set (gRPC declares the type, not a value class)."""


class ApiKeyInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer KEY` to every call, whatever its kind."""

    def __init__(self, api_key: str):
        self._header = (AUTHORIZATION, authorization_value(api_key))

    def _with_key(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [item for item in (details.metadata or ()) if item[0] != AUTHORIZATION]
        return _ClientCallDetails(
            details.method, details.timeout, [*metadata, self._header], details.credentials,
            getattr(details, "wait_for_ready", None), getattr(details, "compression", None),
        )

    def _intercept(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any) -> Any:
        """Every kind of call the same way: the key added, the request (or iterator of requests) as it is."""
        return continuation(self._with_key(details), request)

    # gRPC looks these four up by name and passes the request (or the request iterator) positionally.
    intercept_unary_unary = intercept_unary_stream = _intercept
    intercept_stream_unary = intercept_stream_stream = _intercept
