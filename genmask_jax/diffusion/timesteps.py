"""Per-task timestep laws on t in [0, 1] (t = 1 is pure noise; the DiT is fed `1000 * t`).

- generation: logit-normal, `t = sigmoid(n)`, `n ~ N(mean, std)` (SD3, arXiv 2403.03206 eq. 19).
- segmentation: GenMask's heavy-tailed law on the distance from pure noise `s = 1 - t`, density
  `p(s) = 2 a^2 s / (s^2 + a^2)^2`, CDF `F(s) = s^2 / (s^2 + a^2)`, drawn by inversion as
  `s = a * sqrt(u / (1 - u))`, clipped to [0, 1] (the clipped mass `a^2 / (1 + a^2)` lands on t = 0).
  With a = 0.05, P(t > 0.85) = F(0.15) = 0.90.

`sample_timesteps` draws per example by task id (TASK_SEGMENTATION / TASK_GENERATION) from a config
mapping such as `{"segmentation": {"law": "heavy_tailed", "a": 0.05},
"generation": {"law": "logit_normal", "mean": 0.0, "std": 1.0}}`; `sample_task_timesteps` draws for
the examples of one task and needs only that task's law. Each law takes only its own parameters
(LAW_PARAMS): a misspelt one is an error, not a silent default.
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


# Law name -> the parameters it takes, each optional (the samplers' defaults apply).
LAW_PARAMS = {"uniform": (), "logit_normal": ("mean", "std"), "heavy_tailed": ("a",)}
_POSITIVE = ("std", "a")


def check_law(law: Mapping) -> None:
    """Raises ValueError for an unknown law, a key no law takes (a misspelt `alpha` would otherwise train
    silently with the default `a`), or a non-positive scale. Another law's parameter is let through:
    `--config...law=uniform` cannot delete the `a` the config had, and such runs were saved."""
    name = law.get("law")
    if name not in LAW_PARAMS:
        raise ValueError(f"unknown timestep law {name!r} in {dict(law)}; known: {', '.join(LAW_PARAMS)}")
    known = {"law", *(key for params in LAW_PARAMS.values() for key in params)}
    unknown = sorted(set(law.keys()) - known)
    if unknown:
        allowed = ", ".join(["law", *LAW_PARAMS[name]])
        raise ValueError(f"timestep law {name!r}: unknown keys {unknown}; allowed: {allowed}")
    bad = [f"{key}={law[key]!r}" for key in _POSITIVE if key in law and not float(law[key]) > 0]
    if bad:
        raise ValueError(f"timestep law {name!r} needs {', '.join(bad)} > 0")


def check_timestep_config(config: Mapping) -> None:
    """Raises ValueError unless `config` maps task names (a subset of TASK_NAMES' values) to valid laws."""
    unknown = sorted(set(config.keys()) - set(TASK_NAMES.values()))
    if unknown:
        raise ValueError(f"timestep config: unknown tasks {unknown}; known: {', '.join(TASK_NAMES.values())}")
    for law in config.values():
        check_law(law)


def sample_law(rng: jax.Array, shape: Sequence[int], law: Mapping) -> jax.Array:
    """Draws from one law given as config data: {"law": name, ...its parameters} (see LAW_PARAMS)."""
    check_law(law)
    name = law["law"]
    if name == "uniform":
        return sample_uniform(rng, shape)
    if name == "logit_normal":
        return sample_logit_normal(rng, shape, law.get("mean", 0.0), law.get("std", 1.0))
    return sample_heavy_tailed(rng, shape, law.get("a", 0.05))


def task_law(config: Mapping, task_id: int) -> Mapping:
    """The law of task `task_id` in a timestep config; ValueError if it has none."""
    name = TASK_NAMES[task_id]
    if name not in config:
        raise ValueError(f"the timestep config has no law for {name!r} (it has {sorted(config)})")
    return config[name]


def sample_task_timesteps(
    rng: jax.Array, task_id: int, shape: Sequence[int], config: Mapping = DEFAULT_TIMESTEP_CONFIG
) -> jax.Array:
    """Timesteps of `shape` examples all of task `task_id`: only that task's law is needed, and the draws
    equal those `sample_timesteps(rng, ...)` gives examples of that task. float32 `shape` in [0, 1]."""
    return sample_law(jax.random.split(rng)[task_id], shape, task_law(config, task_id))


def sample_timesteps(
    rng: jax.Array, task_ids: jax.Array, config: Mapping = DEFAULT_TIMESTEP_CONFIG
) -> jax.Array:
    """Per-example timesteps drawn from each example's task law.

    Args:
      task_ids: int `(B,)`, TASK_SEGMENTATION or TASK_GENERATION.
      config: task name -> law (see module docstring). It may leave out a task that concrete `task_ids`
        do not hold; under jit the tasks present are unknown, so it needs both.
    Returns:
      float32 `(B,)` in [0, 1].
    """
    task_ids = jnp.asarray(task_ids)
    needed = [task_id for task_id in (TASK_GENERATION, TASK_SEGMENTATION) if TASK_NAMES[task_id] in config]
    if len(needed) < len(TASK_NAMES) and (
        not needed or isinstance(task_ids, jax.core.Tracer) or not np.isin(np.asarray(task_ids), needed).all()
    ):
        missing = [name for task_id, name in TASK_NAMES.items() if task_id not in needed]
        raise ValueError(
            f"the timestep config has no law for {missing} (it has {sorted(config)}) and the batch may hold "
            "such examples; draw one task's timesteps with sample_task_timesteps"
        )
    keys = jax.random.split(rng)  # one stream per task id, as in sample_task_timesteps
    t = None
    for task_id in needed:
        drawn = sample_law(keys[task_id], task_ids.shape, config[TASK_NAMES[task_id]])
        t = drawn if t is None else jnp.where(task_ids == task_id, drawn, t)
    return t


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
