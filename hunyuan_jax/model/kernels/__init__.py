"""Attention kernels: one mask type, one dispatcher (`attend`) and three implementations
(xla reference, blockwise flash in plain JAX, Pallas TPU splash)."""

from hunyuan_jax.kernels.attention import AttentionMask, attend, reference_attention

__all__ = ["AttentionMask", "attend", "reference_attention"]
