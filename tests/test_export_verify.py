"""Verification against PyTorch: right graphs pass, deliberately wrong graphs fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("torch")

from export.gru_op import build_gru_op_graph
from export.onnx_cell import META_VOCAB, build_cell
from export.reference import TorchReference
from export.variants import VARIANTS, Tolerance
from export.verify import Subject, VerificationError, verify_cell
from server.engine.model.providers import CPU, CUDA, cuda_available
from training.checkpoint import load_model

FP32 = VARIANTS["fp32"].tolerance


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: Path):
    model, vocab, _ = load_model(tiny_checkpoint)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, vocab.chars, model.config.to_dict(), weights


@pytest.fixture(scope="module")
def reference(loaded) -> TorchReference:
    return TorchReference(loaded[0])


def _save(model: onnx.ModelProto, directory: Path, name: str = "cell.onnx") -> Path:
    path = directory / name
    onnx.save(model, str(path))
    return path


def _verify(path: Path, reference: TorchReference, loaded, tolerance: Tolerance = FP32, provider: str = CPU) -> dict:
    _, vocab, config, _ = loaded
    return verify_cell(
        path, reference, tolerance, subject=Subject("fp32", provider),
        vocab=vocab, config=config, prompt=[1, 2, 3, 4],
    )


def _plain_greedy(path: Path, prompt: list[int], length: int, layers: int, hidden_size: int) -> list[int]:
    """The graph file's free-running greedy tokens, from a plain ONNX Runtime loop (no export code)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    hidden = np.zeros((layers, 1, hidden_size), np.float32)
    for token in prompt:
        logits, hidden = session.run(None, {"token_ids": np.array([token], np.int64), "hidden": hidden})
    out: list[int] = []
    for _ in range(length):
        out.append(int(np.argmax(logits[0])))
        logits, hidden = session.run(None, {"token_ids": np.array([out[-1]], np.int64), "hidden": hidden})
    return out


def _identical(a: list[int], b: list[int]) -> int:
    """How many leading tokens two texts share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _batch_diffs(path: Path, reference: TorchReference, seed: int = 0) -> dict[tuple[str, str], float]:
    """Max |Δlogits| and |Δstate| per batch size on the documented inputs (random tokens, states in [-1, 1])."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    diffs = {}
    for batch in (1, 3, 64):
        tokens = rng.integers(0, reference.vocab_size, size=batch)
        hidden = rng.uniform(-1.0, 1.0, size=(reference.num_layers, batch, reference.hidden_size)).astype(np.float32)
        ref_logits, ref_hidden = reference.step(tokens, hidden)
        logits, hidden_out = session.run(None, {"token_ids": tokens.astype(np.int64), "hidden": hidden})
        diffs[str(batch), "logits"] = float(np.abs(logits - ref_logits).max())
        diffs[str(batch), "hidden"] = float(np.abs(hidden_out - ref_hidden).max())
    return diffs


def test_hand_written_cell_matches_pytorch_at_every_batch_size(loaded, reference, tmp_path):
    _, vocab, config, weights = loaded
    path = _save(build_cell(weights, config, vocab), tmp_path)
    facts = _verify(path, reference, loaded)
    # The reported differences are the ones a plain loop measures, at batch sizes 1, 3 and 64.
    reported = {(b, k): d[k] for b, d in facts["batches"].items() for k in ("logits", "hidden")}
    assert reported == pytest.approx(_batch_diffs(path, reference), abs=1e-7)
    for diffs in facts["batches"].values():
        assert diffs["logits"] < 1e-5 and diffs["hidden"] < 1e-5
    # The file's own greedy text, by a plain loop, is PyTorch's, all 500 characters.
    generated = _plain_greedy(path, [1, 2, 3, 4], 500, config["num_layers"], config["hidden_size"])
    assert generated == reference.greedy([1, 2, 3, 4], 500)
    assert facts["greedy"]["identical_chars"] == _identical(generated, reference.greedy([1, 2, 3, 4], 500))
    assert facts["greedy"]["top1_agreement"] == 1.0


def test_gru_op_cell_with_linear_before_reset_1_matches_pytorch(loaded, reference, tmp_path):
    _, vocab, config, weights = loaded
    path = _save(build_gru_op_graph(weights, config, vocab, linear_before_reset=1), tmp_path)
    facts = _verify(path, reference, loaded)
    generated = _plain_greedy(path, [1, 2, 3, 4], 500, config["num_layers"], config["hidden_size"])
    assert generated == reference.greedy([1, 2, 3, 4], 500)
    assert facts["greedy"]["identical_chars"] == _identical(generated, reference.greedy([1, 2, 3, 4], 500))


def test_gru_op_cell_with_linear_before_reset_0_fails(loaded, reference, tmp_path):
    """The exporter trap: reset gate applied before the hidden matmul. Silently wrong numbers."""
    _, vocab, config, weights = loaded
    path = _save(build_gru_op_graph(weights, config, vocab, linear_before_reset=0), tmp_path)
    with pytest.raises(VerificationError, match=r"fp32 variant .* batch 1: max \|Δ(logits|state)\| .* exceeds tolerance"):
        _verify(path, reference, loaded)


def _swap_reset_and_update_gates(weights: dict, num_layers: int, hidden_size: int) -> dict:
    """PyTorch stacks gates (r, z, n); swapping r and z rows is the classic gate-order bug."""
    swapped = dict(weights)
    order = np.r_[hidden_size : 2 * hidden_size, 0:hidden_size, 2 * hidden_size : 3 * hidden_size]
    for layer in range(num_layers):
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            name = f"gru.{kind}_l{layer}"
            swapped[name] = weights[name][order]
    return swapped


def test_cell_with_swapped_gate_order_fails(loaded, reference, tmp_path):
    _, vocab, config, weights = loaded
    wrong = _swap_reset_and_update_gates(weights, config["num_layers"], config["hidden_size"])
    path = _save(build_cell(wrong, config, vocab), tmp_path)
    with pytest.raises(VerificationError, match=r"on CPUExecutionProvider: batch 1: .* exceeds tolerance"):
        _verify(path, reference, loaded)


def test_greedy_difference_fails_an_exact_variant(loaded, reference, tmp_path):
    """A head bias nudge that stays inside a (deliberately loose) logits bound but flips the argmax."""
    _, vocab, config, weights = loaded
    nudged = dict(weights)
    greedy = reference.greedy([1, 2, 3, 4], 500)
    favourite = np.bincount(greedy, minlength=config["vocab_size"]).argmax()
    nudged["head.bias"] = weights["head.bias"].copy()
    nudged["head.bias"][favourite] -= 10.0
    path = _save(build_cell(nudged, config, vocab), tmp_path)
    loose = Tolerance(logits_relative=100.0, hidden_absolute=100.0, exact_greedy=True, max_loss_delta=1.0)
    with pytest.raises(VerificationError, match=r"greedy generation differs from PyTorch at character \d+ of 500"):
        _verify(path, reference, loaded, loose)
    lossy = Tolerance(logits_relative=100.0, hidden_absolute=100.0, exact_greedy=False, max_loss_delta=1.0)
    assert _verify(path, reference, loaded, lossy)["greedy"]["top1_agreement"] < 1.0


def test_metadata_that_does_not_round_trip_fails(loaded, reference, tmp_path):
    _, vocab, config, weights = loaded
    model = build_cell(weights, config, vocab)
    for prop in model.metadata_props:
        if prop.key == META_VOCAB:
            prop.value = '["a", "b"]'
    with pytest.raises(VerificationError, match="charstream.vocab does not round-trip"):
        _verify(_save(model, tmp_path), reference, loaded)


def test_graph_stuck_at_one_batch_size_fails(loaded, reference, tmp_path):
    """A state input with a fixed batch dimension (the GRU export trap) breaks the contract."""
    _, vocab, config, weights = loaded
    model = build_cell(weights, config, vocab)
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "batch":
                dim.dim_value = 1
    with pytest.raises(VerificationError, match="is not the contract"):
        _verify(_save(model, tmp_path), reference, loaded)


@pytest.mark.parametrize("name", ["fp16", "int8"])
def test_lossy_variants_pass_their_own_tolerance(name, loaded, reference, tmp_path):
    path, facts = _build_and_verify(name, CPU, loaded, reference, tmp_path)
    config = loaded[2]
    # Passed its own bound while really being lossy (not secretly the fp32 graph).
    assert max(d["logits"] for d in facts["batches"].values()) > 1e-5
    # The whole 500-character trajectory was checked, and the lossy graph still
    # picks PyTorch's top character almost everywhere.
    expected = reference.greedy([1, 2, 3, 4], 500)
    generated = _plain_greedy(path, [1, 2, 3, 4], 500, config["num_layers"], config["hidden_size"])
    assert facts["greedy"]["identical_chars"] == _identical(generated, expected)
    reported = {(b, k): d[k] for b, d in facts["batches"].items() for k in ("logits", "hidden")}
    assert reported == pytest.approx(_batch_diffs(path, reference), abs=1e-7)
    assert facts["greedy"]["top1_agreement"] >= 0.95


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="no CUDA device or CUDA libraries for ONNX Runtime here")
@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_variants_verify_on_cuda(name, loaded, reference, tmp_path):
    _, facts = _build_and_verify(name, CUDA, loaded, reference, tmp_path)
    assert set(facts["batches"]) == {"1", "3", "64"}


def _build_and_verify(name, provider, loaded, reference, tmp_path):
    """Build variant `name` from the loaded checkpoint and verify it on `provider`: (path, facts)."""
    _, vocab, config, weights = loaded
    variant = VARIANTS[name]
    path = tmp_path / variant.file
    variant.build(weights, config, vocab, path)
    facts = verify_cell(path, reference, variant.tolerance, subject=Subject(name, provider),
                        vocab=vocab, config=config, prompt=[1, 2, 3, 4])
    return path, facts
