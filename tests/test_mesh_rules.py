"""Tests of sharding/mesh.py, sharding/rules.py and sharding/plan.py (8 fake CPU devices; stub
TPU devices)."""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HY_TINY
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from hunyuan_jax.errors import ConfigError
from sharding.mesh import MESH_AXES, MeshConfig, build_mesh
from sharding.plan import ShardingPlan, parse_rule_overrides
from sharding.rules import FSDP, LOGICAL_AXES, PRESETS, get_rules, logical_to_spec

needs8 = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS set after jax was initialised)"
)


# ----------------------------------------------------------------------------- stub devices
@dataclasses.dataclass(eq=False)
class FakeTpu:
    id: int
    coords: tuple
    slice_index: int = 0
    core_on_chip: int = 0
    process_index: int = 0
    platform: str = "tpu"
    device_kind: str = "TPU v4"  # no special-case handler in mesh_utils: generic torus logic

    def __repr__(self):
        return f"FakeTpu({self.id}, s{self.slice_index}, {self.coords})"


def fake_slice(dims, slice_index=0, start_id=0, kind="TPU v4"):
    x, y, z = dims
    devs = []
    for k in range(z):
        for j in range(y):
            for i in range(x):
                devs.append(FakeTpu(start_id + len(devs), (i, j, k), slice_index, device_kind=kind))
    return devs


# ----------------------------------------------------------------------------- MeshConfig
def test_config_forms():
    a = MeshConfig(ici={"fsdp": -1, "expert": 4})
    assert a.ici == (1, -1, 4, 1) and a.dcn == (1, 1, 1, 1)
    assert MeshConfig.parse("data=1,fsdp=-1,expert=4,tensor=1") == a
    assert MeshConfig.parse("fsdp=-1, expert=4") == a
    assert MeshConfig.from_dict({"ici": {"data": 1, "fsdp": -1, "expert": 4, "tensor": 1}}) == a
    assert MeshConfig.from_dict({"fsdp": -1, "expert": 4}) == a
    b = MeshConfig.from_dict({"ici": {"fsdp": -1, "expert": 4}, "dcn": {"data": 2}})
    assert b.dcn == (2, 1, 1, 1) and b.num_slices == 2
    assert MeshConfig.parse("fsdp=-1,expert=4,dcn.data=2") == b
    assert MeshConfig.parse(str(b)) == b
    assert MeshConfig(ici=(1, 8, 1, 1)).ici == (1, 8, 1, 1)


def test_resolve_arithmetic():
    assert MeshConfig.parse("fsdp=-1,expert=4").resolve(256) == ((1, 64, 4, 1), (1, 1, 1, 1))
    # multi-slice: -1 fills devices per slice; axis size is ici * dcn.
    cfg = MeshConfig.parse("fsdp=-1,expert=16,dcn.data=4")
    assert cfg.resolve(1024) == ((1, 16, 16, 1), (4, 1, 1, 1))
    assert cfg.axis_sizes(1024) == {"data": 4, "fsdp": 16, "expert": 16, "tensor": 1}
    assert MeshConfig.parse("expert=2,dcn.fsdp=2,dcn.data=2").axis_sizes(8) == {
        "data": 2,
        "fsdp": 2,
        "expert": 2,
        "tensor": 1,
    }


def test_config_errors():
    with pytest.raises(
        ValueError, match=r"'model'.*known axes.*'data', 'fsdp', 'expert', 'tensor'"
    ):
        MeshConfig(ici={"model": 2})
    with pytest.raises(ValueError, match=r"unknown mesh axis name 'model'"):
        MeshConfig.parse("model=2")
    with pytest.raises(ValueError, match=r"'bogus'"):
        MeshConfig.from_dict({"ici": {"fsdp": -1}, "bogus": 1})
    with pytest.raises(ValueError, match=r"'dtaa'"):
        MeshConfig.from_dict({"ici": {"dtaa": 2}})
    with pytest.raises(ValueError, match=r"at most one.*\['data', 'fsdp'\]"):
        MeshConfig(ici={"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match=r"'expert' must be positive.*got 0"):
        MeshConfig(ici={"expert": 0})
    with pytest.raises(ValueError, match=r"'tensor' must be positive.*got -2"):
        MeshConfig(ici={"tensor": -2})
    with pytest.raises(ValueError, match=r"dcn: size of axis 'data' must be positive.*-1"):
        MeshConfig(dcn={"data": -1})
    with pytest.raises(ValueError, match=r"'fsdp' must be an integer"):
        MeshConfig.parse("fsdp=x")
    with pytest.raises(ValueError, match=r"'fsdp' given twice"):
        MeshConfig.parse("fsdp=2,fsdp=4")
    with pytest.raises(
        ValueError, match=r"data=2,fsdp=2,expert=1,tensor=1.*is 4.*8 devices per slice"
    ):
        MeshConfig(ici={"data": 2, "fsdp": 2}).resolve(8)
    with pytest.raises(ValueError, match=r"auto-fill fsdp=-1.*product 3.*8 devices per slice"):
        MeshConfig(ici={"fsdp": -1, "expert": 3}).resolve(8)
    with pytest.raises(ValueError, match=r"8 devices cannot be split into 3 slices"):
        MeshConfig(ici={"fsdp": -1}, dcn={"data": 3}).resolve(8)
    with pytest.raises(TypeError):
        MeshConfig.coerce(3)


# ----------------------------------------------------------------------------- build_mesh
@needs8
@pytest.mark.parametrize("sizes", [(8, 1, 1, 1), (1, 8, 1, 1), (2, 1, 4, 1), (1, 2, 2, 2)])
def test_build_mesh_shapes(sizes):
    mesh = build_mesh(MeshConfig(ici=sizes))
    assert mesh.axis_names == MESH_AXES
    assert tuple(mesh.devices.shape) == sizes
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@needs8
def test_build_mesh_autofill_and_forms():
    assert dict(build_mesh("fsdp=-1,expert=2").shape) == {
        "data": 1,
        "fsdp": 4,
        "expert": 2,
        "tensor": 1,
    }
    assert dict(build_mesh({"ici": {"data": 2, "fsdp": -1}}).shape)["fsdp"] == 4
    # any device subset works (and jax.devices() is not consulted)
    m = build_mesh("fsdp=-1", devices=jax.devices()[:4])
    assert m.devices.shape == (1, 4, 1, 1)


@needs8
def test_build_mesh_errors_name_sizes_and_count():
    with pytest.raises(ValueError, match=r"data=2,fsdp=2,expert=1,tensor=1.*is 4.*8 devices"):
        build_mesh(MeshConfig(ici={"data": 2, "fsdp": 2}))


@needs8
def test_multi_slice_cpu_fallback():
    # CPU devices have no slice_index: consecutive groups of devices play the slices.
    devs = jax.devices()
    mesh = build_mesh("fsdp=-1,dcn.data=2", devices=devs)
    assert mesh.devices.shape == (2, 4, 1, 1)
    assert [d.id for d in mesh.devices[0].flat] == [d.id for d in devs[:4]]
    assert [d.id for d in mesh.devices[1].flat] == [d.id for d in devs[4:]]
    mesh = build_mesh("fsdp=2,expert=-1,dcn.fsdp=2", devices=devs)
    assert mesh.devices.shape == (1, 4, 2, 1)
    ids0 = {d.id for d in devs[:4]}
    assert {d.id for d in mesh.devices[0, :2].flat} == ids0  # slice 0 = first half of fsdp


def test_multi_slice_hybrid_with_stub_tpus():
    devs = fake_slice((2, 2, 1), 0, 0) + fake_slice((2, 2, 1), 1, 4)
    devs = devs[::-1]  # order must not matter: slices are found by slice_index
    mesh = build_mesh("fsdp=-1,expert=2,dcn.data=2", devices=devs)
    assert mesh.devices.shape == (2, 2, 2, 1)
    assert {d.slice_index for d in mesh.devices[0].flat} == {0}
    assert {d.slice_index for d in mesh.devices[1].flat} == {1}
    mesh = build_mesh("fsdp=2,expert=-1,dcn.fsdp=2", devices=devs)
    assert mesh.devices.shape == (1, 4, 2, 1)
    assert {d.slice_index for d in mesh.devices[0, :2].flat} == {0}
    assert {d.slice_index for d in mesh.devices[0, 2:].flat} == {1}
    # errors: wrong slice count; several slices but dcn all 1
    with pytest.raises(ValueError, match=r"ask for 4 slices.*span 2 slice"):
        build_mesh("fsdp=-1,dcn.data=4", devices=devs)
    with pytest.raises(ValueError, match=r"span 2 slices.*dcn"):
        build_mesh("fsdp=-1", devices=devs)


def test_v5p_256_topology_stub():
    devs = fake_slice((4, 8, 8), kind="TPU v5p")
    mesh = build_mesh("fsdp=-1,expert=4", devices=devs)  # 4 and 8x8 are whole physical axes
    assert mesh.devices.shape == (1, 64, 4, 1)
    # topology-aware, not a plain reshape: each 'expert' group is one physical x-ring
    for grp in mesh.devices[0, :, :, 0]:
        assert sorted(d.coords[0] for d in grp) == [0, 1, 2, 3]
        assert len({d.coords[1:] for d in grp}) == 1
    # expert=16 is no product of whole axes of 4x8x8: needs a split physical axis
    mesh = build_mesh("fsdp=-1,expert=16", devices=devs)
    assert mesh.devices.shape == (1, 16, 16, 1)
    assert len({d.id for d in mesh.devices.flat}) == 256
    with pytest.raises(ValueError, match=r"allow_split_physical_axes"):
        build_mesh(
            MeshConfig(ici={"fsdp": -1, "expert": 16}, allow_split_physical_axes=False),
            devices=devs,
        )


# ----------------------------------------------------------------------------- rules
class _M:  # stand-in for a Mesh: only .shape is used
    def __init__(self, **sizes):
        self.shape = {a: sizes.get(a, 1) for a in MESH_AXES}


def test_presets_cover_all_logical_axes():
    for name, rules in PRESETS.items():
        assert sorted(k for k, _ in rules) == sorted(LOGICAL_AXES), name
        get_rules(rules)  # valid


def test_logical_to_spec_presets():
    exp_w = ("layers", "exp", "exp_embed", "exp_mlp")
    dense = ("embed", "heads", "head_dim")
    assert logical_to_spec(exp_w, "fsdp_ep_tp") == P(None, "expert", "fsdp", "tensor")
    assert logical_to_spec(dense, "fsdp_ep_tp") == P(("fsdp", "expert"), "tensor", None)
    assert logical_to_spec(exp_w, "fsdp_ep") == P(None, "expert", "fsdp", None)
    assert logical_to_spec(dense, "fsdp_ep") == P(("fsdp", "expert"), None, None)
    assert logical_to_spec(exp_w, "fsdp") == P(None, None, "fsdp", None)
    assert logical_to_spec(dense, "fsdp") == P("fsdp", None, None)
    assert logical_to_spec(("vocab", "embed"), "fsdp_ep_tp") == P("tensor", ("fsdp", "expert"))
    assert logical_to_spec(("layers", "norm"), "fsdp_ep_tp") == P(None, None)
    assert logical_to_spec(("embed", "router"), "fsdp_ep") == P(("fsdp", "expert"), None)
    assert logical_to_spec(("batch", "length", "act_embed"), "fsdp_ep_tp") == P(
        ("data", "fsdp", "expert"), None, None
    )
    assert logical_to_spec(("batch", "length", "act_embed"), "fsdp") == P(
        ("data", "fsdp"), None, None
    )
    assert logical_to_spec(("batch", "length", "act_vocab"), "fsdp_ep_tp") == P(
        ("data", "fsdp", "expert"), None, "tensor"
    )
    # dispatched expert activations: 'expert' goes to the expert dim, the batch keeps the rest
    assert logical_to_spec(("act_exp", "batch", "act_embed"), "fsdp_ep") == P(
        "expert", ("data", "fsdp"), None
    )
    assert logical_to_spec(("batch", "act_exp"), "fsdp_ep") == P(("data", "fsdp", "expert"), None)
    assert logical_to_spec(
        ("cache_layers", "cache_batch", "cache_length", "cache_kv_heads", "head_dim"), "fsdp_ep_tp"
    ) == P(None, ("data", "fsdp", "expert"), None, "tensor", None)
    assert logical_to_spec(("batch", "length", "act_embed"), "serve_ep_tp") == P(
        "data", None, ("fsdp", "expert")
    )
    assert logical_to_spec((None, "embed"), "fsdp") == P(None, "fsdp")
    assert logical_to_spec((), "fsdp") == P()


def test_never_names_an_axis_twice():
    rules = (("a", ("fsdp", "expert")), ("b", ("expert", "tensor")), ("c", "fsdp"))
    assert logical_to_spec(("a", "b", "c"), rules) == P(("fsdp", "expert"), "tensor", None)
    assert logical_to_spec(("c", "a"), rules) == P("fsdp", "expert")


def test_size_one_axes_dropped_with_mesh():
    mesh = _M(fsdp=8)
    assert logical_to_spec(("embed", "heads"), "fsdp_ep_tp", mesh=mesh) == P("fsdp", None)
    assert logical_to_spec(("batch", "act_embed"), "fsdp_ep_tp", mesh=mesh) == P("fsdp", None)
    assert logical_to_spec(
        ("layers", "exp", "exp_embed", "exp_mlp"), "fsdp_ep_tp", mesh=_M(expert=2, tensor=2)
    ) == P(None, "expert", None, "tensor")


def test_divisibility_error_names_everything():
    with pytest.raises(ValueError) as e:
        logical_to_spec(
            ("layers", "embed", "heads"),
            "fsdp_ep_tp",
            mesh=_M(fsdp=4, expert=2),
            shape=(2, 12, 16),
            name="layers.attn.q.kernel",
        )
    msg = str(e.value)
    for part in (
        "layers.attn.q.kernel",
        "dim 1",
        "'embed'",
        "size 12",
        "('fsdp', 'expert')",
        "= 8",
    ):
        assert part in msg, (part, msg)
    with pytest.raises(ValueError, match=r"'w'.*2 names.*3 dims"):
        logical_to_spec(("embed", "mlp"), "fsdp", mesh=_M(fsdp=2), shape=(2, 2, 2), name="w")


def test_rules_errors():
    with pytest.raises(ValueError, match=r"unknown logical axis name 'embd'.*'w'"):
        logical_to_spec(("embd",), "fsdp", name="w")
    with pytest.raises(ValueError, match=r"unknown sharding preset 'tp'"):
        get_rules("tp")
    with pytest.raises(ValueError, match=r"'model'.*known axes"):
        logical_to_spec(("x",), (("x", "model"),))
    with pytest.raises(ValueError, match=r"'x' appears more than once"):
        logical_to_spec(("x",), (("x", "fsdp"), ("x", "data")))
    with pytest.raises(ValueError, match=r"unknown logical axis name\(s\) \['lenght'\]"):
        get_rules("fsdp", {"lenght": "fsdp"})
    with pytest.raises(ValueError, match=r"string"):
        logical_to_spec("embed", "fsdp")
    with pytest.raises(ValueError, match=r"'data'.*not in the mesh"):
        logical_to_spec(("batch",), "fsdp", mesh=type("M", (), {"shape": {"fsdp": 2}})())


def test_overrides():
    r = get_rules("fsdp_ep", {"length": "tensor"})
    assert logical_to_spec(("batch", "length"), r) == P(("data", "fsdp", "expert"), "tensor")


@needs8
def test_unused_mesh_axes():
    unused = lambda mesh, rules: ShardingPlan.create(mesh, rules).unused_mesh_axes()
    assert unused("fsdp=4,expert=2", "fsdp") == ["expert"]
    assert unused("fsdp=4,expert=2", "fsdp_ep") == []
    assert unused("fsdp=4,tensor=2", "fsdp_ep") == ["tensor"]
    assert ShardingPlan.single().unused_mesh_axes() == []


# ----------------------------------------------------------------------------- nnx state
class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Param(init(rngs.params(), (64, 16)), logical_axes=("vocab", "embed"))
        self.wq = nnx.Param(
            init(rngs.params(), (2, 16, 4, 8)),
            logical_axes=("layers", "embed", "heads", "head_dim"),
        )
        self.experts = nnx.Param(
            init(rngs.params(), (2, 4, 16, 32)),
            logical_axes=("layers", "exp", "exp_embed", "exp_mlp"),
        )
        self.norm = nnx.Param(jnp.ones((16,)), logical_axes=("norm",))
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))  # scalar, no logical_axes


@needs8
def test_state_shardings_nnx():
    mesh = build_mesh("fsdp=2,expert=2,tensor=2")
    plan = ShardingPlan.create(mesh, "fsdp_ep_tp")
    assert plan.mesh is mesh
    abstract = nnx.eval_shape(lambda: Tiny(nnx.Rngs(0)))
    state = nnx.state(abstract)
    specs = plan.state_specs(state)
    assert isinstance(specs["embed"], nnx.Param)
    assert specs["embed"].get_value() == P("tensor", ("fsdp", "expert"))
    assert specs["embed"].get_metadata("logical_axes") == ("vocab", "embed")
    assert specs["wq"].get_value() == P(None, ("fsdp", "expert"), "tensor", None)
    assert specs["experts"].get_value() == P(None, "expert", "fsdp", "tensor")
    assert specs["norm"].get_value() == P(None)
    assert specs["count"].get_value() == P()

    shardings = plan.state_shardings(state)
    s = shardings["experts"].get_value()
    assert isinstance(s, NamedSharding) and s.mesh == mesh
    assert s.spec == P(None, "expert", "fsdp", "tensor")

    # the shardings are usable: create the sharded model with jit out_shardings
    graphdef, _ = nnx.split(abstract)
    out_sh = jax.tree.map(
        lambda v: v.get_value(), shardings, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    state_pure = jax.jit(
        lambda: jax.tree.map(
            lambda v: v.get_value(),
            nnx.state(Tiny(nnx.Rngs(0))),
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        ),
        out_shardings=out_sh,
    )()
    assert state_pure["experts"].sharding.spec == P(None, "expert", "fsdp", "tensor")
    assert state_pure["experts"].addressable_shards[0].data.shape == (2, 2, 8, 16)
    del graphdef


@needs8
def test_state_errors_name_the_path():
    class Bad(nnx.Module):
        def __init__(self):
            self.block = nnx.Dict(
                w=nnx.Param(jnp.zeros((3, 16)), logical_axes=("embed", "mlp")),
                v=nnx.Param(jnp.zeros((4, 4))),
            )

    plan = ShardingPlan.create("fsdp=-1", "fsdp")
    state = nnx.state(nnx.eval_shape(Bad))
    with pytest.raises(ValueError, match=r"'block\.(v|w)'"):
        plan.state_shardings(state)
    with pytest.raises(ValueError, match=r"'block\.v' of shape \(4, 4\) has no logical_axes"):
        plan.state_specs(nnx.State({"block": {"v": state["block"]["v"]}}))
    with pytest.raises(ValueError, match=r"block\.w.*dim 0.*'embed'.*size 3.*8"):
        plan.state_specs(nnx.State({"block": {"w": state["block"]["w"]}}))


# ----------------------------------------------------------------------------- constrain
def test_constrain_identity_without_mesh():
    x = jnp.ones((4, 8))
    for rules in ("fsdp", "fsdp_ep_tp"):
        plan = ShardingPlan.single(rules)
        assert not plan.is_sharded and plan.num_devices == 1
        assert plan.constrain(x, ("batch", "act_embed")) is x
        assert plan.activation_spec(("batch", "act_embed"), x.shape) == P()
        with pytest.raises(ValueError, match=r"'bach'"):  # wrong names fail without a mesh too
            plan.constrain(x, ("bach", "act_embed"))
        with pytest.raises(ValueError, match=r"2 names.*\(4, 8, 1\)"):
            plan.constrain(x[..., None], ("batch", "act_embed"))


@needs8
def test_constrain_under_mesh():
    plan = ShardingPlan.create("data=2,fsdp=2,tensor=2", "fsdp_ep_tp")

    @jax.jit
    def f(x):
        return plan.constrain(x * 2, ("batch", "act_mlp"))

    y = f(jnp.ones((8, 16)))  # no jax.set_mesh: the constraint carries its NamedSharding
    assert logical_to_spec(("batch", "act_mlp"), "fsdp_ep_tp") == P(
        ("data", "fsdp", "expert"), "tensor"
    )
    spec = plan.activation_spec(("batch", "act_mlp"), (8, 16))
    assert spec == P(("data", "fsdp"), "tensor")  # size-1 'expert' dropped under the mesh
    assert y.sharding.spec == P(("data", "fsdp"), "tensor")
    assert y.sharding.mesh == plan.mesh
    np.testing.assert_array_equal(np.asarray(y), 2.0)


# ----------------------------------------------------------------------------- shape-aware
@needs8
def test_activation_spec_drops_axes_that_do_not_divide_from_the_right():
    plan = ShardingPlan.create("data=2,expert=4", "fsdp_ep")  # batch -> (data, fsdp, expert)
    spec = lambda *shape: plan.activation_spec(("batch", "length", "act_embed"), shape)
    assert spec(8, 24, 96) == P(("data", "expert"), None, None)  # size-1 fsdp dropped
    assert spec(16, 24, 96) == P(("data", "expert"), None, None)
    assert spec(4, 24, 96) == P("data", None, None)  # 4 % 8: 'expert' dropped, data=2 kept
    assert spec(2, 24, 96) == P("data", None, None)
    assert spec(6, 24, 96) == P("data", None, None)
    assert spec(1, 24, 96) == P(None, None, None)
    assert spec(3, 24, 96) == P(None, None, None)
    # From the right only: data=4 does not divide 2, so nothing is kept even though
    # 'expert' alone (2) would divide it.
    plan = ShardingPlan.create("data=4,expert=2", "fsdp_ep")
    assert plan.activation_spec(("batch", "act_embed"), (2, 8)) == P(None, None)
    assert plan.activation_spec(("batch", "act_embed"), (4, 8)) == P("data", None)
    assert plan.activation_spec(("batch", "act_embed"), (8, 8)) == P(("data", "expert"), None)
    # Every dimension on its own: vocab over 'tensor' only when it divides.
    plan = ShardingPlan.create("fsdp=2,expert=2,tensor=2", "fsdp_ep_tp")
    logits = ("batch", "length", "act_vocab")
    assert plan.activation_spec(logits, (4, 3, 6)) == P(("fsdp", "expert"), None, "tensor")
    assert plan.activation_spec(logits, (2, 3, 5)) == P("fsdp", None, None)
    # Parameters are not shape-aware: an indivisible dimension is an error naming it.
    with pytest.raises(ValueError, match=r"w: dim 1 \(logical 'vocab'\) has size 5"):
        plan.spec(("embed", "vocab"), (8, 5), name="w")
    # An activation spec never fails on shape; a parameter spec on a divisible shape is the
    # same as the activation spec.
    assert plan.spec(logits, (4, 3, 6)) == plan.activation_spec(logits, (4, 3, 6))


@needs8
def test_constrain_is_shape_aware():
    """A batch of 2 on data=2 x expert=4 is split over 'data' only, not padded."""
    plan = ShardingPlan.create("data=2,expert=4", "fsdp_ep")
    axes = ("batch", "length", "act_embed")
    f = jax.jit(lambda x: plan.constrain(x + 1, axes))
    same = lambda y, spec: y.sharding.is_equivalent_to(NamedSharding(plan.mesh, spec), y.ndim)
    y = f(jnp.zeros((2, 5, 8)))
    assert same(y, P("data", None, None)), y.sharding
    assert y.addressable_shards[0].data.shape == (1, 5, 8)  # 2 rows over data=2; expert copies
    y = f(jnp.zeros((8, 5, 8)))
    assert same(y, P(("data", "expert"), None, None)), y.sharding
    assert y.addressable_shards[0].data.shape == (1, 5, 8)  # 8 rows over data x expert
    np.testing.assert_array_equal(np.asarray(y), 1.0)


# ----------------------------------------------------------------------------- the plan
@needs8
def test_plan_queries():
    plan = ShardingPlan.create("data=2,expert=4", "fsdp_ep")
    assert plan.is_sharded and plan.num_devices == 8 and plan.platform == "cpu"
    assert len(plan.devices) == 8
    assert plan.mesh_axes("exp") == ("expert",) and plan.size("exp") == 4
    assert plan.mesh_axes("batch") == ("data", "expert")  # size-1 'fsdp' left out
    assert plan.size("batch") == 8
    assert plan.mesh_axes("vocab") == () and plan.size("vocab") == 1
    assert plan.shards("exp") and not plan.shards("vocab") and not plan.shards("exp_mlp")
    assert "expert" in plan.describe() and "fsdp_ep" in plan.describe()
    with pytest.raises(ValueError, match=r"unknown logical axis name 'expp'"):
        plan.mesh_axes("expp")
    # A mesh smaller than the devices uses the first ones.
    small = ShardingPlan.create("fsdp=4", "fsdp")
    assert small.num_devices == 4 and small.devices == jax.devices()[:4]
    one = ShardingPlan.single()
    assert not one.is_sharded and one.describe() == "one device"
    assert one.mesh_axes("exp") == () and not one.shards("batch")
    assert one.rules == FSDP
    # Shardings of inputs: shape-aware for activations; replicated.
    assert plan.sharding(("batch", None), (2, 7)).spec == P("data", None)
    assert plan.sharding(("batch", None), (8, 7)).spec == P(("data", "expert"), None)
    assert plan.replicated().spec == P()
    assert isinstance(one.sharding(("batch", None), (2, 7)), jax.sharding.SingleDeviceSharding)
    # The plan is frozen: one object answers every question, nobody mutates it.
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.rules = FSDP


def test_parse_rule_overrides():
    assert parse_rule_overrides([]) == {}
    assert parse_rule_overrides(
        ["cache_length=expert", "cache_batch=data+expert", "vocab=none", "embed=fsdp,expert"]
    ) == {
        "cache_length": "expert",
        "cache_batch": ("data", "expert"),
        "vocab": None,
        "embed": ("fsdp", "expert"),
    }
    assert parse_rule_overrides(["batch="]) == {"batch": None}
    for bad in ("cache_length", "=expert", " =expert"):
        with pytest.raises(ValueError, match=r"LOGICAL=AXIS"):
            parse_rule_overrides([bad])


@needs8
def test_plan_from_flags():
    plan = ShardingPlan.from_flags(
        "data=2,expert=4", "fsdp_ep", ["cache_length=expert", "vocab=none", "batch=data"]
    )
    assert dict(plan.mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    table = dict(plan.rules)
    assert table["cache_length"] == "expert" and table["vocab"] is None
    assert table["batch"] == "data"
    assert table["exp"] == "expert"  # the preset's other rules are kept
    assert plan.rules == get_rules(
        "fsdp_ep", {"cache_length": "expert", "vocab": None, "batch": "data"}
    )
    assert plan.activation_spec(("batch", "cache_length"), (8, 8)) == P("data", "expert")
    assert "fsdp_ep" in plan.label and "cache_length=expert" in plan.label
    # Defaults: no --rules gives `default_rules`; no --mesh gives one device.
    assert ShardingPlan.from_flags("fsdp=-1", None).rules == FSDP
    assert ShardingPlan.from_flags("fsdp=-1", None, default_rules="fsdp_ep").rules == (
        get_rules("fsdp_ep")
    )
    single = ShardingPlan.from_flags(None, "fsdp_ep_tp")
    assert not single.is_sharded and single.rules == get_rules("fsdp_ep_tp")
    # Errors name what is wrong.
    with pytest.raises(ValueError, match=r"unknown logical axis name\(s\) \['lenght'\]"):
        ShardingPlan.from_flags("fsdp=-1", "fsdp", ["lenght=fsdp"])
    with pytest.raises(ValueError, match=r"'model'.*known axes"):
        ShardingPlan.from_flags("fsdp=-1", "fsdp", ["length=model"])
    with pytest.raises(ValueError, match=r"unknown sharding preset 'tp'"):
        ShardingPlan.from_flags("fsdp=-1", "tp")
    with pytest.raises(ValueError, match=r"unknown mesh axis name 'model'"):
        ShardingPlan.from_flags("model=8", "fsdp")


# ----------------------------------------------------------------------------- mesh vs model
HY_TINY_ST = HY_TINY / "hf_st"
REPO = Path(__file__).resolve().parent.parent


@needs8
def test_mesh_larger_than_the_devices_is_a_config_error():
    """Sizes multiplying to more devices than there are: ConfigError (exit 2) naming the mesh,
    the axes and what fits; on CPU, the --devices flag that simulates them."""
    with pytest.raises(ConfigError) as e:
        ShardingPlan.create("data=2,expert=8", "fsdp_ep")
    msg = str(e.value)
    for part in ("needs 16 devices", "data=2 x expert=8", "8 cpu devices", "multiply to 8"):
        assert part in msg, (part, msg)
    assert "--devices 16" in msg
    with pytest.raises(ConfigError, match=r"product of ici sizes .* is 3, but there are 8"):
        ShardingPlan.create("data=3", "fsdp", devices=jax.devices())
    with pytest.raises(ConfigError, match=r"unknown mesh axis name 'model'"):
        ShardingPlan.create("model=2", "fsdp")  # every bad description: ConfigError (exit 2)


@needs8
def test_mesh_that_does_not_divide_the_model_names_axis_size_and_fits():
    """`--mesh data=1,tensor=8` on the tiny model (4 KV heads): the axis, its size, the
    parameter dimension and the sizes that would fit, plus a whole mesh that does; from
    `check_fits` and from `state_shardings` (every loader), before any array exists."""
    from hunyuan_jax.model.config import ModelConfig
    from hunyuan_jax.model.state import abstract_model, check_fits

    cfg = ModelConfig.from_hf(HY_TINY_ST)
    plan = ShardingPlan.create("data=1,tensor=8", "serve_ep_tp")
    with pytest.raises(ConfigError) as e:
        check_fits(plan, cfg)
    msg = str(e.value)
    for part in ("tensor=8 does not divide kv_heads", "size 4", "attn.k_proj", "serve_ep_tp"):
        assert part in msg, (part, msg)
    assert "tensor sizes that fit: 1, 2, 4 (e.g. mesh data=2,tensor=4)" in msg, msg
    # The suggested mesh does fit; so does every size listed.
    check_fits(ShardingPlan.create("data=2,tensor=4", "serve_ep_tp"), cfg)
    # The loaders' path (state_shardings) says the same.
    abstract = nnx.state(abstract_model(cfg, None, ShardingPlan.single("serve_ep_tp")))
    with pytest.raises(ConfigError, match="tensor=8 does not divide kv_heads"):
        plan.state_shardings(abstract)
    # Expert parallelism over more shards than experts: no size of 'expert' above 8 fits.
    with pytest.raises(ConfigError, match=r"expert=4 does not divide exp \(size 6"):
        check_fits(ShardingPlan.create("data=2,expert=4", "fsdp_ep"), cfg.replace(num_experts=6))
    check_fits(ShardingPlan.single(), cfg)  # no mesh: nothing to check


def _cli(*argv, env=None):
    return subprocess.Popen(
        [sys.executable, *map(str, argv)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_entry_points_refuse_a_mesh_in_one_line(tmp_path):
    """As processes, all at once: the README's train.py synopsis without --devices (the tiny
    mesh needs 8; exit 2, no run directory left), and `--mesh data=1,tensor=8` on the tiny
    model in infer.py and the server (exit 2, one line naming kv_heads, no traceback)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", HUNYUAN_JAX_NO_REEXEC="1")
    run = tmp_path / "R"
    tok = REPO / "hunyuan_jax" / "assets" / "default_model" / "tokenizer.model"
    mesh = ["--mesh", "data=1,tensor=8", "--devices", "8", "--tokenizer", tok]
    procs = {
        "train": _cli("train.py", "--config", "configs/tiny.yaml", "--run-dir", run, env=env),
        "infer": _cli("infer.py", "--checkpoint", HY_TINY_ST, "--prompt", "x", *mesh, env=env),
        "serve": _cli(
            "-m", "hunyuan_jax.cli.serve", "--checkpoint", HY_TINY_ST, "--port", "1", *mesh, env=env
        ),
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
        if name == "train":
            assert "needs 8 devices" in err and "--devices 8" in err, err
        else:
            assert "tensor=8 does not divide kv_heads (size 4" in err, err
    assert not run.exists()
