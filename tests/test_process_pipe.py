"""The socket to the engine process: frames survive any split, the server's side never blocks
(both sides writing more than the socket holds is not a deadlock), the child's messages wait
for company only briefly, and an engine that has stopped fails what waits on it and refuses
what comes after, instead of hanging."""

from __future__ import annotations

import asyncio
import pickle
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from server.config import ServerConfig
from server.engine.generation import GenerationRequest, StreamEvent
from server.engine.runtime.process import GONE, EngineProcess
from server.engine.runtime.process_child import FLUSH_INTERVAL, ChildLoop
from server.engine.runtime.process_messages import Observations
from server.engine.runtime.process_pipe import (
    ChildPipe,
    FrameReader,
    ServerPipe,
    encode,
)
from server.engine.sampling import SamplingSettings

WAIT = 30.0  # seconds before a test calls a wait a hang


def test_frames_come_out_whole_however_the_bytes_arrive() -> None:
    messages = [("events", [(1, "a")], [], None), ("snapshot", 3, None, ("LookupError", "closed")),
                ("big", b"x" * 100_000)]
    data = encode(*messages)
    one_by_one, reader = [], FrameReader()
    for i in range(0, len(data), 7):  # a frame split over many reads, headers included
        one_by_one += reader.feed(data[i:i + 7])
    at_once = FrameReader().feed(data + data[:5])  # several frames and a partial one
    assert [pickle.loads(f) for f in one_by_one] == messages
    assert [pickle.loads(f) for f in at_once] == messages


def test_both_sides_writing_more_than_the_socket_holds_do_not_deadlock() -> None:
    """The child blocks writing its events until the server reads; the server, meanwhile, sends
    more commands than the socket takes. Blocking writes on both sides would wait for ever."""
    count, payload = 200, b"c" * 65_536  # ~13 MB each way: far more than socket buffers hold
    ours, theirs = socket.socketpair()
    child = ChildPipe(theirs)
    child_got: list[int] = []

    def child_side() -> None:
        for i in range(count):
            child.send(("event", i, payload))  # blocks until the server's loop reads
        while len(child_got) < count:
            child_got.extend(message[1] for message in child.receive())

    async def scenario() -> list[int]:
        server_got: list[int] = []
        all_in = asyncio.Event()

        def on_message(message: tuple) -> None:
            server_got.append(message[1])
            if len(server_got) == count:
                all_in.set()

        pipe = ServerPipe(ours)
        pipe.attach(asyncio.get_running_loop(), on_message, lambda: None)
        worker = threading.Thread(target=child_side, daemon=True)
        worker.start()
        for i in range(count):
            pipe.send(("command", i, payload))  # returns at once: the outbox holds the rest
        assert pipe.pending_bytes > 0  # the socket could not take it all: the outbox did
        await asyncio.wait_for(all_in.wait(), WAIT)
        await asyncio.wait_for(asyncio.to_thread(worker.join), WAIT)
        assert pipe.pending_bytes == 0
        pipe.close()
        return server_got

    result: list[list[int]] = []
    # On a thread of its own: a deadlock would block the loop itself, beyond any asyncio timeout.
    runner = threading.Thread(target=lambda: result.append(asyncio.run(scenario())), daemon=True)
    runner.start()
    runner.join(WAIT * 2)
    assert not runner.is_alive(), "the two sides are stuck writing to each other"
    assert result == [list(range(count))]
    assert child_got == list(range(count))
    child.close()


def test_the_end_of_the_peer_reaches_the_server_once() -> None:
    ours, theirs = socket.socketpair()

    async def scenario() -> int:
        closed = asyncio.Event()
        calls = []
        pipe = ServerPipe(ours)
        pipe.attach(asyncio.get_running_loop(), lambda message: None, lambda: (calls.append(1), closed.set()))
        theirs.close()
        await asyncio.wait_for(closed.wait(), WAIT)
        pipe.send(("after",))  # dropped, not raised: the caller learns of the end from the reader
        pipe.close()
        return len(calls)

    assert asyncio.run(scenario()) == 1


@pytest.fixture()
def engine(tiny_model_dir: Path) -> Iterator[EngineProcess]:
    started = EngineProcess(ServerConfig(model=str(tiny_model_dir), device="cpu", max_sessions=4).engine_params())
    yield started
    started.stop()  # again, if the test did: stopping twice is harmless


def test_a_stopped_engine_fails_running_streams_and_refuses_later_calls(engine: EngineProcess) -> None:
    async def scenario() -> tuple[str | None, str, str | None]:
        engine.start()
        engine.open_slot(0, 1, [1, 2, 3])
        engine.open_slot(1, 2, [1, 2, 3])
        running = engine.submit(0, GenerationRequest((), 1_000_000, SamplingSettings()))
        assert (await asyncio.wait_for(running.opening(), WAIT)).accepted
        assert (await asyncio.wait_for(running.next_chunk(), WAIT)).text
        await asyncio.to_thread(engine.stop)
        while True:  # the characters that were on their way, then the failure
            chunk = await asyncio.wait_for(running.next_chunk(), WAIT)
            if chunk.end is not None:
                break
        with pytest.raises(RuntimeError) as snapshot:
            await asyncio.wait_for(engine.snapshot(1), WAIT)
        later = engine.submit(1, GenerationRequest((), 5, SamplingSettings()))
        refusal = await asyncio.wait_for(later.opening(), WAIT)
        assert refusal.refused
        return chunk.end.error, str(snapshot.value), refusal.error

    running_error, snapshot_error, refusal = asyncio.run(scenario())
    assert running_error == GONE and refusal == GONE
    assert "not running" in snapshot_error


def test_snapshot_failures_keep_their_meaning_across_the_pipe(engine: EngineProcess) -> None:
    """A closed slot is LookupError (NOT_FOUND for the caller), as on the engine thread."""
    async def scenario() -> None:
        engine.start()
        try:
            with pytest.raises(LookupError, match="closed"):
                await asyncio.wait_for(engine.snapshot(3), WAIT)
        finally:
            await asyncio.to_thread(engine.stop)  # on the loop's thread the stop would wait for itself

    asyncio.run(scenario())


class _Sent:
    """A ChildPipe stand-in that keeps what the child sends."""

    def __init__(self) -> None:
        self.socket, self._peer = socket.socketpair()
        self.messages: list[tuple] = []

    def fileno(self) -> int:
        return self.socket.fileno()

    def send(self, *messages: tuple) -> None:
        self.messages.extend(messages)

    def texts(self) -> list[list[object]]:
        return [[payload for _, payload in message[1]] for message in self.messages]


class _OneLink:
    """Links with link 0 alone, recording what is sent to it."""

    def __init__(self, pipe: _Sent):
        self.pipe = pipe

    def observer(self, hosted: bool) -> int:
        return 0

    def split(self, events: list) -> dict[int, list]:
        return {0: events}

    def send(self, index: int, *messages: tuple) -> bool:
        self.pipe.send(*messages)
        return True


def test_plain_characters_wait_for_the_next_message_only_within_the_interval() -> None:
    """The child's messages: acceptances, first characters and finishes go at once, later plain
    characters may wait for company, but never past FLUSH_INTERVAL, and nothing is lost,
    repeated or reordered."""
    pipe = _Sent()
    scheduler = SimpleNamespace(events=[], submit=None, abort=None, open=None, reset=None, close=None,
                                restore=None, drain=None)
    child = ChildLoop(_OneLink(pipe), scheduler, Observations(), None)  # type: ignore[arg-type]
    scheduler.events = [(1, StreamEvent(accepted=True))]
    child._flush()
    scheduler.events = [(1, StreamEvent(text="a"))]
    child._flush()  # just after a message, but the request's first character: goes now
    scheduler.events = [(1, StreamEvent(text="b"))]
    child._flush()  # just after a message: waits
    assert len(pipe.messages) == 2
    scheduler.events.append((1, StreamEvent(text="c")))
    time.sleep(FLUSH_INTERVAL * 2)
    child._flush()  # the interval is over: both go, in order
    scheduler.events = [(1, StreamEvent(text="d"))]
    child._flush(force=True)  # the engine is about to wait: goes now
    scheduler.events = [(1, StreamEvent(text="e", finish="length"))]
    child._flush()  # a finish never waits
    scheduler.events = [(2, StreamEvent(accepted=True)), (3, StreamEvent(accepted=True))]
    child._flush()
    scheduler.events = [(2, StreamEvent(text="x"))]
    child._flush()  # request 2's first character goes at once
    scheduler.events = [(3, StreamEvent(finish="length", text="y")), (2, StreamEvent(text="z"))]
    child._flush()  # request 3 ends: no request is left waiting for its first character
    assert child._awaiting_first == set()
    child._iteration_seconds = FLUSH_INTERVAL  # iterations as long as the interval: nothing waits
    scheduler.events = [(2, StreamEvent(text="w"))]
    child._flush()
    texts = pipe.texts()
    assert texts[0][0].accepted and texts[1:5] == [["a"], ["b", "c"], ["d"], [StreamEvent(text="e", finish="length")]]
    assert texts[6:] == [["x"], [StreamEvent(finish="length", text="y"), "z"], ["w"]]
    assert scheduler.events == []
    pipe.socket.close()


def test_a_cancelled_stream_waiting_for_its_ack_does_not_cancel_the_others_wait() -> None:
    """A front-end's streams acked in one loop pass wait for the same sent-future (engine_client.py):
    one caller cancelled while waiting must leave the others to take their characters."""
    from server.engine.runtime.stream import GenerationStream

    async def scenario() -> tuple[str, bool]:
        loop = asyncio.get_running_loop()
        sent = loop.create_future()
        streams = [GenerationStream(request_id, lambda rid, n: sent, lambda rid, n: None) for request_id in (1, 2)]
        for stream in streams:
            stream.receive(StreamEvent(accepted=True))
            stream.receive(StreamEvent(text="ab"))
        waiting = [asyncio.ensure_future(stream.next_chunk()) for stream in streams]
        await asyncio.sleep(0)  # both wait for the ack to be sent
        waiting[0].cancel()
        await asyncio.sleep(0)
        sent.set_result(None)
        chunk = await asyncio.wait_for(waiting[1], 5)
        return chunk.text, waiting[0].cancelled()

    assert asyncio.run(scenario()) == ("ab", True)
