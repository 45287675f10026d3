"""Flow-matching conventions and samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _field(x, t, np_like):
    """A smooth velocity field that depends on x and on the model time, for the sampler parity tests."""
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return np_like.tanh(1.5 * x) * (0.5 + t) - 0.8 * x + np_like.sin(7.0 * t)


@pytest.mark.torch
@pytest.mark.parametrize("num_steps,shift", [(1, 1.0), (2, 3.0), (3, 1.0), (8, 3.0), (25, 5.0), (50, 3.0)])
def test_unipc_matches_diffusers_wan_scheduler(num_steps, shift):
    # diffusers' UniPCMultistepScheduler as WanPipeline builds it (its docs: "By default, Wan uses
    # UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)"),
    # driven by its own loop with the integer timesteps it hands the model, which ours gets exactly on the
    # DiT's scale (50 steps at shift 3, WanPipeline's defaults, has 251 at step 45: float32 251 / 1000 * 1000
    # is 250.99998). Both sides are float32; our weights are float64 from the same float32 levels. Measured
    # max |diff| 1.7e-6 on values up to 3.6 after 25 steps (float32 rounding of the two orders of
    # operations); 1e-5 leaves a 6x margin.
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=1000
    )
    scheduler.set_timesteps(num_steps)
    noise = np.random.default_rng(0).standard_normal((2, 1, 4, 4, 3)).astype(np.float32)
    x = torch.from_numpy(noise)
    for timestep in scheduler.timesteps:
        v = _field(x, timestep.float().reshape(1) / 1000.0, torch)
        x = scheduler.step(v, timestep, x).prev_sample

    sigmas, timesteps = flow.unipc_schedule(num_steps, shift)
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy().astype(np.float32))
    np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())
    seen = []

    def field(x, timestep):
        jax.debug.callback(lambda t: seen.append(np.asarray(t)[0]), timestep, ordered=True)
        return _field(x, timestep / 1000.0, jnp)

    ours = flow.unipc_sample(field, jnp.asarray(noise), num_steps, shift, time_scale=flow.TIMESTEP_SCALE)
    np.testing.assert_array_equal(np.array(seen), timesteps)
    np.testing.assert_allclose(ours, x.numpy(), atol=1e-5, rtol=1e-5)


def test_unipc_converges_faster_than_euler():
    # dx/dt = sin(3x) + x from t = 1 to 0, against Euler with 20,000 steps (its error there is about 1e-5).
    # UniPC's error falls about 4x per doubling of the steps (second order) where Euler's halves; its first
    # and last steps are first order, over the huge lambda range near t = 1 and the short last step.
    field = lambda x, t: jnp.sin(3.0 * x) + x
    x1 = jnp.ones((1, 2))
    exact = flow.euler_sample(field, x1, 20_000)
    error = lambda sample, n: float(jnp.max(jnp.abs(sample(field, x1, n) - exact)))
    unipc = [error(flow.unipc_sample, n) for n in (10, 20, 40, 80)]
    euler = [error(flow.euler_sample, n) for n in (10, 20, 40, 80)]
    assert all(u < e / 4 for u, e in zip(unipc, euler)), (unipc, euler)
    assert unipc[2] < unipc[1] / 3 and unipc[3] < unipc[2] / 3, unipc


def test_unknown_sampler_is_a_clear_error():
    assert flow.sampler("unipc") is flow.unipc_sample
    with pytest.raises(ValueError, match="unknown sampler 'heun': use one of euler, unipc"):
        flow.sampler("heun")
