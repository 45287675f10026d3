"""Data-loading groups: which processes must load the same examples for a mesh's batch sharding.

`jax.make_array_from_process_local_data` takes from each process the shards of the global batch that its
devices hold. When a non-batch mesh axis (tensor, say) spans several hosts, as `jax.make_mesh` lays out
(1, 4, 4) on a v5e:4x4 slice (4 hosts x 4 chips), two processes hold the same batch shards and must pass
the same data. Processes holding the same shards form a group; the training pipeline gives every group
its own slice of the examples and every process of a group the same one. With a mesh whose batch axes
split the devices by process (the usual case) every process is its own group, numbered by its index.
"""

from collections.abc import Collection, Mapping

import jax

from genmask_jax.parallel.sharding import LogicalRules, batch_axes, batch_shard_count, batch_sharding


def group_processes(shards_by_process: Mapping[int, Collection[int]]) -> dict[int, int]:
    """Process index -> group index, from the batch shards each process's devices hold.

    Processes holding the same set of shards share a group; groups are numbered in the order of their
    lowest process index, so processes that each hold their own shards keep their process index. A
    process may hold shards that are not adjacent (`jax.make_mesh` orders a v5e:4x4 slice's 16 chips
    along a ring: process 0 holds shards 0, 1, 6 and 15 of a (1, 16, 1) mesh);
    `make_array_from_process_local_data` places a process's local rows into its shards in order.

    Raises:
      ValueError: when processes hold different numbers of shards, or partly the same shards; no
        per-process batch feeds such a layout.
    """
    sizes = {process: len(set(shards)) for process, shards in shards_by_process.items()}
    if len(set(sizes.values())) > 1:
        fewest, most = min(sizes, key=sizes.get), max(sizes, key=sizes.get)
        raise ValueError(f"process {fewest} holds {sizes[fewest]} batch shards, process {most} {sizes[most]}")
    holder: dict[int, tuple[int, frozenset]] = {}  # shard -> (first process holding it, that one's shards)
    groups: dict[frozenset, int] = {}
    out = {}
    for process in sorted(shards_by_process):
        shards = frozenset(shards_by_process[process])
        for shard in sorted(shards):
            first, first_shards = holder.setdefault(shard, (process, shards))
            if first_shards != shards:
                raise ValueError(
                    f"processes {first} and {process} both hold batch shard {shard} but not the same "
                    f"shards: {sorted(first_shards)} vs {sorted(shards)}"
                )
        out[process] = groups.setdefault(shards, len(groups))
    return out


def batch_shards_by_process(mesh: jax.sharding.Mesh, rules: LogicalRules) -> tuple[dict[int, set[int]], int]:
    """({process index: the batch shards its devices hold}, number of batch shards) for the batch
    sharding of `mesh` (`batch_sharding`); shard `i` is the `i`-th of that many equal blocks of a batch."""
    num_shards = batch_shard_count(mesh, rules)
    shards: dict[int, set[int]] = {}
    for device, index in batch_sharding(mesh, rules).devices_indices_map((num_shards,)).items():
        shards.setdefault(device.process_index, set()).update(range(*index[0].indices(num_shards)))
    return shards, num_shards


def data_loading_groups(mesh: jax.sharding.Mesh, rules: LogicalRules) -> dict[int, int]:
    """Process index -> data-loading group index for every process holding a device of `mesh`.

    Needs no live process: on a topology's devices (`aot`) it checks the layout a run would have.

    Raises:
      ValueError: naming the mesh, when its batch sharding cannot be fed from per-process batches.
    """
    shards, num_shards = batch_shards_by_process(mesh, rules)
    try:
        return group_processes(shards)
    except ValueError as e:
        per_process = mesh.devices.size // len(shards)
        raise ValueError(
            f"mesh {dict(mesh.shape)} with the batch over {batch_axes(rules)} ({num_shards} shards) cannot "
            f"be fed from host data: {e}. Two processes must hold the same batch shards or none in common. "
            f"Build the mesh with parallel.mesh.make_mesh (config.mesh.shape), e.g. (-1, 1, 1), or keep "
            f"the tensor axis within one process: (-1, 1, t) with t dividing its {per_process} devices."
        ) from None


def data_group(
    mesh: jax.sharding.Mesh, rules: LogicalRules, process_index: int | None = None
) -> tuple[int, int]:
    """(group index, group count) of this process (or `process_index`): the pipeline's data shard
    index and count (`make_train_iterator(process_index=..., process_count=...)`)."""
    groups = data_loading_groups(mesh, rules)
    process = jax.process_index() if process_index is None else process_index
    if process not in groups:
        raise ValueError(f"process {process} holds no device of the mesh {dict(mesh.shape)}")
    return groups[process], len(set(groups.values()))
