"""The WAN 2.1 diffusion transformer (diffusers `WanTransformer3DModel`, text-to-video) in Flax Linen.

Parameter names follow diffusers so that conversion is a rename plus a layout change:
  patch_embedding/{kernel (p_t, p_h, p_w, C_in, D), bias}
  condition_embedder/{time_embedder/linear_1, time_embedder/linear_2, time_proj,
                      text_embedder/linear_1, text_embedder/linear_2}
  blocks_{i}/ (or blocks/ with a leading layer axis when config.scan_layers)
      attn1/{to_q, to_k, to_v, to_out, norm_q, norm_k}, attn2/{...}, norm2/{scale, bias},
      ffn/{proj_in, proj_out}, scale_shift_table (1, 6, D)
  proj_out, scale_shift_table (1, 2, D)
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from genmask_jax.models.attention import IMPLEMENTATIONS, dot_product_attention
from genmask_jax.models.layers import (
    LayerNorm,
    RMSNorm,
    dense,
    gelu_tanh,
    layer_norm,
    logical_param,
    materialize_cotangent,
    recomputed,
    timestep_embedding,
)
from genmask_jax.models.rope import apply_rope, rope_angles

BATCH, LENGTH, EMBED = "activation_batch", "activation_length", "activation_embed"

VARIANTS: dict[str, dict[str, Any]] = {
    "1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096),
    "14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096),
    "tiny": dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32),
}

# The jax.checkpoint_policies that are policies themselves; the others (save_only_these_names,
# offload_dot_with_no_batch_dims, ...) are factories that take names or memory kinds and make one.
REMAT_POLICIES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """WAN 2.1 DiT hyper-parameters (defaults: the 1.3B text-to-video model)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 16
    out_channels: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    num_heads: int = 12
    num_layers: int = 30
    eps: float = 1e-6
    rope_theta: float = 1e4
    dtype: str = "float32"
    param_dtype: str = "float32"
    # The residual stream's dtype (patch embedding output, the blocks' residual adds) and the time
    # projection's, which modulates it; None: `dtype`. float32 as in the original WAN code
    # (wan/modules/model.py runs `x = x + y * e[k]` and time_projection under autocast(float32)), where
    # diffusers cast to bfloat16 rounds the stream to bfloat16 after every sub-layer. In a bfloat16 model
    # float32 doubles the memory of the stream's saved values (the block inputs under remat).
    residual_dtype: str | None = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention: str = "xla"
    use_context_mask: bool = False

    def __post_init__(self):
        patch = tuple(self.patch_size)
        if len(patch) != 3 or any(int(p) != p or p < 1 for p in patch):
            raise ValueError(f"patch_size must be 3 positive ints (frames, height, width): {self.patch_size}")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in patch))
        for name in ("in_channels", "out_channels", "dim", "ffn_dim", "freq_dim", "text_dim", "num_heads"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # 0 layers: the embedders and the head alone (convert.wan_dit initialises a new text embedder so).
        if int(self.num_layers) != self.num_layers or self.num_layers < 0:
            raise ValueError(f"num_layers must be a non-negative int, got {self.num_layers!r}")
        if self.freq_dim % 2:  # the timestep features are freq_dim / 2 cosines and as many sines
            raise ValueError(f"freq_dim {self.freq_dim} must be even")
        if not (self.eps > 0 and self.rope_theta > 0):
            raise ValueError(f"eps and rope_theta must be > 0, got {self.eps} and {self.rope_theta}")
        for name in ("dtype", "param_dtype", "residual_dtype"):
            value = getattr(self, name)
            if name == "residual_dtype" and value is None:
                continue
            try:
                floating = jnp.issubdtype(jnp.dtype(value), jnp.floating)
            except TypeError:
                floating = False
            if not floating:
                raise ValueError(f"{name} must name a floating dtype (float32, bfloat16, ...), got {value!r}")
        residual = _residual_dtype(self)
        if jnp.promote_types(self.dtype, residual) != residual:
            raise ValueError(
                f"residual_dtype {self.residual_dtype!r} is narrower than dtype {self.dtype!r}: "
                "it would round every sub-layer's output below its own precision"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim {self.head_dim} must be even and >= 6 for the 3D RoPE")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention {self.attention!r} not in {IMPLEMENTATIONS}")
        if self.attention == "cudnn" and jnp.dtype(self.dtype) not in (jnp.bfloat16, jnp.float16):
            raise ValueError(
                f"attention 'cudnn' needs dtype bfloat16 or float16 (cuDNN flash attention has "
                f"no float32 kernel), got dtype {self.dtype!r}"
            )
        if self.remat_policy not in ("none", *REMAT_POLICIES):
            raise ValueError(
                f"remat_policy {self.remat_policy!r} is not one of {('none', *REMAT_POLICIES)} "
                "(jax.checkpoint_policies that take no arguments)"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_features(self) -> int:
        return math.prod(self.patch_size) * self.out_channels

    @classmethod
    def from_variant(cls, name: str, **overrides) -> "DiTConfig":
        if name not in VARIANTS:
            raise ValueError(f"unknown DiT variant {name!r}; choose one of {sorted(VARIANTS)}")
        return cls(**{**VARIANTS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        # Tuples stay tuples: ml_collections can override a tuple field from the command line
        # (`--config.model.dit.patch_size='(1, 1, 1)'`), not a list one.
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DiTConfig fields: {unknown}")
        return cls(**d)


def _dtypes(config: DiTConfig) -> tuple[jnp.dtype, jnp.dtype]:
    return jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)


def _residual_dtype(config: DiTConfig) -> jnp.dtype:
    return jnp.dtype(config.residual_dtype or config.dtype)


def _scale_shift_table(module: nn.Module, rows: int, dim: int, param_dtype) -> jax.Array:
    """WAN's learned modulation offsets `(1, rows, dim)`, initialised as `randn / sqrt(dim)`."""
    init = lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / math.sqrt(dim)
    axes = (None, "modulation", "embed")
    return logical_param(module, "scale_shift_table", init, (1, rows, dim), axes, param_dtype)


class PatchEmbedding(nn.Module):
    """Conv3d with stride = kernel = patch, as one matmul over flattened patches.

    `(B, F, H, W, C)` -> `(B, F/p_t * H/p_h * W/p_w, D)` tokens in (f, h, w) order, in the residual
    dtype (the matmul's inputs in `dtype`, its accumulation returned unrounded).
    """

    config: DiTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dtype, param_dtype = _dtypes(cfg)
        pt, ph, pw = cfg.patch_size
        b, f, h, w, c = x.shape
        kernel = logical_param(
            self,
            "kernel",
            nn.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4),
            (pt, ph, pw, c, cfg.dim),
            ("conv_t", "conv_h", "conv_w", "conv_in", "embed"),
            param_dtype,
        )
        bias = logical_param(self, "bias", nn.initializers.zeros_init(), (cfg.dim,), ("embed",), param_dtype)
        x = x.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, c)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, pt * ph * pw * c)
        residual = _residual_dtype(cfg)
        kernel = kernel.reshape(-1, cfg.dim).astype(dtype)
        y = jnp.dot(x.astype(dtype), kernel, preferred_element_type=residual)
        return (y + bias.astype(residual)).reshape(b, -1, cfg.dim)


class Mlp(nn.Module):
    """`linear_2(activation(linear_1(x)))`; axes = (in, hidden, out) logical names."""

    features: int
    axes: tuple[str, str, str]
    activation: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a_in, a_hidden, a_out = self.axes
        h = dense(self.features, (a_in, a_hidden), self.dtype, self.param_dtype, "linear_1")(x)
        return dense(self.features, (a_hidden, a_out), self.dtype, self.param_dtype, "linear_2")(
            self.activation(h)
        )


class ConditionEmbedder(nn.Module):
    """Timestep and text embeddings.

    t `(B, Lt)` (Lt = 1 for one timestep per example, or per token) -> temb `(B, Lt, D)` and
    proj `(B, Lt, 6, D)`, both float32 (proj computed in the residual dtype); context
    `(B, S, text_dim)` -> `(B, S, D)`.
    """

    config: DiTConfig

    @nn.compact
    def __call__(self, t: jax.Array, context: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.config
        dtype, param_dtype = _dtypes(cfg)
        f32 = jnp.float32
        sinusoid = timestep_embedding(t, cfg.freq_dim)
        # diffusers keeps the time embedder in float32 (`_keep_in_fp32_modules`).
        temb = Mlp(cfg.dim, ("freq", "mlp", "embed"), nn.silu, f32, param_dtype, name="time_embedder")(
            sinusoid
        )
        residual = _residual_dtype(cfg)
        proj = dense(6 * cfg.dim, ("embed", "mlp"), residual, param_dtype, "time_proj")(
            nn.silu(temb).astype(residual)
        )
        proj = proj.astype(f32).reshape(*proj.shape[:-1], 6, cfg.dim)
        # Per-token timesteps make these (B, L, ...) tensors as large as the activations: pin them to
        # the batch sharding, or XLA may materialise them for the global batch on every device.
        temb = nn.with_logical_constraint(temb, (BATCH, LENGTH, EMBED))
        proj = nn.with_logical_constraint(proj, (BATCH, LENGTH, None, EMBED))
        ctx = Mlp(
            cfg.dim, ("text_embed", "mlp", "embed"), gelu_tanh, dtype, param_dtype, name="text_embedder"
        )(context.astype(dtype))
        return temb, proj, ctx


class Attention(nn.Module):
    """Self- (context None, with RoPE) or cross-attention with q/k RMSNorm over the full width."""

    config: DiTConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
        context_mask: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        dtype, param_dtype = _dtypes(cfg)
        b, length, _ = x.shape
        source = x if context is None else context
        q = dense(cfg.dim, ("embed", "heads"), dtype, param_dtype, "to_q")(x)
        k = dense(cfg.dim, ("embed", "heads"), dtype, param_dtype, "to_k")(source)
        v = dense(cfg.dim, ("embed", "heads"), dtype, param_dtype, "to_v")(source)
        q = RMSNorm(cfg.eps, dtype, param_dtype, "heads", cfg.scan_layers, name="norm_q")(q)
        k = RMSNorm(cfg.eps, dtype, param_dtype, "heads", cfg.scan_layers, name="norm_k")(k)
        split = lambda y: y.reshape(b, y.shape[1], cfg.num_heads, cfg.head_dim)
        q, k, v = split(q), split(k), split(v)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        heads = (BATCH, LENGTH, "activation_heads", "activation_kv")
        q = nn.with_logical_constraint(q, heads)
        k = nn.with_logical_constraint(k, heads)
        v = nn.with_logical_constraint(v, heads)
        out = dot_product_attention(q, k, v, context_mask, cfg.attention, spec=nn.logical_to_mesh_axes(heads))
        out = out.reshape(b, length, cfg.dim)
        return dense(cfg.dim, ("heads", "embed"), dtype, param_dtype, "to_out")(out)


class FeedForward(nn.Module):
    config: DiTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dtype, param_dtype = _dtypes(cfg)
        h = dense(cfg.ffn_dim, ("embed", "mlp"), dtype, param_dtype, "proj_in")(x)
        h = gelu_tanh(h, in_scan=cfg.scan_layers)
        h = nn.with_logical_constraint(h, (BATCH, LENGTH, "activation_mlp"))
        return dense(cfg.dim, ("mlp", "embed"), dtype, param_dtype, "proj_out")(h)


@functools.partial(recomputed, static_argnums=(3, 4))  # saves x, not float32 copies
def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, eps: float, dtype) -> jax.Array:
    """`LN(x) * (1 + scale) + shift` in float32, cast to `dtype`."""
    return (layer_norm(x, eps) * (1 + scale) + shift).astype(dtype)


@functools.partial(recomputed, static_argnums=(3,))
def _gated_add(x: jax.Array, h: jax.Array, gate: jax.Array, dtype) -> jax.Array:
    """The residual update `x + h * gate` in float32, cast to `dtype` (the residual dtype)."""
    return (x.astype(jnp.float32) + h.astype(jnp.float32) * gate).astype(dtype)


class Block(nn.Module):
    """One WAN block: modulated self-attention, cross-attention, modulated gelu-tanh FFN.

    x `(B, L, D)` in the residual dtype (returned in it); context `(B, S, D)`; proj `(B, Lt, 6, D)`
    float32 with Lt in {1, L}.
    """

    config: DiTConfig

    @nn.compact
    def __call__(self, x, context, proj, rope, context_mask):
        cfg = self.config
        dtype, param_dtype = _dtypes(cfg)
        residual = _residual_dtype(cfg)
        f32 = jnp.float32
        table = _scale_shift_table(self, 6, cfg.dim, param_dtype)
        # One cotangent buffer per residual add (layers.materialize_cotangent: XLA:CPU otherwise
        # recomputes the sum over all later blocks inside each fusion of the backward).
        x = materialize_cotangent(x)
        mod = table.astype(f32)[None] + proj
        shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, :, i] for i in range(6))

        scan = cfg.scan_layers  # the blocks run inside nn.scan (layers.recomputed)
        h = _modulate(x, shift, scale, cfg.eps, dtype, in_scan=scan)
        h = Attention(cfg, name="attn1")(h, rope=rope)
        x = _gated_add(x, h, gate, residual, in_scan=scan)

        x = materialize_cotangent(x)
        h = LayerNorm(cfg.eps, dtype, param_dtype, in_scan=scan, name="norm2")(x)
        mask = context_mask if cfg.use_context_mask else None
        x = x + Attention(cfg, name="attn2")(h, context=context, context_mask=mask).astype(residual)

        x = materialize_cotangent(x)
        h = _modulate(x, c_shift, c_scale, cfg.eps, dtype, in_scan=scan)
        h = FeedForward(cfg, name="ffn")(h)
        x = _gated_add(x, h, c_gate, residual, in_scan=scan)
        return nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))


class ScannedBlock(Block):
    """`Block` in the (carry, out) form nn.scan expects."""

    def __call__(self, x, context, proj, rope, context_mask):
        return super().__call__(x, context, proj, rope, context_mask), None


def _remat(module_cls, config: DiTConfig):
    if config.remat_policy == "none":
        return module_cls
    policy = getattr(jax.checkpoint_policies, config.remat_policy)
    return nn.remat(module_cls, policy=policy, prevent_cse=not config.scan_layers)


class WanDiT(nn.Module):
    """WAN 2.1 DiT. See `__call__`."""

    config: DiTConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, context: jax.Array, context_mask: jax.Array | None = None
    ) -> jax.Array:
        """Velocity prediction.

        Args:
          x: latents `(B, F, H, W, C_in)`, channels last.
          t: timesteps on the 0..1000 scale: `(B,)` (or `(1,)`, one for the batch), per token
            `(B, F/p_t * H/p_h * W/p_w)`, or per latent frame `(B, F/p_t)` (the same as per token with
            each frame's value repeated over its tokens, but the time embedding MLP and projection run
            once per frame, not per token).
          context: text states `(B, S, text_dim)`.
          context_mask: `(B, S)` bool, True = real token; used only when config.use_context_mask. With
            attention "cudnn" it must keep a prefix of the tokens (right padding, as genmask_jax.encoders
            pads the context): cuDNN reads it as per-example lengths `sum(mask)`, so a left-padded or
            holed mask attends to the wrong keys, silently. "xla" and "splash" take any pattern.
        Returns:
          `(B, F, H, W, C_out)` float32.
        """
        cfg = self.config
        dtype, param_dtype = _dtypes(cfg)
        b, f, h, w, _ = x.shape
        pt, ph, pw = cfg.patch_size
        grid = (f // pt, h // ph, w // pw)
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent size {(f, h, w)} is not a multiple of the patch {cfg.patch_size}")
        length = math.prod(grid)
        t = jnp.asarray(t)
        per_frame = t.ndim == 2 and t.shape == (b, grid[0]) and grid[0] != length
        if t.ndim == 1 and t.shape[0] in (1, b):
            t = t[:, None]
        elif t.shape != (b, length) and not per_frame:
            raise ValueError(
                f"timesteps must be (B,), per token (B, {length}) or per frame (B, {grid[0]}) with "
                f"B = {b}, got {t.shape}"
            )

        cos, sin = rope_angles(grid, cfg.head_dim, cfg.rope_theta)
        rope = (jnp.asarray(cos), jnp.asarray(sin))
        tokens = PatchEmbedding(cfg, name="patch_embedding")(x)
        tokens = nn.with_logical_constraint(tokens, (BATCH, LENGTH, EMBED))
        temb, proj, ctx = ConditionEmbedder(cfg, name="condition_embedder")(t, context)
        if per_frame:  # (B, F', ...) -> (B, L, ...): token order is frame-major.
            temb, proj = (jnp.repeat(y, length // grid[0], axis=1) for y in (temb, proj))
            temb = nn.with_logical_constraint(temb, (BATCH, LENGTH, EMBED))
            proj = nn.with_logical_constraint(proj, (BATCH, LENGTH, None, EMBED))
        ctx = nn.with_logical_constraint(ctx, (BATCH, "activation_text", EMBED))
        mask = context_mask if cfg.use_context_mask else None

        if cfg.scan_layers:
            blocks = nn.scan(
                _remat(ScannedBlock, cfg),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,) * 4,
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            tokens, _ = blocks(cfg, name="blocks")(tokens, ctx, proj, rope, mask)
        else:
            block_cls = _remat(Block, cfg)
            for i in range(cfg.num_layers):
                tokens = block_cls(cfg, name=f"blocks_{i}")(tokens, ctx, proj, rope, mask)

        table = _scale_shift_table(self, 2, cfg.dim, param_dtype)
        mod = table.astype(jnp.float32)[None] + temb[:, :, None]
        out = _modulate(tokens, mod[:, :, 0], mod[:, :, 1], cfg.eps, dtype)
        out = dense(cfg.patch_features, ("embed", "patch"), dtype, param_dtype, "proj_out")(out)
        return unpatchify(out.astype(jnp.float32), grid, cfg.patch_size)


def unpatchify(tokens: jax.Array, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> jax.Array:
    """`(B, F'*H'*W', p_t*p_h*p_w*C)` (channel fastest) -> `(B, F'p_t, H'p_h, W'p_w, C)`."""
    b = tokens.shape[0]
    (f, h, w), (pt, ph, pw) = grid, patch
    x = tokens.reshape(b, f, h, w, pt, ph, pw, -1)
    return x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, f * pt, h * ph, w * pw, -1)


def dummy_inputs(config: DiTConfig, latent_shape=None, text_len: int = 8):
    """(x, t, context) zeros for tracing `WanDiT(config).init`: latents of `latent_shape` (B, F, H, W),
    by default one example of 1 x 2 x 2 patches; parameter shapes do not depend on them."""
    pt, ph, pw = config.patch_size
    b, f, h, w = latent_shape or (1, pt, 2 * ph, 2 * pw)
    x = jnp.zeros((b, f, h, w, config.in_channels), jnp.float32)
    return x, jnp.zeros((b,), jnp.float32), jnp.zeros((b, text_len, config.text_dim), jnp.float32)


def init_params(config: DiTConfig, rng: jax.Array, latent_shape=None, text_len: int = 8):
    """Unboxed random parameters (the Partitioned metadata removed) for `config`; `latent_shape` and
    `text_len` as in `dummy_inputs`."""
    variables = WanDiT(config).init(rng, *dummy_inputs(config, latent_shape, text_len))
    return nn.meta.unbox(variables["params"])
