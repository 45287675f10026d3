"""Logical axis names and their default mapping onto the (data, fsdp, tensor) mesh.

Every parameter is annotated with logical names (`nn.with_logical_partitioning`); key activations are
pinned with `nn.with_logical_constraint`. The mapping to mesh axes is data: experiment configs carry
`config.sharding.logical_axis_rules` (a tuple of (logical, mesh axes) pairs) and pass it to
`nn.logical_axis_rules` / `nn.logical_to_mesh_sharding`.

Parameter names
  embed        the DiT's model width D                       -> fsdp
  heads        flattened attention heads x head_dim outputs  -> tensor
  mlp          feed-forward hidden width                     -> tensor
  text_embed   instruction-encoder width (4096 / 3584)       -> fsdp
  freq         sinusoidal timestep features                  -> replicated
  modulation   the 6 (or 2) AdaLN vectors                    -> replicated
  patch        flattened patch features p_t*p_h*p_w*C        -> replicated
  norm         norm scales and biases                        -> replicated
  layers       the stacked-block axis of nn.scan             -> replicated
  conv_*       VAE conv kernels (t, h, w, in, out)           -> replicated (the VAE is small and frozen)
Activation names
  activation_batch -> (data, fsdp); activation_heads / activation_mlp -> tensor; others replicated.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: LogicalRules = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("text_embed", "fsdp"),
    ("freq", None),
    ("modulation", None),
    ("patch", None),
    ("norm", None),
    ("layers", None),
    ("conv_t", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("conv_out", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_text", None),
    ("activation_channels", None),
)


def rules_from_config(rules: Sequence[Sequence] | None) -> LogicalRules:
    """Turns config data (lists, as ConfigDict/JSON store them) back into a rules tuple."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for name, axes in rules:
        if isinstance(axes, list | tuple):
            axes = tuple(axes)
        out.append((name, axes))
    return tuple(out)


def logical_sharding(tree, mesh: jax.sharding.Mesh, rules: LogicalRules):
    """NamedShardings for a pytree of `nn.Partitioned` leaves (e.g. an eval_shape'd init)."""
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_axes(rules: LogicalRules) -> tuple[str, ...] | str | None:
    """Mesh axes of the batch dimension (the `activation_batch` rule)."""
    return dict(rules).get("activation_batch", ("data", "fsdp"))


def batch_sharding(mesh: jax.sharding.Mesh, rules: LogicalRules) -> NamedSharding:
    """Every batch leaf is split over its leading (example) axis."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(rules)))


def _shard_count(mesh: jax.sharding.Mesh, axes: str | tuple[str, ...] | None) -> int:
    """How many blocks a dimension mapped to mesh `axes` is split into: the product of their sizes."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in names]))


def batch_shard_count(mesh: jax.sharding.Mesh, rules: LogicalRules) -> int:
    """How many blocks `batch_sharding` splits a batch into: the product of the batch axes' sizes."""
    return _shard_count(mesh, batch_axes(rules))


def heads_shard_count(mesh: jax.sharding.Mesh, rules: LogicalRules) -> int:
    """How many blocks the attention heads are split into: the product of the sizes of the mesh axes
    of the `activation_heads` rule."""
    return _shard_count(mesh, dict(rules).get("activation_heads"))


def heads_split_problem(num_heads: int, mesh: jax.sharding.Mesh, rules: LogicalRules) -> str | None:
    """Why `num_heads` attention heads do not split over `mesh` under `rules` (one line), else None."""
    shards = heads_shard_count(mesh, rules)
    if num_heads % shards == 0:
        return None
    sizes = [n for n in range(1, num_heads + 1) if num_heads % n == 0]
    return (
        f"model.dit.num_heads {num_heads} does not split over the {shards} shards of the mesh axes that "
        f"activation_heads maps to (mesh {dict(mesh.shape)}); use a tensor size in {sizes}"
    )


def put_sharded(x, sharding: NamedSharding) -> jax.Array:
    """`x` in `sharding`. A host array, the same on every process, goes by its shards: each device gets
    its own, never the whole array; with several processes `jax.device_put` would first check that the
    processes agree by all-gathering the whole array."""
    if isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
