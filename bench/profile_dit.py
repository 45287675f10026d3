"""Where the jitted bench DiT spends its time on CPU, by the part of the model each XLA op computes.

    python -m bench.profile_dit [--step fwd|fwd+bwd] [--steps 5] [--top 15] [--tiny]

Runs `bench.bench_dit`'s model and inputs (or the tiny variant with `--tiny`) under `jax.profiler`, reads
the op durations from the trace, and names each op by the model code that made it (the `op_name` metadata of
the compiled HLO). Prints milliseconds per step for each category, with the category's matmul FLOPs (counted
from the jaxpr by `genmask_jax.flops.flops_by_source`) and their rate, and the slowest ops.

XLA:CPU's thunk executor runs independent ops at once (the q, k and v projections, for one), each on fewer
threads, so the durations add up to more than the step's wall time. Read a category against its FLOPs at
the machine's GEMM rate, not as a share of the step.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import numpy as np

from bench.timing import median_ms

# (pattern on the op's source, category); the first match wins. Ops that are neither YNNPACK fusions nor
# dots (XLA's loop fusions and copies) go to "element-wise and copies" whatever their source.
CATEGORIES = (
    (r"ffn/proj_(in|out)", "feed-forward dots"),
    (r"attn1/to_", "self-attention projections"),
    (r"attn2/to_(q|out)", "cross-attention q and out projections"),
    (r"attn2/to_(k|v)", "cross-attention k and v projections (text)"),
    (r"attn1/(?!norm_)", "self-attention cores (QK^T, softmax, PV)"),
    (r"attn2/(?!norm_)", "cross-attention cores"),
    (r"condition_embedder|patch_embedding|/proj_out", "embedders and head"),
)
ELEMENTWISE = "element-wise and copies"


def op_sources(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the `op_name` metadata (the jaxpr path of the code that made it)."""
    sources = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
        if match:
            sources[match.group(1)] = match.group(2)
    return sources


def matmul_category(source: str) -> str:
    """The category of a matmul made by `source` (a name stack), "backward: ..." for the gradient's."""
    label = next((label for pattern, label in CATEGORIES if re.search(pattern, source)),
                 "other YNNPACK fusions (reductions)")
    return f"backward: {label}" if "transpose(jvp(" in source else label


def category(name: str, source: str) -> str:
    """The category of op `name` (an HLO instruction) made by `source`."""
    if re.match(r"(ynn_fusion|dot|convolution)", name):  # YNNPACK fusions and Eigen dots
        return matmul_category(source)
    return f"backward: {ELEMENTWISE}" if "transpose(jvp(" in source else ELEMENTWISE


def traced_op_ms(fn, steps: int) -> dict[str, float]:
    """Milliseconds per step of every complete ("X") event in a `jax.profiler` trace of `steps` calls."""
    import jax

    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir)
        for _ in range(steps):
            fn()
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and "dur" in event:
            totals[event["name"]] += event["dur"] / 1e3 / steps
    return dict(totals)


def build(tiny: bool, step: str):
    """The jitted step, its arguments, the compiled HLO text and the matmul FLOPs by name stack."""
    import jax
    import jax.numpy as jnp

    from bench.bench_dit import CONFIG, make_inputs
    from genmask_jax.flops import flops_by_source
    from genmask_jax.models.dit import DiTConfig, WanDiT, init_params

    if tiny:
        config = DiTConfig.from_variant("tiny", attention="xla")
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 2, 8, 8, config.in_channels)).astype(np.float32)
        ctx = rng.standard_normal((2, 16, config.text_dim)).astype(np.float32)
        t = np.array([900.0, 150.0], np.float32)
    else:
        config = DiTConfig(**CONFIG, attention="xla")
        x, t, ctx = make_inputs()
    params = init_params(config, jax.random.key(0))
    model = WanDiT(config)
    if step == "fwd":
        fn = jax.jit(lambda p, *inputs: model.apply({"params": p}, *inputs))
    else:
        loss = lambda p, *inputs: jnp.mean(model.apply({"params": p}, *inputs) ** 2)
        fn = jax.jit(jax.value_and_grad(loss))
    args = (params, x, t, ctx)
    return fn, args, fn.lower(*args).compile().as_text(), flops_by_source(jax.make_jaxpr(fn)(*args))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", choices=("fwd", "fwd+bwd"), default="fwd")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--tiny", action="store_true", help="the tiny DiT variant (a smoke test)")
    args = parser.parse_args(argv)

    from genmask_jax.parallel.host import reuse_freed_memory

    reuse_freed_memory()  # as bench_dit and the CPU entry points do
    import jax

    fn, fn_args, hlo, flops = build(args.tiny, args.step)
    run = lambda: jax.block_until_ready(fn(*fn_args))
    wall_ms = median_ms(run, args.steps)
    sources = op_sources(hlo)
    op_ms = {name: ms for name, ms in traced_op_ms(run, args.steps).items() if name in sources}
    by_category, gflop = collections.Counter(), collections.Counter()
    for name, ms in op_ms.items():
        by_category[category(name, sources[name])] += ms
    for source, count in flops.items():
        gflop[matmul_category(source)] += count / 1e9
    print(f"{args.step}: {wall_ms:.1f} ms wall per step (median of {args.steps}, untraced); "
          f"op durations under the trace add up to {sum(op_ms.values()):.1f} ms per step")
    print("| category | ms per step | matmul GFLOP | GFLOP/s |\n|---|---|---|---|")
    for label, ms in by_category.most_common():
        rate = f"{gflop[label] / ms * 1e3:.0f}" if gflop[label] else "-"
        print(f"| {label} | {ms:.2f} | {gflop[label]:.3f} | {rate} |")
    print(f"| all | {sum(op_ms.values()):.2f} | {sum(gflop.values()):.3f} | |")
    print("\n| op | ms per step | source |\n|---|---|---|")
    for name, ms in sorted(op_ms.items(), key=lambda item: -item[1])[:args.top]:
        print(f"| {name} | {ms:.2f} | {sources[name].removeprefix('jit(<lambda>)/')} |")
    return {"wall_ms": wall_ms, "categories": dict(by_category), "gflop": dict(gflop),
            "ops": op_ms}


if __name__ == "__main__":
    main()
