"""WAN 2.1 VAE image encode + decode: JAX (jit) vs diffusers' AutoencoderKLWan, same random weights.

    python -m bench.bench_vae [--sizes 256,512] [--reps 3] [--batch 1] [--dtype float32] [--no-torch]

Real config (base_dim 96); both sides get the weights of one randomly initialised diffusers model.
Times are the median of `--reps` runs after one warm-up (JAX compile excluded), encode (posterior
mean) and decode separately, in seconds per batch. Run by hand; nothing here is asserted.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import median_ms
from convert import wan_vae
from genmask_jax.models.vae import VAEConfig, WanVAE


def _median_seconds(fn, reps: int) -> float:
    return median_ms(fn, reps) / 1e3


def bench_jax(params, config: VAEConfig, x: np.ndarray, reps: int) -> tuple[float, float]:
    model = WanVAE(config)
    encode = jax.jit(lambda p, x: model.apply(p, x, method="encode")[0])
    decode = jax.jit(lambda p, z: model.apply(p, z, method="decode"))
    params = jax.device_put(params)
    x = jnp.asarray(x)
    z = encode(params, x)
    return (_median_seconds(lambda: encode(params, x).block_until_ready(), reps),
            _median_seconds(lambda: decode(params, z).block_until_ready(), reps))


def bench_torch(model, x: np.ndarray, reps: int) -> tuple[float, float]:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    with torch.no_grad():
        z = model.encode(x).latent_dist.mean
        return (_median_seconds(lambda: model.encode(x).latent_dist.mean, reps),
                _median_seconds(lambda: model.decode(z).sample, reps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", help="JAX compute dtype (torch stays fp32)")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip timing diffusers (its model still supplies the weights: torch is needed)")
    args = parser.parse_args()

    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    reference = AutoencoderKLWan().eval()
    config = VAEConfig.from_variant("wan2.1", dtype=args.dtype)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    params = wan_vae.params_from_state_dict(state, config)
    print(f"devices {jax.devices()}, torch threads {torch.get_num_threads()}, batch {args.batch}, "
          f"JAX dtype {args.dtype}")
    for size in (int(s) for s in args.sizes.split(",")):
        x = np.random.default_rng(0).uniform(-1, 1, (args.batch, 1, size, size, 3)).astype(np.float32)
        jax_enc, jax_dec = bench_jax(params, config, x, args.reps)
        jax_total = jax_enc + jax_dec
        line = f"{size}x{size}: jax encode {jax_enc:.3f}s decode {jax_dec:.3f}s total {jax_total:.3f}s"
        if not args.no_torch:
            torch_enc, torch_dec = bench_torch(reference, x, args.reps)
            torch_total = torch_enc + torch_dec
            line += (f" | torch encode {torch_enc:.3f}s decode {torch_dec:.3f}s total {torch_total:.3f}s"
                     f" | jax/torch {jax_total / torch_total:.2f}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
