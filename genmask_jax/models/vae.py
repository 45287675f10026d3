"""The WAN 2.1 causal video VAE in Flax (channels-last), with an image fast path.

Layout `(B, T, H, W, C)`. The encoder maps `T = 1 + t k` frames at `H x W` to `1 + k` latent frames at
`H/s x W/s`, t and s the config's `temporal_factor` and `spatial_factor` (WAN 2.1's: 4 and 8); the decoder
inverts that. Semantics follow the original (`wan/modules/vae.py`, equal to
diffusers' `AutoencoderKLWan`), including how it streams a video:

* encode chunks `[0], [1:5], [5:9], ...`, each giving one latent frame; decode one latent frame at a
  time. Every causal conv keeps the last 2 frames of its input as history for the next chunk (zeros
  before the first frame), so streaming equals one causal conv over the whole sequence.
* The first chunk skips the temporal resampling: the encoder's `downsample3d` passes its single
  frame through, and the decoder's `upsample3d` neither convolves nor doubles it. The decoder's
  `time_conv` history after the first chunk is zeros (the original's "Rep" marker), i.e. its time
  conv never sees latent frame 0.

Here the history is an explicit pytree (`cache`) returned by every block and carried through
`nn.scan` over the chunks after the first, so the compiled loop has static shapes.

A single image (`T = 1`) is the first chunk alone: no history exists, every 3x3x3 causal conv sees
two zero frames before the image and reduces to the 2D conv with the kernel's last time tap, and no
`time_conv` runs. That is the image fast path (2D convs on `(B, H, W, C)`, no caches built).
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genmask_jax.models.layers import logical_param, shapes_once

Cache = Any  # a pytree of per-conv histories `(B, P, H, W, C)`, mirroring the module tree

WAN21_LATENTS_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)

CONV3D_AXES = ("conv_t", "conv_h", "conv_w", "conv_in", "conv_out")
CONV2D_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """WAN 2.1 VAE hyper-parameters (diffusers' `AutoencoderKLWan` config names, snake-cased)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs {len(self.dim_mult) - 1} entries, got {self.temporal_downsample}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/latents_std need z_dim={self.z_dim} values each")

    @classmethod
    def from_variant(cls, name: str, **overrides) -> "VAEConfig":
        """Named configs: `wan2.1` (the released VAE), `tiny` (the same 4 levels at base_dim 8)."""
        variants = {"wan2.1": {}, "tiny": {"base_dim": 8}}
        if name not in variants:
            raise ValueError(f"unknown VAE variant {name!r}; known: {sorted(variants)}")
        return cls(**{**variants[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # tuples kept, as in DiTConfig.to_dict

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VAEConfig fields: {unknown}")
        return cls(**d)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)


# The fields that shape the parameters; the latent statistics belong to the weights too.
STRUCTURE_FIELDS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temporal_downsample")
WEIGHT_FIELDS = (*STRUCTURE_FIELDS, "latents_mean", "latents_std")


def config_differences(a: VAEConfig, b: VAEConfig, fields: Sequence[str] = WEIGHT_FIELDS) -> list[str]:
    """The `fields` in which `a` and `b` differ; the latent statistics to 1e-4 relative (a config may hold
    them rounded, as WAN's holds 4 decimals)."""

    def differ(name: str) -> bool:
        x, y = getattr(a, name), getattr(b, name)
        if name in ("latents_mean", "latents_std") and len(x) == len(y):
            return not np.allclose(x, y, rtol=1e-4, atol=1e-6)
        return x != y

    return [name for name in fields if differ(name)]


def normalize_latents(mu: jax.Array, config: VAEConfig) -> jax.Array:
    """`(mu - latents_mean) / latents_std` over the channel (last) axis."""
    mean = jnp.asarray(config.latents_mean, jnp.float32)
    std = jnp.asarray(config.latents_std, jnp.float32)
    return (mu - mean) / std


def denormalize_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """Inverse of `normalize_latents`."""
    mean = jnp.asarray(config.latents_mean, jnp.float32)
    std = jnp.asarray(config.latents_std, jnp.float32)
    return z * std + mean


# ---------------------------------------------------------------------------------------------
# Layers.


def _conv_params(module: nn.Module, kernel_shape: tuple[int, ...], axes):
    dtype = module.param_dtype
    kernel = logical_param(module, "kernel", nn.initializers.lecun_normal(), kernel_shape, axes, dtype)
    zeros = nn.initializers.zeros_init()
    bias = logical_param(module, "bias", zeros, (kernel_shape[-1],), ("conv_out",), dtype)
    return kernel.astype(module.dtype), bias.astype(module.dtype)


def _conv2d(
    x: jax.Array, kernel: jax.Array, bias: jax.Array, strides=(1, 1), padding=((1, 1), (1, 1))
) -> jax.Array:
    """x `(N, H, W, Ci)`, kernel `(kh, kw, Ci, Co)`."""
    if kernel.shape[:2] == (1, 1):
        return jnp.einsum("nhwi,io->nhwo", x, kernel[0, 0]) + bias
    y = jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


def _frames(fn, x: jax.Array) -> jax.Array:
    """Applies a per-image `fn` on `(N, H, W, C)` to every frame of `(B, T, H, W, C)`."""
    b, t = x.shape[:2]
    y = fn(x.reshape(b * t, *x.shape[2:]))
    return y.reshape(b, t, *y.shape[1:])


def _with_history(x: jax.Array, history: jax.Array | None, frames: int) -> jax.Array:
    """`[history, x]` along time; `frames` zero frames stand in for a missing history."""
    if frames == 0:
        return x
    if history is None:
        history = jnp.zeros((x.shape[0], frames, *x.shape[2:]), x.dtype)
    return jnp.concatenate([history.astype(x.dtype), x], axis=1)


class CausalConv3d(nn.Module):
    """3D conv, padded at the front in time (history or zeros) and symmetrically in space.

    Kernel `(kt, kh, kw, Ci, Co)`. `time_padding` frames (default `kt - 1`) precede the input: the
    cache (the last `time_padding` frames of the stream so far), or zeros at the stream's start.
    """

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    time_stride: int = 1
    time_padding: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: jax.Array | None = None, stream: bool = False):
        """x `(B, T, H, W, Ci)`; cache `(B, time_padding, H, W, Ci)` or None (start of the stream).

        Returns `(y (B, T', H, W, Co), new cache or None)`; a cache comes back only if `stream`.
        """
        kt, kh, kw = self.kernel_size
        pad_t = kt - 1 if self.time_padding is None else self.time_padding
        kernel, bias = _conv_params(self, (kt, kh, kw, x.shape[-1], self.features), CONV3D_AXES)
        x = x.astype(self.dtype)
        pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
        if self.kernel_size == (1, 1, 1) and self.time_stride == 1:
            y = jnp.einsum("bthwi,io->bthwo", x, kernel[0, 0, 0]) + bias
        elif cache is None and x.shape[1] == 1 and pad_t == kt - 1 and self.time_stride == 1:
            # Only the last time tap meets the frame; the others meet the zero padding.
            y = _frames(lambda f: _conv2d(f, kernel[-1], bias, padding=pad), x)
        else:
            y = (
                jax.lax.conv_general_dilated(
                    _with_history(x, cache, pad_t),
                    kernel,
                    (self.time_stride, 1, 1),
                    ((0, 0), *pad),
                    dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                )
                + bias
            )
        new_cache = None
        if stream and pad_t > 0:
            new_cache = _with_history(x, cache, pad_t)[:, -pad_t:]
        return y, new_cache


class Conv2d(nn.Module):
    """Per-frame 2D conv on `(B, T, H, W, C)`; kernel `(kh, kw, Ci, Co)`."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = _conv_params(self, (*self.kernel_size, x.shape[-1], self.features), CONV2D_AXES)
        return _frames(lambda f: _conv2d(f, kernel, bias, self.strides, self.padding), x.astype(self.dtype))


class RMSNorm(nn.Module):
    """`x / max(|x|, 1e-12) * sqrt(C) * gamma` over channels (F.normalize), in float32."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        gamma = logical_param(self, "gamma", nn.initializers.ones_init(), (c,), ("norm",), self.param_dtype)
        x = x.astype(jnp.float32)
        inv_norm = jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-24))
        return (x * inv_norm * (c**0.5 * gamma.astype(jnp.float32))).astype(self.dtype)


class ResidualBlock(nn.Module):
    """`shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`; dropout is 0 in WAN."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None, stream: bool = False):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = x.astype(self.dtype)
        if x.shape[-1] != self.features:
            h, _ = CausalConv3d(self.features, (1, 1, 1), name="conv_shortcut", **kw)(x)
        cache = cache or {}
        x = nn.silu(RMSNorm(name="norm1", **kw)(x))
        x, c1 = CausalConv3d(self.features, name="conv1", **kw)(x, cache.get("conv1"), stream)
        x = nn.silu(RMSNorm(name="norm2", **kw)(x))
        x, c2 = CausalConv3d(self.features, name="conv2", **kw)(x, cache.get("conv2"), stream)
        return x + h, ({"conv1": c1, "conv2": c2} if stream else None)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the `H * W` positions of each frame, plus the input."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        b, t, h, w, c = x.shape
        y = RMSNorm(name="norm", **kw)(x)
        qkv = Conv2d(3 * c, (1, 1), padding=((0, 0), (0, 0)), name="to_qkv", **kw)(y)
        q, k, v = jnp.split(qkv.reshape(b * t, h * w, 1, 3 * c), 3, axis=-1)
        y = jax.nn.dot_product_attention(q, k, v).reshape(b, t, h, w, c)
        y = Conv2d(c, (1, 1), padding=((0, 0), (0, 0)), name="proj", **kw)(y)
        return x.astype(self.dtype) + y


class MidBlock(nn.Module):
    """Residual block, attention, residual block."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None, stream: bool = False):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        cache = cache or {}
        x, c0 = ResidualBlock(self.features, name="resnets_0", **kw)(x, cache.get("resnets_0"), stream)
        x = AttentionBlock(name="attentions_0", **kw)(x)
        x, c1 = ResidualBlock(self.features, name="resnets_1", **kw)(x, cache.get("resnets_1"), stream)
        return x, ({"resnets_0": c0, "resnets_1": c1} if stream else None)


class Resample(nn.Module):
    """x2 spatial down/up-sampling per frame; the "3d" modes also halve/double time.

    downsample: `ZeroPad2d((0, 1, 0, 1))` then a 3x3 stride-2 conv; downsample3d then convolves
    `[last frame of the previous chunk, frames]` with a (3, 1, 1) stride-2 kernel.
    upsample: nearest x2 then a 3x3 conv to `features // 2`; upsample3d first maps each frame to
    two by a causal (3, 1, 1) conv to `2 C` channels, split as (2, C) and interleaved in time.
    On the first chunk (no cache) neither 3d mode touches time.
    """

    features: int
    mode: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: jax.Array | None = None, stream: bool = False):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        new_cache = None
        if self.mode == "upsample3d":
            x, new_cache = self._double_frames(x, cache, stream, kw)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
            x = Conv2d(self.features // 2, name="resample", **kw)(x)
        else:
            x = Conv2d(self.features, strides=(2, 2), padding=((0, 1), (0, 1)), name="resample", **kw)(x)
        if self.mode == "downsample3d":
            x, new_cache = self._halve_frames(x, cache, stream, kw)
        return x, new_cache

    def _double_frames(self, x, cache, stream, kw):
        time_conv = CausalConv3d(2 * x.shape[-1], (3, 1, 1), name="time_conv", **kw)
        if cache is None:
            if self.is_initializing():
                time_conv(x)
            # The original stores the marker "Rep" here: the next chunk pads with zeros instead.
            return x, (jnp.zeros((x.shape[0], 2, *x.shape[2:]), self.dtype) if stream else None)
        y, new_cache = time_conv(x, cache, stream=True)
        b, t, h, w, c2 = y.shape
        y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5)
        return y.reshape(b, 2 * t, h, w, c2 // 2), new_cache

    def _halve_frames(self, x, cache, stream, kw):
        time_conv = CausalConv3d(
            self.features, (3, 1, 1), time_stride=2, time_padding=0, name="time_conv", **kw
        )
        new_cache = x[:, -1:] if stream else None
        if cache is None:
            if self.is_initializing():
                time_conv(jnp.zeros((1, 3, 1, 1, x.shape[-1]), x.dtype))
            return x, new_cache
        y, _ = time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
        return y, new_cache


def _dims(config: VAEConfig) -> list[int]:
    return [config.base_dim * m for m in config.dim_mult]


class Encoder(nn.Module):
    """`(B, T, H, W, 3)` chunk -> `(B, T', H/s, W/s, 2 z_dim)` (mean and logvar, before quant_conv); s the
    config's `spatial_factor`."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None, stream: bool = False):
        cfg = self.config
        kw = {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}
        cache, new = cache or {}, {}
        x, new["conv_in"] = CausalConv3d(cfg.base_dim, name="conv_in", **kw)(x, cache.get("conv_in"), stream)
        dims, index = _dims(cfg), 0
        for level, features in enumerate(dims):
            for _ in range(cfg.num_res_blocks):
                name = f"down_blocks_{index}"
                x, new[name] = ResidualBlock(features, name=name, **kw)(x, cache.get(name), stream)
                index += 1
            if level != len(dims) - 1:
                name = f"down_blocks_{index}"
                mode = "downsample3d" if cfg.temporal_downsample[level] else "downsample2d"
                x, new[name] = Resample(features, mode, name=name, **kw)(x, cache.get(name), stream)
                index += 1
        x, new["mid_block"] = MidBlock(dims[-1], name="mid_block", **kw)(x, cache.get("mid_block"), stream)
        x = nn.silu(RMSNorm(name="norm_out", **kw)(x))
        x, new["conv_out"] = CausalConv3d(2 * cfg.z_dim, name="conv_out", **kw)(
            x, cache.get("conv_out"), stream
        )
        return x, (new if stream else None)


class UpBlock(nn.Module):
    """`num_res_blocks + 1` residual blocks, then an optional Resample."""

    features: int
    num_res_blocks: int
    upsample_mode: str | None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None, stream: bool = False):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        cache, new = cache or {}, {}
        for i in range(self.num_res_blocks + 1):
            name = f"resnets_{i}"
            x, new[name] = ResidualBlock(self.features, name=name, **kw)(x, cache.get(name), stream)
        if self.upsample_mode is not None:
            x, new["upsamplers_0"] = Resample(self.features, self.upsample_mode, name="upsamplers_0", **kw)(
                x, cache.get("upsamplers_0"), stream
            )
        return x, (new if stream else None)


class Decoder(nn.Module):
    """`(B, T', h, w, z_dim)` chunk (after post_quant_conv) -> `(B, T, 8h, 8w, 3)`, unclamped."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None, stream: bool = False):
        cfg = self.config
        kw = {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}
        cache, new = cache or {}, {}
        dims = _dims(cfg)[::-1]
        x, new["conv_in"] = CausalConv3d(dims[0], name="conv_in", **kw)(x, cache.get("conv_in"), stream)
        x, new["mid_block"] = MidBlock(dims[0], name="mid_block", **kw)(x, cache.get("mid_block"), stream)
        temporal_upsample = cfg.temporal_downsample[::-1]
        for level, features in enumerate(dims):
            mode = None
            if level != len(dims) - 1:
                mode = "upsample3d" if temporal_upsample[level] else "upsample2d"
            name = f"up_blocks_{level}"
            x, new[name] = UpBlock(features, cfg.num_res_blocks, mode, name=name, **kw)(
                x, cache.get(name), stream
            )
        x = nn.silu(RMSNorm(name="norm_out", **kw)(x))
        x, new["conv_out"] = CausalConv3d(3, name="conv_out", **kw)(x, cache.get("conv_out"), stream)
        return x, (new if stream else None)


def _scan_chunks(module: nn.Module, cache: Cache, chunks: jax.Array) -> jax.Array:
    """Runs `module(chunk, cache, stream=True)` over `chunks (N, B, ...)` carrying the cache."""

    def step(mdl, carry, chunk):
        y, carry = mdl(chunk, carry, stream=True)
        return carry, y

    scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False})
    _, ys = scan(module, cache, chunks)
    return ys


class WanVAE(nn.Module):
    """WAN 2.1 VAE. `encode(x) -> (mean, logvar)`, `decode(z) -> x`; see the module docstring."""

    config: VAEConfig

    def setup(self):
        cfg = self.config
        kw = {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}
        self.encoder = Encoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, (1, 1, 1), **kw)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, (1, 1, 1), **kw)
        self.decoder = Decoder(cfg)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction of `x` from the posterior mean (used to initialise all parameters)."""
        mean, _ = self.encode(x)
        return self.decode(mean)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x `(B, T, H, W, 3)` in [-1, 1], `T = 1 + t k`, `H, W` multiples of s, where t and s are the
        config's `temporal_factor` and `spatial_factor` (WAN 2.1's: 4 and 8).

        Returns `(mean, logvar)`, each `(B, 1 + k, H/s, W/s, z_dim)` float32; logvar in [-30, 20].
        """
        b, t, h, w, c = x.shape
        step, factor = self.config.temporal_factor, self.config.spatial_factor
        if (t - 1) % step or h % factor or w % factor:
            raise ValueError(
                f"encode needs T = 1 + {step}k frames and H, W multiples of {factor}; got {x.shape}"
            )
        out, cache = self.encoder(x[:, :1], stream=t > 1)
        if t > 1:
            chunks = x[:, 1:].reshape(b, -1, step, h, w, c).swapaxes(0, 1)
            rest = _scan_chunks(self.encoder, cache, chunks)
            rest = rest.swapaxes(0, 1).reshape(b, -1, *rest.shape[3:])
            out = jnp.concatenate([out, rest], axis=1)
        moments, _ = self.quant_conv(out)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array, clamp: bool = True) -> jax.Array:
        """z `(B, F, h, w, z_dim)` (un-normalised) -> `(B, 1 + t (F - 1), s h, s w, 3)` float32, t and s the
        config's `temporal_factor` and `spatial_factor` (WAN 2.1's: 4 and 8), clamped to [-1, 1] as
        diffusers does. A training loss takes the raw output (`clamp=False`): through the clamp a
        pixel past the wrong bound would get no gradient."""
        f = z.shape[1]
        x, _ = self.post_quant_conv(z)
        out, cache = self.decoder(x[:, :1], stream=f > 1)
        if f > 1:
            rest = _scan_chunks(self.decoder, cache, x[:, 1:, None].swapaxes(0, 1))
            rest = rest.swapaxes(0, 1)
            out = jnp.concatenate([out, rest.reshape(rest.shape[0], -1, *rest.shape[3:])], axis=1)
        out = out.astype(jnp.float32)
        return jnp.clip(out, -1.0, 1.0) if clamp else out


def init_params(config: VAEConfig, rng: jax.Array) -> dict:
    """Random parameters (logical-partitioning boxes removed): {"params": ...}."""
    x = jnp.zeros((1, 1, config.spatial_factor, config.spatial_factor, 3), jnp.float32)
    return nn.unbox(jax.jit(WanVAE(config).init)(rng, x))


@shapes_once
def abstract_params(config: VAEConfig) -> dict:
    """Shapes and dtypes of `init_params` (nothing is computed); keeps the Partitioned boxes."""
    x = jax.ShapeDtypeStruct((1, 1, config.spatial_factor, config.spatial_factor, 3), jnp.float32)
    return jax.eval_shape(lambda r, x: WanVAE(config).init(r, x), jax.random.key(0), x)
