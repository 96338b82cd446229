"""Decoding's shared parts: sampling settings and the engine's sampler (`sampling`), a
generation's result and the prompt checks (`state`), loading a checkpoint to decode
(`from_checkpoint`). The decode engine itself is `hunyuan_jax.engine`."""
