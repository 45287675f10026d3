"""WanDiT forward+backward in bf16 on one accelerator: step time, tokens/s, MFU; diffusers on the same card.

    python -m bench.bench_dit_gpu [--variant 1.3b] [--frames 2] [--height 64] [--width 64] [--text-len 512]
        [--batches 1,2,4,8,16,32] [--reps 10] [--attention cudnn] [--remat none] [--unrolled]
        [--peak-tflops X] [--no-torch] [--json PATH]

Defaults are the issue's setting: the 1.3B DiT with bf16 parameters and compute, 2 latent frames of 32 x 32
patches (latent 2 x 64 x 64, 2,048 tokens), 512 text tokens; the gradient of `mean(out^2)` with respect to all
parameters. The blocks are scanned as in configs/genmask.py (`--unrolled` unrolls them; slower to compile).
Batches are tried in the order given until one does not fit (out of memory). Each measured step is the
median of `--reps` after a warm-up (compile).

MFU = model FLOPs / (step time x peak bf16 FLOP/s of the card). Model FLOPs are those of every matmul
in the forward+backward, attention's included, counted from the jaxpr of the same model with XLA
attention (`genmask_jax.flops.count_flops`; a cuDNN attention call is opaque to it). The peak comes from
`--peak-tflops`, else `genmask_jax.flops.peak_bf16_flops` (vendors' dense bf16 figures).

diffusers' `WanTransformer3DModel` runs with the same config in bf16 (the modules it keeps in float32 stay
there, as `from_pretrained(torch_dtype=torch.bfloat16)` leaves them; PyTorch eager, SDPA attention) on
the first CUDA device (the CPU when there is none, for a smoke run), over the same batches, first: it
frees the card before JAX starts its sweep, and JAX does not preallocate (`XLA_PYTHON_CLIENT_PREALLOCATE`
is false unless set), so neither framework's memory pool shrinks the other's largest batch.
Needs jax with a GPU/TPU backend and, for the comparison, torch and diffusers; not the training stack.
"""

import argparse
import dataclasses
import json
import math
import os

import numpy as np

from bench.timing import median_ms


def make_inputs(batch: int, frames: int, height: int, width: int, text_len: int, config, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, frames, height, width, config.in_channels), np.float32)
    t = rng.uniform(0.0, 1000.0, (batch,)).astype(np.float32)
    ctx = rng.standard_normal((batch, text_len, config.text_dim), np.float32)
    return x, t, ctx


def is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def jax_runs(config, shape, batches, reps):
    """[(batch, ms)] for the batches that fit, in order, and the forward+backward FLOPs per example."""
    import jax
    import jax.numpy as jnp

    from genmask_jax.flops import count_flops
    from genmask_jax.models.dit import WanDiT, init_params

    def loss(params, model, x, t, ctx):
        return jnp.mean(model.apply({"params": params}, x, t, ctx).astype(jnp.float32) ** 2)

    model = WanDiT(config)
    params = jax.jit(lambda key: init_params(config, key))(jax.random.key(0))
    step = jax.jit(jax.value_and_grad(lambda p, x, t, ctx: loss(p, model, x, t, ctx)))
    counted = WanDiT(dataclasses.replace(config, attention="xla"))
    one = make_inputs(1, *shape, config)
    flops = count_flops(jax.make_jaxpr(jax.grad(lambda p, *a: loss(p, counted, *a)))(params, *one))
    runs = []
    for batch in batches:
        inputs = [jnp.asarray(a) for a in make_inputs(batch, *shape, config)]
        inputs[0], inputs[2] = inputs[0].astype(config.dtype), inputs[2].astype(config.dtype)
        try:
            ms = median_ms(lambda inputs=inputs: jax.block_until_ready(step(params, *inputs)), reps)
        except Exception as e:  # noqa: BLE001  (out of memory ends the sweep; anything else is a bug)
            if not is_out_of_memory(e):
                raise
            print(f"jax: batch {batch} does not fit", flush=True)
            break
        runs.append((batch, ms))
        print(f"jax: batch {batch}: {ms:.1f} ms", flush=True)
    return runs, flops


def torch_runs(config, shape, batches, reps):
    """[(batch, ms)] of diffusers' WanTransformer3DModel (bf16, eager) for the batches that fit."""
    import torch
    from diffusers import WanTransformer3DModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=config.patch_size, num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim, in_channels=config.in_channels,
        out_channels=config.out_channels, text_dim=config.text_dim, freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim, num_layers=config.num_layers,
    ).to(device)
    # What from_pretrained(torch_dtype=bfloat16) does: the modules diffusers keeps in float32 stay there.
    keep = set(model._keep_in_fp32_modules or ())
    for name, param in model.named_parameters():
        if not keep.intersection(name.split(".")):
            param.data = param.data.to(torch.bfloat16)
    runs = []
    for batch in batches:
        x, t, ctx = make_inputs(batch, *shape, config)
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).to(device, torch.bfloat16)
        t, ctx = torch.from_numpy(t).to(device), torch.from_numpy(ctx).to(device, torch.bfloat16)

        def step(x=x, t=t, ctx=ctx):
            model.zero_grad(set_to_none=True)
            (model(x, t, ctx).sample.float() ** 2).mean().backward()
            sync()

        try:
            ms = median_ms(step, reps)
        except torch.OutOfMemoryError:
            print(f"torch: batch {batch} does not fit", flush=True)
            break
        runs.append((batch, ms))
        print(f"torch: batch {batch}: {ms:.1f} ms", flush=True)
    return runs, device


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--variant", default="1.3b")
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--height", type=int, default=64, help="latent height (patches = height / 2)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--attention", default=None, help="default: cudnn on GPU, splash on TPU, else xla")
    parser.add_argument("--remat", default="none", help="a jax.checkpoint_policies name, or none")
    parser.add_argument("--unrolled", action="store_true", help="unrolled blocks instead of nn.scan")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax starts its backends

    import jax

    from genmask_jax.flops import devices_per_chip, peak_bf16_flops
    from genmask_jax.models.dit import DiTConfig

    device = jax.devices()[0]
    attention = args.attention or {"gpu": "cudnn", "tpu": "splash"}.get(device.platform, "xla")
    config = DiTConfig.from_variant(args.variant, dtype=args.dtype, param_dtype=args.dtype,
                                    attention=attention, remat_policy=args.remat,
                                    scan_layers=not args.unrolled)
    shape = (args.frames, args.height, args.width, args.text_len)
    tokens = args.frames * args.height * args.width // math.prod(config.patch_size)
    known = peak_bf16_flops(device.device_kind, devices_per_chip(jax.devices()))
    peak = args.peak_tflops or (known / 1e12 if known else None)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"{device.device_kind}: {args.variant} DiT, {args.dtype}, {tokens} tokens + {args.text_len} text "
          f"tokens per example, attention {attention}, remat {args.remat}, "
          f"{'unrolled' if args.unrolled else 'scanned'} blocks; peak {peak} TFLOP/s", flush=True)

    results = {"device": device.device_kind, "variant": args.variant, "dtype": args.dtype, "tokens": tokens,
               "text_len": args.text_len, "attention": attention, "remat": args.remat,
               "scan_layers": not args.unrolled, "peak_tflops": peak}
    if not args.no_torch:
        results["torch"], results["torch_device"] = torch_runs(config, shape, batches, args.reps)
        import torch

        if torch.cuda.is_available():  # the model and its activations died with torch_runs' frame
            torch.cuda.empty_cache()
    results["jax"], results["flops_per_example"] = jax_runs(config, shape, batches, args.reps)
    flops = results["flops_per_example"]

    print(f"forward+backward: {flops / 1e9:,.1f} GFLOP per example (matmuls, attention included)")
    print("| framework | batch | step | tokens/s | MFU |\n|---|---|---|---|---|")
    for name in ("jax", "torch"):
        for batch, ms in results.get(name, []):
            mfu = f"{flops * batch / (ms / 1e3) / (peak * 1e12):.1%}" if peak else "-"
            print(f"| {name} | {batch} | {ms:.1f} ms | {batch * tokens / (ms / 1e3):,.0f} | {mfu} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
