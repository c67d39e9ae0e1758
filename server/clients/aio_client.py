"""An asyncio Python client for charstream.v1.Generator, on grpc.aio channels.

The same calls, names and options as the synchronous client (client.py), awaited:

    import asyncio
    from server.clients.aio_client import AsyncCharstreamClient

    async def main() -> None:
        async with AsyncCharstreamClient("localhost:50051") as client:
            stream = client.generate("ROMEO:", max_chars=200, temperature=0.8, seed=1)
            async for chunk in stream:
                print(chunk, end="", flush=True)
            print(f"\\n[{stream.finish_reason}, {stream.generated_chars} chars]")

            session = await client.create_session(prompt="ROMEO:", seed=1)
            print(await session.generate(max_chars=100).text())   # continues where the session stands
            await session.delete()

            conversation = client.conversation()
            async for chunk in conversation.say("To be", max_chars=40):
                print(chunk, end="")
            await conversation.close()

    asyncio.run(main())

Unary calls (model_info, create_session, the session calls) are coroutines;
generate() returns a stream to read with `async for` (one chunk a message) and
to stop with cancel(). Failed calls raise grpc.aio.AioRpcError, a grpc.RpcError.
The client belongs to the event loop it was made in: make it inside a coroutine.
targets_to_uri, lb_policy, tls_credentials and api_key work as for CharstreamClient.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Sequence, TypeVar

import grpc
import grpc.aio

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.clients import calls
from server.clients.calls import SessionRef, StreamOutcome, TurnOutcome
from server.clients.client import targets_to_uri
from server.clients.credentials import (
    AUTHORIZATION,
    authorization_value,
    tls_credentials,
)

__all__ = ["AsyncCharstreamClient", "AsyncConversation", "AsyncSessionHandle", "AsyncTextStream", "targets_to_uri",
           "tls_credentials"]

R = TypeVar("R")
Continuation = Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]]


class _ApiKeyInterceptor:
    """Puts `authorization: Bearer KEY` in a call's metadata, in place of any it had."""

    def __init__(self, header: tuple[str, str]):
        self._header = header

    async def _intercept(self, continuation: Continuation, details: grpc.aio.ClientCallDetails,
                         request_or_iterator: Any) -> Any:
        metadata = grpc.aio.Metadata(*(item for item in (details.metadata or ()) if item[0] != AUTHORIZATION))
        metadata.add(*self._header)
        return await continuation(details._replace(metadata=metadata), request_or_iterator)


# grpc.aio files an interceptor under the first of the four kinds of call it is an instance of,
# so the key needs one interceptor of each kind; all four do the same.
_INTERCEPTOR_KINDS = [
    type(f"_ApiKey{kind.__name__}", (_ApiKeyInterceptor, kind), {method: _ApiKeyInterceptor._intercept})
    for kind, method in ((grpc.aio.UnaryUnaryClientInterceptor, "intercept_unary_unary"),
                         (grpc.aio.UnaryStreamClientInterceptor, "intercept_unary_stream"),
                         (grpc.aio.StreamUnaryClientInterceptor, "intercept_stream_unary"),
                         (grpc.aio.StreamStreamClientInterceptor, "intercept_stream_stream"))
]


def api_key_interceptors(api_key: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that send `api_key` with every call; ValueError if it cannot be sent."""
    header = (AUTHORIZATION, authorization_value(api_key))
    return [kind(header) for kind in _INTERCEPTOR_KINDS]


def _task_is_cancelled() -> bool:
    """Whether the running task has been asked to stop (only Python 3.11+ can tell)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling and cancelling())


class AsyncTextStream(StreamOutcome):
    """Text chunks of one Generate call, read with `async for`; afterwards, how it finished.

    cancel() stops the call: a loop reading it ends quietly and finish_reason stays None.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall):
        super().__init__()
        self._call = call
        self._cancelled = False

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for response in self._call:
                if response.text:
                    yield response.text
                self.note(response)
        except asyncio.CancelledError:
            # grpc.aio reports a call cancelled here as a cancelled task; only a task
            # that is really being cancelled should see that.
            if not self._cancelled or _task_is_cancelled():
                raise

    async def text(self) -> str:
        return "".join([chunk async for chunk in self])

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


class AsyncSessionHandle(SessionRef):
    """A server-side session: its state continues from call to call."""

    client: "AsyncCharstreamClient"

    def generate(self, prompt: str = "", max_chars: int = 200, **options: Any) -> AsyncTextStream:
        return self.client.generate(prompt, max_chars, session_id=self.id, **options)

    async def info(self) -> pb.SessionInfo:
        return await self.client.call(calls.get_session(self.id))

    async def reset(self, prompt: str = "", seed: int | None = None) -> pb.SessionInfo:
        return await self.client.call(calls.reset_session(self.id, prompt, seed))

    async def delete(self) -> None:
        await self.client.call(calls.delete_session(self.id))

    async def fork(self) -> "AsyncSessionHandle":
        """A new session with this one's state and random stream; both continue independently."""
        return AsyncSessionHandle(self.client, await self.client.call(calls.fork_session(self.id)))

    async def export(self) -> bytes:
        """The session's record: import it on any server serving the same model (import_session)."""
        return await self.client.call(calls.export_session(self.id))


class AsyncConversation(TurnOutcome):
    """One Converse stream: `async for chunk in say(...)` sends a turn and reads its reply."""

    def __init__(self, stub: pb_grpc.GeneratorStub):
        super().__init__()
        # Without a request iterator the call takes turns by write(), one when each is said.
        self._call = stub.Converse()

    async def say(self, text: str, max_chars: int = 200, *, temperature: float | None = None,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  stop: Iterable[str] = ()) -> AsyncIterator[str]:
        await self._call.write(calls.converse_request(text, max_chars, temperature=temperature, top_k=top_k,
                                                      top_p=top_p, seed=seed, stop=stop))
        while (response := await self._call.read()) is not grpc.aio.EOF:
            if response.text:
                yield response.text
            if self.note(response):
                return

    async def close(self) -> None:
        """Half-close: the server ends the stream (and drops the session)."""
        await self._call.done_writing()
        while await self._call.read() is not grpc.aio.EOF:  # drain to the end status
            pass

    async def __aenter__(self) -> "AsyncConversation":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncCharstreamClient:
    def __init__(self, target: str, timeout: float | None = 30.0, credentials: grpc.ChannelCredentials | None = None,
                 *, lb_policy: str | None = None, api_key: str | None = None,
                 options: Sequence[tuple[str, Any]] = ()):
        """`timeout` bounds unary calls; streams run until they finish or are cancelled.

        `credentials` (see tls_credentials) makes the channel TLS; None: plaintext.
        `lb_policy` ("round_robin", "pick_first") picks how calls spread over the
        addresses `target` resolves to; None leaves gRPC's default (pick_first).
        `api_key` goes with every call as `authorization: Bearer KEY`.
        `options`: further gRPC channel arguments, e.g. [("grpc.use_local_subchannel_pool", 1)]
        for a connection of this channel's own.
        """
        # Made first: a key that cannot be sent fails before a channel exists to leak.
        interceptors = api_key_interceptors(api_key) if api_key else None
        arguments = calls.channel_options(lb_policy, options)
        self.channel = (
            grpc.aio.secure_channel(target, credentials, options=arguments, interceptors=interceptors)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=arguments, interceptors=interceptors)
        )
        self.stub = pb_grpc.GeneratorStub(self.channel)
        self.timeout = timeout

    async def __aenter__(self) -> "AsyncCharstreamClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls still running end as cancelled."""
        await self.channel.close()

    async def call(self, unary: calls.Unary[R]) -> R:
        """Send one unary call (bounded by `timeout`) and return what the caller wants of its reply."""
        return unary.result(await getattr(self.stub, unary.method)(unary.request, timeout=self.timeout))

    async def model_info(self) -> pb.GetModelInfoResponse:
        return await self.call(calls.model_info())

    async def create_session(self, prompt: str = "", *, temperature: float | None = None, top_k: int | None = None,
                             top_p: float | None = None, seed: int | None = None) -> AsyncSessionHandle:
        unary = calls.create_session(prompt, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        return AsyncSessionHandle(self, await self.call(unary))

    async def import_session(self, state: bytes) -> AsyncSessionHandle:
        """A new session from a record made by AsyncSessionHandle.export (here or on another server)."""
        return AsyncSessionHandle(self, await self.call(calls.import_session(state)))

    def session(self, session_id: str) -> AsyncSessionHandle:
        """A handle on an existing session (not checked until used)."""
        return AsyncSessionHandle(self, session_id)

    async def list_sessions(self) -> list[pb.SessionInfo]:
        return await self.call(calls.list_sessions())

    def generate(self, prompt: str = "", max_chars: int = 200, *, session_id: str = "",
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: Iterable[str] = ()) -> AsyncTextStream:
        """Start a generation: read the result with `async for` for text chunks. No session_id = one-shot."""
        request = calls.generate_request(prompt, max_chars, session_id=session_id, temperature=temperature,
                                         top_k=top_k, top_p=top_p, seed=seed, stop=stop)
        return AsyncTextStream(self.stub.Generate(request))

    def conversation(self) -> AsyncConversation:
        """A Converse stream; `await close()` it (or use it with `async with`) when done."""
        return AsyncConversation(self.stub)
