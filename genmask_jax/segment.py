r"""Referring segmentation of image files with a trained checkpoint.

    python -m genmask_jax.segment --checkpoint=WORKDIR --image=a.jpg --prompt="the red circle" \
        --out=mask.png --overlay=overlay.png
    python -m genmask_jax.segment --checkpoint=WORKDIR --image=a.jpg --image=b.jpg \
        --prompt="the dog" --out=masks/{i}.png

Images and prompts pair up one to one, or one of them is shared by all the others. With several
outputs, --out/--overlay get the output number: `{i}` in the name, else `_<i>` before the extension.
They are encoded and segmented --batch_size at a time; every image gets the same noise, drawn from
--seed alone, so its mask depends neither on the batch size nor on the other images or its place
among them.
Masks are written at each image's original size (foreground 255; PNG, BMP or TIFF by the extension of
--out, lossless formats only): the model's score is resized bilinearly to it and thresholded there.
The config is the one saved with the checkpoint; `--config.field=value` overrides apply to it (e.g.
`--config.vae_from=` a moved converted VAE), and `--config=configs/<exp>.py[:args]` replaces it. Under
a multi-process launch (launch/gpu.sh, launch/tpu.sh) every process computes the same masks and
process 0 writes them.

A model trained on ReasonSeg saw its queries in LISA's templates: `--template=short` (a phrase) or
`--template=long` (a sentence) wraps each prompt as the evaluation does. With two-stage rewriting the
data gives a long query to the VLM as it is (so does `--template=long` then) and never rewrites a short
one (`--template=short` is refused; pass --norewrite).

Two-stage reasoning (`--rewrite`): the VLM first rewrites each prompt (a long reasoning query) into a
short description of the object, which is then encoded; the default follows the config's
`data.encoder.rewrite_reasoning`, `--norewrite` turns it off. It needs the Qwen2.5-VL encoder: with the
toy one `--rewrite` is an error.
"""

from absl import flags

from genmask_jax.infer import cli

_CONFIG = cli.define_config_flag()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, checkpoints folder or step folder.")
_IMAGE = flags.DEFINE_multi_string("image", None, "Input image (repeat for several).")
_PROMPT = flags.DEFINE_multi_string(
    "prompt", None, "Referring expression / instruction (repeat for several)."
)
_OUT = flags.DEFINE_string(
    "out", None, "Output mask: .png, .bmp or .tif (lossless; a pattern when there are several)."
)
_OVERLAY = flags.DEFINE_string("overlay", None, "Optional image + mask overlay (.png, .jpg, .webp, ...).")
_STEPS = flags.DEFINE_integer("steps", 1, "Denoising steps (1 = the paper's single-step inference).")
_SEED = cli.define_seed_flag()
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size",
    8,
    "Images per encoder and device call (fewer when there are fewer images; the last call padded). "
    "The masks do not depend on it: every image gets the same noise, drawn from --seed.",
)
_EMA = flags.DEFINE_bool("ema", True, "Use the EMA parameters when the checkpoint has them.")
_TEMPLATE = flags.DEFINE_enum(
    "template",
    "none",
    ["none", "short", "long"],
    "Wrap each prompt as the ReasonSeg data does (LISA's templates): short 'What is {prompt} in this image? "
    "Please output segmentation mask.', long '{prompt} Please output segmentation mask.' (a sentence "
    "query); none: the prompt as given (the RefCOCO family's and the synthetic data's form).",
)
_REWRITE = flags.DEFINE_bool(
    "rewrite",
    None,
    "Two-stage reasoning: the VLM rewrites each prompt into a short description first (default: the "
    "config's data.encoder.rewrite_reasoning; needs the qwen2_5_vl encoder).",
)
flags.mark_flags_as_required(["checkpoint", "image", "prompt", "out"])


def pair_inputs(images: list, prompts: list) -> list[tuple]:
    """One-to-one pairs, or the single image / prompt shared by all of the other side."""
    if len(images) == len(prompts):
        return list(zip(images, prompts))
    if len(images) == 1:
        return [(images[0], p) for p in prompts]
    if len(prompts) == 1:
        return [(i, prompts[0]) for i in images]
    raise cli.InputError(
        f"{len(images)} images and {len(prompts)} prompts: give as many of each, or one of either"
    )


def templated(prompts: list[str], template: str, rewrite: bool = False) -> list[str]:
    """`prompts` in the ReasonSeg form `template` names ("none" | "short" | "long"), as the data gives them
    to the encoder: with two-stage rewriting (`rewrite`) a long query goes to the VLM as it is, and a short
    one is never rewritten (InputError)."""
    from genmask_jax.data.reasonseg import query_text

    cli.require(
        not (rewrite and template == "short"),
        "--template=short with two-stage rewriting: the ReasonSeg data rewrites only long (sentence) "
        "queries; pass --norewrite for short ones",
    )
    if template == "none" or rewrite:
        return list(prompts)
    return [query_text(p, is_sentence=template == "long") for p in prompts]


def main() -> None:
    import jax

    from genmask_jax.encoders import check_available
    from genmask_jax.infer import checkpoint, images
    from genmask_jax.infer.segmenter import Segmenter, rewrites_prompts

    prompts = [p.strip() for p in _PROMPT.value]
    for i, p in enumerate(prompts):
        cli.require(
            bool(p), f"prompt {i + 1} is empty; give the expression to segment, e.g. --prompt='the red car'"
        )
    cli.require(_STEPS.value >= 1, f"--steps must be >= 1, got {_STEPS.value}")
    cli.require(_BATCH_SIZE.value >= 1, f"--batch_size must be >= 1, got {_BATCH_SIZE.value}")
    pairs = pair_inputs(list(_IMAGE.value), prompts)
    outs = images.output_paths(_OUT.value, len(pairs), lossless=True)  # formats before the model runs
    overlays = images.output_paths(_OVERLAY.value, len(pairs)) if _OVERLAY.value else [None] * len(pairs)
    pixels = {path: images.read_image(path) for path in dict.fromkeys(_IMAGE.value)}
    directory, step, config = cli.checkpoint_and_config(_CHECKPOINT.value, _CONFIG.value)
    cli.check_on_writer(images.check_writable, [p for p in outs + overlays if p])
    try:  # before the checkpoint loads
        rewrite = rewrites_prompts(config.data.encoder, _REWRITE.value)
    except ValueError as e:
        raise cli.InputError(str(e)) from e
    texts = templated([p for _, p in pairs], _TEMPLATE.value, rewrite)
    cli.check_image_size(config)
    check_available(config.data.encoder)
    loaded = checkpoint.load(directory / str(step), config, use_ema=_EMA.value)
    segmenter = Segmenter(
        loaded,
        num_steps=_STEPS.value,
        seed=_SEED.value,
        rewrite=_REWRITE.value,
        batch_size=min(_BATCH_SIZE.value, len(pairs)),  # one call here: no padding to a size it never needs
    )
    masks = segmenter([pixels[path] for path, _ in pairs], texts)
    if jax.process_index() != 0:
        return
    for (path, prompt), mask, out, overlay in zip(pairs, masks, outs, overlays):
        images.write_mask(mask, out)
        line = f"{path} {prompt!r}: {mask.mean():.1%} of the image -> {out}"
        if overlay:
            images.write_image(images.overlay(pixels[path], mask), overlay)
            line += f", {overlay}"
        print(line, flush=True)


if __name__ == "__main__":
    cli.run(main, prog="genmask_jax.segment")
