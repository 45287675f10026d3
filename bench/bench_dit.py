"""WanDiT (jax.jit) vs diffusers WanTransformer3DModel (eager PyTorch) on CPU, fp32.

    python -m bench.bench_dit [--reps 5] [--only jax|torch] [--attention xla] [--remat none]
        [--xla-flags "--xla_cpu_..."] [--single-thread] [--devices N] [--default-malloc]

Mid-size config: 4 blocks, dim 512, 8 heads, ffn 2048, text_dim 4096; batch 2 of 2 latent frames of
32x32 (2 x 16 x 16 = 512 tokens), 64 text tokens. Forward, and forward+backward of `mean(out^2)`
with respect to all parameters. Prints the median over --reps rounds after one warm-up (compile); each round
runs every measured function once, JAX and PyTorch in turn, so drift in the machine's speed hits both.

`--devices N` runs JAX on N single-threaded CPU devices (one per core) with the batch split over a
`data` mesh axis and the parameters replicated: data parallelism across cores instead of
multi-threaded ops on one device. PyTorch keeps its default intra-op threads.

The process first calls `parallel.host.reuse_freed_memory` (as the CPU command-line entry points do),
so that glibc keeps XLA:CPU's per-step temporary block instead of unmapping it and faulting it in
again every step; both frameworks share the process and its allocator. `--default-malloc` skips it.
"""

import argparse
import os
import statistics
import time

import numpy as np

CONFIG = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, dim=512, ffn_dim=2048,
              freq_dim=256, text_dim=4096, num_heads=8, num_layers=4)
BATCH, FRAMES, HEIGHT, WIDTH, TEXT_LEN = 2, 2, 32, 32, 64


def make_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, FRAMES, HEIGHT, WIDTH, CONFIG["in_channels"])).astype(np.float32)
    ctx = rng.standard_normal((BATCH, TEXT_LEN, CONFIG["text_dim"])).astype(np.float32)
    t = np.array([900.0, 150.0], np.float32)
    return x, t, ctx


def timed(fns: dict, reps: int) -> dict[str, tuple[float, float]]:
    """Medians (wall ms, process CPU ms) of each `fns[name]()` over `reps` rounds after one warm-up.

    The functions take turns within each round, so a machine whose speed drifts between runs (a VM)
    slows every side alike. CPU time is reported because on a shared machine wall time mostly
    measures the other tenants.
    """
    for fn in fns.values():
        fn()
    wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            time.sleep(0.2)  # lets the other framework's worker threads stop spinning before the clock starts
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append((time.perf_counter() - start) * 1e3)
            cpu[name].append((time.process_time() - start_cpu) * 1e3)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def bench_jax(attention: str, remat: str, devices: int) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from genmask_jax.models.dit import DiTConfig, WanDiT, init_params
    from genmask_jax.parallel.mesh import make_mesh

    config = DiTConfig(**CONFIG, attention=attention, remat_policy=remat)
    mesh = make_mesh((devices, 1, 1))
    replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    params = jax.device_put(init_params(config, jax.random.key(0)), replicated)
    x, t, ctx = (jax.device_put(a, split) for a in make_inputs())
    model = WanDiT(config)
    forward = jax.jit(lambda p, *inputs: model.apply({"params": p}, *inputs))
    loss = lambda p, *inputs: jnp.mean(model.apply({"params": p}, *inputs) ** 2)
    forward_backward = jax.jit(jax.value_and_grad(loss))
    return {"fwd": lambda: jax.block_until_ready(forward(params, x, t, ctx)),
            "fwd+bwd": lambda: jax.block_until_ready(forward_backward(params, x, t, ctx))}


def bench_torch() -> dict:
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    kwargs = dict(CONFIG)
    kwargs["num_attention_heads"] = kwargs.pop("num_heads")
    kwargs["attention_head_dim"] = kwargs.pop("dim") // kwargs["num_attention_heads"]
    model = WanTransformer3DModel(**kwargs).eval()
    x, t, ctx = make_inputs()
    x = torch.from_numpy(np.moveaxis(x, -1, 1)).contiguous()
    t, ctx = torch.from_numpy(t), torch.from_numpy(ctx)

    def forward():
        with torch.no_grad():
            model(x, t, ctx)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        (model(x, t, ctx).sample ** 2).mean().backward()

    return {"fwd": forward, "fwd+bwd": forward_backward}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", choices=["jax", "torch"], default=None)
    parser.add_argument("--attention", default="xla")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax starts")
    parser.add_argument("--single-thread", action="store_true",
                        help="one intra-op thread in both frameworks (run under `taskset -c 0`)")
    parser.add_argument("--devices", type=int, default=1,
                        help="JAX on this many single-threaded CPU devices, batch split over them")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default allocator settings (see above)")
    args = parser.parse_args()
    if not args.default_malloc:
        from genmask_jax.parallel import host

        host.reuse_freed_memory()
    if BATCH % args.devices:
        parser.error(f"--devices must divide the batch ({BATCH})")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = args.xla_flags
    if args.devices > 1:
        from genmask_jax.parallel.mesh import cpu_device_flags  # imports jax; backends start later

        flags += " " + cpu_device_flags(BATCH, BATCH, args.devices)
    if args.single_thread:
        flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        import torch

        torch.set_num_threads(1)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    fns = {}
    if args.only != "torch":
        fns.update({("jax", k): fn for k, fn in bench_jax(args.attention, args.remat, args.devices).items()})
    if args.only != "jax":
        fns.update({("torch", k): fn for k, fn in bench_torch().items()})
    results = {}
    for (name, kind), times in timed(fns, args.reps).items():
        results.setdefault(name, {})[kind] = times
    malloc = "glibc defaults" if args.default_malloc else "freed memory reused"
    print(f"load average {os.getloadavg()[0]:.1f}; {malloc}; "
          f"wall / process-CPU medians over {args.reps} runs")
    for name, times in results.items():
        print(f"{name:6s} " + "  ".join(f"{k} {w:7.1f} ms / {c:7.1f} cpu-ms" for k, (w, c) in times.items()))
    if len(results) == 2:
        jax_t, torch_t = results["jax"], results["torch"]
        print("ratio  " + "  ".join(f"{k} {jax_t[k][0] / torch_t[k][0]:.2f}x wall / "
                                    f"{jax_t[k][1] / torch_t[k][1]:.2f}x cpu" for k in jax_t))


if __name__ == "__main__":
    main()
