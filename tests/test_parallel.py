import os
import resource
import subprocess
import sys

import jax
import pytest
from train_helpers import free_port

from genmask_jax.parallel import host
from genmask_jax.parallel.mesh import make_mesh, resolve_mesh_shape
from genmask_jax.parallel.sharding import DEFAULT_RULES, rules_from_config


def test_resolve_mesh_shape_fills_one_axis():
    assert resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
    assert resolve_mesh_shape((2, 2, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError):
        resolve_mesh_shape((-1, -1, 1), 8)
    with pytest.raises(ValueError):
        resolve_mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError):
        resolve_mesh_shape((2, 2, 1), 8)


@pytest.mark.parametrize("shape", [(0, -1, 1), (-2, -4, 1), (2, 0, 4), (-1, -8, -1)])
def test_resolve_mesh_shape_rejects_sizes_below_one(shape):
    with pytest.raises(ValueError, match=r"sizes must be >= 1, or -1"):
        resolve_mesh_shape(shape, 8)


@pytest.mark.multidevice
def test_make_mesh_is_auto_over_all_devices():
    mesh = make_mesh((2, -1, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": jax.device_count() // 4, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_rules_roundtrip_through_config_lists():
    as_lists = [[k, list(v) if isinstance(v, tuple) else v] for k, v in DEFAULT_RULES]
    assert rules_from_config(as_lists) == DEFAULT_RULES


_FAULTS = """
import resource, sys
if sys.argv[1] == "reuse":
    from genmask_jax.parallel import host
    assert host.reuse_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
# Two transposed products: XLA:CPU keeps 192 MiB of temporaries in one block per execution.
f = jax.jit(lambda x: jnp.sum(jnp.exp(x).T * jnp.cos(x)) + jnp.sum(jnp.sin(x).T * jnp.tanh(x)))
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[2])):
    f(x).block_until_ready()
print(temp, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _temp_bytes_and_faults(mode: str, steps: int) -> tuple[int, int]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode, str(steps)], env=env, capture_output=True,
                         text=True, check=True, timeout=300).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_freed_memory_stops_the_per_step_page_faults():
    steps = 20
    temp, default = _temp_bytes_and_faults("default", steps)
    pages = temp / resource.getpagesize()
    if default < 0.5 * pages * steps:
        pytest.skip(f"this allocator does not fault the temporaries in every step ({default} faults)")
    _, reused = _temp_bytes_and_faults("reuse", steps)
    # glibc's defaults unmap the block after each step and fault all of it in again. Kept in the
    # heap, it is reused, once the heap has grown by a few blocks over the first steps: 131,000 to
    # 328,000 faults in 20 steps over six runs on the 2-core VM, against 1.64 million by default.
    assert reused < 0.5 * default, (reused, default, pages)


def test_cpu_only_follows_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host.cpu_only()
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert not host.cpu_only()


_INIT_PROBE = """
import json, sys
import jax
from genmask_jax.parallel import multihost

initialized = multihost.maybe_initialize({"mode": "auto"})
print(json.dumps({"initialized": initialized, "visible": jax.config.values["jax_cuda_visible_devices"],
                  "processes": jax.process_count()}))
"""


def _probe_initialize(env: dict, pythonpath: str = "") -> dict:
    """maybe_initialize({"mode": "auto"}) in a fresh process with `env` on top of a clean environment."""
    import json

    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "OMPI_", "GENMASK_", "JAX_COORDINATOR", "JAX_LOCAL_DEVICE"))}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    clean.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(filter(None, (pythonpath, root))), **env)
    out = subprocess.run([sys.executable, "-c", _INIT_PROBE], env=clean, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def _fake_slurm(ntasks: int, port: int) -> dict:
    # A task of an `srun` step as SLURM describes it; JAX's SlurmCluster needs these five (and takes the
    # coordinator's port from JAX_COORDINATOR_PORT).
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_JOB_NODELIST": "127.0.0.1",
            "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
            "JAX_COORDINATOR_PORT": str(port)}


def test_explicit_coordinates_keep_every_local_gpu_under_slurm():
    """launch/gpu.sh under `srun --ntasks-per-node=1` sets all three GENMASK_* variables; JAX's SLURM
    detection must not then narrow the process to the GPU of its local rank (GPU 0)."""
    port = free_port()
    env = {**_fake_slurm(1, port), "GENMASK_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "GENMASK_NUM_PROCESSES": "1", "GENMASK_PROCESS_ID": "0"}
    result = _probe_initialize(env)
    assert result["initialized"] and result["processes"] == 1
    assert result["visible"] == "all"


def test_auto_mode_stays_single_process_in_a_one_task_slurm_step():
    result = _probe_initialize(_fake_slurm(1, free_port()))
    assert not result["initialized"] and result["visible"] == "all"


def test_auto_mode_ignores_an_importable_mpi4py(tmp_path):
    """JAX's mpi4py cluster is opt-in and reports itself present whenever mpi4py imports; auto mode once
    took that for a cluster and failed in jax.distributed.initialize() ("coordinator_address should be
    defined") on every HPC image that ships mpi4py."""
    (tmp_path / "mpi4py").mkdir()
    (tmp_path / "mpi4py" / "__init__.py").write_text("")
    result = _probe_initialize({}, pythonpath=str(tmp_path))
    assert not result["initialized"]


def test_demo_config_never_initializes_the_distributed_runtime():
    # The demo touches JAX devices before the training loop would call maybe_initialize.
    from configs import demo

    assert demo.get_config().distributed.mode == "off"
    assert demo.get_config("variant=smoke").distributed.mode == "off"


def test_processes_holding_the_same_batch_shards_form_one_data_loading_group():
    from genmask_jax.parallel.data_groups import group_processes

    # Each process its own shards (in any order, adjacent or not): groups are the process indices.
    assert group_processes({0: {0, 1}, 1: {2, 3}}) == {0: 0, 1: 1}
    assert group_processes({1: {0, 1}, 0: {2, 3}}) == {0: 0, 1: 1}
    assert group_processes({0: {0, 1, 6, 15}, 1: {2, 3, 4, 5}, 2: {7, 12, 13, 14}, 3: {8, 9, 10, 11}}) == {
        0: 0, 1: 1, 2: 2, 3: 3}
    # A tensor axis across hosts: pairs of processes hold the same shards.
    assert group_processes({0: {0, 1}, 1: {0, 1}, 2: {2, 3}, 3: {2, 3}}) == {0: 0, 1: 0, 2: 1, 3: 1}
    assert group_processes({0: {2, 3}, 1: {0, 1}, 2: {2, 3}, 3: {0, 1}}) == {0: 0, 1: 1, 2: 0, 3: 1}
    assert group_processes({0: {0}, 1: {0}}) == {0: 0, 1: 0}  # batch replicated: one group
    with pytest.raises(ValueError, match=r"process 0 holds 1 batch shards, process 1 2"):
        group_processes({0: {0}, 1: {1, 2}, 2: {1, 2}})
    with pytest.raises(ValueError, match=r"processes 0 and 1 both hold batch shard 1 but not the same"):
        group_processes({0: {0, 1}, 1: {1, 2}, 2: {2, 0}})


def _tpu_devices(topology: str):
    from genmask_jax import aot

    if aot.libtpu_problem():
        pytest.skip(aot.libtpu_problem())
    return aot.topology_devices(topology)


@pytest.mark.parametrize("topology,shape,groups", [
    ("v5e:4x4", (-1, 1, 1), [0, 1, 2, 3]),  # 4 hosts x 4 chips, each host holding 4 of 16 shards
    ("v5e:4x4", (1, 8, 2), [0, 1, 2, 3]),
    ("v5e:4x4", (1, 4, 4), [0, 0, 1, 1]),  # each tensor row of 4 chips spans two hosts
    ("v5e:4x4", (1, 2, 8), [0, 0, 1, 1]),
    ("v5e:4x4", (1, 1, 16), [0, 0, 0, 0]),
    ("v5p:2x2x2", (1, 2, 4), [0, 1]),
])
def test_data_loading_groups_of_tpu_slice_meshes(topology, shape, groups):
    from genmask_jax.parallel.data_groups import data_group, data_loading_groups

    mesh = make_mesh(shape, devices=_tpu_devices(topology))
    assert data_loading_groups(mesh, DEFAULT_RULES) == dict(enumerate(groups))
    assert data_group(mesh, DEFAULT_RULES, process_index=len(groups) - 1) == (groups[-1], len(set(groups)))


def test_a_mesh_no_host_data_can_feed_is_refused_naming_it():
    import numpy as np
    from jax.sharding import AxisType, Mesh

    from genmask_jax.parallel.data_groups import data_loading_groups

    devices = _tpu_devices("v5e:4x4")
    by_process = [[d for d in devices if d.process_index == p] for p in range(4)]
    # fsdp shard 0 on hosts 0 and 1, shard 1 on hosts 1 and 2, ...: partly shared shards.
    rows = [by_process[p][:2] + by_process[(p + 1) % 4][2:] for p in range(4)]
    mesh = Mesh(np.array(rows)[None], ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with pytest.raises(ValueError, match=r"mesh \{'data': 1, 'fsdp': 4, 'tensor': 4\} .* cannot be fed "
                                         r"from host data: processes 0 and 1 both hold batch shard 0 .*"
                                         r"make_mesh .* \(-1, 1, 1\)"):
        data_loading_groups(mesh, DEFAULT_RULES)


def test_one_process_is_one_data_loading_group():
    from genmask_jax.parallel.data_groups import data_group

    assert data_group(make_mesh((1, -1, 1)), DEFAULT_RULES) == (0, 1)
