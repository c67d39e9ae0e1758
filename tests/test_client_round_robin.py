"""Client-side load balancing: one round_robin channel over two real servers on
loopback ports, targets_to_uri, charstream-generate with several --target flags,
and that the deployment examples parse."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from server.background import BackgroundServer
from server.clients import generate_cli
from server.clients.client import CharstreamClient, targets_to_uri
from server.config import ServerConfig
from tests.plain_loop import GREEDY, onnx_loop

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Whether 'tis"
CHARS = 40


@pytest.fixture(scope="module")
def replicas(tiny_model_dir: Path) -> Iterator[list[BackgroundServer]]:
    """Two servers on the same model, each on a free loopback port."""
    config = ServerConfig(model=str(tiny_model_dir), host="127.0.0.1", port=0, device="cpu", max_sessions=8)
    with BackgroundServer(config) as first, BackgroundServer(config) as second:
        yield [first, second]


@pytest.fixture(scope="module")
def reference_text(replicas: list[BackgroundServer]) -> str:
    """The greedy text of one server alone, the default pick_first channel."""
    with CharstreamClient(replicas[0].address) as client:
        return client.generate(PROMPT, CHARS, temperature=0.0).text()


def generated_chars(server: BackgroundServer) -> int:
    """Characters this server has streamed, from its own metrics.

    They are counted before each chunk is written, so by the time the client has
    read a whole call the server's count already includes it.
    """
    assert server.running is not None
    return int(server.running.metrics.registry.get_sample_value("charstream_generated_chars_total") or 0)


def test_round_robin_spreads_calls_over_both_servers_with_identical_text(
    replicas: list[BackgroundServer], reference_text: str
) -> None:
    start = [generated_chars(server) for server in replicas]

    def calls_since(marks: list[int]) -> list[int]:
        grown = [generated_chars(server) - mark for server, mark in zip(replicas, marks)]
        assert all(chars % CHARS == 0 for chars in grown), "every call here generates CHARS characters"
        return [chars // CHARS for chars in grown]

    target = targets_to_uri([server.address for server in replicas])
    assert target.startswith("ipv4:127.0.0.1:")
    texts = []
    with CharstreamClient(target, lb_policy="round_robin") as client:
        grpc.channel_ready_future(client.channel).result(timeout=30)
        # The second subchannel may still be connecting when the channel first turns ready:
        # call until both servers have answered (pick_first would never get there).
        deadline = time.monotonic() + 30
        while min(calls_since(start)) == 0:
            assert time.monotonic() < deadline, "calls never reached both servers"
            texts.append(client.generate(PROMPT, CHARS, temperature=0.0).text())
        # Both are connected now: round_robin alternates, so each takes its share.
        middle = [generated_chars(server) for server in replicas]
        for _ in range(6):
            texts.append(client.generate(PROMPT, CHARS, temperature=0.0).text())
        assert all(calls >= 2 for calls in calls_since(middle)), calls_since(middle)
    assert sum(calls_since(start)) == len(texts)
    assert texts and all(text == reference_text for text in texts)

def test_sessions_work_through_a_round_robin_channel_to_one_server(replicas: list[BackgroundServer],
                                                                   tiny_model_dir: Path) -> None:
    """Without a shared store a session lives on one server: the option itself must not break sessions."""
    with CharstreamClient(replicas[0].address, lb_policy="round_robin") as client:
        session = client.create_session(prompt="To be", seed=1)
        first = session.generate(max_chars=10, temperature=0.0).text()
        second = session.generate(max_chars=10, temperature=0.0).text()
        assert first + second == onnx_loop(tiny_model_dir, "To be", 20, GREEDY)
        assert session.info().consumed_chars == 5 + 20
        session.delete()


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        (["127.0.0.1:50051"], "127.0.0.1:50051"),
        (["localhost:50051"], "localhost:50051"),
        (["dns:///charstream.example:50051"], "dns:///charstream.example:50051"),
        ([" 10.0.0.1:50051 "], "10.0.0.1:50051"),
        (["127.0.0.1:50051", "127.0.0.1:50052"], "ipv4:127.0.0.1:50051,127.0.0.1:50052"),
        (["10.0.0.1:1", " 10.0.0.2:65535", "10.0.0.3:50051"], "ipv4:10.0.0.1:1,10.0.0.2:65535,10.0.0.3:50051"),
        (["[::1]:50051", "[fd00::2]:50052"], "ipv6:[::1]:50051,[fd00::2]:50052"),
    ],
)
def test_targets_to_uri(addresses: list[str], expected: str) -> None:
    assert targets_to_uri(addresses) == expected


@pytest.mark.parametrize(
    ("addresses", "message"),
    [
        ([], "one or more"),
        (["127.0.0.1:50051", ""], "non-empty"),
        (["127.0.0.1:50051", "localhost:50052"], "dns:///"),
        (["replica-a:50051", "replica-b:50051"], "names a host"),
        (["127.0.0.1:50051", "[::1]:50052"], "mixed"),
        (["127.0.0.1:50051", "127.0.0.1"], "IP:PORT"),
        (["127.0.0.1:50051", "127.0.0.1:0"], "1..65535"),
        (["127.0.0.1:50051", "127.0.0.1:70000"], "1..65535"),
        (["::1:50051", "::1:50052"], "[ADDRESS]:PORT"),
        (["[::1]", "[::1]:50052"], "[ADDRESS]:PORT"),
        (["[127.0.0.1]:50051", "127.0.0.1:50052"], "brackets"),
        (["dns:///a:50051", "127.0.0.1:50052"], "target URI"),
    ],
)
def test_targets_to_uri_refuses_what_one_target_cannot_hold(addresses: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("[", r"\[")):
        targets_to_uri(addresses)


@pytest.mark.parametrize(
    ("values", "policy", "expected"),
    [
        ([], None, ("localhost:50051", None)),
        (["10.0.0.1:50051"], None, ("10.0.0.1:50051", None)),
        (["10.0.0.1:50051", "10.0.0.2:50051"], None, ("ipv4:10.0.0.1:50051,10.0.0.2:50051", "round_robin")),
        (["10.0.0.1:50051,10.0.0.2:50051"], None, ("ipv4:10.0.0.1:50051,10.0.0.2:50051", "round_robin")),
        (["10.0.0.1:50051", "10.0.0.2:50051"], "pick_first", ("ipv4:10.0.0.1:50051,10.0.0.2:50051", "pick_first")),
        (["ipv4:10.0.0.1:50051,10.0.0.2:50051"], "round_robin",
         ("ipv4:10.0.0.1:50051,10.0.0.2:50051", "round_robin")),
        (["dns:///charstream:50051"], "round_robin", ("dns:///charstream:50051", "round_robin")),
    ],
)
def test_cli_target_resolution(values: list[str], policy: str | None, expected: tuple[str, str | None]) -> None:
    assert generate_cli.resolve_target(values, policy) == expected


def test_cli_with_two_targets_streams_the_single_server_text(
    replicas: list[BackgroundServer], reference_text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = (server.address for server in replicas)
    common = ["--prompt", PROMPT, "--max-chars", str(CHARS), "--temperature", "0"]
    for targets in (["--target", first, "--target", second], ["--target", f"{first},{second}"]):
        assert generate_cli.main([*targets, *common]) == 0
        captured = capsys.readouterr()
        assert captured.out == reference_text + "\n"
        assert f"[finish: length, {CHARS} chars]" in captured.err


def test_cli_refuses_host_names_in_a_target_list(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main(["--target", "replica-a:50051", "--target", "replica-b:50051"])
    assert exit_info.value.code == 2 and "dns:///" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["envoy.yaml", "kubernetes.yaml"])
def test_deployment_examples_parse(name: str) -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    documents = [doc for doc in yaml.safe_load_all((REPO_ROOT / "deploy" / "examples" / name).read_text()) if doc]
    assert documents and all(isinstance(doc, dict) for doc in documents)
