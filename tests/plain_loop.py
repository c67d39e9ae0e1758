"""An independent reference for generated text: a plain ONNX Runtime loop over model.onnx.

Batch 1, no server, no engine, no scheduler: the vocabulary and sizes come from the
file's own metadata (what the server reads too), and each character is picked by
choose_token, the one-row reference sampler, with the session's counter-based
RandomStream (one draw per sampled character, none when greedy). The server samples
with sample_tokens, which tests/test_server_sampling.py holds to choose_token row by row.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.engine.sampling import RandomStream, SamplingSettings, choose_token

GREEDY = SamplingSettings(temperature=0.0)


def wire(value: float) -> float:
    """`value` as a protobuf float field carries it (float32), which is what the server samples with."""
    return float(np.float32(value))


def plain_step(session: ort.InferenceSession, token: int, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One step of `session` at batch 1: the logits [V] and the next hidden state [L, 1, H]."""
    logits, hidden_out = session.run(None, {"token_ids": np.array([token], dtype=np.int64), "hidden": hidden})
    return logits[0], hidden_out


def onnx_loop(model_dir: Path | str, prompt: str, n: int, settings: SamplingSettings, seed: int = 0) -> str:
    """The `n` characters after `prompt`, as a session with `settings` and `seed` generates them."""
    session = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    vocab = json.loads(meta["charstream.vocab"])
    config = json.loads(meta["charstream.config"])
    hidden = np.zeros((config["num_layers"], 1, config["hidden_size"]), np.float32)  # [L, 1, H]
    stream = RandomStream(seed)
    logits = None
    for ch in prompt:
        logits, hidden = session.run(None, {"token_ids": np.array([vocab.index(ch)]), "hidden": hidden})
    out = []
    for _ in range(n):
        token = choose_token(logits[0], settings, 0.0 if settings.greedy else stream.next())
        out.append(vocab[token])
        logits, hidden = session.run(None, {"token_ids": np.array([token]), "hidden": hidden})
    return "".join(out)
