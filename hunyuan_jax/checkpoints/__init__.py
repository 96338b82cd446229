"""Checkpoints: Hugging Face names and shards, the converted layout, run checkpoints and their
integrity, the one loader, LoRA runs over their base, and conversion (`convert/`)."""
