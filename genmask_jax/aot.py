r"""Ahead-of-time compilation of the GenMask train and evaluation steps for a named TPU slice, without a TPU.

    python -m genmask_jax.aot --config=configs/genmask.py:variant=paper --topology=v5e:8x8 \
        --config.microbatches=4
    python -m genmask_jax.aot --config=configs/genmask.py:variant=paper --topology=v5p:2x4x4 \
        --config.mesh.shape="(1,8,4)" --remat=dots_with_no_batch_dims_saveable --skip_eval
    python -m genmask_jax.aot --config=configs/genmask.py:variant=paper --topology=v5e:16x16 --sweep \
        --meshes=1x256x1,1x64x4 --remat=nothing_saveable --microbatches=1,2

libtpu (`requirements-tpu.txt`) compiles for `--topology` on any machine. Every input is abstract
(`jax.ShapeDtypeStruct` with its sharding; the state comes from `jax.eval_shape`), so no weight or batch is
ever allocated. The train step is the one `train` runs (`train.step.make_configured_train_step`: both task
sub-batches, the frozen VAE encode, the config's optimizer) on the whole slice. The evaluation step is the one
`genmask_jax.evaluate` runs (`eval.job.run`): every process predicts its own examples on its own host's
devices, so it is `Segmenter.predict`'s jitted `predict_scores` (VAE encode, one DiT call, VAE decode) on
`infer.checkpoint.inference_mesh` over one host of the slice's chip, with the job's per-process batch
(`--eval_batch_size`, as evaluate's `--batch_size`). Both compile the config's model as it is, scanned
layers or not (`--config.model.dit.scan_layers=True` compiles one block instead of all of them, which
is quicker, but not the program an unscanned config trains with). Prints per device the compiler's
memory figures against the chip's HBM, the FLOPs per step (counted from the step's jaxpr, see
`count_flops`), the FLOP-bound step time and the MFU it implies; exits 1 when a step does not fit, 2 when
libtpu is missing or the config is one `train` refuses (one line). TPU v4 is compiled for in megacore
mode, as a v4 slice runs: one device per chip. A compile of the real 1.3B step for a 64-256 chip slice
costs 5-8 CPU-minutes (a refusal for lack of HBM comes sooner), so `--sweep` takes a few chosen points,
not a grid.
"""

import copy
import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

# Before jax is imported: compile on the host CPU client (there is no TPU here), and let several processes
# (tests, other jobs) load libtpu at once instead of failing on its lockfile.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from genmask_jax.eval.job import process_batch_size  # noqa: E402
from genmask_jax.flops import (  # noqa: E402,F401  (count_flops re-exported: aot.count_flops)
    CHIP_ALIASES,
    CHIPS,
    Chip,
    GiB,
    count_flops,
    devices_per_chip,
    train_step_model_flops,
)
from genmask_jax.infer.checkpoint import LoadedModel, inference_mesh  # noqa: E402
from genmask_jax.infer.cli import InputError  # noqa: E402
from genmask_jax.infer.segmenter import Segmenter  # noqa: E402
from genmask_jax.models import build  # noqa: E402
from genmask_jax.models.genmask import GenMask  # noqa: E402
from genmask_jax.parallel.data_groups import data_loading_groups  # noqa: E402
from genmask_jax.parallel.mesh import config_mesh  # noqa: E402
from genmask_jax.parallel.sharding import logical_sharding, rules_from_config  # noqa: E402
from genmask_jax.train import loop  # noqa: E402
from genmask_jax.train.state import TrainState, make_optimizer, train_state_shapes  # noqa: E402
from genmask_jax.train.step import (  # noqa: E402
    batch_sharding,
    check_microbatch_split,
    make_configured_train_step,
    optimizer_config,
)

SWEEP_REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable", "none")


class LibtpuMissing(RuntimeError):
    """libtpu is not installed or cannot describe the topology."""


def chip_of(topology: str) -> Chip:
    """`"v5e:8x8"` -> the v5e chip figures."""
    kind = re.split(r"[:=_]", topology, maxsplit=1)[0].lower()
    kind = CHIP_ALIASES.get(kind, kind)
    if kind not in CHIPS:
        raise ValueError(f"unknown TPU generation in {topology!r}; known: {sorted(CHIPS)}")
    return CHIPS[kind]


def libtpu_problem() -> str | None:
    """One line saying why topologies cannot be compiled for here, or None."""
    if importlib.util.find_spec("libtpu") is None:
        return (
            "libtpu is not installed (pip install -r requirements-tpu.txt); cannot compile for a TPU topology"
        )
    return None


def topology_devices(topology: str) -> list:
    """The devices of a TPU slice, e.g. `"v5e:8x8"` (64 chips) or `"v5p:2x4x4"` (32 chips)."""
    problem = libtpu_problem()
    if problem:
        raise LibtpuMissing(problem)
    from jax.experimental import topologies

    bounds = _single_host_bounds(topology)
    options = {"chips_per_host_bounds": bounds} if bounds else {}
    if _is_v4(topology):
        # libtpu describes v4 as one device per TensorCore unless asked for megacore, the mode a v4 slice
        # runs in (one device per chip), and jax.make_mesh refuses the per-core layout.
        options["chip_config_name"] = "megacore"
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **options).devices)
    except Exception as e:  # libtpu reports bad names and load failures as runtime errors.
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LibtpuMissing(f"libtpu cannot describe topology {topology!r}: {message}") from e


def _is_v4(topology: str) -> bool:
    try:
        return chip_of(topology) == CHIPS["v4"]
    except ValueError:
        return False


def _single_host_bounds(topology: str) -> list[int] | None:
    """The host bounds of a v5e or v6e slice of one host that libtpu's default bounds (2x2 chips a host,
    for every slice of these chips) do not describe: 2x4 (v5litepod-8, v6e-8; else two hosts of 2x2) and
    1x1 (v5litepod-1, v6e-1; else not divisible). None for any other topology."""
    try:
        chip = chip_of(topology)
    except ValueError:
        return None
    shape = re.split(r"[:=_]", topology, maxsplit=1)[-1]
    if chip not in (CHIPS["v5e"], CHIPS["v6e"]):
        return None
    return {"2x4": [2, 4, 1], "1x1": [1, 1, 1]}.get(shape)


class UnknownHost(ValueError):
    """No single-host topology of the slice's chip can be named for its per-process programs."""


def host_topology(topology: str, devices: Sequence) -> str:
    """The topology of one host of the slice `topology` (`devices`), whose devices a per-process program
    (evaluation) runs on: the slice itself if it has one process, else the chips process 0 holds as a
    topology of their own (`"v5e:4x4"` -> `"v5e:2x2"`, `"v5p:2x4x4"` -> `"v5p:2x2x1"`). Compiling on those
    devices of the multi-host topology itself aborts inside libtpu. Raises UnknownHost when the name
    cannot be formed or libtpu's topology of that name is not one host with the same devices.
    """
    if len({d.process_index for d in devices}) == 1:
        return topology
    match = re.fullmatch(r"(.+?[:=_])(\d+(?:x\d+)*)", topology)
    local = [d for d in devices if d.process_index == 0]
    coords = np.array([d.coords for d in local])
    bounds = [int(b) for b in coords.max(0) - coords.min(0) + 1]
    ndim = len(match.group(2).split("x")) if match else 0
    if not match or any(b != 1 for b in bounds[ndim:]):
        raise UnknownHost(
            f"the single-host topology of {topology!r} is unknown (process 0 holds chips "
            f"{'x'.join(map(str, bounds))})"
        )
    name = match.group(1) + "x".join(map(str, bounds[:ndim]))
    try:
        host = topology_devices(name)
    except LibtpuMissing as e:
        raise UnknownHost(f"the single-host topology of {topology!r} is unknown: {e}") from e
    if len({d.process_index for d in host}) != 1 or len(host) != len(local):
        raise UnknownHost(
            f"the single-host topology of {topology!r} is unknown: libtpu's {name!r} is "
            f"{len(host)} devices over {len({d.process_index for d in host})} processes, a "
            f"host of {topology!r} has {len(local)} devices"
        )
    return name


# Abstract inputs.


def with_overrides(
    config: ml_collections.ConfigDict,
    mesh_shape=None,
    remat: str | None = None,
    microbatches: int | None = None,
) -> ml_collections.ConfigDict:
    """A copy of `config` with another mesh shape, DiT remat policy or microbatch count (None: the
    config's)."""
    config = copy.deepcopy(config)
    with config.unlocked():
        if mesh_shape is not None:
            config.mesh.shape = tuple(mesh_shape)
        if remat is not None:
            config.model.dit.remat_policy = remat
        if microbatches is not None:
            config.microbatches = int(microbatches)
    return config


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_state(model: GenMask, tx, mesh, rules, use_ema: bool) -> tuple[TrainState, TrainState]:
    """(TrainState of sharded ShapeDtypeStructs, TrainState of NamedShardings); nothing is allocated: the
    state training makes (`train.state.train_state_shapes`, the VAE as `loop.host_frozen` attaches it)."""
    # Outside the TPU mesh: tracing the models' inits for their shapes runs small concrete ops (the dummy
    # inputs), which cannot execute on a topology's devices.
    frozen = loop.abstract_frozen(model)
    return train_state_shapes(loop.abstract_dit(model), tx, mesh, rules, use_ema, frozen)


def abstract_train_batch(config, sharding) -> dict:
    """The global train batch of interfaces.md as sharded ShapeDtypeStructs; empty tasks are left out."""
    h, w = config.data.resolution
    length, dim = config.data.encoder.context_length, config.data.encoder.dim
    batch = {}
    for task in ("seg", "gen"):
        n = int(config.batch[task])
        if n == 0:
            continue
        sub = {
            "image": ((n, h, w, 3), jnp.float32),
            "context": ((n, length, dim), jnp.float32),
            "context_mask": ((n, length), jnp.bool_),
        }
        if task == "seg":
            sub["mask"] = ((n, h, w), jnp.float32)
        batch[task] = {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in sub.items()}
    return batch


def abstract_key(sharding):
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding)


# Compilation.


@dataclasses.dataclass
class Figures:
    """What the compiler says about one step, per device.

    `out_of_memory` holds the compiler's message when it refused the program for the device's HBM; then
    `temp_bytes` is the requirement it names and the other sizes are 0 (it gives no analysis).
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    xla_flops: float  # XLA's cost analysis per device; it counts a loop body once, whatever its trip count
    compile_s: float
    out_of_memory: str | None = None
    flops: float = 0.0  # per step on the whole slice, counted from the step's jaxpr (see `count_flops`)
    state_bytes: int = 0  # params + optimizer state (+ EMA), summed over the whole slice
    state_bytes_per_device: int = 0  # the same, as laid out by the shardings on one device

    @property
    def total_bytes(self) -> int:
        """Peak HBM of the step: live arguments + outputs not aliased to (donated) arguments + scratch."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def figures_of(compiled, compile_s: float) -> Figures:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return Figures(
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        xla_flops=float(cost.get("flops", 0.0)),
        compile_s=compile_s,
    )


_SIZE = re.compile(r"\(([0-9.]+)([KMGT]?)\)")
_SCALE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def out_of_memory_figures(message: str, compile_s: float) -> Figures:
    """Figures from the TPU compiler's RESOURCE_EXHAUSTED message, e.g. "... the total memory required for
    HLO temporaries (22.53G) exceeds available HBM (15.75G)": the first size is the requirement."""
    line = next((x for x in message.splitlines() if "RESOURCE_EXHAUSTED" in x), message.splitlines()[0])
    sizes = [float(v) * _SCALE[u] for v, u in _SIZE.findall(line)]
    required = int(sizes[0]) if sizes else 0
    return Figures(0, 0, 0, required, 0, 0.0, compile_s, out_of_memory=line.strip())


def _is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text and ("HBM" in text or "memory" in text)


def _nbytes(x) -> int:
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def _device_nbytes(x) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize


def state_bytes(state: TrainState) -> tuple[int, int]:
    """(bytes of params + optimizer state + EMA on the whole slice, bytes of it on one device)."""
    leaves = jax.tree.leaves((state.params, state.opt_state, state.ema_params))
    return sum(map(_nbytes, leaves)), sum(map(_device_nbytes, leaves))


@dataclasses.dataclass
class Program:
    """A jitted step with its mesh, logical rules and abstract arguments, ready to trace or compile."""

    jitted: Any
    mesh: jax.sharding.Mesh
    rules: Any
    args: tuple
    state: TrainState | None = None

    def trace(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted.trace(*self.args)


def train_step_program(config, devices) -> Program:
    """The train step exactly as `train.loop.train` builds it, on abstract state and batch.

    Raises InputError (one line) for a config `train` refuses: loop fields, a mesh shape the devices do not
    take, a layout host data cannot feed, a batch the microbatches and the mesh do not split, a model
    config error, heads splash attention cannot split.
    """
    loop.check_loop_fields(config)
    try:
        mesh = config_mesh(config, devices)
    except ValueError as e:
        raise InputError(f"config.mesh.shape: {e}") from None
    rules = rules_from_config(config.sharding.logical_axis_rules)
    try:
        data_loading_groups(mesh, rules)  # as `train` does
    except ValueError as e:
        raise InputError(str(e)) from None
    loop.check_batch_split(config, mesh, rules)
    try:
        model = loop.build_model(config)
    except ValueError as e:
        raise InputError(f"config.model: {e}") from None
    loop.check_heads_split(model.dit, mesh, rules)  # as `train` does: splash cannot split them unevenly
    tx = make_optimizer(optimizer_config(config))
    state, shardings = abstract_state(model, tx, mesh, rules, use_ema=config.ema_decay > 0)
    step_fn = make_configured_train_step(config, model, tx, shardings, mesh, rules)
    batch = abstract_train_batch(config, batch_sharding(mesh, rules))
    key = abstract_key(NamedSharding(mesh, PartitionSpec()))
    return Program(step_fn.jitted, mesh, rules, (state, batch, key), state)


def eval_step_program(config, host_devices, batch_size: int = 0) -> Program:
    """The evaluation step of one process of `genmask_jax.evaluate` (`eval.job.run`) on one host's
    devices: `Segmenter.predict`'s jitted `predict_scores` with the DiT and VAE parameters laid out as
    `infer.checkpoint.load` restores them, on a batch of `eval.job.process_batch_size` (`batch_size`
    as evaluate's `--batch_size`, 0 = the job's default).
    """
    mesh = inference_mesh(config, host_devices)
    rules = rules_from_config(config.sharding.logical_axis_rules)
    model = build.build_model(config)
    if model.vae is None:
        raise InputError("config has no VAE (model.vae): genmask_jax.evaluate refuses it")
    init, rng = build.dit_initializer(model), jax.random.key(0)  # concrete ops: not under the TPU mesh
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed_dit = jax.eval_shape(init, rng)
    boxed_vae = build.abstract_frozen(model)["vae"]
    dit_params = _abstract(nn.meta.unbox(boxed_dit), logical_sharding(boxed_dit, mesh, rules))
    vae_params = _abstract(nn.meta.unbox(boxed_vae), logical_sharding(boxed_vae, mesh, rules))
    loaded = LoadedModel(config, model, dit_params, vae_params, mesh, rules, step=0, directory=None)
    segmenter = Segmenter(loaded)  # evaluate's default --steps=1
    n, (h, w) = process_batch_size(segmenter.batch_multiple, batch_size), config.data.resolution
    length, dim = config.data.encoder.context_length, config.data.encoder.dim
    data = segmenter.sharding
    batch = (
        jax.ShapeDtypeStruct((n, h, w, 3), jnp.float32, sharding=data),
        jax.ShapeDtypeStruct((n, length, dim), jnp.float32, sharding=data),
        jax.ShapeDtypeStruct((n, length), jnp.bool_, sharding=data),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=data),
    )
    key = abstract_key(NamedSharding(mesh, PartitionSpec()))
    # The jitted function `predict` calls, static arguments and all, not a copy of it.
    return Program(segmenter._fn, mesh, rules, (dit_params, vae_params, *batch, key))


def compile_program(program: Program) -> Figures:
    """Traces (for the FLOP count), lowers and compiles; an out-of-HBM refusal becomes Figures too."""
    tick = time.perf_counter()
    traced = program.trace()
    flops = count_flops(traced.jaxpr)
    try:
        with jax.set_mesh(program.mesh), nn.logical_axis_rules(program.rules):
            compiled = traced.lower().compile()
    except jax.errors.JaxRuntimeError as e:
        if not _is_out_of_memory(e):
            raise
        figures = out_of_memory_figures(str(e), time.perf_counter() - tick)
    else:
        figures = figures_of(compiled, time.perf_counter() - tick)
    figures.flops = flops
    if program.state is not None:
        figures.state_bytes, figures.state_bytes_per_device = state_bytes(program.state)
    return figures


# Useful work, for the MFU bound.


def model_flops_per_step(config) -> float:
    """DiT training FLOPs per step of the config's global batch (`flops.train_step_model_flops`)."""
    return train_step_model_flops(loop.build_model(config), abstract_train_batch(config, None))


# Reports.


@dataclasses.dataclass
class EvalHost:
    """Where one process of `genmask_jax.evaluate` runs its evaluation step: one host of the slice."""

    topology: str  # the single-host topology of the slice's chip (`host_topology`)
    num_devices: int
    mesh_shape: tuple[int, ...]  # (data, fsdp, tensor), `inference_mesh`
    batch_size: int  # per process, `eval.job.process_batch_size`


@dataclasses.dataclass
class Analysis:
    topology: str
    mesh_shape: tuple[int, ...]
    remat: str
    microbatches: int
    chip: Chip
    num_devices: int
    devices_per_chip: int
    train: Figures
    eval: Figures | None
    model_flops: float
    scan_layers: bool = True
    eval_host: EvalHost | None = None
    eval_skipped: str | None = None  # why the evaluation step was not compiled, though asked for

    @property
    def capacity_bytes(self) -> int:
        return self.chip.hbm_bytes // self.devices_per_chip

    @property
    def peak_flops(self) -> float:
        return self.chip.peak_bf16_flops / self.devices_per_chip

    @property
    def fits(self) -> bool:
        steps = [self.train] + ([self.eval] if self.eval is not None else [])
        return all(f.out_of_memory is None and f.total_bytes <= self.capacity_bytes for f in steps)

    @property
    def step_time_s(self) -> float:
        """FLOP-bound train step time: the step's FLOPs spread evenly over the devices at peak bf16 rate."""
        return self.train.flops / (self.num_devices * self.peak_flops) if self.train.flops else math.inf

    @property
    def mfu(self) -> float:
        """MFU if the step ran at the FLOP bound: useful DiT FLOPs / (devices x peak x step time), i.e. the
        share of executed FLOPs that are the DiT's forward + backward (the rest: VAE encode, remat)."""
        return self.model_flops / self.train.flops if self.train.flops else 0.0


def analyse(config, topology: str, with_eval: bool = True, eval_batch_size: int = 0) -> Analysis:
    """The train step on the slice `topology` and, `with_eval`, the evaluation step on one of its hosts
    (`eval_batch_size` per process, 0 = evaluate's default)."""
    devices = topology_devices(topology)
    train = compile_program(train_step_program(config, devices))
    evaluation = host = skipped = None
    if with_eval:
        try:
            host_name = host_topology(topology, devices)
        except UnknownHost as e:
            skipped = str(e)
        else:
            host_devices = devices if host_name == topology else topology_devices(host_name)
            program = eval_step_program(config, host_devices, eval_batch_size)
            evaluation = compile_program(program)
            host = EvalHost(
                host_name, len(host_devices), tuple(program.mesh.devices.shape), int(program.args[2].shape[0])
            )
    return Analysis(
        topology=topology,
        mesh_shape=tuple(config_mesh(config, devices).devices.shape),
        remat=config.model.dit.remat_policy,
        microbatches=int(config.microbatches),
        chip=chip_of(topology),
        num_devices=len(devices),
        devices_per_chip=devices_per_chip(devices),
        train=train,
        eval=evaluation,
        model_flops=model_flops_per_step(config),
        scan_layers=bool(config.model.dit.scan_layers),
        eval_host=host,
        eval_skipped=skipped,
    )


def _gib(n: float) -> str:
    return f"{n / GiB:8.3f} GiB"


def _figure_lines(name: str, f: Figures, a: Analysis, unit: str, num_devices: int) -> list[str]:
    flops = (
        f"  FLOPs per step {f.flops:.4g} ({f.flops / num_devices:.4g} per {unit}; XLA cost analysis, "
        f"loop bodies once: {f.xla_flops:.4g} per {unit})"
    )
    if f.out_of_memory is not None:
        return [
            f"{name} (compiled in {f.compile_s:.1f} s): the compiler ran out of HBM: {f.out_of_memory}",
            flops,
        ]
    lines = [
        f"{name} (compiled in {f.compile_s:.1f} s), per {unit}:",
        f"  arguments      {_gib(f.argument_bytes)}",
        f"  outputs        {_gib(f.output_bytes)}  (aliased to donated arguments: {_gib(f.alias_bytes)})",
        f"  temporaries    {_gib(f.temp_bytes)}",
        f"  generated code {_gib(f.code_bytes)}",
        f"  total          {_gib(f.total_bytes)} of {_gib(a.capacity_bytes)} "
        f"({100 * f.total_bytes / a.capacity_bytes:.0f}%)",
        flops,
    ]
    if f.state_bytes:
        ratio = f.state_bytes / max(f.state_bytes_per_device, 1)
        lines.append(
            f"  params + optimizer state: {_gib(f.state_bytes)} on the slice, "
            f"{_gib(f.state_bytes_per_device)} per {unit} (= total / {ratio:.1f})"
        )
    return lines


def format_report(a: Analysis) -> str:
    unit = "TensorCore" if a.devices_per_chip > 1 else "chip"
    lines = [
        f"topology {a.topology}: {a.num_devices} x {a.chip.name} {unit}s, mesh (data, fsdp, tensor) = "
        f"{a.mesh_shape}, remat {a.remat}, microbatches {a.microbatches}, DiT layers "
        f"{'scanned' if a.scan_layers else 'unrolled'} (model.dit.scan_layers={a.scan_layers})",
        f"per {unit}: HBM {_gib(a.capacity_bytes)}, peak {a.peak_flops / 1e12:.1f} TFLOP/s bf16",
    ]
    lines += _figure_lines("train step", a.train, a, unit, a.num_devices)
    if a.eval is not None:
        h = a.eval_host
        name = (
            f"eval (evaluate.py, one host {h.topology}: {h.num_devices} {unit}s, mesh {h.mesh_shape}, "
            f"batch {h.batch_size})"
        )
        lines += _figure_lines(name, a.eval, a, unit, h.num_devices)
    if a.eval_skipped is not None:
        lines.append(f"eval (evaluate.py): not compiled: {a.eval_skipped}")
    if a.train.flops:
        lines.append(
            f"train step bound: {a.step_time_s * 1e3:.1f} ms at peak bf16 FLOP/s; useful DiT FLOPs "
            f"{a.model_flops:.4g} per step -> MFU <= {100 * a.mfu:.1f}%"
        )
    verdict = "fits" if a.fits else "does not fit"
    lines.append(f"verdict: {verdict}" + (" (train step only)" if a.eval_skipped is not None else ""))
    return "\n".join(lines)


def sweep_meshes(num_devices: int, config) -> list[tuple[int, int, int]]:
    """A few (data, fsdp, tensor) splits worth comparing: pure FSDP, FSDP x 2/4-way tensor, and
    2-way data x FSDP; only those whose batch axes divide every sub-batch."""
    candidates = [
        (1, num_devices, 1),
        (1, num_devices // 2, 2),
        (1, num_devices // 4, 4),
        (2, num_devices // 2, 1),
    ]
    points = []
    for shape in candidates:
        if math.prod(shape) == num_devices and min(shape) >= 1 and shape not in points:
            if _microbatches_ok(config, shape, 1):
                points.append(shape)
    return points


def _microbatches_ok(config, shape: Sequence[int], k: int) -> bool:
    """Whether the train step takes k microbatches on mesh `shape` (`step.check_microbatch_split`, the
    batch split over the data and fsdp axes as the default rules do)."""
    sizes = {t: int(config.batch[t]) for t in ("seg", "gen") if int(config.batch[t])}
    try:
        check_microbatch_split(sizes, k, shape[0] * shape[1])
    except ValueError:
        return False
    return True


def sweep(
    config,
    topology: str,
    meshes: Sequence[Sequence[int]] | None = None,
    remats: Sequence[str] = SWEEP_REMAT_POLICIES[:3],
    microbatches: Sequence[int] = (1, 2, 4, 8),
    log=print,
) -> list[Analysis]:
    """Train-step analyses over mesh splits x remat policies, each at the fewest microbatches (gradient
    accumulation) of `microbatches` that fits; fitting points first, fastest FLOP bound first, then
    fewest microbatches."""
    devices = topology_devices(topology)
    meshes = [tuple(m) for m in meshes] if meshes else sweep_meshes(len(devices), config)
    results = []
    for shape in meshes:
        for remat in remats:
            a = None
            for k in sorted(microbatches):
                if not _microbatches_ok(config, shape, k):
                    continue
                point = with_overrides(config, shape, remat, k)
                try:
                    a = analyse(point, topology, with_eval=False)
                except ValueError as e:  # a width the split does not divide: a log line, not a crash.
                    log(f"  mesh {shape} remat {remat} microbatches {k}: skipped: {str(e).splitlines()[0]}")
                    break
                state = "fits" if a.fits else "does not fit"
                log(
                    f"  mesh {a.mesh_shape} remat {remat} microbatches {k}: {state}, "
                    f"{a.train.total_bytes / GiB:.2f} GiB, {a.step_time_s * 1e3:.1f} ms bound "
                    f"({a.train.compile_s:.0f} s compile)"
                )
                if a.fits:
                    break
            if a is not None:
                results.append(a)
    # Equal FLOP bounds: fewer microbatches first (each adds a pass over the parameters and a gradient
    # reduction the FLOP bound does not see), then the smaller footprint.
    return sorted(results, key=lambda a: (not a.fits, a.step_time_s, a.microbatches, a.train.total_bytes))


def format_sweep(results: Sequence[Analysis]) -> str:
    header = (
        f"{'rank':>4}  {'mesh (d,f,t)':<14} {'remat':<33} {'mb':>3} {'args GiB':>9} {'temp GiB':>9} "
        f"{'total GiB':>9} {'HBM GiB':>8} {'fits':>5} {'PFLOP/step':>10} {'bound ms':>9} {'MFU<=':>6}"
    )
    rows = [header]
    for i, a in enumerate(results, 1):
        t = a.train
        rows.append(
            f"{i:>4}  {str(a.mesh_shape):<14} {a.remat:<33} {a.microbatches:>3} "
            f"{t.argument_bytes / GiB:>9.3f} "
            f"{t.temp_bytes / GiB:>9.3f} {t.total_bytes / GiB:>9.3f} {a.capacity_bytes / GiB:>8.1f} "
            f"{'yes' if a.fits else 'no':>5} {t.flops / 1e15:>10.2f} "
            f"{a.step_time_s * 1e3:>9.1f} {100 * a.mfu:>5.1f}%"
        )
    return "\n".join(rows)


def _ints(text: str, sep: str = ",") -> list[int]:
    return [int(x) for x in text.split(sep) if x]


def main(argv) -> int:
    from absl import flags

    del argv
    f = flags.FLAGS
    problem = libtpu_problem()
    if problem:
        print(problem)
        return 2
    if not f.sweep and (f.meshes or f["microbatches"].present):
        print("error: --meshes and --microbatches are --sweep's; a single compile takes config.mesh.shape "
              "and config.microbatches (--config.mesh.shape='(1,8,4)' --config.microbatches=2)")
        return 2
    if f.sweep and f.eval_batch_size:
        print("error: --sweep compiles the train step only; --eval_batch_size is for a single compile")
        return 2
    try:
        if f.sweep:
            remats = f.remat.split(",") if f.remat else SWEEP_REMAT_POLICIES[:3]
            meshes = [tuple(_ints(m, "x")) for m in f.meshes.split(",")] if f.meshes else None
            print(f"sweep on {f.topology}:", flush=True)
            results = sweep(
                f.config,
                f.topology,
                meshes,
                remats,
                _ints(f.microbatches),
                log=lambda line: print(line, flush=True),
            )
            print(format_sweep(results))
            return 0 if results and results[0].fits else 1
        print(f"compiling on {f.topology} (minutes for a large model):", flush=True)
        a = analyse(
            with_overrides(f.config, remat=f.remat or None),
            f.topology,
            with_eval=not f.skip_eval,
            eval_batch_size=f.eval_batch_size,
        )
    except LibtpuMissing as e:
        print(e)
        return 2
    except InputError as e:  # a config `train` refuses (train_step_program)
        print(f"error: {e}")
        return 2
    print(format_report(a))
    return 0 if a.fits else 1


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "experiment config, e.g. configs/genmask.py:variant=paper", lock_config=True
    )
    flags.DEFINE_string(
        "topology", "v5e:8x8", "TPU topology libtpu knows, e.g. v5e:16x16, v5p:2x4x4, v6e:8x8"
    )
    flags.DEFINE_bool("sweep", False, "try mesh splits x remat policies and print a ranked table")
    flags.DEFINE_string(
        "remat",
        "",
        "DiT remat policy (a jax.checkpoint_policies name or 'none'); with --sweep a comma-separated list",
    )
    flags.DEFINE_string(
        "meshes", "", "with --sweep: comma-separated data x fsdp x tensor splits, e.g. 1x64x1,1x16x4"
    )
    flags.DEFINE_string(
        "microbatches",
        "1,2,4,8",
        "with --sweep: gradient-accumulation counts to try, the fewest that fits is kept",
    )
    flags.DEFINE_bool("skip_eval", False, "compile only the train step")
    flags.DEFINE_integer(
        "eval_batch_size",
        0,
        "evaluation batch per host, as evaluate's --batch_size (0 = its default: 4 per batch shard)",
    )
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
