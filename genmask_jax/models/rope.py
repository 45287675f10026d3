"""3D rotary position embedding of WAN 2.1: head_dim split into (frame, height, width) parts."""

import jax
import jax.numpy as jnp
import numpy as np


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) sizes: h = w = 2 * (head_dim // 6), t takes the rest (128 -> 44, 42, 42)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(
    grid: tuple[int, int, int], head_dim: int, theta: float = 1e4, offset: tuple[int, int, int] = (0, 0, 0)
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the rotation angles, each `(F*H*W, head_dim // 2)` float32.

    Token order is (f, h, w), matching the flattened patch grid. Pair i of a sub-dimension of size n
    at position p turns by `p * theta^(-2i/n)`. Computed in float64 on the host (the grid is static)
    and rounded once, as diffusers and the original code do.
    """
    parts = []
    for size, n, start in zip(grid, rope_split(head_dim), offset):
        freqs = 1.0 / theta ** (np.arange(0, n, 2, dtype=np.float64)[: n // 2] / n)
        parts.append(np.outer(np.arange(start, start + size, dtype=np.float64), freqs))
    f, h, w = grid
    angles = np.concatenate(
        [
            np.broadcast_to(parts[0][:, None, None], (f, h, w, parts[0].shape[-1])),
            np.broadcast_to(parts[1][None, :, None], (f, h, w, parts[1].shape[-1])),
            np.broadcast_to(parts[2][None, None, :], (f, h, w, parts[2].shape[-1])),
        ],
        axis=-1,
    ).reshape(f * h * w, head_dim // 2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates adjacent pairs (x[2i], x[2i+1]) of `x` `(B, L, N, d)` by angles `(L, d/2)`; in float32."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x1, x2 = x32[..., 0], x32[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
