"""Model directory loading, provider policy, and the batched step over pooled states."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from server.model_dir import ModelDirError, choose_model_file
from server.model_runner import build_device_runner, load_runner
from server.providers import CUDA, DeviceError, cuda_device_count

HAS_CUDA = CUDA in ort.get_available_providers() and cuda_device_count()[0] > 0
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and onnxruntime-gpu")
needs_no_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour on machines without CUDA")


def _plain_step(session: ort.InferenceSession, token: int, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits, hidden_out = session.run(None, {"token_ids": np.array([token], dtype=np.int64), "hidden": hidden})
    return logits[0], hidden_out  # [V], [L, 1, H]


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


def test_host_runner_matches_a_plain_loop_for_interleaved_sessions(tiny_model_dir: Path) -> None:
    runner = load_runner(tiny_model_dir, device="cpu", num_slots=4)
    spec = runner.info.spec
    assert runner.info.provider == "CPUExecutionProvider" and not runner.info.states_on_device
    plain = ort.InferenceSession(str(tiny_model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    texts = {slot: rng.integers(0, spec.vocab_size, 12) for slot in (3, 0, 2)}
    hidden = {slot: np.zeros((spec.num_layers, 1, spec.hidden_size), np.float32) for slot in texts}
    started: set[int] = set()
    for position in range(12):
        # Batches of changing membership and order: every session still sees only its own text.
        slots = [s for s in texts if (position + s) % 3 != 0]
        fresh = np.array([s not in started for s in slots])
        started.update(slots)
        logits = runner.step(np.array([texts[s][position] for s in slots]), np.array(slots), fresh)
        for row, slot in enumerate(slots):
            expected, hidden[slot] = _plain_step(plain, int(texts[slot][position]), hidden[slot])
            np.testing.assert_allclose(logits[row], expected, rtol=0, atol=1e-6)
            np.testing.assert_allclose(runner.read_states(np.array([slot]))[:, 0], hidden[slot][:, 0], atol=1e-6)


def test_device_state_path_equals_host_path_on_cpu(tiny_model_dir: Path) -> None:
    """The IOBinding + pooled-graph path that CUDA uses, run on the CPU provider."""
    host = load_runner(tiny_model_dir, device="cpu", num_slots=8)
    device = build_device_runner(host.info.model_file, host.info.spec, 8, "cpu")
    assert device.info.states_on_device
    rng = np.random.default_rng(1)
    for _ in range(30):
        batch = int(rng.integers(1, 6))
        slots = rng.choice(8, batch, replace=False)
        tokens = rng.integers(0, host.info.spec.vocab_size, batch)
        fresh = rng.random(batch) < 0.2
        np.testing.assert_array_equal(host.step(tokens, slots, fresh), device.step(tokens, slots, fresh))
    every = np.arange(8)
    np.testing.assert_array_equal(host.read_states(every), device.read_states(every))


def test_device_state_pool_buffers_never_share_memory(tiny_model_dir: Path) -> None:
    """The step reads one buffer and writes the other: on the CPU stand-in too, they must be distinct."""
    host = load_runner(tiny_model_dir, device="cpu", num_slots=4)
    device = build_device_runner(host.info.model_file, host.info.spec, 4, "cpu")
    assert device.pool.current.data_ptr() != device.pool.spare.data_ptr()
    device.step(np.array([3]), np.array([1]), np.array([True]))
    assert device.pool.current.data_ptr() != device.pool.spare.data_ptr()
    np.testing.assert_array_equal(device.pool.spare.numpy(), 0.0)  # the step wrote only the other buffer


def test_device_state_path_starts_fresh_slots_from_zeros_whatever_the_slot_held(tiny_model_dir: Path) -> None:
    host = load_runner(tiny_model_dir, device="cpu", num_slots=4)
    device = build_device_runner(host.info.model_file, host.info.spec, 4, "cpu")
    spec = host.info.spec
    poisoned = np.full((4, spec.num_layers, spec.hidden_size), np.nan, dtype=np.float32)  # [S, L, H]
    device.pool.current = ort.OrtValue.ortvalue_from_numpy(poisoned)
    tokens, slots, fresh = np.array([3, 5]), np.array([2, 0]), np.array([True, True])
    np.testing.assert_array_equal(device.step(tokens, slots, fresh), host.step(tokens, slots, fresh))


@needs_no_cuda
def test_device_cuda_fails_fast_without_cuda(tiny_model_dir: Path) -> None:
    with pytest.raises(DeviceError, match="--device cuda: .*Use --device auto or --device cpu"):
        load_runner(tiny_model_dir, device="cuda")


@needs_no_cuda
def test_device_auto_falls_back_to_cpu_with_one_log_line(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="charstream.server"):
        runner = load_runner(tiny_model_dir, device="auto")
    assert runner.info.provider == "CPUExecutionProvider"
    assert [r.getMessage() for r in caplog.records].count("cuda_unavailable") == 1


@needs_cuda
@pytest.mark.gpu
def test_cuda_keeps_states_on_device_and_matches_cpu(tiny_model_dir: Path) -> None:
    cuda = load_runner(tiny_model_dir, device="cuda", num_slots=8)
    cpu = load_runner(tiny_model_dir, device="cpu", num_slots=8)
    assert cuda.info.provider == CUDA and cuda.info.states_on_device
    rng = np.random.default_rng(2)
    for _ in range(30):
        slots = rng.choice(8, 4, replace=False)
        tokens = rng.integers(0, cpu.info.spec.vocab_size, 4)
        fresh = rng.random(4) < 0.2
        np.testing.assert_allclose(cuda.step(tokens, slots, fresh), cpu.step(tokens, slots, fresh), atol=1e-4)
    np.testing.assert_allclose(cuda.read_states(np.arange(8)), cpu.read_states(np.arange(8)), atol=1e-4)


@needs_cuda
@pytest.mark.gpu
def test_cuda_greedy_text_matches_cpu(tiny_model_dir: Path) -> None:
    texts = []
    for device in ("cuda", "cpu"):
        runner = load_runner(tiny_model_dir, device=device, num_slots=2)
        token, out = 1, []
        for position in range(200):
            logits = runner.step(np.array([token]), np.array([1]), np.array([position == 0]))
            token = int(np.argmax(logits[0]))
            out.append(token)
        texts.append(out)
    assert texts[0] == texts[1]


def test_a_failing_device_state_pool_falls_back_to_host_states(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the pooled CUDA graph cannot be built, the plain cell still serves (states on the host)."""
    import server.model_runner as model_runner

    real_create = model_runner.create_session

    class ReportsCuda:  # a real CPU session that reports the CUDA provider, as on a GPU machine
        def __init__(self, session: ort.InferenceSession):
            self._session = session

        def get_providers(self) -> list[str]:
            return [CUDA, "CPUExecutionProvider"]

        def __getattr__(self, name: str) -> object:
            return getattr(self._session, name)

    def failing_pool(*args: object, **kwargs: object) -> None:
        raise RuntimeError("pooled graph rejected by the provider\nsecond line")

    monkeypatch.setattr(model_runner, "create_session", lambda *a: ReportsCuda(real_create(a[0], "cpu", *a[2:])))
    monkeypatch.setattr(model_runner, "build_device_runner", failing_pool)
    with caplog.at_level(logging.WARNING, logger="charstream.server"):
        runner = load_runner(tiny_model_dir, device="cuda", num_slots=2)
    assert runner.info.provider == CUDA and not runner.info.states_on_device
    assert [r.getMessage() for r in caplog.records] == ["device_state_pool_unavailable"]
    reference = load_runner(tiny_model_dir, device="cpu", num_slots=2)
    tokens, slots, fresh = np.array([1, 2]), np.array([0, 1]), np.array([True, True])
    np.testing.assert_array_equal(runner.step(tokens, slots, fresh), reference.step(tokens, slots, fresh))
