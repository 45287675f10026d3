"""Batch evaluation of a trained checkpoint on named splits (single-step inference by default).

    python -m genmask_jax.evaluate --checkpoint=WORKDIR --split=synthetic:test
    python -m genmask_jax.evaluate --config=configs/genmask.py:variant=paper \
        --config.data.refcoco.data_dir=/data/tfds --checkpoint=WORKDIR/checkpoints/8000 \
        --split=refcoco_unc:val,refcoco_unc:testA,refcoco_unc:testB --format=rle --out=/results

Splits: synthetic:val|test, refcoco_unc:val|testA|testB, refcocoplus_unc:val|testA|testB,
refcocog_umd:val|test, reasonseg:val|test. Without --config the config saved with the checkpoint is used.
Results (per split: metrics.json, masks/*.png or predictions.json) go to --out, by default
<workdir>/eval/step_<N>; an interrupted run resumes where it stopped.
"""

from absl import flags

from genmask_jax.infer import cli

_CONFIG = cli.define_config_flag()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, checkpoints folder or step folder.")
_SPLIT = flags.DEFINE_list("split", None, "Split(s) to evaluate, e.g. synthetic:test,refcoco_unc:testA.")
_STEPS = flags.DEFINE_integer("steps", 1, "Denoising steps (1 = the paper's single-step inference).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default <workdir>/eval/step_<N>).")
_FORMAT = flags.DEFINE_enum(
    "format", "png", ["png", "rle"], "Per-example predictions: PNG masks or COCO RLE."
)
_BATCH = flags.DEFINE_integer("batch_size", 0, "Per-process batch size (0 = 4 per local device).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_EMA = flags.DEFINE_bool("ema", True, "Use the EMA parameters when the checkpoint has them.")
flags.mark_flags_as_required(["checkpoint", "split"])


def main() -> None:
    import jax
    from etils import epath

    from genmask_jax.eval import job
    from genmask_jax.infer import checkpoint

    try:
        splits = job.parse_splits(_SPLIT.value)
    except job.EvaluationError as e:
        raise cli.InputError(str(e)) from e
    cli.require(_STEPS.value >= 1, f"--steps must be >= 1, got {_STEPS.value}")
    cli.require(_BATCH.value >= 0, f"--batch_size must be >= 0, got {_BATCH.value}")
    directory, step = checkpoint.resolve(_CHECKPOINT.value)
    out = _OUT.value or str(default_out(directory, step))
    config = _CONFIG.value if _CONFIG.value is not None else checkpoint.saved_config(directory, step)
    try:
        job.check_sources(config.data, splits)
    except job.EvaluationError as e:
        raise cli.InputError(str(e)) from e
    loaded = checkpoint.load(_CHECKPOINT.value, config, use_ema=_EMA.value)
    print(
        f"evaluating step {loaded.step} of {loaded.directory} on {', '.join(s.name for s in splits)} "
        f"({_STEPS.value}-step, {jax.device_count()} devices, {jax.process_count()} processes) -> {out}",
        flush=True,
    )
    try:
        results = job.run(loaded, splits, out, _STEPS.value, _FORMAT.value, _BATCH.value, _SEED.value)
    except job.EvaluationError as e:  # --out holds a different evaluation
        raise cli.InputError(str(e)) from e
    for name, metrics in results.items():
        print(
            f"{name}: gIoU {metrics['giou']:.4f} cIoU {metrics['ciou']:.4f} "
            f"P@0.5 {metrics['precision@0.5']:.4f} ({metrics['num_samples']} examples)"
        )
    if results:
        print(f"metrics: {epath.Path(out) / 'metrics.json'}")


def default_out(directory, step: int):
    """<workdir>/eval/step_<N> for a workdir's checkpoints folder, else <checkpoints>/eval/step_<N>."""
    base = directory.parent if directory.name == "checkpoints" else directory
    return base / "eval" / f"step_{step}"


if __name__ == "__main__":
    cli.run(main, prog="genmask_jax.evaluate")
