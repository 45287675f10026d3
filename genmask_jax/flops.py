"""FLOPs of the matmuls and convolutions in a jaxpr; needs jax alone (no training stack)."""

import math

from jax.extend import core as jax_core


def count_flops(jaxpr) -> float:
    """FLOPs (2 per multiply-add) of every matmul and convolution a jaxpr executes.

    Scan bodies count `length` times and remat recomputation is included (it is explicit in the jaxpr of
    a gradient); a cond counts its costliest branch, a while loop's body once. Elementwise work is left
    out. XLA's own cost analysis is no substitute here: it counts a loop body (the scanned DiT blocks,
    the microbatches) once.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        inner = [count_flops(j) for j in _sub_jaxprs(eqn.params)]
        if inner:
            if name == "cond":
                total += max(inner)
            elif name == "scan":
                total += eqn.params["length"] * sum(inner)
            else:
                total += sum(inner)
    return total


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
