"""Rectified-flow conventions of WAN 2.1 (as diffusers' WanPipeline uses them) and the samplers built on them.

`x_t = (1 - t) x0 + t eps`, t in [0, 1] with t = 1 pure noise; the model predicts `v = eps - x0`,
so `x0 = x_t - t v`. The DiT's timestep input is `TIMESTEP_SCALE * t`.

Samplers (`SAMPLERS`): `euler` on the shifted schedule, and `unipc`, the second-order UniPC
predictor-corrector that WAN 2.1 and diffusers' `WanPipeline` sample with. They hand the velocity
function `time_scale * t`: t itself by default, the DiT's timestep with `time_scale=TIMESTEP_SCALE`, which
keeps UniPC's integer timesteps exact (in float32, 1000 * (251 / 1000) is 250.99998).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

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


def euler_sample(
    velocity_fn: VelocityFn, noise: jax.Array, num_steps: int, shift: float = 1.0, time_scale: float = 1.0
) -> jax.Array:
    """Integrates dx/dt = v from t = 1 (x = noise) to t = 0 with Euler steps.

    Args:
      velocity_fn: `(x (B, ...), time_scale * t (B,)) -> v (B, ...)`, t in [0, 1]; CFG goes inside it.
      noise: `(B, ...)` the starting point at t = 1.
      time_scale: 1, or `TIMESTEP_SCALE` for a velocity function that takes the DiT's timesteps.
    Returns:
      x0 estimate, the same shape as `noise`, float32.
    """
    times = euler_schedule(num_steps, shift)
    batch = noise.shape[0]

    def body(x, i):
        t, t_next = times[i], times[i + 1]
        v = velocity_fn(x, jnp.full((batch,), time_scale * t))
        return x + (t_next - t) * v.astype(jnp.float32), None

    x, _ = jax.lax.scan(body, noise.astype(jnp.float32), jnp.arange(num_steps))
    return x


def unipc_schedule(num_steps: int, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """UniPC's noise levels and model times, as diffusers' `UniPCMultistepScheduler(prediction_type=
    "flow_prediction", use_flow_sigmas=True, flow_shift=shift)` (WAN's sampler) sets them.

    The levels are `num_steps` points of `linspace(1, 1/1000, num_steps + 1)`, shifted, the first moved
    to `1 - 1e-6` (lambda = log((1 - s) / s) must stay finite), then 0; rounded to float32 as there,
    which makes the first level's `1 - s` 1.013e-6. The model is called at the integer timesteps
    `trunc(1000 s)` (999 first).

    Returns:
      sigmas `(num_steps + 1,)` float32 from about 1 down to 0, and the model's integer timesteps
      `(num_steps,)` on the DiT's 0..1000 scale, float32 (exact).
    """
    sigmas = shift_timesteps(np.linspace(1.0, 1.0 / TIMESTEP_SCALE, num_steps + 1)[:-1], shift)  # float64
    if abs(sigmas[0] - 1.0) < 1e-6:
        sigmas[0] -= 1e-6
    timesteps = np.trunc(sigmas * TIMESTEP_SCALE)
    return np.append(sigmas, 0.0).astype(np.float32), timesteps.astype(np.float32)


def _unipc_coefficients(sigmas: np.ndarray) -> np.ndarray:
    """Per-step weights `(N, 8)` of UniPC (B(h) = e^-h - 1, "bh2"; data prediction; order 2, 1 at the ends).

    With `m_i = x_i - s_i v_i` the data prediction at step i (the model run at the predicted `x_i`), step i
    corrects `x_i <- w0 x_i + w1 xc_{i-1} + w2 m_{i-2} + w3 m_{i-1} + w4 m_i` (UniC, no extra model call;
    step 0 keeps `x_i`) and predicts `x_{i+1} = w5 xc_i + w6 m_i + w7 m_{i-1}` (UniP). Zhao et al. 2023,
    "UniPC", Algorithms 2-3 with lambda = log(alpha / sigma) = log((1 - s) / s); the orders and the
    order-2 predictor's rho = 1/2 follow diffusers. Computed in float64 from the float32 levels.
    """
    s = sigmas.astype(np.float64)
    n = len(s) - 1
    lam = np.log1p(-s[:n]) - np.log(s[:n])  # lambda of the last level (s = 0) is +inf; handled below
    orders = [min(2, n - i, i + 1) for i in range(n)]
    w = np.zeros((n, 8))
    for i in range(n):
        if i == 0:
            w[i, 0] = 1.0
        else:
            # UniC-p from level i-1 to i, p = the order of the previous predictor.
            h = lam[i] - lam[i - 1]
            phi1 = np.expm1(-h)
            scale = (1.0 - s[i]) * phi1  # alpha_i * B(h)
            w[i, 1] = s[i] / s[i - 1]
            w[i, 3] = -(1.0 - s[i]) * phi1
            if orders[i - 1] == 1:
                rho = np.array([0.5])
            else:
                r1 = (lam[i - 2] - lam[i - 1]) / h
                hh = -h
                phi_2 = phi1 / hh - 1.0
                phi_3 = phi_2 / hh - 0.5
                b = np.array([phi_2, 2.0 * phi_3]) / phi1
                rho = np.linalg.solve(np.array([[1.0, 1.0], [r1, 1.0]]), b)
                w[i, 2] -= scale * rho[0] / r1  # rho_0 D1, D1 = (m_{i-2} - m_{i-1}) / r1
                w[i, 3] += scale * rho[0] / r1
            w[i, 4] -= scale * rho[-1]  # rho_last (m_i - m_{i-1})
            w[i, 3] += scale * rho[-1]
        if i == n - 1:
            w[i, 6] = 1.0  # to s = 0: lambda = inf, e^-h - 1 = -1, so x_N = m_{N-1}
            continue
        h = lam[i + 1] - lam[i]
        phi1 = np.expm1(-h)
        w[i, 5] = s[i + 1] / s[i]
        w[i, 6] = -(1.0 - s[i + 1]) * phi1
        if orders[i] == 2:
            r1 = (lam[i - 1] - lam[i]) / h
            d = 0.5 * (1.0 - s[i + 1]) * phi1 / r1  # alpha B(h) rho D1, rho = 1/2, D1 = (m_{i-1} - m_i) / r1
            w[i, 6] += d
            w[i, 7] = -d
    return w.astype(np.float32)


def unipc_sample(
    velocity_fn: VelocityFn, noise: jax.Array, num_steps: int, shift: float = 1.0, time_scale: float = 1.0
) -> jax.Array:
    """Integrates the flow from t = 1 (x = noise) to t = 0 with UniPC (`unipc_schedule`, its weights).

    One model call per step, as Euler, but second order: the sampler of WAN 2.1 and of diffusers'
    `WanPipeline` (shift 3 for the 1.3B at 480p), matched to diffusers in tests/test_flow.py.

    Args:
      velocity_fn: `(x (B, ...), time_scale * t (B,)) -> v (B, ...)`, t in [0, 1); CFG goes inside it.
        The model times t are diffusers' integer timesteps over 1000: with `time_scale=TIMESTEP_SCALE`
        the function gets those integers exactly.
      noise: `(B, ...)` the starting point at t = 1.
    Returns:
      x0 estimate, the same shape as `noise`, float32.
    """
    sigmas, timesteps = unipc_schedule(num_steps, shift)
    times = (timesteps.astype(np.float64) * (time_scale / TIMESTEP_SCALE)).astype(np.float32)
    steps = (jnp.asarray(sigmas[:-1]), jnp.asarray(times), jnp.asarray(_unipc_coefficients(sigmas)))
    batch = noise.shape[0]
    x = noise.astype(jnp.float32)

    def body(carry, step):
        x, x_corrected, m1, m2 = carry
        sigma, t, w = step
        m0 = x - sigma * velocity_fn(x, jnp.full((batch,), t)).astype(jnp.float32)
        x = w[0] * x + w[1] * x_corrected + w[2] * m2 + w[3] * m1 + w[4] * m0
        return (w[5] * x + w[6] * m0 + w[7] * m1, x, m0, m1), None

    zeros = jnp.zeros_like(x)
    (x, *_), _ = jax.lax.scan(body, (x, zeros, zeros, zeros), steps)
    return x


SAMPLERS = {"euler": euler_sample, "unipc": unipc_sample}


def sampler(name: str) -> Callable[..., jax.Array]:
    """The sampler called `name` (a key of `SAMPLERS`); a ValueError listing them otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


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
