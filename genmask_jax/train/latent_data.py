"""A fixed pool of synthetic scenes encoded once by the frozen VAE, and a training iterator over it.

For CPU runs (the demo, the small experiments) the frozen VAE dominates a train step, and the same
scenes are seen many times: so each scene is rendered, its texts encoded (referring expression for
segmentation, with the scene's image where the encoder reads one, as in the pipelines; caption for
generation) and its image and target mask VAE-encoded once. Batches then
carry `image_latent` / `mask_latent` (normalised VAE means, `(B, 1, h, w, z)`), which
`models.genmask.GenMask` uses instead of encoding, so the train step needs no VAE at all.

`LatentBatches` yields the interfaces.md batch layout (with latents in place of pixels); batch `s`
is a pure function of `(seed, s)`, and `get_state` / `set_state` let the train loop's checkpoints
save and resume it.
"""

import dataclasses
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from tqdm import tqdm

from genmask_jax.data import preprocess
from genmask_jax.data.shapes import SyntheticShapes
from genmask_jax.data.sources import DataConfigError
from genmask_jax.encoders import encoder_input, make_encoder
from genmask_jax.models import mask_codec
from genmask_jax.models import vae as vae_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LatentPool:
    """N scenes; latents `(N, 1, h, w, z)`, contexts `(N, L, D)` float32 with masks `(N, L)` bool."""

    image_latent: np.ndarray
    mask_latent: np.ndarray
    seg_context: np.ndarray
    seg_context_mask: np.ndarray
    gen_context: np.ndarray
    gen_context_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.image_latent)


def shapes_source(
    data_config, split: str, num_examples: int | None = None, task: str = "seg"
) -> SyntheticShapes:
    """The synthetic referring-shapes split that `data_config` describes."""
    s = data_config.shapes
    resolution = tuple(s.render_resolution) or tuple(data_config.resolution)
    if num_examples is None:
        num_examples = {"train": s.train_size, "val": s.val_size, "test": s.test_size}[split]
    return SyntheticShapes(
        split,
        resolution,
        seed=s.seed,
        num_examples=num_examples,
        min_shapes=s.min_shapes,
        max_shapes=s.max_shapes,
        task=task,
        expression_kinds=s.expression_kinds,
    )


def make_encode_fn(vae_config: vae_lib.VAEConfig):
    """jitted `(vae_params, rgb (B, H, W, 3)) -> normalised latents (B, 1, H/8, W/8, z)`."""

    @jax.jit
    def encode(params, rgb):
        mean, _ = vae_lib.WanVAE(vae_config).apply(params, rgb[:, None], method="encode")
        return vae_lib.normalize_latents(mean, vae_config)

    return encode


def _encode_all(encode, params, rgb: np.ndarray, batch_size: int) -> np.ndarray:
    """`encode` over `rgb` in batches of `batch_size`, all dispatched before any is read. `params` may
    be a list of copies committed to different devices: the batches are dealt to them round-robin (jit
    runs each where its copy lives)."""
    pad = -len(rgb) % batch_size
    if pad:
        rgb = np.concatenate([rgb, np.zeros((pad, *rgb.shape[1:]), rgb.dtype)])
    copies = params if isinstance(params, list) else [params]
    starts = range(0, len(rgb), batch_size)
    out = [encode(copies[k % len(copies)], rgb[i : i + batch_size]) for k, i in enumerate(starts)]
    return np.concatenate([np.asarray(o) for o in out])[: len(rgb) - pad]


def trim_to_longest(context: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(N, L, D)`, `(N, L)` -> `(N, L', D)`, `(N, L')` with L' the last real position + 1 over all N."""
    real = np.flatnonzero(mask.any(axis=0))
    length = int(real[-1]) + 1 if real.size else 1
    return context[:, :length], mask[:, :length]


def _fitted_scene(source: SyntheticShapes, index: int, resolution: tuple[int, int], fit: str, max_skips: int):
    """(source index, example, image, mask) of scene `index` fitted to `resolution` as the grain pipelines
    fit it, or, as their training iterator skips it, of the next scene whose target survives the fit: a
    crop to another aspect than `shapes.render_resolution`'s can cut the target away."""
    for k in range(index, index + max_skips):
        example = source[k % len(source)]
        image, geometry = preprocess.fit_image(example["image"], resolution, fit)
        mask = preprocess.fit_mask(example["mask"] > 0, geometry)
        if mask.any():
            return k % len(source), example, image, mask
    raise RuntimeError(f"{max_skips} scenes from {index} have no target left at {resolution} (fit {fit})")


def _render(
    source: SyntheticShapes,
    lo: int,
    hi: int,
    resolution: tuple[int, int],
    fit: str,
    max_skips: int,
    encoder_config,
):
    """Scenes `lo..hi-1` fitted to `resolution` (H, W) exactly as the grain pipelines fit them: images
    `(n, H, W, 3)` in [-1, 1], masks `(n, H, W)` float32 in {0, 1}, what the encoder reads for each
    expression (`encoder_input`: `(image or None, text, rewrite)`, the image for a VLM as the pipelines
    give it), captions, and how many scenes were replaced by a later one (`_fitted_scene`)."""
    scenes = [_fitted_scene(source, i, resolution, fit, max_skips) for i in range(lo, hi)]
    used, examples, images, masks = zip(*scenes)
    replaced = sum(k != i for k, i in zip(used, range(lo, hi)))
    expressions = [encoder_input(e, "seg", encoder_config) for e in examples]  # text: the expression
    captions = [e["caption"] for e in examples]
    return np.stack(images), np.stack(masks).astype(np.float32), expressions, captions, replaced


# Examples per encoder call: a VLM runs one forward pass per call, which the whole pool would not fit.
ENCODE_CHUNK = 256


def _encode_inputs(encoder, inputs: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """Contexts `(N, L, D)` and masks `(N, L)` of `encoder_input` triples `(image or None, text,
    rewrite)`, as the pipelines encode them, `ENCODE_CHUNK` at a time."""
    if not inputs:
        return encoder.encode([], [])
    contexts, masks = [], []
    for lo in range(0, len(inputs), ENCODE_CHUNK):
        images, texts, flags = (list(column) for column in zip(*inputs[lo : lo + ENCODE_CHUNK]))
        context, mask = (
            encoder.encode(images, texts, rewrite=flags) if any(flags) else encoder.encode(images, texts)
        )
        contexts.append(context)
        masks.append(mask)
    return np.concatenate(contexts), np.concatenate(masks)


def build_latent_pool(
    data_config,
    num_scenes: int,
    vae_config: vae_lib.VAEConfig,
    vae_params,
    batch_size: int = 64,
    progress: bool = True,
    trim_padding: bool = False,
    chunk: int = 1024,
) -> LatentPool:
    """Renders `num_scenes` training scenes, encodes their texts and VAE-encodes images and masks
    (fitted to `data.resolution` with `data.fit`, as the grain train and eval iterators fit them).

    Chunks of `chunk` scenes are rendered on a worker thread while the previous chunk is VAE-encoded
    in batches dealt over this process's devices: the encode runs in XLA's threads outside the GIL, so
    on a 2-core machine rendering and encoding overlap.
    `trim_padding` cuts each task's contexts to the longest real length in the pool: only for a DiT
    with `use_context_mask`, to which padded keys are invisible, so the cut changes cost, not output.
    """
    source = shapes_source(data_config, data_config.train_split, num_scenes)
    fit_to = (tuple(data_config.resolution), data_config.fit, data_config.max_consecutive_skips)
    render_args = (*fit_to, data_config.encoder)
    encode = make_encode_fn(vae_config)
    copies = [jax.device_put(vae_params, d) for d in jax.local_devices()]
    bounds = [(lo, min(lo + chunk, num_scenes)) for lo in range(0, num_scenes, chunk)]
    image_latents, mask_latents, seg_inputs, captions, replaced = [], [], [], [], 0
    bar = tqdm(total=num_scenes, desc="render + VAE-encode scenes", disable=not progress, mininterval=1.0)
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = worker.submit(_render, source, *bounds[0], *render_args) if bounds else None
        for k, (lo, hi) in enumerate(bounds):
            images, masks, chunk_inputs, caps, chunk_replaced = pending.result()
            if k + 1 < len(bounds):
                pending = worker.submit(_render, source, *bounds[k + 1], *render_args)
            image_latents.append(_encode_all(encode, copies, images, batch_size))
            mask_rgb = np.asarray(mask_codec.mask_to_rgb(masks))
            mask_latents.append(_encode_all(encode, copies, mask_rgb, batch_size))
            seg_inputs += chunk_inputs
            captions += caps
            replaced += chunk_replaced
            bar.update(hi - lo)
    bar.close()
    if replaced:
        log.warning(
            "latent pool: %d of %d scenes replaced by the next one: no target left at %s (fit %r)",
            replaced,
            num_scenes,
            *fit_to[:2],
        )
    encoder = make_encoder(data_config.encoder)
    seg_context, seg_mask = _encode_inputs(encoder, seg_inputs)
    gen_context, gen_mask = _encode_inputs(encoder, [(None, caption, False) for caption in captions])
    if trim_padding:
        seg_context, seg_mask = trim_to_longest(seg_context, seg_mask)
        gen_context, gen_mask = trim_to_longest(gen_context, gen_mask)
    image_latent, mask_latent = np.concatenate(image_latents), np.concatenate(mask_latents)
    return LatentPool(image_latent, mask_latent, seg_context, seg_mask, gen_context, gen_mask)


def check_pool_size(
    num_scenes: int, batch_seg: int, batch_gen: int, field: str = "config.demo.num_train_scenes"
) -> None:
    """DataConfigError when a task's batch is larger than the pool (`field` sets its size): a batch draws
    distinct scenes."""
    if max(batch_seg, batch_gen) > num_scenes:
        raise DataConfigError(
            f"config.batch (seg {batch_seg}, gen {batch_gen}) is larger than the latent pool's {num_scenes} "
            f"scenes ({field}): a batch draws distinct scenes"
        )


class LatentBatches:
    """Endless `{"seg": {...}, "gen": {...}}` batches drawn from a `LatentPool`.

    Segmentation and generation examples are drawn independently (the same scene may appear in both,
    once with its referring expression, once with its caption). `on_batch` is called after every
    batch (the demo's progress bar). `image_frame=False` zeroes the segmentation image latents (the
    "no VAE shortcut" ablation).
    """

    def __init__(
        self,
        pool: LatentPool,
        batch_seg: int,
        batch_gen: int,
        seed: int = 0,
        on_batch=None,
        image_frame: bool = True,
    ):
        check_pool_size(len(pool), batch_seg, batch_gen)
        self.pool, self.batch_seg, self.batch_gen, self.seed = pool, batch_seg, batch_gen, seed
        self.image_frame = image_frame
        self.step = 0
        self.on_batch = on_batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, self.step])
        seg = rng.choice(len(self.pool), self.batch_seg, replace=False)
        gen = rng.choice(len(self.pool), self.batch_gen, replace=False)
        p = self.pool
        batch = {
            "seg": {
                "image_latent": p.image_latent[seg]
                if self.image_frame
                else np.zeros_like(p.image_latent[seg]),
                "mask_latent": p.mask_latent[seg],
                "context": p.seg_context[seg],
                "context_mask": p.seg_context_mask[seg],
            }
        }
        if self.batch_gen:
            batch["gen"] = {
                "image_latent": p.image_latent[gen],
                "context": p.gen_context[gen],
                "context_mask": p.gen_context_mask[gen],
            }
        self.step += 1
        if self.on_batch is not None:
            self.on_batch()
        return batch

    def get_state(self) -> bytes:
        return json.dumps({"step": self.step, "seed": self.seed}).encode()

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore; nothing is read ahead here."""

    def set_state(self, state) -> None:
        state = json.loads(state) if isinstance(state, (bytes, str)) else state
        self.step, self.seed = int(state["step"]), int(state["seed"])
