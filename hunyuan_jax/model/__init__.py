"""The model: its config (`ModelConfig`) and run policy, layers, attention kernels, MoE and expert
parallelism, the KV cache, quantized matmuls and quantization, LoRA adapters, abstract /
initialised models. Imports nothing above it (no checkpoints, training, decoding or serving)."""
