"""Matmul FLOPs from a jaxpr, in total and by the name stack of the code that made them; the useful FLOPs
of a train step and the peak figures behind the logged MFU."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genmask_jax.flops import (
    count_flops,
    devices_per_chip,
    dit_forward_flops,
    flops_by_source,
    peak_bf16_flops,
    train_step_model_flops,
)
from genmask_jax.models.dit import DiTConfig, WanDiT, init_params


def test_flops_by_source_names_scopes_repeats_scans_and_takes_the_costlier_branch():
    def f(x, w, flag):
        with jax.named_scope("once"):
            y = x @ w
        with jax.named_scope("looped"):
            y = jax.lax.scan(lambda c, _: (c @ w, None), y, None, length=5)[0]
        with jax.named_scope("branch"):
            return jax.lax.cond(flag, lambda y: y @ w @ w, lambda y: y, y)

    jaxpr = jax.make_jaxpr(f)(jnp.zeros((3, 4)), jnp.zeros((4, 4)), True)
    dot = 2 * 3 * 4 * 4
    by_source = flops_by_source(jaxpr)
    assert by_source["once"] == dot
    assert sum(v for k, v in by_source.items() if k.startswith("looped")) == 5 * dot
    assert sum(v for k, v in by_source.items() if k.startswith("branch")) == 2 * dot
    assert count_flops(jaxpr) == 8 * dot


def test_gradient_flops_are_named_by_the_transposed_scope():
    def loss(w, x):
        with jax.named_scope("layer"):
            return jnp.sum(x @ w)

    by_source = flops_by_source(jax.make_jaxpr(jax.grad(loss))(jnp.zeros((4, 4)), jnp.zeros((3, 4))))
    backward = {k: v for k, v in by_source.items() if k.startswith("transpose(")}
    assert sum(backward.values()) == 2 * 3 * 4 * 4 and all("layer" in k for k in backward)


@pytest.mark.parametrize("device_kind, peak", [
    # jax.devices()[0].device_kind on each card: the CUDA device name.
    ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835.5e12),
    ("NVIDIA H200", 989.4e12),
    ("NVIDIA H200 NVL", 835.5e12),
    ("NVIDIA GH200 480GB", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40", 181.05e12),
    ("NVIDIA L40S", 362.05e12),
    ("NVIDIA GeForce RTX 4090", None),
    ("cpu", None),
    # libtpu's names (jax.experimental.topologies.get_topology_desc("v5p:2x2x1") and friends).
    ("TPU v4", 275e12),  # megacore, the default: one device per chip
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),  # v5p
    ("TPU v6 lite", 918e12),
    ("TPU v3", None),
])
def test_peak_bf16_flops_by_device_kind(device_kind, peak):
    assert peak_bf16_flops(device_kind) == peak


def test_a_chip_split_into_its_tensorcores_has_the_peak_per_core():
    assert peak_bf16_flops("TPU v4", devices_per_chip=2) == 275e12 / 2  # v4's split (non-megacore) mode


def test_tpu_device_kinds_are_the_ones_libtpu_reports():
    """The names above are libtpu's: an AOT topology of each generation, no TPU needed."""
    from genmask_jax import aot

    if aot.libtpu_problem():
        pytest.skip(aot.libtpu_problem())
    kinds = {"v4:2x2x1": "TPU v4", "v5p:2x2x1": "TPU v5", "v5e:2x2": "TPU v5 lite", "v6e:2x2": "TPU v6 lite"}
    for name, kind in kinds.items():
        devices = aot.topology_devices(name)
        assert devices[0].device_kind == kind and devices_per_chip(devices) == 1
        assert peak_bf16_flops(kind) is not None
    # libtpu's own default for v4 is the split mode: a device per TensorCore, two per chip.
    from jax.experimental import topologies

    split = topologies.get_topology_desc(platform="tpu", topology_name="v4:2x2x1").devices
    assert len(split) == 8 and devices_per_chip(split) == 2


def test_train_step_model_flops_are_three_counted_forwards():
    """The hand count (every dense layer, the patch embedding, the attention scores and values, the time
    embedding once per frame) equals the matmuls counted in the jaxpr of both tasks' forwards, exactly."""
    from train_helpers import tiny_model

    model = tiny_model()
    z, dim = model.z_dim, model.dit.text_dim
    rng = np.random.default_rng(0)

    def sub(n, text_len, *keys):
        out = {key: rng.standard_normal((n, 1, 4, 6, z)).astype(np.float32) for key in keys}
        out["context"] = rng.standard_normal((n, text_len, dim)).astype(np.float32)
        out["context_mask"] = np.ones((n, text_len), bool)
        return out

    batch = {"seg": sub(2, 8, "image_latent", "mask_latent"), "gen": sub(3, 5, "image_latent")}
    params = jax.eval_shape(lambda: init_params(model.dit, jax.random.key(0)))
    draws = model.draw(jax.random.key(1), batch)
    forward = jax.make_jaxpr(lambda p: model.per_example_losses(p, None, batch, draws))(params)
    assert train_step_model_flops(model, batch) == 3 * count_flops(forward) > 0
    assert train_step_model_flops(model, {"gen": batch["gen"]}) < train_step_model_flops(model, batch)


def test_dit_forward_flops_count_tokens_of_a_temporal_patch():
    """A DiT that patches 2 frames at a time makes half the tokens of the frames; the hand count equals the
    jaxpr's exactly (it used to count one token per frame)."""
    cfg = DiTConfig.from_variant("tiny", patch_size=(2, 2, 2))
    x = jax.ShapeDtypeStruct((1, 4, 4, 6, cfg.in_channels), jnp.float32)
    t, ctx = jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1, 5, cfg.text_dim), jnp.float32)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), latent_shape=(1, 2, 4, 4)))
    forward = jax.make_jaxpr(lambda p, *a: WanDiT(cfg).apply({"params": p}, *a))(params, x, t, ctx)
    assert dit_forward_flops(cfg, 4, (4, 6), 5) == count_flops(forward)


@pytest.mark.parametrize("mesh_shape", [None, pytest.param((2, 2), marks=pytest.mark.multidevice)])
@pytest.mark.parametrize("implementation, gradient_passes", [("xla", 3), ("splash", 4.5)])
def test_attention_flops_are_the_analytic_count(implementation, gradient_passes, mesh_shape):
    """Forward: scores and values, 4 B N T S d, exactly, for both kernels; splash's Pallas body counts once
    per grid point (batch x heads x 2 query x 2 key blocks of 512 here). Gradient: XLA's backward is 4
    products (dV, dP, dQ, dK), 3 forwards in all; splash's backward kernels recompute the scores, dK/dV's
    with dP (4 products) and dQ's with dP (3): 4.5 forwards, plus rowsum(dO O) as a product, 2 B N T d
    (1e-4 of the total here), hence the 1e-3 tolerance. Under a (data, model) mesh splash runs per shard
    (a shard_map over batch and heads) and the count is still the whole mesh's."""
    from jax.sharding import PartitionSpec

    from genmask_jax.models.attention import dot_product_attention

    b, s, n, d = 2, 1024, 2, 128
    q = jax.ShapeDtypeStruct((b, s, n, d), jnp.float32)
    spec = PartitionSpec("data", None, "model", None)
    attention = lambda q, k, v: dot_product_attention(q, k, v, None, implementation, spec=spec)
    loss = lambda q, k, v: attention(q, k, v).sum()
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = None if mesh_shape is None else jax.make_mesh(mesh_shape, ("data", "model"), axis_types=auto)
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        forward = count_flops(jax.make_jaxpr(attention)(q, q, q))
        both = count_flops(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q))
    analytic = 4.0 * b * n * s * s * d
    assert forward == analytic
    assert both == pytest.approx(gradient_passes * analytic, rel=1e-3)


@pytest.mark.multidevice
def test_a_shard_map_body_counts_once_per_shard_of_its_manual_axes():
    """A concrete mesh passed to shard_map (the context mesh is an abstract one, tested above); the body
    of a partly manual shard_map is one shard along its manual axis and global along the automatic one."""
    from jax.sharding import PartitionSpec

    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x, w = jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 16), jnp.float32)
    global_flops = 2 * 8 * 16 * 16
    for axes, x_spec in (({"a", "b"}, PartitionSpec(("a", "b"))), ({"a"}, PartitionSpec("a"))):
        in_specs = (x_spec, PartitionSpec())
        matmul = jax.shard_map(
            lambda x, w: x @ w, mesh=mesh, in_specs=in_specs, out_specs=x_spec, axis_names=axes
        )
        assert count_flops(jax.make_jaxpr(matmul)(x, w)) == global_flops
    # Replicated inputs: every one of the 8 devices does the whole product.
    whole = PartitionSpec()
    replicated = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=whole, out_specs=whole)
    assert count_flops(jax.make_jaxpr(replicated)(x, w)) == 8 * global_flops
