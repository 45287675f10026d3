import os
import resource
import subprocess
import sys

import jax
import pytest

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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    port = _free_port()
    env = {**_fake_slurm(1, port), "GENMASK_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "GENMASK_NUM_PROCESSES": "1", "GENMASK_PROCESS_ID": "0"}
    result = _probe_initialize(env)
    assert result["initialized"] and result["processes"] == 1
    assert result["visible"] == "all"


def test_auto_mode_stays_single_process_in_a_one_task_slurm_step():
    result = _probe_initialize(_fake_slurm(1, _free_port()))
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
