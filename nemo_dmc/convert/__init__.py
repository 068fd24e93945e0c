"""Checkpoint conversion: Hugging Face / GGUF import, weights checkpoints, TP (re)sharding."""
