"""Export's validation text is the split the checkpoint was trained with, counted as training counts it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import TINY_TEXT  # noqa: E402

from export.evaluate import EvalTextError, load_streams, validation_fraction  # noqa: E402
from export.pipeline import export_checkpoint  # noqa: E402
from export.reference import TorchReference  # noqa: E402
from training.checkpoint import load_model  # noqa: E402
from training.corpus import load_corpus  # noqa: E402
from training.data import split_ids  # noqa: E402
from training.settings import Limits, Settings  # noqa: E402
from training.train import train  # noqa: E402
from training.vocab import Vocab  # noqa: E402

TEXT = TINY_TEXT * 12  # ~2,100 characters: both splits hold many sequences
SEQ_LEN = 16


def _training_validation_ids(corpus_path: Path, val_fraction: float) -> np.ndarray:
    """The validation characters training's own split takes from the corpus file, as token ids."""
    text = load_corpus(str(corpus_path)).text
    ids = torch.tensor(Vocab.from_text(text).encode(text), dtype=torch.long)
    return split_ids(ids, SEQ_LEN, val_fraction).val.numpy()


@pytest.fixture(scope="module")
def trained_at_020(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus file, checkpoint) of a short run trained with --val-fraction 0.2."""
    root = tmp_path_factory.mktemp("val_fraction")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    settings = Settings(
        corpus=str(corpus), embedding_dim=8, hidden_size=16, seq_len=SEQ_LEN, batch_size=4, val_fraction=0.2
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(settings, Limits(max_steps=2, eval_every=2), root / "run", device="cpu", show_progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    return corpus, root / "run"


def test_export_scores_the_characters_training_validated_on(trained_at_020, tmp_path):
    corpus, checkpoint = trained_at_020
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    assert config["training"]["settings"]["val_fraction"] == 0.2
    expected = _training_validation_ids(corpus, 0.2)
    assert len(expected) == config["training"]["corpus"]["val_chars"]

    # One stream: the evaluation covers the validation part whole, so its size and loss pin it down.
    manifest = export_checkpoint(checkpoint, tmp_path / "model", eval_text=corpus, eval_streams=1, greedy_length=20)
    evaluation = manifest["evaluation"]
    assert evaluation["chars"] == len(expected) and evaluation["streams"] == 1
    model, _, _ = load_model(checkpoint)
    assert evaluation["pytorch_val_loss"] == pytest.approx(TorchReference(model).stream_losses(expected[None, :]))


@pytest.mark.parametrize("val_fraction", [0.05, 0.1, 0.2, 0.37])
def test_load_streams_cuts_at_training_split_boundary(tmp_path, val_fraction):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"\xef\xbb\xbf" + TEXT.encode())  # training drops a leading BOM; so must export
    vocab = Vocab.from_text(TEXT).chars
    streams = load_streams(corpus, vocab, 1, val_fraction=val_fraction)
    np.testing.assert_array_equal(streams[0], _training_validation_ids(corpus, val_fraction))


def test_validation_fraction_comes_from_config_json_with_training_default_when_absent():
    assert validation_fraction({"training": {"settings": {"val_fraction": 0.25}}}) == 0.25
    assert validation_fraction({"training": {"steps": 0}}) == Settings.val_fraction
    assert validation_fraction({}) == Settings.val_fraction
    with pytest.raises(EvalTextError, match="val_fraction"):
        validation_fraction({"training": {"settings": {"val_fraction": 1.5}}})
