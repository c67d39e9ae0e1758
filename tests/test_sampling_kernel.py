"""The sampler's compiled kernel (server/engine/sampling_kernel.c): it is built where a compiler
is, its float32 exp is within the screen's bound at every float32 it is used on, its random
numbers are sampling.uniforms_at's bits, and bad arguments are refused, not read past.
(The screen itself is held to the float64 sampler in test_sampling_screen.py, on both
implementations.)"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from server.engine import sampling, sampling_screen

kernel = pytest.importorskip("server.engine._sampling_kernel", reason="the compiled kernel is not built") \
    if sampling_screen.COMPILED else None


def _compiler() -> str | None:
    name = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(name) or shutil.which("cc") or shutil.which("gcc")


def test_the_kernel_is_built_where_a_compiler_is() -> None:
    if _compiler() is None or not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        pytest.skip("no C compiler or no Python headers here: the server screens with NumPy (the same tokens)")
    assert sampling_screen.COMPILED, (
        "a C compiler and Python's headers are here but server/engine/_sampling_kernel was not built: "
        "reinstall with `pip install -e .` (or `python setup.py build_ext --inplace`) and read the build's output")


needs_kernel = pytest.mark.skipif(not sampling_screen.COMPILED, reason="the compiled kernel is not built")


def _bits(value: float) -> int:
    return int(np.array([value], np.float32).view(np.uint32)[0])


@needs_kernel
@pytest.mark.slow
def test_exp2_is_within_the_bound_at_every_float32_it_is_used_on() -> None:
    """Every float32 in [-125, 0] (1.1e9 of them): relative error within 2^-22 of float64 exp2 (the
    screen's bound needs 2^-21). exp2_32 runs the same build (clone) as the screen; the vector and
    scalar builds compute the same bits anyway (no contraction, checked at compile time)."""
    worst = 0.0
    first, last = _bits(-0.0), _bits(-125.0)  # negative floats: the bits grow as the value falls
    chunk = 1 << 24
    out = np.empty(chunk, np.float32)
    for start in range(first, last + 1, chunk):
        x = np.arange(start, min(start + chunk, last + 1), dtype=np.uint32).view(np.float32)
        got = out[: x.size]
        kernel.exp2_32(x, got)
        exact = np.exp2(x.astype(np.float64))
        worst = max(worst, float(np.max(np.abs(got - exact) / exact)))
    assert worst <= 2.0**-22, worst


@needs_kernel
def test_exp2_outside_its_range() -> None:
    """Below -125 (and NaN, in rows never proven) every weight is 2^-125: within 2^-124 of the real one."""
    x = np.array([-125.00001, -150.0, -np.inf, np.nan, -125.0, 0.0, -0.0], np.float32)
    out = np.empty_like(x)
    kernel.exp2_32(x, out)
    assert out.tolist() == [2.0**-125] * 5 + [1.0, 1.0]
    real = np.exp2(x[:3].astype(np.float64))  # the weights 2^-125 stands for
    assert np.all(np.abs(out[:3].astype(np.float64) - real) < 2.0**-124)


@needs_kernel
def test_exp64_is_numpys_within_a_few_ulp() -> None:
    """The float64 check assumes libm's exp and NumPy's are each within 2^-40 of e^d; they agree to
    1 ULP (2^-52) over the range a weight comes from, 10^7 values, and exactly at 0."""
    rng = np.random.default_rng(17)
    x = np.concatenate([rng.uniform(-745.0, 0.0, 6_000_000), -rng.exponential(1.0, 3_000_000),
                        rng.uniform(-1e-3, 0.0, 1_000_000), [0.0, -0.0, -np.inf, -745.2, -708.5]])
    out = np.empty_like(x)
    kernel.exp64(x, out)
    expected = np.exp(x)
    assert out[-5:-3].tolist() == [1.0, 1.0] and out[-3] == 0.0  # the maximum's weight is exactly 1
    ulps = np.abs(out.view(np.int64) - expected.view(np.int64))
    assert int(ulps.max()) <= 4, int(ulps.max())


@needs_kernel
def test_uniforms_are_the_numpy_bits() -> None:
    rng = np.random.default_rng(5)
    keys = rng.integers(0, 2**64, size=4099, dtype=np.uint64)
    keys[:3] = [0, 2**64 - 1, 2**63]
    positions = rng.integers(0, 2**63, size=4099, dtype=np.int64)
    positions[:3] = [0, 2**63 - 1, 12]
    out = np.empty(keys.size)
    kernel.uniforms(keys, positions, out)
    sampling_screen.COMPILED = False
    try:
        expected = sampling.uniforms_at(keys, positions)
        expected_unsigned = sampling.uniforms_at(keys, positions.astype(np.uint64))
    finally:
        sampling_screen.COMPILED = True
    assert np.array_equal(out, expected) and np.array_equal(out, expected_unsigned)
    assert np.array_equal(sampling.uniforms_at(keys, positions), expected)  # the server's call, compiled
    small = positions % 2**31
    assert np.array_equal(sampling.uniforms_at(keys, small.astype(np.int32)),
                          sampling.uniforms_at(keys, small))  # other integer dtypes convert
    assert np.array_equal(sampling.uniforms_at(keys[:5], 7), sampling.uniforms_at(keys[:5], np.full(5, 7)))  # broadcast


@needs_kernel
def test_bad_arguments_are_refused() -> None:
    logits = np.zeros((4, 65), np.float32)
    temperature, uniforms = np.ones(4), np.full(4, 0.5)
    tokens, proven = np.empty(4, np.int64), np.empty(4, bool)
    kernel.screen(logits, 65, temperature, uniforms, tokens, proven)  # the right call works
    with pytest.raises(TypeError, match="logits"):
        kernel.screen(logits.astype(np.float64), 65, temperature, uniforms, tokens, proven)
    with pytest.raises(TypeError, match="tokens"):
        kernel.screen(logits, 65, temperature, uniforms, tokens.astype(np.int32), proven)
    with pytest.raises(ValueError, match="logits must hold"):
        kernel.screen(logits, 64, temperature, uniforms, tokens, proven)
    with pytest.raises(ValueError, match="logits must hold"):
        kernel.screen(logits, 65, temperature[:3], uniforms, tokens, proven)
    with pytest.raises(ValueError, match="vocab must be"):
        kernel.screen(np.zeros((4, 513), np.float32), 513, temperature, uniforms, tokens, proven)
    with pytest.raises(ValueError, match="contiguous"):
        kernel.screen(logits[:, ::2], 33, temperature, uniforms, tokens, proven)  # not contiguous
    with pytest.raises(TypeError, match="out"):
        kernel.uniforms(np.zeros(2, np.uint64), np.zeros(2, np.int64), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="same length"):
        kernel.uniforms(np.zeros(2, np.uint64), np.zeros(3, np.int64), np.zeros(2))
    for exp, dtype, other in ((kernel.exp2_32, np.float32, np.float64), (kernel.exp64, np.float64, np.float32)):
        with pytest.raises(TypeError, match="out"):
            exp(np.zeros(2, dtype), np.zeros(2, other))
        with pytest.raises(ValueError, match="same length"):
            exp(np.zeros(2, dtype), np.zeros(3, dtype))
    assert kernel.MAX_VOCAB == sampling_screen.MAX_DEPTH  # the bound's h covers the sequential sum


@needs_kernel
def test_screen_uncut_takes_numpy_past_the_kernels_vocabulary() -> None:
    rng = np.random.default_rng(9)
    logits = rng.standard_normal((200, 600)).astype(np.float32)
    temperature, uniforms = np.full(200, 0.9), rng.random(200)
    tokens, proven = sampling_screen.screen_uncut(logits, temperature, uniforms)
    expected = sampling._sample_uncut_float64(logits, temperature, uniforms)
    assert proven.mean() > 0.5 and np.array_equal(tokens[proven], expected[proven])
