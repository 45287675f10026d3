"""The sharded train step: mesh invariance, microbatch accumulation, task ratios, optimizer pieces."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_helpers import make_batch, mesh_of, random_vae, tiny_config, tiny_model

from genmask_jax.models import build
from genmask_jax.parallel.sharding import rules_from_config
from genmask_jax.train import loop
from genmask_jax.train.state import (
    attach_frozen,
    create_train_state,
    ema_decay_at,
    ema_update,
    initial_ema,
    make_optimizer,
    make_schedule,
    weight_decay_mask,
)
from genmask_jax.train.step import (
    check_microbatch_split,
    make_configured_train_step,
    make_train_step,
    optimizer_config,
    split_microbatches,
)


def setup(mesh, microbatches=1, ema_decay=0.0, **overrides):
    config = tiny_config(microbatches=microbatches, ema_decay=ema_decay, **overrides)
    model = tiny_model(config)
    rules = rules_from_config(config.sharding.logical_axis_rules)
    opt_cfg = {**config.optimizer.to_dict(), "total_steps": config.total_steps}
    tx = make_optimizer(opt_cfg)
    state, shardings = create_train_state(build.dit_initializer(model), tx, jax.random.key(0), mesh, rules,
                                          use_ema=ema_decay > 0, abstract_frozen=build.abstract_frozen(model))
    state = attach_frozen(state, shardings, {"vae": random_vae(model)})
    step = make_train_step(model, tx, shardings, mesh, rules, microbatches, ema_decay, make_schedule(opt_cfg))
    return state, shardings, step, rules


def configured_setup(mesh, **overrides):
    """`setup` with the step that `train.loop.train` builds from the config (`make_configured_train_step`)."""
    config = tiny_config(**overrides)
    model = tiny_model(config)
    rules = rules_from_config(config.sharding.logical_axis_rules)
    tx = make_optimizer(optimizer_config(config))
    state, shardings = create_train_state(
        build.dit_initializer(model),
        tx,
        jax.random.key(0),
        mesh,
        rules,
        use_ema=config.ema_decay > 0,
        abstract_frozen=build.abstract_frozen(model),
    )
    state = attach_frozen(state, shardings, {"vae": random_vae(model)})
    return state, make_configured_train_step(config, model, tx, shardings, mesh, rules), rules


def run(mesh, batches, **kwargs):
    state, _, step, rules = setup(mesh, **kwargs)
    losses = []
    for batch in batches:
        state, metrics = step(state, loop.global_batch(batch, mesh, rules), jax.random.key(7))
        losses.append(jax.device_get(metrics))
    return jax.device_get(state), losses


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
@pytest.mark.multidevice
def test_2x2x2_mesh_matches_one_device():
    batches = [make_batch(i, 8, 8) for i in range(3)]
    one, losses_one = run(mesh_of((1, 1, 1)), batches)
    mesh = mesh_of((2, 2, 2))
    state, _, step, rules = setup(mesh)
    kernel = state.params["blocks_0"]["ffn"]["proj_in"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")  # FSDP x tensor parallel
    mu = state.opt_state[1][0].mu["blocks_0"]["ffn"]["proj_in"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec  # Adam moments sharded like the parameters
    sharded_losses = []
    for batch in batches:
        state, metrics = step(state, loop.global_batch(batch, mesh, rules), jax.random.key(7))
        sharded_losses.append(jax.device_get(metrics))
    # Only the reduction order differs between the layouts (fp32): measured loss gaps 1.0e-7 relative and
    # parameter gaps 2.4e-7 absolute after 3 AdamW steps at lr 1e-3; the bounds leave >= 40x margin.
    for a, b in zip(losses_one, sharded_losses):
        for name in ("loss", "loss_seg", "loss_gen", "grad_norm"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, err_msg=name)
    assert max_abs_diff(one.params, jax.device_get(state.params)) < 1e-5
    assert int(state.step) == 3


@pytest.mark.slow
def test_four_microbatches_equal_one_shot():
    mesh = mesh_of((1, 1, 1))
    batches = [make_batch(i, 8, 8) for i in range(2)]
    one, losses_one = run(mesh, batches)
    four, losses_four = run(mesh, batches, microbatches=4)
    # Same examples, same noise and timesteps (drawn for the global batch); only the gradient summation
    # order differs: measured gaps 1.8e-7 (loss, relative), 2.6e-7 (params, absolute) and 1.4e-9 (Adam
    # moments) after 2 steps; the bounds leave >= 40x margin.
    for a, b in zip(losses_one, losses_four):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    assert max_abs_diff(one.params, four.params) < 1e-5
    assert max_abs_diff(one.opt_state, four.opt_state) < 1e-5


def test_microbatches_keep_the_task_ratio_and_stride():
    tree = {"seg": jnp.arange(8), "gen": jnp.arange(4) + 100}
    split = split_microbatches(tree, 4)
    assert split["seg"].shape == (4, 2) and split["gen"].shape == (4, 1)
    np.testing.assert_array_equal(split["seg"][1], [1, 5])
    with pytest.raises(ValueError, match="does not split"):
        split_microbatches({"seg": jnp.arange(6)}, 4)


def test_microbatch_split_check():
    check_microbatch_split({"seg": 16, "gen": 8}, 2, 4)
    check_microbatch_split({"seg": 4}, 1, 4)
    with pytest.raises(
        ValueError,
        match=r"^sub-batches \{'seg': 16, 'gen': 8\} in 4 microbatches: .* the 4 "
        r"batch shards \(data x fsdp\), not gen 8 / 4 = 2 examples$",
    ):
        check_microbatch_split({"seg": 16, "gen": 8}, 4, 4)
    with pytest.raises(ValueError, match=r"not seg 6 / 4 = 1.5 examples$"):
        check_microbatch_split({"seg": 6}, 4, 1)


@pytest.mark.multidevice
def test_microbatches_that_do_not_split_over_the_batch_shards_fail_in_one_line():
    """4 + 4 examples in 4 microbatches on 2 FSDP shards: each microbatch holds one example per task, which
    XLA would silently gather onto both devices at every microstep instead of splitting it."""
    mesh = mesh_of((1, 2, 1))
    state, _, step, rules = setup(mesh, microbatches=4)
    batch = loop.global_batch(make_batch(0, 4, 4), mesh, rules)
    with pytest.raises(ValueError) as error:
        step(state, batch, jax.random.key(0))
    # Raised while tracing: JAX appends its note on filtered frames below the message.
    first_line = str(error.value).splitlines()[0]
    assert re.fullmatch(
        r"sub-batches \{'seg': 4, 'gen': 4\} in 4 microbatches: .* 2 batch shards \(data x "
        r"fsdp\), not seg 4 / 4 = 1, gen 4 / 4 = 1 examples",
        first_line,
    )


@pytest.mark.slow
def test_configured_step_warms_the_ema_up_and_logs_muons_rate():
    """ema_warmup: the decay of update t is min(ema_decay, (1 + t) / (10 + t)). With lr 0 at the first
    update (warmup) the params and the EMA stay p0; the second update (t = 1) gives the EMA
    2/11 p0 + 9/11 p2, where a constant 0.9999 would leave it at p0. Under Muon both rates are logged."""
    mesh = mesh_of((1, 1, 1))
    optimizer = {
        "optimizer.name": "muon",
        "optimizer.muon_lr": 0.02,
        "optimizer.lr": 1e-3,
        "optimizer.warmup_steps": 2,
    }
    state, step, rules = configured_setup(mesh, ema_decay=0.9999, ema_warmup=True, **optimizer)
    p0 = jax.device_get(state.params)
    logged = []
    for i in range(2):
        state, metrics = step(state, loop.global_batch(make_batch(i, 2, 2), mesh, rules), jax.random.key(7))
        logged.append({k: float(metrics[k]) for k in ("lr", "muon_lr")})
    p2, ema = jax.device_get((state.params, state.ema_params))
    expected = jax.tree.map(lambda a, b: 2 / 11 * a + 9 / 11 * b, p0, p2)
    assert max_abs_diff(p0, p2) > 1e-4
    assert max_abs_diff(ema, expected) < 1e-6
    # Warmup over 2 steps: 0, then half of each rate.
    assert logged == [{"lr": 0.0, "muon_lr": 0.0}, pytest.approx({"lr": 5e-4, "muon_lr": 1e-2})]


def test_configured_adamw_step_logs_no_muon_rate():
    mesh = mesh_of((1, 1, 1))
    state, step, rules = configured_setup(mesh)
    batch = loop.global_batch(make_batch(0, 2, 2), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, metrics = jax.eval_shape(step.jitted, state, batch, jax.random.key(0))
    assert "lr" in metrics and "muon_lr" not in metrics


def test_segmentation_only_batches():
    """The "without generation data" ablation: 1:0, with gen absent or empty."""
    mesh = mesh_of((1, 1, 1))
    full = make_batch(0, 4, 0)
    absent = {"seg": full["seg"]}
    state, _, step, rules = setup(mesh, ema_decay=0.5)
    for batch in (full, absent):
        state, metrics = step(state, loop.global_batch(batch, mesh, rules), jax.random.key(0))
        metrics = jax.device_get(metrics)
        assert "loss_gen" not in metrics and metrics["loss"] == pytest.approx(metrics["loss_seg"])
    # EMA (decay 0.5) moved after the second step (the first has lr 0 under warmup) but lags the params.
    assert 0 < max_abs_diff(state.ema_params, state.params)


@pytest.mark.multidevice
def test_muon_state_is_sharded_like_the_params_and_trains():
    """Muon (train/muon.py) on the 2-D kernels, AdamW on the rest, under FSDP x tensor sharding."""
    mesh = mesh_of((1, 2, 2))
    state, _, step, rules = setup(mesh, **{"optimizer.name": "muon", "optimizer.muon_lr": 0.02})
    kernel = state.params["blocks_0"]["ffn"]["proj_in"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    leaves = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]

    def state_leaves(*names):
        return [v for p, v in leaves if tuple(getattr(k, "key", None) for k in p[-len(names):]) == names]

    # Muon's momentum of a kernel (one leaf) and Adam's two moments of a bias take their parameter's
    # sharding.
    (momentum,) = state_leaves("blocks_0", "ffn", "proj_in", "kernel")
    assert momentum.shape == kernel.shape and momentum.sharding.spec == kernel.sharding.spec
    bias = state.params["blocks_0"]["ffn"]["proj_in"]["bias"]
    moments = state_leaves("blocks_0", "ffn", "proj_in", "bias")
    assert len(moments) == 2 and all(m.sharding.spec == bias.sharding.spec for m in moments)
    before = jax.device_get(state.params)
    losses = []
    for i in range(3):
        state, metrics = step(state, loop.global_batch(make_batch(i, 8, 8), mesh, rules), jax.random.key(7))
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses))
    moved = jax.device_get(state.params)
    # The first step has lr 0 (warmup); after that every kernel, Muon's and Adam's, has moved.
    assert max_abs_diff(before["blocks_0"]["ffn"]["proj_in"]["kernel"],
                        moved["blocks_0"]["ffn"]["proj_in"]["kernel"]) > 0
    assert max_abs_diff(before["patch_embedding"], moved["patch_embedding"]) > 0
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer({"name": "sgd", "lr": 1.0})


@pytest.mark.multidevice
def test_splash_model_initialises_on_a_batch_split_mesh():
    """The DiT's init traces a batch of 1, which sharded splash cannot split over (data, fsdp) = 2 x 2:
    init runs with XLA attention (the parameters do not depend on the kernel), the same parameters."""
    mesh = mesh_of((2, 2, 1))
    rules = rules_from_config(tiny_config().sharding.logical_axis_rules)
    params = {}
    for attention in ("xla", "splash"):
        config = tiny_config()
        config.model.dit.attention = attention
        model = tiny_model(config)
        tx = make_optimizer({**config.optimizer.to_dict(), "total_steps": config.total_steps})
        state, _ = create_train_state(build.dit_initializer(model), tx, jax.random.key(0), mesh, rules)
        params[attention] = jax.device_get(state.params)
    assert jax.tree.all(jax.tree.map(np.array_equal, params["xla"], params["splash"]))


def test_schedule_warmup_constant_and_cosine():
    constant = make_schedule({"lr": 1.0, "warmup_steps": 4})
    assert [float(constant(s)) for s in (0, 2, 4, 100)] == [0.0, 0.5, 1.0, 1.0]
    cosine = make_schedule({"lr": 1.0, "warmup_steps": 2, "schedule": "cosine", "total_steps": 12,
                            "end_lr_factor": 0.1})
    assert float(cosine(2)) == pytest.approx(1.0) and float(cosine(7)) == pytest.approx(0.55)
    assert float(cosine(12)) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        make_schedule({"lr": 1.0, "schedule": "linear"})


def test_weight_decay_mask_and_clipping():
    model = tiny_model()
    params = nn.meta.unbox(jax.eval_shape(build.dit_initializer(model), jax.random.key(0)))
    mask = weight_decay_mask(params)
    assert mask["blocks_0"]["attn1"]["to_q"]["kernel"] and mask["patch_embedding"]["kernel"]
    assert not mask["blocks_0"]["attn1"]["to_q"]["bias"]
    assert not mask["blocks_0"]["scale_shift_table"] and not mask["scale_shift_table"]
    assert not mask["blocks_0"]["norm2"]["scale"]
    # Decay only moves masked leaves (zero gradient, lr 1, weight decay 0.5).
    tx = make_optimizer({"lr": 1.0, "weight_decay": 0.5, "grad_clip": 1.0})
    p = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.5)
    np.testing.assert_allclose(updates["dense"]["bias"], 0.0)
    # Clipping: a gradient of global norm 10 is scaled to norm 1 before Adam (which normalises anyway,
    # so check the clip transform itself).
    clip = optax.clip_by_global_norm(1.0)
    g = {"a": jnp.full((4,), 5.0)}
    clipped, _ = clip.update(g, clip.init(g))
    assert float(optax.global_norm(clipped)) == pytest.approx(1.0)


def test_ema_update():
    out = ema_update({"w": jnp.zeros(3)}, {"w": jnp.ones(3)}, 0.9)
    np.testing.assert_allclose(out["w"], 0.1)


def test_the_ema_of_bfloat16_params_moves():
    """At decay 0.999 the EMA's steps (1 - 0.999) * (p - ema) fall below bfloat16's resolution: an EMA in
    the params' bfloat16 would stay where it started."""
    start, target = jnp.bfloat16(0.02), jnp.bfloat16(0.03)
    ema = initial_ema({"w": jnp.full((4,), start)})
    for _ in range(1000):
        ema = ema_update(ema, {"w": jnp.full((4,), target)}, 0.999)
    expected = float(target) + (float(start) - float(target)) * 0.999**1000
    assert ema["w"].dtype == jnp.float32
    np.testing.assert_allclose(ema["w"], expected, rtol=1e-4)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_the_optimizer_state_of_bfloat16_params_is_float32_and_follows_the_gradient(name):
    """optax keeps its moments in the params' dtype: with bfloat16 params b2 = 0.999 rounded to 1.0 and
    Adam's second moment stopped at 0.5 g^2, never following a gradient that fell 100-fold."""
    params = {"bias": jnp.zeros((4,), jnp.bfloat16), "kernel": jnp.zeros((4, 4), jnp.bfloat16)}
    cfg = dict(name=name, lr=1e-3, muon_lr=1e-3, warmup_steps=0, total_steps=10**4, weight_decay=0.0)
    tx = make_optimizer(cfg)
    state = tx.init(params)
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    update = jax.jit(tx.update)
    for g in [1.0] * 1000 + [0.01] * 2000:
        grads = jax.tree.map(lambda p, g=g: jnp.full(p.shape, g, p.dtype), params)
        updates, state = update(grads, state, params)
    (nu,) = [x for path, x in jax.tree_util.tree_leaves_with_path(state)
             if "nu" in jax.tree_util.keystr(path) and x.shape == (4,)]
    expected = 1.0 * 0.999**2000 * (1 - 0.999**1000) + 1e-4 * (1 - 0.999**2000)  # 0.0865
    np.testing.assert_allclose(nu, expected, rtol=1e-3)
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
    new = optax.apply_updates(params, updates)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new))


def test_ema_decay_warmup_schedule():
    warm = [float(ema_decay_at(t, 0.9999, warmup=True)) for t in (0, 8, 90, 10**6)]
    np.testing.assert_allclose(warm, [0.1, 0.5, 0.91, 0.9999], rtol=1e-6)
    assert float(ema_decay_at(100, 0.5, warmup=True)) == 0.5  # capped by ema_decay
    assert ema_decay_at(0, 0.9999, warmup=False) == 0.9999
    assert float(ema_decay_at(5, 0.0, warmup=True)) == 0.0  # ema_decay 0 (no EMA) stays 0


def test_the_shipped_configs_warm_the_ema_up():
    from configs import demo, genmask

    for config in (genmask.get_config(), genmask.get_config("variant=paper"), demo.get_config()):
        assert config.ema_warmup is True and config.ema_decay == 0.0
