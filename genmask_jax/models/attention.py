"""Multi-head attention with a choice of kernel: XLA, cuDNN (GPU) or Pallas splash attention (TPU).

All take `(B, T, N, d)` queries and `(B, S, N, d)` keys/values and an optional key mask `(B, S)` (True =
attend; any pattern for XLA and splash, a prefix of the keys for cuDNN) and return `(B, T, N, d)` in the
query dtype. Softmax scale is `1 / sqrt(d)`; logits and softmax are float32 whatever the input dtype.
An example with no key kept (the null text of classifier-free guidance, all padding) gets the mean of v
over its S keys in every query row, in every implementation: XLA's softmax over S equal (masked)
logits, the semantics of `jax.nn.dot_product_attention`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("xla", "cudnn", "splash")


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    implementation: str = "xla",
    spec: jax.sharding.PartitionSpec | None = None,
) -> jax.Array:
    """Softmax attention; `implementation` is one of IMPLEMENTATIONS.

    mask: `(B, S)` bool, True = attend to that key. "xla" and "splash" take any pattern. "cudnn" needs
    each row to keep a prefix of the keys (right padding): it passes only the per-example key counts
    `sum(mask)` to the kernel, so a left-padded or holed mask silently attends to the first `sum(mask)`
    keys instead (`cudnn_attention`).
    spec: the mesh partitioning of q/k/v `(batch, length, heads, head_dim)`. Splash is a Pallas
    kernel that XLA cannot partition, so under a mesh it runs per shard (shard_map) over batch and
    heads; the sequence axes must not be sharded. XLA and cuDNN are partitioned by the compiler.
    """
    if implementation == "splash":
        mesh = jax.sharding.get_abstract_mesh()
        if spec is None or mesh.empty or mesh.size == 1:
            return splash_attention(q, k, v, mask)
        return _sharded_splash(q, k, v, mask, spec)
    if implementation not in ("xla", "cudnn"):
        raise ValueError(
            f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}"
        )
    if implementation == "cudnn":
        return cudnn_attention(q, k, v, mask)
    return xla_attention(q, k, v, mask)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """cuDNN flash attention (GPU, bf16 or fp16 inputs) through `jax.nn.dot_product_attention`.

    The mask must keep a prefix of the keys (right padding, as the DiT's text context has): cuDNN takes
    it as per-example key lengths `sum(mask)`, its padding mask, which skips the padded tiles. Any other
    pattern (left padding, holes) attends to the first `sum(mask)` keys instead, silently: a check
    would need the mask's values, which are traced here. A boolean mask would have to be a
    `(B, 1, T, S)` bias (JAX's cuDNN path checks for T rows) read by every tile, with a bias gradient
    computed in the backward. An example with no key kept runs on all its keys and its output is
    replaced with the mean of v (the module's semantics), so its gradient is finite.
    """
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
    no_key = lengths == 0
    lengths = jnp.where(no_key, k.shape[1], lengths)
    out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    return _mean_value_where(no_key, v, out)


def _mean_value_where(no_key: jax.Array, v: jax.Array, out: jax.Array) -> jax.Array:
    """`out` `(B, T, N, d)` with the examples where `no_key` `(B,)` replaced by the mean of v over its
    keys `(B, S, N, d)`: what XLA's softmax over S equal logits gives."""
    mean = jnp.mean(v, axis=1, keepdims=True, dtype=jnp.float32).astype(out.dtype)
    return jnp.where(no_key[:, None, None, None], mean, out)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Plain softmax attention, softmax in float32, with a hand-written gradient.

    Same math as `jax.nn.dot_product_attention(implementation="xla")`. Without a gradient it is the
    textbook form, which XLA:CPU fuses into one kernel. Under differentiation the forward keeps the
    softmax unnormalised until after the value product (the division touches `(B, T, N, d)`, not the
    `(B, N, T, S)` probabilities) and saves the unnormalised weights W with the row sums l; the
    backward is the flash-attention one (Dao et al. 2022, appendix B.2) with P = W / l: dV = P^T dO,
    dS = P (dO V^T - rowsum(dO O)), dQ = dS K, dK = dS^T Q. Fewer elementwise passes over
    `(B, N, T, S)` than autodiff of the textbook form (BENCHMARKS.md).
    """
    return _attention(q, k, v, mask)


def _logits(q, k, mask):
    """`(B, N, T, S)` scaled logits in float32, masked keys at the float32 minimum.

    The product accumulates and is returned in float32. Below float32 the scale is applied there, as
    in `jax.nn.dot_product_attention`: bf16 logits round by up to 2^-9 of their size, which at |logit|
    ~ 20 doubled the output's error, and a bf16 `q * scale` adds 16% to it (BENCHMARKS.md). A float32
    q takes the scale exactly enough, and there XLA:CPU folds it into q's producer, where on the
    logits it was a `(B, N, T, S)` operand of the fused attention kernel (1-2% of the DiT forward).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if q.dtype == jnp.float32:
        return _masked(jnp.einsum("btnd,bsnd->bnts", q * np.float32(scale), k), mask)
    logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
    return _masked(logits * np.float32(scale), mask)


def _masked(logits, mask):
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    return logits


@jax.custom_vjp
def _attention(q, k, v, mask):
    probs = jax.nn.softmax(_logits(q, k, mask), axis=-1)
    out = jnp.einsum("bnts,bsnd->btnd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype)


def _attention_fwd(q, k, v, mask):
    logits = _logits(q, k, mask)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # W, (B, N, T, S)
    inv_sum = jnp.transpose(1.0 / jnp.sum(weights, axis=-1, keepdims=True), (0, 2, 1, 3))  # 1/l, (B, T, N, 1)
    out = jnp.einsum("bnts,bsnd->btnd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = (out * inv_sum).astype(v.dtype)  # the primal's output dtype
    return out, (q, k, v, mask, weights, inv_sum, out)


def _attention_bwd(residuals, d_out):
    q, k, v, mask, weights, inv_sum, out = residuals
    d_out32 = d_out.astype(jnp.float32)
    # Every product accumulates in float32 and is rounded once, to its input's dtype.
    d_v = jnp.einsum(
        "bnts,btnd->bsnd",
        weights.astype(v.dtype),
        (d_out32 * inv_sum).astype(v.dtype),
        preferred_element_type=jnp.float32,
    ).astype(v.dtype)
    d_probs = jnp.einsum("btnd,bsnd->bnts", d_out, v, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out32 * out.astype(jnp.float32), axis=-1, keepdims=True)  # (B, T, N, 1)
    scale = 1.0 / math.sqrt(q.shape[-1])
    # dS = P (dP - row) with P = W / l, and the softmax scale folded in here once.
    d_logits = weights * (d_probs - jnp.transpose(row, (0, 2, 1, 3)))
    d_logits = d_logits * jnp.transpose(inv_sum * scale, (0, 2, 1, 3))
    if mask is not None:  # masked logits are constants (a fully masked row has weights 1, not 0).
        d_logits = jnp.where(mask[:, None, None, :], d_logits, 0.0)
    d_logits = d_logits.astype(q.dtype)
    d_q = jnp.einsum("bnts,bsnd->btnd", d_logits, k, preferred_element_type=jnp.float32).astype(q.dtype)
    d_k = jnp.einsum("bnts,btnd->bsnd", d_logits, q, preferred_element_type=jnp.float32).astype(k.dtype)
    return d_q, d_k, d_v, None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _block_size(length: int, max_block: int) -> int:
    """The splash tile: `max_block`, or the length rounded up to a multiple of 128 (TPU lanes)."""
    return min(max_block, -(-length // 128) * 128)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _sharded_splash(q, k, v, mask, spec):
    from jax.sharding import PartitionSpec as P

    batch, length, heads, head_dim = (tuple(spec) + (None,) * 4)[:4]
    if length is not None:
        raise ValueError(f"splash attention cannot shard the sequence axis (spec {spec})")
    qkv_spec = P(batch, None, heads, None)
    if mask is None:
        fn = lambda q, k, v: splash_attention(q, k, v)
        args, in_specs = (q, k, v), (qkv_spec,) * 3
    else:
        fn = splash_attention
        args, in_specs = (q, k, v, mask), (qkv_spec,) * 3 + (P(batch, None),)
    return jax.shard_map(fn, in_specs=in_specs, out_specs=qkv_spec, check_vma=False)(*args)


def traced_platform() -> str:
    """The platform of the devices the program being traced will run on: the context mesh's, else the
    default backend's. Not `jax.default_backend()` alone: `aot` traces on a CPU host for a TPU topology's
    mesh, where the host's choice (Pallas interpret mode) is what would be compiled and measured for TPU.
    """
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None else device.platform


def _splash_kernel(num_heads: int, q_len: int, kv_len: int, block_q: int, block_kv: int, interpret: bool):
    """The splash kernel for a full (unmasked) multi-head mask; built per call (10-15 ms).

    Not cached: the kernel holds its mask-info arrays, and one built while nn.scan traces its body
    holds that trace's tracers, which leak into the next trace that reuses it.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    blocks = splash.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    full = splash.MultiHeadMask([splash.FullMask((q_len, kv_len)) for _ in range(num_heads)])
    return splash.make_splash_mha(
        full, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    max_block: int = 512,
    interpret: bool | None = None,
) -> jax.Array:
    """Pallas splash attention (TPU; `interpret=True` runs it anywhere, slowly).

    interpret: None decides by the platform the program is traced for (`traced_platform`): the Mosaic
    kernel for TPU devices, interpret mode for any other.

    Sequences are zero-padded to a multiple of the tile; padded and masked keys are excluded through
    segment ids (query segment 1, kept keys 1, dropped keys 0), padded query rows are cut off. An
    example with no key kept gets the mean of v over its S keys, as in XLA; the kernel itself would
    give sum(v) / (S rounded up to the tile), its padded keys counted in the normaliser.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    if interpret is None:
        interpret = traced_platform() != "tpu"
    b, t, n, d = q.shape
    s = k.shape[1]
    block_q, block_kv = _block_size(t, max_block), _block_size(s, max_block)
    keep = jnp.ones((b, s), jnp.int32) if mask is None else mask.astype(jnp.int32)
    values = v
    # Scaled in float32, rounded once: `q * bf16(1 / sqrt(d))` rounds the scale and then the product.
    q = _pad_to((q.astype(jnp.float32) * np.float32(1.0 / math.sqrt(d))).astype(q.dtype), 1, block_q)
    k, v, keep = _pad_to(k, 1, block_kv), _pad_to(v, 1, block_kv), _pad_to(keep, 1, block_kv)
    kernel = _splash_kernel(n, q.shape[1], k.shape[1], block_q, block_kv, interpret)
    q_segments = jnp.ones((b, q.shape[1]), jnp.int32)

    def one(q, k, v, q_seg, kv_seg):
        heads_first = lambda x: jnp.swapaxes(x, 0, 1)
        out = kernel(
            heads_first(q), heads_first(k), heads_first(v), segment_ids=splash.SegmentIds(q=q_seg, kv=kv_seg)
        )
        return heads_first(out)

    out = jax.vmap(one)(q, k, v, q_segments, keep)[:, :t].astype(np.dtype(q.dtype))
    if mask is None:
        return out
    return _mean_value_where(~jnp.any(mask, axis=1), values, out)
