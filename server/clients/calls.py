"""The Generator calls as the Python clients make them, apart from how they are sent.

The synchronous client (client.py) and the asyncio client (aio_client.py) differ
only in how a call goes over the wire; what each call sends, and what the caller
gets back from its replies, is written once here so that the two cannot drift:

    from server.clients import calls

    unary = calls.create_session("ROMEO:", seed=1)    # a Unary: method name, request, reply -> result
    reply = getattr(stub, unary.method)(unary.request, timeout=30)
    session_id = unary.result(reply)

    request = calls.generate_request("ROMEO:", 100, temperature=0.8)
    outcome = calls.StreamOutcome()
    for response in stub.Generate(request):
        outcome.note(response)                        # finish_reason, generated_chars, ... once it ends
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, TypeVar

from protos.charstream.v1 import generator_pb2 as pb

R = TypeVar("R")

# "length", "stop", "cancelled", "shutdown": the names the clients report a finish by.
FINISH_NAMES = {value: name.removeprefix("FINISH_REASON_").lower() for name, value in pb.FinishReason.items()}


def finish_name(response: pb.GenerateResponse | pb.ConverseResponse) -> str | None:
    """The finish reason of the last message of a generation or turn; None on the messages before it."""
    if response.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
        return None
    return FINISH_NAMES[response.finish_reason]


def channel_options(lb_policy: str | None, extra: Iterable[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """gRPC channel arguments: the load-balancing policy when one is named, then `extra`."""
    return [*([("grpc.lb_policy_name", lb_policy)] if lb_policy else []), *extra]


def set_optional(message: object, **values: object) -> None:
    """Set the fields given a value; the others stay unset, so the server applies its defaults."""
    for name, value in values.items():
        if value is not None:
            setattr(message, name, value)


def _same(reply: Any) -> Any:
    return reply


@dataclass(frozen=True)
class Unary(Generic[R]):
    """One unary call ready to send: the stub method's name, the request, and what the caller gets of the reply."""

    method: str
    request: Any
    result: Callable[[Any], R] = _same


def model_info() -> Unary[pb.GetModelInfoResponse]:
    return Unary("GetModelInfo", pb.GetModelInfoRequest())


def create_session(prompt: str = "", *, temperature: float | None = None, top_k: int | None = None,
                   top_p: float | None = None, seed: int | None = None) -> Unary[str]:
    request = pb.CreateSessionRequest(prompt=prompt)
    set_optional(request, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return Unary("CreateSession", request, lambda reply: reply.session_id)


def import_session(state: bytes) -> Unary[str]:
    return Unary("ImportSession", pb.ImportSessionRequest(state=state), lambda reply: reply.session_id)


def list_sessions() -> Unary[list[pb.SessionInfo]]:
    return Unary("ListSessions", pb.ListSessionsRequest(), lambda reply: list(reply.sessions))


def get_session(session_id: str) -> Unary[pb.SessionInfo]:
    return Unary("GetSession", pb.GetSessionRequest(session_id=session_id), lambda reply: reply.session)


def reset_session(session_id: str, prompt: str = "", seed: int | None = None) -> Unary[pb.SessionInfo]:
    request = pb.ResetSessionRequest(session_id=session_id, prompt=prompt)
    set_optional(request, seed=seed)
    return Unary("ResetSession", request, lambda reply: reply.session)


def delete_session(session_id: str) -> Unary[None]:
    return Unary("DeleteSession", pb.DeleteSessionRequest(session_id=session_id), lambda reply: None)


def fork_session(session_id: str) -> Unary[str]:
    return Unary("ForkSession", pb.ForkSessionRequest(session_id=session_id), lambda reply: reply.session_id)


def export_session(session_id: str) -> Unary[bytes]:
    return Unary("ExportSession", pb.ExportSessionRequest(session_id=session_id), lambda reply: reply.state)


def generate_request(prompt: str = "", max_chars: int = 200, *, session_id: str = "", temperature: float | None = None,
                     top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                     stop: Iterable[str] = ()) -> pb.GenerateRequest:
    """A Generate request; no session_id: one-shot."""
    request = pb.GenerateRequest(session_id=session_id, prompt=prompt, max_chars=max_chars, stop=list(stop))
    set_optional(request, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return request


def converse_request(text: str, max_chars: int = 200, *, temperature: float | None = None, top_k: int | None = None,
                     top_p: float | None = None, seed: int | None = None,
                     stop: Iterable[str] = ()) -> pb.ConverseRequest:
    """One turn of a Converse stream."""
    request = pb.ConverseRequest(text=text, max_chars=max_chars, stop=list(stop))
    set_optional(request, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return request


class SessionRef:
    """A session by id on a client: what both clients' session handles hold (their calls are their own)."""

    def __init__(self, client: Any, session_id: str):
        self.client = client
        self.id = session_id


class StreamOutcome:
    """How a Generate stream finished, read from its last message (the base of both clients' text streams)."""

    def __init__(self) -> None:
        self.finish_reason: str | None = None  # "length", "stop", "shutdown", ...; None until the end
        self.generated_chars = 0
        self.prompt_chars = 0
        self.matched_stop = ""

    def note(self, response: pb.GenerateResponse) -> None:
        """Take the finish fields from `response` if it is the last message (the others leave them unset)."""
        reason = finish_name(response)
        if reason is not None:
            self.finish_reason = reason
            self.generated_chars = response.generated_chars
            self.prompt_chars = response.prompt_chars
            self.matched_stop = response.matched_stop


class TurnOutcome:
    """What a Converse stream has said so far (the base of both clients' conversations)."""

    def __init__(self) -> None:
        self.session_id = ""
        self.last_finish_reason: str | None = None

    def note(self, response: pb.ConverseResponse) -> bool:
        """Take the session id and, on a turn's last message, its finish reason; True when the turn is over."""
        self.session_id = response.session_id
        reason = finish_name(response)
        if reason is not None:
            self.last_finish_reason = reason
        return reason is not None
