"""The asyncio client against real servers on loopback ports: every method, the same text as
the synchronous client, sessions as data, cancelling, conversations, API keys, TLS and
round_robin. Each test drives its coroutine with asyncio.run."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Coroutine, Iterator, TypeVar

import grpc
import pytest

from protos.charstream.v1 import generator_pb2 as pb
from server.background import BackgroundServer
from server.clients.aio_client import (
    AsyncCharstreamClient,
    AsyncTextStream,
    targets_to_uri,
    tls_credentials,
)
from server.clients.client import CharstreamClient
from server.config import ServerConfig
from server.engine.sampling import SamplingSettings
from tests.conftest import TINY_TEXT
from tests.plain_loop import GREEDY, onnx_loop, wire
from tests.tls_certs import Pki, make_pki

T = TypeVar("T")
PROMPT, SEED = "To be, or not", 7
SECRET_A = "alpha-secret-0123456789"
SECRET_B = "bravo-secret-9876543210"


def config(model_dir: Path, **overrides: Any) -> ServerConfig:
    values: dict[str, Any] = dict(model=str(model_dir), port=0, device="cpu", max_sessions=32)
    values.update(overrides)
    return ServerConfig(**values)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """A test's coroutine in a fresh event loop, never for longer than a minute."""
    return asyncio.run(asyncio.wait_for(coroutine, 60))


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(config(tiny_model_dir)) as running:
        yield running


async def chunks(stream: AsyncTextStream) -> list[str]:
    return [chunk async for chunk in stream]


def test_generate_streams_what_the_sync_client_streams(server: BackgroundServer, tiny_model_dir: Path) -> None:
    with CharstreamClient(server.address) as sync:
        one_shot = sync.generate(PROMPT, 80, temperature=0.8, seed=SEED)
        expected = one_shot.text()
        session = sync.create_session(PROMPT, seed=SEED, temperature=0.8)
        expected_turns = [session.generate(max_chars=30).text(), session.generate(max_chars=40).text()]

    async def main() -> None:
        async with AsyncCharstreamClient(server.address) as client:
            stream = client.generate(PROMPT, 80, temperature=0.8, seed=SEED)
            assert stream.finish_reason is None
            got = await chunks(stream)
            assert all(got) and "".join(got) == expected
            assert (stream.finish_reason, stream.generated_chars, stream.prompt_chars) == \
                (one_shot.finish_reason, len(expected), len(PROMPT)) == ("length", len(expected), len(PROMPT))
            session = await client.create_session(PROMPT, seed=SEED, temperature=0.8)
            turns = [await session.generate(max_chars=30).text(), await session.generate(max_chars=40).text()]
            assert turns == expected_turns
            stop = turns[1][-1]
            stopped = session.generate(max_chars=200, stop=[stop])
            text = await stopped.text()
            # The session's uninterrupted text says where the stop comes: at the first `stop` after 70 characters.
            whole = onnx_loop(tiny_model_dir, PROMPT, 270, SamplingSettings(temperature=wire(0.8)), seed=SEED)
            end = whole.index(stop, 70) + 1
            assert text == whole[70:end]
            assert (stopped.finish_reason, stopped.matched_stop) == ("stop", stop)
            assert (await session.info()).consumed_chars == len(PROMPT) + 70 + len(text)

    run(main())


def test_model_info_and_the_session_calls(server: BackgroundServer, tiny_model_dir: Path) -> None:
    with CharstreamClient(server.address) as sync:
        expected_info = sync.model_info()

    async def main() -> None:
        async with AsyncCharstreamClient(server.address, timeout=10) as client:
            assert await client.model_info() == expected_info
            session = await client.create_session("To be", seed=1, temperature=0.5, top_k=5, top_p=0.9)
            info = await session.info()
            assert (info.session_id, info.consumed_chars, info.recent_text) == (session.id, 5, "To be")
            assert info.temperature == pytest.approx(0.5) and info.top_k == 5 and info.top_p == pytest.approx(0.9)
            assert session.id in [listed.session_id for listed in await client.list_sessions()]
            again = client.session(session.id)
            settings = SamplingSettings(wire(0.5), 5, wire(0.9))  # the session's own settings and seed
            assert await again.generate(max_chars=10).text() == onnx_loop(tiny_model_dir, "To be", 10, settings, seed=1)
            reset = await again.reset("Or to", seed=2)
            assert (reset.consumed_chars, reset.recent_text) == (5, "Or to")
            await session.delete()
            assert session.id not in [listed.session_id for listed in await client.list_sessions()]
            with pytest.raises(grpc.RpcError) as missing:
                await session.info()
            assert isinstance(missing.value, grpc.aio.AioRpcError)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    run(main())


def test_fork_export_and_import_continue_exactly(server: BackgroundServer, tiny_model_dir: Path) -> None:
    async def main(other: BackgroundServer) -> None:
        async with AsyncCharstreamClient(server.address) as client, \
                AsyncCharstreamClient(other.address) as elsewhere:
            reference = await client.create_session(PROMPT, seed=5, temperature=0.9)
            whole = await reference.generate(max_chars=80).text()
            session = await client.create_session(PROMPT, seed=5, temperature=0.9)
            head = await session.generate(max_chars=30).text()
            fork = await session.fork()
            state = await session.export()
            moved = await client.import_session(state)
            away = await elsewhere.import_session(state)  # another server, same model
            assert len({session.id, fork.id, moved.id}) == 3
            for handle in (fork, moved, away, session):
                assert head + await handle.generate(max_chars=50).text() == whole

    with BackgroundServer(config(tiny_model_dir)) as other:
        run(main(other))


async def wait_idle(client: AsyncCharstreamClient, session_id: str) -> pb.SessionInfo:
    """The session's info once the server has noticed that its stream is gone."""
    for _ in range(200):
        info = await client.session(session_id).info()
        if not info.busy:
            return info
        await asyncio.sleep(0.02)
    raise AssertionError("the session stayed busy")


def test_cancel_mid_stream_then_continue(server: BackgroundServer) -> None:
    async def main() -> None:
        async with AsyncCharstreamClient(server.address) as client:
            reference = await client.generate(PROMPT, 3000, temperature=1.0, seed=8).text()
            session = await client.create_session(PROMPT, seed=8)
            stream = session.generate(max_chars=3000, temperature=1.0)
            received = ""
            async for chunk in stream:  # no break: after cancel() the loop ends by itself
                received += chunk
                if len(received) >= 10:
                    stream.cancel()
            assert stream.finish_reason is None and 10 <= len(received) < 3000
            assert reference.startswith(received)
            delivered = (await wait_idle(client, session.id)).consumed_chars - len(PROMPT)
            assert len(received) <= delivered < 3000, "the cancel must stop the stream early"
            # Continuing resumes the same random stream where the server stopped.
            assert await session.generate(max_chars=50).text() == reference[delivered:delivered + 50]

    run(main())


def test_a_cancelled_task_is_not_swallowed(server: BackgroundServer) -> None:
    async def main() -> None:
        async with AsyncCharstreamClient(server.address) as client:
            started = asyncio.Event()

            async def read() -> None:
                async for _ in client.generate(PROMPT, 10_000, temperature=1.0):
                    started.set()

            task = asyncio.create_task(read())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main())


def test_conversation_turns_match_the_sync_client(server: BackgroundServer, tiny_model_dir: Path) -> None:
    with CharstreamClient(server.address) as sync:
        conversation = sync.conversation()
        expected = ["".join(conversation.say("To be", max_chars=12, temperature=0.0)),
                    "".join(conversation.say(", or", max_chars=5, temperature=0.0))]
        conversation.close()

    async def main() -> None:
        async with AsyncCharstreamClient(server.address) as client:
            async with client.conversation() as conversation:
                first = [chunk async for chunk in conversation.say("To be", max_chars=12, temperature=0.0)]
                assert conversation.session_id and conversation.last_finish_reason == "length"
                second = [chunk async for chunk in conversation.say(", or", max_chars=5, temperature=0.0)]
                assert ["".join(first), "".join(second)] == expected
                stop = expected[0][-1]
                reply = "".join([c async for c in conversation.say(".", max_chars=100, stop=[stop], temperature=0.0)])
                # Greedy from everything the conversation holds, to the first `stop`.
                whole = onnx_loop(tiny_model_dir, "To be" + expected[0] + ", or" + expected[1] + ".", 100, GREEDY)
                assert (reply, conversation.last_finish_reason) == (whole[:whole.index(stop) + 1], "stop")

    run(main())


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"alice:{SECRET_A}\nbob:{SECRET_B}\n")
    with BackgroundServer(config(tiny_model_dir, api_keys=str(keys))) as running:
        yield running


def test_the_api_key_goes_with_every_kind_of_call(keyed_server: BackgroundServer, tiny_model_dir: Path) -> None:
    async def main() -> None:
        async with AsyncCharstreamClient(keyed_server.address, timeout=10) as anonymous:
            with pytest.raises(grpc.RpcError) as refused:
                await anonymous.model_info()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with AsyncCharstreamClient(keyed_server.address, timeout=10, api_key=SECRET_A) as alice, \
                AsyncCharstreamClient(keyed_server.address, timeout=10, api_key=SECRET_B) as bob:
            assert "".join((await alice.model_info()).vocabulary) == "".join(sorted(set(TINY_TEXT)))
            session = await alice.create_session("To be", seed=1)
            assert await session.generate(max_chars=10).text() == onnx_loop(
                tiny_model_dir, "To be", 10, SamplingSettings(), seed=1)
            fork = await session.fork()
            moved = await alice.import_session(await session.export())
            mine = {listed.session_id for listed in await alice.list_sessions()}
            assert {session.id, fork.id, moved.id} <= mine
            # The key is what the server knows its owner by: another key does not see it.
            assert not mine & {listed.session_id for listed in await bob.list_sessions()}
            async with alice.conversation() as conversation:
                reply = "".join([c async for c in conversation.say("To be", max_chars=5, temperature=1.0, seed=3)])
                assert reply == onnx_loop(tiny_model_dir, "To be", 5, SamplingSettings(temperature=1.0), seed=3)
            # A key of the call's own is replaced by the client's, not sent beside it.
            wrong = (("authorization", "Bearer not-a-known-secret-000"),)
            answered = await alice.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=wrong)
            assert "".join(answered.vocabulary) == "".join(sorted(set(TINY_TEXT)))
            for handle in (session, fork, moved):
                await handle.delete()
        with pytest.raises(ValueError, match="API key"):
            AsyncCharstreamClient(keyed_server.address, api_key="two\nlines")

    run(main())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_and_mutual_tls(server: BackgroundServer, tiny_model_dir: Path, pki: Pki) -> None:
    with CharstreamClient(server.address) as sync:
        expected = sync.generate("To be", 40, temperature=0.8, seed=SEED).text()
    tls = dict(tls_cert=str(pki.server.cert_path), tls_key=str(pki.server.key_path))

    async def generate(address: str, credentials: grpc.ChannelCredentials | None) -> str:
        async with AsyncCharstreamClient(address, timeout=10, credentials=credentials) as client:
            return await client.generate("To be", 40, temperature=0.8, seed=SEED).text()

    ca = str(pki.ca.cert_path)
    with BackgroundServer(config(tiny_model_dir, **tls)) as tls_server:
        assert run(generate(tls_server.address, tls_credentials(ca))) == expected
        with pytest.raises(grpc.RpcError) as plaintext:
            run(generate(tls_server.address, None))
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    with BackgroundServer(config(tiny_model_dir, tls_client_ca=ca, **tls)) as mtls_server:
        member = tls_credentials(ca, str(pki.client.cert_path), str(pki.client.key_path))
        assert run(generate(mtls_server.address, member)) == expected
        with pytest.raises(grpc.RpcError) as no_certificate:
            run(generate(mtls_server.address, tls_credentials(ca)))
        assert no_certificate.value.code() == grpc.StatusCode.UNAVAILABLE


def generated_chars(server: BackgroundServer) -> int:
    assert server.running is not None
    return int(server.running.metrics.registry.get_sample_value("charstream_generated_chars_total") or 0)


def test_round_robin_reaches_every_replica(server: BackgroundServer, tiny_model_dir: Path) -> None:
    async def main(replicas: list[BackgroundServer]) -> list[str]:
        start = [generated_chars(replica) for replica in replicas]
        texts = []
        target = targets_to_uri([replica.address for replica in replicas])
        async with AsyncCharstreamClient(target, lb_policy="round_robin") as client:
            deadline = time.monotonic() + 30
            # The second connection may come up after the first call: call until both have answered.
            while any(generated_chars(replica) == mark for replica, mark in zip(replicas, start)):
                assert time.monotonic() < deadline, "calls never reached both servers"
                texts.append(await client.generate(PROMPT, 20, temperature=0.0).text())
        return texts

    with BackgroundServer(config(tiny_model_dir)) as other:
        texts = run(main([server, other]))
    assert len(texts) >= 2 and texts == [onnx_loop(tiny_model_dir, PROMPT, 20, GREEDY)] * len(texts)
