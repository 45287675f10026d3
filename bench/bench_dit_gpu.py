"""WanDiT forward+backward in bf16 on one accelerator: step time, tokens/s, MFU; diffusers on the same card.

    python -m bench.bench_dit_gpu [--variant 1.3b] [--frames 2] [--height 64] [--width 64] [--text-len 512]
        [--batches 1,2,4,8,16,32] [--reps 10] [--attention cudnn] [--remat none] [--unrolled]
        [--peak-tflops X] [--only jax|torch] [--torch-timeout 300] [--json PATH]

Defaults are the issue's setting: the 1.3B DiT with bf16 parameters and compute, 2 latent frames of 32 x 32
patches (latent 2 x 64 x 64, 2,048 tokens), 512 text tokens; the gradient of `mean(out^2)` with respect to all
parameters. The blocks are scanned as in configs/genmask.py (`--unrolled` unrolls them; slower to compile).
Batches are tried in the order given until one does not fit (out of memory) or fails; the failure is recorded
and ends that framework's sweep only. Each measured step is the median of `--reps` after a warm-up (compile).
If cuDNN attention (the GPU default) fails on the first batch for another reason than memory, the sweep
is run again with XLA attention. `--json` is rewritten after every batch: a run stopped early keeps its
figures.

MFU = model FLOPs / (step time x peak bf16 FLOP/s of the card). Model FLOPs are those of every matmul
in the forward+backward, attention's included, counted from the jaxpr of the same model with XLA
attention and without rematerialisation (`genmask_jax.flops.count_flops`; a cuDNN attention call is
opaque to it): `--remat` changes the work done, not the model's, so MFU compares across remat policies.
With `--remat`, HFU (hardware FLOPs utilisation) also counts the forward work recomputed in the
backward, from the jaxpr under that policy. The peak comes from
`--peak-tflops`, else `genmask_jax.flops.peak_bf16_flops` (vendors' dense bf16 figures). tokens/s counts the
video tokens (frames x patches), not the text tokens.

diffusers' `WanTransformer3DModel` runs with the same config in bf16 (the modules it keeps in float32 stay
there, as `from_pretrained(torch_dtype=torch.bfloat16)` leaves them; PyTorch eager, SDPA attention) on
the first CUDA device (the CPU when there is none, for a smoke run), over the same batches, first and in a
child process (`--only torch`, at most `--torch-timeout` seconds, writing `--json`.torch.json and its
stderr to `--json`.torch.json.log): the card is the driver's again when JAX starts, JAX has no context on
it before, and torch's CUDA libraries (cuDNN among them) never share a process with jax's. JAX does not
preallocate and may use 92% of the card (`XLA_PYTHON_CLIENT_PREALLOCATE`, `XLA_PYTHON_CLIENT_MEM_FRACTION`
unless set; JAX's default cap is 75% even without preallocation).
Needs jax with a GPU/TPU backend and, for the comparison, torch and diffusers; not the training stack.
"""

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np

from bench.timing import median_ms


def make_inputs(batch: int, frames: int, height: int, width: int, text_len: int, config, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, frames, height, width, config.in_channels), np.float32)
    t = rng.uniform(0.0, 1000.0, (batch,)).astype(np.float32)
    ctx = rng.standard_normal((batch, text_len, config.text_dim), np.float32)
    return x, t, ctx


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def sweep(name: str, batches, time_batch, record) -> None:
    """Times `time_batch(batch)` for each batch until one fails; `record` gets each run as a dict."""
    for batch in batches:
        try:
            ms = time_batch(batch)
        except Exception as e:  # noqa: BLE001  (recorded: one failure must not lose the other figures)
            error = "out of memory" if is_out_of_memory(e) else f"{type(e).__name__}: {str(e)[:2000]}"
            print(f"{name}: batch {batch} failed: {error.splitlines()[0]}", flush=True)
            record({"batch": batch, "error": error})
            return
        print(f"{name}: batch {batch}: {ms:.1f} ms", flush=True)
        record({"batch": batch, "ms": ms})


def step_flops(config, shape, executed: bool = False) -> float:
    """Forward+backward FLOPs of one example, counted from the jaxpr with XLA attention (no device memory):
    the model's (no rematerialisation), or with `executed` those run under `config.remat_policy` (the
    forward work that remat recomputes counted again)."""
    import jax
    import jax.numpy as jnp

    from genmask_jax.flops import count_flops
    from genmask_jax.models.dit import WanDiT, init_params

    config = dataclasses.replace(config, attention="xla")  # a cuDNN call is opaque to the counter
    if not executed:
        config = dataclasses.replace(config, remat_policy="none")
    model = WanDiT(config)
    params = jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))
    one = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in make_inputs(1, *shape, config)]

    def loss(p, x, t, ctx):
        return jnp.mean(model.apply({"params": p}, x, t, ctx).astype(jnp.float32) ** 2)

    return float(count_flops(jax.make_jaxpr(jax.grad(loss))(params, *one)))


def jax_runs(config, shape, batches, reps, record) -> None:
    """Sweeps the batches with the jitted forward+backward of WanDiT(config)."""
    import jax
    import jax.numpy as jnp

    from genmask_jax.models.dit import WanDiT, init_params

    model = WanDiT(config)
    xla = dataclasses.replace(config, attention="xla")  # the parameters do not depend on the kernel
    params = []  # made by the first batch, so that a failure there is recorded like any other

    @jax.jit
    @jax.value_and_grad
    def step(p, x, t, ctx):
        return jnp.mean(model.apply({"params": p}, x, t, ctx).astype(jnp.float32) ** 2)

    def time_batch(batch):
        if not params:
            params.append(jax.jit(lambda key: init_params(xla, key))(jax.random.key(0)))
        x, t, ctx = (jnp.asarray(a) for a in make_inputs(batch, *shape, config))
        x, ctx = x.astype(config.dtype), ctx.astype(config.dtype)
        return median_ms(lambda: jax.block_until_ready(step(params[0], x, t, ctx)), reps)

    sweep("jax", batches, time_batch, record)


def torch_runs(config, shape, batches, reps, record) -> str:
    """Sweeps the batches with diffusers' WanTransformer3DModel (bf16, eager); returns the device's name."""
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

    def time_batch(batch):
        x, t, ctx = make_inputs(batch, *shape, config)
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).to(device, torch.bfloat16)
        t, ctx = torch.from_numpy(t).to(device), torch.from_numpy(ctx).to(device, torch.bfloat16)

        def step():
            model.zero_grad(set_to_none=True)
            (model(x, t, ctx).sample.float() ** 2).mean().backward()
            sync()

        try:
            return median_ms(step, reps)
        finally:
            model.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.empty_cache()

    sweep("torch", batches, time_batch, record)
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def torch_in_child(argv, timeout_s: float, out: str | None = None) -> dict:
    """Runs this script with `--only torch` in a child process, writing `out` (JSON) and `out`.log (its
    stderr), in a temporary folder if None; the child's JSON, with "error" if it failed or timed out."""
    with tempfile.TemporaryDirectory() as tmp:
        out = out or os.path.join(tmp, "torch.json")
        command = [sys.executable, "-m", "bench.bench_dit_gpu", *argv, "--only", "torch", "--json", out]
        with open(out + ".log", "w+") as log:
            try:
                done = subprocess.run(command, timeout=timeout_s, stdout=sys.stdout, stderr=log,
                                      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                error = None if done.returncode == 0 else f"exit {done.returncode}"
            except subprocess.TimeoutExpired:
                error = f"timed out after {timeout_s} s"
            if error:
                log.seek(0)
                error += ": " + log.read()[-2000:]
        child = json.load(open(out)) if os.path.exists(out) else {}
    if error:
        print(f"torch: {error.splitlines()[0]}", flush=True)
        child["error"] = error
    return child


def derive(
    run: dict, flops: float | None, tokens: int, peak_tflops: float | None, executed: float | None = None
) -> dict:
    """Adds tokens/s, achieved TFLOP/s and MFU to a measured run, and HFU given `executed` (FLOPs per
    example with the rematerialised forward work)."""
    if "ms" not in run:
        return run
    seconds = run["ms"] / 1e3
    run = {**run, "tokens_per_s": run["batch"] * tokens / seconds}
    if flops:
        run["tflops_per_s"] = flops * run["batch"] / seconds / 1e12
        if peak_tflops:
            run["mfu"] = run["tflops_per_s"] / peak_tflops
    if executed and peak_tflops:
        run["hfu"] = executed * run["batch"] / seconds / 1e12 / peak_tflops
    return run


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
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
    parser.add_argument(
        "--residual-dtype",
        default="float32",
        help="the residual stream's (the model's default float32, as the original WAN code; none: --dtype, "
        "as diffusers cast to bf16 runs)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--only", choices=("jax", "torch"), default=None, help="one framework (default both)")
    parser.add_argument("--no-torch", action="store_true", help="the same as --only jax")
    parser.add_argument("--torch-timeout", type=float, default=300.0, help="seconds for diffusers' sweep")
    parser.add_argument("--json", default=None, help="also write the results here (after every batch)")
    args = parser.parse_args(argv)
    only = "jax" if args.no_torch else args.only
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax starts its backends
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

    from genmask_jax.models.dit import DiTConfig

    shape = (args.frames, args.height, args.width, args.text_len)
    batches = [int(b) for b in args.batches.split(",")]
    residual_dtype = None if args.residual_dtype.lower() == "none" else args.residual_dtype
    results = {"variant": args.variant, "dtype": args.dtype, "residual_dtype": residual_dtype,
               "frames": args.frames, "latent": [args.height, args.width], "text_len": args.text_len,
               "remat": args.remat, "scan_layers": not args.unrolled,
               "tokens_definition": "video tokens per example (text excluded)"}

    def save():
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    def config_for(attention):
        return DiTConfig.from_variant(args.variant, dtype=args.dtype, param_dtype=args.dtype,
                                      residual_dtype=residual_dtype, attention=attention,
                                      remat_policy=args.remat, scan_layers=not args.unrolled)

    if only == "torch":  # the child: no jax backend is started here
        import torch

        results["torch"] = []
        results["torch_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        save()
        torch_runs(config_for("xla"), shape, batches, args.reps,
                   lambda run: (results["torch"].append(run), save()))
        return results

    # diffusers first, before this process starts a jax backend (and its CUDA context) on the card.
    child = {}
    if only is None:
        child = torch_in_child(argv, args.torch_timeout, args.json and args.json + ".torch.json")

    import jax

    from genmask_jax.flops import devices_per_chip, peak_bf16_flops

    device = jax.devices()[0]
    attention = args.attention or {"gpu": "cudnn", "tpu": "splash"}.get(device.platform, "xla")
    config = config_for(attention)
    results["tokens"] = tokens = args.frames * args.height * args.width // math.prod(config.patch_size)
    known = peak_bf16_flops(device.device_kind, devices_per_chip(jax.devices()))
    results["device"], results["peak_tflops"] = device.device_kind, args.peak_tflops or (
        known / 1e12 if known else None)
    print(f"{device.device_kind}: {args.variant} DiT, {args.dtype}, {tokens} tokens + {args.text_len} text "
          f"tokens per example, attention {attention}, remat {args.remat}, "
          f"{'unrolled' if args.unrolled else 'scanned'} blocks; peak {results['peak_tflops']} TFLOP/s",
          flush=True)
    save()
    flops = executed = None  # executed: with remat's recomputed forward, for jax's HFU
    try:
        results["flops_per_example"] = flops = step_flops(config, shape)
        print(f"forward+backward: {flops / 1e9:,.1f} GFLOP per example (matmuls, attention included)",
              flush=True)
        executed = step_flops(config, shape, executed=True) if args.remat != "none" else flops
        results["executed_flops_per_example"] = executed
        print(f"  {executed / 1e9:,.1f} GFLOP executed with remat {args.remat} (HFU's)", flush=True)
    except Exception as e:  # noqa: BLE001  (no FLOPs: the times still stand)
        results["flops_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    save()

    def recorder(name, **extra):
        def record(run):
            results[name].append(derive({**run, **extra}, flops, tokens, results["peak_tflops"], executed))
            save()
        return record

    if only is None:
        peak = results["peak_tflops"]
        results["torch"] = [derive(run, flops, tokens, peak) for run in child.get("torch", [])]
        results["torch_device"] = child.get("torch_device")
        if "error" in child:
            results["torch_error"] = child["error"]
        save()

    results["jax"] = []
    for kernel in dict.fromkeys([attention, "xla"]):
        results["jax_attention"] = kernel
        jax_runs(config_for(kernel), shape, batches, args.reps, recorder("jax", attention=kernel))
        first = results["jax"][-1] if results["jax"] else {}
        if "error" not in first or len(results["jax"]) > 1 or first["error"] == "out of memory":
            break  # measured, or only out of memory: another attention would not help

    print("| framework | batch | step | tokens/s | TFLOP/s | MFU | HFU |\n|---|---|---|---|---|---|---|")
    for name in ("jax", "torch"):
        for run in results.get(name, []):
            if "ms" in run:
                mfu, hfu = (f"{run[k]:.1%}" if k in run else "-" for k in ("mfu", "hfu"))
                tflops = f"{run['tflops_per_s']:.1f}" if "tflops_per_s" in run else "-"
                print(f"| {name} | {run['batch']} | {run['ms']:.1f} ms | {run['tokens_per_s']:,.0f} | "
                      f"{tflops} | {mfu} | {hfu} |")
    return results


if __name__ == "__main__":
    main()
