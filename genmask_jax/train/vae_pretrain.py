"""Pretrains the toy WAN VAE (tiny width) on synthetic shape scenes and their rendered masks.

The demo's frozen VAE: the WAN 2.1 architecture (`VAEConfig.from_variant("tiny")`), trained from
scratch on images of the synthetic referring-shapes data and on masks rendered as black/white RGB
(mask_codec), half of each batch each. Loss per example:
`L1 + L2` reconstruction (masks weighted by `mask_weight`) `+ kl_weight * KL(q(z|x) || N(0, I))`, on
the decoder's output clamped to [-1, 1] (`--no-clamped_loss`: the raw output), decoding a posterior
sample so the decoder tolerates imprecise latents (or the posterior mean, `--no-sample_posterior`).
After training, the
per-channel mean / std of posterior means over images and masks become the config's
`latents_mean` / `latents_std`, so normalised latents are roughly unit scale for the DiT.

    python -m genmask_jax.train.vae_pretrain --out genmask_jax/assets/toy_vae

writes a converted-checkpoint folder (`params/` + `config.json`, `convert.wan_vae.load` reads it)
with parameters stored in bfloat16 (`--store_dtype`) to keep it small; load them as float32. An earlier
such folder at `--out` is replaced; any other existing `--out` is refused before training starts.
`--init_from <folder>` continues from such a folder (same structure: base_dim, num_res_blocks), with a
fresh optimizer; the new folder's pretrain.json keeps the parent's under "parent".
"""

import argparse
import dataclasses
import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from genmask_jax.data.shapes import SyntheticShapes
from genmask_jax.models import mask_codec
from genmask_jax.models.vae import STRUCTURE_FIELDS, VAEConfig, WanVAE, config_differences, init_params

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    resolution: int = 64
    base_dim: int = 8
    num_res_blocks: int = 2
    pool_size: int = 4096  # distinct training scenes, rendered once.
    batch_size: int = 32  # half images, half masks.
    crop: int = 32  # trains on random crops (a multiple of 8) of the renders: the VAE is convolutional.
    steps: int = 1500
    lr: float = 2e-3
    warmup_steps: int = 50
    kl_weight: float = 1e-4
    mask_weight: float = 2.0
    # Decode a posterior sample (True) or the posterior mean (False). Sampling makes the decoder
    # tolerant of imprecise latents but, from scratch, delays the weaker colour directions for
    # thousands of steps (green shapes were still reconstructed as background after 1,500).
    sample_posterior: bool = True
    # The reconstruction loss on decode's output clamped to [-1, 1] (True) or on the raw output. Clamped,
    # a mask pixel may overshoot its +-1 target freely, though one past the wrong bound gets no gradient;
    # raw, the decoder must hit +-1 exactly. With the README's two stages the raw loss gave held-out mask
    # IoU 0.930 against the clamped loss's 0.971 (the shipped VAE), 2026-12-06 (BENCHMARKS.md).
    clamped_loss: bool = True
    seed: int = 0
    init_from: str = ""  # a folder written by `save` to continue from ("" = random init).


FLAG_HELP = {
    "resolution": "side of the square synthetic scenes rendered for training and validation, in pixels",
    "base_dim": "the VAE's base channel width (the released WAN 2.1 VAE: 96)",
    "num_res_blocks": "residual blocks per resolution level",
    "pool_size": "distinct training scenes, rendered once and sampled from",
    "batch_size": "examples per step, half images and half rendered masks",
    "crop": "side of the random crop each batch trains on (a multiple of 8, at most --resolution)",
    "steps": "optimizer steps",
    "lr": "peak Adam learning rate (linear warmup, then cosine decay to 5%%)",
    "warmup_steps": "linear warmup steps (at most half of --steps)",
    "kl_weight": "weight of KL(q(z|x) || N(0, I)) in the loss",
    "mask_weight": "weight of a mask example's reconstruction loss (an image's is 1)",
    "sample_posterior": "decode a posterior sample (--no-sample_posterior: the posterior mean)",
    "clamped_loss": "reconstruction loss on the decode clamped to [-1, 1] (--no-clamped_loss: the raw one)",
    "seed": "seed of the rendered scenes, the initialisation, the batches and the posterior noise",
    "init_from": "a folder written by this script to continue from (same --base_dim and --num_res_blocks; "
    "fresh optimizer); empty: random initialisation",
}


def render_pool(
    num: int, resolution: int, seed: int = 0, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """`num` scenes -> images `(N, H, W, 3)` float32 in [-1, 1] and target masks `(N, H, W)` in {0, 1}."""
    source = SyntheticShapes(split, resolution, seed=seed, num_examples=num)
    images = np.empty((num, resolution, resolution, 3), np.float32)
    masks = np.empty((num, resolution, resolution), np.float32)
    for i in range(num):
        example = source[i]
        images[i] = example["image"].astype(np.float32) / 127.5 - 1.0
        masks[i] = example["mask"]
    return images, masks


def vae_config(cfg: PretrainConfig) -> VAEConfig:
    return VAEConfig.from_variant("tiny", base_dim=cfg.base_dim, num_res_blocks=cfg.num_res_blocks)


def _kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) averaged over latent elements, per example `(B,)`."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.mean(kl, axis=tuple(range(1, kl.ndim)))


def vae_loss(
    params,
    rgb: jax.Array,
    weights: jax.Array,
    rng: jax.Array,
    config: VAEConfig,
    kl_weight: float,
    sample_posterior: bool = True,
    clamped_loss: bool = True,
):
    """rgb `(B, H, W, 3)` in [-1, 1], weights `(B,)` -> (scalar loss, metrics)."""
    model = WanVAE(config)
    mean, logvar = model.apply(params, rgb[:, None], method="encode")
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape) if sample_posterior else mean
    recon = model.apply(params, z, clamp=clamped_loss, method="decode")[:, 0]
    err = recon - rgb
    per_example = jnp.mean(jnp.abs(err) + jnp.square(err), axis=(1, 2, 3))
    kl = _kl(mean, logvar)
    loss = jnp.mean(weights * per_example + kl_weight * kl)
    return loss, {"recon": jnp.mean(per_example), "kl": jnp.mean(kl)}


def make_update(
    config: VAEConfig,
    tx: optax.GradientTransformation,
    kl_weight: float,
    sample_posterior: bool = True,
    clamped_loss: bool = True,
):
    @jax.jit
    def update(params, opt_state, rgb, weights, rng):
        loss = functools.partial(
            vae_loss, config=config, kl_weight=kl_weight, sample_posterior=sample_posterior,
            clamped_loss=clamped_loss,
        )
        grad_fn = jax.value_and_grad(loss, has_aux=True)
        (loss, metrics), grads = grad_fn(params, rgb, weights, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, **metrics}

    return update


def _batch(images, masks, rng: np.random.Generator, batch_size: int, mask_weight: float, crop: int):
    half = batch_size // 2
    img = images[rng.integers(len(images), size=half)]
    msk = np.asarray(mask_codec.mask_to_rgb(masks[rng.integers(len(masks), size=batch_size - half)]))
    rgb = np.concatenate([img, msk])
    y, x = (8 * rng.integers((rgb.shape[1] - crop) // 8 + 1, size=2)).tolist()
    rgb = np.ascontiguousarray(rgb[:, y : y + crop, x : x + crop])
    flips = rng.random(batch_size) < 0.5
    rgb[flips] = rgb[flips, :, ::-1]
    weights = np.concatenate([np.ones(half), np.full(batch_size - half, mask_weight)]).astype(np.float32)
    return rgb, weights


def encode_means(params, config: VAEConfig, rgb: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Posterior means `(N, 1, h, w, z)` of `rgb (N, H, W, 3)` (the last batch padded)."""
    encode = jax.jit(lambda p, x: WanVAE(config).apply(p, x[:, None], method="encode")[0])
    out = []
    for start in range(0, len(rgb), batch_size):
        chunk = rgb[start : start + batch_size]
        pad = batch_size - len(chunk)
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)]) if pad else chunk
        out.append(np.asarray(encode(params, chunk))[: batch_size - pad])
    return np.concatenate(out)


def latent_statistics(params, config: VAEConfig, images: np.ndarray, masks: np.ndarray):
    """Per-channel mean and std of posterior means over images and masks together (z_dim each)."""
    rgb = np.concatenate([images, np.asarray(mask_codec.mask_to_rgb(masks))])
    mu = encode_means(params, config, rgb).reshape(-1, config.z_dim)
    return tuple(float(v) for v in mu.mean(0)), tuple(float(v) for v in np.maximum(mu.std(0), 1e-3))


def mask_reconstruction_iou(params, config: VAEConfig, masks: np.ndarray) -> float:
    """Mean IoU of masks after encode (mean) -> decode -> threshold at 0: the demo's ceiling."""
    rgb = np.asarray(mask_codec.mask_to_rgb(masks))
    decode = jax.jit(lambda p, z: WanVAE(config).apply(p, z, method="decode")[:, 0])
    mu = encode_means(params, config, rgb)
    pred = np.asarray(mask_codec.rgb_to_mask(decode(params, mu)))
    gt = masks > 0.5
    inter = np.sum(pred & gt, axis=(1, 2))
    union = np.sum(pred | gt, axis=(1, 2))
    return float(np.mean(inter / np.maximum(union, 1)))


def check_parent(path: str, config: VAEConfig) -> None:
    """Raises ValueError unless the folder `path` (written by `save`) holds a VAE of `config`'s structure
    (its latent statistics and dtypes may differ: the statistics are recomputed after training)."""
    parent = load_config(path)
    differences = [
        f"{name}: parent {getattr(parent, name)}, this run {getattr(config, name)}"
        for name in config_differences(parent, config, STRUCTURE_FIELDS)
    ]
    if differences:
        raise ValueError(
            f"--init_from {path} holds a VAE of another structure ({'; '.join(differences)}): "
            "pass the parent's --base_dim and --num_res_blocks"
        )


def parent_record(path: str) -> dict | None:
    """The pretrain.json of the folder a run continues from, None if it has none."""
    record = os.path.join(path, "pretrain.json")
    if not os.path.isfile(record):
        return None
    with open(record) as f:
        return json.load(f)


def check_config(cfg: PretrainConfig) -> None:
    """ValueError for settings that would fail only after training (or deep inside it)."""
    if not 0 <= cfg.seed < 2**32 - 1:  # seed and seed + 1 as JAX keys, which keep a seed's low 32 bits
        raise ValueError(f"seed must be in [0, 2**32 - 1), got {cfg.seed}")
    if cfg.resolution < 8 or cfg.resolution % 8:  # the latents' statistics are taken at it, / 8
        raise ValueError(f"resolution must be a positive multiple of 8, got {cfg.resolution}")
    if cfg.crop < 8 or cfg.crop % 8 or cfg.crop > cfg.resolution:
        raise ValueError(
            f"crop must be a multiple of 8 from 8 to the resolution {cfg.resolution}: {cfg.crop}"
        )
    if min(cfg.steps, cfg.pool_size, cfg.batch_size) < 1:
        raise ValueError("steps, pool_size and batch_size must be >= 1")


def pretrain(cfg: PretrainConfig, progress: bool = True):
    """Returns (VAEConfig with latent statistics, float32 params, history, held-out mask IoU)."""
    check_config(cfg)
    config = vae_config(cfg)
    if cfg.init_from:
        check_parent(cfg.init_from, config)
    images, masks = render_pool(cfg.pool_size, cfg.resolution, cfg.seed)
    warmup = min(cfg.warmup_steps, cfg.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, cfg.steps, cfg.lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    params = load(cfg.init_from)[1] if cfg.init_from else init_params(config, jax.random.key(cfg.seed))
    opt_state = tx.init(params)
    update = make_update(config, tx, cfg.kl_weight, cfg.sample_posterior, cfg.clamped_loss)
    rng, key = np.random.default_rng(cfg.seed), jax.random.key(cfg.seed + 1)
    history = []
    bar = tqdm(range(cfg.steps), desc="toy VAE", disable=not progress, mininterval=2.0)
    for step in bar:
        rgb, weights = _batch(images, masks, rng, cfg.batch_size, cfg.mask_weight, cfg.crop)
        params, opt_state, metrics = update(params, opt_state, rgb, weights, jax.random.fold_in(key, step))
        if step % 25 == 0 or step == cfg.steps - 1:
            values = {k: float(v) for k, v in metrics.items()}
            history.append({"step": step + 1, **values})
            bar.set_postfix(loss=f"{values['loss']:.4f}", kl=f"{values['kl']:.2f}")
    mean, std = latent_statistics(params, config, images[:512], masks[:512])
    config = dataclasses.replace(config, latents_mean=mean, latents_std=std)
    test_images, test_masks = render_pool(256, cfg.resolution, cfg.seed, split="val")
    del test_images
    return config, params, history, mask_reconstruction_iou(params, config, test_masks)


def save(
    out: str, config: VAEConfig, params, store_dtype: str = "bfloat16", extra: dict | None = None
) -> None:
    """Writes `out` (params/, config.json, pretrain.json from `extra`), replacing an earlier folder written
    here; any other existing `out` raises ConversionError and is left as it is."""
    from convert import checkpoint_io

    stored = jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(store_dtype)), params)
    checkpoint_io.save_flax_checkpoint(out, stored, config.to_dict(), overwrite=True)
    if extra:
        with open(f"{out}/pretrain.json", "w") as f:
            json.dump(extra, f, indent=2)


def load_config(path: str) -> VAEConfig:
    """The VAEConfig of a folder written by `save` (its latent statistics included)."""
    with open(os.path.join(path, "config.json")) as f:
        return VAEConfig.from_dict(json.load(f))


def load(path: str) -> tuple[VAEConfig, dict]:
    """(VAEConfig, float32 `{"params": ...}`) from a folder written by `save`."""
    from convert import wan_vae

    config, params = wan_vae.load(path)
    return config, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--out",
        default="genmask_jax/assets/toy_vae",
        help="folder to write (params/, config.json, pretrain.json): one written here before is replaced, "
        "any other existing path refused",
    )
    parser.add_argument(
        "--store_dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="dtype the parameters are stored in (loaded as float32)",
    )
    for field in dataclasses.fields(PretrainConfig):
        kind, text = type(field.default), FLAG_HELP[field.name]
        if kind is bool:
            flag = argparse.BooleanOptionalAction
            parser.add_argument(f"--{field.name}", action=flag, default=field.default, help=text)
        else:
            parser.add_argument(f"--{field.name}", type=kind, default=field.default, help=text)
    args = parser.parse_args(argv)
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
    try:
        check_config(cfg)
    except ValueError as e:
        parser.error(str(e))
    from convert import checkpoint_io

    try:
        checkpoint_io.check_destination(args.out, overwrite=True)  # as `save` will, but before training
    except checkpoint_io.ConversionError as e:
        parser.error(f"--out {e}")
    logging.basicConfig(level=logging.INFO)
    start = time.perf_counter()
    config, params, history, iou = pretrain(cfg)
    seconds = time.perf_counter() - start
    extra = {"pretrain": dataclasses.asdict(cfg), "val_mask_iou": iou, "seconds": seconds, "history": history}
    if cfg.init_from:
        extra["parent"] = parent_record(cfg.init_from)
    save(args.out, config, params, args.store_dtype, extra)
    print(f"toy VAE: val mask reconstruction IoU {iou:.4f}, {seconds:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
