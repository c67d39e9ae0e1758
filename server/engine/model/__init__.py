"""What a model directory is: the file, variant, tensor, metadata and manifest names shared with
export (model_contract.py), choosing the file to serve (model_dir.py), the provider policy and the
CUDA probe (providers.py), and characters to token ids (vocabulary.py). Imports nothing else of
the engine."""
