"""Benchmark the exported graph forms on ONNX Runtime: `python -m export.bench`.

Random weights at the chosen size (default: the default model, embedding 256,
hidden 1024, 1 layer, 65 characters); numbers depend on the machine, not the
weights. All graphs are timed side by side in interleaved rounds so that a
noisy machine disturbs them alike; the median round is reported.

Measured: per-step time of the hand-written cell (fp32, fp16, int8) and of
the ONNX GRU-op cell (fp32) at the requested batch sizes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from export.gru_op import build_gru_op_graph
from export.runtime import CellRunner, make_session
from export.variants import VARIANTS
from server.engine.model.model_contract import INT8
from server.engine.model.providers import CPU, CUDA, cuda_available


def random_weights(vocab_size: int, embedding_dim: int, hidden_size: int, num_layers: int, seed: int) -> dict:
    """PyTorch-named weights drawn like PyTorch's default init (uniform ±1/sqrt(H), N(0,1) embedding)."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(hidden_size)

    def uniform(*shape: int) -> np.ndarray:
        return rng.uniform(-bound, bound, size=shape).astype(np.float32)

    weights = {"embedding.weight": rng.standard_normal((vocab_size, embedding_dim)).astype(np.float32)}
    for layer in range(num_layers):
        inputs = embedding_dim if layer == 0 else hidden_size
        weights[f"gru.weight_ih_l{layer}"] = uniform(3 * hidden_size, inputs)
        weights[f"gru.weight_hh_l{layer}"] = uniform(3 * hidden_size, hidden_size)
        weights[f"gru.bias_ih_l{layer}"] = uniform(3 * hidden_size)
        weights[f"gru.bias_hh_l{layer}"] = uniform(3 * hidden_size)
    weights["head.weight"] = uniform(vocab_size, hidden_size)
    weights["head.bias"] = uniform(vocab_size)
    return weights


def _median_round(runs: dict[str, Callable[[], None]], rounds: int, repeats: int) -> dict[str, float]:
    """Seconds per call of each function: median over rounds of the mean over `repeats` calls."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up: first calls allocate
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            samples[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(values) for name, values in samples.items()}


def _stepper(runner: CellRunner, tokens: np.ndarray, hidden: np.ndarray) -> Callable[[], None]:
    """One generation step per call, feeding the state back in as a server does."""
    state = {"hidden": hidden}

    def step() -> None:
        _, state["hidden"] = runner.step(tokens, state["hidden"])

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--embedding-dim", type=int, default=256)
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=65)
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=50, help="calls per round per graph (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ONNX Runtime's)")
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    provider = CUDA if args.provider == "cuda" else CPU
    if provider == CUDA and not cuda_available():
        print("python -m export.bench: error: the CUDA provider cannot run on this machine", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",") if b]
    V, E, H, L = args.vocab_size, args.embedding_dim, args.hidden_size, args.num_layers
    config = {"vocab_size": V, "embedding_dim": E, "hidden_size": H, "num_layers": L, "dropout": 0.0}
    vocab = [chr(0x4E00 + i) for i in range(V)]  # any distinct characters will do
    weights = random_weights(V, E, H, L, seed=0)

    runners: dict[str, CellRunner] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, variant in VARIANTS.items():
            if provider == CUDA and name == INT8:
                continue  # dynamic int8 is the CPU variant
            variant.build(weights, config, vocab, Path(scratch) / variant.file)
            runners[f"cell {name}"] = CellRunner(make_session(Path(scratch) / variant.file, provider, args.threads))
        gru_op = build_gru_op_graph(weights, config, vocab)
        runners["GRU op fp32"] = CellRunner(make_session(gru_op, provider, args.threads))

    rng = np.random.default_rng(1)
    print(f"size: embedding {E}, hidden {H}, layers {L}, vocab {V}; provider {provider}; "
          f"threads {args.threads or 'default'}; median of {args.rounds} interleaved rounds x {args.repeats} calls")
    print()
    print("| graph | " + " | ".join(f"batch {b} ms/step" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    results: dict[int, dict[str, float]] = {}
    for batch in batches:
        tokens = rng.integers(0, V, size=batch)  # [B]
        hidden = rng.uniform(-1, 1, size=(L, batch, H)).astype(np.float32)  # [L, B, H]
        steps = {name: _stepper(runner, tokens, hidden) for name, runner in runners.items()}
        results[batch] = _median_round(steps, args.rounds, args.repeats)
    for name in runners:
        print(f"| {name} | " + " | ".join(f"{results[b][name] * 1e3:.3f}" for b in batches) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
