"""TLS and mutual TLS on real servers, certificate renewal without a restart,
start-up errors for bad TLS files, charstream-generate over TLS, and an API key sent to a
server without keys. The client's API-key metadata itself: tests/test_client_api_key.py."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cryptography import x509

from server.api.tls import TlsConfigError, server_credentials
from server.background import BackgroundServer
from server.clients import generate_cli
from server.clients.client import CharstreamClient, tls_credentials
from server.config import ServerConfig
from server.engine.sampling import SamplingSettings
from tests.plain_loop import onnx_loop, wire
from tests.tls_certs import Issued, Pki, make_pki

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT, CHARS, SEED = "To be", 40, 7


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _config(model: Path, pair: Issued | None = None, client_ca: Path | None = None) -> ServerConfig:
    return ServerConfig(
        model=str(model), port=0, device="cpu", max_sessions=4,
        tls_cert=str(pair.cert_path) if pair else None, tls_key=str(pair.key_path) if pair else None,
        tls_client_ca=str(client_ca) if client_ca else None,
    )


@pytest.fixture(scope="module")
def plain_server(tiny_model_dir: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(_config(tiny_model_dir)) as server:
        yield server


@pytest.fixture(scope="module")
def tls_server(tiny_model_dir: Path, pki: Pki) -> Iterator[BackgroundServer]:
    with BackgroundServer(_config(tiny_model_dir, pki.server)) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(tiny_model_dir: Path, pki: Pki) -> Iterator[BackgroundServer]:
    with BackgroundServer(_config(tiny_model_dir, pki.server, client_ca=pki.ca.cert_path)) as server:
        yield server


@pytest.fixture(scope="module")
def expected_text(plain_server: BackgroundServer) -> str:
    with CharstreamClient(plain_server.address) as client:
        return client.generate(PROMPT, CHARS, temperature=0.8, seed=SEED).text()


def _generate(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    with CharstreamClient(address, timeout=10, credentials=credentials) as client:
        return client.generate(PROMPT, CHARS, temperature=0.8, seed=SEED).text()


def _refused(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with CharstreamClient(address, timeout=10, credentials=credentials) as client:
        with pytest.raises(grpc.RpcError) as error:
            client.model_info()
    return error.value.code()


def test_a_client_trusting_the_ca_streams_what_a_plaintext_server_streams(
        tls_server: BackgroundServer, pki: Pki, expected_text: str, tiny_model_dir: Path) -> None:
    assert expected_text == onnx_loop(tiny_model_dir, PROMPT, CHARS, SamplingSettings(temperature=wire(0.8)), SEED)
    assert _generate(tls_server.address, tls_credentials(str(pki.ca.cert_path))) == expected_text


def test_plaintext_clients_and_clients_trusting_another_ca_are_refused(tls_server: BackgroundServer, pki: Pki) -> None:
    assert _refused(tls_server.address, None) == grpc.StatusCode.UNAVAILABLE
    assert _refused(tls_server.address, tls_credentials(str(pki.other_ca.cert_path))) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_takes_only_a_client_certificate_from_its_ca(
        mtls_server: BackgroundServer, pki: Pki, expected_text: str) -> None:
    ca = str(pki.ca.cert_path)
    assert _refused(mtls_server.address, tls_credentials(ca)) == grpc.StatusCode.UNAVAILABLE
    stranger = tls_credentials(ca, str(pki.other_client.cert_path), str(pki.other_client.key_path))
    assert _refused(mtls_server.address, stranger) == grpc.StatusCode.UNAVAILABLE
    member = tls_credentials(ca, str(pki.client.cert_path), str(pki.client.key_path))
    assert _generate(mtls_server.address, member) == expected_text


# --- renewal -----------------------------------------------------------------------------------------


def _served_serial(port: int, ca: Path) -> int:
    """The serial of the certificate a new connection to the server is shown."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])  # gRPC speaks HTTP/2 only
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _replace(source: Path | bytes, target: Path) -> None:
    """Swap `target` for new contents by rename, the way a renewal tool should."""
    staging = target.with_name(f".{target.name}.new")
    if isinstance(source, bytes):
        staging.write_bytes(source)
    else:
        shutil.copyfile(source, staging)
    os.replace(staging, target)


def _wait_for_serial(port: int, ca: Path, serial: int, seconds: float = 5.0) -> int:
    deadline = time.monotonic() + seconds
    while (seen := _served_serial(port, ca)) != serial and time.monotonic() < deadline:
        time.sleep(0.1)
    return seen


def test_renewed_certificates_are_served_to_new_connections_and_broken_ones_are_not(
        tiny_model_dir: Path, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture, expected_text: str) -> None:
    live = Issued(pki.server.certificate, pki.server.key, pki.server.cert_pem, pki.server.key_pem,
                  tmp_path / "tls.crt", tmp_path / "tls.key")
    _replace(pki.server.cert_path, live.cert_path)
    _replace(pki.server.key_path, live.key_path)
    ca, trust = pki.ca.cert_path, tls_credentials(str(pki.ca.cert_path))
    caplog.set_level(logging.INFO, logger="charstream.server")
    with BackgroundServer(_config(tiny_model_dir, live)) as server:
        assert _served_serial(server.port, ca) == pki.server.serial
        renewed = pki.new_server("renewed")
        _replace(renewed.cert_path, live.cert_path)
        _replace(renewed.key_path, live.key_path)
        assert _wait_for_serial(server.port, ca, renewed.serial) == renewed.serial
        assert _generate(server.address, trust) == expected_text

        _replace(renewed.key_pem[: len(renewed.key_pem) // 2], live.key_path)  # a half-written key
        for _ in range(3):
            assert _served_serial(server.port, ca) == renewed.serial
        assert _generate(server.address, trust) == expected_text
        failures = [r for r in caplog.records if r.getMessage() == "tls_reload_failed"]
        assert len(failures) == 1 and str(live.key_path) in failures[0].event_fields["error"]

        third = pki.new_server("third")
        _replace(third.cert_path, live.cert_path)  # its key is still the broken one
        assert _served_serial(server.port, ca) == renewed.serial
        _replace(third.key_path, live.key_path)
        assert _wait_for_serial(server.port, ca, third.serial) == third.serial
        assert _generate(server.address, trust) == expected_text


# --- start-up errors ---------------------------------------------------------------------------------


def test_unusable_tls_files_raise_an_error_naming_the_file(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    cert, key = str(pki.server.cert_path), str(pki.server.key_path)
    cases = {
        (str(tmp_path / "missing.crt"), key, None): rf"{tmp_path / 'missing.crt'}: cannot read it",
        (str(garbage), key, None): rf"{garbage}: not a PEM certificate",
        (cert, str(garbage), None): rf"{garbage}: not an unencrypted PEM private key",
        (cert, str(pki.client.key_path), None): rf"{pki.client.key_path} does not match the certificate in {cert}",
        (cert, key, str(garbage)): rf"client CA {garbage}: not a PEM certificate",
    }
    for arguments, message in cases.items():
        with pytest.raises(TlsConfigError, match=message) as error:
            server_credentials(*arguments)
        assert isinstance(error.value, OSError)  # what charstream-serve reports as a start-up failure


def test_the_server_exits_2_naming_a_bad_tls_file(tiny_model_dir: Path, pki: Pki, tmp_path: Path) -> None:
    bad = tmp_path / "bad.crt"
    bad.write_text("not a certificate\n")
    result = subprocess.run(
        [sys.executable, "-m", "server", "--model", str(tiny_model_dir), "--port", "0", "--device", "cpu",
         "--tls-cert", str(bad), "--tls-key", str(pki.server.key_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert f"charstream-serve: error: TLS certificate {bad}: not a PEM certificate" in result.stderr


# --- charstream-generate -----------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *arguments: str) -> str:
    code = generate_cli.main([*arguments, "--prompt", PROMPT, "--max-chars", str(CHARS), "--temperature", "0.8",
                              "--seed", str(SEED)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_generate_cli_over_tls_and_mutual_tls_prints_the_plain_text(
        tls_server: BackgroundServer, mtls_server: BackgroundServer, pki: Pki, expected_text: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    ca = str(pki.ca.cert_path)
    assert _cli(capsys, "--target", tls_server.address, "--tls-ca", ca) == expected_text + "\n"
    client_pair = ("--tls-cert", str(pki.client.cert_path), "--tls-key", str(pki.client.key_path))
    assert _cli(capsys, "--target", mtls_server.address, "--tls-ca", ca, *client_pair) == expected_text + "\n"
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main(["--target", mtls_server.address, "--tls-cert", str(pki.client.cert_path)])
    assert exit_info.value.code == 2 and "--tls-cert and --tls-key go together" in capsys.readouterr().err


# --- API keys ----------------------------------------------------------------------------------------


def test_an_api_key_does_not_disturb_a_server_without_keys(plain_server: BackgroundServer, expected_text: str,
                                                           tiny_model_dir: Path) -> None:
    with CharstreamClient(plain_server.address, timeout=10, api_key="s3cret") as client:
        assert client.generate(PROMPT, CHARS, temperature=0.8, seed=SEED).text() == expected_text
        session = client.create_session("To", seed=1)
        assert session.info().session_id == session.id
        session.delete()
        conversation = client.conversation()
        assert "".join(conversation.say("To be", max_chars=5, temperature=0.8, seed=SEED)) == onnx_loop(
            tiny_model_dir, "To be", 5, SamplingSettings(temperature=wire(0.8)), SEED)
        conversation.close()
