"""Device mesh over (data, fsdp, tensor) built from config data."""

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType

from genmask_jax.parallel.sharding import MESH_AXES


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills at most one -1 entry so that the product equals `num_devices`; every other size is >= 1."""
    shape = list(shape)
    if any(s < 1 and s != -1 for s in shape):
        raise ValueError(f"mesh shape {tuple(shape)}: sizes must be >= 1, or -1 for the remaining devices")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape} does not divide {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, "
                         f"have {num_devices}")
    return tuple(shape)


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1),
    axis_names: Sequence[str] = MESH_AXES,
    devices: Sequence[jax.Device] | None = None,
    allow_split_physical_axes: bool = False,
) -> jax.sharding.Mesh:
    """A mesh with Auto axis types (Linen logical sharding needs Auto, not Explicit).

    The device order is `jax.make_mesh`'s for given devices too (on TPU: each axis laid along whole axes
    of the ICI torus, the last axis first), so a mesh over a topology's devices (`aot`) is the one a run
    on that slice gets.

    Args:
      shape: size per axis; one -1 takes the remaining devices.
      devices: defaults to all devices of all processes (`jax.devices()`).
      allow_split_physical_axes: lets a mesh axis take part of a torus axis where its size is no product
        of whole ones (on v4, v5p and v6e; e.g. 8 on v6e:4x4), as MaxText's switch of that name does:
        that axis's collectives then run over fewer links. Off: such a shape is a ValueError.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    axis_types = (AxisType.Auto,) * len(axis_names)
    try:
        return jax.make_mesh(shape, tuple(axis_names), axis_types=axis_types, devices=devices)
    except NotImplementedError as e:  # an axis size that is no product of physical axis sizes
        if not allow_split_physical_axes:
            raise ValueError(
                f"mesh shape {shape} does not map onto the devices' torus ({e}); "
                "config.mesh.allow_split_physical_axes=True lays it out anyway, an axis over part of a torus "
                "axis (less bandwidth for its collectives)"
            ) from e
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, tuple(axis_names), axis_types=axis_types)


def config_mesh(config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The mesh of an experiment config's `mesh` section (`shape`, `allow_split_physical_axes`: absent
    from configs saved before it existed, so off)."""
    split = bool(config.mesh.get("allow_split_physical_axes", False))
    return make_mesh(tuple(config.mesh.shape), devices=devices, allow_split_physical_axes=split)


def cpu_device_flags(batch_seg: int, batch_gen: int, cores: int) -> str:
    """XLA_FLAGS that make each core a single-threaded CPU device (as many as divide both batches).

    For a small model (the demo's DiT) a data-parallel step over one device per core runs faster than
    on one device whose ops are spread over all cores (measured on 2 cores: BENCHMARKS.md, built-in
    demo). Takes effect only if in `XLA_FLAGS` before jax starts its backends.
    """
    count = max(d for d in range(1, max(cores, 1) + 1) if batch_seg % d == 0 and batch_gen % d == 0)
    return f"--xla_force_host_platform_device_count={count} --xla_cpu_multi_thread_eigen=false"
