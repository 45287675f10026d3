"""Stacked Muon (train/muon.py): optax.contrib.muon's arithmetic, and the same under a device split."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from genmask_jax.parallel.mesh import make_mesh
from genmask_jax.train import muon


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
