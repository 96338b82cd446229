"""The communication model of the AOT tool (`hunyuan_jax.aot.collectives`): every collective of
a compiled program, counted per execution (loop bodies times their trip count), as the bytes
one chip sends, checked against hand-computed ring-algorithm counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from hunyuan_jax.aot import collectives as C
from hunyuan_jax.aot import topology

N = 8  # simulated devices (conftest)
ROWS, COLS = 16, 32  # per-chip f32 block: 2048 bytes
BLOCK = ROWS * COLS * 4
TRIPS = 5


def _compiled_text():
    mesh = Mesh(np.array(jax.devices()[:N]), ("x",))

    def per_chip(a, b, c, d, e):
        gathered = jax.lax.all_gather(a, "x", tiled=True)  # [N*ROWS, COLS]
        summed = jax.lax.psum(b, "x")
        scattered = jax.lax.psum_scatter(c, "x", scatter_dimension=0, tiled=True)
        swapped = jax.lax.all_to_all(d, "x", 0, 0, tiled=True)
        shifted = jax.lax.ppermute(e, "x", [(i, (i + 1) % N) for i in range(N)])

        def body(_, carry):  # one all-reduce per iteration, not hoistable (carry-dependent)
            return jax.lax.psum(carry * 1.5, "x")

        looped = jax.lax.fori_loop(0, TRIPS, body, e)
        return gathered, summed, scattered, swapped, shifted, looped

    spec = P("x")
    f = jax.jit(
        jax.shard_map(
            per_chip,
            mesh=mesh,
            in_specs=(spec,) * 5,
            out_specs=(P(), spec, spec, spec, spec, spec),
            check_vma=False,
        )
    )
    x = jax.ShapeDtypeStruct((N * ROWS, COLS), jnp.float32)
    return f.lower(x, x, x, x, x).compile().as_text()


def test_bytes_per_chip_match_hand_counts():
    r = C.collective_bytes(_compiled_text(), N)
    ring = (N - 1) / N
    expected = {
        "all-gather": (1, N * BLOCK * ring),  # the gathered 16 KiB, 7/8 of it from others
        "reduce-scatter": (1, BLOCK / N * (N - 1)),  # the 256-byte shard, 7 partial sums
        "all-to-all": (1, BLOCK * ring),
        "collective-permute": (1, BLOCK),
        # one psum outside, five inside the loop (trip count from the compiled while)
        "all-reduce": (1 + TRIPS, (1 + TRIPS) * 2 * BLOCK * ring),
    }
    assert r["unknown_trip_counts"] == []
    assert TRIPS in r["loops"].values()
    for op, (count, sent) in expected.items():
        assert r["by_op"][op]["count"] == count, op
        assert r["by_op"][op]["bytes"] == pytest.approx(sent, rel=1e-9), op
    assert r["total_bytes"] == pytest.approx(sum(s for _, s in expected.values()), rel=1e-9)
    assert r["by_group"] == {N: pytest.approx(r["total_bytes"])}


@pytest.mark.parametrize(
    "attrs, n",
    [
        ("replica_groups={{0,4},{1,5},{2,6},{3,7}}, dimensions={1}", 2),
        ("replica_groups=[16,4]<=[64], dimensions={0}", 4),
        ("replica_groups=[2,32]<=[4,16]T(1,0), dimensions={0}", 32),
        ("replica_groups=mesh['axis_0'=8,'axis_1'=2,'axis_2'=4] {'axis_0','axis_2'}", 32),
        ("replica_groups={}, to_apply=%add", 64),
    ],
)
def test_group_sizes(attrs, n):
    assert C.group_size(attrs, 64) == n


def test_async_forms_and_unknown_loops():
    """TPU HLO: `-start` ops (results are (operand, output) tuples), `-done` moves nothing;
    a while without a known trip count is counted once and named."""
    hlo = """HloModule m

%cond (p: (s32[])) -> pred[] {
  %p = (s32[]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %lim = s32[] parameter(1)
  ROOT %lt = pred[] compare(%i, %lim), direction=LT
}

%body (q: (s32[])) -> (s32[]) {
  %q = (s32[]) parameter(0)
  %ags = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(%x), replica_groups=[2,4]<=[8], dimensions={0}
  %agd = bf16[16,8]{1,0} all-gather-done(%ags)
  ROOT %t = (s32[]) tuple(%i)
}

ENTRY %main (a: f32[8,8]) -> f32[8,8] {
  %a = f32[8,8]{1,0} parameter(0)
  %ars = f32[8,8]{1,0} all-reduce-start(%a), replica_groups={{0,1}}, to_apply=%add
  %ard = f32[8,8]{1,0} all-reduce-done(%ars)
  %cps = (f32[8,8]{1,0}, f32[8,8]{1,0}, u32[], u32[]) collective-permute-start(%a), source_target_pairs={{0,1},{1,0}}
  %w = (s32[]) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[8,8]{1,0} copy(%ard)
}
"""
    r = C.collective_bytes(hlo, 8)
    assert r["by_op"]["all-gather"]["bytes"] == 16 * 8 * 2 * 3 / 4  # output part, once
    assert r["by_op"]["all-reduce"]["bytes"] == 8 * 8 * 4 * 2 * 1 / 2
    assert r["by_op"]["collective-permute"]["bytes"] == 8 * 8 * 4
    assert r["unknown_trip_counts"] == ["w"]


def test_ici_time_uses_the_chip_table():
    v5p = topology.CHIPS["v5p"]
    assert v5p.ici_bytes_per_s == pytest.approx(4800e9 / 8)
    hlo = _compiled_text()
    m = C.comm_model(hlo, N, v5p)
    assert m["ici_time_s"] == pytest.approx(m["total_bytes"] / 600e9)
    assert m["ici_time_one_axis_s"] == pytest.approx(m["ici_time_s"] * 3)


def test_chunked_loss_gathers_the_head_once():
    """The tied LM head is gathered once per step, not once per loss chunk: the tiny train step
    on fsdp=2 x expert=4 with 4 loss chunks gathers the [1024, 96] table once (XLA shares the
    lookup's gather with the head's; made inside the chunk it ran 1 + 4 times)."""
    from hunyuan_jax.aot.programs import build
    from hunyuan_jax.cli.aot import build_parser, resolve

    argv = ["--config", "configs/tiny.yaml", "--topology", "local", "--mode", "train"]
    argv += ["--mesh", "fsdp=2,expert=4", "--rules", "fsdp_ep", "--seq", "32"]
    job = resolve(build_parser().parse_args(argv + ["--set", "runtime.loss_chunk=8"]))[0]
    text = build(job).lower().compile().as_text()
    r = C.collective_bytes(text, N)
    assert 4 in r["loops"].values()  # the loss-chunk scan: 32 / 8
    table = [row for row in r["rows"] if row[1] == "all-gather" and "[1024,96]" in row[2]]
    assert sum(row[4] for row in table) == 1
