r"""Batch evaluation of a trained checkpoint on named splits (single-step inference by default).

    python -m genmask_jax.evaluate --checkpoint=WORKDIR --split=synthetic:test
    python -m genmask_jax.evaluate --checkpoint=gs://bucket/paper --config.data.refcoco.data_dir=/data/tfds \
        --split=refcoco_unc:val,refcoco_unc:testA,refcoco_unc:testB --format=rle --out=gs://bucket/results

Splits: synthetic:val|test, refcoco_unc:val|testA|testB, refcocoplus_unc:val|testA|testB,
refcocog_umd:val|test, refcocog_google:val, reasonseg:val|test (comma-separated, or --split repeated).
The config is the one saved with the checkpoint; `--config.field=value` overrides apply to it (moved
data: `--config.data.refcoco.data_dir`, `--config.data.reasonseg.root`, `--config.data.encoder.cache_dir`;
moved converted VAE: `--config.vae_from`). `--config=configs/<exp>.py[:args]` replaces it instead (a
warning when its model or VAE differs from the run's; an error when it would decode with a random VAE
the run was not trained with).
Results (per split: metrics.json, masks/*.png or predictions.json) go to --out, by default
<workdir>/eval/step_<N>, and <out>/metrics.json gathers every split's metrics with the checkpoint and
step beside them. An interrupted run resumes where it stopped; another evaluation into the same --out,
of any split, with other settings (checkpoint, step, EMA or raw parameters, steps, seed,
prediction-relevant config; data paths left out, weights named by their folder) is refused, and so is a
rerun of a split whose examples changed (the ids its finished results recorded; the same data moved
elsewhere keeps them). Under launch/gpu.sh or launch/tpu.sh every process evaluates its share of each
split (`config.distributed` as training reads it, with the mode "auto" whatever the run trained with:
this launch decides) into --out, which must then be one folder every process shares (gs://..., a shared
file system; one that is not stops every process before the model loads); each process resolves
`--checkpoint=WORKDIR` to its latest step itself, and if a training run saved meanwhile and they
disagree, the command stops: pass a step folder (`WORKDIR/checkpoints/<step>`).
A split missing from the embedding cache (`data.encoder.cache_dir`) is refused before the model loads,
with the command that adds it (`python -m genmask_jax.encoders.precompute ... --eval=<split>`).
"""

from absl import flags

from genmask_jax.infer import cli

_CONFIG = cli.define_config_flag()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, checkpoints folder or step folder.")
_SPLIT = flags.DEFINE_multi_string(
    "split",
    None,
    "Split(s) to evaluate, e.g. synthetic:test or refcoco_unc:val,refcoco_unc:testA; repeat the flag or "
    "separate with commas.",
)
_STEPS = flags.DEFINE_integer("steps", 1, "Denoising steps (1 = the paper's single-step inference).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default <workdir>/eval/step_<N>).")
_FORMAT = flags.DEFINE_enum(
    "format", "png", ["png", "rle"], "Per-example predictions: PNG masks or COCO RLE."
)
_BATCH = flags.DEFINE_integer(
    "batch_size",
    0,
    "Per-process batch size (0 = 4 per batch shard: per local device unless the mesh has a tensor axis).",
)
_SEED = cli.define_seed_flag()
_EMA = flags.DEFINE_bool("ema", True, "Use the EMA parameters when the checkpoint has them.")
flags.mark_flags_as_required(["checkpoint", "split"])


def main() -> None:
    import jax
    from etils import epath

    from genmask_jax.data.splits import SplitError, parse_splits
    from genmask_jax.encoders import check_available
    from genmask_jax.encoders.base import ContextError
    from genmask_jax.eval import job
    from genmask_jax.infer import checkpoint, images

    try:
        splits = parse_splits(_SPLIT.value)
    except SplitError as e:
        raise cli.InputError(str(e)) from e
    cli.require(_STEPS.value >= 1, f"--steps must be >= 1, got {_STEPS.value}")
    cli.require(_BATCH.value >= 0, f"--batch_size must be >= 0, got {_BATCH.value}")
    directory, step, config = cli.checkpoint_and_config(_CHECKPOINT.value, _CONFIG.value)
    out = _OUT.value or str(default_out(directory, step))
    cli.check_image_size(config)
    cli.check_on_writer(lambda path: images.check_writable(epath.Path(path) / "run.json"), [out])
    try:
        # A refused --out costs no model load. Whether --ema finds EMA parameters is known once they load:
        # job.run checks every setting again then. The shared --out first: processes that read different
        # folders could decide apart below, and one leaving alone would leave the others waiting.
        job.check_shared_out(out)
        params, resolution = (None if _EMA.value else "params"), config.data.resolution
        shared = job.shared_settings(directory, step, params, _STEPS.value, _SEED.value, resolution)
        job.check_out(out, shared, config, record=False)
        job.check_sources(config.data, splits)
        if not config.data.encoder.cache_dir:
            check_available(config.data.encoder)
    except (job.EvaluationError, ContextError) as e:  # another run's --out, a split, its cache, the encoder,
        # an --out the processes do not share
        raise cli.InputError(str(e)) from e
    loaded = checkpoint.load(directory / str(step), config, use_ema=_EMA.value)
    print(
        f"evaluating step {loaded.step} of {loaded.directory} ({loaded.params_key}) on "
        f"{', '.join(s.name for s in splits)} ({_STEPS.value}-step, {jax.device_count()} devices, "
        f"{jax.process_count()} processes) -> {out}",
        flush=True,
    )
    try:
        results = job.run(loaded, splits, out, _STEPS.value, _FORMAT.value, _BATCH.value, _SEED.value)
    except (job.EvaluationError, ContextError) as e:  # another run's --out, unreadable data, the cache
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
