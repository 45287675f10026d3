"""Timestep laws against their analytic CDFs (10^5 draws) and the paper's figures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genmask_jax.diffusion import timesteps as ts

N = 100_000
# Kolmogorov's asymptotic critical value at significance 1e-3 is 1.949 / sqrt(n) = 0.0062 for n = 1e5:
# a correct sampler fails this bound once in a thousand seeds; a wrong law misses it by far more.
KS_BOUND = 1.949 / np.sqrt(N)


def ks_statistic(samples: np.ndarray, cdf) -> float:
    """sup |F_n - F| over the sample, with ties/atoms handled by comparing both one-sided limits."""
    x = np.sort(np.asarray(samples, np.float64))
    values, counts = np.unique(x, return_counts=True)
    right = np.cumsum(counts) / x.size
    left = right - counts / x.size
    f_right = cdf(values)
    f_left = cdf(np.nextafter(values, -np.inf))
    return float(max(np.max(np.abs(right - f_right)), np.max(np.abs(left - f_left))))


@pytest.mark.parametrize("name,draw,cdf", [
    ("uniform", lambda k: ts.sample_uniform(k, (N,)), ts.uniform_cdf),
    ("logit_normal(0,1)", lambda k: ts.sample_logit_normal(k, (N,)), ts.logit_normal_cdf),
    ("logit_normal(0.5,0.7)", lambda k: ts.sample_logit_normal(k, (N,), 0.5, 0.7),
     lambda t: ts.logit_normal_cdf(t, 0.5, 0.7)),
    ("heavy_tailed(0.05)", lambda k: ts.sample_heavy_tailed(k, (N,), 0.05),
     lambda t: ts.heavy_tailed_cdf(t, 0.05)),
    ("heavy_tailed(0.1)", lambda k: ts.sample_heavy_tailed(k, (N,), 0.1),
     lambda t: ts.heavy_tailed_cdf(t, 0.1)),
    ("heavy_tailed(0.5)", lambda k: ts.sample_heavy_tailed(k, (N,), 0.5),
     lambda t: ts.heavy_tailed_cdf(t, 0.5)),
])
def test_sampler_matches_analytic_cdf(name, draw, cdf):
    t = np.asarray(draw(jax.random.key(0)))
    assert t.dtype == np.float32 and t.min() >= 0.0 and t.max() <= 1.0
    assert ks_statistic(t, cdf) < KS_BOUND, name


def test_ks_statistic_rejects_the_wrong_law():
    t = np.asarray(ts.sample_heavy_tailed(jax.random.key(0), (N,), 0.1))
    assert ks_statistic(t, lambda x: ts.heavy_tailed_cdf(x, 0.05)) > 10 * KS_BOUND


def test_ninety_percent_above_085_for_a_005():
    t = np.asarray(ts.sample_heavy_tailed(jax.random.key(1), (N,), 0.05))
    # Analytic 0.9 (the paper's 90% of samples in t > 0.85); binomial std at n = 1e5 is 0.001, so +-0.01
    # is 10 sigma.
    assert abs(np.mean(t > 0.85) - 0.90) <= 0.01
    assert ts.heavy_tailed_cdf(0.85, 0.05) == pytest.approx(0.10, abs=1e-12)


def test_histogram_peaks_match_paper_figures():
    edges = np.linspace(0.0, 1.0, 101)
    seg = np.histogram(np.asarray(ts.sample_heavy_tailed(jax.random.key(2), (N,), 0.05)), edges)[0] / N
    gen = np.histogram(np.asarray(ts.sample_logit_normal(jax.random.key(3), (N,))), edges)[0] / N
    # Analytic peaks: F(0.03) - F(0.02) = 0.127 (bin [0.97, 0.98]) and pdf(0.5) * 0.01 = 0.016.
    # Tolerances are ~4 binomial sigmas (0.0011 and 0.0004 at n = 1e5).
    assert seg.max() == pytest.approx(0.127, abs=0.005) and np.argmax(seg) in (96, 97)
    # The logit-normal density is flat near its mode (pdf(0.4) / pdf(0.5) = 0.98), so only the bin
    # of the peak is loose.
    assert gen.max() == pytest.approx(0.016, abs=0.0015) and abs(np.argmax(gen) - 49.5) <= 10


def test_sample_timesteps_draws_per_task():
    task_ids = jnp.array([ts.TASK_SEGMENTATION] * N + [ts.TASK_GENERATION] * N)
    t = np.asarray(jax.jit(ts.sample_timesteps)(jax.random.key(4), task_ids))
    seg, gen = t[:N], t[N:]
    assert ks_statistic(seg, lambda x: ts.heavy_tailed_cdf(x, 0.05)) < KS_BOUND
    assert ks_statistic(gen, ts.logit_normal_cdf) < KS_BOUND


def test_unknown_law_fails_clearly():
    with pytest.raises(ValueError, match="unknown timestep law"):
        ts.sample_law(jax.random.key(0), (3,), {"law": "cosine"})


@pytest.mark.parametrize("law,unknown", [
    ({"law": "heavy_tailed", "alpha": 0.5}, "'alpha'"),
    ({"law": "logit_normal", "loc": 1.0}, "'loc'"),
    ({"law": "uniform", "sigma": 0.1}, "'sigma'"),
])
def test_misspelt_law_parameter_fails(law, unknown):
    with pytest.raises(ValueError, match=f"unknown keys .*{unknown}.*allowed: law"):
        ts.sample_law(jax.random.key(0), (3,), law)


def test_a_parameter_left_from_another_law_is_ignored():
    """`--config.model.timesteps.segmentation.law=uniform` cannot delete the config's `a`: runs trained
    that way exist, and the law draws as without it."""
    key = jax.random.key(0)
    left = ts.sample_law(key, (64,), {"law": "uniform", "a": 0.05})
    np.testing.assert_array_equal(left, ts.sample_law(key, (64,), {"law": "uniform"}))


@pytest.mark.parametrize("law", [{"law": "heavy_tailed", "a": 0.0}, {"law": "heavy_tailed", "a": -0.1},
                                 {"law": "logit_normal", "mean": 0.0, "std": 0.0}])
def test_non_positive_scale_fails(law):
    with pytest.raises(ValueError, match="> 0"):
        ts.sample_law(jax.random.key(0), (3,), law)


def test_one_task_config_samples_only_its_law():
    key, seg_only = jax.random.key(5), {"segmentation": {"law": "heavy_tailed", "a": 0.1}}
    two_task = {**seg_only, "generation": ts.DEFAULT_TIMESTEP_CONFIG["generation"]}
    seg_ids = jnp.zeros(64, jnp.int32)
    t = ts.sample_timesteps(key, seg_ids, seg_only)
    # The same draws as the two-task config gives the same examples, and as the single-task sampler.
    np.testing.assert_array_equal(t, ts.sample_timesteps(key, seg_ids, two_task))
    np.testing.assert_array_equal(t, ts.sample_task_timesteps(key, ts.TASK_SEGMENTATION, (64,), seg_only))
    with pytest.raises(ValueError, match="no law for"):
        ts.sample_timesteps(key, jnp.array([0, 1]), seg_only)
    with pytest.raises(ValueError, match="sample_task_timesteps"):  # under jit the tasks are unknown
        jax.jit(lambda k, ids: ts.sample_timesteps(k, ids, seg_only))(key, seg_ids)
    with pytest.raises(ValueError, match="no law for 'generation'"):
        ts.sample_task_timesteps(key, ts.TASK_GENERATION, (2,), seg_only)
