"""The GenMask train step: a pure `(state, batch, rng) -> (state, metrics)`, jitted with explicit shardings.

Both tasks run as static sub-batches of one step. The loss is the mean of per-example velocity MSEs
over the global batch (so a 1:1 batch weighs the tasks equally). All randomness (timesteps, noise,
text dropout) is drawn for the whole global batch from `fold_in(rng, step)` before any microbatch
split, so `microbatches = k` computes the same gradient as one shot, up to summation order.
"""

import functools
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from genmask_jax.models.genmask import GenMask, present_tasks
from genmask_jax.parallel.sharding import LogicalRules, batch_shard_count, batch_sharding
from genmask_jax.train.state import TrainState, ema_decay_at, ema_update, make_muon_schedule, make_schedule


def split_microbatches(tree, k: int):
    """`(B, ...)` leaves -> `(k, B/k, ...)`; microbatch j holds examples j, j + k, j + 2k, ...

    Strided rather than contiguous so every device's shard of the batch feeds every microbatch.
    """

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"a sub-batch of {x.shape[0]} examples does not split into {k} microbatches")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, tree)


def check_microbatch_split(sizes: Mapping[str, int], k: int, batch_shards: int) -> None:
    """ValueError unless each task's `sizes[task] / k` examples of a microbatch split over the
    `batch_shards` (data x fsdp) blocks of the batch: otherwise XLA silently gathers the global batch onto
    every device at every microstep."""
    bad = [f"{task} {n} / {k} = {n / k:g}" for task, n in sizes.items() if n % k or (n // k) % batch_shards]
    if bad:
        raise ValueError(
            f"sub-batches {dict(sizes)} in {k} microbatches: each task's microbatch must split over the "
            f"{batch_shards} batch shards (data x fsdp), not {', '.join(bad)} examples"
        )


def count_examples(batch) -> int:
    return sum(int(jax.tree.leaves(batch[task])[0].shape[0]) for task in present_tasks(batch))


def _loss_sums(model: GenMask, params, frozen, batch, draws, num_examples: int):
    """(sum of per-example losses / num_examples, task -> sum of per-example losses)."""
    losses = model.per_example_losses(params, frozen.get("vae"), batch, draws)
    sums = {task: jnp.sum(value) for task, value in losses.items()}
    return sum(sums.values()) / num_examples, sums


def _gradients(model: GenMask, params, frozen, batch, draws, microbatches: int, constrain, batch_shards: int):
    """Gradient of the global-batch mean loss and per-task loss sums, accumulated in fp32."""
    num_examples = count_examples(batch)
    grad_fn = jax.grad(functools.partial(_loss_sums, model), has_aux=True)
    if microbatches == 1:
        return grad_fn(params, frozen, batch, draws, num_examples)

    sizes = {task: int(jax.tree.leaves(batch[task])[0].shape[0]) for task in present_tasks(batch)}
    check_microbatch_split(sizes, microbatches, batch_shards)
    inputs = split_microbatches({"batch": batch, "draws": draws}, microbatches)

    def body(carry, micro):
        micro = constrain(micro)
        grads, sums = grad_fn(params, frozen, micro["batch"], micro["draws"], num_examples)
        acc_grads, acc_sums = carry
        acc_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_grads, grads)
        acc_sums = jax.tree.map(jnp.add, acc_sums, sums)
        return (acc_grads, acc_sums), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zero_sums = {task: jnp.zeros((), jnp.float32) for task in present_tasks(batch)}
    (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums), inputs)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return grads, sums


def train_step(
    state: TrainState,
    batch,
    rng: jax.Array,
    *,
    model: GenMask,
    tx: optax.GradientTransformation,
    microbatches: int = 1,
    ema_decay: float = 0.0,
    ema_warmup: bool = False,
    schedule: Callable | None = None,
    muon_schedule: Callable | None = None,
    constrain: Callable = lambda x: x,
    batch_shards: int = 1,
):
    """One optimizer update on the global batch; see the module docstring.

    Args:
      state: the TrainState (donated by the jitted wrapper).
      batch: {"seg": {...}, "gen": {...}} of global arrays (interfaces.md); "gen" may be absent.
      rng: the run's base key; the step number is folded in here.
      ema_warmup: the EMA decay ramps up as `ema_decay_at` says.
      batch_shards: how many blocks the batch axes split a batch into (each microbatch must split too).
    Returns:
      (new state, metrics): loss (global mean), loss_seg / loss_gen (per-task means),
      grad_norm, param_norm, update_norm, and lr / muon_lr if `schedule` / `muon_schedule` is given.
    """
    rng = jax.random.fold_in(rng, state.step)
    draws = model.draw(rng, batch)
    grads, sums = _gradients(
        model, state.params, state.frozen, batch, draws, microbatches, constrain, batch_shards
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = None
    if state.ema_params is not None:
        ema = ema_update(state.ema_params, params, ema_decay_at(state.step, ema_decay, ema_warmup))

    num_examples = count_examples(batch)
    metrics = {
        "loss": sum(sums.values()) / num_examples,
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(params),
        "update_norm": optax.global_norm(updates),
    }
    for task, total in sums.items():
        metrics[f"loss_{task}"] = total / jax.tree.leaves(batch[task])[0].shape[0]
    if schedule is not None:
        metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    if muon_schedule is not None:
        metrics["muon_lr"] = jnp.asarray(muon_schedule(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new_state, metrics


def make_train_step(
    model: GenMask,
    tx: optax.GradientTransformation,
    shardings: TrainState,
    mesh: jax.sharding.Mesh,
    rules: LogicalRules,
    microbatches: int = 1,
    ema_decay: float = 0.0,
    schedule: Callable | None = None,
    ema_warmup: bool = False,
    muon_schedule: Callable | None = None,
):
    """`train_step` jitted with in/out shardings and the state donated.

    Returns `step_fn(state, batch, rng) -> (state, metrics)`; the batch must already be global arrays
    laid out with `batch_sharding(mesh, rules)` (see `loop.global_batch`).
    """
    data_sharding = batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    constrain = lambda tree: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, data_sharding), tree)
    step = functools.partial(
        train_step,
        model=model,
        tx=tx,
        microbatches=microbatches,
        ema_decay=ema_decay,
        ema_warmup=ema_warmup,
        schedule=schedule,
        muon_schedule=muon_schedule,
        constrain=constrain,
        batch_shards=batch_shard_count(mesh, rules),
    )
    jitted = jax.jit(
        step,
        in_shardings=(shardings, data_sharding, replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )

    def step_fn(state: TrainState, batch: Mapping, rng: jax.Array):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch, rng)

    step_fn.jitted = jitted
    return step_fn


def make_configured_train_step(
    config,
    model: GenMask,
    tx: optax.GradientTransformation,
    shardings,
    mesh: jax.sharding.Mesh,
    rules: LogicalRules,
):
    """`make_train_step` with the experiment config's accumulation, EMA and learning-rate schedules:
    the one step that `train.loop.train` runs and `genmask_jax.aot` compiles."""
    optimizer = optimizer_config(config)
    muon_schedule = make_muon_schedule(optimizer) if optimizer.get("name") == "muon" else None
    return make_train_step(
        model,
        tx,
        shardings,
        mesh,
        rules,
        microbatches=config.microbatches,
        ema_decay=config.ema_decay,
        schedule=make_schedule(optimizer),
        ema_warmup=bool(config.get("ema_warmup", False)),  # False: configs saved before the field
        muon_schedule=muon_schedule,
    )


def optimizer_config(config) -> dict:
    """`config.optimizer` plus the run length that the schedule needs."""
    return {**config.optimizer.to_dict(), "total_steps": config.total_steps}
