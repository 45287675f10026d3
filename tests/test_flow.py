"""Flow-matching conventions and samplers."""

import jax
import jax.numpy as jnp
import numpy as np

from genmask_jax.diffusion import flow


def test_noising_target_and_inversion_are_consistent():
    k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(k0, (4, 2, 3, 3, 5))
    eps = jax.random.normal(k1, x0.shape)
    t = jax.random.uniform(k2, (4,))
    x_t = flow.add_noise(x0, eps, t)
    v = flow.velocity_target(x0, eps)
    np.testing.assert_allclose(flow.predict_x0(x_t, t, v), x0, atol=1e-5)  # fp32 round-off only
    np.testing.assert_array_equal(flow.add_noise(x0, eps, jnp.ones(4)), eps)
    np.testing.assert_array_equal(flow.add_noise(x0, eps, jnp.zeros(4)), x0)
    np.testing.assert_allclose(flow.single_step_x0(eps, v), x0, atol=1e-6)


def test_per_token_times_broadcast():
    x0, eps = jnp.zeros((2, 3)), jnp.ones((2, 3))
    t = jnp.array([[0.0, 0.5, 1.0], [1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(flow.add_noise(x0, eps, t), t)


def test_shifted_schedule():
    times = flow.euler_schedule(4, shift=3.0)
    assert times[0] == 1.0 and times[-1] == 0.0 and bool(jnp.all(jnp.diff(times) < 0))
    np.testing.assert_allclose(flow.shift_timesteps(jnp.float32(0.5), 3.0), 0.75)
    np.testing.assert_allclose(flow.euler_schedule(4, 1.0), np.linspace(1, 0, 5), atol=1e-7)


def test_euler_with_exact_velocity_recovers_x0():
    # A straight-line flow from a fixed x0: v = eps - x0 everywhere is the exact field along the path,
    # so Euler is exact for any step count (up to fp32 round-off).
    x0 = jnp.arange(6.0).reshape(2, 3)
    eps = jnp.ones((2, 3))
    out = flow.euler_sample(lambda x, t: eps - x0, eps, num_steps=7, shift=5.0)
    np.testing.assert_allclose(out, x0, atol=1e-5)


def test_euler_on_a_nonlinear_field_converges():
    # dx/dt = x from t = 1 to 0: x(0) = x(1) * e^-1; Euler's global error is O(1/N).
    x1 = jnp.ones((1, 2))
    errors = [float(jnp.max(jnp.abs(flow.euler_sample(lambda x, t: x, x1, n) - np.exp(-1.0))))
              for n in (10, 100)]
    assert errors[1] < errors[0] / 5


def test_cfg_combines_conditional_and_unconditional():
    def model(x, t, ctx, mask):
        return x * 0 + ctx[:, :1, :1] + mask[:, :1, None].astype(jnp.float32)

    ctx, mask = jnp.full((2, 3, 1), 2.0), jnp.ones((2, 3), bool)
    null, null_mask = jnp.zeros_like(ctx), jnp.zeros_like(mask)
    v = flow.cfg_velocity_fn(model, ctx, mask, null, null_mask, scale=4.0)(jnp.zeros((2, 1, 1)),
                                                                         jnp.ones(2))
    np.testing.assert_allclose(v, 0.0 + 4.0 * (3.0 - 0.0))
    v1 = flow.cfg_velocity_fn(model, ctx, mask, null, null_mask, scale=1.0)(jnp.zeros((2, 1, 1)),
                                                                          jnp.ones(2))
    np.testing.assert_allclose(v1, 3.0)
