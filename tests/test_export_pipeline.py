"""export_checkpoint and charstream-export: model directory contents, atomicity, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from conftest import TINY_TEXT

from export import pipeline
from export.cli import main
from export.onnx_cell import build_cell
from export.pipeline import ExportError, export_checkpoint
from export.reference import TorchReference
from export.variants import VARIANTS
from export.verify import VerificationError
from training.checkpoint import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text(TINY_TEXT * 20, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def full_export(tiny_checkpoint: Path, eval_text: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("exports") / "model"
    manifest = export_checkpoint(tiny_checkpoint, out, ("fp32", "fp16", "int8"), eval_text=eval_text)
    return out, manifest


def _no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_model_directory_holds_every_variant_and_a_manifest(full_export):
    out, manifest = full_export
    on_disk = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["format"] == "charstream-model/1" and on_disk["default"] == "fp32"
    assert {n: v["file"] for n, v in on_disk["variants"].items()} == {
        "fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx",
    }
    for entry in on_disk["variants"].values():
        data = (out / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
        assert "CPUExecutionProvider" in entry["verified"]
    assert sorted(os.listdir(out)) == sorted(["manifest.json", "model.onnx", "model.fp16.onnx", "model.int8.onnx"])
    assert _no_leftovers(out.parent) == []


def test_every_variant_reports_validation_loss_next_to_pytorch(full_export):
    _, manifest = full_export
    reference_loss = manifest["evaluation"]["pytorch_val_loss"]
    assert manifest["evaluation"]["text"] == "eval.txt"
    for name, entry in manifest["variants"].items():
        assert abs(entry["val_loss"] - reference_loss) <= VARIANTS[name].tolerance.max_loss_delta
    # A random model over a ~40-character vocabulary scores about ln(40) nats.
    assert 2.0 < reference_loss < 6.0


def test_model_onnx_steps_in_plain_onnxruntime(full_export, tiny_checkpoint):
    """A consumer with nothing from this project: onnxruntime, numpy and json only."""
    out, _ = full_export
    snippet = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        import onnxruntime as ort
        session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        vocab = json.loads(meta["charstream.vocab"])
        config = json.loads(meta["charstream.config"])
        layers, size = config["num_layers"], config["hidden_size"]
        hidden = np.zeros((layers, 5, size), dtype=np.float32)
        tokens = np.array([vocab.index(c) for c in "To be"], dtype=np.int64)
        for _ in range(3):
            logits, hidden = session.run(["logits", "hidden_out"], {"token_ids": tokens, "hidden": hidden})
        project = sorted(m for m in sys.modules if m.split(".")[0] in ("export", "training", "torch"))
        print(json.dumps({"logits": logits.tolist(), "hidden": hidden.tolist(), "project_modules": project}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", snippet, str(out / "model.onnx")],
        capture_output=True, text=True, check=True, cwd=out,
    )
    got = json.loads(result.stdout)
    assert got["project_modules"] == []
    model, vocab, _ = load_model(tiny_checkpoint)
    reference = TorchReference(model)
    tokens = np.array(vocab.encode("To be"))
    hidden = reference.zero_state(5)
    for _ in range(3):
        logits, hidden = reference.step(tokens, hidden)
    np.testing.assert_allclose(np.array(got["logits"]), logits, atol=1e-5)
    np.testing.assert_allclose(np.array(got["hidden"]), hidden, atol=1e-5)


def test_failed_verification_leaves_nothing_behind(tiny_checkpoint, tmp_path, monkeypatch):
    """A builder that writes a wrong graph (r/z gates swapped): export fails, target never appears."""
    H = 16

    def wrong_fp32(weights, config, vocab, path):
        order = np.r_[H : 2 * H, 0:H, 2 * H : 3 * H]
        swapped = {k: (v[order] if k.startswith("gru.") else v) for k, v in weights.items()}
        onnx.save(build_cell(swapped, config, vocab), str(path))

    monkeypatch.setitem(pipeline.VARIANTS, "fp32", dataclasses.replace(VARIANTS["fp32"], build=wrong_fp32))
    out = tmp_path / "model"
    with pytest.raises(VerificationError, match="fp32 variant failed verification on CPUExecutionProvider: batch 1"):
        export_checkpoint(tiny_checkpoint, out)
    assert not out.exists()
    assert _no_leftovers(tmp_path) == []


def test_existing_output_is_refused_without_force_and_replaced_with_it(tiny_checkpoint, tmp_path):
    out = tmp_path / "model"
    export_checkpoint(tiny_checkpoint, out)
    assert sorted(os.listdir(out)) == ["manifest.json", "model.onnx"]
    first = (out / "manifest.json").read_text()
    with pytest.raises(ExportError, match="not empty; pass --force"):
        export_checkpoint(tiny_checkpoint, out)
    assert (out / "manifest.json").read_text() == first
    manifest = export_checkpoint(tiny_checkpoint, out, ("fp32", "int8"), force=True)
    assert set(manifest["variants"]) == {"fp32", "int8"}
    assert (out / "model.int8.onnx").is_file()
    assert _no_leftovers(tmp_path) == []


def test_force_never_replaces_a_directory_that_is_not_an_export(tiny_checkpoint, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="holds no earlier export"):
        export_checkpoint(tiny_checkpoint, out, force=True)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="would contain or replace the checkpoint"):
        export_checkpoint(tiny_checkpoint, tiny_checkpoint, force=True)


def test_an_empty_existing_directory_is_used(tiny_checkpoint, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    export_checkpoint(tiny_checkpoint, out)
    assert (out / "model.onnx").is_file()


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, copy)
    return copy


def _run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main([*map(str, args), "--quiet"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: shutil.rmtree(d), "checkpoint directory not found"),
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: (d / "model.safetensors").write_bytes(b"not weights"), "not a readable safetensors file"),
        (lambda d: (d / "vocab.json").write_text(json.dumps(list("abc"))), "vocab.json has 3 characters but config.json says"),
        (lambda d: (d / "config.json").write_text("{"), "is not valid JSON"),
    ],
    ids=["missing", "incomplete", "corrupt-weights", "vocab-size-mismatch", "corrupt-config"],
)
def test_bad_checkpoints_give_one_line_errors_and_write_nothing(damage, message, tiny_checkpoint, tmp_path, capsys):
    checkpoint = _copy(tiny_checkpoint, tmp_path)
    damage(checkpoint)
    out = tmp_path / "model"
    code, err = _run_cli(capsys, checkpoint, "--out", out)
    assert code == 2
    assert err.startswith("charstream-export: error: bad checkpoint:") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and _no_leftovers(tmp_path) == []


def test_weights_that_do_not_match_the_config_are_refused(tiny_checkpoint, tmp_path, capsys):
    checkpoint = _copy(tiny_checkpoint, tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    config["hidden_size"] = 32
    (checkpoint / "config.json").write_text(json.dumps(config))
    code, err = _run_cli(capsys, checkpoint, "--out", tmp_path / "model")
    assert code == 2 and "does not match config.json" in err and err.count("\n") == 1


def test_output_under_a_file_is_not_writable(tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = _run_cli(capsys, tiny_checkpoint, "--out", blocker / "model")
    assert code == 2 and "is not writable" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_output_in_a_read_only_directory_is_not_writable(tiny_checkpoint, tmp_path, capsys):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, err = _run_cli(capsys, tiny_checkpoint, "--out", parent / "model")
    finally:
        parent.chmod(0o755)
    assert code == 2 and "is not writable" in err and list(parent.iterdir()) == []


def test_bad_options_give_clear_errors(tiny_checkpoint, tmp_path, capsys):
    code, err = _run_cli(capsys, tiny_checkpoint, "--out", tmp_path / "m", "--variants", "fp32,bf16")
    assert code == 2 and "unknown variant(s) ['bf16']" in err
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("ÿ" * 100, encoding="utf-8")
    code, err = _run_cli(capsys, tiny_checkpoint, "--out", tmp_path / "m", "--eval-text", unknown)
    assert code == 2 and "characters the model's vocabulary lacks" in err
    code, err = _run_cli(capsys, tiny_checkpoint, "--out", tmp_path / "m", "--prompt", "ÿ")
    assert code == 2 and "prompt must be" in err
    assert not (tmp_path / "m").exists()


def test_python_dash_m_export_runs_end_to_end(tiny_checkpoint, tmp_path):
    out = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, "-m", "export", str(tiny_checkpoint), "--out", str(out), "--variants", "fp32", "--threads", "1"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "fp32: verified on CPUExecutionProvider" in result.stdout
    assert json.loads((out / "manifest.json").read_text())["variants"]["fp32"]["file"] == "model.onnx"


@pytest.mark.slow
def test_default_size_random_checkpoint_exports_and_verifies(tmp_path):
    """The default model size (embedding 256, hidden 1024, 1 layer) with random weights."""
    import torch

    from training.checkpoint import save_model
    from training.model import CharGRU, ModelConfig
    from training.vocab import Vocab

    torch.manual_seed(1)
    vocab = Vocab.from_text(TINY_TEXT)
    checkpoint = tmp_path / "checkpoint"
    save_model(checkpoint, CharGRU(ModelConfig(vocab_size=len(vocab))), vocab, {"steps": 0})
    manifest = export_checkpoint(checkpoint, tmp_path / "model", ("fp32", "int8"))
    assert manifest["config"]["hidden_size"] == 1024
    fp32 = manifest["variants"]["fp32"]["verified"]["CPUExecutionProvider"]
    assert fp32["greedy"]["identical_chars"] == 500
    assert set(manifest["variants"]["int8"]["verified"]["CPUExecutionProvider"]["batches"]) == {"1", "3", "64"}
