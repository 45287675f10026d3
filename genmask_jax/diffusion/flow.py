"""Rectified-flow conventions of WAN (DESIGN.md 3) and the samplers built on them.

`x_t = (1 - t) x0 + t eps`, t in [0, 1] with t = 1 pure noise; the model predicts `v = eps - x0`,
so `x0 = x_t - t v`. The DiT's timestep input is `TIMESTEP_SCALE * t`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

TIMESTEP_SCALE = 1000.0

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def _expand(t: jax.Array, x: jax.Array) -> jax.Array:
    """Broadcasts per-example `(B,)` (or scalar) times against `x` `(B, ...)`."""
    t = jnp.asarray(t, jnp.float32)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x0 + t eps; `t` scalar, `(B,)` or broadcastable to `x0`."""
    t = _expand(t, x0)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """v = eps - x0 (the flow-matching regression target)."""
    return noise - x0


def predict_x0(x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x0 = x_t - t v."""
    return x_t - _expand(t, x_t) * v


def single_step_x0(noise: jax.Array, v: jax.Array) -> jax.Array:
    """GenMask's one-step segmentation: at t = 1, x_1 = eps, so x0 = eps - v."""
    return noise - v


def shift_timesteps(t: jax.Array, shift: float) -> jax.Array:
    """t' = shift t / (1 + (shift - 1) t) (SD3 / WAN schedule shift; shift = 1 is the identity)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def euler_schedule(num_steps: int, shift: float = 1.0) -> jax.Array:
    """`num_steps + 1` times from 1 down to 0 on the shifted schedule, float32."""
    return shift_timesteps(jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32), shift)


def classifier_free_guidance(v_cond: jax.Array, v_uncond: jax.Array, scale: float) -> jax.Array:
    """v = v_u + w (v_c - v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)


def euler_sample(velocity_fn: VelocityFn, noise: jax.Array, num_steps: int, shift: float = 1.0) -> jax.Array:
    """Integrates dx/dt = v from t = 1 (x = noise) to t = 0 with Euler steps.

    Args:
      velocity_fn: `(x (B, ...), t (B,) in [0, 1]) -> v (B, ...)`; CFG goes inside it.
      noise: `(B, ...)` the starting point at t = 1.
    Returns:
      x0 estimate, the same shape as `noise`, float32.
    """
    times = euler_schedule(num_steps, shift)
    batch = noise.shape[0]

    def body(x, i):
        t, t_next = times[i], times[i + 1]
        v = velocity_fn(x, jnp.full((batch,), t))
        return x + (t_next - t) * v.astype(jnp.float32), None

    x, _ = jax.lax.scan(body, noise.astype(jnp.float32), jnp.arange(num_steps))
    return x


def cfg_velocity_fn(
    model_fn: Callable[..., jax.Array],
    context: jax.Array,
    context_mask: jax.Array,
    null_context: jax.Array,
    null_mask: jax.Array,
    scale: float,
) -> VelocityFn:
    """Wraps `model_fn(x, t, context, context_mask) -> v` into a CFG velocity function.

    The conditional and unconditional passes run as one batch of 2B.
    """
    if scale == 1.0:
        return lambda x, t: model_fn(x, t, context, context_mask)

    def velocity(x, t):
        v = model_fn(
            jnp.concatenate([x, x]),
            jnp.concatenate([t, t]),
            jnp.concatenate([context, null_context]),
            jnp.concatenate([context_mask, null_mask]),
        )
        v_cond, v_uncond = jnp.split(v, 2)
        return classifier_free_guidance(v_cond, v_uncond, scale)

    return velocity
