"""`charstream-sample`: the PyTorch reference sampler.

It is the ground truth that the exported ONNX cell and the server are
compared against, so it works exactly as they do: one character per step,
the state carried from step to step (the prompt too is fed one character at a
time), and

- temperature 0: greedy, `argmax` of the logits (ties go to the lowest id);
- otherwise: logits / temperature, keep the `top_k` largest (0 or None = all),
  softmax, one draw with `torch.multinomial` from the given generator.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from training.model import CharGRU
from training.vocab import Vocab, VocabError

PROG = "charstream-sample"


@torch.no_grad()
def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Choose a token id from one row of logits [V]."""
    if temperature == 0:
        return int(torch.argmax(logits))
    scaled = logits.double() / temperature
    if top_k and top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model: CharGRU,
    vocab: Vocab,
    prompt: str,
    length: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> str:
    """The `length` characters that follow `prompt` (prompt not included)."""
    if not prompt:
        raise ValueError("the prompt must hold at least one character")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    model.eval()
    device = next(model.parameters()).device
    hidden = model.initial_state(1, device)  # [L, 1, H]
    logits = None
    for token in vocab.encode(prompt):
        logits, hidden = model(torch.tensor([[token]], device=device), hidden)
    out = []
    for _ in range(length):
        token = next_token(logits[0, -1].cpu(), temperature, top_k, generator)
        out.append(token)
        logits, hidden = model(torch.tensor([[token]], device=device), hidden)
    return vocab.decode(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Generate text from a training checkpoint (reference sampler).")
    p.add_argument("--checkpoint", type=Path, required=True, metavar="DIR", help="checkpoint directory (config.json, vocab.json, model.safetensors)")
    p.add_argument("--prompt", default="\n", help="text to start from (default: a newline)")
    p.add_argument("--length", type=int, default=500, help="characters to generate (default 500)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; default 0.8")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely characters; 0 = all")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from training.checkpoint import CheckpointError, load_model

    try:
        if args.length < 0 or args.top_k < 0 or args.temperature < 0:
            raise ValueError("--length, --top-k and --temperature must be >= 0")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but PyTorch sees no CUDA device")
        model, vocab, _ = load_model(args.checkpoint, args.device)
        generator = torch.Generator().manual_seed(args.seed)
        text = generate(model, vocab, args.prompt, args.length, args.temperature, args.top_k, generator)
    except (CheckpointError, VocabError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(args.prompt + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
