"""PyTorch side of verification: the checkpoint's own CharGRU, driven with numpy arrays."""

from __future__ import annotations

import numpy as np
import torch

from training.model import CharGRU


class TorchReference:
    """The trained module in float32 on the CPU, the ground truth every graph must match."""

    def __init__(self, model: CharGRU):
        self.model = model.float().cpu().eval()
        config = model.config
        self.num_layers, self.hidden_size = config.num_layers, config.hidden_size
        self.vocab_size = config.vocab_size

    def zero_state(self, batch: int) -> np.ndarray:
        return np.zeros((self.num_layers, batch, self.hidden_size), dtype=np.float32)  # [L, B, H]

    @torch.no_grad()
    def step(self, tokens: np.ndarray, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens [B], hidden [L, B, H] -> logits [B, V], hidden [L, B, H]."""
        logits, new_hidden = self.model(
            torch.from_numpy(np.asarray(tokens, dtype=np.int64))[:, None],  # [B, 1]
            torch.from_numpy(np.asarray(hidden, dtype=np.float32)),
        )
        return logits[:, 0].numpy(), new_hidden.numpy()

    @torch.no_grad()
    def sequence_logits(self, tokens: list[int]) -> np.ndarray:
        """Logits after each token of one stream from the zero state: [T, V]."""
        logits, _ = self.model(torch.tensor([tokens], dtype=torch.int64))  # [1, T, V]
        return logits[0].numpy()

    @torch.no_grad()
    def greedy(self, prompt: list[int], length: int) -> list[int]:
        """The `length` tokens that always picking the top logit generates after `prompt`."""
        # PyTorch reads the whole prompt in one call: the reference side need not mimic the graph's stepping.
        sequence, hidden = self.model(torch.tensor([prompt], dtype=torch.int64))  # [1, T, V], [L, 1, H]
        logits, hidden = sequence[:, -1].numpy(), hidden.numpy()  # [1, V], [L, 1, H]
        generated: list[int] = []
        for _ in range(length):
            token = int(np.argmax(logits[0]))
            generated.append(token)
            logits, hidden = self.step(np.asarray([token]), hidden)
        return generated

    @torch.no_grad()
    def stream_losses(self, streams: np.ndarray) -> float:
        """Mean next-character cross-entropy (nats) over parallel streams [S, T] from zero state."""
        tokens = torch.from_numpy(np.asarray(streams, dtype=np.int64))
        logits, _ = self.model(tokens[:, :-1])  # [S, T-1, V]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        )
        return float(loss)
