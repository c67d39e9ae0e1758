"""A small synchronous Python client for charstream.v1.Generator.

    from server.client import CharstreamClient

    with CharstreamClient("localhost:50051") as client:
        for chunk in client.generate("ROMEO:", max_chars=200, temperature=0.8, seed=1):
            print(chunk, end="", flush=True)

        session = client.create_session(prompt="ROMEO:", seed=1)
        print("".join(session.generate(max_chars=100)))   # continues where the session stands
        session.delete()

Failed calls raise grpc.RpcError; `.code()` and `.details()` say what went wrong.
"""

from __future__ import annotations

import queue
from typing import Iterable, Iterator

import grpc

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc

FINISH_NAMES = {value: name.removeprefix("FINISH_REASON_").lower() for name, value in pb.FinishReason.items()}


def _optional(message: object, **values: object) -> None:
    for name, value in values.items():
        if value is not None:
            setattr(message, name, value)


class GenerationStream:
    """Text chunks of one Generate call; after iteration, how it finished. cancel() stops it."""

    def __init__(self, call: grpc.Call):
        self._call = call
        self.finish_reason: str | None = None  # "length", "stop", "shutdown", ...
        self.generated_chars = 0
        self.prompt_chars = 0
        self.matched_stop = ""

    def __iter__(self) -> Iterator[str]:
        for response in self._call:
            if response.text:
                yield response.text
            if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                self.finish_reason = FINISH_NAMES[response.finish_reason]
                self.generated_chars = response.generated_chars
                self.prompt_chars = response.prompt_chars
                self.matched_stop = response.matched_stop

    def text(self) -> str:
        return "".join(self)

    def cancel(self) -> None:
        self._call.cancel()


class Session:
    """A server-side session: its state continues from call to call."""

    def __init__(self, client: "CharstreamClient", session_id: str):
        self.client = client
        self.id = session_id

    def generate(self, prompt: str = "", max_chars: int = 200, **options: object) -> GenerationStream:
        return self.client.generate(prompt, max_chars, session_id=self.id, **options)  # type: ignore[arg-type]

    def info(self) -> pb.SessionInfo:
        return self.client.stub.GetSession(pb.GetSessionRequest(session_id=self.id), timeout=self.client.timeout).session

    def reset(self, prompt: str = "", seed: int | None = None) -> pb.SessionInfo:
        request = pb.ResetSessionRequest(session_id=self.id, prompt=prompt)
        _optional(request, seed=seed)
        return self.client.stub.ResetSession(request, timeout=self.client.timeout).session

    def delete(self) -> None:
        self.client.stub.DeleteSession(pb.DeleteSessionRequest(session_id=self.id), timeout=self.client.timeout)


class Conversation:
    """One Converse stream: say() sends a turn and yields its reply's text chunks."""

    def __init__(self, stub: pb_grpc.GeneratorStub):
        self._turns: queue.Queue[pb.ConverseRequest | None] = queue.Queue()
        self._responses = stub.Converse(iter(self._turns.get, None))
        self.session_id = ""
        self.last_finish_reason: str | None = None

    def say(self, text: str, max_chars: int = 200, *, temperature: float | None = None, top_k: int | None = None,
            top_p: float | None = None, seed: int | None = None, stop: Iterable[str] = ()) -> Iterator[str]:
        request = pb.ConverseRequest(text=text, max_chars=max_chars, stop=list(stop))
        _optional(request, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        self._turns.put(request)
        for response in self._responses:
            self.session_id = response.session_id
            if response.text:
                yield response.text
            if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                self.last_finish_reason = FINISH_NAMES[response.finish_reason]
                return

    def close(self) -> None:
        """Half-close: the server ends the stream (and drops the session)."""
        self._turns.put(None)
        for _ in self._responses:  # drain to the end status
            pass


class CharstreamClient:
    def __init__(self, target: str, timeout: float | None = 30.0, credentials: grpc.ChannelCredentials | None = None):
        """`timeout` bounds unary calls; streams run until they finish or are cancelled."""
        self.channel = (
            grpc.secure_channel(target, credentials) if credentials is not None else grpc.insecure_channel(target)
        )
        self.stub = pb_grpc.GeneratorStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> "CharstreamClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def model_info(self) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    def create_session(self, prompt: str = "", *, temperature: float | None = None, top_k: int | None = None,
                       top_p: float | None = None, seed: int | None = None) -> Session:
        request = pb.CreateSessionRequest(prompt=prompt)
        _optional(request, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        response = self.stub.CreateSession(request, timeout=self.timeout)
        return Session(self, response.session_id)

    def session(self, session_id: str) -> Session:
        """A handle on an existing session (not checked until used)."""
        return Session(self, session_id)

    def list_sessions(self) -> list[pb.SessionInfo]:
        return list(self.stub.ListSessions(pb.ListSessionsRequest(), timeout=self.timeout).sessions)

    def generate(self, prompt: str = "", max_chars: int = 200, *, session_id: str = "", temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: Iterable[str] = ()) -> GenerationStream:
        """Stream a generation: iterate the result for text chunks. No session_id = one-shot."""
        request = pb.GenerateRequest(session_id=session_id, prompt=prompt, max_chars=max_chars, stop=list(stop))
        _optional(request, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        return GenerationStream(self.stub.Generate(request))

    def conversation(self) -> Conversation:
        return Conversation(self.stub)
