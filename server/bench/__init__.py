"""Benchmarks of the server that need no client: the engine's own cost per iteration."""
