"""The whole pipeline through its command lines: train -> export -> serve -> generate.

Every stage runs as the user runs it (a separate `python -m ...` process): a
small real training run on a text made here, the verifying export, the server
on a loopback port, and the streaming client. The text the client prints must
be the PyTorch reference sampler's greedy text, character for character.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_TEXT

PROMPT = "To be"
GENERATED = 120


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, f"{args[:2]} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("e2e")
    corpus = work / "corpus.txt"
    corpus.write_text(TINY_TEXT * 40, encoding="utf-8")
    out = work / "checkpoint"
    run(
        "-m", "training", "--corpus", str(corpus), "--out", str(out),
        "--embedding-dim", "16", "--hidden-size", "32", "--seq-len", "32",
        "--batch-size", "16", "--max-steps", "150", "--lr", "1e-2",
        "--eval-every", "150", "--threads", "1", "--no-progress",
    )  # fmt: skip
    return out


def test_train_export_serve_generate(trained_checkpoint: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from training.checkpoint import load_model
    from training.sample import generate

    model_dir = tmp_path / "model"
    exported = run("-m", "export", str(trained_checkpoint), "--out", str(model_dir),
                   "--variants", "fp32,int8", "--threads", "1")  # fmt: skip
    assert "verified" in exported.stdout + exported.stderr

    model, vocab, config = load_model(trained_checkpoint)
    # The run learned the text: far below the uniform model's ln(vocab) nats/char.
    assert config["training"]["val_loss"] < 0.5 * torch.log(torch.tensor(len(vocab))).item()
    expected = generate(model, vocab, PROMPT, GENERATED, temperature=0.0)

    server = subprocess.Popen(
        [sys.executable, "-m", "server", "--model", str(model_dir), "--host", "127.0.0.1",
         "--port", "0", "--device", "cpu", "--variant", "fp32"],  # fp32: PyTorch's exact greedy text
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    try:
        first_line = server.stdout.readline()
        match = re.search(r"listening on (\S+:\d+)", first_line)
        assert match, f"unexpected first server line: {first_line!r}"
        target = match.group(1)
        client = run("-m", "server.clients.generate_cli", "--target", target, "--prompt", PROMPT,
                     "--max-chars", str(GENERATED), "--temperature", "0", timeout=60)  # fmt: skip
        # The client always ends its output with one newline of its own.
        assert client.stdout == expected + "\n"
        assert "length" in client.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise
    assert code == 0, server.stderr.read()
