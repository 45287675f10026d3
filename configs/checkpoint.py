"""The experiment config saved with a trained checkpoint, as a config file to override fields of.

    --config=configs/checkpoint.py:WORKDIR --config.data.refcoco.data_dir=/data/tfds

WORKDIR is what `--checkpoint` takes: a training workdir, its checkpoints folder (both: the latest
step) or one step folder; everything after the first ':' is the path, so `gs://...` works. The
inference commands (evaluate, segment, generate) use it by themselves when `--config.field=value`
overrides come without `--config` (genmask_jax/infer/cli.py), so the overrides change the run's own
config instead of replacing it: training-time fields such as `vae_from` are kept. Its `data` section is
laid over today's `default_data_config()` (`genmask_jax.infer.checkpoint.saved_config`): a field added
since the run was saved exists with its default and takes an override like any other, and the tuples
JSON saved as lists are tuples again, so `--config.data.resolution='(64, 64)'` overrides them.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    from genmask_jax.infer import checkpoint  # lazily: only this config needs the checkpoint reader

    if not arg:
        raise ValueError("configs/checkpoint.py needs the checkpoint: configs/checkpoint.py:WORKDIR")
    directory, step = checkpoint.resolve(arg)
    return checkpoint.saved_config(directory, step)
