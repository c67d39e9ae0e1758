"""A small synchronous Python client for charstream.v1.Generator.

    from server.clients.client import CharstreamClient

    with CharstreamClient("localhost:50051") as client:
        for chunk in client.generate("ROMEO:", max_chars=200, temperature=0.8, seed=1):
            print(chunk, end="", flush=True)

        session = client.create_session(prompt="ROMEO:", seed=1)
        print("".join(session.generate(max_chars=100)))   # continues where the session stands
        session.delete()

Failed calls raise grpc.RpcError; `.code()` and `.details()` say what went wrong.

Several replicas (servers sharing sessions through --session-store redis://...):
any replica serves any session, so one channel may spread its calls over all of
them with gRPC's round_robin policy. Give every address in one gRPC target:

    ipv4:127.0.0.1:50051,127.0.0.1:50052      IPv4 addresses, each with its port
    ipv6:[::1]:50051,[::1]:50052              IPv6 addresses, bracketed
    dns:///charstream.example:50051           a DNS name with one A record per replica

    from server.clients.client import CharstreamClient, targets_to_uri

    target = targets_to_uri(["127.0.0.1:50051", "127.0.0.1:50052"])  # "ipv4:127.0.0.1:50051,127.0.0.1:50052"
    with CharstreamClient(target, lb_policy="round_robin") as client:
        print(client.generate("ROMEO:", max_chars=100, temperature=0).text())

Without lb_policy gRPC uses pick_first: every call goes to the first address
that answers, the others only take over when it fails.

TLS and API keys (server started with --tls-cert / --tls-client-ca / --api-keys):

    from server.clients.client import CharstreamClient, tls_credentials

    credentials = tls_credentials("ca.pem")          # trust this CA; tls_credentials(): the system's roots
    credentials = tls_credentials("ca.pem", "client.crt", "client.key")  # mutual TLS: present a certificate
    key = os.environ["CHARSTREAM_API_KEY"]
    with CharstreamClient("localhost:50051", credentials=credentials, api_key=key) as client:
        ...

api_key is sent as `authorization: Bearer KEY` metadata on every call (Generate,
Converse, the session calls); without TLS it crosses the network in clear.
"""

from __future__ import annotations

import ipaddress
import queue
from typing import Iterable, Iterator, Sequence, TypeVar

import grpc

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.clients import calls
from server.clients.calls import SessionRef, StreamOutcome, TurnOutcome
from server.clients.credentials import ApiKeyInterceptor, tls_credentials

# tls_credentials is defined beside the interceptor but belongs to this module's API.
__all__ = ["CharstreamClient", "Conversation", "TextStream", "SessionHandle", "has_uri_scheme", "targets_to_uri",
           "tls_credentials"]

R = TypeVar("R")
# Target schemes gRPC resolves itself; a target that starts with one is a whole URI, not an address.
URI_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p")
MULTI_HINT = "give a single dns:///HOST:PORT target whose name resolves to every replica instead"


def has_uri_scheme(target: str) -> bool:
    """True for a gRPC target URI such as dns:///host:50051 or ipv4:10.0.0.1:50051,10.0.0.2:50051."""
    scheme, colon, _ = target.partition(":")
    return bool(colon) and scheme.lower() in URI_SCHEMES


def _address_family(address: str) -> str:
    """'ipv4' or 'ipv6' for an IP address with a port ("10.0.0.1:50051", "[::1]:50051"); ValueError otherwise."""
    if has_uri_scheme(address):
        raise ValueError(f"{address!r} is a target URI, not an address: a list takes HOST:PORT addresses")
    if address.startswith("["):
        host, bracket, port = address[1:].partition("]")
        if not bracket or not port.startswith(":"):
            raise ValueError(f"{address!r}: write IPv6 addresses as [ADDRESS]:PORT")
        port = port[1:]
    else:
        host, _, port = address.rpartition(":")
        if ":" in host:  # an IPv6 address without brackets: its last group would pass for a port
            raise ValueError(f"{address!r}: write IPv6 addresses as [ADDRESS]:PORT")
    # A missing port would make gRPC dial 443, not a charstream port: insist on one.
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r}: expected IP:PORT with a port in 1..65535")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{address!r} names a host, not an IP address: {MULTI_HINT}") from None
    if address.startswith("[") != (ip.version == 6):
        raise ValueError(f"{address!r}: only IPv6 addresses go in brackets, and they must")
    return f"ipv{ip.version}"


def targets_to_uri(addresses: Sequence[str]) -> str:
    """One gRPC target for several replicas: ["10.0.0.1:50051", "10.0.0.2:50051"] ->
    "ipv4:10.0.0.1:50051,10.0.0.2:50051" (IPv6: ["[::1]:50051", ...] -> "ipv6:[::1]:50051,...").

    A single address (or URI) is returned unchanged. In a list of several, every entry
    must be an IP address of the same family with its port: gRPC's ipv4:/ipv6: targets
    take no host names (use one dns:/// target for those).
    """
    cleaned = [address.strip() for address in addresses]
    if not cleaned or not all(cleaned):
        raise ValueError("expected one or more non-empty addresses")
    if len(cleaned) == 1:
        return cleaned[0]
    families = {_address_family(address) for address in cleaned}
    if len(families) > 1:
        raise ValueError(f"IPv4 and IPv6 addresses mixed in {cleaned}: a target holds one family; {MULTI_HINT}")
    return f"{families.pop()}:{','.join(cleaned)}"


class TextStream(StreamOutcome):
    """Text chunks of one Generate call; after iteration, how it finished. cancel() stops it."""

    def __init__(self, call: grpc.Call):
        super().__init__()
        self._call = call

    def __iter__(self) -> Iterator[str]:
        for response in self._call:
            if response.text:
                yield response.text
            self.note(response)

    def text(self) -> str:
        return "".join(self)

    def cancel(self) -> None:
        self._call.cancel()


class SessionHandle(SessionRef):
    """A server-side session: its state continues from call to call."""

    client: "CharstreamClient"

    def generate(self, prompt: str = "", max_chars: int = 200, **options: object) -> TextStream:
        return self.client.generate(prompt, max_chars, session_id=self.id, **options)  # type: ignore[arg-type]

    def info(self) -> pb.SessionInfo:
        return self.client.call(calls.get_session(self.id))

    def reset(self, prompt: str = "", seed: int | None = None) -> pb.SessionInfo:
        return self.client.call(calls.reset_session(self.id, prompt, seed))

    def delete(self) -> None:
        self.client.call(calls.delete_session(self.id))

    def fork(self) -> "SessionHandle":
        """A new session with this one's state and random stream; both continue independently."""
        return SessionHandle(self.client, self.client.call(calls.fork_session(self.id)))

    def export(self) -> bytes:
        """The session's record: import it on any server serving the same model (import_session)."""
        return self.client.call(calls.export_session(self.id))


class Conversation(TurnOutcome):
    """One Converse stream: say() sends a turn and yields its reply's text chunks."""

    def __init__(self, stub: pb_grpc.GeneratorStub):
        super().__init__()
        self._turns: queue.Queue[pb.ConverseRequest | None] = queue.Queue()
        self._responses = stub.Converse(iter(self._turns.get, None))

    def say(self, text: str, max_chars: int = 200, *, temperature: float | None = None, top_k: int | None = None,
            top_p: float | None = None, seed: int | None = None, stop: Iterable[str] = ()) -> Iterator[str]:
        self._turns.put(calls.converse_request(text, max_chars, temperature=temperature, top_k=top_k, top_p=top_p,
                                               seed=seed, stop=stop))
        for response in self._responses:
            if response.text:
                yield response.text
            if self.note(response):
                return

    def close(self) -> None:
        """Half-close: the server ends the stream (and drops the session)."""
        self._turns.put(None)
        for _ in self._responses:  # drain to the end status
            pass


class CharstreamClient:
    def __init__(self, target: str, timeout: float | None = 30.0, credentials: grpc.ChannelCredentials | None = None,
                 *, lb_policy: str | None = None, api_key: str | None = None):
        """`timeout` bounds unary calls; streams run until they finish or are cancelled.

        `credentials` (see tls_credentials) makes the channel TLS; None: plaintext.
        `lb_policy` ("round_robin", "pick_first") picks how calls spread over the
        addresses `target` resolves to; None leaves gRPC's default (pick_first).
        `api_key` goes with every call as `authorization: Bearer KEY`.
        """
        # Made first: a key that cannot be sent fails before a channel exists to leak.
        interceptor = ApiKeyInterceptor(api_key) if api_key else None
        options = calls.channel_options(lb_policy)
        channel = (
            grpc.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(target, options=options)
        )
        # Without a key the channel stays as gRPC made it; intercept_channel's closes it too.
        self.channel = grpc.intercept_channel(channel, interceptor) if interceptor else channel
        self.stub = pb_grpc.GeneratorStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> "CharstreamClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def call(self, unary: calls.Unary[R]) -> R:
        """Send one unary call (bounded by `timeout`) and return what the caller wants of its reply."""
        return unary.result(getattr(self.stub, unary.method)(unary.request, timeout=self.timeout))

    def model_info(self) -> pb.GetModelInfoResponse:
        return self.call(calls.model_info())

    def create_session(self, prompt: str = "", *, temperature: float | None = None, top_k: int | None = None,
                       top_p: float | None = None, seed: int | None = None) -> SessionHandle:
        unary = calls.create_session(prompt, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        return SessionHandle(self, self.call(unary))

    def import_session(self, state: bytes) -> SessionHandle:
        """A new session from a record made by SessionHandle.export (here or on another server)."""
        return SessionHandle(self, self.call(calls.import_session(state)))

    def session(self, session_id: str) -> SessionHandle:
        """A handle on an existing session (not checked until used)."""
        return SessionHandle(self, session_id)

    def list_sessions(self) -> list[pb.SessionInfo]:
        return self.call(calls.list_sessions())

    def generate(self, prompt: str = "", max_chars: int = 200, *, session_id: str = "", temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: Iterable[str] = ()) -> TextStream:
        """Stream a generation: iterate the result for text chunks. No session_id = one-shot."""
        request = calls.generate_request(prompt, max_chars, session_id=session_id, temperature=temperature,
                                         top_k=top_k, top_p=top_p, seed=seed, stop=stop)
        return TextStream(self.stub.Generate(request))

    def conversation(self) -> Conversation:
        return Conversation(self.stub)
