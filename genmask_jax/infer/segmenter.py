"""Referring segmentation with a trained GenMask: images + instructions -> masks at the original size.

Single-step by default (the paper's inference: start at t = 1 from noise, one DiT call, x0 = eps - v,
VAE-decode); `num_steps > 1` integrates the same velocity field with Euler steps instead. The score of a
pixel is the mean of the decoded RGB in [-1, 1]; as LISA upsamples its logits, the score is mapped back to the
image's original size bilinearly (the fit's padding or crop undone) and thresholded at 0 there
(`original_size_mask`). Each example's noise is drawn from `fold_in(key(seed), index)`, so a prediction
does not depend on the batch it was computed in, the batch size or the number of devices: the evaluation
job gives each example of a split its own index. `segmenter(images, prompts)` gives every image index
0, the same noise drawn from the seed alone, so an image's mask does not depend on the other images of
the call or on its place among them; it runs `batch_size` images per device call, the last chunk
padded, so calls of any length compile once.
"""

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from genmask_jax.data import preprocess
from genmask_jax.diffusion import flow
from genmask_jax.encoders import make_encoder
from genmask_jax.infer.checkpoint import LoadedModel
from genmask_jax.models.genmask import GenMask
from genmask_jax.parallel.sharding import batch_shard_count, batch_sharding

NUM_SEEDS = 2**32


def noise_key(seed: int) -> jax.Array:
    """`jax.random.key(seed)`; ValueError unless 0 <= seed < 2**32: without jax_enable_x64 JAX keeps a
    seed's low 32 bits, so seed 2**32 + 7 would draw the noise of seed 7 (and -1 that of 2**32 - 1)."""
    if not 0 <= seed < NUM_SEEDS:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return jax.random.key(seed)


def example_noise(key: jax.Array, index: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Per-example standard normal noise `(B, *shape)` from `fold_in(key, index[b])`."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index.astype(jnp.int32))
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def segment_mask_latents(
    model: GenMask,
    dit_params,
    image_latent: jax.Array,
    context: jax.Array,
    context_mask: jax.Array,
    noise: jax.Array,
    num_steps: int = 1,
    shift: float = 1.0,
) -> jax.Array:
    """Mask latents `(B, 1, h, w, z)`: one step (x0 = eps - v at t = 1) or Euler over `num_steps`."""
    if num_steps == 1:
        return model.predict_mask_latents(dit_params, image_latent, context, context_mask, noise)
    return euler_mask_latents(model, dit_params, image_latent, context, context_mask, noise, num_steps, shift)


def euler_mask_latents(
    model: GenMask,
    dit_params,
    image_latent: jax.Array,
    context: jax.Array,
    context_mask: jax.Array,
    noise: jax.Array,
    num_steps: int,
    shift: float = 1.0,
) -> jax.Array:
    """Euler integration of the segmentation velocity from t = 1 to 0, the image frame clean (t = 0)."""

    def velocity(x, t):
        # segmentation_inputs noises its mask argument with its noise argument; with both = x,
        # (1 - t) x + t x = x, so this is the two-frame input at the current state x.
        inputs, t_frames, _ = model.segmentation_inputs(image_latent, x, t, x)
        return model.apply_dit(dit_params, inputs, t_frames, context, context_mask)[:, 1:]

    return flow.euler_sample(velocity, noise, num_steps, shift)


def predict_scores(
    model: GenMask,
    dit_params,
    vae_params,
    image: jax.Array,
    context: jax.Array,
    context_mask: jax.Array,
    index: jax.Array,
    key: jax.Array,
    num_steps: int = 1,
    shift: float = 1.0,
) -> jax.Array:
    """Image `(B, H, W, 3)` in [-1, 1] + instruction states `(B, L, D)` -> float32 scores `(B, H, W)`:
    the decoded mask image's channel mean in [-1, 1], foreground where > 0."""
    image_latent = model.encode(vae_params, image)
    return latent_scores(
        model, dit_params, vae_params, image_latent, context, context_mask, index, key, num_steps, shift
    )


def latent_scores(
    model: GenMask,
    dit_params,
    vae_params,
    image_latent: jax.Array,
    context: jax.Array,
    context_mask: jax.Array,
    index: jax.Array,
    key: jax.Array,
    num_steps: int = 1,
    shift: float = 1.0,
) -> jax.Array:
    """`predict_scores` from the image latent `(B, 1, h, w, z)`; the noise of example `index[b]` is
    `fold_in(key, index[b])`, whatever the batch."""
    noise = example_noise(key, index, image_latent.shape[1:])
    latents = segment_mask_latents(
        model, dit_params, image_latent, context, context_mask, noise, num_steps, shift
    )
    return jnp.mean(model.decode(vae_params, latents).astype(jnp.float32), axis=-1)


def original_size_mask(score: np.ndarray, geometry: preprocess.Geometry | dict) -> np.ndarray:
    """float `(h, w)` score at the model resolution -> bool `(H, W)` mask at the image's original size:
    the fit undone (padding dropped, a crop's cut-away parts 0), resized bilinearly, then > 0."""
    score = np.asarray(score)
    if score.dtype == np.bool_:  # a thresholded prediction: back to +-1 so that 0 stays the boundary
        score = np.where(score, 1.0, -1.0)
    return preprocess.unfit_mask(score.astype(np.float32), geometry, "bilinear") > 0


def pad_rows(tree: dict, multiple: int) -> tuple[dict, int]:
    """Pads every `(B, ...)` leaf with copies of row 0 to a multiple of `multiple`; returns (tree, B)."""
    n = len(next(iter(tree.values())))
    extra = -n % multiple
    if extra == 0:
        return tree, n
    return {k: np.concatenate([v, np.repeat(v[:1], extra, axis=0)]) for k, v in tree.items()}, n


def as_rgb_uint8(image: np.ndarray | Image.Image) -> np.ndarray:
    """A PIL image as displayed (EXIF orientation applied, as `images.read_image` reads a file) or a uint8
    array (`preprocess.as_rgb`) -> uint8 `(H, W, 3)`; ValueError for others: whether a float image's
    values run to 1 or to 255 cannot be told."""
    if isinstance(image, Image.Image):
        return preprocess.pil_to_rgb(ImageOps.exif_transpose(image))
    return preprocess.as_rgb(np.asarray(image))


def check_prompts(prompts) -> None:
    """Raises TypeError for one prompt where a sequence of them is due (a string would be read as one
    prompt per character)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"prompts: a list of strings, one per image, got {type(prompts).__name__} (wrap one prompt in "
            "a list)"
        )


def check_inputs(images, prompts) -> None:
    """Raises TypeError for one image or one prompt where a sequence of them is due, ValueError for
    sequences of different lengths."""
    if isinstance(images, np.ndarray | Image.Image | jax.Array) or not isinstance(images, Sequence):
        raise TypeError(
            f"images: a list of images, one per prompt, got {type(images).__name__} (wrap one "
            "image in a list)"
        )
    check_prompts(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts: give one prompt per image")


def rewrites_prompts(encoder_config, rewrite: bool | None = None, encoder_name: str | None = None) -> bool:
    """Whether a Segmenter rewrites its prompts (two-stage reasoning): `rewrite`, or with None the
    config's `rewrite_reasoning`. Raises ValueError when it would and the encoder (`encoder_name`,
    default the config's) is the toy one, which cannot."""
    chosen = bool(encoder_config.get("rewrite_reasoning", False)) if rewrite is None else bool(rewrite)
    name = encoder_name or encoder_config.name
    if chosen and name == "toy":
        raise ValueError(
            "two-stage reasoning (rewriting each prompt first) needs a VLM encoder (data.encoder.name "
            "qwen2_5_vl); the toy encoder cannot rewrite"
        )
    return chosen


class Segmenter:
    """`segmenter(images, prompts) -> masks` and `segmenter.predict(batch)` for model-resolution batches.

    Args:
      loaded: `infer.checkpoint.load(...)`.
      num_steps: 1 = the paper's single-step inference.
      seed: noise seed in [0, 2**32) (`noise_key`); every image of `segmenter(images, prompts)` gets
        `fold_in(key(seed), 0)`, row `i` of `predict(batch)` gets `fold_in(key(seed), batch["index"][i])`.
      shift: schedule shift for `num_steps > 1`.
      encoder: the instruction encoder; default `make_encoder(config.data.encoder)`, built on first use.
      rewrite: two-stage reasoning for `segmenter(images, prompts)`: the VLM first rewrites every prompt
        into a short description, which is then encoded. None = the config's
        `data.encoder.rewrite_reasoning`. (`predict` takes contexts made by the data pipeline, which
        rewrites only ReasonSeg's long queries.)
      batch_size: images per encoder and device call of `segmenter(images, prompts)`, every call padded
        to it (then to a multiple of the mesh's batch shards): one compile whatever the number of images.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        num_steps: int = 1,
        seed: int = 0,
        shift: float = 1.0,
        encoder=None,
        rewrite: bool | None = None,
        batch_size: int = 8,
    ):
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not shift > 0:  # shift <= 0 turns the multi-step schedule into NaNs, not an error
            raise ValueError(f"shift must be > 0, got {shift}")
        self.key = noise_key(seed)
        self.rewrite = rewrites_prompts(loaded.config.data.encoder, rewrite, getattr(encoder, "name", None))
        self.loaded, self.num_steps, self.batch_size, self._encoder = loaded, num_steps, batch_size, encoder
        self.sharding = batch_sharding(loaded.mesh, loaded.rules)
        self.batch_multiple = batch_shard_count(loaded.mesh, loaded.rules)
        self._fn = jax.jit(partial(predict_scores, loaded.model, num_steps=num_steps, shift=shift))

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = make_encoder(self.loaded.config.data.encoder)
        return self._encoder

    def predict(self, batch: dict) -> jax.Array:
        """float32 scores `(B, H, W)` at the model resolution (`predict_scores`) for a batch with
        "image", "context", "context_mask" and "index" (the noise index of each row). Returns without
        waiting for the device (`np.asarray` of the result waits)."""
        inputs = {k: np.asarray(batch[k]) for k in ("image", "context", "context_mask")}
        inputs["index"] = np.asarray(batch["index"], np.int32)
        inputs, n = pad_rows(inputs, self.batch_multiple)
        inputs = jax.device_put(inputs, self.sharding)
        loaded = self.loaded
        with jax.set_mesh(loaded.mesh), nn.logical_axis_rules(loaded.rules):
            scores = self._fn(
                loaded.dit_params,
                loaded.vae_params,
                inputs["image"],
                inputs["context"],
                inputs["context_mask"],
                inputs["index"],
                self.key,
            )
        return scores[:n] if scores.shape[0] != n else scores

    def __call__(
        self, images: Sequence[np.ndarray | Image.Image], prompts: Sequence[str]
    ) -> list[np.ndarray]:
        """Images (uint8 `(H, W, 3)` RGB, `(H, W, 4)` RGBA, `(H, W)` grey, or PIL images) and one prompt
        each -> bool masks `(H, W)` at each image's size; a PIL image and its mask as displayed (EXIF
        orientation applied). Every image gets the same noise (index 0), so its mask is the one it gets
        alone, whatever the other images, its place among them or `batch_size`."""
        check_inputs(images, prompts)
        rgb = [as_rgb_uint8(image) for image in images]
        masks = []
        for start in range(0, len(rgb), self.batch_size):
            end = start + self.batch_size
            masks += self._segment_chunk(rgb[start:end], list(prompts[start:end]))
        return masks

    def _segment_chunk(self, images: list[np.ndarray], prompts: list[str]) -> list[np.ndarray]:
        """Masks of uint8 RGB `images`, padded to `batch_size` rows."""
        config = self.loaded.config
        fitted = [preprocess.fit_image(im, self.loaded.resolution, config.data.fit) for im in images]
        # `rewrite` only when asked: the InstructionEncoder interface (the toy encoder) has no such argument.
        options = {"rewrite": [True] * len(prompts)} if self.rewrite else {}
        context, context_mask = self.encoder.encode(images, prompts, **options)
        batch = {
            "image": np.stack([f[0] for f in fitted]),
            "context": context,
            "context_mask": context_mask,
            "index": np.zeros(len(images), np.int32),
        }
        batch, n = pad_rows(batch, self.batch_size)
        scores = np.asarray(self.predict(batch))[:n]
        return [original_size_mask(score, g) for score, (_, g) in zip(scores, fitted)]
