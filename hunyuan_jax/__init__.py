"""hunyuan_jax: Hunyuan-Large (Hunyuan-A52B) in JAX / Flax NNX."""
