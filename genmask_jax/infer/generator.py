"""Text-to-image with a trained GenMask (the same DiT keeps generating colour images).

Euler or UniPC (`diffusion.flow.SAMPLERS`) over WAN's shifted schedule with classifier-free guidance
against the null context (as `GenMask.generate_latents`); the prompt alone conditions the image (no
input image). Prompt `i` of a call starts from the noise of `fold_in(key(seed), i)` (as the evaluation
job's example `i` does), so its image depends on its place `i` in the call (a prompt repeated gives
different images) but not on the other prompts or the batch size. `generator(prompts)` runs
`batch_size` prompts per device call, the last call padded, so calls of any length compile once.
"""

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import numpy as np

from genmask_jax.diffusion import flow
from genmask_jax.encoders import make_encoder
from genmask_jax.infer.checkpoint import LoadedModel
from genmask_jax.infer.images import to_uint8
from genmask_jax.infer.segmenter import check_prompts, example_noise, noise_key, pad_rows
from genmask_jax.models.genmask import GenMask


def pixels_per_token(model: GenMask) -> tuple[int, int]:
    """(rows, columns) of pixels under one DiT token: the VAE's downsampling times the patch size."""
    return model.downsample * model.dit.patch_size[1], model.downsample * model.dit.patch_size[2]


def check_image_hw(model: GenMask, image_hw: tuple[int, int]) -> tuple[int, int]:
    """`image_hw` as ints; ValueError unless both are positive multiples of `pixels_per_token` (the
    sampler would floor another size to one, and return a smaller image than asked for)."""
    multiple = pixels_per_token(model)
    hw = tuple(int(x) for x in image_hw)
    if len(hw) != 2 or min(hw) <= 0 or hw[0] % multiple[0] or hw[1] % multiple[1]:
        need = str(multiple[0]) if multiple[0] == multiple[1] else f"{multiple[0]} (H) and {multiple[1]} (W)"
        raise ValueError(
            f"image size must be H, W in positive multiples of {need} for this model (the VAE's "
            f"downsampling times the DiT patch), got {tuple(image_hw)}"
        )
    return hw


def generate_images(
    model: GenMask,
    dit_params,
    vae_params,
    context: jax.Array,
    context_mask: jax.Array,
    index: jax.Array,
    key: jax.Array,
    image_hw: tuple[int, int],
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    shift: float = 3.0,
    sampler: str = "euler",
) -> jax.Array:
    """RGB `(B, H, W, 3)` in [-1, 1] for instruction states `(B, L, D)`: `GenMask.generate` with row b
    starting from the noise of `fold_in(key, index[b])` (per prompt, not one draw for the batch)."""
    hw = (image_hw[0] // model.downsample, image_hw[1] // model.downsample)
    noise = example_noise(key, index, (1, *hw, model.z_dim))
    return model.generate(
        dit_params, vae_params, context, context_mask, None, image_hw, num_steps, guidance_scale, shift,
        sampler, noise,
    )


class Generator:
    """`generator(prompts, num_steps, guidance_scale, seed) -> uint8 images (B, H, W, 3)`; prompt `i`
    gets the noise of `fold_in(key(seed), i)` (its image depends on `i`, not on the other prompts), seed
    in [0, 2**32) (`segmenter.noise_key`).

    Args:
      loaded: `infer.checkpoint.load(...)`.
      encoder: the instruction encoder; default `make_encoder(config.data.encoder)`, built on first use.
      batch_size: prompts per encoder and device call (each row two DiT rows with guidance), every call
        padded to it: one compile whatever the number of prompts, and images that do not depend on it.
    """

    def __init__(self, loaded: LoadedModel, encoder=None, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.loaded, self._encoder, self.batch_size = loaded, encoder, batch_size
        self._compiled = {}

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = make_encoder(self.loaded.config.data.encoder)
        return self._encoder

    def _function(self, image_hw, num_steps, guidance_scale, shift, sampler):
        key = (tuple(image_hw), num_steps, float(guidance_scale), float(shift), sampler)
        if key not in self._compiled:
            fn = partial(
                generate_images,
                self.loaded.model,
                image_hw=key[0],
                num_steps=num_steps,
                guidance_scale=key[2],
                shift=key[3],
                sampler=sampler,
            )
            self._compiled[key] = jax.jit(fn)
        return self._compiled[key]

    def __call__(
        self,
        prompts: Sequence[str],
        num_steps: int = 50,
        guidance_scale: float = 5.0,
        seed: int = 0,
        shift: float = 3.0,
        image_hw: tuple[int, int] | None = None,
        sampler: str = "euler",
    ) -> np.ndarray:
        """uint8 images `(len(prompts), H, W, 3)`, `batch_size` prompts at a time; no prompts, no images."""
        check_prompts(prompts)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not shift > 0:  # shift <= 0 turns the schedule into NaNs, not an error
            raise ValueError(f"shift must be > 0, got {shift}")
        flow.sampler(sampler)  # a bad name fails here, before the prompts are encoded
        key = noise_key(seed)
        image_hw = check_image_hw(self.loaded.model, image_hw or self.loaded.resolution)
        fn = self._function(image_hw, num_steps, guidance_scale, shift, sampler)
        chunks = [
            self._generate_chunk(fn, list(prompts[start : start + self.batch_size]), start, key)
            for start in range(0, len(prompts), self.batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, *image_hw, 3), np.uint8)

    def _generate_chunk(self, fn, prompts: list[str], start: int, key: jax.Array) -> np.ndarray:
        """uint8 images of `prompts`, the first of which is prompt `start` of the call; padded to
        `batch_size` rows."""
        context, context_mask = self.encoder.encode(None, prompts)
        rows = {
            "context": context,
            "context_mask": context_mask,
            "index": np.arange(start, start + len(prompts), dtype=np.int32),
        }
        rows, n = pad_rows(rows, self.batch_size)
        loaded = self.loaded
        with jax.set_mesh(loaded.mesh), nn.logical_axis_rules(loaded.rules):
            rgb = fn(
                loaded.dit_params,
                loaded.vae_params,
                rows["context"],
                rows["context_mask"],
                rows["index"],
                key,
            )
        return to_uint8(jax.device_get(rgb)[:n])
