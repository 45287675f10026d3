"""GenMask task assembly: one WAN DiT, two tasks, one flow-matching loss (GenMask, arXiv 2603.23906).

Segmentation example: the DiT sees two latent frames, `[image latent (t = 0), noisy mask latent (t)]`,
with per-token timesteps (0 on the image-frame tokens, `1000 t` on the mask-frame tokens); the loss is
on the mask frame only. Generation example: one noisy image latent frame; its text is replaced by the
null context (zeros, mask False) with probability `text_dropout` (classifier-free guidance). Text
dropout never applies to segmentation.

Latents are VAE means, normalised with the VAE's `latents_mean` / `latents_std`, shape
`(B, 1, H/8, W/8, z_dim)`. A sub-batch may carry them precomputed under "image_latent" /
"mask_latent"; otherwise they are encoded from "image" / "mask" by the frozen VAE.
"""

import copy
import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from genmask_jax.diffusion import flow
from genmask_jax.diffusion import timesteps as ts
from genmask_jax.models import mask_codec
from genmask_jax.models import vae as vae_lib
from genmask_jax.models.dit import DiTConfig, WanDiT

SEGMENTATION, GENERATION = "seg", "gen"
TASKS = (SEGMENTATION, GENERATION)
TASK_IDS = {SEGMENTATION: ts.TASK_SEGMENTATION, GENERATION: ts.TASK_GENERATION}

Batch = Mapping[str, Mapping[str, jax.Array]]


def present_tasks(batch: Batch) -> tuple[str, ...]:
    """Tasks with a non-empty sub-batch (shapes are static, so this is a trace-time decision)."""
    return tuple(task for task in TASKS if task in batch and _batch_size(batch[task]) > 0)


def _batch_size(sub: Mapping[str, jax.Array]) -> int:
    return int(jax.tree.leaves(sub)[0].shape[0])


@dataclasses.dataclass(frozen=True)
class GenMask:
    """The two GenMask tasks around a WAN DiT (and, unless latents are precomputed, the WAN VAE).

    Attributes:
      dit: the DiT configuration.
      vae: the VAE configuration; None if every batch carries precomputed latents.
      timesteps: task name ("segmentation" / "generation") -> timestep law (diffusion/timesteps.py);
        a model trained on one task needs only that task's law.
      text_dropout: probability of the null context for a generation example.
    """

    dit: DiTConfig
    vae: vae_lib.VAEConfig | None = None
    timesteps: Mapping = dataclasses.field(default_factory=lambda: copy.deepcopy(ts.DEFAULT_TIMESTEP_CONFIG))
    text_dropout: float = 0.1

    def __post_init__(self):
        if not 0.0 <= self.text_dropout <= 1.0:  # NaN fails too
            raise ValueError(f"text_dropout is a probability in [0, 1], got {self.text_dropout!r}")
        if self.dit.patch_size[0] != 1:
            raise ValueError(
                f"dit.patch_size {self.dit.patch_size} must patch 1 frame: GenMask's image and mask latents "
                "are separate frames with their own timesteps, which a temporal patch would merge"
            )

    @property
    def downsample(self) -> int:
        return self.vae.spatial_factor if self.vae is not None else 8

    @property
    def z_dim(self) -> int:
        return self.vae.z_dim if self.vae is not None else self.dit.in_channels

    def apply_dit(
        self, dit_params, x: jax.Array, t: jax.Array, context: jax.Array, context_mask: jax.Array
    ) -> jax.Array:
        """`WanDiT.apply`; x `(B, F, h, w, C)`, t `(B,)`, per frame `(B, F)` or per token `(B, tokens)`
        on 0..1000."""
        return WanDiT(self.dit).apply({"params": dit_params}, x, t, context, context_mask)

    # Latents.

    def encode(self, vae_params, rgb: jax.Array) -> jax.Array:
        """`(B, H, W, 3)` in [-1, 1] -> normalised latents `(B, 1, H/8, W/8, z)`, no gradient."""
        if self.vae is None:
            raise ValueError("no VAE configured: give the batch precomputed 'image_latent'/'mask_latent'")
        mean, _ = vae_lib.WanVAE(self.vae).apply(vae_params, rgb[:, None], method="encode")
        return jax.lax.stop_gradient(vae_lib.normalize_latents(mean, self.vae).astype(jnp.float32))

    def decode(self, vae_params, latents: jax.Array) -> jax.Array:
        """Normalised latents `(B, 1, h, w, z)` -> RGB `(B, 8h, 8w, 3)` in [-1, 1]."""
        z = vae_lib.denormalize_latents(latents, self.vae)
        return vae_lib.WanVAE(self.vae).apply(vae_params, z, method="decode")[:, 0]

    def image_latents(self, vae_params, sub: Mapping[str, jax.Array]) -> jax.Array:
        if "image_latent" in sub:
            return jnp.asarray(sub["image_latent"], jnp.float32)
        return self.encode(vae_params, sub["image"])

    def mask_latents(self, vae_params, sub: Mapping[str, jax.Array]) -> jax.Array:
        if "mask_latent" in sub:
            return jnp.asarray(sub["mask_latent"], jnp.float32)
        return self.encode(vae_params, mask_codec.mask_to_rgb(sub["mask"]))

    def latent_shape(self, sub: Mapping[str, jax.Array]) -> tuple[int, ...]:
        """`(B, 1, h, w, z)` of one frame of latents for a sub-batch."""
        for key in ("image_latent", "mask_latent"):
            if key in sub:
                return tuple(sub[key].shape)
        b, h, w = sub["image"].shape[:3]
        return (b, 1, h // self.downsample, w // self.downsample, self.z_dim)

    # Randomness, drawn for the whole global batch so that microbatching does not change it.

    def draw(self, rng: jax.Array, batch: Batch) -> dict[str, dict[str, jax.Array]]:
        """Per-example timesteps `t (B,)`, noise `(B, 1, h, w, z)` and (generation) text-drop flags."""
        out = {}
        for task in present_tasks(batch):
            sub = batch[task]
            shape = self.latent_shape(sub)
            k_t, k_noise, k_drop = jax.random.split(jax.random.fold_in(rng, TASK_IDS[task]), 3)
            draws = {
                "t": ts.sample_task_timesteps(k_t, TASK_IDS[task], shape[:1], self.timesteps),
                "noise": jax.random.normal(k_noise, shape, jnp.float32),
            }
            if task == GENERATION:
                draws["drop_text"] = jax.random.bernoulli(k_drop, self.text_dropout, shape[:1])
            out[task] = draws
        return out

    # Losses.

    def segmentation_inputs(
        self, image_latent: jax.Array, mask_latent: jax.Array, t: jax.Array, noise: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """DiT input `(B, 2, h, w, z)`, per-frame timesteps `(B, 2)` on 0..1000 (0 for the clean image
        frame, `1000 t` for the mask frame; the DiT gives every token its frame's value) and the
        velocity target `(B, 1, h, w, z)`."""
        x = jnp.concatenate([image_latent, flow.add_noise(mask_latent, noise, t)], axis=1)
        t_frames = jnp.stack([jnp.zeros_like(t, jnp.float32), flow.TIMESTEP_SCALE * t.astype(jnp.float32)], 1)
        return x, t_frames, flow.velocity_target(mask_latent, noise)

    def segmentation_loss(self, dit_params, vae_params, sub, draws) -> jax.Array:
        """Per-example velocity MSE on the mask frame, float32 `(Bs,)`."""
        x, t_frames, target = self.segmentation_inputs(
            self.image_latents(vae_params, sub),
            self.mask_latents(vae_params, sub),
            draws["t"],
            draws["noise"],
        )
        v = self.apply_dit(dit_params, x, t_frames, sub["context"], sub["context_mask"])[:, 1:]
        return jnp.mean(jnp.square(v - target), axis=(1, 2, 3, 4))

    def generation_loss(self, dit_params, vae_params, sub, draws) -> jax.Array:
        """Per-example velocity MSE of text-to-image with text dropout, float32 `(Bg,)`."""
        x0 = self.image_latents(vae_params, sub)
        t, noise = draws["t"], draws["noise"]
        context, context_mask = drop_text(sub["context"], sub["context_mask"], draws["drop_text"])
        v = self.apply_dit(
            dit_params, flow.add_noise(x0, noise, t), flow.TIMESTEP_SCALE * t, context, context_mask
        )
        return jnp.mean(jnp.square(v - flow.velocity_target(x0, noise)), axis=(1, 2, 3, 4))

    def per_example_losses(self, dit_params, vae_params, batch: Batch, draws) -> dict[str, jax.Array]:
        """Task -> per-example losses for the tasks present in `batch`."""
        fns = {SEGMENTATION: self.segmentation_loss, GENERATION: self.generation_loss}
        return {
            task: fns[task](dit_params, vae_params, batch[task], draws[task]) for task in present_tasks(batch)
        }

    # Inference.

    def predict_mask_latents(
        self,
        dit_params,
        image_latent: jax.Array,
        context: jax.Array,
        context_mask: jax.Array,
        noise: jax.Array,
    ) -> jax.Array:
        """Single-step segmentation in latent space: x0 = eps - v at t = 1, `(B, 1, h, w, z)`."""
        ones = jnp.ones(noise.shape[:1], jnp.float32)
        x, t_frames, _ = self.segmentation_inputs(image_latent, jnp.zeros_like(noise), ones, noise)
        v = self.apply_dit(dit_params, x, t_frames, context, context_mask)[:, 1:]
        return flow.single_step_x0(noise, v)

    def segment(
        self,
        dit_params,
        vae_params,
        image: jax.Array,
        context: jax.Array,
        context_mask: jax.Array,
        rng: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """Image `(B, H, W, 3)` in [-1, 1] + instruction states -> (mask bool `(B, H, W)`,
        score `(B, H, W)` = mean decoded RGB in [-1, 1], thresholded at 0).

        The noise is one draw from `rng` for the whole batch, so an example's mask depends on the batch
        it is in (its size and position); `infer.segmenter.Segmenter` and `latent_scores` draw each
        example's from `fold_in(key, index)` instead."""
        image_latent = self.encode(vae_params, image)
        noise = jax.random.normal(rng, image_latent.shape, jnp.float32)
        latents = self.predict_mask_latents(dit_params, image_latent, context, context_mask, noise)
        rgb = self.decode(vae_params, latents)
        return mask_codec.rgb_to_mask(rgb), jnp.mean(rgb, axis=-1)

    def generate_latents(
        self,
        dit_params,
        context: jax.Array,
        context_mask: jax.Array,
        rng: jax.Array,
        latent_hw: tuple[int, int],
        num_steps: int = 50,
        guidance_scale: float = 5.0,
        shift: float = 3.0,
        sampler: str = "euler",
        noise: jax.Array | None = None,
    ) -> jax.Array:
        """Text-to-image latents `(B, 1, h, w, z)` with CFG; `sampler` names one of `flow.SAMPLERS`.
        The start `noise` `(B, 1, h, w, z)` is drawn from `rng` unless given: one draw for the batch, so
        an image depends on the batch it is in; `infer.generator.generate_images` passes per-prompt noise
        from `fold_in(key, index)` (as `infer.segmenter.latent_scores` does for masks)."""
        sample = flow.sampler(sampler)
        if noise is None:
            noise = jax.random.normal(rng, (context.shape[0], 1, *latent_hw, self.z_dim), jnp.float32)
        null_context, null_mask = null_text(context, context_mask)
        model_fn = lambda x, timestep, c, m: self.apply_dit(dit_params, x, timestep, c, m)
        velocity = flow.cfg_velocity_fn(
            model_fn, context, context_mask, null_context, null_mask, guidance_scale
        )
        # The sampler hands the DiT's timesteps: UniPC's integers exactly, as diffusers' WanPipeline does.
        return sample(velocity, noise, num_steps, shift, time_scale=flow.TIMESTEP_SCALE)

    def generate(
        self,
        dit_params,
        vae_params,
        context,
        context_mask,
        rng,
        image_hw: tuple[int, int],
        num_steps: int = 50,
        guidance_scale: float = 5.0,
        shift: float = 3.0,
        sampler: str = "euler",
        noise: jax.Array | None = None,
    ) -> jax.Array:
        """Text-to-image: RGB `(B, H, W, 3)` in [-1, 1] (`noise` as in `generate_latents`)."""
        hw = (image_hw[0] // self.downsample, image_hw[1] // self.downsample)
        latents = self.generate_latents(
            dit_params, context, context_mask, rng, hw, num_steps, guidance_scale, shift, sampler, noise
        )
        return self.decode(vae_params, latents)


def null_text(context: jax.Array, context_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The unconditional context: zeros, every token masked out."""
    return jnp.zeros_like(context), jnp.zeros_like(context_mask, dtype=bool)


def drop_text(context: jax.Array, context_mask: jax.Array, drop: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Replaces the context of examples with `drop` `(B,)` True by the null context."""
    context = jnp.where(drop[:, None, None], jnp.zeros((), context.dtype), context)
    context_mask = jnp.logical_and(jnp.asarray(context_mask, bool), ~drop[:, None])
    return context, context_mask
