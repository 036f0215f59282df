"""Reading collective sizes from compiled HLO text."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import collectives


def test_type_bytes_and_group_sizes():
    assert collectives.type_bytes("f32[64,32]{1,0}") == 64 * 32 * 4
    assert collectives.type_bytes("(bf16[8]{0}, (s32[], f32[2,3]{1,0}))") == 16 + 4 + 24
    assert collectives.group_size(
        "x, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, y") == 4
    assert collectives.group_size(
        "x, replica_groups=mesh['a'=1,'b'=4,'c'=2], device_ids=([2,4]T(1,0)) {'b'}, y") == 4
    assert collectives.group_size("x, replica_groups=[2,4]<=[8], y") == 4
    assert collectives.group_size("x, replica_groups={{0,1},{2,3}}, y") == 2
    assert collectives.group_size("no groups") is None


def test_async_pairs_and_reduce_scatter_inputs():
    gather = ("  %all-gather-start.1 = ((f32[16]{0}, bf16[4,8]{1,0}), (f32[64]{0}, "
              "bf16[16,8]{1,0})) all-gather-start(%a, %b), channel_id=1, "
              "replica_groups=[2,4]<=[8], dimensions={0}")
    scatter = ("  %reduce-scatter-start = ((f32[64,8]{1,0}), f32[16,8]{1,0}) "
               "reduce-scatter-start(%g), replica_groups=mesh['data'=2,'fsdp'=4] {'fsdp'}, "
               "dimensions={0}")
    hlo = "\n".join([
        gather,
        "  %all-gather-done.1 = (f32[64]{0}, bf16[16,8]{1,0}) "
        "all-gather-done(%all-gather-start.1)",
        scatter,
        "  %reduce-scatter-done = f32[16,8]{1,0} reduce-scatter-done(%reduce-scatter-start)",
        "  %all-reduce = f32[10]{0} all-reduce(%x), replica_groups={{0,1,2,3}}, to_apply=%add",
        "  ROOT %all-reduce.2 = f32[] all-reduce(%y), replica_groups={{0,1}}, to_apply=%add",
    ])
    got = collectives.summarize(hlo)
    assert got["all-gather"] == {"count": 1, "bytes": 64 * 4 + 16 * 8 * 2}
    assert got["reduce-scatter"] == {"count": 1, "bytes": 16 * 8 * 4 * 4}
    assert got["all-reduce"] == {"count": 2, "bytes": 10 * 4 + 4}
    odd = "  %rs = f32[4]{0} reduce-scatter(%g), replica_groups=<unknown>, dimensions={0}"
    assert collectives.summarize(odd) == {"reduce-scatter": {"count": 1, "bytes": 0,
                                                             "unread": 1}}


def test_a_compiled_fsdp_gradient():
    """FSDP-style: gather the sharded weight, reduce its gradient (CPU, 8 devices)."""
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = NamedSharding(mesh, P("d"))
    w = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=sharded)
    x = jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=sharded)

    def grad(w, x):
        return jax.grad(lambda w: ((x @ w) ** 2).sum())(w)

    text = jax.jit(grad, out_shardings=sharded).lower(w, x).compile().as_text()
    got = collectives.summarize(text)
    # XLA:CPU gathers the weight and all-reduces the whole gradient.
    assert got["all-gather"]["bytes"] == 64 * 32 * 4
    assert sum(c["bytes"] for k, c in got.items() if k != "all-gather") == 64 * 32 * 4
