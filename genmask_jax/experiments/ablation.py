"""Findings 2-5 at small scale: the demo's setting, shorter, one variable changed at a time.

    python -m genmask_jax.experiments.ablation --study timestep_law   # a = 0.05 / 0.1 / 0.5, logit-normal
    python -m genmask_jax.experiments.ablation --study steps          # single step vs 4 and 16 Euler steps
    python -m genmask_jax.experiments.ablation --study mixing         # seg:gen 1:1 vs 1:0
    python -m genmask_jax.experiments.ablation --study shortcut       # with / without the image frame
    python -m genmask_jax.experiments.ablation --study all            # each distinct model trained once

Every variant trains from scratch on the same latent pool (same VAE, scenes and seeds) with the same
number of steps and segmentation examples per step, then is evaluated on the held-out split by
single-step inference (the `steps` study evaluates one model with several step counts). The base
model (a = 0.05, seg:gen 1:1, with the image frame) appears in three studies and is trained once. Results go
to `<out>/<study>.json` and `<out>/<study>.png` (`<study>_seeds_1_2.json` for `--seeds 1,2`: any seeds
but the default 0). Each model trains in `<out>/runs/<study>/<variant>-seed<seed>`; a rerun into the same
`--out` resumes (or, finished, re-evaluates) those models, and refuses before training if one was trained
with other settings (`--steps`, `--lr`, ...): pass another `--out`, or delete that folder.

    python -m genmask_jax.experiments.ablation --study steps --trained_run runs/demo

evaluates a demo run's final checkpoint with 1, 4 and 16 steps instead, under the config saved with it;
the run's folder is only read.
"""

import argparse
import dataclasses
import json
import os
import time

import jax
import ml_collections

from configs import demo as demo_config
from genmask_jax.data.sources import DataConfigError
from genmask_jax.eval.inprocess import evaluate_segmentation
from genmask_jax.experiments import pipeline
from genmask_jax.infer import checkpoint
from genmask_jax.models.build import VAEConfigMismatch
from genmask_jax.train import vae_pretrain
from genmask_jax.train.latent_data import check_pool_size

STUDIES = {
    "timestep_law": {
        "a=0.05": {"segmentation": {"law": "heavy_tailed", "a": 0.05}},
        "a=0.1": {"segmentation": {"law": "heavy_tailed", "a": 0.1}},
        "a=0.5": {"segmentation": {"law": "heavy_tailed", "a": 0.5}},
        "logit-normal": {"segmentation": {"law": "logit_normal", "mean": 0.0, "std": 1.0}},
    },
    "mixing": {"seg:gen 1:1": {"gen_ratio": 1.0}, "seg:gen 1:0": {"gen_ratio": 0.0}},
    "shortcut": {"with image frame": {"image_frame": True}, "without image frame": {"image_frame": False}},
    "steps": {"1 step": {"num_steps": 1}, "4 steps": {"num_steps": 4}, "16 steps": {"num_steps": 16}},
}


class TrainedRunError(ValueError):
    """A `--trained_run` the steps study cannot evaluate (the message says why, in one line)."""


def base_config(
    dit: str = "fine",
    optimizer: str = "",
    lr: float | None = None,
    batch: int | None = None,
    context_mask: bool | None = None,
    scan_layers: bool | None = None,
) -> ml_collections.ConfigDict:
    """The demo config (`configs/demo.py`, `dit` "fine" | "coarse") with the given fields replaced; None
    or "" keeps the demo's. `optimizer` "adamw" | "muon"; `lr` AdamW's learning rate (Muon's other
    parameters'); `batch` segmentation examples per step, generation as many; `context_mask` masks the
    text padding; `scan_layers` runs the DiT's blocks under nn.scan (the same function, another random
    initialisation)."""
    base = demo_config.get_config(f"dit={dit}")
    if optimizer:
        base.optimizer.name = optimizer
    if lr is not None:
        base.optimizer.lr = lr
    if batch is not None:
        base.batch.seg = base.batch.gen = batch
    if context_mask is not None:
        base.model.dit.use_context_mask = context_mask
    if scan_layers is not None:
        base.model.dit.scan_layers = scan_layers
    return base


def load_trained_run(run: str, test_size: int) -> checkpoint.LoadedModel:
    """The latest checkpoint of demo workdir `run` (or of its `train` folder given directly), with host
    DiT parameters and its saved config, the test split cut to `test_size`. Nothing is written there.

    Raises TrainedRunError (or checkpoint.CheckpointError) for a run that is not the demo's: the study
    evaluates on the synthetic test split through the run's own frozen VAE (`vae_from`)."""
    train = os.path.join(run, "train")
    directory, step = checkpoint.resolve(train if os.path.isdir(train) else run)
    where = f"{directory}/{step}"
    config = checkpoint.saved_config(directory, step)
    if not config.get("demo"):
        raise TrainedRunError(f"{where} is not a demo run (its config has no `demo` section)")
    if not config.get("vae_from") or not config.model.get("vae"):
        raise TrainedRunError(f"{where}: its config names no frozen VAE (model.vae, vae_from) to decode with")
    if not os.path.isfile(os.path.join(config.vae_from, "config.json")):
        raise TrainedRunError(f"{where} was trained with the VAE {config.vae_from}, which is not there now")
    # load() refuses a vae_from whose VAE differs from the one saved in the config (VAEConfigMismatch).
    loaded = checkpoint.load(os.path.join(directory, str(step)))
    loaded.config.data.shapes.test_size = test_size
    return dataclasses.replace(loaded, dit_params=jax.device_get(loaded.dit_params))


def variant_config(base, variant: dict, steps: int, seed: int):
    config = base.copy_and_resolve_references()
    config.total_steps = steps
    config.seed = seed
    config.checkpoint.every_steps = steps
    if "segmentation" in variant:
        config.model.timesteps.segmentation = dict(variant["segmentation"])
    if "gen_ratio" in variant:
        config.batch.gen = int(round(config.batch.seg * variant["gen_ratio"]))
    return config


def variant_workdir(out: str, study: str, name: str, seed: int) -> str:
    """The training folder of variant `name` of `study` for `seed`."""
    return os.path.join(out, "runs", study, f"{name}-seed{seed}".replace(" ", "_").replace(":", ""))


def planned_runs(studies: list[str], base, steps: int, seeds: list[int], out: str) -> dict:
    """{(variant_key, seed): (config, workdir, image_frame)} of each distinct model `studies` train, in
    the folder of the first study that needs it."""
    runs = {}
    for study in studies:
        for name, variant in STUDIES[study].items():
            for seed in seeds:
                key = (variant_key(base, variant), seed)
                if key not in runs:
                    config = variant_config(base, variant, steps, seed)
                    workdir = variant_workdir(out, study, name, seed)
                    runs[key] = (config, workdir, variant.get("image_frame", True))
    return runs


def output_name(study: str, seeds: list[int]) -> str:
    """`study`, or `<study>_seeds_1_2` for seeds other than the default [0]: a rerun of the same study
    with more seeds into the same `--out` keeps the first result."""
    return study if seeds == [0] else f"{study}_seeds_{'_'.join(str(s) for s in seeds)}"


def variant_key(base, variant: dict) -> str:
    """Variants that train the same model share one key (unset fields take `base`'s values)."""
    train = {k: v for k, v in variant.items() if k != "num_steps"}
    defaults = {
        "segmentation": dict(base.model.timesteps.segmentation),
        "gen_ratio": int(base.batch.gen) / int(base.batch.seg),
        "image_frame": True,
    }
    return json.dumps({**defaults, **train}, sort_keys=True)


def run_studies(
    studies: list[str],
    steps: int,
    seeds: list[int],
    num_scenes: int,
    test_size: int,
    out: str,
    trained_run: str = "",
    log=print,
    base: ml_collections.ConfigDict | None = None,
) -> dict[str, dict]:
    """Trains each distinct variant of `studies` once per seed (a = 0.05 with 1:1 and the image frame
    is the same model in three studies) and evaluates it; returns {study: summary}.

    `base`: the config every variant starts from (default `base_config()`, the demo's).
    `trained_run` (the `steps` study only): a demo workdir whose latest checkpoint is evaluated under
    its saved config (`load_trained_run`) instead of training a model here; `steps`, `num_scenes` and
    `base` then do not apply."""
    trained: dict = {}
    runs, resumed_from = {}, {}
    if trained_run:
        if studies != ["steps"]:
            raise TrainedRunError("--trained_run only applies to --study steps")
        loaded = load_trained_run(trained_run, test_size)
        base, vae_config, vae_params = loaded.config, loaded.model.vae, loaded.vae_params
        steps, num_scenes = loaded.step, int(base.demo.num_train_scenes)
        trained = {(variant_key(base, {}), seed): (base, loaded.dit_params, 0.0) for seed in seeds}
    else:
        base = (base_config() if base is None else base).copy_and_resolve_references()
        base.data.shapes.test_size = test_size
        base.demo.num_train_scenes = num_scenes  # saved with each model: a rerun with another pool refuses
        check_pool_size(num_scenes, base.batch.seg, base.batch.gen, "--num_train_scenes")  # before the pool
        runs = planned_runs(studies, base, steps, seeds, out)
        # The VAE is recorded with each model (`training_config`): a rerun after it changed (a VAE trained
        # again) would evaluate models that trained on other latents.
        vae_dir = pipeline.toy_vae_dir(base, out)
        # Every folder before anything trains: one trained under other settings stops the rerun at once.
        resumed_from = {
            key: pipeline.check_resumable(pipeline.training_config(config, vae_dir), workdir)
            for key, (config, workdir, _) in runs.items()
        }
        vae_config, vae_params = vae_pretrain.load(vae_dir)
        pool = pipeline.latent_pool(base, num_scenes, vae_config, vae_params)
    summaries = {}
    for study in studies:
        results = {}
        for name, variant in STUDIES[study].items():
            for seed in seeds:
                key = (variant_key(base, variant), seed)
                if key not in trained:
                    start = time.perf_counter()
                    config, workdir, image_frame = runs[key]
                    params, _ = pipeline.train_dit(
                        config, workdir, pool, image_frame=image_frame, vae_dir=vae_dir
                    )
                    trained[key] = (config, params, time.perf_counter() - start)
                config, params, train_s = trained[key]
                start = time.perf_counter()
                model = pipeline.genmask_model(config, vae_config)
                result = evaluate_segmentation(
                    model,
                    params,
                    vae_params,
                    config.data,
                    "test",
                    int(config.demo.eval_batch_size),
                    num_steps=variant.get("num_steps", 1),
                    seed=seed,
                    keep=0,
                    image_frame=variant.get("image_frame", True),
                )
                results.setdefault(name, []).append(
                    {
                        "seed": seed,
                        **{k: result.metrics[k] for k in ("giou", "ciou")},
                        "per_kind": result.per_kind,
                        # A model resumed at step N: train_s covers only this call's steps after N.
                        **({"resumed_from_step": resumed_from[key]} if resumed_from.get(key) else {}),
                        "train_s": train_s,
                        "eval_s": time.perf_counter() - start,
                    }
                )
                log(study, name, seed, results[name][-1])
        summaries[study] = {
            "study": study,
            **({"trained_run": os.path.abspath(trained_run)} if trained_run else {}),
            "steps": steps,
            "seeds": seeds,
            "num_train_scenes": num_scenes,
            "test_size": test_size,
            "results": results,
        }
    return summaries


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summary["results"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for k, metric in enumerate(("giou", "ciou")):
        values = [[r[metric] for r in summary["results"][n]] for n in names]
        x = np.arange(len(names)) + (k - 0.5) * 0.35
        ax.bar(
            x,
            [np.mean(v) for v in values],
            0.35,
            label=metric,
            yerr=[np.std(v) if len(v) > 1 else 0 for v in values],
        )
    ax.set_xticks(np.arange(len(names)), names, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"{summary['study']} ({summary['steps']} steps, held-out synthetic test)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", required=True, help=f"comma-separated, of {sorted(STUDIES)}, or 'all'")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--num_train_scenes", type=int, default=6000)
    parser.add_argument("--test_size", type=int, default=300)
    parser.add_argument("--out", default="docs/findings")
    parser.add_argument(
        "--trained_run", default="", help="steps study: evaluate this demo workdir's model (read only)"
    )
    model = parser.add_argument_group("the base model (default: the demo's, configs/demo.py)")
    model.add_argument("--dit", default=None, choices=["fine", "coarse"], help="the demo config's DiT")
    model.add_argument("--optimizer", default=None, choices=["adamw", "muon"])
    model.add_argument("--lr", type=float, help="AdamW's learning rate (with Muon: the other parameters')")
    model.add_argument("--batch", type=int, help="segmentation examples per step (generation: as many)")
    model.add_argument(
        "--context_mask", action=argparse.BooleanOptionalAction, help="mask the text padding in attention"
    )
    model.add_argument(
        "--scan_layers", action=argparse.BooleanOptionalAction, help="nn.scan over the DiT's blocks"
    )
    args = parser.parse_args(argv)
    studies = sorted(STUDIES) if args.study == "all" else args.study.split(",")
    unknown = set(studies) - set(STUDIES)
    if unknown:
        parser.error(f"unknown studies {sorted(unknown)}; choose from {sorted(STUDIES)} or 'all'")
    overrides = {
        name: getattr(args, name)
        for name in ("dit", "optimizer", "lr", "batch", "context_mask", "scan_layers")
        if getattr(args, name) is not None
    }
    if args.trained_run:
        if overrides:
            parser.error(f"--trained_run evaluates the run's own model: drop --{', --'.join(overrides)}")
        run, out = os.path.abspath(args.trained_run), os.path.abspath(args.out)
        if os.path.commonpath([run, out]) == run:
            parser.error(f"--out {args.out} is inside --trained_run {args.trained_run}, which is only read")
    os.makedirs(args.out, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    try:
        summaries = run_studies(
            studies,
            args.steps,
            seeds,
            args.num_train_scenes,
            args.test_size,
            args.out,
            args.trained_run,
            log=lambda *a: print(*a, flush=True),
            base=None if args.trained_run else base_config(**overrides),
        )
    except (TrainedRunError, checkpoint.CheckpointError, VAEConfigMismatch) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    except pipeline.WorkdirConfigMismatch as e:
        parser.exit(1, f"{parser.prog}: error: {e}: pass another --out, or delete that folder\n")
    except (DataConfigError, pipeline.TrainingStopped) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    for study, summary in summaries.items():
        name = os.path.join(args.out, output_name(study, seeds))
        with open(f"{name}.json", "w") as f:
            json.dump(summary, f, indent=2)
        plot(summary, f"{name}.png")


if __name__ == "__main__":
    main()
