"""An independent plain-numpy forward of Hunyuan-Large, written from SPEC.md section 3.

It uses none of `hunyuan_jax`: it reads the Hugging Face state dict (PyTorch `[out, in]` weights,
HF key names) and the HF `config.json` dict directly, so tests can use it as an oracle for our
model, the decoder, the converter and sharded runs.

    h = x + Attn(RMSNorm_in(x));  y = h + MoE(RMSNorm_post(h))     (every layer)
    logits = RMSNorm_final(h) @ embed_tokens^T                       (tied head)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def load_hf_state_dict(directory) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict, config.json dict) of a safetensors checkpoint with an index file."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    state = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_file(str(directory / shard)))
    missing = set(weight_map) - set(state)
    if missing:
        raise KeyError(f"tensors in the index but not in the shards: {sorted(missing)}")
    return state, config


def rms_norm(x, w, eps):
    """Statistics in float32 (or wider), cast back to x's dtype, then times the weight."""
    x32 = x.astype(np.promote_types(x.dtype, np.float32))
    y = x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * w.astype(x.dtype)


def rope_base(config: dict) -> float:
    """Fixed NTK-alpha base: rope_theta * alpha ** (head_dim / (head_dim - 2))."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    alpha = (config.get("rope_scaling") or {}).get("alpha", 1.0)
    return config.get("rope_theta", 10000.0) * alpha ** (head_dim / (head_dim - 2))


def rope(x, positions, base):
    """NeoX rotate-half RoPE. x: [S, N, Dh]; positions: [S]. inv_freq in float32."""
    dh = x.shape[-1]
    inv_freq = (1.0 / np.float32(base) ** (np.arange(0, dh, 2, dtype=np.float32) / dh)).astype(
        np.float32
    )
    freqs = positions[:, None].astype(np.float32) * inv_freq  # [S, Dh/2]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]  # [S, 1, Dh]
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    rotated = np.concatenate([-x2, x1], axis=-1)
    return (x * np.cos(emb) + rotated * np.sin(emb)).astype(x.dtype)


def silu(x):
    return x / (1.0 + np.exp(-x))


def mlp(x, sd, prefix):
    """down_proj(silu(gate_proj(x)) * up_proj(x)) with PyTorch [out, in] weights."""
    gate = x @ sd[prefix + "gate_proj.weight"].T
    up = x @ sd[prefix + "up_proj.weight"].T
    return (silu(gate) * up) @ sd[prefix + "down_proj.weight"].T


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def moe(x, sd, prefix, config):
    """Shared MLP + top-k routed experts, computed token by token. x: [S, D]."""
    top_k = config.get("moe_topk", 1)
    top_k = top_k[0] if isinstance(top_k, list) else top_k
    out = (
        mlp(x, sd, prefix + "shared_mlp.")
        if config.get("use_mixed_mlp_moe", False)
        else np.zeros_like(x)
    )
    probs = softmax(x.astype(np.float32) @ sd[prefix + "gate.wg.weight"].astype(np.float32).T)
    for t in range(x.shape[0]):
        chosen = np.argsort(-probs[t], kind="stable")[:top_k]
        weights = probs[t, chosen]
        if top_k > 1:  # top-1 keeps the raw softmax probability
            weights = weights / weights.sum()
        for e, w in zip(chosen, weights):
            out[t] = out[t] + w * mlp(x[t : t + 1], sd, f"{prefix}experts.{e}.")[0]
    return out


def attention(x, kv, sd, prefix, config, positions):
    """One layer's attention on a single sequence x [S, D]; kv = shared raw (k, v) [S, KVH, Dh]."""
    s = x.shape[0]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    dh = config["hidden_size"] // heads
    eps, base = config["rms_norm_eps"], rope_base(config)
    q = (x @ sd[prefix + "q_proj.weight"].T).reshape(s, heads, dh)
    k, v = kv
    q, k = rope(q, positions, base), rope(k, positions, base)
    if config.get("use_qk_norm", False):  # after RoPE, this layer's own weights
        q = rms_norm(q, sd[prefix + "query_layernorm.weight"], eps)
        k = rms_norm(k, sd[prefix + "key_layernorm.weight"], eps)
    k = np.repeat(k, heads // kv_heads, axis=1)  # query head n uses kv head n // (H / KVH)
    v = np.repeat(v, heads // kv_heads, axis=1)
    scores = np.einsum("snh,tnh->nst", q, k) / np.sqrt(dh)
    scores = np.where(np.tril(np.ones((s, s), bool))[None], scores, -np.inf)
    out = np.einsum("nst,tnh->snh", softmax(scores.astype(np.float32)).astype(x.dtype), v)
    return out.reshape(s, heads * dh) @ sd[prefix + "o_proj.weight"].T


def forward(sd: dict, config: dict, input_ids, dtype=np.float32) -> np.ndarray:
    """input_ids [B, S] -> logits [B, S, V] in `dtype` (float32 or float64)."""
    sd = {k: np.asarray(v, dtype) for k, v in sd.items()}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    dh = config["hidden_size"] // heads
    eps = config["rms_norm_eps"]
    f = config.get("cla_share_factor", 1) if config.get("use_cla", False) else 1
    input_ids = np.asarray(input_ids)
    out = []
    for ids in input_ids:
        s = len(ids)
        positions = np.arange(s)
        h = sd["model.embed_tokens.weight"][ids]
        kv = None
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = rms_norm(h, sd[p + "input_layernorm.weight"], eps)
            if i % f == 0:  # this layer publishes raw k, v; layers i+1 .. i+f-1 reuse them
                kv = (
                    (x @ sd[p + "self_attn.k_proj.weight"].T).reshape(s, kv_heads, dh),
                    (x @ sd[p + "self_attn.v_proj.weight"].T).reshape(s, kv_heads, dh),
                )
            h = h + attention(x, kv, sd, p + "self_attn.", config, positions)
            h = h + moe(
                rms_norm(h, sd[p + "post_attention_layernorm.weight"], eps), sd, p + "mlp.", config
            )
        h = rms_norm(h, sd["model.norm.weight"], eps)
        head = (
            sd.get("lm_head.weight")
            if not config.get("tie_word_embeddings", True)
            else sd["model.embed_tokens.weight"]
        )
        out.append(h @ head.T)
    return np.stack(out)
