"""`python -m genmask_jax.train --config=configs/genmask.py[:args] --workdir=DIR [--config.field=value]`.

Trains (or resumes from DIR) with `train.loop.train`; logs go to stdout, metrics to DIR/metrics.jsonl
and TensorBoard (DIR/tensorboard), checkpoints to DIR/checkpoints. A bad model config, a missing
encoder package, or an embedding cache of other settings or without the training split is refused in
one line before the model is built or DIR is made.
"""

from absl import flags

from genmask_jax.infer import cli

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and samples go (resumes from it)."
)
flags.mark_flags_as_required(["config", "workdir"])
# Examples of each task's training split looked up in the embedding cache before training starts:
# enough to catch a split that was not precomputed, or only in part; the pipeline stops on any other.
CACHE_SPOT_CHECKS = 16


def check_model_config(config) -> None:
    """Raises InputError with the message of a structural model-config error (DiTConfig's checks)."""
    from genmask_jax.models.build import build_model

    try:
        build_model(config)
    except ValueError as e:
        raise cli.InputError(f"config.model: {e}") from e


def check_contexts(config) -> None:
    """Raises a user error when the training pipeline could not make the contexts of its first batches:
    the encoder's packages missing, or an embedding cache (`data.encoder.cache_dir`) written with other
    encoder settings or lacking examples of the training split (the pipeline looks ids up lazily, at
    the first batch: after the model is compiled)."""
    from genmask_jax.data.sources import make_task_source
    from genmask_jax.data.splits import precompute_selection
    from genmask_jax.encoders import check_available, fingerprint
    from genmask_jax.encoders.cache import EmbeddingCache, missing_from_sample

    data = config.data
    if not data.encoder.cache_dir:
        check_available(data.encoder)
        return
    cache = EmbeddingCache(data.encoder.cache_dir, fingerprint(data.encoder))
    split = data.train_split
    for task, names in (("seg", data.seg_sources), ("gen", data.gen_sources)):
        if not config.batch[task] or not names:
            continue
        source = make_task_source(names, split, data, task)
        missing, checked = missing_from_sample(cache, source, CACHE_SPOT_CHECKS)
        if missing:
            raise cli.InputError(
                f"embedding cache {cache.folder} lacks {len(missing)} of {checked} sampled {task} examples "
                f"of the training split {split!r} (e.g. {missing[0]}): add them with `python -m "
                f"genmask_jax.encoders.precompute --config=<this config> --out={cache.folder} "
                f"{precompute_selection(data, split, task)}`"
            )


def main() -> None:
    check_model_config(_CONFIG.value)
    check_contexts(_CONFIG.value)
    from genmask_jax.train import loop

    state, _ = loop.train(_CONFIG.value, _WORKDIR.value)
    step, total = int(state.step), int(_CONFIG.value.total_steps)
    status = "finished" if step >= total else f"stopped early (of {total})"
    print(f"training {status} at step {step}; checkpoints in {_WORKDIR.value}/checkpoints", flush=True)


if __name__ == "__main__":
    cli.run(main, prog="genmask_jax.train")
