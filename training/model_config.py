"""The model's hyperparameters, declared once for the model and for a run's settings.

Torch-free, so that training.settings (and with it `--help`) stays fast.

`ModelShape` holds the size fields and their defaults. `ModelConfig` (what a
checkpoint's config.json holds) and `training.settings.Settings` (what defines
a run) both take them from it by inheritance, each with one required field in
front: a dataclass lists inherited fields from the last base to the first, so
`class ModelConfig(ModelShape, _VocabSize)` has the fields
(vocab_size, embedding_dim, hidden_size, num_layers, dropout), the order the
constructor, asdict() and config.json have always used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class ModelShape:
    """Size of the GRU model apart from the vocabulary; validated on construction."""

    embedding_dim: int = 256
    hidden_size: int = 1024
    num_layers: int = 1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "hidden_size", "num_layers"):
            _check_positive(name, getattr(self, name))
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


@dataclass(frozen=True)
class _VocabSize:
    vocab_size: int


@dataclass(frozen=True)
class ModelConfig(ModelShape, _VocabSize):
    """The model's full config: vocabulary size + shape (config.json's top-level keys)."""

    def __post_init__(self) -> None:
        _check_positive("vocab_size", self.vocab_size)
        super().__post_init__()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Build from a dict that may carry extra keys (training facts)."""
        names = {f.name for f in fields(cls)}
        missing = {"vocab_size"} - data.keys()
        if missing:
            raise ValueError(f"model config is missing {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def for_vocab(cls, shape: ModelShape, vocab_size: int) -> "ModelConfig":
        """The config of a model of `shape` over `vocab_size` characters."""
        # Only ModelShape's fields: `shape` may be a Settings, which has more.
        return cls(vocab_size, **{f.name: getattr(shape, f.name) for f in fields(ModelShape)})


def _check_positive(name: str, value: object) -> None:
    # bool is an int subclass; True is not a size.
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
