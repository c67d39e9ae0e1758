"""charstream-bench row 12's floor (server/bench/floor_server.py): the Generator service with no engine, as a
real process on a free loopback port, read by the project's own async client."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from protos.charstream.v1 import generator_pb2 as pb
from server.bench import ceiling as bench_ceiling
from server.bench import floor_server
from server.bench.process import running_server
from server.clients.aio_client import AsyncCharstreamClient


def test_message_sizes_one_first_then_fixed_then_the_rest() -> None:
    assert floor_server.message_sizes(40, 16) == [1, 16, 16, 7]
    assert floor_server.message_sizes(17, 16) == [1, 16]
    assert floor_server.message_sizes(1, 16) == [1]
    assert floor_server.message_sizes(0, 16) == []
    assert sum(floor_server.message_sizes(400, 24)) == 400


async def _read(address: str, prompt: str, max_chars: int) -> list[pb.GenerateResponse]:
    async with AsyncCharstreamClient(address, timeout=30) as client:
        call = client.stub.Generate(pb.GenerateRequest(prompt=prompt, max_chars=max_chars))
        return [message async for message in call]


async def _session_call(address: str) -> None:
    async with AsyncCharstreamClient(address, timeout=30) as client:
        await client.stub.CreateSession(pb.CreateSessionRequest())


def test_the_floor_streams_the_prompt_cycled_in_fixed_messages_and_ends_with_length() -> None:
    with running_server("", [], 30, command=bench_ceiling.floor_command(8)) as server:
        assert server.address.startswith("127.0.0.1:")
        messages = asyncio.run(_read(server.address, "abc", 20))
        assert [len(m.text) for m in messages] == [1, 8, 8, 3]
        assert "".join(m.text for m in messages) == ("abc" * 7)[:20]
        assert [m.finish_reason for m in messages] == [pb.FINISH_REASON_UNSPECIFIED] * 3 + [pb.FINISH_REASON_LENGTH]
        assert (messages[-1].generated_chars, messages[-1].prompt_chars) == (20, 3)
        # It serves Generate and nothing else: no sessions, no engine behind it.
        with pytest.raises(grpc.aio.AioRpcError) as error:
            asyncio.run(_session_call(server.address))
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert server.process.returncode is not None  # SIGTERM stopped it
