"""Matmul FLOPs from a jaxpr, in total and by the name stack of the code that made them."""

import jax
import jax.numpy as jnp

from genmask_jax.flops import count_flops, flops_by_source


def test_flops_by_source_names_scopes_repeats_scans_and_takes_the_costlier_branch():
    def f(x, w, flag):
        with jax.named_scope("once"):
            y = x @ w
        with jax.named_scope("looped"):
            y = jax.lax.scan(lambda c, _: (c @ w, None), y, None, length=5)[0]
        with jax.named_scope("branch"):
            return jax.lax.cond(flag, lambda y: y @ w @ w, lambda y: y, y)

    jaxpr = jax.make_jaxpr(f)(jnp.zeros((3, 4)), jnp.zeros((4, 4)), True)
    dot = 2 * 3 * 4 * 4
    by_source = flops_by_source(jaxpr)
    assert by_source["once"] == dot
    assert sum(v for k, v in by_source.items() if k.startswith("looped")) == 5 * dot
    assert sum(v for k, v in by_source.items() if k.startswith("branch")) == 2 * dot
    assert count_flops(jaxpr) == 8 * dot


def test_gradient_flops_are_named_by_the_transposed_scope():
    def loss(w, x):
        with jax.named_scope("layer"):
            return jnp.sum(x @ w)

    by_source = flops_by_source(jax.make_jaxpr(jax.grad(loss))(jnp.zeros((4, 4)), jnp.zeros((3, 4))))
    backward = {k: v for k, v in by_source.items() if k.startswith("transpose(")}
    assert sum(backward.values()) == 2 * 3 * 4 * 4 and all("layer" in k for k in backward)
