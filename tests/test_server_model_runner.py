"""The batched step over pooled states: host and device state paths against a plain loop, the CUDA
policy and its fallbacks, and the ONNX Runtime thread settings of every session."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from server.engine.model.providers import CUDA, DeviceError, cuda_device_count
from server.engine.runner.device_runner import build_device_runner
from server.engine.runner.model_runner import load_runner
from tests.plain_loop import plain_step

HAS_CUDA = CUDA in ort.get_available_providers() and cuda_device_count()[0] > 0
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and onnxruntime-gpu")
needs_no_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour on machines without CUDA")


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
        logits = runner.step(np.array([texts[s][position] for s in slots]), np.array(slots), fresh).logits
        for row, slot in enumerate(slots):
            expected, hidden[slot] = plain_step(plain, int(texts[slot][position]), hidden[slot])
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
        on_host, on_device = host.step(tokens, slots, fresh), device.step(tokens, slots, fresh)
        np.testing.assert_array_equal(on_host.logits, on_device.logits)
        np.testing.assert_array_equal(on_host.inputs, on_device.inputs)
    every = np.arange(8)
    np.testing.assert_array_equal(host.read_states(every), device.read_states(every))


def test_start_states_replace_the_pooled_state_on_both_paths(tiny_model_dir: Path) -> None:
    """A row with a start state steps from it (how the scheduler undoes characters), and the
    step reports each row's input state; host and device paths agree."""
    host = load_runner(tiny_model_dir, device="cpu", num_slots=4)
    device = build_device_runner(host.info.model_file, host.info.spec, 4, "cpu")
    spec = host.info.spec
    for runner in (host, device):
        runner.step(np.array([1, 2]), np.array([0, 1]), np.array([True, True]))
    saved = host.step(np.array([4]), np.array([0]), np.array([False])).inputs  # [L, 1, H]: slot 0's state
    device.step(np.array([4]), np.array([0]), np.array([False]))
    start = np.zeros((spec.num_layers, 2, spec.hidden_size), np.float32)  # [L, 2, H]
    start[:, 0, :] = saved[:, 0, :]
    mask = np.array([True, False])
    restored = [r.step(np.array([4, 6]), np.array([0, 1]), mask, start) for r in (host, device)]
    again = host.step(np.array([4, 6]), np.array([2, 3]), np.array([True, True]), start)  # same state, other slot
    for out in restored:
        np.testing.assert_array_equal(out.inputs[:, 0, :], saved[:, 0, :])
        np.testing.assert_array_equal(out.logits[0], again.logits[0])
    np.testing.assert_array_equal(restored[0].logits, restored[1].logits)
    np.testing.assert_array_equal(restored[0].inputs, restored[1].inputs)


def test_stretch_rows_over_a_device_pool_equal_the_host_path_on_cpu(tiny_model_dir: Path) -> None:
    """The steady lane's call over pooled rows (stretch_rows) and writing states in (put_states):
    the device path's graphs against the host pool, bit for bit, on the CPU provider."""
    host = load_runner(tiny_model_dir, device="cpu", num_slots=8)
    device = load_runner(tiny_model_dir, device="cpu", num_slots=8, device_pool=True)
    assert device.info.states_on_device and device.stretches_rows() and host.stretches_rows()
    spec = host.info.spec
    rng = np.random.default_rng(3)
    every = np.arange(8)
    tokens = rng.integers(0, spec.vocab_size, 8)
    for runner in (host, device):
        runner.step(tokens, every, np.ones(8, bool))
    for _ in range(12):
        rows = int(rng.integers(1, 7))
        slots = np.sort(rng.choice(8, rows, replace=False))
        count = int(rng.integers(2, 6))
        forced = rng.integers(0, spec.vocab_size, (1, rows))
        uniforms = rng.random((count, rows))
        temperature = rng.choice([0.6, 1.0, 1.4], rows)
        keep = rng.integers(0, count + 1, rows)  # [R]: some rows keep every draw, some fewer, some none
        got = [runner.stretch_rows(slots, forced, uniforms, temperature, keep) for runner in (host, device)]
        for a, b in zip(*got):
            np.testing.assert_array_equal(a, b)
        after = got[0].inputs.copy()  # [K, L, R, H], then the state after the last draw
        assert after.shape == (count, spec.num_layers, rows, spec.hidden_size)
        np.testing.assert_array_equal(host.read_states(every), device.read_states(every))
        # Row r's pooled state is the one before its draw keep[r] (after every draw when it kept all).
        kept_some = (keep < count).nonzero()[0]
        np.testing.assert_array_equal(device.read_states(slots[kept_some]),
                                      after[keep[kept_some], :, kept_some, :].transpose(1, 0, 2))
        if rng.random() < 0.5:  # a row's state written in, as the lane does for a disputed draw
            states = rng.standard_normal((spec.num_layers, 2, spec.hidden_size)).astype(np.float32)
            written = np.array([slots[0], (slots[0] + 3) % 8])
            for runner in (host, device):
                runner.put_states(written, states)
            np.testing.assert_array_equal(device.read_states(written), states)
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
    np.testing.assert_array_equal(device.step(tokens, slots, fresh).logits, host.step(tokens, slots, fresh).logits)


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
    assert cuda.session.get_provider_options()[CUDA]["use_tf32"] == "0"  # fp32 maths, not TF32
    rng = np.random.default_rng(2)
    for _ in range(30):
        slots = rng.choice(8, 4, replace=False)
        tokens = rng.integers(0, cpu.info.spec.vocab_size, 4)
        fresh = rng.random(4) < 0.2
        np.testing.assert_allclose(cuda.step(tokens, slots, fresh).logits, cpu.step(tokens, slots, fresh).logits, atol=1e-4)
    np.testing.assert_allclose(cuda.read_states(np.arange(8)), cpu.read_states(np.arange(8)), atol=1e-4)


@needs_cuda
@pytest.mark.gpu
def test_cuda_greedy_text_matches_cpu(tiny_model_dir: Path) -> None:
    texts = []
    for device in ("cuda", "cpu"):
        runner = load_runner(tiny_model_dir, device=device, num_slots=2)
        token, out = 1, []
        for position in range(200):
            logits = runner.step(np.array([token]), np.array([1]), np.array([position == 0])).logits
            token = int(np.argmax(logits[0]))
            out.append(token)
        texts.append(out)
    assert texts[0] == texts[1]


def test_a_failing_device_state_pool_falls_back_to_host_states(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the pooled CUDA graph cannot be built, the plain cell still serves (states on the host)."""
    import server.engine.runner.device_runner as device_runner
    import server.engine.runner.model_runner as model_runner

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
    monkeypatch.setattr(device_runner, "build_device_runner", failing_pool)
    with caplog.at_level(logging.WARNING, logger="charstream.server"):
        runner = load_runner(tiny_model_dir, device="cuda", num_slots=2)
    assert runner.info.provider == CUDA and not runner.info.states_on_device
    assert [r.getMessage() for r in caplog.records] == ["device_state_pool_unavailable"]
    reference = load_runner(tiny_model_dir, device="cpu", num_slots=2)
    tokens, slots, fresh = np.array([1, 2]), np.array([0, 1]), np.array([True, True])
    np.testing.assert_array_equal(runner.step(tokens, slots, fresh).logits, reference.step(tokens, slots, fresh).logits)


# --- ONNX Runtime thread settings ---------------------------------------------------------------


def test_session_options_carry_the_thread_settings() -> None:
    from server.engine.model.providers import (
        ALLOW_SPINNING_KEY,
        ThreadSettings,
        session_options,
    )

    options = session_options(ThreadSettings(intra_op_threads=3, allow_spinning=True))
    assert options.intra_op_num_threads == 3
    assert options.get_session_config_entry(ALLOW_SPINNING_KEY) == "1"
    options = session_options(ThreadSettings(intra_op_threads=0, allow_spinning=False))
    assert options.intra_op_num_threads == 0  # left to ONNX Runtime
    assert options.get_session_config_entry(ALLOW_SPINNING_KEY) == "0"
    assert ThreadSettings() == ThreadSettings(intra_op_threads=1, allow_spinning=False)  # the server defaults


@pytest.mark.parametrize("allow_spinning", [True, False])
def test_sessions_are_created_with_the_thread_settings(tiny_model_dir: Path, allow_spinning: bool) -> None:
    from server.engine.model.providers import (
        ALLOW_SPINNING_KEY,
        ThreadSettings,
        create_session,
    )

    threads = ThreadSettings(intra_op_threads=2, allow_spinning=allow_spinning)
    session = create_session(tiny_model_dir / "model.onnx", "cpu", threads)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry(ALLOW_SPINNING_KEY) == ("1" if allow_spinning else "0")

    runner = load_runner(tiny_model_dir, device="cpu", num_slots=2, threads=threads)
    options = runner.session.get_session_options()
    assert options.get_session_config_entry(ALLOW_SPINNING_KEY) == ("1" if allow_spinning else "0")
    device = build_device_runner(runner.info.model_file, runner.info.spec, 2, "cpu", threads)
    assert device.session.get_session_options().get_session_config_entry(ALLOW_SPINNING_KEY) == (
        "1" if allow_spinning else "0"
    )


def test_load_runner_defaults_and_a_bare_thread_count(tiny_model_dir: Path) -> None:
    from server.engine.model.providers import ALLOW_SPINNING_KEY

    options = load_runner(tiny_model_dir, device="cpu", num_slots=2).session.get_session_options()
    assert (options.intra_op_num_threads, options.get_session_config_entry(ALLOW_SPINNING_KEY)) == (1, "0")
    # Older callers pass intra_op_threads positionally: it still means that, with the default spinning.
    options = load_runner(tiny_model_dir, "auto", "cpu", 2, 3).session.get_session_options()
    assert (options.intra_op_num_threads, options.get_session_config_entry(ALLOW_SPINNING_KEY)) == (3, "0")
