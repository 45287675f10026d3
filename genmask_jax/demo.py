"""The built-in demo: GenMask trained and evaluated on synthetic referring shapes, on CPU.

    python -m genmask_jax.demo [--workdir runs/demo] [--config configs/demo.py[:variant=smoke]]
                               [--config.total_steps 1000 ...]

Loads the shipped toy WAN VAE, trains a tiny WAN DiT on segmentation (mask generation) mixed 1:1
with caption->image generation, evaluates single-step segmentation on the held-out test split and
writes a report (metrics.json, report.md, segmentation_grid.png, generated.png) to the workdir.

Rerun with the same config, it resumes the training in `<workdir>/train` (a finished run is evaluated
again); with a config that changes the trained model (`--config.total_steps`, the optimizer, the seed,
...) it stops at once: pass another --workdir, or delete `<workdir>/train`.
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from genmask_jax.data.sources import DataConfigError
from genmask_jax.experiments import pipeline
from genmask_jax.infer import cli
from genmask_jax.parallel import mesh

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py"
)
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "The demo config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the checkpoints and the report go.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")


def main(argv) -> None:
    del argv
    logging.getLogger().setLevel(logging.WARNING)
    config = _CONFIG.value
    # Read when jax first starts its backends, i.e. below; flags of the user's own take precedence.
    if config.demo.device_per_core and "XLA_FLAGS" not in os.environ:
        cores = len(os.sched_getaffinity(0))
        os.environ["XLA_FLAGS"] = mesh.cpu_device_flags(config.batch.seg, config.batch.gen, cores)
    try:
        report = pipeline.run_demo(config, _WORKDIR.value, progress=_PROGRESS.value)
    except pipeline.WorkdirConfigMismatch as e:
        where = os.path.join(_WORKDIR.value, "train")
        cli.fail(f"{e}: pass another --workdir, or delete {where}", prog="genmask_jax.demo")
    except (DataConfigError, pipeline.TrainingStopped) as e:  # fields the data cannot follow; SIGTERM
        cli.fail(str(e), prog="genmask_jax.demo")
    seg, base = report["segmentation"], report["baselines"]
    print(
        f"held-out {report['eval_split']}: gIoU {seg['giou']:.4f} cIoU {seg['ciou']:.4f} (single step); "
        f"empty mask gIoU {base['empty_mask']['giou']:.4f}, "
        f"all shapes {base['all_shapes_mask']['giou']:.4f}; "
        f"{report['timing']['total_s']:.0f} s"
    )
    print(f"report: {os.path.join(_WORKDIR.value, 'report.md')}")


if __name__ == "__main__":
    app.run(main)
