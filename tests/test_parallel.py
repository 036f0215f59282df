"""Mesh construction and logical-axis shardings of parameters and optimizer state."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest
from jax.sharding import PartitionSpec as P

from cacophony_jax.parallel import mesh as mesh_lib
from cacophony_jax.parallel import partition

RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", None), ("vocab", "data"))


def mesh_cfg(data, fsdp):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))


def test_mesh_shape_resolves_minus_one_and_rejects_misfits():
    assert mesh_lib.mesh_shape(mesh_cfg(-1, 4), 8) == (2, 4)
    assert mesh_lib.mesh_shape(mesh_cfg(8, -1), 8) == (8, 1)
    with pytest.raises(mesh_lib.MeshError, match="does not divide"):
        mesh_lib.mesh_shape(mesh_cfg(-1, 3), 8)
    with pytest.raises(mesh_lib.MeshError, match="set one of them to -1"):
        mesh_lib.mesh_shape(mesh_cfg(2, 2), 8)


def test_mesh_has_auto_axes_over_all_devices():
    mesh = mesh_lib.make_mesh(mesh_cfg(-1, 2))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert mesh_lib.batch_divisor(mesh) == 8


def test_mesh_uses_the_devices_it_is_given():
    backwards = jax.devices()[::-1]
    mesh = mesh_lib.make_mesh(mesh_cfg(1, -1), backwards)
    assert list(mesh.devices.flat) == backwards
    subset = mesh_lib.make_mesh(mesh_cfg(1, -1), jax.devices()[2:6])
    assert list(subset.devices.flat) == jax.devices()[2:6]


def test_spec_for_maps_names_and_keeps_uneven_dims_replicated():
    mesh = mesh_lib.make_mesh(mesh_cfg(2, 4))
    assert partition.spec_for((16, 32), ("embed", "mlp"), mesh, RULES) == P("fsdp", None)
    assert partition.spec_for((10, 32), ("embed", "mlp"), mesh, RULES) == P(None, None)
    assert partition.spec_for((6, 16), ("vocab", "embed"), mesh, RULES) == P("data", "fsdp")
    # One mesh axis is used at most once per array.
    assert partition.spec_for((8, 8), ("embed", "embed"), mesh, RULES) == P("fsdp", None)
    with pytest.raises(ValueError, match="no entry in config.sharding_rules"):
        partition.spec_for((8,), ("heads",), mesh, RULES)


def test_unsplit_share_counts_what_the_fsdp_axis_leaves_whole():
    mesh = mesh_lib.make_mesh(mesh_cfg(2, 4))
    abstract = {"a": jax.ShapeDtypeStruct((16, 32), jnp.float32),   # split
                "b": {"c": jax.ShapeDtypeStruct((10, 32), jnp.float32)},  # 10 % 4: whole
                "d": jax.ShapeDtypeStruct((6,), jnp.float32)}  # no fsdp dimension
    names = {"a": ("embed", "mlp"), "b": {"c": ("embed", "mlp")}, "d": ("mlp",)}
    shardings = jax.tree.map(
        lambda leaf, n: jax.sharding.NamedSharding(
            mesh, partition.spec_for(leaf.shape, n, mesh, RULES)),
        abstract, names, is_leaf=lambda x: isinstance(x, tuple))
    share, largest = partition.unsplit_share(abstract, shardings, "fsdp")
    assert share == pytest.approx((320 + 6) / (512 + 320 + 6))
    assert largest == ["b/c", "d"]


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.02)
        emb = self.param("embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
                         (6, 16))
        x = x @ emb
        x = nn.Dense(32, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                     name="up")(x)
        return nn.Dense(6, kernel_init=nn.with_logical_partitioning(init, ("mlp", "vocab")),
                        use_bias=False, name="down")(x)


def test_every_param_and_adam_moment_is_placed_as_the_rules_say():
    mesh = mesh_lib.make_mesh(mesh_cfg(2, 4))
    model = Tiny()
    boxed = jax.eval_shape(lambda k: model.init(k, jnp.zeros((2, 6)))["params"],
                           jax.random.PRNGKey(0))
    abstract, shardings = partition.param_shardings(boxed, mesh, RULES)
    specs = jax.tree.map(lambda s: s.spec, shardings)
    assert specs == {"embedding": P("data", "fsdp"), "up": {"kernel": P("fsdp", None),
                                                           "bias": P(None)},
                     "down": {"kernel": P(None, "data")}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    abstract_opt = jax.eval_shape(tx.init, abstract)
    opt = partition.opt_state_shardings(abstract_opt, abstract, shardings, mesh)
    adam = opt[1][0]
    assert jax.tree.map(lambda s: s.spec, adam.mu) == specs
    assert jax.tree.map(lambda s: s.spec, adam.nu) == specs
    assert adam.count.spec == P()
    # Created under jit with these shardings, the arrays really live there.
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((2, 6)))["params"]),
                     out_shardings=shardings)(jax.random.PRNGKey(0))
    assert params["embedding"].sharding.spec == P("data", "fsdp")
    assert params["up"]["kernel"].addressable_shards[0].data.shape == (4, 32)


def test_rules_from_config_accepts_lists():
    rules = partition.rules_from_config([["embed", ["data", "fsdp"]], ["mlp", None]])
    assert rules == (("embed", ("data", "fsdp")), ("mlp", None))
    with pytest.raises(ValueError, match="must be"):
        partition.rules_from_config([["embed"]])


@pytest.mark.slow  # compiles and runs steps on a mixed mesh (about 20 s on 2 cores)
def test_steps_on_a_mixed_mesh_need_no_full_rematerialisation(capfd, tmp_path):
    """Both stages' steps keep activations split by batch on a 2 x 4 mesh.

    Gathering from an FSDP-sharded table (the patches' frequency positions, the text
    tokens) made width-sharded activations, which XLA could only re-lay-out to the
    batch split by rematerialising them whole (it logs the warning checked here); so
    did the text pool's projections and their gradients.
    """
    from benchmarks import aot_compile, kernels

    aot_compile.main(["--stage", "mae,cacophony", "--variant", "tiny", "--per-device-batch",
                      "2", "--mesh", "2x4", "--clip-seconds", "1", "--dump-hlo", str(tmp_path)])
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    # The dumped program is the compiled step's, readable by kernels.py.
    assert kernels.summarize((tmp_path / "mae.hlo.txt").read_text()).kernels > 0
