"""Binary masks <-> the black/white RGB images that the WAN VAE encodes (GenMask renders masks so)."""

import jax
import jax.numpy as jnp


def mask_to_rgb(mask: jax.Array) -> jax.Array:
    """`(..., H, W)` mask in {0, 1} (or bool) -> `(..., H, W, 3)` float32: foreground +1, background -1."""
    rgb = jnp.where(jnp.asarray(mask) > 0.5, 1.0, -1.0).astype(jnp.float32)
    return jnp.broadcast_to(rgb[..., None], (*rgb.shape, 3))


def rgb_to_mask(rgb: jax.Array) -> jax.Array:
    """`(..., H, W, 3)` decoded image in [-1, 1] -> `(..., H, W)` bool: channel mean > 0."""
    return jnp.mean(jnp.asarray(rgb, jnp.float32), axis=-1) > 0
