"""Stacked Muon (train/muon.py): optax.contrib.muon's arithmetic, the same under a device split and under
nn.scan's stacked layers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from genmask_jax.models.dit import DiTConfig, init_params
from genmask_jax.parallel.mesh import make_mesh
from genmask_jax.train import muon
from genmask_jax.train.state import LAYER_STACKS, make_optimizer


def tree(seed):
    keys = jax.random.split(jax.random.key(seed), 6)
    return {
        "a": {"kernel": jax.random.normal(keys[0], (16, 16)), "bias": jax.random.normal(keys[1], (16,))},
        "b": {"kernel": jax.random.normal(keys[2], (16, 16))},  # stacked with a/kernel
        "wide": {"kernel": jax.random.normal(keys[3], (8, 24))},  # fan_out > fan_in: scaled by sqrt(3)
        "tall": {"kernel": jax.random.normal(keys[4], (24, 8))},  # orthogonalised transposed
        "conv": {"kernel": jax.random.normal(keys[5], (1, 2, 2, 4, 8))},  # not 2-D: AdamW
    }


def run(tx, steps=3, jit=jax.jit):
    params = tree(0)
    state = tx.init(params)
    update = jit(lambda g, s, p: tx.update(g, s, p))
    out = []
    for i in range(steps):
        updates, state = update(tree(i + 1), state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out


def test_matches_optax_muon():
    ours = run(muon.muon(0.02, adam_learning_rate=0.005, ns_steps=5))
    reference = run(optax.contrib.muon(0.02, adam_learning_rate=0.005, ns_steps=5))
    # Same operations batched differently: measured identical (0.0) on updates of size ~2e-2; 1e-6 absolute
    # allows for matmul-order differences on other CPUs while catching any change in the maths.
    for a, b in zip(ours, reference):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, atol=1e-6)


def test_conv_kernels_as_patch_matrices_match_optax_muon():
    ours = run(muon.muon(0.02, adam_learning_rate=0.005, ns_steps=5, conv_kernels=True))
    matrix = optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)
    dims = {
        "a": {"kernel": matrix, "bias": None},
        "b": {"kernel": matrix},
        "wide": {"kernel": matrix},
        "tall": {"kernel": matrix},
        # (1, 2, 2, 4) reduced, 8 out: the (16, 8) matrix of the patch matmul.
        "conv": {"kernel": optax.contrib.MuonDimensionNumbers(reduction_axis=(0, 1, 2, 3), output_axis=4)},
    }
    reference = run(
        optax.contrib.muon(0.02, adam_learning_rate=0.005, ns_steps=5, muon_weight_dimension_numbers=dims)
    )
    for a, b in zip(ours, reference):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, atol=1e-6)  # tolerance as in test_matches_optax_muon
    # and the conv kernel really moved under Muon: AdamW's first update is lr * sign(g) everywhere.
    adam_like = np.abs(np.asarray(ours[0]["conv"]["kernel"])) / 0.005
    assert not np.allclose(adam_like, 1.0, atol=1e-3)


def test_newton_schulz_orthogonalises():
    x = jax.random.normal(jax.random.key(0), (3, 16, 32))
    o = muon.newton_schulz(x, steps=10)
    singular = np.linalg.svd(np.asarray(o), compute_uv=False)
    # The quintic iteration does not converge to exactly 1: it settles singular values in about
    # [0.7, 1.2] (its coefficients trade accuracy for speed).
    assert singular.min() > 0.6 and singular.max() < 1.3


@pytest.mark.multidevice
def test_split_over_eight_devices_equals_one():
    mesh = make_mesh((2, 2, 2), devices=jax.devices()[:8])
    tx = muon.muon(0.02, adam_learning_rate=0.005, ns_steps=5)

    def sharded_jit(fn):
        jitted = jax.jit(fn)

        def call(*args):
            with jax.set_mesh(mesh):
                return jitted(*args)

        return call

    one = run(tx)
    split = run(tx, jit=sharded_jit)
    # Measured 1.9e-9 apart (the split changes only the matmuls' blocking).
    for a, b in zip(one, split):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, atol=1e-6)
    with jax.set_mesh(mesh):
        stack = jax.jit(lambda x: muon._split_over_devices(x))(jnp.ones((3, 4, 4)))
    assert stack.shape == (8, 4, 4)  # padded to the 8 devices, one matrix each


def stack_layers(unscanned: dict, num_layers: int) -> dict:
    """Unscanned DiT params in nn.scan's layout: `blocks_i` -> `blocks` with a leading layer axis."""
    out = {k: v for k, v in unscanned.items() if not k.startswith("blocks_")}
    blocks = [unscanned[f"blocks_{i}"] for i in range(num_layers)]
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return out


@pytest.mark.parametrize("conv_kernels", [False, True], ids=["matrices", "conv_kernels"])
def test_scanned_dit_takes_the_unscanned_update_layer_by_layer(conv_kernels):
    """The paper config scans the DiT's blocks: each layer's kernel must still be orthogonalised on its own
    and biases / norm scales (2-D only through the layer axis) must stay with AdamW."""
    config = DiTConfig.from_variant("tiny")
    unscanned = init_params(config, jax.random.key(0))
    scanned = stack_layers(unscanned, config.num_layers)
    scanned_config = dataclasses.replace(config, scan_layers=True)
    nn_scan = jax.eval_shape(lambda: init_params(scanned_config, jax.random.key(0)))
    assert jax.tree.map(jnp.shape, scanned) == jax.tree.map(jnp.shape, nn_scan)

    tx = make_optimizer(dict(name="muon", lr=1e-3, muon_lr=0.02, total_steps=10, weight_decay=0.1,
                             muon_conv_kernels=conv_kernels))
    update = jax.jit(tx.update)
    states = {"unscanned": tx.init(unscanned), "scanned": tx.init(scanned)}
    for step in range(2):  # the second update goes through the momentum
        grads = jax.tree.map(lambda p, s=step: jax.random.normal(jax.random.key(s + 1), p.shape), unscanned)
        ours, states["unscanned"] = update(grads, states["unscanned"], unscanned)
        theirs, states["scanned"] = update(stack_layers(grads, config.num_layers), states["scanned"], scanned)
        # The same matrices batched in another order: measured 9.3e-10 apart on updates of size up to
        # 1.3e-2; a kernel taking AdamW instead, or orthogonalised together with the other layer, is off
        # by about 7e-3.
        for i in range(config.num_layers):
            for x, y in zip(jax.tree.leaves(jax.tree.map(lambda a, i=i: a[i], theirs["blocks"])),
                            jax.tree.leaves(ours[f"blocks_{i}"])):
                np.testing.assert_allclose(x, y, atol=1e-7)
        rest = lambda tree: {k: v for k, v in tree.items() if not k.startswith("blocks")}  # noqa: E731
        for x, y in zip(jax.tree.leaves(rest(theirs)), jax.tree.leaves(rest(ours))):
            np.testing.assert_allclose(x, y, atol=1e-7)

    labels = {name: muon.partition_labels(tree, conv_kernels, LAYER_STACKS)
              for name, tree in (("unscanned", unscanned), ("scanned", scanned))}
    for i in range(config.num_layers):
        assert labels["scanned"]["blocks"] == labels["unscanned"][f"blocks_{i}"]
    assert labels["scanned"]["blocks"]["attn1"]["to_q"] == {"kernel": "muon", "bias": "adam"}
    assert labels["scanned"]["blocks"]["norm2"] == {"scale": "adam", "bias": "adam"}
    assert labels["scanned"]["patch_embedding"]["kernel"] == ("muon" if conv_kernels else "adam")
