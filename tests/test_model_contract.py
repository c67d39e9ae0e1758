"""The shared, dependency-free pieces export, training and the server all import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from server.engine.model import model_contract
from server.engine.model.vocabulary import Vocabulary, unknown_chars
from training.vocab import Vocab

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("grpc", "onnxruntime", "onnx", "torch", "numpy")


def test_contract_vocabulary_and_model_dir_import_nothing_heavy():
    """training imports the vocabulary check; the contract is imported by both sides: neither may drag in a runtime."""
    code = (
        "import json, sys\n"
        "import server.engine.model.model_contract, server.engine.model.vocabulary, server.engine.model.model_dir, training.vocab\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert json.loads(result.stdout) == []


def test_the_contract_spells_what_the_documentation_promises():
    """Checked from outside with literals: renaming any of these breaks every model directory already written."""
    assert model_contract.INPUT_NAMES == ("token_ids", "hidden")
    assert model_contract.OUTPUT_NAMES == ("logits", "hidden_out")
    assert (model_contract.META_VOCAB, model_contract.META_CONFIG) == ("charstream.vocab", "charstream.config")
    assert model_contract.MANIFEST_FORMAT == "charstream-model/1"
    assert (model_contract.MODEL_FILE, model_contract.MANIFEST_FILE) == ("model.onnx", "manifest.json")
    assert model_contract.VARIANT_FILES == {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


def test_an_exported_model_directory_is_written_with_the_contract(tiny_model_dir):
    """From outside: what export actually wrote is what the server's contract reads."""
    import json

    import onnx

    manifest = json.loads((tiny_model_dir / model_contract.MANIFEST_FILE).read_text())
    assert manifest["format"] == model_contract.MANIFEST_FORMAT
    assert manifest["variants"]["fp32"]["file"] == model_contract.MODEL_FILE
    model = onnx.load(str(tiny_model_dir / model_contract.MODEL_FILE))
    assert tuple(i.name for i in model.graph.input) == model_contract.INPUT_NAMES
    assert tuple(o.name for o in model.graph.output) == model_contract.OUTPUT_NAMES
    assert {p.key for p in model.metadata_props} >= {model_contract.META_VOCAB, model_contract.META_CONFIG}


def test_unknown_chars_are_distinct_and_in_order_of_first_use():
    assert unknown_chars("zebra, zebra!", set("abe")) == ["z", "r", ",", " ", "!"]
    assert unknown_chars("", set("a")) == []
    assert unknown_chars("abc", {"a": 0, "b": 1, "c": 2}) == []


def test_training_and_server_vocabularies_give_the_same_answer():
    chars = sorted(set("hello world"))
    text = "Hello, World! hello"
    assert Vocab(chars).unknown_chars(text) == Vocabulary(chars).unknown(text) == ["H", ",", "W", "!"]
