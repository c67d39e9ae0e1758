"""Shared fixtures: a tiny random-weight checkpoint and its exported model directory.

Made once per test session in a temporary directory; no test needs network or
files outside the repository.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.devices import SERVING_DEVICES

TINY_TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles.\n"
)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight checkpoint (embedding 8, hidden 16) over TINY_TEXT's characters."""
    torch = pytest.importorskip("torch")
    from training.checkpoint import save_model
    from training.model import CharGRU, ModelConfig
    from training.vocab import Vocab

    torch.manual_seed(0)
    vocab = Vocab.from_text(TINY_TEXT)
    model = CharGRU(ModelConfig(vocab_size=len(vocab), embedding_dim=8, hidden_size=16, num_layers=2))
    directory = tmp_path_factory.mktemp("tiny_checkpoint")
    save_model(directory, model, vocab, {"steps": 0})
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint through the real export (fp32 model.onnx + manifest.json, verified)."""
    from export.pipeline import export_checkpoint

    directory = tmp_path_factory.mktemp("tiny_model")
    export_checkpoint(tiny_checkpoint, directory, variants=("fp32",))
    return directory


@pytest.fixture(scope="module", params=SERVING_DEVICES)
def serving_device(request: pytest.FixtureRequest) -> str:
    """"cpu", and "cuda" where it can run: the --device of a test module's server."""
    return request.param


@pytest.fixture(scope="module")
def channel(server):  # noqa: ANN001, ANN201 - `server` is the test module's own fixture
    """A plaintext channel to the test module's `server` fixture (a BackgroundServer)."""
    import grpc

    with grpc.insecure_channel(server.address) as opened:
        yield opened
