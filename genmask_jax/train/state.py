"""Train state, optimizer and sharded initialisation.

`TrainState` holds what training changes (step, DiT params, optimizer state, optional EMA) and the frozen
parameters (the VAE) that the step only reads; `frozen` is outside the optimizer and outside checkpoints
(it is rebuilt from its own source on restore). The EMA is kept in float32 whatever the params' dtype: at
decay 0.999 a bfloat16 EMA never moves, its increments (1 - decay) * (p - ema) falling below bfloat16's
resolution.
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from genmask_jax.parallel.sharding import LogicalRules, put_sharded
from genmask_jax.train import muon

NO_DECAY_NAMES = ("bias", "scale", "scale_shift_table")
EMA_DTYPE = jnp.float32
STEP_DTYPE = jnp.int32
# The DiT's nn.scan module (models/dit.py, scan_layers=True): its parameters carry a leading layer axis.
LAYER_STACKS = ("blocks",)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None
    frozen: Any = flax.struct.field(default_factory=dict)

    def trainable(self) -> dict[str, Any]:
        """The part that checkpoints save (everything but `frozen`)."""
        return {
            "step": self.step,
            "params": self.params,
            "opt_state": self.opt_state,
            "ema_params": self.ema_params,
        }


def make_schedule(cfg: Mapping) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then constant or cosine down to
    `lr * end_lr_factor` at `total_steps`."""
    lr, warmup = float(cfg["lr"]), int(cfg.get("warmup_steps", 0))
    if warmup < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup}")
    kind = cfg.get("schedule", "constant")
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        decay_steps = max(int(cfg["total_steps"]) - warmup, 1)
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(cfg.get("end_lr_factor", 0.0)))
    else:
        raise ValueError(f"unknown schedule {kind!r}; use 'constant' or 'cosine'")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_muon_schedule(cfg: Mapping) -> optax.Schedule:
    """Muon's rate for its matrices: `make_schedule`'s shape at `muon_lr`."""
    return make_schedule({**dict(cfg), "lr": float(cfg["muon_lr"])})


def weight_decay_mask(params) -> dict:
    """True for matrices and conv kernels; biases, norm scales and modulation tables are not decayed.

    Works on plain arrays, on `nn.Partitioned` boxes (for sharding derivation under eval_shape) and on
    the masked trees of Muon's partitions.
    """

    def decide(path, leaf):
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        if not hasattr(value, "shape"):  # optax's MaskedNode: a leaf another optimizer partition owns
            return False
        return path[-1] not in NO_DECAY_NAMES and len(value.shape) >= 2

    return traverse_util.path_aware_map(decide, flax.core.unfreeze(params))


def make_optimizer(cfg: Mapping) -> optax.GradientTransformation:
    """AdamW or Muon with warmup + constant/cosine schedule, global-norm clipping and a weight-decay mask.

    cfg: name ("adamw" | "muon"), lr, warmup_steps, schedule, total_steps, end_lr_factor, b1, b2, eps,
    weight_decay, grad_clip; for Muon also muon_lr (its matrices' rate, same schedule shape) and
    muon_beta, muon_ns_steps (Newton-Schulz iterations), muon_conv_kernels. Muon (train/muon.py)
    orthogonalises the momentum of every 2-D kernel (and of conv kernels with muon_conv_kernels), layer
    by layer in a scanned DiT; the other parameters (biases, norm scales, modulation tables) take AdamW
    at `lr`.
    """
    name = cfg.get("name", "adamw")
    schedule = make_schedule(cfg)
    b1, b2, eps = float(cfg.get("b1", 0.9)), float(cfg.get("b2", 0.999)), float(cfg.get("eps", 1e-8))
    weight_decay = float(cfg.get("weight_decay", 0.0))
    if name == "adamw":
        tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask)
    elif name == "muon":
        tx = muon.muon(
            make_muon_schedule(cfg),
            adam_learning_rate=schedule,
            beta=float(cfg.get("muon_beta", 0.95)),
            ns_steps=int(cfg.get("muon_ns_steps", 5)),
            adam_b1=b1,
            adam_b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            weight_decay_mask=weight_decay_mask,
            conv_kernels=bool(cfg.get("muon_conv_kernels", False)),
            layer_stacks=LAYER_STACKS,
        )
    else:
        raise ValueError(f"unknown optimizer {name!r}; use 'adamw' or 'muon'")
    clip = float(cfg.get("grad_clip", 0.0))
    return float32_state(optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx)


def _float32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def float32_state(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` with its state and updates in float32 whatever the parameters' dtype (a no-op for float32
    ones). optax keeps moments in the parameters' dtype: with bfloat16 parameters b2 = 0.999 rounds to
    1.0, so Adam's second moment stops following the gradient (and b1 = 0.9 becomes 0.898). The updates
    are added to the parameters in float32 and rounded once (`optax.apply_updates`)."""

    def init(params):
        return tx.init(_float32(params))

    def update(updates, state, params=None):
        return tx.update(_float32(updates), state, None if params is None else _float32(params))

    return optax.GradientTransformation(init, update)


def ema_update(ema, params, decay):
    """ema <- decay * ema + (1 - decay) * params, in the EMA's dtype."""
    return jax.tree.map(
        lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params
    )


def ema_decay_at(step, decay: float, warmup: bool):
    """The EMA decay of update `step` (0 for the first): `decay`, or with `warmup`
    min(decay, (1 + step) / (10 + step)) (tf.train.ExponentialMovingAverage's `num_updates`). Without it
    a decay of 0.9999 leaves 0.9999 ** 8000 = 45% of the EMA on the initial weights after 8000 steps."""
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def initial_ema(params):
    """The EMA's starting point: `params` in float32 (EMA_DTYPE) buffers of their own, each array on its
    sharding; abstract `params` under `jax.eval_shape` give the EMA's shapes and dtypes.

    Not `jax.device_put(params, shardings)`: onto an array's own sharding it returns the same buffers, and
    the train step, which donates its state, then fails with "Attempt to donate the same buffer twice".
    """
    return jax.tree.map(lambda x: x.copy() if x.dtype == EMA_DTYPE else x.astype(EMA_DTYPE), params)


def _opt_state_specs(opt_state, boxed_params, param_specs):
    """PartitionSpecs of an abstract optimizer state: a leaf whose dict-key path ends with a parameter's
    path and whose shape is that parameter's takes its spec; counters and the rest are replicated.

    Matching by path works for states that embed the parameter tree whole (Adam's moments) and for
    partitioned ones whose trees hold optax MaskedNodes where another partition owns the leaf (Muon).
    """
    params = {
        tuple(k.key for k in path): (leaf.value.shape, spec)
        for (path, leaf), spec in zip(
            jax.tree_util.tree_flatten_with_path(
                boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
            )[0],
            jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
        )
    }

    def spec_of(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for n in range(len(keys), 0, -1):
            shape_spec = params.get(keys[-n:])
            if shape_spec is not None and shape_spec[0] == leaf.shape:
                return shape_spec[1]
        return jax.sharding.PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_of, opt_state)


def state_shardings(
    boxed_params,
    boxed_frozen,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: LogicalRules,
    use_ema: bool,
) -> TrainState:
    """NamedShardings of a TrainState from abstract *boxed* (nn.Partitioned) parameter trees.

    Optimizer-state leaves shaped like parameters take the parameter's sharding (FSDP of Adam's moments
    and Muon's momentum); counters are replicated.
    """
    param_specs = nn.get_partition_spec(boxed_params)
    frozen_specs = nn.get_partition_spec(boxed_frozen)
    opt_state = jax.eval_shape(lambda p: tx.init(nn.meta.unbox(p)), boxed_params)
    opt_specs = _opt_state_specs(opt_state, boxed_params, param_specs)
    specs = TrainState(
        step=jax.sharding.PartitionSpec(),
        params=param_specs,
        opt_state=opt_specs,
        ema_params=param_specs if use_ema else None,
        frozen=frozen_specs,
    )
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def train_state_shapes(
    boxed_params: Any,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: LogicalRules,
    use_ema: bool = False,
    abstract_frozen: Any = None,
) -> tuple[TrainState, TrainState]:
    """(TrainState of ShapeDtypeStructs carrying their shardings, TrainState of NamedShardings): the state
    `create_train_state` + `attach_frozen` make, with nothing allocated. A restore target: resuming reads
    the checkpoint into these without first making a random state beside it.

    boxed_params: the boxed (nn.Partitioned) DiT params as ShapeDtypeStructs (`models.build.abstract_dit`,
      or `jax.eval_shape` of an initializer); other arguments as in `create_train_state`.
    """
    abstract_frozen = {} if abstract_frozen is None else abstract_frozen
    shardings = state_shardings(boxed_params, abstract_frozen, tx, mesh, rules, use_ema)
    params = nn.meta.unbox(boxed_params)
    state = TrainState(
        step=jax.ShapeDtypeStruct((), STEP_DTYPE),
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
        ema_params=jax.eval_shape(initial_ema, params) if use_ema else None,  # float32 (EMA_DTYPE)
        frozen=nn.meta.unbox(abstract_frozen),
    )
    return abstract_train_state(shardings, state), shardings


def create_train_state(
    init_params: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    rng: jax.Array,
    mesh: jax.sharding.Mesh,
    rules: LogicalRules,
    use_ema: bool = False,
    abstract_frozen: Any = None,
) -> tuple[TrainState, TrainState]:
    """Initialises a TrainState directly in its sharded layout.

    The trees are first traced with `jax.eval_shape` (no memory) to read their logical axis names
    (`train_state_shapes`), then built by a jitted init with `out_shardings` (`initial_state`), so the full
    model never sits on one device.

    Args:
      init_params: rng -> boxed (nn.Partitioned) DiT params.
      abstract_frozen: abstract boxed frozen params (e.g. {"vae": ...}); only their shardings are made
        here, the values are attached with `attach_frozen` (they come from converted weights).
    Returns:
      (state with `frozen` = {}, shardings), `shardings` a TrainState of NamedShardings.
    """
    boxed_params = jax.eval_shape(init_params, jax.random.key(0))
    _, shardings = train_state_shapes(boxed_params, tx, mesh, rules, use_ema, abstract_frozen)
    return initial_state(init_params, tx, rng, mesh, rules, shardings), shardings


def initial_state(
    init_params: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    rng: jax.Array,
    mesh: jax.sharding.Mesh,
    rules: LogicalRules,
    shardings: TrainState,
) -> TrainState:
    """The random initial TrainState (`frozen` = {}) made in `shardings` (`train_state_shapes`'); an EMA
    when the shardings have one."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):

        def init(rng):
            params = nn.meta.unbox(init_params(rng))
            return TrainState(
                step=jnp.zeros((), STEP_DTYPE),
                params=params,
                opt_state=tx.init(params),
                frozen={},
            )

        state = jax.jit(init, out_shardings=shardings.replace(frozen={}, ema_params=None))(rng)
    # Not in `init`: there XLA (xla_allow_excess_precision) would start a float32 EMA of bfloat16 params
    # from the initialiser's values before their rounding, not from the params.
    use_ema = shardings.ema_params is not None
    return state.replace(ema_params=initial_ema(state.params) if use_ema else None)


def attach_frozen(state: TrainState, shardings: TrainState, frozen: Any) -> TrainState:
    """Puts host (or device) frozen parameters into `state` with their shardings, each device its shards
    (`put_sharded`: no all-gather of every leaf from every process)."""
    return state.replace(frozen=jax.tree.map(put_sharded, frozen, shardings.frozen))


def abstract_train_state(shardings: TrainState, state: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying `shardings` (a restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
