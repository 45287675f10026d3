"""FLOPs of the matmuls and convolutions in a jaxpr, the useful (model) FLOPs of a GenMask train step, and
the peak bf16 figures of TPU chips and GPUs, for MFU; needs jax alone (no training stack)."""

import collections
import dataclasses
import math
import re
from collections.abc import Sequence

from jax.extend import core as jax_core

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures from Google Cloud's TPU system-architecture pages."""

    name: str
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bytes_per_s: float


CHIPS = {
    # https://cloud.google.com/tpu/docs/v4: 32 GiB HBM2, 275 TFLOP/s bf16, 1,228 GB/s (2 TensorCores).
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1228e9),
    # https://cloud.google.com/tpu/docs/v5e: 16 GiB HBM2, 197 TFLOP/s bf16, 819 GB/s.
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9),
    # https://cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e, 459 TFLOP/s bf16, 2,765 GB/s.
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9),
    # https://cloud.google.com/tpu/docs/v6e: 32 GiB HBM, 918 TFLOP/s bf16, 1,640 GB/s.
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1640e9),
}
# device_kind as libtpu reports it, lowercased without spaces ("TPU v5 lite" -> "v5lite"); v5p is "TPU v5".
CHIP_ALIASES = {"v5": "v5p", "v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v6lite": "v6e"}

# Dense bf16 peak per GPU (NVIDIA's data sheets list it with 2:4 sparsity, twice these), keyed by the
# words of device_kind (the CUDA device name) that pick the card; the key with most matching words wins.
# H100 (SXM 1,979, PCIe 1,513, NVL 1,671 sparse): https://www.nvidia.com/en-us/data-center/h100/
# H200 (SXM 1,979, NVL 1,671 sparse): https://www.nvidia.com/en-us/data-center/h200/
# GH200 (1,979 sparse): https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/
# A100 (SXM and PCIe 312 dense): https://www.nvidia.com/en-us/data-center/a100/
# L40S (362.05 dense): https://www.nvidia.com/en-us/data-center/l40s/
# L40 (181.05 dense): https://www.nvidia.com/en-us/data-center/l40/
# L4 (242 sparse): https://www.nvidia.com/en-us/data-center/l4/
GPU_PEAK_BF16_FLOPS = {
    "H100": 989.4e12,  # SXM: "NVIDIA H100 80GB HBM3"
    "H100 PCIe": 756e12,
    "H100 NVL": 835.5e12,
    "H200": 989.4e12,  # SXM: "NVIDIA H200"
    "H200 NVL": 835.5e12,
    "GH200": 989.4e12,  # "NVIDIA GH200 480GB"
    "A100": 312e12,  # "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"
    "L40S": 362.05e12,
    "L40": 181.05e12,
    "L4": 121e12,
}


def devices_per_chip(devices: Sequence) -> int:
    """Devices per chip: 1 on TPUs in their default mode (v4 and v5p megacore, v5e, v6e); a chip split
    into its TensorCores (v4's non-megacore mode) shows one device per core (distinct `core_on_chip`)."""
    return len({getattr(d, "core_on_chip", 0) for d in devices})


def peak_bf16_flops(device_kind: str, devices_per_chip: int = 1) -> float | None:
    """Peak bf16 FLOP/s of one device of `device_kind` ("NVIDIA H100 80GB HBM3", "TPU v5 lite"), or None
    (a CPU, an unknown card).

    GPUs: the figure of the table's name whose words all are words of `device_kind`, the most words
    winning ("NVIDIA H100 PCIe" is "H100 PCIe"; "NVIDIA L40S" is not "L4"). TPUs: the chip's figure over
    the devices it shows (`devices_per_chip`).
    """
    if device_kind.startswith("TPU"):
        generation = "".join(device_kind.lower().split()[1:])  # "TPU v5 lite" -> "v5lite"
        chip = CHIPS.get(CHIP_ALIASES.get(generation, generation))
        return chip.peak_bf16_flops / devices_per_chip if chip else None
    words = set(_words(device_kind))
    hits = [name for name in GPU_PEAK_BF16_FLOPS if set(_words(name)) <= words]
    return GPU_PEAK_BF16_FLOPS[max(hits, key=lambda name: len(_words(name)))] if hits else None


def _words(name: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", name.lower())  # "NVIDIA A100-SXM4-80GB" -> nvidia a100 sxm4 80gb


def count_flops(jaxpr) -> float:
    """FLOPs (2 per multiply-add) of every matmul and convolution a jaxpr executes.

    Scan bodies count `length` times, a Pallas kernel's body once per point of its grid (splash
    attention's: batch x heads x query blocks x key blocks) and a shard_map's once per shard (the FLOPs are
    the whole mesh's, as for the partitioned rest of the program); remat recomputation is included (it is
    explicit in the jaxpr of a gradient), and so is a kernel's own (splash's backward recomputes the
    probabilities), as are padded rows and keys a kernel computes on. A cond counts its costliest branch,
    a while loop's body once. Elementwise work is left out. XLA's own cost analysis is no substitute here:
    it counts a loop body (the scanned DiT blocks, the microbatches) once.
    """
    return float(sum(flops_by_source(jaxpr).values()))


def flops_by_source(jaxpr, prefix: str = "") -> collections.Counter:
    """`count_flops` split by the name stack of each matmul or convolution: the module path that made it,
    e.g. "WanDiT/blocks_0/ffn/proj_in", or "transpose(jvp(WanDiT))/..." for a gradient's."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    totals = collections.Counter()
    for eqn in jaxpr.eqns:
        name, source = eqn.primitive.name, "/".join(filter(None, (prefix, str(eqn.source_info.name_stack))))
        if name == "dot_general":
            totals[source] += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            totals[source] += _conv_flops(eqn)
        inner = [flops_by_source(j, source) for j in _sub_jaxprs(eqn.params)]
        if inner and name == "cond":
            inner = [max(inner, key=lambda counts: sum(counts.values()))]
        repeat = _repeats(eqn)
        for counts in inner:
            totals.update({key: repeat * value for key, value in counts.items()})
    return totals


def _repeats(eqn) -> int:
    """How many times the body of `eqn` runs: a scan's length, a Pallas kernel's grid size, a shard_map's
    number of shards, else once."""
    if eqn.primitive.name == "scan":
        return eqn.params["length"]
    if eqn.primitive.name == "pallas_call":
        return math.prod(eqn.params["grid_mapping"].grid)
    if eqn.primitive.name == "shard_map":
        # The body's shapes are one shard's along the axes it makes manual (global along any others), and
        # it runs on every device of those axes: replicated inputs mean redundant work, counted too.
        mesh_shape = eqn.params["mesh"].shape  # a Mesh's or an AbstractMesh's {axis name: size}
        return math.prod(mesh_shape[axis] for axis in eqn.params["newly_manual_axes"])
    return 1


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jax_core.Jaxpr | jax_core.ClosedJaxpr):
                yield item


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in lhs_contract)


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
    taps = rhs.shape[rhs_spec[1]] * math.prod(rhs.shape[d] for d in rhs_spec[2:])
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * taps


def dit_forward_flops(
    cfg, frames: int, latent_hw: tuple[int, int], text_len: int, time_rows: int = 1
) -> float:
    """Matmul and attention FLOPs (2 per multiply-add) of one DiT forward (`cfg`: a DiTConfig) on one
    example; the time embedding runs on `time_rows` timesteps (1 per example, or one per frame).

    Counts every dense layer, the patch embedding, self- and cross-attention scores and values;
    elementwise work (norms, RoPE, softmax) is left out, as in the usual 6ND accounting.
    """
    pt, ph, pw = cfg.patch_size
    d, f = cfg.dim, cfg.ffn_dim
    s = (frames // pt) * (latent_hw[0] // ph) * (latent_hw[1] // pw)
    block = (
        2 * s * 4 * d * d  # self-attention q, k, v, out
        + 2 * s * 2 * d * d  # cross-attention q, out
        + 2 * text_len * 2 * d * d  # cross-attention k, v
        + 2 * s * 2 * d * f  # feed-forward
        + 2 * 2 * s * s * d  # self-attention scores and values
        + 2 * 2 * s * text_len * d  # cross-attention scores and values
    )
    embeddings = (
        2 * s * math.prod(cfg.patch_size) * cfg.in_channels * d
        + 2 * text_len * (cfg.text_dim * d + d * d)
        + 2 * time_rows * (cfg.freq_dim * d + d * d + 6 * d * d)
        + 2 * s * d * cfg.patch_features
    )
    return float(cfg.num_layers * block + embeddings)


def train_step_model_flops(model, batch) -> float:
    """Useful FLOPs of one GenMask train step on `batch` (the global batch, arrays or ShapeDtypeStructs):
    3 x the DiT forward (forward + backward) on every example, a segmentation example being two frames
    with per-frame timesteps. `model` is a `GenMask`.

    The frozen VAE encode and remat recomputation are not counted: they are overhead the MFU shows.
    """
    total = 0.0
    for task, frames in (("seg", 2), ("gen", 1)):
        if task not in batch:
            continue
        n, _, h, w, _ = model.latent_shape(batch[task])
        text_len = batch[task]["context"].shape[1]
        total += n * dit_forward_flops(model.dit, frames, (h, w), text_len, time_rows=frames)
    return 3.0 * total
