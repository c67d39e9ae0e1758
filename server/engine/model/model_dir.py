"""Find the ONNX file to serve in a model directory and read what it says about itself.

The directory's layout, names and manifest keys are the contract in
model_contract.py, shared with the export that writes it. Without a manifest
the directory serves its fp32 file. Variant "auto" picks by execution
provider (AUTO_PREFERENCE): the provider's preferred variant when the
manifest records it verified on that provider, else the manifest's default.
The vocabulary and model config come from the .onnx metadata, so the file
alone describes itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from server.engine.model.model_contract import (
    CPU,
    CUDA,
    DEFAULT_VARIANT,
    FP16,
    INPUT_NAMES,
    INT8,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    META_CONFIG,
    META_VOCAB,
    OUTPUT_NAMES,
    VARIANT_FILES,
    ManifestKey,
)

# The reader's name for "pick by provider"; never written into a manifest.
AUTO = "auto"
# What variant "auto" prefers on each execution provider, and why, when the manifest
# records it verified there (export verifies on every provider it has and records a
# provider only when the variant passed within its tolerance).
AUTO_PREFERENCE: dict[str, tuple[str, str]] = {
    CUDA: (FP16, "fp16 weights and maths, meant for GPUs"),
    CPU: (INT8, "int8 weights, faster steps on CPUs"),
}
DEFAULT_FILE = VARIANT_FILES[DEFAULT_VARIANT]


class ModelDirError(RuntimeError):
    """A model directory or file that cannot be served; the message says what to fix."""


@dataclass(frozen=True)
class ModelFile:
    """The .onnx file chosen from a model directory."""

    directory: Path
    variant: str
    path: Path
    reason: str = ""  # why this variant, for logs and GetModelInfo.variant_reason


@dataclass(frozen=True)
class ModelSpec:
    """What a charstream .onnx file says about itself (its metadata)."""

    vocab: list[str]
    vocab_size: int
    embedding_dim: int
    hidden_size: int
    num_layers: int


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get(ManifestKey.FORMAT) != MANIFEST_FORMAT:
        raise ModelDirError(
            f"{path} is not a charstream manifest (expected \"{ManifestKey.FORMAT}\": \"{MANIFEST_FORMAT}\")"
        )
    if not isinstance(manifest.get(ManifestKey.VARIANTS), dict) or not manifest[ManifestKey.VARIANTS]:
        raise ModelDirError(f"{path} lists no variants")
    return manifest


def choose_model_file(directory: Path | str, variant: str | None = None, provider: str | None = None) -> ModelFile:
    """The file to serve, with the reason it was chosen.

    variant: a name listed in the manifest; None: the manifest's default;
    "auto": AUTO_PREFERENCE[provider] when the manifest records it verified on
    `provider` (and its file is present), otherwise the manifest's default.
    A directory without a manifest serves DEFAULT_FILE as DEFAULT_VARIANT.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelDirError(f"model directory not found: {directory}")
    manifest_path = directory / MANIFEST_FILE
    manifest = _read_manifest(manifest_path) if manifest_path.is_file() else None
    if variant == AUTO:
        chosen, reason = _auto_variant(directory, manifest, provider)
    elif variant:
        chosen, reason = variant, f"variant {variant} asked for"
    elif manifest is not None:
        chosen = _manifest_default(manifest)
        reason = f"{chosen}: the manifest's default"
    else:
        chosen, reason = DEFAULT_VARIANT, f"no {MANIFEST_FILE}: {DEFAULT_FILE} ({DEFAULT_VARIANT})"
    if manifest is not None:
        variants: Mapping[str, Any] = manifest[ManifestKey.VARIANTS]
        if chosen not in variants:
            raise ModelDirError(
                f"variant {chosen!r} is not in {manifest_path}; available: {', '.join(sorted(variants))}"
            )
        file_name = _variant_file(variants[chosen])
        if file_name is None:
            raise ModelDirError(f"{manifest_path}: variant {chosen!r} names no file")
    else:
        if chosen != DEFAULT_VARIANT:
            raise ModelDirError(
                f"variant {chosen!r} asked for, but {directory} has no {MANIFEST_FILE} listing variants"
            )
        file_name = DEFAULT_FILE
    path = directory / file_name
    if not path.is_file():
        raise ModelDirError(
            f"{path} not found: {directory} is not a charstream model directory "
            "(make one with charstream-export)"
        )
    return ModelFile(directory=directory, variant=chosen, path=path, reason=reason)


def _manifest_default(manifest: Mapping[str, Any]) -> str:
    default = manifest.get(ManifestKey.DEFAULT)
    return default if isinstance(default, str) and default else DEFAULT_VARIANT


def _variant_file(entry: Any) -> str | None:
    file_name = entry.get(ManifestKey.FILE) if isinstance(entry, dict) else None
    return file_name if isinstance(file_name, str) and file_name else None


def _auto_variant(directory: Path, manifest: Mapping[str, Any] | None, provider: str | None) -> tuple[str, str]:
    """(variant, reason) for variant "auto" on `provider`."""
    if manifest is None:
        return DEFAULT_VARIANT, f"auto: no {MANIFEST_FILE}, so {DEFAULT_FILE} ({DEFAULT_VARIANT})"
    default = _manifest_default(manifest)
    fallback = f"{default} (the manifest's default)"
    if provider not in AUTO_PREFERENCE:
        return default, f"auto: no preferred variant for {provider}; {fallback}"
    name, why = AUTO_PREFERENCE[provider]
    entry = manifest[ManifestKey.VARIANTS].get(name)
    if not isinstance(entry, dict):
        return default, f"auto: no {name} verified on {provider} in the manifest (no {name} exported); {fallback}"
    verified = entry.get(ManifestKey.VERIFIED)
    if not isinstance(verified, dict) or provider not in verified:
        elsewhere = ", ".join(sorted(verified)) if isinstance(verified, dict) and verified else "no provider"
        return default, (
            f"auto: no {name} verified on {provider} in the manifest ({name} is verified on {elsewhere}; "
            f"export on a machine with {provider} to verify it there); {fallback}"
        )
    file_name = _variant_file(entry)
    if file_name is None or not (directory / file_name).is_file():
        return default, f"auto: {name} is verified on {provider} but its file {file_name} is missing; {fallback}"
    return name, f"auto: {name} verified on {provider} ({why})"


def read_spec(metadata: Mapping[str, str], input_names: list[str], output_names: list[str], where: str) -> ModelSpec:
    """Check the ONNX interface and parse the metadata into a ModelSpec."""
    if tuple(input_names) != INPUT_NAMES or tuple(output_names) != OUTPUT_NAMES:
        raise ModelDirError(
            f"{where} is not a charstream step model: inputs {input_names} / outputs {output_names}, "
            f"expected {list(INPUT_NAMES)} / {list(OUTPUT_NAMES)}"
        )
    missing = [key for key in (META_VOCAB, META_CONFIG) if key not in metadata]
    if missing:
        raise ModelDirError(f"{where} is not a charstream model: metadata {missing} missing")
    try:
        vocab = json.loads(metadata[META_VOCAB])
        config = json.loads(metadata[META_CONFIG])
        spec = ModelSpec(
            vocab=list(vocab),
            vocab_size=int(config["vocab_size"]),
            embedding_dim=int(config.get("embedding_dim", 0)),
            hidden_size=int(config["hidden_size"]),
            num_layers=int(config["num_layers"]),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ModelDirError(f"{where}: unreadable charstream metadata: {exc}") from exc
    if len(spec.vocab) != spec.vocab_size or not all(isinstance(c, str) and len(c) == 1 for c in spec.vocab):
        raise ModelDirError(f"{where}: the vocabulary must be {spec.vocab_size} distinct single characters")
    if len(set(spec.vocab)) != len(spec.vocab):
        raise ModelDirError(f"{where}: the vocabulary has duplicate characters")
    return spec
