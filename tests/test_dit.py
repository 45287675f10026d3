"""WanDiT against diffusers' WanTransformer3DModel (tiny, random, fp32), splash attention, sharding."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import wan_dit
from genmask_jax.models.attention import dot_product_attention
from genmask_jax.models.dit import REMAT_POLICIES, DiTConfig, WanDiT, init_params
from genmask_jax.models.genmask import GenMask
from genmask_jax.models.layers import materialize_cotangent
from genmask_jax.parallel.mesh import make_mesh
from genmask_jax.parallel.sharding import DEFAULT_RULES, logical_sharding

# fp32 everywhere; measured max |diff| is ~1.1e-6 on outputs of magnitude ~2 (2 blocks). The
# rounding floor: the timestep sinusoid at t ~ 1000 computes angles of ~1000 rad in float32, and
# torch's and XLA's float32 exp/sin differ by an ulp there. 1e-5 leaves a 10x margin.
ATOL = 1e-5
RTOL = 0.0

TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=128,
    num_layers=2,
)
TEXT_LEN = 8


def tiny_diffusers_model(seed: int = 0):
    """A random tiny WanTransformer3DModel; norm weights perturbed so a swapped mapping shows."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def torch_forward(model, x, t, ctx):
    """diffusers on our channels-last layout: (B, F, H, W, C) in and out."""
    import torch

    with torch.no_grad():
        out = model(
            torch.from_numpy(np.moveaxis(x, -1, 1)).contiguous(), torch.from_numpy(t), torch.from_numpy(ctx)
        ).sample
    return np.moveaxis(out.numpy(), 1, -1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = tiny_diffusers_model()
    path = tmp_path_factory.mktemp("wan_dit") / "transformer"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def converted(reference):
    """scan_layers -> (config, params) converted from the saved diffusers folder."""
    _, path = reference
    return {scan: wan_dit.load(path, scan_layers=scan) for scan in (False, True)}


def inputs(batch, frames, height, width, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, frames, height, width, 16)).astype(np.float32)
    ctx = rng.standard_normal((batch, TEXT_LEN, TINY["text_dim"])).astype(np.float32)
    return x, ctx


def per_token_timesteps(batch, frames, height, width, t):
    """t = 0 on the first frame's tokens (the clean image frame), t on the others."""
    tokens_per_frame = (height // 2) * (width // 2)
    ts = np.full((batch, frames * tokens_per_frame), t, np.float32)
    ts[:, :tokens_per_frame] = 0.0
    return ts


CASES = {
    "one_frame": ((1, 1, 8, 8), np.array([500.0], np.float32)),
    "two_frames": ((1, 2, 8, 8), np.array([999.0], np.float32)),
    "non_square": ((1, 1, 8, 12), np.array([250.0], np.float32)),
    "per_token_t0_first_frame": ((1, 2, 8, 8), per_token_timesteps(1, 2, 8, 8, 700.0)),
    "batch2_different_t": ((2, 1, 8, 8), np.array([999.0, 37.5], np.float32)),
}


@pytest.mark.torch
@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(reference, converted, case, scan):
    model, _ = reference
    config, params = converted[scan]
    shape, t = CASES[case]
    x, ctx = inputs(*shape)
    expected = torch_forward(model, x, t, ctx)
    out = jax.jit(WanDiT(config).apply)({"params": params}, x, t, ctx)
    assert out.shape == expected.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.torch
@pytest.mark.parametrize("patch", [(2, 2, 2), (1, 4, 4)])
def test_other_patch_sizes_convert_and_match_diffusers(tmp_path, patch):
    """The converter traced the DiT's init on a fixed 1 x 4 x 4 latent: a checkpoint of another patch
    size (inferred from its tensors) did not convert."""
    import torch

    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**{**TINY, "patch_size": patch}).eval()
    model.save_pretrained(tmp_path / "transformer")
    config, params = wan_dit.load(tmp_path / "transformer")
    assert config.patch_size == patch
    x, ctx = inputs(1, 2, 8, 8)
    t = np.array([600.0], np.float32)
    out = WanDiT(config).apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
    np.testing.assert_allclose(np.asarray(out), torch_forward(model, x, t, ctx), atol=ATOL, rtol=RTOL)


@pytest.mark.torch
@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_parameter_gradients_match_diffusers(reference, converted, scan):
    """The backward (XLA attention's hand-written vjp, the checkpointed norms and gelu, the CPU cotangent
    boundaries) against torch autograd, for every parameter; per-token timesteps, t = 0 on frame 0.

    Measured max |diff| / max |grad| per tensor in fp32 (2 blocks): below 2.3e-6, so 2e-5 is the bound,
    except 1.6e-5 for the time embedder's first kernel, whose gradient is the timestep sinusoid itself:
    at t = 700 the float32 angles' ulp is 6e-5 rad, where torch's and XLA's sin/cos differ (1e-4 there).
    """
    import torch

    model, _ = reference
    config, params = converted[scan]
    x, ctx = inputs(2, 2, 8, 8)
    t = per_token_timesteps(2, 2, 8, 8, 700.0)
    model.zero_grad(set_to_none=True)
    out = model(
        torch.from_numpy(np.moveaxis(x, -1, 1)).contiguous(), torch.from_numpy(t), torch.from_numpy(ctx)
    ).sample
    (out**2).mean().backward()
    want = {name: p.grad.numpy() for name, p in model.named_parameters()}

    def loss(p):
        return jnp.mean(WanDiT(config).apply({"params": p}, x, t, ctx) ** 2)

    got = wan_dit.unstack(jax.jit(jax.grad(loss))(params), config)
    assert {wan_dit.diffusers_key(path) for path in got} == set(want)
    worst = {}
    for path, g in got.items():
        w = want[wan_dit.diffusers_key(path)]
        g = wan_dit.from_flax(path, g)
        worst[path] = float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30))
    sinusoid = worst.pop("condition_embedder/time_embedder/linear_1/kernel")
    assert sinusoid < 1e-4 and max(worst.values()) < 2e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.parametrize("residual_dtype,stream_values", [("bfloat16", 0), ("float32", 4)])
def test_elementwise_intermediates_are_recomputed_not_saved(residual_dtype, stream_values):
    """Per block the backward keeps the FFN's input and output of the gelu and no float32 copy of the
    (L, D) stream: the norms, modulation, gelu and gated residual adds are checkpointed (layers.py).
    A float32 residual stream is saved as itself, its 4 values (the block's input and its three residual
    adds) and nothing wider."""
    config = DiTConfig.from_variant("tiny", dtype="bfloat16", num_layers=1, residual_dtype=residual_dtype)
    params = init_params(config, jax.random.key(0))
    x, ctx = inputs(1, 2, 8, 8)
    model = WanDiT(config)
    _, backward = jax.vjp(lambda p: model.apply({"params": p}, x, jnp.array([500.0]), ctx), params)
    length = 2 * 4 * 4
    saved = [r for r in jax.tree.leaves(backward) if length in r.shape and r.ndim >= 2]
    ffn = [r for r in saved if r.shape[-1] == config.ffn_dim]
    assert len(ffn) == 2, [(r.shape, r.dtype) for r in ffn]
    wide32 = [r for r in saved if r.dtype == jnp.float32 and r.shape[-1] >= config.dim]
    assert len(wide32) == stream_values, [(r.shape, r.dtype) for r in wide32]


@pytest.mark.torch
@pytest.mark.parametrize("steps,guidance,shift", [(1, 1.0, 3.0), (6, 4.0, 3.0), (10, 5.0, 5.0)])
def test_generation_matches_wan_pipeline(reference, converted, steps, guidance, shift):
    # Text-to-image end to end against diffusers' own WanPipeline (UniPC, as WAN samples by default, with
    # CFG against zero negative embeddings: our null context, whose mask the DiT ignores by default), from
    # the same noise. Measured max |diff| 2.2e-6 on latents of magnitude ~4 after 10 steps at guidance
    # 5, which scales each call's ~1e-6 difference (ATOL above) by up to 2w - 1 = 9; 2e-5 is the bound.
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    model, _ = reference
    config, params = converted[True]
    genmask = GenMask(dit=config)
    _, ctx = inputs(2, 1, 1, 1, seed=3)
    key = jax.random.key(0)
    generate = functools.partial(
        genmask.generate_latents,
        latent_hw=(4, 6),
        num_steps=steps,
        guidance_scale=guidance,
        shift=shift,
        sampler="unipc",
    )
    ours = jax.jit(generate)(params, ctx, np.ones(ctx.shape[:2], bool), key)
    noise = np.asarray(jax.random.normal(key, ours.shape, jnp.float32))  # generate_latents' own draw

    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
    )
    pipe = diffusers.WanPipeline(
        tokenizer=None, text_encoder=None, transformer=model, vae=None, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        prompt_embeds=torch.from_numpy(ctx),
        negative_prompt_embeds=torch.zeros(ctx.shape),
        latents=torch.from_numpy(np.moveaxis(noise, -1, 1).copy()),
        height=32,
        width=48,
        num_frames=1,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="latent",
    ).frames
    np.testing.assert_allclose(np.asarray(ours), np.moveaxis(expected.numpy(), 1, -1), atol=2e-5, rtol=0)


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_per_frame_timesteps_equal_per_token(converted, scan):
    # Per frame is the per-token case above (checked against diffusers) with each frame's value
    # repeated over its tokens; only the time embedding runs on fewer rows, so fp32 rounding is all
    # that may differ.
    config, params = converted[scan]
    x, ctx = inputs(2, 2, 8, 12)
    per_frame = np.array([[0.0, 700.0], [250.0, 999.0]], np.float32)
    per_token = np.repeat(per_frame, 4 * 6, axis=1)
    apply = jax.jit(WanDiT(config).apply)
    np.testing.assert_allclose(
        np.asarray(apply({"params": params}, x, per_frame, ctx)),
        np.asarray(apply({"params": params}, x, per_token, ctx)),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="per frame"):
        apply({"params": params}, x, per_frame[:, :1].repeat(3, 1), ctx)


def test_one_dimensional_timesteps_of_another_batch_are_a_clear_error():
    # (1,) is one time for the whole batch; any other length but B used to broadcast the residual stream
    # to its length and fail inside cross-attention with an unrelated reshape error.
    config = DiTConfig.from_variant("tiny", num_layers=1)
    params = init_params(config, jax.random.key(0))
    apply = functools.partial(WanDiT(config).apply, {"params": params})
    x, ctx = inputs(2, 1, 4, 4)
    # A broadcast time and a time per example are different programs, whose fused multiply-adds may differ:
    # measured 0 (LLVM -O3) and 7.2e-7 (-O0, the tests' level) absolute; a time of 301 moves it by 0.41.
    np.testing.assert_allclose(
        apply(x, np.array([300.0], np.float32), ctx), apply(x, np.array([300.0, 300.0], np.float32), ctx),
        rtol=0, atol=1e-5,
    )
    with pytest.raises(ValueError, match=r"timesteps must be \(B,\).* with B = 1, got \(2,\)"):
        apply(x[:1], np.array([300.0, 400.0], np.float32), ctx[:1])
    with pytest.raises(ValueError, match=r"with B = 2, got \(3,\)"):
        apply(x, np.array([1.0, 2.0, 3.0], np.float32), ctx)


def test_scanned_params_are_stacked(converted):
    config, params = converted[True]
    assert "blocks" in params and "blocks_0" not in params
    assert params["blocks"]["attn1"]["to_q"]["kernel"].shape == (config.num_layers, 64, 64)


def test_remat_and_bf16_run():
    config = DiTConfig.from_variant(
        "tiny", remat_policy="nothing_saveable", scan_layers=True, dtype="bfloat16"
    )
    params = init_params(config, jax.random.key(0))
    x, ctx = inputs(1, 1, 8, 8)
    model = WanDiT(config)

    def loss(p):
        return jnp.mean(model.apply({"params": p}, x, jnp.array([10.0]), ctx) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))


def test_bfloat16_compute_keeps_a_float32_residual_stream():
    """By default (the original WAN code, its residual adds under autocast(float32)) a bfloat16 model
    carries the stream in float32: the patch embedding's output and every block's; the time projection
    runs in float32. residual_dtype="bfloat16" rounds them to bfloat16 (diffusers cast to bfloat16)."""
    x, ctx = inputs(1, 2, 8, 8)
    for residual_dtype, want in ((None, jnp.float32), ("bfloat16", jnp.bfloat16)):
        overrides = {} if residual_dtype is None else {"residual_dtype": residual_dtype}
        config = DiTConfig.from_variant("tiny", dtype="bfloat16", **overrides)
        params = init_params(config, jax.random.key(0))
        _, state = WanDiT(config).apply(
            {"params": params},
            x,
            jnp.array([500.0]),
            ctx,
            capture_intermediates=True,
            mutable=["intermediates"],
        )
        found = state["intermediates"]
        dtypes = {
            name: found[name]["__call__"][0].dtype for name in ("patch_embedding", "blocks_0", "blocks_1")
        }
        dtypes["time_proj"] = found["condition_embedder"]["time_proj"]["__call__"][0].dtype
        assert dtypes == dict.fromkeys(dtypes, want), (residual_dtype, dtypes)
        assert found["blocks_0"]["attn1"]["__call__"][0].dtype == jnp.bfloat16  # compute stays bfloat16


def test_float32_residual_stream_brings_bfloat16_closer_to_float32():
    """4 blocks in bfloat16 against the float32 model (same weights, 5 seeds measured): relative RMS error
    0.0052-0.0055 with the float32 stream, 0.0073-0.0078 with a bfloat16 one (ratio 0.70-0.72). The
    rest is the bfloat16 matmul inputs, common to both; 0.85 separates the two."""
    x, ctx = inputs(2, 2, 8, 8)
    t = np.array([[0.0, 900.0], [0.0, 400.0]], np.float32)
    reference_config = DiTConfig.from_variant("tiny", num_layers=4)
    params = init_params(reference_config, jax.random.key(0))
    reference = np.asarray(WanDiT(reference_config).apply({"params": params}, x, t, ctx))

    def error(residual_dtype):
        config = DiTConfig.from_variant("tiny", num_layers=4, dtype="bfloat16", residual_dtype=residual_dtype)
        out = np.asarray(WanDiT(config).apply({"params": params}, x, t, ctx))
        return float(np.sqrt(np.mean((out - reference) ** 2) / np.mean(reference**2)))

    fp32_stream, bf16_stream = error("float32"), error("bfloat16")
    assert fp32_stream < 0.85 * bf16_stream, (fp32_stream, bf16_stream)


def test_float32_residual_stream_leaves_float32_models_unchanged():
    """residual_dtype is the stream's dtype, float32 already in a float32 model: None (follow dtype) and
    "float32" give the same bits, forward and backward."""
    x, ctx = inputs(1, 2, 8, 8)
    t = np.array([700.0], np.float32)
    configs = [DiTConfig.from_variant("tiny", residual_dtype=r) for r in ("float32", None)]
    params = init_params(configs[0], jax.random.key(3))
    results = [
        jax.value_and_grad(lambda p, c=c: jnp.sum(WanDiT(c).apply({"params": p}, x, t, ctx) ** 2))(params)
        for c in configs
    ]
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_json_without_residual_dtype_loads_with_the_float32_default():
    """A config.json written before residual_dtype existed (converted checkpoints, saved experiments)
    loads with the default; None (follow dtype) survives JSON as null."""
    as_json = lambda config: json.loads(json.dumps(config.to_dict()))
    old = as_json(DiTConfig.from_variant("tiny", dtype="bfloat16"))
    del old["residual_dtype"]
    assert DiTConfig.from_dict(old) == DiTConfig.from_variant(
        "tiny", dtype="bfloat16", residual_dtype="float32"
    )
    follow = DiTConfig.from_variant("tiny", dtype="bfloat16", residual_dtype=None)
    assert DiTConfig.from_dict(as_json(follow)) == follow


def test_config_roundtrip_and_variants():
    config = DiTConfig.from_variant("1.3b", text_dim=3584, scan_layers=True)
    assert DiTConfig.from_dict(config.to_dict()) == config
    assert hash(config) == hash(DiTConfig.from_dict(config.to_dict()))
    big = DiTConfig.from_variant("14b")
    assert (big.dim, big.num_layers, big.num_heads, big.ffn_dim) == (5120, 40, 40, 13824)
    with pytest.raises(ValueError):
        DiTConfig.from_variant("7b")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(patch_size=(1, 2)), r"patch_size must be 3 positive ints .*\(1, 2\)"),
        (dict(patch_size=(1, 0, 2)), "patch_size must be 3 positive ints"),
        (dict(patch_size=(1, 1.5, 2)), "patch_size must be 3 positive ints"),
        (dict(num_heads=0), "num_heads must be a positive int, got 0"),
        (dict(num_layers=-1), "num_layers must be a non-negative int"),
        (dict(in_channels=-16), "in_channels must be a positive int"),
        (dict(dim=65), "dim 65 is not a multiple of num_heads 2"),
        (dict(freq_dim=255), "freq_dim 255 must be even"),
        (dict(eps=0.0), "eps and rope_theta must be > 0"),
        (dict(dtype="bf16"), "dtype must name a floating dtype .*'bf16'"),
        (dict(param_dtype="int32"), "param_dtype must name a floating dtype"),
        (dict(residual_dtype="fp32"), "residual_dtype must name a floating dtype .*'fp32'"),
        (dict(residual_dtype="bfloat16"), "residual_dtype 'bfloat16' is narrower than dtype 'float32'"),
        # Factories, not policies: they take names or memory kinds, and failed only when traced.
        (dict(remat_policy="save_only_these_names"), r"'save_only_these_names' is not one of .*'dots_"),
        (dict(remat_policy="save_any_names_but_these"), "'save_any_names_but_these' is not one of"),
        (dict(remat_policy="offload_dot_with_no_batch_dims"), "'offload_dot_with_no_batch_dims' is not one"),
        (dict(remat_policy="save_and_offload_only_these_names"), "'save_and_offload_only_these_names' is"),
        (dict(remat_policy="save_from_both_policies"), "'save_from_both_policies' is not one of"),
        (dict(remat_policy="no_such_policy"), "remat_policy 'no_such_policy' is not one of"),
    ],
)
def test_structural_config_errors_are_value_errors(overrides, message):
    """Raised when the config is made: a command turns them into one line before anything is built."""
    with pytest.raises(ValueError, match=message):
        DiTConfig.from_variant("tiny", **overrides)


@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_argument_free_remat_policies_are_accepted_and_run(policy):
    config = DiTConfig.from_variant("tiny", remat_policy=policy, num_layers=1)
    params = init_params(config, jax.random.key(0))
    x, ctx = inputs(1, 1, 4, 4)
    loss = lambda p: jnp.sum(WanDiT(config).apply({"params": p}, x, jnp.array([10.0]), ctx) ** 2)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(jax.grad(loss)(params)))


def test_cudnn_attention_needs_half_precision():
    for dtype in ("bfloat16", "float16"):
        assert DiTConfig.from_variant("tiny", attention="cudnn", dtype=dtype).attention == "cudnn"
    with pytest.raises(ValueError, match="attention 'cudnn' needs dtype bfloat16 or float16.*'float32'"):
        DiTConfig.from_variant("tiny", attention="cudnn")


def test_parameter_count_of_1_3b():
    shapes = jax.eval_shape(lambda: init_params(DiTConfig.from_variant("1.3b"), jax.random.key(0)))
    leaves = jax.tree.leaves(shapes)
    # Wan2.1-T2V-1.3B: 1,418,996,800 parameters in 825 tensors (text_dim 4096).
    assert sum(np.prod(s.shape) for s in leaves) == 1_418_996_800
    assert len(leaves) == 825


# ---------------------------------------------------------------------------------------------
# Attention kernels.


def _qkv(seed=0, batch=2, q_len=40, kv_len=24, heads=2, head_dim=32):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, kv_len, heads, head_dim))
    v = jax.random.normal(keys[2], (batch, kv_len, heads, head_dim))
    return q, k, v


# Kept keys per example; "no_key" masks every key of the second one (the null text of classifier-free
# guidance), where every implementation gives the mean of v over the S keys, as XLA does. Splash's
# kernel alone gave sum(v) / 128 there, its padded keys counted.
MASKS = {"none": None, "padded": [24, 13], "no_key": [13, 0]}


@pytest.mark.parametrize("masked", list(MASKS))
def test_splash_interpret_matches_xla(masked):
    q, k, v = _qkv()
    mask = None
    if MASKS[masked] is not None:
        mask = jnp.arange(k.shape[1])[None, :] < jnp.array(MASKS[masked])[:, None]
    expected = dot_product_attention(q, k, v, mask, implementation="xla")
    # q_len 40 and kv_len 24 are not tile multiples: this also checks the padding path.
    out = dot_product_attention(q, k, v, mask, implementation="splash")
    # Both fp32; splash's online softmax sums in a different order.
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-6, rtol=1e-5)
    if masked == "no_key":
        np.testing.assert_allclose(
            np.asarray(out[1]), np.broadcast_to(np.mean(v[1], axis=0), out[1].shape), atol=1e-6
        )
        weights = jax.random.normal(jax.random.key(1), q.shape)
        loss = lambda impl, q, k, v: jnp.sum(weights * jnp.sin(dot_product_attention(q, k, v, mask, impl)))
        got = jax.grad(functools.partial(loss, "splash"), argnums=(0, 1, 2))(q, k, v)
        want = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
        for g, w in zip(got, want):  # fp32, gradients up to ~3; measured max |diff| 7e-7
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_xla_attention_gradient_matches_autodiff(masked):
    """The hand-written backward against autodiff of jax.nn.dot_product_attention."""
    q, k, v = _qkv(seed=3)
    mask = None
    if masked:  # the second example masks every key: the null-text case of classifier-free guidance.
        mask = jnp.arange(k.shape[1])[None, :] < jnp.array([[17], [0]])
    weights = jax.random.normal(jax.random.key(4), q.shape)

    def loss(fn, q, k, v):
        return jnp.sum(weights * jnp.sin(fn(q, k, v)))

    ours = lambda q, k, v: dot_product_attention(q, k, v, mask, implementation="xla")
    reference = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=None if mask is None else mask[:, None, None, :], implementation="xla"
    )
    # fp32; measured max |diff| 1e-6 on outputs of order 1.
    np.testing.assert_allclose(np.asarray(ours(q, k, v)), np.asarray(reference(q, k, v)), atol=2e-6)
    got = jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(functools.partial(loss, reference), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        # fp32, gradients of magnitude up to 3; only the summation order differs (measured max |diff|
        # 1.7e-6, so 1e-5 leaves a 6x margin).
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


def test_xla_attention_gradient_bfloat16():
    """bf16 inputs give bf16 gradients near the fp32 ones."""
    q, k, v = _qkv(seed=5)
    mask = jnp.arange(k.shape[1])[None, :] < jnp.array([[24], [9]])
    loss = lambda q, k, v: jnp.sum(jnp.sin(dot_product_attention(q, k, v, mask)).astype(jnp.float32))
    want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = jax.grad(loss, argnums=(0, 1, 2))(*low)
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        # bf16 keeps 8 mantissa bits (relative 4e-3 per rounding); measured max |diff| 0.6% of the
        # gradient's largest entry, so 5% leaves an 8x margin.
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=0.05 * scale)


def test_materialize_cotangent_is_identity_and_cpu_only():
    """Value and gradient pass through unchanged; the conditional that keeps XLA:CPU from fusing the
    residual cotangent's whole sum into every consumer is in the CPU program only."""
    x = jax.random.normal(jax.random.key(6), (2, 8, 16))
    w = jax.random.normal(jax.random.key(7), x.shape)
    loss = lambda fn, x: jnp.sum(w * jnp.sin(fn(x)))
    np.testing.assert_array_equal(np.asarray(materialize_cotangent(x)), np.asarray(x))
    grad = jax.jit(jax.grad(functools.partial(loss, materialize_cotangent)))
    want = jax.jit(jax.grad(functools.partial(loss, lambda y: y)))(x)
    np.testing.assert_array_equal(np.asarray(grad(x)), np.asarray(want))  # the same ops: exactly equal

    assert "conditional(" in grad.lower(x).compile().as_text()
    tpu = grad.trace(x).lower(lowering_platforms=("tpu",)).as_text()
    assert "optimization_barrier" not in tpu  # the platform switch picked the identity branch


def test_splash_model_matches_xla(converted):
    config, params = converted[False]
    x, ctx = inputs(1, 2, 8, 8)
    t = CASES["per_token_t0_first_frame"][1]
    expected = jax.jit(WanDiT(config).apply)({"params": params}, x, t, ctx)
    splash = dataclasses.replace(config, attention="splash")
    out = jax.jit(WanDiT(splash).apply)({"params": params}, x, t, ctx)
    # fp32; only the softmax summation order differs.
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=1e-5)


def test_scanned_splash_model_matches_xla():
    # nn.scan traces its body twice. A splash kernel built in the first trace and reused in the
    # second leaked the first trace's tracers; 4 heads is a kernel shape no other test builds first.
    config = DiTConfig.from_variant("tiny", num_heads=4, scan_layers=True)
    params = init_params(config, jax.random.key(2))
    x, ctx = inputs(1, 1, 8, 8)
    t = np.array([500.0], np.float32)
    expected = jax.jit(WanDiT(config).apply)({"params": params}, x, t, ctx)
    splash = dataclasses.replace(config, attention="splash")
    out = jax.jit(WanDiT(splash).apply)({"params": params}, x, t, ctx)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=1e-5)


def test_context_mask_ignores_padding():
    config = DiTConfig.from_variant("tiny", use_context_mask=True)
    params = init_params(config, jax.random.key(1))
    x, ctx = inputs(1, 1, 8, 8)
    mask = np.arange(TEXT_LEN)[None] < 5
    padded = ctx.copy()
    padded[:, 5:] = 100.0
    apply = jax.jit(WanDiT(config).apply)
    a = apply({"params": params}, x, np.array([3.0]), ctx, mask)
    b = apply({"params": params}, x, np.array([3.0]), padded, mask)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # Cutting the padding off (the latent pool's trim_padding) is the same model too.
    c = apply({"params": params}, x, np.array([3.0]), ctx[:, :5], mask[:, :5])
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Sharding.


@pytest.mark.multidevice
@pytest.mark.parametrize(
    "scan,attention",
    [(False, "xla"), (True, "xla"), (True, "splash")],
    ids=["unscanned", "scanned", "scanned_splash"],
)
def test_sharded_forward_matches_single_device(converted, scan, attention):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    config, params = converted[scan]
    config = dataclasses.replace(config, attention=attention)
    x, ctx = inputs(4, 2, 8, 8, seed=3)
    t = np.array([999.0, 500.0, 20.0, 0.0], np.float32)
    model = WanDiT(config)
    expected = jax.jit(model.apply)({"params": params}, x, t, ctx)

    mesh = make_mesh((2, 2, 2))
    abstract = jax.eval_shape(model.init, jax.random.key(0), x, t, ctx)["params"]
    shardings = logical_sharding(abstract, mesh, DEFAULT_RULES)
    sharded_params = jax.device_put(params, shardings)
    assert sharded_params["proj_out"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        out = jax.jit(model.apply)({"params": sharded_params}, x, t, ctx)
    # Same fp32 math; sharded matmuls sum partial products in another order.
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=1e-5)
