"""The model-directory contract: what charstream-export writes and the server reads.

Both sides import these names, so a change here changes writer and reader
together. Dependency-free on purpose: export (with torch) and the server
(without) both import it.

    MODEL_DIR/model.onnx         fp32 single-step cell, always present
    MODEL_DIR/model.fp16.onnx    optional variants (VARIANT_FILES)
    MODEL_DIR/model.int8.onnx
    MODEL_DIR/manifest.json      {"format": MANIFEST_FORMAT, "default": "fp32",
                                  "variants": {"fp32": {"file": "model.onnx", "verified": {...}}, ...}, ...}

Every .onnx file steps INPUT_NAMES -> OUTPUT_NAMES and describes itself in
its metadata_props: META_VOCAB (JSON list of characters, index = token id)
and META_CONFIG (JSON object with MODEL_CONFIG_KEYS).
"""

from __future__ import annotations

# Files.
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "charstream-model/1"

# Variants and the file each is written to. fp32 is the reference every
# other variant is checked against, and what a directory without a manifest serves.
FP32 = "fp32"
FP16 = "fp16"
INT8 = "int8"
VARIANT_FILES: dict[str, str] = {FP32: MODEL_FILE, FP16: "model.fp16.onnx", INT8: "model.int8.onnx"}
DEFAULT_VARIANT = FP32

# The single-step interface: token_ids int64 [batch], hidden float32 [L, batch, H]
# -> logits float32 [batch, V], hidden_out float32 [L, batch, H].
INPUT_TOKENS = "token_ids"
INPUT_HIDDEN = "hidden"
OUTPUT_LOGITS = "logits"
OUTPUT_HIDDEN = "hidden_out"
INPUT_NAMES = (INPUT_TOKENS, INPUT_HIDDEN)
OUTPUT_NAMES = (OUTPUT_LOGITS, OUTPUT_HIDDEN)

# Execution providers as ONNX Runtime names them: the keys of a variant's
# `verified` facts in the manifest, and what the server's sessions run on.
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

# metadata_props keys, and the model-config fields META_CONFIG carries.
META_VOCAB = "charstream.vocab"
META_CONFIG = "charstream.config"
MODEL_CONFIG_KEYS = ("vocab_size", "embedding_dim", "hidden_size", "num_layers", "dropout")


class ManifestKey:
    """Keys of manifest.json: top level, then each entry of `variants`."""

    FORMAT = "format"
    DEFAULT = "default"
    VARIANTS = "variants"
    CONFIG = "config"
    TRAINING = "training"
    VERIFICATION = "verification"
    EVALUATION = "evaluation"
    # Per variant. `verified` maps each execution provider the variant passed
    # verification on to the measured facts; the server's variant "auto" reads it.
    FILE = "file"
    TARGET = "target"
    BYTES = "bytes"
    SHA256 = "sha256"
    TOLERANCE = "tolerance"
    VERIFIED = "verified"
    VAL_LOSS = "val_loss"
