"""The server's side of the engine's events (engine_client.EngineClient._route, stream.StreamHub):
an "events" message written into a real socket pair the way the engine process writes it, read by an
EngineClient on its loop. Streams on that loop (plain text taken with no event made) and streams on
another loop (events posted there) see the same characters and ends, in order."""

from __future__ import annotations

import asyncio
import socket
import threading

import numpy as np

from server.bench.engine_cost import VOCAB, NullRunner
from server.engine.generation import BLOCK, CharBlock, GenerationRequest, StreamEvent
from server.engine.runtime.engine_client import EngineClient
from server.engine.runtime.process_messages import wire_events
from server.engine.runtime.process_pipe import ChildPipe, ServerPipe
from server.engine.sampling import SamplingSettings

REQUEST = GenerationRequest((), 100, SamplingSettings(temperature=0.5))


def _messages(ids: list[int]) -> list[list]:
    """Two engine messages for requests `ids`: acceptances and a block of characters (two each, the
    lane's form), then per request plain text, its end with text, and text for nobody (gone)."""
    first = [(rid, StreamEvent(accepted=True, consumed_chars=3, recent_text="abc")) for rid in ids]
    tokens = np.array([VOCAB.index(c) for c in "xy"] * len(ids))
    first.append((BLOCK, CharBlock(np.repeat(np.array(ids), 2), tokens)))
    second = []
    for rid in ids:
        second += [(rid, StreamEvent(text="pq")), (rid, StreamEvent(text="r", finish="length"))]
    second.append((10**6, StreamEvent(text="z")))  # a request this server does not know: dropped
    return [wire_events(first), wire_events(second)]


async def _read(stream) -> tuple[int, str, str | None]:  # type: ignore[no-untyped-def]
    opening = await stream.opening()
    text, end = "", None
    while end is None:
        chunk = await stream.next_chunk(1)
        text += chunk.text
        end = chunk.end.finish if chunk.end is not None else None
    return opening.consumed_chars, text, end


def test_streams_here_and_on_another_loop_get_the_same_characters_and_ends_in_order() -> None:
    ours, theirs = socket.socketpair()
    child = ChildPipe(theirs)
    client = EngineClient(ServerPipe(ours), NullRunner(8).info, lookahead=16)
    other_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=other_loop.run_forever, daemon=True)
    thread.start()
    try:
        async def scenario() -> tuple[list, list]:
            client.start()
            here = [client.submit(slot, REQUEST) for slot in range(3)]  # request ids 1, 2, 3

            async def submit_there() -> list:
                return [client.submit(slot, REQUEST) for slot in range(3, 5)]  # ids 4, 5

            there = asyncio.run_coroutine_threadsafe(submit_there(), other_loop).result(5)
            ids = [stream.request_id for stream in here + there]
            for message in _messages(ids):
                child.send(("events", message, [], None))
            got_here = await asyncio.wait_for(asyncio.gather(*(_read(s) for s in here)), 10)
            async def read_there() -> list:
                return await asyncio.wait_for(asyncio.gather(*(_read(s) for s in there)), 10)

            got_there = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(read_there(), other_loop))
            return got_here, got_there

        got_here, got_there = asyncio.run(scenario())
    finally:
        other_loop.call_soon_threadsafe(other_loop.stop)
        thread.join(5)
        ours.close()
        theirs.close()
    assert got_here == [(3, "xypqr", "length")] * 3
    assert got_there == got_here[:2]
    assert client._routes == {}  # every request ended: no route left behind


def test_plain_text_wakes_a_reader_only_once_its_characters_are_there() -> None:
    """receive_text is receive's plain case: a reader waiting for 4 characters wakes at the 4th."""
    from server.engine.runtime.stream import GenerationStream

    async def scenario() -> list[str]:
        stream = GenerationStream(1, lambda rid, n: None, lambda rid, n: None)
        stream.receive(StreamEvent(accepted=True))
        stream.delivered = 1  # as after a first message
        waiting = asyncio.ensure_future(stream.next_chunk(4))
        seen = []
        for text in ("a", "bc", "d", "e"):
            stream.receive_text(text)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            seen.append(waiting.result().text if waiting.done() else "")
        return seen

    assert asyncio.run(scenario()) == ["", "", "abcd", "abcd"]
