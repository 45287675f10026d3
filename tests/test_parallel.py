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
