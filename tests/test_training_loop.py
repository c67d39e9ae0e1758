"""The training loop on tiny models and toy texts: learning, checkpoints, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT
from safetensors.torch import load_file

from training.checkpoint import load_model, save_model
from training.corpus import Corpus, sha256_bytes
from training.data import Batches, split_ids, validation_windows
from training.metrics_log import read_metrics
from training.model import CharGRU, ModelConfig
from training.train import Limits, Settings, evaluate, train
from training.vocab import Vocab

TOY = "the cat sat on the mat.\n" * 120  # learnable: each character follows from the last few
TINY = dict(embedding_dim=16, hidden_size=32, seq_len=16, batch_size=8, lr=1e-2, warmup_steps=5)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def corpus_of(text: str) -> Corpus:
    return Corpus(text=text, source="toy", sha256=sha256_bytes(text.encode()))


def run(out: Path, text: str = TOY, settings: dict | None = None, **limits) -> tuple:
    s = Settings(corpus="toy", **{**TINY, **(settings or {})})
    prog = train(s, Limits(**limits), out, corpus=corpus_of(text), show_progress=False, log=lambda m: None)
    return s, prog


def test_vocab_round_trip(tmp_path: Path) -> None:
    vocab = Vocab.from_text(TINY_TEXT)
    assert vocab.decode(vocab.encode(TINY_TEXT)) == TINY_TEXT
    assert vocab.chars == sorted(set(TINY_TEXT))
    vocab.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json") == vocab


def test_loss_falls_well_below_uniform(tmp_path: Path) -> None:
    _, prog = run(tmp_path / "run", max_steps=150, eval_every=50)
    uniform = math.log(len(set(TOY)))
    assert prog.best_val_loss < 0.2 * uniform, (prog.best_val_loss, uniform)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["training"]["steps"] == 150
    # 20 full batches and one short one per epoch
    assert config["training"]["tokens_seen"] == prog.tokens_seen
    assert 140 * 8 * 16 < prog.tokens_seen < 150 * 8 * 16


def test_checkpoint_directory_contents(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(out, max_steps=12, eval_every=5, log_every=2)
    names = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert names == {
        "config.json", "vocab.json", "model.safetensors", "metrics.jsonl", "loss.png", "trainer",
        "trainer/state.json", "trainer/model.safetensors", "trainer/optimizer.safetensors",
    }  # fmt: skip
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    facts = json.loads((out / "config.json").read_text())["training"]
    assert facts["corpus"]["sha256"] == sha256_bytes(TOY.encode())
    assert facts["val_bpc"] == pytest.approx(facts["val_loss"] / math.log(2))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "train_loss" in m] == [2, 4, 6, 8, 10, 12]
    assert [m["step"] for m in metrics if "val_loss" in m] == [5, 10, 12]
    # The saved weights are the best-validation ones, and their recorded loss is reproducible.
    model, vocab, config = load_model(out)
    ids = torch.tensor(vocab.encode(TOY))
    val = split_ids(ids, 16).val
    assert evaluate(model, validation_windows(val, 16)) == pytest.approx(config["training"]["val_loss"], abs=1e-6)
    assert config["training"]["weights_step"] == min(
        (m for m in metrics if "val_loss" in m), key=lambda m: m["val_loss"]
    )["step"]


def test_checkpoint_round_trip_identical_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vocab = Vocab.from_text(TINY_TEXT)
    model = CharGRU(ModelConfig(len(vocab), embedding_dim=8, hidden_size=12, num_layers=2)).eval()
    save_model(tmp_path, model, vocab, {"steps": 3})
    loaded, loaded_vocab, config = load_model(tmp_path)
    x = torch.tensor([vocab.encode(TINY_TEXT[:40])])
    h0 = torch.randn(2, 1, 12)
    assert loaded_vocab == vocab and config["training"] == {"steps": 3}
    for a, b in zip(model(x, h0), loaded(x, h0)):
        assert torch.equal(a, b)


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """Stop mid-epoch, resume, and land on the very same weights as one long run."""
    text = TINY_TEXT * 6  # ~1,000 chars: 7 batches per epoch, so 40 steps cross epochs
    opts = dict(settings={"dropout": 0.3, "num_layers": 2}, max_steps=40, eval_every=15)
    run(tmp_path / "a", text, **opts)

    s = Settings(corpus="toy", **{**TINY, "dropout": 0.3, "num_layers": 2})
    b = tmp_path / "b"
    c = corpus_of(text)
    quiet = dict(corpus=c, show_progress=False, log=lambda m: None)
    first = train(s, Limits(max_steps=40, eval_every=15), b, should_stop=lambda p: p.step == 17, **quiet)
    assert first.stop_reason == "interrupted" and first.step == 17
    second = train(s, Limits(max_steps=40, eval_every=15), b, resume_from=b, **quiet)
    assert second.step == 40 and second.stop_reason == "max_steps"

    wa = load_file(str(tmp_path / "a" / "trainer" / "model.safetensors"))
    wb = load_file(str(b / "trainer" / "model.safetensors"))
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=1e-6), name
    oa = load_file(str(tmp_path / "a" / "trainer" / "optimizer.safetensors"))
    ob = load_file(str(b / "trainer" / "optimizer.safetensors"))
    for name in oa:
        assert torch.allclose(oa[name].double(), ob[name].double(), rtol=0, atol=1e-6), name
    ta = [m for m in read_metrics(tmp_path / "a") if "train_loss" in m]
    tb = [m for m in read_metrics(b) if "train_loss" in m]
    assert [m["train_loss"] for m in ta] == pytest.approx([m["train_loss"] for m in tb], abs=1e-5)


def test_batches_are_deterministic_and_cover_the_split() -> None:
    train_ids = torch.arange(1000)
    one, two = Batches(train_ids, 10, 7, seed=3), Batches(train_ids, 10, 7, seed=3)
    for epoch in (0, 1):
        xs = [one.batch(epoch, i)[0] for i in range(one.batches_per_epoch(epoch))]
        ys = [two.batch(epoch, i)[0] for i in range(two.batches_per_epoch(epoch))]
        assert all(torch.equal(a, b) for a, b in zip(xs, ys))
        starts = torch.cat(xs)[:, 0]
        assert len(set(starts.tolist())) == len(starts) == one.windows_per_epoch(epoch) >= 98
    x, y = one.batch(0, 0)
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == (7, 10)
    assert not torch.equal(one.batch(0, 0)[0], one.batch(1, 0)[0])


def test_validation_windows_cover_every_target_once() -> None:
    val = torch.arange(257)
    groups = validation_windows(val, 50)
    targets = torch.cat([t.flatten() for _, t in groups])
    assert torch.equal(targets, val[1:])
    assert [tuple(x.shape) for x, _ in groups] == [(5, 50), (1, 6)]


def test_epochs_limit_and_schedule(tmp_path: Path) -> None:
    settings, prog = run(tmp_path / "run", epochs=2, eval_every=1000)
    ids = torch.tensor(Vocab.from_text(TOY).encode(TOY))
    batches = Batches(split_ids(ids, 16).train, 16, 8, settings.seed)
    assert prog.stop_reason == "epochs" and (prog.epoch, prog.batch_index) == (2, 0)
    assert prog.step == batches.batches_per_epoch(0) + batches.batches_per_epoch(1)
    lrs = [m["lr"] for m in read_metrics(tmp_path / "run") if "lr" in m]
    assert lrs == sorted(lrs, reverse=True)  # past warmup, cosine only goes down


def test_lr_schedule() -> None:
    from training.optim import lr_at, progress

    assert lr_at(0, 0.0, 1.0, 10, 0.1) == pytest.approx(0.1)  # warmup
    assert lr_at(9, 0.0, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(50, 0.5, 1.0, 10, 0.1) == pytest.approx(0.55)
    assert lr_at(99, 1.0, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert progress(50, 100, 0.0, None) == 0.5
    assert progress(10, None, 30.0, 60.0) == 0.5  # time only: the clock drives it
    assert progress(80, 100, 30.0, 60.0) == 0.8  # both: whichever is further
    assert progress(500, 100, 0.0, None) == 1.0
