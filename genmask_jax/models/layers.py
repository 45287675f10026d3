"""Small layers shared by the models: logically partitioned Dense, fp32 norms, timestep sinusoids."""

import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Axes = Sequence[str | None]


def shapes_once(fn: Callable) -> Callable:
    """`fn` (hashable arguments -> a tree of shapes: ShapeDtypeStructs, boxed or not) evaluated once per
    arguments. Tracing a model's init for its shapes takes about a second for the VAE, and the training,
    restore and conversion paths each ask for the same shapes; every call gets its own containers over
    the shared leaves, so a caller that edits its tree cannot change another's."""
    cached = functools.lru_cache(maxsize=32)(fn)

    @functools.wraps(fn)
    def once(*args):
        return jax.tree.map(lambda x: x, cached(*args))

    once.cache_clear = cached.cache_clear
    return once


def logical_param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: Axes, dtype) -> jax.Array:
    """`module.param(name, ...)` of `shape` and `dtype` whose axes carry the logical names `axes`."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, dtype)


class Dense(nn.Module):
    """`x @ kernel + bias` over the last axis; kernel `(in, out)` and bias `(out,)` as in nn.Dense.

    The leading axes are flattened to one before the matmul: with XLA:CPU the weight gradient of a
    dot that contracts several token axes (B, L) gets a transposing copy fused with the whole
    elementwise backward producing the cotangent, which runs ~20x slower than the matmul itself.
    """

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = logical_param(self, "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                               self.axes, self.param_dtype)
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = logical_param(self, "bias", nn.initializers.zeros_init(), (self.features,), self.axes[-1:],
                                 self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y.reshape(*x.shape[:-1], self.features)


def dense(features: int, axes: Axes, dtype, param_dtype, name: str, use_bias: bool = True) -> Dense:
    """A Dense whose kernel (in, out) and bias (out,) carry logical axis names `axes` = (in, out)."""
    return Dense(features, tuple(axes), use_bias, dtype, param_dtype, name=name)


@jax.custom_vjp
def materialize_cotangent(x: jax.Array) -> jax.Array:
    """Identity whose cotangent is computed once into a buffer before it flows on (XLA:CPU only).

    The residual stream's cotangent is a sum over every later sub-layer. XLA:CPU fuses that sum into
    each of its consumers and recomputes it there, so the lower blocks' backward fusions each read
    dozens of `(B, L, D)` buffers (at 4 blocks, up to 127 operands and 100 multiply-adds per
    element; BENCHMARKS.md). XLA:CPU drops optimization barriers before fusion, so the boundary is a
    conditional, which fusion cannot cross. Its predicate is a constant behind an optimization
    barrier (not folded away before the barrier is dropped, and replicated, so no collective under
    sharding) and its branches differ in form, y and -(-y), which are equal in value (signed zeros
    and NaNs included), so that neither is merged away. Other platforms, chosen at lowering (AOT
    compiles for TPU from a CPU host included), get the plain identity.
    """
    return x


def _materialize_fwd(x):
    return x, None


def _cpu_materialize(g):
    keep = jax.lax.optimization_barrier(jnp.ones((), bool))
    return jax.lax.cond(keep, lambda y: y, lambda y: jnp.negative(-y), g)


def _materialize_bwd(_, g):
    return (jax.lax.platform_dependent(g, cpu=_cpu_materialize, default=lambda y: y),)


materialize_cotangent.defvjp(_materialize_fwd, _materialize_bwd)


def recomputed(fn: Callable, static_argnums: tuple[int, ...] = ()) -> Callable:
    """`fn` under jax.checkpoint: its backward recomputes the intermediates (float32 copies, the tanh form
    of the gelu) from the inputs instead of saving them, and XLA fuses the recomputation into the
    backward's elementwise passes. At the 1.3B DiT's 2,048 tokens this takes the saved activations from
    15.9 to 5.9 GiB per example (BENCHMARKS.md).

    The result takes `in_scan=`: inside nn.scan the forward and the backward are separate loops, which
    CSE cannot merge, so jax.checkpoint's optimisation barriers (prevent_cse) are left out, as
    nn.remat's `prevent_cse=not scan_layers` leaves them out of the scanned blocks.
    """
    variants = {scan: jax.checkpoint(fn, prevent_cse=not scan, static_argnums=static_argnums)
                for scan in (False, True)}

    @functools.wraps(fn)
    def call(*args, in_scan: bool = False):
        return variants[in_scan](*args)

    return call


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis without affine parameters, in float32 (returns float32)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


@functools.partial(recomputed, static_argnums=(3, 4))
def _affine_layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, dtype) -> jax.Array:
    return (layer_norm(x, eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


class LayerNorm(nn.Module):
    """Affine LayerNorm computed in float32 (diffusers' FP32LayerNorm); returns `dtype`. `in_scan`: the
    module runs inside nn.scan (`recomputed`)."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"
    in_scan: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape, axes = (x.shape[-1],), (self.axis_name,)
        scale = logical_param(self, "scale", nn.initializers.ones_init(), shape, axes, self.param_dtype)
        bias = logical_param(self, "bias", nn.initializers.zeros_init(), shape, axes, self.param_dtype)
        return _affine_layer_norm(x, scale, bias, self.eps, self.dtype, in_scan=self.in_scan)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale, computed in float32; returns `dtype`. `in_scan`:
    the module runs inside nn.scan (`recomputed`)."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"
    in_scan: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = logical_param(
            self, "scale", nn.initializers.ones_init(), (x.shape[-1],), (self.axis_name,), self.param_dtype
        )
        return _rms_norm(x, scale, self.eps, self.dtype, in_scan=self.in_scan)


@functools.partial(recomputed, static_argnums=(2, 3))
def _rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(dtype)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features `[cos(t f_i), sin(t f_i)]`, `f_i = max_period^(-i / (dim/2))`, float32.

    t: any shape, WAN's 0..1000 scale. Returns `t.shape + (dim,)`. Follows diffusers' float32 recipe
    (exponent and angles in float32, the original WAN code uses float64): the exponent is formed in
    float32 and exponentiated once, correctly rounded, on the host.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = t.astype(jnp.float32)[..., None] * jnp.asarray(freqs)
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


@recomputed  # saves x alone, not the six (L, ffn) intermediates of the tanh form
def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)
