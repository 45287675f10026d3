"""Euler vs UniPC on a trained checkpoint: how far each sampler's image latents are from a converged sample.

    python -m bench.bench_samplers --checkpoint=runs/demo/train [--steps 5,10,20,40] [--reference 400]
        [--prompts 8] [--cfg 3] [--shift 1] [--seed 0]

Encodes the captions of the first `--prompts` synthetic test scenes, draws one noise, and samples the
text-to-image latents with CFG (`GenMask.generate_latents`) by Euler and by UniPC at each step count, and by
Euler at `--reference` steps, the stand-in for the exact flow. Prints each sampler's RMS distance to the
reference in latent space (relative to the reference's RMS) and the time per sample.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--steps", default="5,10,20,40")
    parser.add_argument("--reference", type=int, default=400)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import flax.linen as nn

    from genmask_jax.encoders import make_encoder
    from genmask_jax.infer import checkpoint
    from genmask_jax.infer.segmenter import noise_key
    from genmask_jax.train.latent_data import shapes_source

    key = noise_key(args.seed)  # before the checkpoint loads: a seed JAX would cut to 32 bits is refused

    loaded = checkpoint.load(args.checkpoint)
    config, model = loaded.config, loaded.model
    source = shapes_source(config.data, "test", task="gen")
    captions = [source[i]["caption"] for i in range(args.prompts)]
    context, context_mask = (jnp.asarray(a) for a in make_encoder(config.data.encoder).encode(None, captions))
    hw = tuple(r // model.downsample for r in loaded.resolution)

    def sample(sampler: str, steps: int) -> tuple[np.ndarray, float]:
        fn = jax.jit(
            lambda p, c, m, k: model.generate_latents(p, c, m, k, hw, steps, args.cfg, args.shift, sampler)
        )
        inputs = (loaded.dit_params, context, context_mask, key)
        with jax.set_mesh(loaded.mesh), nn.logical_axis_rules(loaded.rules):
            jax.block_until_ready(fn(*inputs))
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*inputs))
        return np.asarray(out), (time.perf_counter() - start) / args.prompts

    reference, _ = sample("euler", args.reference)
    scale = float(np.sqrt(np.mean(reference**2)))
    print(f"{args.prompts} prompts, cfg {args.cfg}, shift {args.shift}; reference: Euler x {args.reference}")
    print("| steps | Euler: RMS error / RMS | UniPC: RMS error / RMS | Euler ms/sample | UniPC ms/sample |")
    print("|---|---|---|---|---|")
    for steps in (int(s) for s in args.steps.split(",")):
        row = [sample(name, steps) for name in ("euler", "unipc")]
        errors = [float(np.sqrt(np.mean((out - reference) ** 2))) / scale for out, _ in row]
        times = [seconds * 1e3 for _, seconds in row]
        print(f"| {steps} | {errors[0]:.4f} | {errors[1]:.4f} | {times[0]:.1f} | {times[1]:.1f} |")


if __name__ == "__main__":
    main()
