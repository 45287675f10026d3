"""Muon with the Newton-Schulz iterations of same-shaped kernels stacked and split over the devices.

`optax.contrib.muon` orthogonalises the momentum of every 2-D kernel on its own, and under data
parallelism every device repeats all of them: for the demo's DiT (46 kernels, 128 wide, two CPU
devices) 5 iterations added about as much time per step as the forward and backward pass take. Here the
momenta of same-shaped kernels are stacked, the stack is sharded over every device of the ambient mesh
(each orthogonalises its share; XLA gathers the results back into the parameters' layout), and the
iterations are batched matmuls.

The arithmetic is `optax.contrib.muon`'s defaults (tests/test_muon.py checks it): Nesterov momentum with
bias correction, Frobenius normalisation, the quintic Newton-Schulz iteration with Jordan's coefficients
(3.4445, -4.7750, 2.0315) (modded-nanogpt, 2024), updates scaled by sqrt(max(1, fan_out / fan_in)).
Non-2-D parameters (biases, norm scales, modulation tables, and conv kernels unless `conv_kernels`
makes them patch matrices) take AdamW with Nesterov momentum, as in `optax.contrib.muon`.

Parameters of an `nn.scan`ned module (named in `layer_stacks`) carry a leading layer axis: their rank is
counted without it and each layer's matrix is orthogonalised on its own, so a scanned model takes the
same update as its unscanned twin.
"""

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

NS_COEFFS = (3.4445, -4.7750, 2.0315)


class StackedMuonState(NamedTuple):
    count: jax.Array
    mu: Any


def newton_schulz(x: jax.Array, steps: int, eps: float = 1e-8) -> jax.Array:
    """Approximate orthogonalisation U V^T of each matrix of `x` `(N, m, n)` (quintic iteration)."""
    wide = x.shape[-2] <= x.shape[-1]
    x = x if wide else jnp.swapaxes(x, -1, -2)
    x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else jnp.swapaxes(x, -1, -2)


def _split_over_devices(x: jax.Array) -> jax.Array:
    """Pads the stack `(N, m, n)` to a multiple of the ambient mesh's size and shards axis 0 over all of
    its devices; unchanged without a multi-device mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    x = jnp.pad(x, ((0, -x.shape[0] % mesh.size), (0, 0), (0, 0)))
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(mesh.axis_names))


def layer_axes(path, layer_stacks: Collection[str]) -> int:
    """How many leading layer axes nn.scan gave the parameter at `path`: one per scanned module on it."""
    return sum(isinstance(k, jax.tree_util.DictKey) and k.key in layer_stacks for k in path)


def scale_by_stacked_muon(
    beta: float = 0.95, ns_steps: int = 5, eps: float = 1e-8, layer_stacks: Collection[str] = ()
) -> optax.GradientTransformation:
    """Muon's direction for a tree of kernels (see the module docstring); no learning rate."""

    def init(params):
        return StackedMuonState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        count = optax.safe_increment(state.count)
        mu_hat = jax.tree.map(
            lambda m, g: beta * m + (1 - beta) * g,
            optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
            optax.tree.bias_correction(updates, beta, count),
        )
        flat, treedef = jax.tree_util.tree_flatten_with_path(mu_hat)
        leaves = [leaf for _, leaf in flat]
        matrices = []  # (layers, fan_in, fan_out) per leaf
        groups = defaultdict(list)
        for i, (path, leaf) in enumerate(flat):
            n = layer_axes(path, layer_stacks)
            if leaf.ndim - n < 2:
                raise ValueError(f"Muon takes kernels of 2 or more axes (after {n} layer axes), got shape "
                                 f"{leaf.shape} at {jax.tree_util.keystr(path)}")
            # A conv kernel (..., C_in, C_out) is the matrix (prod(...) * C_in, C_out) of its patch matmul.
            matrices.append(leaf.reshape(math.prod(leaf.shape[:n]), -1, leaf.shape[-1]))
            groups[(matrices[i].shape[1:], leaf.dtype)].append(i)
        out = list(leaves)
        for ((fan_in, fan_out), _), index in groups.items():
            stack = _split_over_devices(jnp.concatenate([matrices[i] for i in index]))
            orthogonal = newton_schulz(stack, ns_steps, eps) * max(1.0, fan_out / fan_in) ** 0.5
            offsets = itertools.accumulate((matrices[i].shape[0] for i in index), initial=0)
            for i, start in zip(index, offsets):
                out[i] = orthogonal[start:start + matrices[i].shape[0]].reshape(leaves[i].shape)
        return jax.tree.unflatten(treedef, out), StackedMuonState(count, mu)

    return optax.GradientTransformation(init, update)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    adam_learning_rate: optax.ScalarOrSchedule,
    beta: float = 0.95,
    ns_steps: int = 5,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Callable | None = None,
    conv_kernels: bool = False,
    layer_stacks: Collection[str] = (),
) -> optax.GradientTransformation:
    """Stacked Muon on every 2-D kernel (and, with `conv_kernels`, every higher-rank parameter named
    "kernel", as its patch matrix), Nesterov AdamW (`adam_learning_rate`) on the others; decoupled
    weight decay (scaled by each side's learning rate) where `weight_decay_mask` says.

    layer_stacks: names of nn.scan modules; their parameters' leading layer axis is not a matrix axis.
    """
    matrices = optax.chain(
        scale_by_stacked_muon(beta, ns_steps, eps, layer_stacks),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    others = optax.adamw(
        adam_learning_rate, b1=adam_b1, b2=adam_b2, eps=eps, weight_decay=weight_decay,
        mask=weight_decay_mask, nesterov=True,
    )
    return optax.partition(
        {"muon": matrices, "adam": others},
        lambda params: partition_labels(params, conv_kernels, layer_stacks),
    )


def partition_labels(params, conv_kernels: bool = False, layer_stacks: Collection[str] = ()):
    """"muon" or "adam" for each parameter of `params` (see `muon`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: "muon" if _is_matrix(path, p, conv_kernels, layer_stacks) else "adam", params
    )


def _is_matrix(path, param, conv_kernels: bool, layer_stacks: Collection[str]) -> bool:
    rank = param.ndim - layer_axes(path, layer_stacks)
    if rank == 2:
        return True
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return conv_kernels and rank > 2 and bool(names) and names[-1] == "kernel"
