"""hunyuan_jax.model.kernels.paged: writing K/V into a shared page pool and attending over it for
a ragged token stream, against a dense float64 reference written from the definition (each
row's keys concatenated in order, causal by position), against jax's own
`ref_ragged_paged_attention` on the same pages, and against the contiguous
`kernels.attention.reference_attention` (the CLA key-norm identity). The Pallas kernel runs on
TPU only: here it is compiled ahead of time for a v5e chip (needs libtpu), and run in the Pallas
TPU interpreter where this jax's interpreter can (in jax 0.10.2 it cannot: xfail).

Batches: rows mixing prefill chunks (with and without earlier context), single decode tokens,
an unused row and padding tokens; every row's pages drawn from a shuffled pool (page 0 is
scratch); page sizes 4 and 16; GQA with 4 query heads per KV head.

Tolerances (err = max|x - ref| / max(|ref|, 1), as in test_attention_kernels):
  float32: 5e-6. The same float32 sums in another order (key blocks, online rescaling by
  exp(m_old - m_new)): a few float32 eps (1.2e-7) per output over rows of <= 64 keys
  (measured <= 2.5e-7), while a mask, page-order or block-count error is O(1e-1).
  bfloat16: 4 bf16 steps (4 * 2^-8), against the float64 truth of the bf16-rounded q / K / V:
  the probabilities cast before `@ v` and the output are each rounded once (one step, 2^-8
  relative, of a value <= max|out|) (measured 3.0e-3).
  int8: per token and combined head each element moves by <= scale / 2 = amax / 254; a score
  by <= sm_scale * |q|_1 * amax_k / 254 (= ds), so the probabilities move by <= e^(2 ds) - 1
  in l1 and the output by <= amax_v / 254 + (e^(2 ds) - 1) * max|v| (checked per token;
  measured <= 5% of it, a worst case); and against the dequantised K / V: float32's 5e-6.
"""

from __future__ import annotations

import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hunyuan_jax.model.kernels import AttentionMask, paged, reference_attention
from hunyuan_jax.model.kernels.paged import PagedBatch, PagedKV

F32_TOL = 5e-6
BF16_TOL = 4 * 2.0**-8
KVH, G, HD = 2, 4, 32  # GQA: 8 query heads over 2 KV heads
H = KVH * G

attend = jax.jit(
    paged.attend,
    static_argnames=(
        "impl",
        "sm_scale",
        "block_q",
        "block_kv",
        "num_kv_pages_per_block",
        "num_queries_per_block",
    ),
)
write = jax.jit(paged.write)


def _err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1.0))


class Step:
    """One engine step built on the host: rows[r] = (cached before the step, query tokens).

    Pages are drawn from a shuffled pool (never page 0); K / V of every row's whole sequence
    are kept in `k_seq` / `v_seq` [L, KVH, HD] (numpy) for the references."""

    def __init__(self, rng, rows, *, page_size, tokens, max_rows, pages_per_row, num_pages, hd=HD):
        self.page_size, self.rows, self.hd = page_size, rows, hd
        free = list(rng.permutation(np.arange(1, num_pages)))
        self.page_indices = np.zeros((max_rows, pages_per_row), np.int32)
        self.kv_lens = np.zeros(max_rows, np.int32)
        self.cu_q_lens = np.zeros(max_rows + 1, np.int32)
        self.k_seq, self.v_seq = [], []
        pos, slots, seq_ids = [], [], []
        for r, (before, n) in enumerate(rows):
            length = before + n
            need = -(-length // page_size)
            self.page_indices[r, :need] = [free.pop() for _ in range(need)]
            self.kv_lens[r] = length
            self.cu_q_lens[r + 1] = self.cu_q_lens[r] + n
            self.k_seq.append(rng.standard_normal((length, KVH, hd)).astype(np.float32))
            self.v_seq.append(rng.standard_normal((length, KVH, hd)).astype(np.float32))
            pos += list(range(before, length))
            slots += [self.slot(r, p) for p in range(before, length)]
            seq_ids += [r] * n
        self.cu_q_lens[len(rows) + 1 :] = self.cu_q_lens[len(rows)]
        self.n_real = len(pos)
        pad = tokens - self.n_real
        assert pad >= 0
        self.positions = np.array(pos + [0] * pad, np.int32)
        self.slots = np.array(slots + list(rng.integers(0, page_size, pad)), np.int32)
        self.seq_ids = np.array(seq_ids + list(rng.integers(0, max_rows, pad)), np.int32)
        self.valid = np.arange(tokens) < self.n_real
        self.q = rng.standard_normal((tokens, H, hd)).astype(np.float32)

    def slot(self, r, p):
        return int(self.page_indices[r, p // self.page_size]) * self.page_size + p % self.page_size

    def batch(self) -> PagedBatch:
        return PagedBatch(
            *map(jnp.asarray, (self.positions, self.slots, self.seq_ids, self.valid)),
            *map(jnp.asarray, (self.kv_lens, self.page_indices, self.cu_q_lens)),
            jnp.array([len(self.rows)], jnp.int32),
        )

    def step_kv(self):
        """[T, KVH, HD] K and V of this step's tokens (padding: 7.0, into page 0)."""
        ks = [self.k_seq[r][b:] for r, (b, _) in enumerate(self.rows)]
        vs = [self.v_seq[r][b:] for r, (b, _) in enumerate(self.rows)]
        pad = np.ones((len(self.valid) - self.n_real, KVH, self.hd), np.float32) * 7.0
        return np.concatenate(ks + [pad]), np.concatenate(vs + [pad])

    def fill(self, pool: PagedKV, step=True) -> PagedKV:
        """The cache before the step (earlier writes), then (step=True) this step's write."""
        before = [(r, p) for r, (b, _) in enumerate(self.rows) for p in range(b)]
        if before:
            k = np.stack([self.k_seq[r][p] for r, p in before])
            v = np.stack([self.v_seq[r][p] for r, p in before])
            slots = jnp.array([self.slot(r, p) for r, p in before], jnp.int32)
            pool = write(pool, jnp.asarray(k), jnp.asarray(v), slots)
        if not step:
            return pool
        k, v = self.step_kv()
        return write(pool, jnp.asarray(k), jnp.asarray(v), jnp.asarray(self.slots))

    def dense(self, q=None, k_seq=None, v_seq=None, scale=None):
        """float64, from the definition: token t attends to keys 0..positions[t] of its row."""
        q = np.asarray(self.q if q is None else q, np.float64)
        scale = self.hd**-0.5 if scale is None else scale
        k_seq, v_seq = k_seq or self.k_seq, v_seq or self.v_seq
        out = np.zeros(q.shape)
        for t in range(self.n_real):
            r, p = self.seq_ids[t], self.positions[t]
            k = np.asarray(k_seq[r][: p + 1], np.float64)
            v = np.asarray(v_seq[r][: p + 1], np.float64)
            qt = q[t].reshape(KVH, G, self.hd)
            s = np.einsum("ngd,knd->ngk", qt, k) * scale
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[t] = np.einsum("ngk,knd->ngd", w, v).reshape(H, self.hd)
        return out


ROWS = [(5, 7), (19, 1), (0, 9), (0, 1), (30, 1), (2, 3)]  # prefill chunks and decodes


def _step(page_size, seed=0, rows=ROWS, tokens=28, num_pages=None, hd=HD):
    rng = np.random.default_rng(seed)
    ppr = -(-max(b + n for b, n in rows) // page_size) + 1
    num_pages = num_pages or len(rows) * ppr + 5
    return Step(
        rng,
        rows,
        page_size=page_size,
        tokens=tokens,
        max_rows=len(rows) + 1,  # one unused row
        pages_per_row=ppr,
        num_pages=num_pages,
        hd=hd,
    )


def _pool(st: Step, dtype) -> PagedKV:
    return PagedKV.zeros(st.page_indices.max() + 5, st.page_size, KVH, st.hd, dtype)


# ------------------------------------------------------------------------------ float32
@pytest.mark.parametrize(
    "page_size, blocks", [(4, {}), (4, {"block_q": 8, "block_kv": 8}), (16, {"block_q": 5})]
)
def test_matches_dense_reference_float32(page_size, blocks):
    st = _step(page_size)
    pool = st.fill(_pool(st, jnp.float32))
    out = attend(jnp.asarray(st.q), pool, st.batch(), **blocks)
    assert out.shape == st.q.shape and out.dtype == jnp.float32
    assert _err(out, st.dense()) < F32_TOL
    assert not np.any(np.asarray(out[st.n_real :]))  # padding: exact zeros


def test_matches_jax_ref_ragged_paged_attention(page_size=4):
    """The same pages through jax's reference for the Pallas kernel (cu_q_lens / kv_lens)."""
    from jax.experimental.pallas.ops.tpu import ragged_paged_attention as rpa

    st = _step(page_size, seed=1)
    pool = st.fill(_pool(st, jnp.float32))
    b = st.batch()
    # Its per-row Python loop needs concrete lengths: close over them, jit over q and pages.
    lens = [np.asarray(x) for x in (b.kv_lens, b.page_indices, b.cu_q_lens, b.num_seqs)]
    ref_fn = jax.jit(lambda q, kv: rpa.ref_ragged_paged_attention(q, kv, *lens, sm_scale=HD**-0.5))
    ref = ref_fn(jnp.asarray(st.q), pool.kv)
    out = attend(jnp.asarray(st.q), pool, b, block_kv=8)
    assert _err(out[: st.n_real], ref) < F32_TOL
    assert _err(ref, st.dense()[: st.n_real]) < F32_TOL  # and both are the definition


def test_sm_scale_and_bad_arguments():
    st = _step(4, seed=2)
    pool = st.fill(_pool(st, jnp.float32))
    out = attend(jnp.asarray(st.q), pool, st.batch(), sm_scale=0.3)
    assert _err(out, st.dense(scale=0.3)) < F32_TOL
    with pytest.raises(ValueError, match="impl"):
        paged.attend(jnp.asarray(st.q), pool, st.batch(), impl="splash")
    with pytest.raises(ValueError, match="head"):
        paged.attend(jnp.asarray(st.q[:, :5]), pool, st.batch())


def test_incremental_decode_equals_one_prefill():
    """write() then attend() each step sees the new tokens: a prefill chunk then decode steps,
    step by step, give what one prefill of the whole sequence gives, for every token."""
    ps, length, first = 4, 11, 5
    full = _step(ps, seed=3, rows=[(0, length)], tokens=length, num_pages=12)
    want = full.dense()
    pool = _pool(full, jnp.float32)
    steps = [(0, first)] + [(p, 1) for p in range(first, length)]
    for before, n in steps:
        sl = slice(before, before + n)
        pos = np.arange(before, before + n, dtype=np.int32)
        slots = jnp.array([full.slot(0, p) for p in pos], jnp.int32)
        pool = write(pool, jnp.asarray(full.k_seq[0][sl]), jnp.asarray(full.v_seq[0][sl]), slots)
        b = PagedBatch(
            jnp.asarray(pos), slots, jnp.zeros(n, jnp.int32), jnp.ones(n, bool),
            jnp.array([before + n], jnp.int32), jnp.asarray(full.page_indices[:1]),
            jnp.array([0, n], jnp.int32), jnp.array([1], jnp.int32),
        )  # fmt: skip
        out = attend(jnp.asarray(full.q[sl]), pool, b)
        assert _err(out, want[sl]) < F32_TOL, (before, n)


def test_padding_tokens_are_zero_and_touch_only_page_0():
    """Padding tokens carrying NaN queries / keys / values: they write only into page 0, their
    outputs are 0, and nobody else's output moves (page 0 and unused page-table entries, which
    are 0 too, are masked and their values zeroed, so the NaN cannot leak)."""
    st = _step(4, seed=4, tokens=36)
    ref = attend(jnp.asarray(st.q), st.fill(_pool(st, jnp.float32)), st.batch())
    k, v = st.step_kv()
    k[st.n_real :], v[st.n_real :] = np.nan, np.nan
    q = st.q.copy()
    q[st.n_real :] = np.nan
    before = st.fill(_pool(st, jnp.float32), step=False)
    after = write(before, jnp.asarray(k), jnp.asarray(v), jnp.asarray(st.slots))
    flat = lambda pool: np.asarray(pool.kv).reshape(-1, 2 * KVH * HD)
    changed = set(np.flatnonzero(np.any(flat(after) != flat(before), axis=1)))
    real = set(st.slots[: st.n_real].tolist())
    assert real <= changed and all(s in real or s < st.page_size for s in changed)
    assert np.isnan(flat(after)[st.slots[st.n_real :]]).all()  # the padding did write page 0
    out = np.asarray(attend(jnp.asarray(q), after, st.batch()))
    assert not np.isnan(out).any()
    assert np.all(out[st.n_real :] == 0)
    np.testing.assert_array_equal(out[: st.n_real], np.asarray(ref)[: st.n_real])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int8])
def test_one_row_blocks_match_per_token_blocks(dtype):
    """The xla path's two ways through a block of queries: a block whose real tokens all belong
    to one row (a prefill chunk's) reads that row's pages once for the whole block, a block
    mixing rows gathers each token's own row's pages. block_q 8 gives both (tokens 0-7 of
    three rows; 8-23 and 24-28 + padding of one row's 21-token chunk), block_q 64 one mixed
    block: the same outputs, the definition's, padding with NaN queries included (zeros)."""
    st = _step(4, seed=12, rows=[(3, 1), (9, 1), (0, 6), (40, 21)], tokens=40)
    pool = st.fill(_pool(st, dtype))
    q = st.q.copy()
    q[st.n_real :] = np.nan
    one_row = np.asarray(attend(jnp.asarray(q), pool, st.batch(), block_q=8))
    mixed = np.asarray(attend(jnp.asarray(q), pool, st.batch(), block_q=64))
    assert not np.isnan(one_row).any() and not np.any(one_row[st.n_real :])
    assert _err(one_row, mixed) < F32_TOL
    if dtype == jnp.float32:
        assert _err(one_row[: st.n_real], st.dense()[: st.n_real]) < F32_TOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int8])
def test_lane_padded_pool_gives_the_same_attention(dtype):
    """A pool whose head dim is padded to the TPU's 128 lanes (`paged.pool_head_dim`: what the
    engine stores on TPU): `write` zero-pads K/V, `attend` pads the queries and slices the
    output back, the scale stays 1/sqrt(the true head_dim). Equal to the unpadded pool's
    attention within float32 rounding (the padded dot products add exact zeros), and the pad
    lanes of the pool stay zero."""
    assert paged.pool_head_dim(80, "tpu") == 128 and paged.pool_head_dim(80, "cpu") == 80
    assert paged.pool_head_dim(128, "tpu") == 128 and paged.pool_head_dim(8, "tpu") == 128
    st = _step(4, seed=13)
    plain = st.fill(_pool(st, dtype))
    wide = PagedKV.zeros(st.page_indices.max() + 5, st.page_size, KVH, 128, dtype)
    wide = st.fill(wide)
    assert not np.any(np.asarray(wide.kv)[..., st.hd :])
    q = jnp.asarray(st.q)
    out, ref = attend(q, wide, st.batch()), attend(q, plain, st.batch())
    assert out.shape == q.shape
    assert _err(out, ref) < F32_TOL
    if dtype == jnp.float32:
        assert _err(out[: st.n_real], st.dense()[: st.n_real]) < F32_TOL


def test_write_scatters_into_the_donated_pool():
    """The slot layout (K at even combined heads, V at odd) and, in a jitted program that
    donates the pool, no pool-sized temporary (the scatter updates it in place)."""
    pool = PagedKV.zeros(64, 16, KVH, HD, jnp.float32)
    k = jnp.arange(3 * KVH * HD, dtype=jnp.float32).reshape(3, KVH, HD)
    new = write(pool, k, -k, jnp.array([16 * 5 + 2, 7, 16 * 63 + 15], jnp.int32))
    kv = np.asarray(new.kv)
    np.testing.assert_array_equal(kv[5, 2, 0::2], k[0])
    np.testing.assert_array_equal(kv[5, 2, 1::2], -k[0])
    np.testing.assert_array_equal(kv[63, 15, 0::2], k[2])
    assert np.count_nonzero(kv) == np.count_nonzero(k) * 2
    compiled = jax.jit(paged.write, donate_argnums=0).lower(pool, k, k, jnp.zeros(3, jnp.int32))
    mem = compiled.compile().memory_analysis()
    pool_bytes = pool.kv.size * 4
    assert mem.temp_size_in_bytes < pool_bytes // 8, (mem.temp_size_in_bytes, pool_bytes)


# ------------------------------------------------------------------------------ bf16 / int8
def _round(x, dtype):
    return np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32))


def test_bfloat16(page_size=16):
    st = _step(page_size, seed=5)
    pool = st.fill(_pool(st, jnp.bfloat16))
    out = attend(jnp.asarray(st.q, jnp.bfloat16), pool, st.batch(), block_kv=8)
    assert out.dtype == jnp.bfloat16
    bf = lambda xs: [_round(x, jnp.bfloat16) for x in xs]
    want = st.dense(_round(st.q, jnp.bfloat16), bf(st.k_seq), bf(st.v_seq))
    assert _err(out, want) < BF16_TOL


@pytest.mark.parametrize("page_size", [4, 16])
def test_int8_pool_error_within_the_rounding_step(page_size):
    st = _step(page_size, seed=6)
    pool = st.fill(_pool(st, jnp.int8))
    assert pool.kv.dtype == jnp.int8 and pool.quantized
    assert pool.scale.shape == (pool.kv.shape[0], 2 * KVH, page_size)
    out = np.asarray(attend(jnp.asarray(st.q), pool, st.batch()), np.float64)
    want = st.dense()
    # Per token: the worst amax / 254 over its row's keys and values, then the bound.
    for t in range(st.n_real):
        r, p = st.seq_ids[t], st.positions[t]
        dk = np.abs(st.k_seq[r][: p + 1]).max() / 254
        dv = np.abs(st.v_seq[r][: p + 1]).max() / 254
        ds = HD**-0.5 * np.abs(st.q[t]).sum(-1).max() * dk
        bound = dv + np.expm1(2 * ds) * np.abs(st.v_seq[r][: p + 1]).max()
        assert np.abs(out[t] - want[t]).max() <= bound * 1.01 + 1e-6, t
    # The pages dequantised exactly as the contiguous int8 cache does.
    from hunyuan_jax.model.kv_cache import QuantizedKV

    def deq(xs):  # all rows at once: the quantisation is per token
        x = jnp.asarray(np.concatenate(xs))
        x = np.asarray(QuantizedKV.quantize(x).dequantize(jnp.float32))
        return np.split(x, np.cumsum([len(a) for a in xs])[:-1])

    assert _err(out, st.dense(None, deq(st.k_seq), deq(st.v_seq))) < F32_TOL

    # impl='pallas' cannot take per-token scales: the same xla path serves it, on any platform.
    def program(impl):
        return str(jax.make_jaxpr(lambda q: paged.attend(q, pool, st.batch(), impl=impl))(st.q))

    assert program("pallas") == program("xla")


# ------------------------------------------------------------------------------ CLA
def test_cla_layers_share_pages_of_the_weight_free_key():
    """Two layers of a CLA group with different key-norm weights w read the same pages of
    k_hat = normalize_key(k): attend(w * q, pages(k_hat)) equals the contiguous
    reference_attention(q, RMSNorm_w(k), v) of each layer (per row, AttentionMask.cached)."""
    from hunyuan_jax.model.layers import RMSNorm

    eps = 1e-5
    st = _step(4, seed=7)
    rng = np.random.default_rng(8)
    k_hat = np.asarray(paged.normalize_key(jnp.asarray(np.concatenate(st.k_seq)), eps))
    k_hat = np.split(k_hat, np.cumsum(st.kv_lens[: len(st.rows)])[:-1])
    st_hat = Step.__new__(Step)
    st_hat.__dict__.update(st.__dict__, k_seq=k_hat)
    pool = st_hat.fill(_pool(st, jnp.float32))
    # The contiguous form: row r's keys in batch row r (zero-padded to the longest row), its
    # queries at before + (0..n-1); outputs of the padded queries are ignored.
    r_used, s_max, l_max = len(st.rows), max(n for _, n in st.rows), int(st.kv_lens.max())
    k_dense = np.zeros((r_used, l_max, KVH, HD), np.float32)
    v_dense, q_dense = np.zeros_like(k_dense), np.zeros((r_used, s_max, H, HD), np.float32)
    for r, (before, n) in enumerate(st.rows):
        k_dense[r, : before + n], v_dense[r, : before + n] = st.k_seq[r], st.v_seq[r]
        q_dense[r, :n] = st.q[st.cu_q_lens[r] : st.cu_q_lens[r + 1]]
    mask = AttentionMask.cached(jnp.array([b for b, _ in st.rows]), s_max, l_max)

    def norm_with(w):  # the model's key-norm with weight w
        norm = RMSNorm(HD, eps, jnp.float32)
        norm.weight[...] = w
        return norm

    contiguous = jax.jit(lambda q, k, v, w: reference_attention(q, norm_with(w)(k), v, mask))

    for _layer in range(2):
        w = rng.uniform(0.25, 2.0, HD).astype(np.float32)
        out = np.asarray(attend(jnp.asarray(st.q * w), pool, st.batch()))
        ref = np.asarray(contiguous(q_dense, k_dense, v_dense, w))
        for r, (_, n) in enumerate(st.rows):
            assert _err(out[st.cu_q_lens[r] : st.cu_q_lens[r + 1]], ref[r, :n]) < F32_TOL, r


# ------------------------------------------------------------------------------ Pallas
def test_pallas_kernel_interpreted_on_cpu():
    """jax's ragged paged attention kernel under the Pallas TPU interpreter
    (`pltpu.force_tpu_interpret_mode`; the kernel exposes no `interpret` argument) against
    the xla path. jax 0.10.2's interpreter cannot run this kernel (it reads through a reshaped
    VMEM ref: AttributeError 'ReshapeTransform' object has no attribute 'indices'; the older
    HLO interpreter, forced through the same config, fails on its masked stores): xfail then,
    compared as soon as a jax can."""
    from jax.experimental.pallas import tpu as pltpu

    # head_dim 128: the kernel needs a multiple of 128 (its lane width).
    st = _step(16, seed=9, rows=[(5, 7), (19, 1), (0, 9)], tokens=20, hd=128)
    pool = st.fill(_pool(st, jnp.float32))
    try:
        with pltpu.force_tpu_interpret_mode():
            out = paged.attend(
                jnp.asarray(st.q), pool, st.batch(), impl="pallas",
                num_kv_pages_per_block=2, num_queries_per_block=8,
            )  # fmt: skip
            out = np.asarray(out)
    except Exception as e:  # noqa: BLE001 - whatever the interpreter raises
        if "ReshapeTransform" not in str(e):
            raise  # not the known interpreter limitation: a real failure
        pytest.xfail("jax's Pallas TPU interpreter cannot run ragged_paged_attention")
    assert _err(out, attend(jnp.asarray(st.q), pool, st.batch())) < F32_TOL
    assert _err(out, st.dense()) < F32_TOL


def test_sharded_pallas_layout_on_cpu(monkeypatch):
    """The shard_map around the kernel on a mesh (8 CPU devices, kv heads over tensor=2, the
    rest over expert=4), with the kernel replaced by the xla path on each device's shard: each
    device's query heads meet their own kv heads' K / V pairs, and the result equals the
    unsharded attention. (The kernel itself cannot run on CPU; its sharded compile for TPU is
    `test_pallas_path_compiles_on_a_tpu_mesh`.)"""
    from conftest import make_plan

    calls = []

    def per_device(q, kv, batch, sm_scale, *_):
        calls.append((q.shape, kv.shape))
        return paged._xla(q, PagedKV(kv, None), batch, sm_scale, 32, 256)

    monkeypatch.setattr(paged, "_pallas", per_device)
    plan = make_plan((1, 1, 4, 2), "serve_ep_tp")
    st = _step(16, seed=11, hd=128)
    pool = st.fill(_pool(st, jnp.float32))
    heads = jax.sharding.NamedSharding(plan.mesh, jax.sharding.PartitionSpec(None, None, "tensor"))
    pool = PagedKV(jax.device_put(pool.kv, heads), None)
    fn = jax.jit(lambda q, pool, b: paged.attend(q, pool, b, impl="pallas", plan=plan))
    out = fn(jnp.asarray(st.q), pool, st.batch())
    assert calls == [((len(st.q), H // 2, 128), (pool.kv.shape[0], 16, 2, 128))]  # 1 KV head
    assert out.sharding.spec[:2] == (None, "tensor")
    assert _err(out, st.dense()) < F32_TOL
    # A layout that would split a K/V pair (2 kv heads over tensor=4): refused.
    with pytest.raises(ValueError, match="whole K/V pairs"):
        paged.attend(jnp.asarray(st.q), pool, st.batch(), impl="pallas",
                     plan=make_plan((1, 1, 2, 4), "serve_ep_tp"))  # fmt: skip


def _tpu_devices(topology="v5e:1x1"):
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu not installed: no ahead-of-time TPU compile (pip install libtpu)")
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU chips here to drive
    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:  # noqa: BLE001 - libtpu present but unusable (e.g. busy)
        pytest.skip(f"cannot describe a {topology} topology: {e}")
    return list(desc.devices)


def _tpu_device():
    return _tpu_devices()[0]


def test_pallas_path_compiles_for_tpu():
    """impl='pallas' lowers to jax's ragged paged attention Mosaic kernel and compiles for a v5e
    chip (compile-only device), at Hunyuan-Large's head shape (8 KV heads, head_dim 128, bf16)
    with GQA 4, both with explicit block sizes and with the default (the tuned table needs a
    TPU backend; from a CPU host the kernel's untuned default is used)."""
    dev = _tpu_device()
    t, r, p, ps, pages, kvh, h, d = 64, 8, 16, 16, 128, 8, 32, 128
    s = jax.sharding.SingleDeviceSharding(dev)
    sds = lambda shape, dt=jnp.int32: jax.ShapeDtypeStruct(shape, dt, sharding=s)
    batch = PagedBatch(
        sds((t,)), sds((t,)), sds((t,)), sds((t,), jnp.bool_), sds((r,)), sds((r, p)),
        sds((r + 1,)), sds((1,)),
    )  # fmt: skip
    pool = PagedKV(sds((pages, ps, 2 * kvh, d), jnp.bfloat16), None)
    q = sds((t, h, d), jnp.bfloat16)
    for blocks in ({"num_kv_pages_per_block": 4, "num_queries_per_block": 16}, {}):
        t0 = time.perf_counter()
        with jax.default_device(dev):  # Mosaic lowering reads the target chip from it
            fn = jax.jit(lambda q, pool, b: paged.attend(q, pool, b, impl="pallas", **blocks))
            compiled = fn.lower(q, pool, batch).compile()
        text = compiled.as_text()
        assert text.count("tpu_custom_call") == 1 and "ragged_paged_attention" in text
        assert compiled.output_shardings.device_set == {dev}
        assert time.perf_counter() - t0 < 60
    with pytest.raises(ValueError, match="head_dim % 128"):
        pool = PagedKV.zeros(4, 16, 2, 64, jnp.float32)
        paged.attend(jnp.zeros((4, 8, 64)), pool, batch, impl="pallas")


def _abstract_step(sharding, t, r, p, pages, ps, kvh, h, d, kv_sharding=None, q_sharding=None):
    sds = lambda shape, dt=jnp.int32, s=sharding: jax.ShapeDtypeStruct(shape, dt, sharding=s)
    batch = PagedBatch(
        sds((t,)), sds((t,)), sds((t,)), sds((t,), jnp.bool_), sds((r,)), sds((r, p)),
        sds((r + 1,)), sds((1,)),
    )  # fmt: skip
    pool = PagedKV(sds((pages, ps, 2 * kvh, d), jnp.bfloat16, kv_sharding or sharding), None)
    return sds((t, h, d), jnp.bfloat16, q_sharding or sharding), pool, batch


def test_pallas_path_compiles_on_a_tpu_mesh():
    """On a mesh (v5e:2x4, 8 chips: expert=2, tensor=4, preset serve_ep_tp) impl='pallas' runs
    the kernel per chip under shard_map: one Mosaic call in the compiled program, on each
    chip's 2 of 8 kv heads (4 combined) and 8 of 32 query heads, and no collective at all (the
    pool is never gathered; the output keeps the heads split over tensor)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as PS

    from hunyuan_jax.model import dispatch
    from hunyuan_jax.model.policy import RuntimePolicy
    from sharding.plan import ShardingPlan

    devices = _tpu_devices("v5e:2x4")
    plan = ShardingPlan.create("expert=2,tensor=4", "serve_ep_tp", devices=devices)
    named = lambda *spec: NamedSharding(plan.mesh, PS(*spec))
    q, pool, batch = _abstract_step(
        named(), t=64, r=8, p=16, pages=128, ps=16, kvh=8, h=32, d=128,
        kv_sharding=named(None, None, "tensor", None), q_sharding=named(None, "tensor", None),
    )  # fmt: skip
    t0 = time.perf_counter()
    fn = jax.jit(lambda q, pool, b: paged.attend(q, pool, b, impl="pallas", plan=plan))
    compiled = fn.lower(q, pool, batch).compile()
    text = compiled.as_text()
    assert text.count("tpu_custom_call") == 1 and "ragged_paged_attention" in text
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter"):
        assert op not in text, op
    assert compiled.output_shardings.spec[:2] == (None, "tensor")
    assert "bf16[64,8,128]" in text  # each chip's query block: 8 of the 32 heads
    assert time.perf_counter() - t0 < 60

    # The dispatcher picks the kernel where the kv heads split into whole pairs.
    policy = RuntimePolicy.inference("bfloat16")
    assert dispatch.paged_attention_impl_for(policy, plan, pool) == "pallas"
    assert paged.pallas_unsupported(pool, plan) is None
    for bad_pool, bad_plan, why in [
        (PagedKV.zeros(2, 16, 2, 128, jnp.bfloat16), plan, "whole K/V pairs"),  # 2 kv / 4
        (PagedKV.zeros(2, 16, 8, 64, jnp.bfloat16), plan, "head_dim 64"),
        (PagedKV.zeros(2, 16, 8, 128, jnp.int8), plan, "int8"),
        (
            pool,
            ShardingPlan.create(
                "expert=2,tensor=4", "serve_ep_tp", {"cache_pages": "expert"}, devices=devices
            ),
            "pages are sharded",
        ),  # fmt: skip
    ]:
        assert why in paged.pallas_unsupported(bad_pool, bad_plan)
        assert dispatch.paged_attention_impl_for(policy, bad_plan, bad_pool) == "xla"
    # Off TPU, or when the policy names xla: the plain-JAX path.
    assert dispatch.paged_attention_impl_for(policy.replace(attention="xla"), plan, pool) == "xla"
