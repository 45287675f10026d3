"""Ahead-of-time compilation for a TPU topology (genmask_jax/aot.py) on a tiny config and a v5e:2x2 slice.

Needs libtpu (requirements-tpu.txt); without it every test skips with the command's own one-line reason.
"""

import dataclasses
import subprocess
import sys
import types

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
    assert a.step_time_s > 0 and 0 < a.mfu < 1
    assert a.fits
    # One process of evaluate on its host (here the whole slice): the config's mesh fits it, 4 per device.
    assert a.eval_host == aot.EvalHost("v5e:2x2", 4, (4, 1, 1), 16) and a.eval_skipped is None
    report = aot.format_report(a)
    assert "verdict: fits" in report and "temporaries" in report
    assert "eval (evaluate.py, one host v5e:2x2: 4 chips, mesh (4, 1, 1), batch 16)" in report
    assert "DiT layers unrolled (model.dit.scan_layers=False)" in report  # the tiny config's layout


def test_report_says_when_the_eval_step_was_not_compiled(data_parallel):
    a = dataclasses.replace(
        data_parallel, eval=None, eval_host=None, eval_skipped="the single-host topology of 'x' is unknown"
    )
    report = aot.format_report(a)
    assert "eval (evaluate.py): not compiled: the single-host topology of 'x' is unknown" in report
    assert report.endswith("verdict: fits (train step only)")


@pytest.mark.parametrize(
    "topology,mesh_shape,host,host_mesh,batch",
    [
        ("v5e:4x4", (1, 16, 1), "v5e:2x2", (1, 4, 1), 16),  # the slice's mesh does not fit a host's 4 chips
        ("v5e:4x4", (1, 2, 2), "v5e:2x2", (1, 2, 2), 8),  # it does: 4 per batch shard, not per chip
        ("v5p:2x4x4", (1, -1, 1), "v5p:2x2x1", (1, 4, 1), 16),
        ("v6e:4x4", (1, 16, 1), "v6e:2x2", (1, 4, 1), 16),
    ],
)
def test_eval_step_is_what_evaluate_runs_on_one_host(
    topology, mesh_shape, host, host_mesh, batch, tmp_path, monkeypatch
):
    """Each process of `genmask_jax.evaluate` runs `predict_scores` on its own host's devices
    (`infer.checkpoint.inference_mesh`) with `eval.job.run`'s batch, not on the slice's train mesh."""
    import jax

    from genmask_jax.eval import job
    from genmask_jax.infer import checkpoint
    from genmask_jax.models import build

    config = aot.with_overrides(tiny_config(), mesh_shape=mesh_shape)
    assert aot.host_topology(topology, aot.topology_devices(topology)) == host
    devices = aot.topology_devices(host)
    program = aot.eval_step_program(config, devices)

    monkeypatch.setattr(jax, "local_devices", lambda *args, **kwargs: devices)
    mesh = checkpoint.inference_mesh(config)
    assert program.mesh.devices.shape == host_mesh and (program.mesh.devices == mesh.devices).all()
    dit_params, vae_params = program.args[:2]
    loaded = checkpoint.LoadedModel(
        config, build.build_model(config), dit_params, vae_params, mesh, program.rules, 0, tmp_path
    )
    seen = {}
    monkeypatch.setattr(job, "evaluate_split", lambda predict, data, spec, out, n, *a, **k: seen.update(n=n))
    job.run(loaded, [job.SplitSpec("synthetic", "test")], tmp_path, progress=False)
    assert program.args[2].shape == (seen["n"], 32, 32, 3) and seen["n"] == batch
    assert {x.sharding.mesh.devices.size for x in program.args[2:6]} == {4}
    assert program.trace().out_info.shape == (batch, 32, 32)  # predict_scores' scores


def test_host_topology_is_one_host_of_the_chip_or_unknown():
    assert aot.host_topology(TOPOLOGY, aot.topology_devices(TOPOLOGY)) == TOPOLOGY  # one process already
    # v5litepod-8 and v6e-8 are one 8-chip host, which libtpu's default would make two hosts of 2x2.
    for eight in ("v5e:2x4", "v6e:2x4"):
        devices = aot.topology_devices(eight)
        assert len(devices) == 8 and {d.process_index for d in devices} == {0}
        assert aot.host_topology(eight, devices) == eight
    # v5litepod-1 and v6e-1, which libtpu's default 2x2 host bounds do not divide.
    for one in ("v5e:1x1", "v6e:1x1"):
        devices = aot.topology_devices(one)
        assert len(devices) == 1 and aot.host_topology(one, devices) == one
    # Process 0 holding chips over a third axis that a two-axis name cannot write: said, not guessed.
    fake = [
        types.SimpleNamespace(process_index=p, coords=(x, y, z))
        for p in range(2)
        for x in range(2)
        for y in range(2)
        for z in (2 * p, 2 * p + 1)
    ]
    with pytest.raises(aot.UnknownHost, match="single-host topology of 'v5e:4x4' is unknown"):
        aot.host_topology("v5e:4x4", fake)


def test_the_train_step_checks_that_host_data_can_feed_the_mesh(monkeypatch):
    """`train` refuses a mesh whose batch shards processes share only in part
    (`parallel.data_groups`); aot must not call such a layout "fits"."""
    calls = []

    def refuse(mesh, rules):
        calls.append(dict(mesh.shape))
        raise ValueError("cannot be fed from host data")

    monkeypatch.setattr(aot, "data_loading_groups", refuse)
    config = aot.with_overrides(tiny_config(), mesh_shape=(4, 1, 1))
    with pytest.raises(ValueError, match="host data"):
        aot.train_step_program(config, aot.topology_devices(TOPOLOGY))
    assert calls == [{"data": 4, "fsdp": 1, "tensor": 1}]


def test_the_configs_layer_layout_is_compiled():
    """aot compiles the program `train` runs: a config that does not scan its DiT layers is not scanned."""
    devices = aot.topology_devices(TOPOLOGY)
    for scan in (False, True):
        config = tiny_config(**{"model.dit.scan_layers": scan})
        config = aot.with_overrides(config, mesh_shape=(4, 1, 1), remat="none", microbatches=1)
        assert config.model.dit.scan_layers is scan
        assert ("scan[" in str(aot.train_step_program(config, devices).trace().jaxpr)) is scan


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


def test_a_mesh_axis_over_part_of_a_torus_axis_is_opt_in():
    """8 is no product of v6e:4x4's torus axes (4, 4): refused by default, laid out with the switch."""
    from jax.sharding import AxisType

    from genmask_jax.parallel.mesh import config_mesh, make_mesh

    devices = aot.topology_devices("v6e:4x4")
    with pytest.raises(ValueError, match="config.mesh.allow_split_physical_axes=True lays it out anyway"):
        make_mesh((2, 8, 1), devices=devices)
    config = tiny_config()
    config.mesh.shape, config.mesh.allow_split_physical_axes = (2, 8, 1), True
    mesh = config_mesh(config, devices)
    assert mesh.devices.shape == (2, 8, 1) and mesh.axis_types == (AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    del config.mesh.allow_split_physical_axes  # a config saved before the switch existed: off
    with pytest.raises(ValueError, match="does not map onto"):
        config_mesh(config, devices)


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


def test_v4_is_described_in_megacore_mode_as_a_slice_runs():
    """libtpu's default v4 description has a device per TensorCore, which jax.make_mesh refuses; a v4 slice
    runs in megacore mode, one device per chip."""
    devices = aot.topology_devices("v4:2x2x1")
    assert len(devices) == 4 and {d.core_on_chip for d in devices} == {0}
    program = aot.train_step_program(aot.with_overrides(tiny_config(), mesh_shape=(4, 1, 1)), devices)
    assert program.mesh.devices.shape == (4, 1, 1)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(microbatches=3), r"config.batch on mesh .*multiples of 12 \(microbatches x batch shards\)"),
        (dict(mesh_shape=(1, 3, 1)), r"config.mesh.shape: mesh shape \(1, 3, 1\) needs 3 devices, have 4"),
        (dict(mesh_shape=(1, 2, 2), **{"batch.seg": 3}), r"config.batch on mesh .*multiples of 2"),
        (dict(**{"model.dit.patch_size": (2, 2, 2)}), r"config.model: dit.patch_size .* must patch 1 frame"),
    ],
)
def test_configs_train_refuses_are_input_errors(overrides, message):
    """As `train` refuses them, before anything is traced; they used to surface as tracebacks (a
    ValueError, or an IndivisibleError while compiling) that the command reported as "does not fit"."""
    from genmask_jax.infer.cli import InputError

    fields = {k: v for k, v in overrides.items() if "." in k}
    mesh_shape, microbatches = overrides.get("mesh_shape", (4, 1, 1)), overrides.get("microbatches")
    config = aot.with_overrides(tiny_config(**fields), mesh_shape, microbatches=microbatches)
    with pytest.raises(InputError, match=message):
        aot.train_step_program(config, aot.topology_devices(TOPOLOGY))


def test_a_config_error_is_one_line_and_exit_status_2():
    command = [
        sys.executable, "-m", "genmask_jax.aot", "--config=configs/genmask.py:variant=tiny",
        f"--topology={TOPOLOGY}", "--config.microbatches=3", "--skip_eval",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stdout + result.stderr[-2000:]
    assert result.stdout.splitlines()[-1].startswith("error: config.batch on mesh {'data': 4, 'fsdp': 1,")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--meshes=1x4x1"], "error: --meshes and --microbatches are --sweep's"),
        (["--microbatches=2"], "error: --meshes and --microbatches are --sweep's"),
        (["--sweep", "--eval_batch_size=8"], "error: --sweep compiles the train step only"),
    ],
)
def test_flags_of_the_other_mode_are_refused_not_ignored(flags, message):
    """A single compile ignored --meshes and --microbatches (reporting the config's mesh and 1 microbatch),
    a sweep --eval_batch_size."""
    command = [sys.executable, "-m", "genmask_jax.aot", "--config=configs/genmask.py:variant=tiny",
               f"--topology={TOPOLOGY}", *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and result.stdout.splitlines()[-1].startswith(message)
