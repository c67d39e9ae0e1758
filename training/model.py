"""The character model: embedding -> GRU -> linear head.

Attribute names (`embedding`, `gru`, `head`) are part of the checkpoint
contract: export and any other reader find the weights by these names.
"""

from __future__ import annotations

import torch
from torch import nn

# ModelConfig lives in a torch-free module; it is imported from here too.
from training.model_config import ModelConfig

__all__ = ["CharGRU", "ModelConfig"]


class CharGRU(nn.Module):
    """Embedding -> GRU -> linear head: next-character logits, with the GRU state in and out."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.gru = nn.GRU(
            config.embedding_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            # nn.GRU applies dropout between layers only; it warns on 1 layer.
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        # Dropout on the GRU output too, so that --dropout also regularises a
        # 1-layer model. It has no weights and is a no-op in eval mode, so the
        # checkpoint and the exported cell do not change.
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        c = self.config
        return torch.zeros(c.num_layers, batch_size, c.hidden_size, device=device)  # [L, B, H]

    def forward(
        self, tokens: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] int64, hidden [L, B, H] or None (zeros).

        Returns logits [B, T, V] and the final state [L, B, H].
        """
        x = self.embedding(tokens)  # [B, T, E]
        out, hidden = self.gru(x, hidden)  # out [B, T, H], hidden [L, B, H]
        if self.training and self.config.dropout > 0:
            out = self.drop(out)
        return self.head(out), hidden  # [B, T, V], [L, B, H]
