"""GenMask task assembly: frame layout, per-token timesteps, mask-frame-only loss, text dropout."""

import copy
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import make_batch, random_vae, tiny_model

from genmask_jax.diffusion import flow
from genmask_jax.diffusion import timesteps as ts
from genmask_jax.models import build
from genmask_jax.models.genmask import GenMask, drop_text, null_text


class EchoDiT(GenMask):
    """A stand-in DiT returning its input plus the mean of its (masked) context: the losses become
    closed-form functions of the assembled inputs."""

    def apply_dit(self, dit_params, x, t, context, context_mask):
        ctx = jnp.sum(context * context_mask[..., None], axis=(1, 2))
        return x + ctx[:, None, None, None, None]


def latent_batch(seed, n, hw=4, z=16, text_dim=32):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    sub = {
        "image_latent": f(n, 1, hw, hw, z),
        "context": f(n, 8, text_dim),
        "context_mask": jnp.ones((n, 8), bool),
    }
    return {"seg": {**sub, "mask_latent": f(n, 1, hw, hw, z)}, "gen": dict(sub)}


def test_segmentation_inputs_layout():
    model = tiny_model()
    b = latent_batch(0, 3)["seg"]
    noise = jnp.ones_like(b["mask_latent"])
    t = jnp.array([0.9, 0.5, 1.0])
    x, t_frames, target = model.segmentation_inputs(b["image_latent"], b["mask_latent"], t, noise)
    assert x.shape == (3, 2, 4, 4, 16) and t_frames.shape == (3, 2)  # the DiT repeats them per token
    np.testing.assert_array_equal(x[:, :1], b["image_latent"])  # clean image frame first
    np.testing.assert_allclose(x[:, 1:], flow.add_noise(b["mask_latent"], noise, t), atol=1e-6)
    np.testing.assert_array_equal(t_frames[:, 0], 0.0)  # image frame at t = 0
    np.testing.assert_allclose(t_frames[:, 1], 1000 * np.asarray(t), rtol=1e-6)
    np.testing.assert_array_equal(target, noise - b["mask_latent"])


def test_segmentation_loss_is_on_the_mask_frame_only():
    model = EchoDiT(tiny_model().dit, None)
    batch = latent_batch(1, 2)
    draws = model.draw(jax.random.key(0), batch)
    seg = batch["seg"]
    loss = model.segmentation_loss(None, None, seg, draws["seg"])
    t, noise = draws["seg"]["t"], draws["seg"]["noise"]
    ctx = jnp.sum(seg["context"], axis=(1, 2))[:, None, None, None, None]
    v_mask = flow.add_noise(seg["mask_latent"], noise, t) + ctx
    expected = jnp.mean((v_mask - (noise - seg["mask_latent"])) ** 2, axis=(1, 2, 3, 4))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_text_dropout_applies_to_generation_only():
    model = EchoDiT(tiny_model().dit, None, text_dropout=1.0)
    batch = latent_batch(2, 4)
    draws = model.draw(jax.random.key(0), batch)
    assert "drop_text" not in draws["seg"] and bool(jnp.all(draws["gen"]["drop_text"]))
    # Generation with every context dropped equals generation with a zero context...
    zero_ctx = {**batch["gen"], "context": jnp.zeros_like(batch["gen"]["context"])}
    kept = {**draws["gen"], "drop_text": jnp.zeros(4, bool)}
    np.testing.assert_allclose(
        model.generation_loss(None, None, batch["gen"], draws["gen"]),
        model.generation_loss(None, None, zero_ctx, kept),
        rtol=1e-6,
    )
    # ...while segmentation still sees its context (the loss changes with it).
    seg_zero = {**batch["seg"], "context": jnp.zeros_like(batch["seg"]["context"])}
    assert not np.allclose(
        model.segmentation_loss(None, None, batch["seg"], draws["seg"]),
        model.segmentation_loss(None, None, seg_zero, draws["seg"]),
    )


@pytest.mark.parametrize("bad", [1.5, -0.2, float("nan")])
def test_text_dropout_outside_0_1_is_refused(bad):
    """A probability: 1.5 dropped every text and -0.2 none, silently (bernoulli clips)."""
    dit = tiny_model().dit
    for ok in (0.0, 1.0):
        assert GenMask(dit, None, text_dropout=ok).text_dropout == ok
    with pytest.raises(ValueError, match="text_dropout is a probability in"):
        GenMask(dit, None, text_dropout=bad)
    from configs.genmask import get_config

    config = get_config("variant=tiny")
    config.model.text_dropout = bad
    with pytest.raises(ValueError, match=f"text_dropout is a probability in .*got {bad}"):
        build.build_model(config)


def test_a_temporal_patch_is_refused_where_the_model_is_made():
    """GenMask's image and mask frames must stay separate tokens; a temporal patch of 2 used to fail later,
    in the 1-frame dummy of build.dit_initializer, with a message about the latent size."""
    from configs.genmask import get_config
    from genmask_jax.models.dit import WanDiT, init_params

    dit = dataclasses.replace(tiny_model().dit, patch_size=(2, 2, 2))
    with pytest.raises(ValueError, match=r"dit.patch_size \(2, 2, 2\) must patch 1 frame: GenMask's image"):
        GenMask(dit, None)
    config = get_config("variant=tiny")
    config.model.dit.patch_size = (2, 2, 2)
    with pytest.raises(ValueError, match="must patch 1 frame"):
        build.build_model(config)
    # The plain DiT keeps diffusers' general patch.
    x = jnp.ones((1, 2, 4, 4, dit.in_channels))
    params = init_params(dit, jax.random.key(0), latent_shape=(1, 2, 4, 4))
    out = WanDiT(dit).apply({"params": params}, x, jnp.ones((1,)), jnp.ones((1, 8, dit.text_dim)))
    assert out.shape == x.shape


def test_drop_text_and_null_text():
    ctx, mask = jnp.ones((3, 4, 2)), jnp.ones((3, 4), bool)
    c, m = drop_text(ctx, mask, jnp.array([True, False, True]))
    np.testing.assert_array_equal(c[0], 0.0) and np.testing.assert_array_equal(c[1], 1.0)
    np.testing.assert_array_equal(m, [[False] * 4, [True] * 4, [False] * 4])
    nc, nm = null_text(ctx, mask)
    assert not bool(jnp.any(nc)) and not bool(jnp.any(nm))


def test_draws_follow_the_task_laws():
    model = tiny_model()
    batch = latent_batch(3, 2000, hw=2)
    draws = model.draw(jax.random.key(1), batch)
    t_seg, t_gen = np.asarray(draws["seg"]["t"]), np.asarray(draws["gen"]["t"])
    # a = 0.05: 90% of segmentation times above 0.85; logit-normal(0, 1): only ~26%.
    # Binomial std at n = 2000 is 0.007 and 0.01: the bounds are > 4 sigma away.
    assert np.mean(t_seg > 0.85) > 0.86 and np.mean(t_gen > 0.85) < 0.35
    gen_only = model.draw(jax.random.key(1), {"gen": batch["gen"]})
    assert set(gen_only) == {"gen"}
    drop_rate = float(jnp.mean(draws["gen"]["drop_text"]))
    assert abs(drop_rate - model.text_dropout) < 0.03  # 4 sigma at n = 2000, p = 0.1


def test_vae_latents_in_the_step_equal_precomputed_latents():
    model = tiny_model()
    vae = random_vae(model)
    batch = jax.tree.map(jnp.asarray, make_batch(0, 2, 2))
    image_latent = model.encode(vae, batch["seg"]["image"])
    assert image_latent.shape == (2, 1, 4, 4, 16)
    pre = {
        "seg": {
            **batch["seg"],
            "image_latent": image_latent,
            "mask_latent": model.mask_latents(vae, batch["seg"]),
        },
        "gen": {**batch["gen"], "image_latent": model.encode(vae, batch["gen"]["image"])},
    }
    for task in ("seg", "gen"):
        for key in ("image", "mask"):
            pre[task].pop(key, None)
    dit = jax.jit(build.dit_initializer(model))(jax.random.key(0))
    dit = jax.tree.map(
        lambda x: x.value if hasattr(x, "value") else x, dit, is_leaf=lambda x: hasattr(x, "value")
    )
    draws = model.draw(jax.random.key(2), batch)
    from_pixels = model.per_example_losses(dit, vae, batch, draws)
    from_latents = model.per_example_losses(dit, None, pre, draws)
    for task in ("seg", "gen"):
        np.testing.assert_allclose(from_pixels[task], from_latents[task], rtol=1e-5)  # same graph


def test_segment_and_generate_shapes():
    model = tiny_model()
    vae = random_vae(model)
    dit = nn.meta.unbox(jax.jit(build.dit_initializer(model))(jax.random.key(0)))
    batch = make_batch(1, 2, 0)["seg"]
    mask, score = jax.jit(model.segment)(
        dit, vae, batch["image"], batch["context"], batch["context_mask"], jax.random.key(0)
    )
    assert mask.shape == (2, 32, 32) and mask.dtype == bool and score.shape == (2, 32, 32)
    latents = model.generate_latents(
        dit,
        batch["context"],
        batch["context_mask"],
        jax.random.key(0),
        (4, 4),
        num_steps=2,
        guidance_scale=3.0,
    )
    assert latents.shape == (2, 1, 4, 4, 16) and bool(jnp.all(jnp.isfinite(latents)))


def test_generation_cfg_calls_conditional_and_null_context():
    seen = []

    @dataclasses.dataclass(frozen=True)
    class Spy(GenMask):
        def apply_dit(self, dit_params, x, t, context, context_mask):
            seen.append(context.shape)
            count = jnp.sum(context_mask, axis=1).astype(jnp.float32)
            return jnp.zeros_like(x) + count[:, None, None, None, None]

    model = Spy(tiny_model().dit, None)
    ctx, mask = jnp.ones((2, 8, 32)), jnp.ones((2, 8), bool)
    latents = model.generate_latents(
        None, ctx, mask, jax.random.key(0), (4, 4), num_steps=1, guidance_scale=2.0
    )
    # One batch of 2B (conditional + null); v = v_null + 2 (v_cond - v_null) = 0 + 2 * 8; one Euler step
    # from t = 1 to 0 gives noise - 16.
    assert seen == [(4, 8, 32)]
    noise = jax.random.normal(jax.random.key(0), latents.shape)
    np.testing.assert_allclose(latents, noise - 16.0, atol=1e-5)


@pytest.mark.torch
def test_unipc_generation_gives_the_dit_diffusers_integer_timesteps():
    """50 steps at shift 3 (WanPipeline's and generate's defaults): diffusers hands the DiT 251 at step 45,
    which the sampler used to pass as float32 0.251, so the DiT saw 1000 * 0.251 = 250.99998."""
    diffusers = pytest.importorskip("diffusers")
    seen = []

    @dataclasses.dataclass(frozen=True)
    class Spy(GenMask):
        def apply_dit(self, dit_params, x, t, context, context_mask):
            jax.debug.callback(lambda t: seen.append(np.asarray(t)), t, ordered=True)
            return jnp.zeros_like(x)

    model = Spy(tiny_model().dit, None)
    ctx, mask = jnp.ones((1, 8, 32)), jnp.ones((1, 8), bool)
    model.generate_latents(None, ctx, mask, jax.random.key(0), (2, 2), sampler="unipc")
    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    scheduler.set_timesteps(50)
    expected = scheduler.timesteps.numpy().astype(np.float32)
    assert 251 in expected
    np.testing.assert_array_equal(np.stack(seen), np.stack([expected, expected], 1))  # CFG: 2 rows a call


@pytest.mark.parametrize("bad", [{"law": "nope"}])
def test_bad_timestep_config_fails(bad):
    model = dataclasses.replace(tiny_model(), timesteps={"segmentation": bad, "generation": bad})
    with pytest.raises(ValueError):
        model.draw(jax.random.key(0), latent_batch(0, 2))


def test_one_task_model_needs_only_its_law():
    """A segmentation-only model draws from its one law, the same draws as the two-task model."""
    batch = {"seg": latent_batch(4, 6)["seg"]}
    two_task = tiny_model()
    seg_law = dict(two_task.timesteps["segmentation"])
    seg_only = dataclasses.replace(two_task, timesteps={"segmentation": seg_law})
    draws = seg_only.draw(jax.random.key(7), batch)
    np.testing.assert_array_equal(draws["seg"]["t"], two_task.draw(jax.random.key(7), batch)["seg"]["t"])
    with pytest.raises(ValueError, match="no law for 'generation'"):
        seg_only.draw(jax.random.key(7), {"gen": latent_batch(4, 2)["gen"]})


def test_draw_keeps_the_two_task_streams():
    """draw's timesteps are those sample_timesteps gave before single-task drawing (per-task key fold)."""
    model, batch, rng = tiny_model(), latent_batch(5, 8), jax.random.key(3)
    draws = model.draw(rng, batch)
    for task in ("seg", "gen"):
        task_id = ts.TASK_SEGMENTATION if task == "seg" else ts.TASK_GENERATION
        k_t = jax.random.split(jax.random.fold_in(rng, task_id), 3)[0]
        ids = jnp.full((8,), task_id, jnp.int32)
        np.testing.assert_array_equal(draws[task]["t"], ts.sample_timesteps(k_t, ids, model.timesteps))


def test_default_timestep_laws_are_not_shared():
    saved = copy.deepcopy(ts.DEFAULT_TIMESTEP_CONFIG)
    try:
        model = GenMask(tiny_model().dit)
        model.timesteps["segmentation"]["a"] = 0.5
        assert ts.DEFAULT_TIMESTEP_CONFIG == saved
        assert GenMask(tiny_model().dit).timesteps["segmentation"]["a"] == saved["segmentation"]["a"]
    finally:  # the unfixed code mutated the module default: keep the other tests' laws
        ts.DEFAULT_TIMESTEP_CONFIG.clear()
        ts.DEFAULT_TIMESTEP_CONFIG.update(saved)


def test_build_model_rejects_a_misspelt_law():
    from configs.genmask import get_config

    config = get_config("variant=tiny")
    config.model.timesteps.segmentation = {"law": "heavy_tailed", "alpha": 0.5}
    with pytest.raises(ValueError, match="unknown keys"):
        build.build_model(config)


def test_shipped_configs_build_with_valid_timestep_laws():
    from configs import demo
    from configs.genmask import get_config
    from genmask_jax.experiments import ablation

    configs = [get_config(f"variant={v}") for v in ("tiny", "paper")]
    configs += [demo.get_config(arg) for arg in ("", "dit=coarse", "variant=smoke")]
    configs += [
        ablation.variant_config(demo.get_config(), variant, steps=10, seed=0)
        for variant in ablation.STUDIES["timestep_law"].values()
    ]
    for config in configs:
        ts.check_timestep_config(build.build_model(config).timesteps)


def test_frozen_vae_refuses_a_config_that_is_not_the_weights():
    """The latent statistics belong to the weights of config.vae_from: the experiment's differing ones are
    an error, not a warning; dtypes are the experiment's choice (the weights are cast)."""
    from configs.demo import TOY_VAE
    from configs.genmask import get_config
    from genmask_jax.infer import checkpoint
    from genmask_jax.parallel.mesh import make_mesh
    from genmask_jax.parallel.sharding import rules_from_config
    from genmask_jax.train.vae_pretrain import load_config

    config = get_config("variant=tiny")  # the tiny VAE's structure, WAN 2.1's statistics
    config.vae_from = TOY_VAE
    model = build.build_model(config)
    expected = r"latents_mean: checkpoint \(-0.19.*experiment \(-0.757.*latents_std: .*Set config.model.vae"
    with pytest.raises(ValueError, match=expected):
        build.frozen_vae(config, model)
    mesh = make_mesh((1, -1, 1), devices=jax.devices()[:1])
    with pytest.raises(checkpoint.CheckpointError, match="latents_std"):  # one line from the inference CLIs
        checkpoint.load_vae(config, model, mesh, rules_from_config(config.sharding.logical_axis_rules))
    config.model.vae = dataclasses.replace(load_config(TOY_VAE), param_dtype="bfloat16").to_dict()
    variables, _ = build.frozen_vae(config, build.build_model(config))
    assert {x.dtype for x in jax.tree.leaves(variables)} == {np.dtype(jnp.bfloat16)}
    rounded = [float(f"{x:.6g}") for x in load_config(TOY_VAE).latents_std]  # as written by hand
    config.model.vae = dataclasses.replace(load_config(TOY_VAE), latents_std=rounded).to_dict()
    build.frozen_vae(config, build.build_model(config))


def test_abstract_shapes_are_traced_once_per_config_and_handed_out_as_copies(monkeypatch):
    """The model inits traced for their shapes (about a second for the VAE) are traced once per config;
    every caller gets its own tree, equal to a fresh trace, which it may edit without touching another's."""
    from convert import wan_dit
    from genmask_jax.models import vae

    model = tiny_model()
    fresh = {"dit": jax.eval_shape(build.dit_initializer(model), jax.random.key(0)),
             "vae": jax.eval_shape(lambda r: vae.WanVAE(model.vae).init(r, jnp.zeros((1, 1, 8, 8, 3))),
                                   jax.random.key(0))}
    for cached in (build._abstract_dit, vae.abstract_params, wan_dit._expected_shapes):
        cached.cache_clear()
    traced = []
    eval_shape = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: (traced.append(1), eval_shape(*a, **k))[1])

    def described(tree):  # shapes, dtypes and logical axes, leaf by leaf
        leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        return [(x.names, x.value.shape, x.value.dtype) for x in leaves]

    for get, want in ((lambda: build.abstract_dit(model), fresh["dit"]),
                      (lambda: build.abstract_frozen(model)["vae"], fresh["vae"]),
                      (lambda: wan_dit.expected_shapes(model.dit), None)):
        traced.clear()
        first = get()
        first.pop(next(iter(first)))  # a caller editing its copy
        second = get()
        assert len(traced) == 1  # the second call is served from the first trace
        if want is not None:
            assert described(second) == described(want) and described(second)
        else:
            assert len(second) == len(first) + 1
    traced.clear()
    build.abstract_dit(model, text_len=4)  # other arguments: traced again
    assert len(traced) == 1
