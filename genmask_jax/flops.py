"""FLOPs of the matmuls and convolutions in a jaxpr, and the TPU chips' peak figures; needs jax alone (no
training stack)."""

import collections
import dataclasses
import math
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
CHIP_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v6lite": "v6e"}


def devices_per_chip(devices: Sequence) -> int:
    """TPU v4 slices show one device per TensorCore (2 per chip); v5e/v5p/v6e one per chip."""
    return len({getattr(d, "core_on_chip", 0) for d in devices})


def count_flops(jaxpr) -> float:
    """FLOPs (2 per multiply-add) of every matmul and convolution a jaxpr executes.

    Scan bodies count `length` times and remat recomputation is included (it is explicit in the jaxpr of
    a gradient); a cond counts its costliest branch, a while loop's body once. Elementwise work is left
    out. XLA's own cost analysis is no substitute here: it counts a loop body (the scanned DiT blocks,
    the microbatches) once.
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
        repeat = eqn.params["length"] if name == "scan" else 1
        for counts in inner:
            totals.update({key: repeat * value for key, value in counts.items()})
    return totals


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
