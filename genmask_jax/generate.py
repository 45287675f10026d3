r"""Text-to-image with a trained checkpoint (Euler or UniPC over the shifted schedule, with CFG).

    python -m genmask_jax.generate --checkpoint=WORKDIR --prompt="a red circle on a gray background" \
        --out=img.png --steps=50 --cfg=5 --seed=0 [--sampler=unipc]

`--sampler=unipc` is WAN 2.1's own sampler (diffusers' `WanPipeline` default, there with shift 3 and 50
steps): a second-order multistep method at one model call a step, as Euler (the two compared on the demo's
model in BENCHMARKS.md).

Several --prompt give several images (`{i}` in --out, else `_<i>` before the extension), generated
--batch_size at a time; prompt i starts from the noise of `fold_in(key(seed), i)`: its image depends on
its place i (the same prompt repeated gives different images) but not on the batch size or on the other
prompts.
The config is the one saved with the checkpoint; `--config.field=value` overrides apply to it, and
`--config=configs/<exp>.py[:args]` replaces it. Under a multi-process launch every process computes
the same images and process 0 writes them.
"""

from absl import flags

from genmask_jax.infer import cli

_CONFIG = cli.define_config_flag()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, checkpoints folder or step folder.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Caption of the image to generate (repeat for several).")
_OUT = flags.DEFINE_string(
    "out", None, "Output image: .png, .jpg, .webp, .bmp or .tif (a pattern when there are several prompts)."
)
_STEPS = flags.DEFINE_integer("steps", 50, "Sampler steps (one model call each, two with --cfg != 1).")
_CFG = flags.DEFINE_float("cfg", 5.0, "Classifier-free guidance scale (1 = no guidance).")
_SHIFT = flags.DEFINE_float("shift", 3.0, "Schedule shift t' = s t / (1 + (s - 1) t).")
_SAMPLER = flags.DEFINE_enum("sampler", "euler", ["euler", "unipc"], "euler, or unipc (WAN's sampler).")
_SEED = cli.define_seed_flag()
_SIZE = flags.DEFINE_list(
    "size",
    None,
    "Output H,W: multiples of the VAE's downsampling (8) times the DiT patch (16 for configs/genmask.py, "
    "8 for configs/demo.py); default the training resolution.",
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size",
    8,
    "Prompts per encoder and device call (fewer when there are fewer prompts; the last call padded), each "
    "two DiT rows with --cfg != 1. The images do not depend on it.",
)
_EMA = flags.DEFINE_bool("ema", True, "Use the EMA parameters when the checkpoint has them.")
flags.mark_flags_as_required(["checkpoint", "prompt", "out"])


def parse_size(values) -> tuple[int, int] | None:
    """--size as (H, W), two positive ints; which multiples the model needs is `cli.check_image_size`'s."""
    if not values:
        return None
    try:
        size = tuple(int(v) for v in values)
    except ValueError:
        size = ()
    cli.require(len(size) == 2 and min(size) > 0, f"--size must be H,W in pixels, got {','.join(values)}")
    return size


def main() -> None:
    import jax

    from genmask_jax.encoders import check_available
    from genmask_jax.infer import checkpoint, images
    from genmask_jax.infer.generator import Generator

    prompts = [p.strip() for p in _PROMPT.value]
    for i, p in enumerate(prompts):
        cli.require(bool(p), f"prompt {i + 1} is empty; describe the image to generate")
    cli.require(_STEPS.value >= 1, f"--steps must be >= 1, got {_STEPS.value}")
    cli.require(_SHIFT.value > 0, f"--shift must be > 0, got {_SHIFT.value}")
    cli.require(_BATCH_SIZE.value >= 1, f"--batch_size must be >= 1, got {_BATCH_SIZE.value}")
    size = parse_size(_SIZE.value)
    outs = images.output_paths(_OUT.value, len(prompts))  # formats before the model runs
    directory, step, config = cli.checkpoint_and_config(_CHECKPOINT.value, _CONFIG.value)
    cli.check_on_writer(images.check_writable, outs)
    cli.check_image_size(config, size)
    check_available(config.data.encoder)  # the prompts are encoded after the checkpoint loads
    loaded = checkpoint.load(directory / str(step), config, use_ema=_EMA.value)
    # One call here: no padding to a size it never needs.
    generator = Generator(loaded, batch_size=min(_BATCH_SIZE.value, len(prompts)))
    print(
        f"generating {len(prompts)} image(s), {_STEPS.value} {_SAMPLER.value} steps, cfg {_CFG.value}, "
        f"seed {_SEED.value}",
        flush=True,
    )
    pictures = generator(prompts, _STEPS.value, _CFG.value, _SEED.value, _SHIFT.value, size, _SAMPLER.value)
    if jax.process_index() != 0:
        return
    for prompt, picture, out in zip(prompts, pictures, outs):
        images.write_image(picture, out)
        print(f"{prompt!r} -> {out}", flush=True)


if __name__ == "__main__":
    cli.run(main, prog="genmask_jax.generate")
