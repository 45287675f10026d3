"""In-process segmentation evaluation of a GenMask model on the synthetic referring-shapes splits.

For the demo and the small experiments: predictions by GenMask's single-step inference (or Euler
with `num_steps > 1`), LISA-protocol metrics at the original size (eval/metrics.py), and, on the same
examples, the trivial baselines (the empty mask; the union of all shapes in the scene) and the VAE
ceiling (the true mask encoded and decoded by the frozen VAE, thresholded as a prediction is).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from genmask_jax.data.pipeline import make_eval_iterator
from genmask_jax.eval.metrics import MetricsAccumulator
from genmask_jax.infer.segmenter import latent_scores, noise_key, original_size_mask
from genmask_jax.models import mask_codec
from genmask_jax.models.genmask import GenMask
from genmask_jax.train.latent_data import shapes_source

BASELINES = ("empty_mask", "all_shapes_mask", "vae_ceiling")


@dataclasses.dataclass
class EvalResult:
    metrics: dict  # prediction metrics (giou, ciou, precision@k, ...)
    baselines: dict  # baseline name -> metrics
    per_kind: dict  # expression kind -> prediction gIoU
    examples: list  # the first examples: dicts of image, mask, pred (uint8/bool), text, iou


def all_shapes_mask(scene, height: int, width: int) -> np.ndarray:
    """bool `(H, W)`: every shape of the scene (the 'segment everything' baseline)."""
    canvas = Image.new("L", (width, height), 0)
    for shape in scene.shapes:
        ImageDraw.Draw(canvas).polygon(shape.polygon(height, width), fill=1)
    return np.asarray(canvas) > 0


def make_predict_fn(model: GenMask, num_steps: int = 1, image_frame: bool = True):
    """jitted `(dit_params, vae_params, image, mask, context, context_mask, index, key) -> (prediction
    score, VAE ceiling score)`, float32 `(B, H, W)` at the model resolution, foreground where > 0.

    The noise of example `index[b]` is `fold_in(key, index[b])` (`infer.segmenter.latent_scores`), as in
    the batch evaluation job: a result depends neither on the batch size nor on the batch an
    example falls in. The ceiling is the true mask encoded and decoded by the frozen VAE."""

    @jax.jit
    def predict(dit_params, vae_params, image, mask, context, context_mask, index, key):
        image_latent = model.encode(vae_params, image)
        if not image_frame:
            image_latent = jnp.zeros_like(image_latent)
        score = latent_scores(
            model, dit_params, vae_params, image_latent, context, context_mask, index, key, num_steps
        )
        mask_latent = model.encode(vae_params, mask_codec.mask_to_rgb(mask))
        ceiling = jnp.mean(model.decode(vae_params, mask_latent).astype(jnp.float32), axis=-1)
        return score, ceiling

    return predict


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip((image + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def evaluate_segmentation(
    model: GenMask,
    dit_params,
    vae_params,
    data_config,
    split: str = "test",
    batch_size: int = 50,
    num_steps: int = 1,
    seed: int = 0,
    keep: int = 16,
    progress: bool = True,
    image_frame: bool = True,
) -> EvalResult:
    """Every example of the split once; see the module docstring. `image_frame=False` zeroes the
    image latent (for a model trained without the VAE shortcut)."""
    iterator = make_eval_iterator(data_config, split, batch_size)
    scenes = shapes_source(data_config, split)
    predict = make_predict_fn(model, num_steps, image_frame)
    acc = MetricsAccumulator()
    baselines = {name: MetricsAccumulator() for name in BASELINES}
    kinds: dict[str, list[float]] = {}
    examples = []
    key = noise_key(seed)
    bar = tqdm(iterator.iter_with_meta(), total=len(iterator), desc=f"evaluate {split}", disable=not progress)
    for batch, metas in bar:
        score, ceiling = jax.device_get(
            predict(
                dit_params,
                vae_params,
                batch["image"],
                batch["mask"],
                batch["context"],
                batch["context_mask"],
                batch["index"],
                key,
            )
        )
        for row, meta in enumerate(metas):
            if meta is None:
                continue
            gt, ignore = meta["mask"], meta["ignore"]
            # Thresholded after the bilinear resize to the original size, as the batch job and LISA do.
            iou = acc.add(original_size_mask(score[row], meta["geometry"]), gt, ignore)
            scene = scenes.scene(int(batch["index"][row]))
            kinds.setdefault(scene.expression_kind, []).append(iou)
            baselines["empty_mask"].add(np.zeros_like(gt, bool), gt, ignore)
            baselines["all_shapes_mask"].add(all_shapes_mask(scene, *gt.shape), gt, ignore)
            baselines["vae_ceiling"].add(original_size_mask(ceiling[row], meta["geometry"]), gt, ignore)
            if len(examples) < keep:
                examples.append(
                    {
                        "image": _to_uint8(batch["image"][row]),
                        "mask": batch["mask"][row] > 0.5,
                        "pred": score[row] > 0,
                        "text": meta["text"],
                        "iou": iou,
                    }
                )
        bar.set_postfix(giou=f"{np.mean([v for k in kinds.values() for v in k]):.3f}")
    return EvalResult(
        metrics=acc.result(),
        baselines={name: b.result() for name, b in baselines.items()},
        per_kind={kind: float(np.mean(v)) for kind, v in sorted(kinds.items())},
        examples=examples,
    )
