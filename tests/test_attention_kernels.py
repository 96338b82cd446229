"""hunyuan_jax.model.kernels: flash and splash (Pallas interpreter) against reference_attention, in
value and in gradient w.r.t. q, k, v, plus the masks, the dispatcher, flash's memory growth and
an ahead-of-time XLA:TPU compile of sharded splash (skipped without libtpu).

Tolerances (errors are max|x - ref| / max(|ref|, 1) over the whole tensor):
  float32: 5e-6. Every implementation computes the same float32 sums in a different order
  (blocks, online rescaling by exp(m_old - m_new), 1/sqrt(D) multiplied vs divided); over
  rows of <= 256 terms the differences measured are <= 5e-7 (~4 float32 eps), while any mask
  or indexing error is O(1e-1).
  bfloat16: 4 bf16 steps (4 * 2^-8 ~ 0.016; measured <= 5.3e-3): the reference casts
  normalised probabilities to bf16, flash casts un-normalised exp(s - m) and divides at the
  end, splash scales q in bf16; each rounding is one bf16 step (2^-8 relative) of a value of
  magnitude <= max|out|. The error against the float64 truth must also stay within 2x the
  reference's own bf16 error (+1e-3).
"""

from __future__ import annotations

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from hunyuan_jax.model.kernels import (
    AttentionMask,
    attend,
    chunks,
    flash,
    reference_attention,
    splash,
)

F32_TOL = 5e-6
BF16_TOL = 4 * 2.0**-8


def _err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1.0))


def _qkv(b, s, t, h, kvh, d, dtype=jnp.float32, seed=0):
    """Standard-normal q, k, v and a cotangent w for the VJPs (numpy RNG: no compiles)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)
    q, k, v = normal(b, s, h, d), normal(b, t, kvh, d), normal(b, t, kvh, d)
    return (*(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(normal(b, s, h, d)))


def _value_and_grads(fn, q, k, v, mask, w):
    """fn's output and d<out, w>/d(q, k, v), in one jit."""

    def run(q, k, v, mask):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
        return out, vjp(w.astype(out.dtype))

    out, grads = jax.jit(run)(q, k, v, mask)
    return (out, *grads)


def _packed_segments(b, s):
    """Row 0: three segments then padding (0); row 1: one long segment and a short one."""
    a, c = s // 3, (2 * s) // 3
    e = c + (s - c) // 2
    row0 = [1] * a + [2] * (c - a) + [3] * (e - c) + [0] * (s - e)
    row1 = [5] * (s - 7) + [6] * 7
    return jnp.array([row0, row1][:b], jnp.int32)


def _model_masks(segment_ids, index, s, t):
    """The masks exactly as model.py builds them today."""
    idx = jnp.arange(segment_ids.shape[1])
    no_cache = (idx[None, :, None] >= idx[None, None, :]) & (
        segment_ids[:, :, None] == segment_ids[:, None, :]
    )
    positions = index[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
    cached = jnp.arange(t, dtype=jnp.int32)[None, None, :] <= positions[:, :, None]
    return no_cache, cached


# ---------------------------------------------------------------------------- masks, reference
def test_masks_match_the_model():
    seg = _packed_segments(2, 12)
    index = jnp.array([7, 30], jnp.int32)
    no_cache, cached = _model_masks(seg, index, 5, 40)
    np.testing.assert_array_equal(AttentionMask.causal(seg).dense(), no_cache)
    np.testing.assert_array_equal(AttentionMask.cached(index, 5, 40).dense(), cached)
    assert AttentionMask.causal(seg).causal_self and not AttentionMask.cached(index, 5, 40)[-1]


def test_mask_flag_is_static_under_jit_and_scan():
    seg = _packed_segments(2, 12)

    @jax.jit
    def f(m):
        assert isinstance(m.causal_self, bool)
        return m.q_segments.sum() * (2 if m.causal_self else 3)

    assert f(AttentionMask.causal(seg)) == 2 * seg.sum()
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), AttentionMask.causal(seg))
    _, ys = jax.lax.scan(lambda c, m: (c, f(m)), 0, stacked)
    np.testing.assert_array_equal(ys, 2 * seg.sum())


def _float64_truth(q, k, v, mask, w):
    """Softmax attention and its VJP (cotangent w) in numpy float64: out, dq, dk, dv."""
    qn, kn, vn, wn = (np.asarray(x, np.float64) for x in (q, k, v, w))
    g = qn.shape[2] // kn.shape[2]
    kr, vr = np.repeat(kn, g, axis=2), np.repeat(vn, g, axis=2)
    scale = 1 / math.sqrt(qn.shape[-1])
    scores = np.einsum("bshd,bthd->bhst", qn, kr) * scale
    scores = np.where(np.asarray(mask.dense())[:, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhst,bthd->bshd", p, vr)
    dp = np.einsum("bshd,bthd->bhst", wn, vr)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
    dq = np.einsum("bhst,bthd->bshd", ds, kr)
    fold = lambda x: x.reshape(*kn.shape[:3], g, -1).sum(3)  # sum each KV head's query heads
    dk = fold(np.einsum("bhst,bshd->bthd", ds, qn))
    dv = fold(np.einsum("bhst,bshd->bthd", p, wn))
    return out, dq, dk, dv


def test_reference_is_softmax_attention_in_float64():
    b, s, h, kvh, d = 2, 9, 4, 2, 8
    q, k, v, w = _qkv(b, s, s, h, kvh, d)
    mask = AttentionMask.causal(_packed_segments(b, s))
    ref = _value_and_grads(reference_attention, q, k, v, mask, w)
    for name, x, t in zip(("out", "dq", "dk", "dv"), ref, _float64_truth(q, k, v, mask, w)):
        assert _err(x, t) < 1e-5, (name, _err(x, t))


def test_reference_dropout_is_the_models():
    q, k, v, _ = _qkv(1, 6, 6, 2, 1, 8)
    mask = AttentionMask.causal(jnp.ones((1, 6), jnp.int32))
    key = jax.random.key(3)
    run = jax.jit(lambda *x: (attend(*x, impl="xla", dropout=(0.5, key)), attend(*x)))
    dropped, plain = run(q, k, v, mask)
    assert _err(dropped, run(q, k, v, mask)[0]) == 0  # the key decides
    assert _err(dropped, plain) > 1e-2  # dropout did something
    with pytest.raises(ValueError, match="dropout"):
        attend(q, k, v, mask, impl="flash", dropout=(0.5, key))


# ---------------------------------------------------------------------------- flash
FLASH_CASES = {
    # name: (B, S, T, H, KVH, D, block_q, block_kv, mask)
    "packed_gqa_odd": (2, 45, 45, 4, 2, 16, 16, 8, "packed"),
    "cached_mqa_rows_differ": (2, 5, 40, 4, 1, 16, 8, 16, "cached"),
}


def _mask_for(kind, b, s, t):
    if kind == "packed":
        return AttentionMask.causal(_packed_segments(b, s))
    return AttentionMask.cached(jnp.array([7, 30], jnp.int32)[:b], s, t)


@pytest.mark.parametrize("case", FLASH_CASES)
def test_flash_matches_reference_float32(case):
    b, s, t, h, kvh, d, bq, bk, kind = FLASH_CASES[case]
    q, k, v, w = _qkv(b, s, t, h, kvh, d)
    mask = _mask_for(kind, b, s, t)
    ref = _value_and_grads(reference_attention, q, k, v, mask, w)
    fl = _value_and_grads(
        lambda *a: flash.flash_attention(*a, block_q=bq, block_kv=bk), q, k, v, mask, w
    )
    for name, x, r in zip(("out", "dq", "dk", "dv"), fl, ref):
        assert x.dtype == r.dtype and x.shape == r.shape, name
        assert _err(x, r) < F32_TOL, (case, name, _err(x, r))
    if kind == "cached":  # slots after a row's last position get no gradient
        np.testing.assert_array_equal(fl[2][0, 12:], 0)


def test_flash_bfloat16():
    b, s, h, kvh, d = 2, 40, 4, 2, 16
    q, k, v, w = _qkv(b, s, s, h, kvh, d)
    mask = AttentionMask.causal(_packed_segments(b, s))
    truth = _float64_truth(q, k, v, mask, w)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    ref = _value_and_grads(reference_attention, *bf, mask, w)
    fl = _value_and_grads(
        lambda *a: flash.flash_attention(*a, block_q=16, block_kv=16), *bf, mask, w
    )
    for name, x, r, t in zip(("out", "dq", "dk", "dv"), fl, ref, truth):
        assert x.dtype == jnp.bfloat16, name
        assert _err(x, r) < BF16_TOL, (name, _err(x, r))
        assert _err(x, t) < 2 * _err(r, t) + 1e-3, (name, _err(x, t), _err(r, t))


def test_flash_under_jit_grad_checkpoint_and_scan():
    """Two 'layers' in a checkpointed lax.scan, the mask passed as a scan constant."""
    b, s, h, kvh, d = 2, 24, 4, 2, 8
    q, k, v, _ = _qkv(b, s, s, h, kvh, d)
    mask = AttentionMask.causal(_packed_segments(b, s))
    scales = jnp.array([1.0, 0.5])

    def model(attn_fn):
        def loss(q, k, v):
            @jax.checkpoint
            def body(x, scale):
                y = attn_fn(x * scale, k, v, mask)
                return y, y.sum()

            x, sums = jax.lax.scan(body, q, scales)
            return (x**2).sum() + sums.sum()

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    ref_val, ref_grads = model(reference_attention)(q, k, v)
    val, grads = model(lambda *a: flash.flash_attention(*a, block_q=8, block_kv=8))(q, k, v)
    assert _err(val, ref_val) < F32_TOL
    for g, r in zip(grads, ref_grads):
        assert _err(g, r) < F32_TOL


def _live_count(fn, x, primitive: str) -> int:
    """How often `primitive` occurs in fn's jaxpr after dead-code elimination (jax's own,
    internal: the jaxpr of a checkpointed grad keeps a dead recompute of the primal output)."""
    from jax._src.interpreters import partial_eval as pe

    jaxpr = jax.make_jaxpr(fn)(x).jaxpr
    live, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    return str(live).count(primitive + "[")


def test_flash_residual_names_spare_the_recompute():
    """Under jax.checkpoint, a policy saving flash.RESIDUAL_NAMES keeps the backward from
    re-running the forward: one forward loop nest (one cond) fewer in the jaxpr."""
    q, k, v, _ = _qkv(1, 16, 16, 2, 1, 8)
    mask = AttentionMask.causal(jnp.ones((1, 16), jnp.int32))

    def conds(policy):
        loss = lambda q: flash.flash_attention(q, k, v, mask, block_q=8, block_kv=8).sum()
        return _live_count(jax.value_and_grad(jax.checkpoint(loss, policy=policy)), q, "cond")

    save = jax.checkpoint_policies.save_only_these_names(*flash.RESIDUAL_NAMES)
    assert conds(None) == 3 and conds(save) == 2  # fwd (+ recompute) + bwd


def test_flash_skips_masked_blocks():
    """A chunk at positions 0..7 of a 512-slot cache: only KV block 0 (of 64) is allowed. The
    other slots hold NaN: any computed masked block would spread it (0 * NaN) into the output
    or the gradients, as it does in the reference."""
    q, k, v, _ = _qkv(1, 8, 512, 2, 1, 8)
    k, v = (x.at[:, 8:].set(jnp.nan) for x in (k, v))
    mask = AttentionMask.cached(jnp.array([0], jnp.int32), 8, 512)
    loss = lambda fn: jax.jit(jax.value_and_grad(lambda k, v: fn(q, k, v, mask).sum(), (0, 1)))
    val, (dk, dv) = loss(lambda *a: flash.flash_attention(*a, block_q=8, block_kv=8))(k, v)
    assert np.isfinite(val) and np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))
    assert np.all(np.asarray(dk[0, 8:]) == 0) and np.any(np.asarray(dk[0, :8]) != 0)
    assert np.isnan(loss(reference_attention)(k, v)[0])


def _temp_bytes(fn, s, h=2, kvh=1, d=32):
    sds = jax.ShapeDtypeStruct
    q, kv = sds((1, s, h, d), jnp.float32), sds((1, s, kvh, d), jnp.float32)
    seg = sds((1, s), jnp.int32)
    loss = lambda q, k, v, seg: fn(q, k, v, AttentionMask.causal(seg)).sum()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_flash_memory_grows_linearly():
    """fwd+bwd temporaries at S=1024 vs 4096: linear is 4x, materialised scores 16x."""
    fl = [_temp_bytes(flash.flash_attention, s) for s in (1024, 4096)]
    ref = [_temp_bytes(reference_attention, s) for s in (1024, 4096)]
    print(f"temp bytes S=1024 -> 4096: flash {fl} ({fl[1] / fl[0]:.2f}x), xla {ref}")
    assert ref[1] / ref[0] > 8  # the measurement does see quadratic memory
    assert fl[1] / fl[0] < 5
    assert fl[1] < ref[1] / 20


# ---------------------------------------------------------------------------- splash
def test_splash_matches_reference_float32():
    """Packed rows (3 segments + padding), GQA 4 heads over 2, S=256 in 128-blocks (so the
    block above the diagonal is skipped); Pallas interpreter on CPU."""
    b, s, h, kvh, d = 2, 256, 4, 2, 32
    q, k, v, w = _qkv(b, s, s, h, kvh, d)
    mask = AttentionMask.causal(_packed_segments(b, s))
    ref = _value_and_grads(reference_attention, q, k, v, mask, w)
    sp = _value_and_grads(
        lambda *a: splash.splash_attention(*a, block_q=128, block_kv=128, interpret=True),
        q,
        k,
        v,
        mask,
        w,
    )
    for name, x, r in zip(("out", "dq", "dk", "dv"), sp, ref):
        assert x.dtype == r.dtype and x.shape == r.shape, name
        assert _err(x, r) < F32_TOL, (name, _err(x, r))


def test_splash_residual_name_spares_the_recompute():
    q, k, v, _ = _qkv(1, 128, 128, 2, 1, 8)
    mask = AttentionMask.causal(jnp.ones((1, 128), jnp.int32))

    def kernels(policy):
        loss = lambda q: splash.splash_attention(q, k, v, mask, interpret=True).sum()
        return _live_count(
            jax.value_and_grad(jax.checkpoint(loss, policy=policy)), q, "pallas_call"
        )

    save = jax.checkpoint_policies.save_only_these_names(splash.RESIDUAL_NAME)
    assert kernels(None) == 4 and kernels(save) == 3  # fwd (+ recompute), dq, dkv


def test_splash_bfloat16_forward():
    b, s, h, kvh, d = 1, 128, 2, 1, 32
    q, k, v, _ = _qkv(b, s, s, h, kvh, d)
    mask = AttentionMask.causal(_packed_segments(2, s)[1:])
    truth = _float64_truth(q, k, v, mask, q)[0]
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    ref = reference_attention(*bf, mask)
    out = jax.jit(lambda *a: splash.splash_attention(*a, interpret=True))(*bf, mask)
    assert out.dtype == jnp.bfloat16
    assert _err(out, ref) < BF16_TOL
    assert _err(out, truth) < 2 * _err(ref, truth) + 1e-3


def _cpu_mesh():
    devices = np.array(jax.devices()[:4]).reshape(2, 2)
    return Mesh(devices, ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (simulated) devices")
def test_sharded_splash_and_flash_via_attend():
    """attend(mesh=...) runs splash / flash per device under shard_map: batch over 'data',
    heads (4 query, 2 KV) over 'tensor'."""
    b, s, h, kvh, d = 2, 128, 4, 2, 16
    q, k, v, _ = _qkv(b, s, s, h, kvh, d)
    mask = AttentionMask.causal(_packed_segments(b, s))
    spec = P("data", None, "tensor", None)
    mesh = _cpu_mesh()

    @jax.jit
    def run(q, k, v, m):
        kw = dict(mesh=mesh, q_spec=spec, kv_spec=spec)
        return attend(q, k, v, m, impl="splash", interpret=True, **kw), attend(
            q, k, v, m, impl="flash", block_q=32, block_kv=32, **kw
        )

    ref = reference_attention(q, k, v, mask)
    for out in run(q, k, v, mask):
        assert _err(out, ref) < F32_TOL
    with pytest.raises(ValueError, match="shard"):
        attend(q, k, v, mask, impl="flash", mesh=mesh, q_spec=P("data", "tensor"))


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("balanced", [True, False])
def test_context_parallel_splash(balanced):
    """Context parallelism: q's sequence over 'tensor' (4 chunks of 128), K/V whole; the kernel
    for the global causal mask with its metadata split along q, per device in shard_map. Both
    the load-balanced query order (half-chunks i and 7 - i) and contiguous chunks give the
    one-device attention and its gradients (segments cross the chunk borders)."""
    b, s, h, kvh, d = 2, 512, 2, 1, 32
    q, k, v, w = _qkv(b, s, s, h, kvh, d)
    mask = AttentionMask.causal(_packed_segments(b, s))
    mesh = Mesh(
        np.array(jax.devices()).reshape(2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2
    )
    kw = dict(mesh=mesh, q_spec=P("data", "tensor"), kv_spec=P("data"), interpret=True)
    fn = lambda *a: splash.context_parallel_splash(*a, balanced=balanced, block_q=128, **kw)
    ref = _value_and_grads(reference_attention, q, k, v, mask, w)
    for name, x, r in zip(("out", "dq", "dk", "dv"), _value_and_grads(fn, q, k, v, mask, w), ref):
        assert _err(x, r) < F32_TOL, (name, _err(x, r))


def test_balanced_chunks_do_equal_work():
    """The splash kernel's forward block map (which [512, 512] blocks each device computes) at
    16K tokens in 8 chunks: contiguous chunks give the last device 122 blocks against a mean of
    66 (1.85x); the balanced order gives every device 66."""
    work = {}
    for balanced in (False, True):
        kernel = splash._kernel(1, 16384, splash.block_sizes_for(2048), False, 1, 8, balanced)
        blocks = np.asarray(kernel.fwd_mask_info.block_mask).reshape(8, -1)
        work[balanced] = (blocks != 0).sum(axis=1).tolist()
    assert work[False] == [10, 26, 42, 58, 74, 90, 106, 122]
    assert work[True] == [66] * 8
    order = chunks.balanced_order(16, 4)
    assert order.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]


def test_splash_refuses_what_it_cannot_serve():
    q, k, v, _ = _qkv(2, 5, 40, 4, 2, 16)
    cached = AttentionMask.cached(jnp.array([7, 30], jnp.int32), 5, 40)
    with pytest.raises(splash.SplashUnsupported, match="causal"):
        splash.splash_attention(q, k, v, cached, interpret=True)
    q2, k2, v2, _ = _qkv(2, 100, 100, 4, 2, 16)
    packed = AttentionMask.causal(_packed_segments(2, 100))
    with pytest.raises(ValueError, match="multiple of 128"):
        splash.splash_attention(q2, k2, v2, packed, interpret=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        splash.block_sizes_for(256, block_q=192)
    # attend falls back to flash (with a warning) and still gets the right answer.
    with pytest.warns(UserWarning, match="using flash"):
        out = jax.jit(lambda *a: attend(*a, impl="splash", interpret=True))(q, k, v, cached)
    assert _err(out, jax.jit(reference_attention)(q, k, v, cached)) < F32_TOL
    with pytest.raises(splash.SplashUnsupported):
        attend(q, k, v, cached, impl="splash", fallback=False)


needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu not installed: no ahead-of-time TPU compile (pip install libtpu)",
)


def _v5e_2x2_mesh() -> Mesh:
    """A (data=2, tensor=2) mesh of compile-only v5e devices (skips where libtpu cannot
    describe the topology)."""
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU chips here to drive
    try:
        desc = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    except Exception as e:  # libtpu present but unusable (e.g. busy): not this test's subject
        pytest.skip(f"cannot describe a v5e:2x2 topology: {e}")
    return Mesh(
        np.array(desc.devices).reshape(2, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2
    )


@needs_libtpu
def test_sharded_splash_compiles_for_tpu():
    """fwd+bwd of shard_map'd splash on a v5e 2x2 (compile-only devices): data=2 x tensor=2,
    bf16, head_dim 128 like Hunyuan; three Mosaic kernels (fwd, dq, dkv) must come out."""
    mesh = _v5e_2x2_mesh()
    b, s, h, kvh, d = 4, 256, 4, 2, 128
    spec = P("data", None, "tensor", None)

    def loss(q, k, v, seg):
        out = splash.sharded_splash_attention(
            q, k, v, AttentionMask.causal(seg), mesh=mesh, q_spec=spec
        )
        return out.astype(jnp.float32).sum()

    def sds(shape, dtype, pspec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.NamedSharding(mesh, pspec))

    args = (
        sds((b, s, h, d), jnp.bfloat16, spec),
        sds((b, s, kvh, d), jnp.bfloat16, spec),
        sds((b, s, kvh, d), jnp.bfloat16, spec),
        sds((b, s), jnp.int32, P("data", None)),
    )
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    assert compiled.as_text().count("tpu_custom_call") == 3
    dq_sharding = compiled.output_shardings[0]
    assert dq_sharding.spec[0] == "data" and dq_sharding.spec[2] == "tensor"


@needs_libtpu
def test_context_parallel_splash_compiles_for_tpu():
    """fwd+bwd of the load-balanced context-parallel splash on a v5e 2x2 (compile-only
    devices): the sequence over 'tensor' (2 chunks), bf16, head_dim 128: the three Mosaic
    kernels, the collective permutes of the balanced order, and dK/dV reduce-scattered."""
    mesh = _v5e_2x2_mesh()
    b, s, h, kvh, d = 2, 1024, 4, 2, 128
    q_spec, kv_spec = P("data", "tensor"), P("data")

    def loss(q, k, v, seg):
        out = splash.context_parallel_splash(
            q, k, v, AttentionMask.causal(seg), mesh=mesh, q_spec=q_spec, kv_spec=kv_spec
        )
        return out.astype(jnp.float32).sum()

    def sds(shape, pspec, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.NamedSharding(mesh, pspec))

    args = (
        sds((b, s, h, d), q_spec),
        sds((b, s, kvh, d), q_spec),
        sds((b, s, kvh, d), q_spec),
        sds((b, s), q_spec, jnp.int32),
    )
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    assert text.count("tpu_custom_call") == 3
    assert "collective-permute" in text and "reduce-scatter" in text
