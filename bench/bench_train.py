"""Train-step throughput of a small GenMask config on the local devices (by hand; never in tests).

    python bench/bench_train.py                       # tiny DiT + tiny VAE in the step, 32x32, 4+4
    python bench/bench_train.py --latents precomputed --resolution 64 --batch-seg 8 --batch-gen 8

Prints one JSON line: compile seconds, steps/s and examples/s (median of --repeats timed runs of
--steps steps each, after one warm-up step).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs.genmask import get_config  # noqa: E402
from genmask_jax.models import build, mask_codec  # noqa: E402
from genmask_jax.parallel.mesh import config_mesh  # noqa: E402
from genmask_jax.parallel.sharding import rules_from_config  # noqa: E402
from genmask_jax.train import loop  # noqa: E402
from genmask_jax.train.state import attach_frozen, create_train_state, make_optimizer, make_schedule  # noqa: E402
from genmask_jax.train.step import make_train_step  # noqa: E402


def synthetic_batch(rng, n_seg, n_gen, size, text_len, text_dim):
    def sub(n):
        return {"image": rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32),
                "context": rng.standard_normal((n, text_len, text_dim)).astype(np.float32),
                "context_mask": np.ones((n, text_len), bool)}
    seg = {**sub(n_seg), "mask": (rng.uniform(size=(n_seg, size, size)) > 0.5).astype(np.float32)}
    return {"seg": seg, "gen": sub(n_gen)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="variant=tiny")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-seg", type=int, default=4)
    parser.add_argument("--batch-gen", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=1)
    parser.add_argument("--latents", choices=("vae", "precomputed"), default="vae")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    config = get_config(args.config)
    config.microbatches = args.microbatches
    model = build.build_model(config)
    mesh = config_mesh(config)
    rules = rules_from_config(config.sharding.logical_axis_rules)
    opt_cfg = {**config.optimizer.to_dict(), "total_steps": config.total_steps}
    tx = make_optimizer(opt_cfg)
    state, shardings = create_train_state(build.dit_initializer(model), tx, jax.random.key(0), mesh, rules,
                                          abstract_frozen=build.abstract_frozen(model))
    vae = build.random_frozen(build.abstract_frozen(model), 0)["vae"]
    state = attach_frozen(state, shardings, {"vae": vae})
    step = make_train_step(model, tx, shardings, mesh, rules, args.microbatches, 0.0, make_schedule(opt_cfg))

    batch = synthetic_batch(np.random.default_rng(0), args.batch_seg, args.batch_gen, args.resolution,
                            config.data.encoder.context_length, model.dit.text_dim)
    if args.latents == "precomputed":
        encode = jax.jit(model.encode)
        seg, gen = batch["seg"], batch["gen"]
        batch = {"seg": {"image_latent": np.asarray(encode(vae, seg["image"])),
                         "mask_latent": np.asarray(encode(vae, mask_codec.mask_to_rgb(seg["mask"]))),
                         "context": seg["context"], "context_mask": seg["context_mask"]},
                 "gen": {"image_latent": np.asarray(encode(vae, gen["image"])),
                         "context": gen["context"], "context_mask": gen["context_mask"]}}
    batch = loop.global_batch(batch, mesh, rules)
    rng = jax.random.key(1)

    tick = time.perf_counter()
    state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - tick
    rates = []
    for _ in range(args.repeats):
        tick = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch, rng)
        jax.block_until_ready(metrics)
        rates.append(args.steps / (time.perf_counter() - tick))
    rate = statistics.median(rates)
    print(json.dumps({"devices": jax.device_count(), "platform": jax.devices()[0].platform,
                      "config": args.config, "resolution": args.resolution, "batch_seg": args.batch_seg,
                      "batch_gen": args.batch_gen, "microbatches": args.microbatches, "latents": args.latents,
                      "compile_s": round(compile_s, 2), "steps_per_s": round(rate, 3),
                      "examples_per_s": round(rate * (args.batch_seg + args.batch_gen), 2),
                      "loss": float(metrics["loss"])}))


if __name__ == "__main__":
    main()
