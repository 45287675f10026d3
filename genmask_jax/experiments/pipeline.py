"""The small synthetic GenMask run behind the demo and the experiments, as separate steps.

    vae_config, vae_params = load_toy_vae(config, workdir)
    pool = latent_pool(config, config.demo.num_train_scenes, vae_config, vae_params)
    dit_params, history = train_dit(config, workdir, pool)
    model = genmask_model(config, vae_config)
    result = evaluate_segmentation(model, dit_params, vae_params, config.data, ...)

`run_demo(config, workdir)` chains them, generates a few images and writes the report.

A training folder that holds a checkpoint is resumed (a rerun after an interruption goes on; one after
a finished run trains nothing), but only under the config it was saved with: `check_resumable` refuses
another one (`RERUN_MAY_CHANGE` lists the fields a rerun may change).
"""

import dataclasses
import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util
from tqdm import tqdm

from genmask_jax.data.sources import DataConfigError
from genmask_jax.encoders import make_encoder
from genmask_jax.eval import report as report_lib
from genmask_jax.eval.inprocess import evaluate_segmentation
from genmask_jax.infer import checkpoint
from genmask_jax.models.genmask import GenMask
from genmask_jax.models.vae import VAEConfig
from genmask_jax.train import hooks, loop, vae_pretrain
from genmask_jax.train.latent_data import (
    LatentBatches,
    LatentPool,
    build_latent_pool,
    check_pool_size,
    shapes_source,
)

log = logging.getLogger(__name__)

# What a rerun may change and still resume its training folder: how the job is launched and laid out,
# how the run is watched and checkpointed, what is done with the model after training (the demo's
# evaluation and generation, the val / test split sizes), and `vae_from`, a path that moves with the
# repository or the workdir (the VAE itself is compared as `model.vae`, its config and latent statistics).
# Every other field shapes the trained model; resuming under a changed one would mix two runs.
RERUN_MAY_CHANGE = (
    "distributed",
    "mesh",
    "sharding",
    "data.num_threads",
    "data.prefetch_buffer_size",
    "data.encoder.device",
    "demo.device_per_core",
    "log_every",
    "eval_every",
    "sample_every",
    "quick_eval",
    "profile",
    "checkpoint",
    "demo.eval_split",
    "demo.eval_batch_size",
    "demo.num_grid",
    "demo.num_generated",
    "demo.generation_steps",
    "demo.guidance_scale",
    "demo.generation_shift",
    "data.shapes.val_size",
    "data.shapes.test_size",
    "data.shapes.train_size",  # the pool takes demo.num_train_scenes scenes, whatever the split's size
    "demo.vae_pretrain_steps",  # used only to make a missing VAE, whose config (model.vae) is compared
    "vae_from",
)


class WorkdirConfigMismatch(ValueError):
    """A training folder holds a checkpoint saved under another config (one line: the fields that differ)."""


class TrainingStopped(RuntimeError):
    """Training stopped before `total_steps` on a stop request (SIGTERM), its step saved: what follows
    (evaluation, the report) would describe a model other than the one asked for."""


def toy_vae_dir(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> str:
    """The folder of the frozen toy VAE: `config.vae_from` if it holds a checkpoint, else
    `<workdir>/toy_vae`, pretrained there (`config.demo.vae_pretrain_steps` steps) unless found."""
    path = config.vae_from
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return path
    # absolute: the path is saved with the trained model (`vae_from`), which later commands load from
    local = os.path.abspath(os.path.join(workdir, "toy_vae"))
    if not os.path.isfile(os.path.join(local, "config.json")):
        log.warning("no toy VAE at %r: pretraining one into %s", path, local)
        cfg = vae_pretrain.PretrainConfig(
            resolution=int(config.data.resolution[0]),
            steps=int(config.demo.vae_pretrain_steps),
            pool_size=min(4096, 64 * int(config.demo.vae_pretrain_steps)),
        )
        vae_config, params, history, iou = vae_pretrain.pretrain(cfg, progress=progress)
        vae_pretrain.save(local, vae_config, params, extra={"val_mask_iou": iou, "history": history})
    return local


def load_toy_vae(
    config: ml_collections.ConfigDict, workdir: str, progress: bool = True
) -> tuple[VAEConfig, dict]:
    """(VAEConfig, params) of the frozen toy VAE in `toy_vae_dir(config, workdir)`."""
    return vae_pretrain.load(toy_vae_dir(config, workdir, progress))


def latent_pool(
    config: ml_collections.ConfigDict,
    num_scenes: int,
    vae_config: VAEConfig,
    vae_params,
    progress: bool = True,
) -> LatentPool:
    """`build_latent_pool` of `config.data`; contexts cut to their real length if the DiT masks padding."""
    trim = bool(config.model.dit.get("use_context_mask", False))
    return build_latent_pool(
        config.data, num_scenes, vae_config, vae_params, progress=progress, trim_padding=trim
    )


def genmask_model(config: ml_collections.ConfigDict, vae_config: VAEConfig | None) -> GenMask:
    """The GenMask task assembly of `config` around the given (loaded) VAE."""
    model = loop.build_model(_without_vae(config))
    return dataclasses.replace(model, vae=vae_config)


def _without_vae(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy whose model has no VAE: training batches carry precomputed latents."""
    out = config.copy_and_resolve_references()
    out.model.vae = None
    return out


class _Progress:
    """A tqdm bar advanced once per batch, showing the last logged losses from metrics.jsonl."""

    def __init__(self, total: int, metrics_path: str, enabled: bool, every: int):
        self.bar = tqdm(total=total, desc="train GenMask DiT", disable=not enabled, mininterval=1.0)
        self.metrics_path, self.every, self.count = metrics_path, every, 0

    def __call__(self):
        self.bar.update(1)
        self.count += 1
        if self.count % self.every == 0 and os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:
                lines = f.read().splitlines()
            if lines:
                last = json.loads(lines[-1])
                self.bar.set_postfix({k: f"{last[k]:.3f}" for k in ("loss_seg", "loss_gen") if k in last})

    def close(self):
        self.bar.close()


def training_config(
    config: ml_collections.ConfigDict, vae_dir: str | None = None
) -> ml_collections.ConfigDict:
    """The config `train_dit` trains under (and saves with each checkpoint): without a VAE, or with the
    frozen VAE of `vae_dir` (`vae_from` and `model.vae` set from it)."""
    if vae_dir is None:
        return _without_vae(config)
    out = config.copy_and_resolve_references()
    out.vae_from = vae_dir
    out.model.vae = vae_pretrain.load_config(vae_dir).to_dict()
    return out


def config_differences(saved: dict, wanted: ml_collections.ConfigDict) -> list[str]:
    """`field: <saved> saved, <wanted> now` for each field outside `RERUN_MAY_CHANGE` that differs,
    compared as the checkpoint stores them (JSON). Fields that one side lacks (added to the code since the
    save, or removed) are not compared: the saved run trained as the code of its day did without them."""
    a, b = (traverse_util.flatten_dict(checkpoint.as_json(c), sep=".") for c in (saved, wanted))
    may_change = lambda name: any(name == f or name.startswith(f"{f}.") for f in RERUN_MAY_CHANGE)
    return [
        f"{name}: {a[name]!r} saved, {b[name]!r} now"
        for name in sorted(a.keys() & b.keys())
        if not may_change(name) and a[name] != b[name]
    ]


def check_resumable(train_config: ml_collections.ConfigDict, workdir: str) -> int:
    """The step `train.loop.train` would resume `workdir` at (its latest finalized checkpoint; 0 for
    none). Raises WorkdirConfigMismatch when that checkpoint was saved under another config than
    `train_config` (see `RERUN_MAY_CHANGE`): the loop would resume it and train the remaining steps, if
    any, of a run that is not the one asked for."""
    if not (epath.Path(workdir) / "checkpoints").is_dir():
        return 0
    try:
        directory, step = checkpoint.resolve(workdir)
    except checkpoint.CheckpointError:  # no finalized step: the loop starts afresh
        return 0
    if not (directory / str(step) / checkpoint.CONFIG).exists():
        raise WorkdirConfigMismatch(f"{directory}/{step} has no saved config to compare this run's with")
    differences = config_differences(checkpoint.stored_config(directory, step), train_config)
    if differences:
        more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
        raise WorkdirConfigMismatch(
            f"{workdir} holds step {step} of a run with another config ({'; '.join(differences[:3])}{more}), "
            "which this run would resume"
        )
    return step


def train_dit(
    config: ml_collections.ConfigDict,
    workdir: str,
    pool: LatentPool,
    progress: bool = True,
    image_frame: bool = True,
    vae_dir: str | None = None,
) -> tuple[dict, list[dict]]:
    """Trains the GenMask DiT on the latent pool with `train.loop.train` (checkpoints and
    metrics.jsonl in `workdir`); returns (DiT params (EMA ones if configured), the metrics logged by this
    call: none for a finished run resumed).

    vae_dir: the frozen VAE's folder. The batches carry latents either way; with the VAE in the train
    state the loop's quick evaluation (`eval_every`, `sample_every`) can encode and decode pixels.
    Raises WorkdirConfigMismatch, before training, for a workdir checkpoint of another config.
    """
    if jax.process_count() > 1:  # LatentBatches hands out the global batch, which each process would draw
        raise ValueError(
            f"the demo and the experiments train in one process (this is process {jax.process_index()} of "
            f"{jax.process_count()}): their latent pool holds every scene, and each process would draw the "
            "same global batch; train on several hosts with `python -m genmask_jax.train`"
        )
    train_config = training_config(config, vae_dir)
    check_resumable(train_config, workdir)
    bar = _Progress(config.total_steps, os.path.join(workdir, "metrics.jsonl"), progress, config.log_every)
    batches = LatentBatches(pool, config.batch.seg, config.batch.gen, config.seed, bar, image_frame)
    try:
        state, history = loop.train(train_config, workdir, data_iterator=batches)
    finally:
        bar.close()
    step = int(jax.device_get(state.step))
    if step < config.total_steps:
        raise TrainingStopped(
            f"training in {workdir} stopped at step {step} of {config.total_steps} (a stop request), that "
            "step saved: rerun the same command to resume"
        )
    return jax.device_get(hooks.inference_params(state)), history


def generate_images(
    model: GenMask, dit_params, vae_params, config: ml_collections.ConfigDict, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Text-to-image for the captions of the first test scenes: (generated uint8 `(N, H, W, 3)`,
    the scenes' own images, captions)."""
    n = int(config.demo.num_generated)
    source = shapes_source(config.data, config.demo.eval_split, task="gen")
    examples = [source[i] for i in range(n)]
    captions = [e["caption"] for e in examples]
    context, context_mask = make_encoder(config.data.encoder).encode(None, captions)
    generate = jax.jit(
        functools.partial(
            model.generate,
            image_hw=tuple(config.data.resolution),
            num_steps=int(config.demo.generation_steps),
            guidance_scale=float(config.demo.guidance_scale),
            shift=float(config.demo.generation_shift),
        )
    )
    images = generate(
        dit_params, vae_params, jnp.asarray(context), jnp.asarray(context_mask), jax.random.key(seed)
    )
    generated = np.clip((np.asarray(images) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return generated, np.stack([e["image"] for e in examples]), captions


def check_demo_sizes(config: ml_collections.ConfigDict) -> None:
    """DataConfigError when the batch is larger than the latent pool or more images are to be generated
    than the evaluation split has captions."""
    check_pool_size(int(config.demo.num_train_scenes), config.batch.seg, config.batch.gen)
    split = config.demo.eval_split
    available = len(shapes_source(config.data, split, task="gen"))
    if int(config.demo.num_generated) > available:
        raise DataConfigError(
            f"config.demo.num_generated={config.demo.num_generated}: the {split} split has {available} "
            f"captions (data.shapes.{split}_size)"
        )


def run_demo(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
    """VAE -> latent pool -> DiT training -> held-out evaluation -> generation -> report; returns the
    report dict (also written to `<workdir>/metrics.json`).

    A rerun resumes `<workdir>/train` (a finished run is evaluated again); the report's `train` section
    says at which step (`resumed_from_step`) and its history and `timing.train_s` cover this call's
    steps only. Raises WorkdirConfigMismatch, before the VAE is loaded, when that folder was trained
    under another config."""
    os.makedirs(workdir, exist_ok=True)
    timing, start, cpu_start = {}, time.perf_counter(), time.process_time()

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timing[name] = now - since
        return now

    tick = start
    check_demo_sizes(config)  # before the work
    vae_dir = toy_vae_dir(config, workdir, progress)
    train_dir = os.path.join(workdir, "train")
    resumed_from = check_resumable(training_config(config, vae_dir), train_dir)
    vae_config, vae_params = vae_pretrain.load(vae_dir)
    tick = lap("vae_s", tick)
    pool = latent_pool(config, int(config.demo.num_train_scenes), vae_config, vae_params, progress)
    tick = lap("data_s", tick)
    dit_params, history = train_dit(config, train_dir, pool, progress, vae_dir=vae_dir)
    tick = lap("train_s", tick)
    model = genmask_model(config, vae_config)
    result = evaluate_segmentation(
        model,
        dit_params,
        vae_params,
        config.data,
        config.demo.eval_split,
        int(config.demo.eval_batch_size),
        seed=config.seed,
        keep=int(config.demo.num_grid),
        progress=progress,
    )
    tick = lap("eval_s", tick)
    generated = (
        generate_images(model, dit_params, vae_params, config, seed=config.seed)
        if config.demo.num_generated
        else None
    )
    tick = lap("generate_s", tick)
    timing["total_s"] = tick - start
    # CPU seconds of all threads: with the machine shared, wall time overstates what the run needs.
    timing["process_cpu_s"] = time.process_time() - cpu_start
    report = {
        "segmentation": result.metrics,
        "per_expression_kind": result.per_kind,
        "baselines": result.baselines,
        "eval_split": config.demo.eval_split,
        "expression_kinds": config.data.shapes.expression_kinds,
        "resolution": list(config.data.resolution),
        "train": {"steps": int(config.total_steps), "resumed_from_step": resumed_from, "history": history},
        "timing": timing,
        "devices": [str(d) for d in jax.devices()],
        "config": config.to_dict(),
    }
    report["paths"] = report_lib.write_report(workdir, _jsonable(report), result.examples, generated)
    return report


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    return value
