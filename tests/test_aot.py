"""Ahead-of-time compilation for a TPU topology (genmask_jax/aot.py) on a tiny config and a v5e:2x2 slice.

Needs libtpu (requirements-tpu.txt); without it every test skips with the command's own one-line reason.
"""

import subprocess
import sys

import pytest
from train_helpers import tiny_config

from genmask_jax import aot

PROBLEM = aot.libtpu_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")

TOPOLOGY = "v5e:2x2"  # 4 chips


@pytest.fixture(scope="module")
def data_parallel():
    """Tiny train + eval steps with every chip holding a full copy of the state (mesh 4 x 1 x 1)."""
    return aot.analyse(aot.with_overrides(tiny_config(), mesh_shape=(4, 1, 1)), TOPOLOGY)


def test_tiny_steps_compile_with_positive_figures(data_parallel):
    a = data_parallel
    assert a.num_devices == 4 and a.chip.name == "TPU v5e" and a.mesh_shape == (4, 1, 1)
    for figures in (a.train, a.eval):
        assert figures.out_of_memory is None
        assert figures.argument_bytes > 0 and figures.output_bytes > 0 and figures.code_bytes > 0
        assert figures.temp_bytes >= 0 and figures.flops > 0
        assert 0 < figures.total_bytes < a.capacity_bytes
    assert a.train.alias_bytes > 0  # the donated state is reused for the new state
    assert a.train.flops > a.eval.flops  # forward + backward + update vs one forward
    assert a.step_time_s > 0 and 0 < a.mfu < 1
    assert a.fits
    report = aot.format_report(a)
    assert "verdict: fits" in report and "temporaries" in report


def test_argument_bytes_shrink_as_fsdp_grows(data_parallel):
    fsdp = aot.analyse(aot.with_overrides(tiny_config(), mesh_shape=(1, 4, 1)), TOPOLOGY, with_eval=False)
    replicated, sharded = data_parallel.train, fsdp.train
    assert replicated.state_bytes == sharded.state_bytes
    assert replicated.state_bytes_per_device == replicated.state_bytes
    # Every matrix of the tiny DiT has an fsdp-sharded axis, but the time-embedding MLP, biases of
    # tensor-parallel widths and norm scales stay whole; at width 64 they are about a tenth of the state.
    assert sharded.state_bytes_per_device < 0.4 * sharded.state_bytes
    # The compiled program's arguments shrink by at least the state bytes that sharding removed (the batch
    # and the replicated frozen VAE are laid out alike in both meshes); TPU tiling pads tiny arrays, so
    # the measured saving is larger (1.95 MB for 1.29 MB here), never much smaller.
    saved = replicated.state_bytes_per_device - sharded.state_bytes_per_device
    assert replicated.argument_bytes - sharded.argument_bytes >= 0.9 * saved
    assert fsdp.fits


def test_oversized_config_does_not_fit_and_exits_nonzero():
    # A 2-layer DiT whose feed-forward is 2^24 wide: 2 x 2 x 64 x 2^24 fp32 = 16 GiB of weights alone.
    command = [
        sys.executable,
        "-m",
        "genmask_jax.aot",
        "--config=configs/genmask.py",
        f"--topology={TOPOLOGY}",
        "--config.model.dit.ffn_dim=16777216",
        "--skip_eval",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    assert "verdict: does not fit" in result.stdout


def test_chip_table_and_topology_names():
    assert aot.chip_of("v5e:16x16").hbm_bytes == 16 * aot.GiB
    assert aot.chip_of("v5p:2x4x4").name == "TPU v5p"
    assert aot.chip_of("v6e:8x8").peak_bf16_flops == 918e12
    with pytest.raises(ValueError, match="unknown TPU generation"):
        aot.chip_of("v9z:2x2")
    with pytest.raises(aot.LibtpuMissing, match="cannot describe topology"):
        aot.topology_devices("v5e:3x3x3x3")


def test_sweep_meshes_keep_splits_that_divide_the_batch():
    config = tiny_config()  # 4 + 4 examples
    assert aot.sweep_meshes(4, config) == [(1, 4, 1), (1, 2, 2), (1, 1, 4), (2, 2, 1)]
    assert aot.sweep_meshes(8, config) == [(1, 4, 2), (1, 2, 4)]  # 8-way batch axes do not divide 4
    assert aot._microbatches_ok(config, (1, 2, 2), 2) and not aot._microbatches_ok(config, (1, 4, 1), 2)


def test_flop_count_multiplies_scan_bodies():
    import jax
    import jax.numpy as jnp

    def f(x, w):
        return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

    jaxpr = jax.make_jaxpr(f)(jnp.zeros((3, 4)), jnp.zeros((4, 4)))
    assert aot.count_flops(jaxpr) == 5 * 2 * 3 * 4 * 4


def test_mesh_over_topology_devices_takes_the_physical_order():
    """aot's mesh is the one `jax.make_mesh` gives a run on the slice: on v5e:4x4, each tensor group of
    (1, 4, 4) is a physical row of the torus, not the 4 first devices of libtpu's list."""
    import jax
    from jax.sharding import AxisType

    from genmask_jax.parallel.mesh import make_mesh

    devices = aot.topology_devices("v5e:4x4")
    mesh = make_mesh((1, 4, 4), devices=devices)
    expected = jax.make_mesh((1, 4, 4), mesh.axis_names, axis_types=(AxisType.Auto,) * 3, devices=devices)
    assert (mesh.devices == expected.devices).all()
    assert [tuple(d.coords) for d in mesh.devices[0, 0]] == [(x, 0, 0) for x in range(4)]


def test_mesh_shape_the_torus_cannot_take_is_a_value_error():
    from genmask_jax.parallel.mesh import make_mesh

    with pytest.raises(ValueError, match="does not map onto"):  # 8 is no product of v5p:4x4x4's axes
        make_mesh((1, 8, 8), devices=aot.topology_devices("v5p:4x4x4"))


def test_splash_attention_for_a_topology_is_the_mosaic_kernel():
    """Traced on this CPU host under a TPU topology's mesh (as aot does), splash is the TPU kernel
    (a tpu_custom_call that the TPU compiler accepts), not Pallas interpret mode."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from genmask_jax.models.attention import dot_product_attention
    from genmask_jax.parallel.mesh import make_mesh

    mesh = make_mesh((4, 1, 1), devices=aot.topology_devices(TOPOLOGY))
    spec = PartitionSpec("data", None, None, None)
    q = jax.ShapeDtypeStruct((4, 128, 2, 128), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
    loss = lambda q, k, v: dot_product_attention(q, k, v, None, "splash", spec).astype(jnp.float32).sum()
    with jax.set_mesh(mesh):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q).lower()
    text = lowered.as_text()
    assert text.count("tpu_custom_call") == 3  # forward, dK/dV and dQ kernels
    assert "stablehlo.while" not in text  # interpret mode runs the grid as while loops
    lowered.compile()
