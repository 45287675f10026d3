"""`python -m genmask_jax.train --config=configs/genmask.py[:args] --workdir=DIR [--config.field=value]`.

Trains (or resumes from DIR) with `train.loop.train`; logs go to stdout, metrics to DIR/metrics.jsonl
and TensorBoard (DIR/tensorboard), checkpoints to DIR/checkpoints. A bad model config, a missing
encoder package or model folder, or an embedding cache of other settings or without the training split
(or the quick evaluation's) is refused in one line before the model is built or DIR is made
(`train.loop.train` makes the data iterator first); so are `config.init_from` weights that are missing or
of another architecture and a missing `config.vae_from`, before DIR is made, and so are checkpoint and
logging intervals or counts below 1 and a batch the mesh cannot split (`train.loop.check_loop_fields`,
`check_batch_split`).
"""

from absl import flags

from genmask_jax.infer import cli

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and samples go (resumes from it)."
)
flags.mark_flags_as_required(["config", "workdir"])


def check_model_config(config) -> None:
    """Raises InputError with the message of a structural model-config error (DiTConfig's checks)."""
    from genmask_jax.models.build import build_model

    try:
        build_model(config)
    except ValueError as e:
        raise cli.InputError(f"config.model: {e}") from e


def main() -> None:
    check_model_config(_CONFIG.value)
    from genmask_jax.train import loop

    state, _ = loop.train(_CONFIG.value, _WORKDIR.value)
    step, total = int(state.step), int(_CONFIG.value.total_steps)
    status = "finished" if step >= total else f"stopped early (of {total})"
    print(f"training {status} at step {step}; checkpoints in {_WORKDIR.value}/checkpoints", flush=True)


if __name__ == "__main__":
    cli.run(main, prog="genmask_jax.train")
