"""Model directories: what is refused as not a charstream model, and which variant is served (asked
for by name, the manifest's default, or "auto" by provider), with the reason the server reports."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import pytest

from server.engine.model.model_dir import ModelDirError, choose_model_file
from server.engine.model.providers import CUDA
from server.engine.runner.model_runner import load_runner
from tests.plain_loop import plain_step


def test_missing_directory_and_missing_model_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="model directory not found"):
        choose_model_file(tmp_path / "nope")
    with pytest.raises(ModelDirError, match="not a charstream model directory"):
        choose_model_file(tmp_path)


def test_manifest_variants_are_chosen_and_checked(tiny_model_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir, directory)
    shutil.copy(directory / "model.onnx", directory / "model.alt.onnx")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["variants"]["alt"] = {"file": "model.alt.onnx"}
    manifest["default"] = "alt"
    (directory / "manifest.json").write_text(json.dumps(manifest))
    assert choose_model_file(directory).path.name == "model.alt.onnx"
    assert choose_model_file(directory, "fp32").path.name == "model.onnx"
    with pytest.raises(ModelDirError, match="variant 'int8' is not in .*available: alt, fp32"):
        choose_model_file(directory, "int8")
    (directory / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ModelDirError, match="not a charstream manifest"):
        choose_model_file(directory)


def test_directory_without_manifest_serves_model_onnx_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_model_dir / "model.onnx", tmp_path / "model.onnx")
    assert choose_model_file(tmp_path).variant == "fp32"
    with pytest.raises(ModelDirError, match="no manifest.json"):
        choose_model_file(tmp_path, "fp16")


def test_an_onnx_file_that_is_not_a_charstream_model_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(ModelDirError, match="not a charstream step model"):
        load_runner(tmp_path, device="cpu")
    cell = onnx.load(str(tiny_model_dir / "model.onnx"))
    del cell.metadata_props[:]
    onnx.save(cell, str(tmp_path / "model.onnx"))
    with pytest.raises(ModelDirError, match=r"metadata \['charstream.vocab', 'charstream.config'\] missing"):
        load_runner(tmp_path, device="cpu")


# --- variant "auto" -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_model_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported as fp32 + int8 (int8 verified on the CPU by the export itself)."""
    from export.pipeline import export_checkpoint

    directory = tmp_path_factory.mktemp("tiny_int8") / "model"
    export_checkpoint(tiny_checkpoint, directory, variants=("fp32", "int8"))
    return directory


def _edited_copy(source: Path, destination: Path, edit: Callable[[dict], None]) -> Path:
    shutil.copytree(source, destination)
    manifest = json.loads((destination / "manifest.json").read_text())
    edit(manifest)
    (destination / "manifest.json").write_text(json.dumps(manifest))
    return destination


def _with_fake_fp16_verified_on_cuda(manifest: dict) -> None:
    """An fp16 entry recorded as verified on CUDA only (its file: a copy of model.onnx, made by the caller)."""
    manifest["variants"]["fp16"] = {"file": "model.fp16.onnx", "verified": {CUDA: {}}}


def test_variant_auto_picks_int8_on_cpu_when_the_manifest_verified_it(
    int8_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = json.loads((int8_model_dir / "manifest.json").read_text())
    assert "CPUExecutionProvider" in manifest["variants"]["int8"]["verified"]
    with caplog.at_level(logging.INFO, logger="charstream.server"):
        runner = load_runner(int8_model_dir, device="cpu", num_slots=2)  # variant "auto" is the default
    model_file = runner.info.model_file
    assert (model_file.variant, model_file.path.name) == ("int8", "model.int8.onnx")
    assert model_file.reason == "auto: int8 verified on CPUExecutionProvider (int8 weights, faster steps on CPUs)"
    loaded = [r for r in caplog.records if r.getMessage() == "model_loaded"]
    assert len(loaded) == 1
    assert loaded[0].event_fields["variant"] == "int8"
    assert loaded[0].event_fields["variant_reason"] == model_file.reason
    logits = runner.step(np.array([1]), np.array([0]), np.array([True])).logits
    plain = ort.InferenceSession(str(int8_model_dir / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    spec = runner.info.spec
    expected, _ = plain_step(plain, 1, np.zeros((spec.num_layers, 1, spec.hidden_size), np.float32))
    np.testing.assert_allclose(logits[0], expected, rtol=0, atol=1e-6)  # the int8 file's own step


def test_an_int8_file_whose_rows_share_a_scale_is_served_with_a_warning(
    int8_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An int8 file from before the fixed-scale states (plain quantize_dynamic: one activation scale
    per call for the whole batch) still serves, and the log says to export it again; today's does not."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    directory = tmp_path / "old_int8"
    shutil.copytree(int8_model_dir, directory)
    logging.disable(logging.WARNING)  # quantize_dynamic's generic advice on the root logger
    try:
        quantize_dynamic(directory / "model.onnx", directory / "model.int8.onnx", op_types_to_quantize=["MatMul"],
                         per_channel=True, weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    warnings = []
    for model_dir in (int8_model_dir, directory):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="charstream.server"):
            runner = load_runner(model_dir, "int8", device="cpu", num_slots=2)
        assert runner.step(np.array([1]), np.array([0]), np.array([True])).logits.shape == (1, runner.info.spec.vocab_size)
        warnings.append([r for r in caplog.records if r.getMessage() == "rows_depend_on_batch"])
    assert warnings[0] == [] and len(warnings[1]) == 1
    assert warnings[1][0].levelno == logging.WARNING and "export the model again" in warnings[1][0].event_fields["advice"]


def test_explicit_variants_still_win_over_auto(int8_model_dir: Path) -> None:
    runner = load_runner(int8_model_dir, "fp32", device="cpu", num_slots=2)
    assert runner.info.model_file.variant == "fp32"
    assert runner.info.model_file.reason == "variant fp32 asked for"
    assert load_runner(int8_model_dir, "int8", device="cpu", num_slots=2).info.model_file.variant == "int8"
    default = load_runner(int8_model_dir, None, device="cpu", num_slots=2).info.model_file
    assert (default.variant, default.reason) == ("fp32", "fp32: the manifest's default")
    with pytest.raises(ModelDirError, match="variant 'fp64' is not in .*available: fp32, int8"):
        load_runner(int8_model_dir, "fp64", device="cpu")


def test_variant_auto_falls_back_when_int8_is_not_verified_on_the_provider(
    int8_model_dir: Path, tmp_path: Path
) -> None:
    def unverified(manifest: dict) -> None:
        manifest["variants"]["int8"]["verified"] = {CUDA: {}}  # verified elsewhere only

    directory = _edited_copy(int8_model_dir, tmp_path / "unverified", unverified)
    model_file = load_runner(directory, device="cpu", num_slots=2).info.model_file
    assert (model_file.variant, model_file.path.name) == ("fp32", "model.onnx")
    assert model_file.reason.startswith("auto: no int8 verified on CPUExecutionProvider in the manifest")
    assert f"int8 is verified on {CUDA}" in model_file.reason
    assert model_file.reason.endswith("; fp32 (the manifest's default)")

    def never_verified(manifest: dict) -> None:
        manifest["variants"]["int8"]["verified"] = {}

    directory = _edited_copy(int8_model_dir, tmp_path / "never", never_verified)
    model_file = choose_model_file(directory, "auto", "CPUExecutionProvider")
    assert model_file.variant == "fp32" and "int8 is verified on no provider" in model_file.reason


def test_variant_auto_falls_back_when_int8_is_missing(
    int8_model_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    model_file = load_runner(tiny_model_dir, device="cpu", num_slots=2).info.model_file  # fp32 only
    assert model_file.variant == "fp32"
    assert model_file.reason == (
        "auto: no int8 verified on CPUExecutionProvider in the manifest (no int8 exported); "
        "fp32 (the manifest's default)"
    )
    directory = tmp_path / "no_file"
    shutil.copytree(int8_model_dir, directory)
    (directory / "model.int8.onnx").unlink()  # listed and verified, but deleted since
    model_file = choose_model_file(directory, "auto", "CPUExecutionProvider")
    assert model_file.variant == "fp32" and "its file model.int8.onnx is missing" in model_file.reason
    with pytest.raises(ModelDirError, match="model.int8.onnx not found"):
        choose_model_file(directory, "int8")  # asked for by name, a missing file stays an error


def test_variant_auto_without_a_manifest_serves_model_onnx(tiny_model_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_model_dir / "model.onnx", tmp_path / "model.onnx")
    model_file = load_runner(tmp_path, device="cpu", num_slots=2).info.model_file
    assert (model_file.variant, model_file.path.name) == ("fp32", "model.onnx")
    assert model_file.reason == "auto: no manifest.json, so model.onnx (fp32)"


def test_variant_auto_picks_by_provider(int8_model_dir: Path, tmp_path: Path) -> None:
    assert choose_model_file(int8_model_dir, "auto", CUDA).variant == "fp32"  # no fp16 exported
    directory = _edited_copy(int8_model_dir, tmp_path / "fp16", _with_fake_fp16_verified_on_cuda)
    shutil.copy(directory / "model.onnx", directory / "model.fp16.onnx")
    on_cuda = choose_model_file(directory, "auto", CUDA)
    assert (on_cuda.variant, on_cuda.path.name) == ("fp16", "model.fp16.onnx")
    assert on_cuda.reason == f"auto: fp16 verified on {CUDA} (fp16 weights and maths, meant for GPUs)"
    assert choose_model_file(directory, "auto", "CPUExecutionProvider").variant == "int8"
    other = choose_model_file(directory, "auto", "SomeOtherExecutionProvider")
    assert other.variant == "fp32" and "no preferred variant for SomeOtherExecutionProvider" in other.reason


def test_variant_auto_chooses_again_when_the_session_lands_on_another_provider(
    int8_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA looked available, so fp16 was chosen, but the session came up on the CPU: int8 is served instead."""
    import server.engine.runner.model_runner as model_runner

    directory = _edited_copy(int8_model_dir, tmp_path / "fp16", _with_fake_fp16_verified_on_cuda)
    shutil.copy(directory / "model.onnx", directory / "model.fp16.onnx")
    real_create = model_runner.create_session
    created: list[tuple[str, str]] = []

    def falls_back_to_cpu(model: Path, device: str, *rest: object) -> ort.InferenceSession:
        created.append((Path(model).name, device))
        return real_create(model, "cpu", *rest)

    monkeypatch.setattr(model_runner, "expected_provider", lambda device: CUDA)
    monkeypatch.setattr(model_runner, "create_session", falls_back_to_cpu)
    runner = load_runner(directory, device="auto", num_slots=2)
    assert created == [("model.fp16.onnx", "auto"), ("model.int8.onnx", "cpu")]
    model_file = runner.info.model_file
    assert runner.info.provider == "CPUExecutionProvider"
    assert (model_file.variant, model_file.path.name) == ("int8", "model.int8.onnx")
    assert model_file.reason == (
        "auto: int8 verified on CPUExecutionProvider (int8 weights, faster steps on CPUs); "
        f"chosen again: the session runs on CPUExecutionProvider, not the {CUDA} assumed"
    )


def test_model_info_reports_the_variant_reason_and_lookahead(int8_model_dir: Path) -> None:
    from server.app import model_info_message
    from server.config import ServerConfig

    runner = load_runner(int8_model_dir, device="cpu", num_slots=2)
    message = model_info_message(runner.info, ServerConfig(model=str(int8_model_dir), lookahead=7))
    assert message.variant == "int8"
    assert message.variant_reason == runner.info.model_file.reason
    assert message.variant_reason.startswith("auto: int8 verified on CPUExecutionProvider")
    assert message.lookahead_chars == 7


def test_an_int8_row_steps_alone_as_in_a_batch(int8_model_dir: Path) -> None:
    """int8 quantizes its states with a fixed scale (export/state_quantization.py), so a batch's
    rows do not depend on one another: seeded text cannot depend on the sessions sharing a step."""
    import onnx

    model = onnx.load(str(int8_model_dir / "model.int8.onnx"))
    ops = {node.op_type for node in model.graph.node}
    assert "DynamicQuantizeLinear" not in ops and {"QuantizeLinear", "MatMulInteger"} <= ops
    runner = load_runner(int8_model_dir, "int8", device="cpu", num_slots=8)
    spec = runner.info.spec
    rng = np.random.default_rng(3)
    states = rng.uniform(-1, 1, (spec.num_layers, 8, spec.hidden_size)).astype(np.float32)  # [L, 8, H]
    tokens = rng.integers(0, spec.vocab_size, 8)
    together = runner.step(tokens, np.arange(8), np.ones(8, bool), states)
    together_states = runner.read_states(np.arange(8))
    for row in range(8):
        alone = runner.step(tokens[row:row + 1], np.array([row]), np.ones(1, bool), states[:, row:row + 1])
        assert np.array_equal(alone.logits[0], together.logits[row])
        assert np.array_equal(runner.read_states(np.array([row]))[:, 0], together_states[:, row])
