"""Per-task timestep laws on t in [0, 1] (t = 1 is pure noise; the DiT is fed `1000 * t`).

- generation: logit-normal, `t = sigmoid(n)`, `n ~ N(mean, std)` (SD3, arXiv 2403.03206 eq. 19).
- segmentation: GenMask's heavy-tailed law on the distance from pure noise `s = 1 - t`, density
  `p(s) = 2 a^2 s / (s^2 + a^2)^2`, CDF `F(s) = s^2 / (s^2 + a^2)`, drawn by inversion as
  `s = a * sqrt(u / (1 - u))`, clipped to [0, 1] (the clipped mass `a^2 / (1 + a^2)` lands on t = 0).
  With a = 0.05, P(t > 0.85) = F(0.15) = 0.90.

`sample_timesteps` draws per example by task id (TASK_SEGMENTATION / TASK_GENERATION) from a config
mapping such as `{"segmentation": {"law": "heavy_tailed", "a": 0.05},
"generation": {"law": "logit_normal", "mean": 0.0, "std": 1.0}}`.
"""

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TASK_SEGMENTATION = 0
TASK_GENERATION = 1
TASK_NAMES = {TASK_SEGMENTATION: "segmentation", TASK_GENERATION: "generation"}

DEFAULT_TIMESTEP_CONFIG = {
    "segmentation": {"law": "heavy_tailed", "a": 0.05},
    "generation": {"law": "logit_normal", "mean": 0.0, "std": 1.0},
}


def sample_uniform(rng: jax.Array, shape: Sequence[int]) -> jax.Array:
    """t ~ U(0, 1), float32 of `shape`."""
    return jax.random.uniform(rng, shape, jnp.float32)


def sample_logit_normal(
    rng: jax.Array, shape: Sequence[int], mean: float = 0.0, std: float = 1.0
) -> jax.Array:
    """t = sigmoid(n), n ~ N(mean, std^2); float32 of `shape` in (0, 1)."""
    return jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape, jnp.float32))


def sample_heavy_tailed(rng: jax.Array, shape: Sequence[int], a: float = 0.05) -> jax.Array:
    """GenMask's segmentation law: t = 1 - clip(a * sqrt(u / (1 - u)), 0, 1), u ~ U(0, 1)."""
    u = jax.random.uniform(rng, shape, jnp.float32)
    s = a * jnp.sqrt(u / (1.0 - u))
    return 1.0 - jnp.clip(s, 0.0, 1.0)


def sample_law(rng: jax.Array, shape: Sequence[int], law: Mapping) -> jax.Array:
    """Draws from one law given as config data: {"law": name, ...its parameters}."""
    name = law["law"]
    if name == "uniform":
        return sample_uniform(rng, shape)
    if name == "logit_normal":
        return sample_logit_normal(rng, shape, law.get("mean", 0.0), law.get("std", 1.0))
    if name == "heavy_tailed":
        return sample_heavy_tailed(rng, shape, law.get("a", 0.05))
    raise ValueError(f"unknown timestep law {name!r}; known: uniform, logit_normal, heavy_tailed")


def sample_timesteps(
    rng: jax.Array, task_ids: jax.Array, config: Mapping = DEFAULT_TIMESTEP_CONFIG
) -> jax.Array:
    """Per-example timesteps drawn from each example's task law.

    Args:
      task_ids: int `(B,)`, TASK_SEGMENTATION or TASK_GENERATION.
      config: task name -> law (see module docstring).
    Returns:
      float32 `(B,)` in [0, 1].
    """
    task_ids = jnp.asarray(task_ids)
    rng_seg, rng_gen = jax.random.split(rng)
    t_seg = sample_law(rng_seg, task_ids.shape, config["segmentation"])
    t_gen = sample_law(rng_gen, task_ids.shape, config["generation"])
    return jnp.where(task_ids == TASK_SEGMENTATION, t_seg, t_gen)


def uniform_cdf(t: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(t, np.float64), 0.0, 1.0)


def logit_normal_cdf(t: np.ndarray, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    """P(T <= t) = Phi((logit(t) - mean) / std) for t in (0, 1)."""
    t = np.clip(np.asarray(t, np.float64), 1e-300, 1.0 - 1e-16)
    z = (np.log(t) - np.log1p(-t) - mean) / (std * math.sqrt(2.0))
    return 0.5 * (1.0 + np.vectorize(math.erf)(z))


def heavy_tailed_cdf(t: np.ndarray, a: float = 0.05) -> np.ndarray:
    """P(T <= t) = 1 - F(1 - t) with F(s) = s^2 / (s^2 + a^2); includes the atom at t = 0."""
    t = np.asarray(t, np.float64)
    s = 1.0 - np.clip(t, 0.0, 1.0)
    cdf = 1.0 - s**2 / (s**2 + a**2)
    return np.where(t < 0.0, 0.0, cdf)
