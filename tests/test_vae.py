"""WAN VAE: parity with diffusers' AutoencoderKLWan (fp32, CPU) for images and videos, masks, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genmask_jax.models import mask_codec
from genmask_jax.models.build import random_frozen
from genmask_jax.models.vae import (
    VAEConfig,
    WanVAE,
    abstract_params,
    denormalize_latents,
    normalize_latents,
)

# fp32 on both sides; the only difference is the summation order inside convs/attention, which
# shows up as ~1e-6 relative error after ~30 layers. 2e-5 absolute on O(0.1-1) values is 10x that.
ATOL = 2e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random diffusers AutoencoderKLWan (the real 4-level structure at base_dim 8), its
    saved folder, and our config/params converted from that folder."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from convert import wan_vae

    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norms and biases, so that every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    folder = tmp_path_factory.mktemp("vae") / "vae"
    model.save_pretrained(folder)
    config, params = wan_vae.load(folder)
    return model, config, params


@pytest.fixture(scope="module")
def jax_vae(reference):
    _, config, params = reference
    model = WanVAE(config)
    encode = jax.jit(lambda x: model.apply(params, x, method="encode"))
    decode = jax.jit(lambda z: model.apply(params, z, method="decode"))
    return encode, decode


def _torch_encode_decode(model, x_ncthw):
    import torch

    with torch.no_grad():
        dist = model.encode(torch.from_numpy(x_ncthw)).latent_dist
        rec = model.decode(dist.mean).sample
    return dist.mean.numpy(), dist.logvar.numpy(), rec.numpy()


def _to_torch_layout(x):
    return np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1))  # (B, T, H, W, C) -> (B, C, T, H, W)


def _video(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.mark.torch
@pytest.mark.parametrize("hw", [(32, 32), (32, 48)])
def test_image_matches_diffusers(reference, jax_vae, hw):
    model, _, _ = reference
    encode, decode = jax_vae
    x = _video((2, 1, *hw, 3))
    mean, logvar, rec = _torch_encode_decode(model, _to_torch_layout(x))
    jmean, jlogvar = encode(x)
    jrec = decode(jmean)
    assert jmean.shape == (2, 1, hw[0] // 8, hw[1] // 8, 16)
    np.testing.assert_allclose(_to_torch_layout(jmean), mean, atol=ATOL)
    np.testing.assert_allclose(_to_torch_layout(jlogvar), logvar, atol=ATOL)
    np.testing.assert_allclose(_to_torch_layout(jrec), rec, atol=ATOL)
    assert 0.05 < rec.std() and np.mean(np.abs(rec) > 0.999) < 0.01  # not a saturated comparison


@pytest.mark.torch
@pytest.mark.parametrize("frames,hw", [(5, (32, 32)), (9, (16, 16))])
def test_video_matches_diffusers(reference, jax_vae, frames, hw):
    model, _, _ = reference
    encode, decode = jax_vae
    x = _video((1, frames, *hw, 3), seed=frames)
    mean, logvar, rec = _torch_encode_decode(model, _to_torch_layout(x))
    jmean, jlogvar = encode(x)
    jrec = decode(jmean)
    latent_frames = 1 + (frames - 1) // 4
    assert jmean.shape == (1, latent_frames, hw[0] // 8, hw[1] // 8, 16)
    assert jrec.shape == x.shape
    np.testing.assert_allclose(_to_torch_layout(jmean), mean, atol=ATOL)
    np.testing.assert_allclose(_to_torch_layout(jlogvar), logvar, atol=ATOL)
    np.testing.assert_allclose(_to_torch_layout(jrec), rec, atol=ATOL)


@pytest.mark.torch
def test_video_first_frame_is_the_image(jax_vae):
    """Causality: frame 0 of a video encodes/decodes exactly like the image alone (fast path)."""
    encode, decode = jax_vae
    x = _video((1, 5, 32, 32, 3), seed=5)
    mean, _ = encode(x)
    image_mean, _ = encode(x[:, :1])
    np.testing.assert_allclose(mean[:, :1], image_mean, atol=ATOL)
    np.testing.assert_allclose(decode(mean)[:, :1], decode(mean[:, :1]), atol=ATOL)


@pytest.mark.torch
def test_mask_round_trip_matches_reference_pipeline(reference, jax_vae):
    """mask -> RGB -> encode -> normalise -> denormalise -> decode -> channel mean > 0, both sides."""
    import torch

    model, config, _ = reference
    encode, decode = jax_vae
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:32, :48]
    masks = np.stack([(yy - rng.uniform(8, 24)) ** 2 / rng.uniform(20, 80)
                      + (xx - rng.uniform(8, 40)) ** 2 / rng.uniform(20, 150) < 1 for _ in range(2)])
    rgb = mask_codec.mask_to_rgb(masks)
    assert rgb.shape == (2, 32, 48, 3) and set(np.unique(rgb)) == {-1.0, 1.0}
    mean, _ = encode(rgb[:, None])
    z = normalize_latents(mean, config)
    decoded = decode(denormalize_latents(z, config))[:, 0]
    ours = np.asarray(mask_codec.rgb_to_mask(decoded))

    latents_mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
    latents_std = torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        x = torch.from_numpy(np.where(masks, 1.0, -1.0).astype(np.float32))
        x = x[:, None, None].repeat(1, 3, 1, 1, 1)  # (B, C, T, H, W)
        mu = model.encode(x).latent_dist.mean
        z_ref = (mu - latents_mean) / latents_std
        rec = model.decode(z_ref * latents_std + latents_mean).sample[:, :, 0]
    ref_mean = rec.mean(dim=1).numpy()
    clear = np.abs(ref_mean) > 1e-4  # pixels on the threshold could flip by rounding alone
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(ours[clear], ref_mean[clear] > 0)


def test_mask_codec():
    mask = np.array([[0, 1], [1, 0]], np.float32)
    rgb = mask_codec.mask_to_rgb(mask)
    np.testing.assert_array_equal(rgb[..., 0], [[-1, 1], [1, -1]])
    np.testing.assert_array_equal(mask_codec.rgb_to_mask(rgb), mask.astype(bool))
    np.testing.assert_array_equal(mask_codec.mask_to_rgb(mask.astype(bool)), rgb)
    np.testing.assert_array_equal(mask_codec.rgb_to_mask(jnp.array([[[0.3, -0.5, 0.1]]])), [[False]])


def test_config_and_latent_normalisation():
    config = VAEConfig.from_variant("wan2.1")
    assert (config.base_dim, config.z_dim, config.dim_mult) == (96, 16, (1, 2, 4, 4))
    assert VAEConfig.from_dict(config.to_dict()) == config
    assert VAEConfig.from_variant("tiny", dtype="bfloat16").base_dim == 8
    with pytest.raises(ValueError, match="unknown"):
        VAEConfig.from_variant("huge")
    with pytest.raises(ValueError, match="latents_mean"):
        VAEConfig(z_dim=4)
    mu = np.random.default_rng(0).normal(size=(2, 1, 3, 3, 16)).astype(np.float32)
    z = normalize_latents(mu, config)
    np.testing.assert_allclose(z[..., 0], (mu[..., 0] + 0.7571) / 2.8184, rtol=1e-6)
    np.testing.assert_allclose(denormalize_latents(z, config), mu, atol=1e-6)


def test_bad_shapes_raise():
    config, params = VAEConfig.from_variant("tiny"), {"params": {}}  # raises before any parameter is used
    with pytest.raises(ValueError, match="T = 1"):
        WanVAE(config).apply(params, jnp.zeros((1, 3, 16, 16, 3)), method="encode")
    with pytest.raises(ValueError, match="multiples of 8"):
        WanVAE(config).apply(params, jnp.zeros((1, 1, 12, 16, 3)), method="encode")


def test_params_are_logically_partitioned():
    import flax.linen as nn

    specs = nn.get_partition_spec(abstract_params(VAEConfig.from_variant("tiny")))["params"]
    spec = jax.sharding.PartitionSpec
    assert specs["encoder"]["conv_in"]["kernel"] == spec("conv_t", "conv_h", "conv_w", "conv_in", "conv_out")
    upsample = specs["decoder"]["up_blocks_0"]["upsamplers_0"]["resample"]["kernel"]
    assert upsample == spec("conv_h", "conv_w", "conv_in", "conv_out")
    assert specs["decoder"]["norm_out"]["gamma"] == spec("norm")
    assert "time_conv" in specs["encoder"]["down_blocks_5"]  # created although images never use it


@pytest.mark.torch
def test_bfloat16_close_to_float32(reference):
    _, config, params = reference
    x = jnp.asarray(_video((1, 1, 16, 16, 3)))
    low = WanVAE(dataclasses.replace(config, dtype="bfloat16"))
    mean32, _ = jax.jit(lambda p, x: WanVAE(config).apply(p, x, method="encode"))(params, x)
    mean16, _ = jax.jit(lambda p, x: low.apply(p, x, method="encode"))(params, x)
    assert mean16.dtype == jnp.float32
    # bf16 keeps 8 mantissa bits (~0.4% per op); ~30 layers with renormalising RMS norms stay ~5%.
    np.testing.assert_allclose(mean16, mean32, atol=0.05 * float(jnp.abs(mean32).max()))


@pytest.mark.torch
@pytest.mark.multidevice
def test_sharded_batch_matches_single_device(reference):
    from jax.sharding import NamedSharding, PartitionSpec

    from genmask_jax.parallel.mesh import make_mesh

    _, config, params = reference
    model = WanVAE(config)
    x = jnp.asarray(_video((8, 1, 16, 16, 3)))
    fn = lambda p, x: model.apply(p, model.apply(p, x, method="encode")[0], method="decode")
    mesh = make_mesh((-1, 1, 1))
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = jax.jit(fn, in_shardings=(replicated, batch), out_shardings=batch)(params, x)
    assert sharded.sharding.num_devices == jax.device_count()
    np.testing.assert_allclose(sharded, jax.jit(fn)(params, x), atol=1e-5)  # same math, other partition


def test_decode_clamps_by_default_and_gives_the_raw_output_on_request():
    config = VAEConfig.from_variant("tiny")
    params = random_frozen(abstract_params(config), seed=0)  # host init: no init to compile
    params["params"]["decoder"]["conv_out"]["bias"] = jnp.array([-5.0, 0.0, 5.0])  # out past both bounds
    z = jax.random.normal(jax.random.key(1), (1, 1, 1, 1, config.z_dim))

    def both(p, z):
        vae = WanVAE(config)
        return vae.apply(p, z, method="decode"), vae.apply(p, z, clamp=False, method="decode")

    clamped, raw = jax.jit(both)(params, z)
    assert raw.shape == clamped.shape == (1, 1, 8, 8, 3) and raw.dtype == jnp.float32
    assert float(raw[..., 0].max()) < -1.0 and float(raw[..., 2].min()) > 1.0
    np.testing.assert_array_equal(clamped, jnp.clip(raw, -1.0, 1.0))
