"""The training loop: `train(config, workdir)`.

Builds the mesh, the model and the sharded state, resumes (workdir -> `config.resume` -> converted
weights `config.init_from` -> scratch), then runs the jitted step, logging metrics to
`<workdir>/metrics.jsonl` and saving checkpoints to `<workdir>/checkpoints`. A non-finite metric (the loss,
or a norm: a finite loss can come with a non-finite update) stops training with FloatingPointError before
that step is saved, so the last checkpoint stays the last good one.
"""

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from convert.checkpoint_io import reporting_damage
from genmask_jax.infer.checkpoint import ANOTHER_STEP, CheckpointError
from genmask_jax.infer.checkpoint import resolve as resolve_checkpoint
from genmask_jax.models.build import abstract_dit, abstract_frozen, build_model, dit_initializer, frozen_vae
from genmask_jax.models.dit import DiTConfig
from genmask_jax.models.genmask import TASKS, GenMask
from genmask_jax.parallel import multihost
from genmask_jax.parallel.data_groups import data_group
from genmask_jax.parallel.mesh import config_mesh
from genmask_jax.parallel.sharding import (
    batch_shard_count,
    batch_sharding,
    heads_split_problem,
    put_sharded,
    rules_from_config,
)
from genmask_jax.train import checkpointing
from genmask_jax.train.hooks import TrainHooks
from genmask_jax.train.state import (
    TrainState,
    abstract_train_state,
    attach_frozen,
    initial_ema,
    initial_state,
    make_optimizer,
    train_state_shapes,
)
from genmask_jax.train.step import check_microbatch_split, make_configured_train_step, optimizer_config

log = logging.getLogger(__name__)

# Parameters re-initialised when converted weights come from a different text encoder width.
TEXT_EMBEDDER = ("condition_embedder", "text_embedder")
# DiTConfig fields that must agree between converted weights and the experiment (scan_layers need not:
# it is a layout of the same weights, changed on loading).
ARCHITECTURE_FIELDS = (
    "patch_size",
    "in_channels",
    "out_channels",
    "dim",
    "ffn_dim",
    "freq_dim",
    "num_heads",
    "num_layers",
)


def global_batch(
    local: Mapping[str, Mapping[str, np.ndarray]],
    mesh: jax.sharding.Mesh,
    rules,
    group_count: int | None = None,
) -> dict:
    """Per-process numpy sub-batches -> global arrays split over the batch axes; empty tasks dropped.

    A sub-batch holds the examples of this process's data-loading group (`parallel.data_groups`), the
    same on every process of the group; the global batch has `group_count` (default: the mesh's) times
    its rows.
    """
    sharding = batch_sharding(mesh, rules)
    if group_count is None:
        group_count = data_group(mesh, rules)[1]
    out = {}
    for task in TASKS:
        sub = {k: np.asarray(v) for k, v in local.get(task, {}).items()}
        if not sub or next(iter(sub.values())).shape[0] == 0:
            continue
        out[task] = {
            k: jax.make_array_from_process_local_data(sharding, v, (group_count * len(v), *v.shape[1:]))
            for k, v in sub.items()
        }
    return out


def merge_converted_params(fresh, loaded, fresh_cfg: DiTConfig, loaded_cfg: DiTConfig):
    """Converted WAN weights in the experiment's layout (blocks stacked or not, as `fresh_cfg.scan_layers`
    says) and dtypes, with the text-embedding MLP taken from `fresh` when text_dim differs. jax.Array
    leaves keep their sharding, host (numpy) leaves stay numpy."""
    from convert import wan_dit

    check_architecture(loaded_cfg, fresh_cfg)
    if loaded_cfg.scan_layers != fresh_cfg.scan_layers:
        log.info("converted DiT has scan_layers=%s: %s its blocks", loaded_cfg.scan_layers,
                 "stacking" if fresh_cfg.scan_layers else "unstacking")
    loaded = wan_dit.with_scan_layers(loaded, fresh_cfg.scan_layers)
    if loaded_cfg.text_dim != fresh_cfg.text_dim:
        log.info(
            "text_dim %d -> %d: re-initialising %s",
            loaded_cfg.text_dim,
            fresh_cfg.text_dim,
            "/".join(TEXT_EMBEDDER),
        )
        embedder = dict(loaded[TEXT_EMBEDDER[0]])
        embedder[TEXT_EMBEDDER[1]] = fresh[TEXT_EMBEDDER[0]][TEXT_EMBEDDER[1]]
        loaded[TEXT_EMBEDDER[0]] = embedder
    fresh_shapes = jax.tree.map(lambda x: tuple(x.shape), fresh)
    loaded_shapes = jax.tree.map(lambda x: tuple(np.shape(x)), loaded)
    if fresh_shapes != loaded_shapes:
        raise CheckpointError(
            "converted DiT parameters do not match the model: "
            f"{checkpointing.tree_equal_report(fresh_shapes, loaded_shapes)[:5]}"
        )
    # Host arrays (PyTorch files converted on the fly) stay on the host until `put_sharded` puts them in the
    # parameters' shardings: jnp.asarray would first put the whole model on one device.
    return jax.tree.map(
        lambda f, x: x.astype(f.dtype) if isinstance(x, jax.Array) else np.asarray(x, f.dtype), fresh, loaded
    )


def check_architecture(loaded_cfg: DiTConfig, fresh_cfg: DiTConfig, what: str = "converted DiT") -> None:
    """Raises CheckpointError (one line) naming the first `ARCHITECTURE_FIELDS` field where converted
    weights (`loaded_cfg`) and the experiment's DiT differ."""
    for name in ARCHITECTURE_FIELDS:
        if getattr(fresh_cfg, name) != getattr(loaded_cfg, name):
            loaded, fresh = getattr(loaded_cfg, name), getattr(fresh_cfg, name)
            raise CheckpointError(f"{what} has {name}={loaded!r}, the experiment {fresh!r}")


def converted_dit_config(path: str) -> DiTConfig:
    """The DiTConfig of the weights `config.init_from` names, from our checkpoint's config.json or a
    PyTorch checkpoint's tensor headers: no weight is read. ConversionError if they cannot be."""
    from convert import checkpoint_io, wan_dit

    if not checkpoint_io.is_flax_checkpoint(path):
        return wan_dit.infer_config(wan_dit.open_source(path))
    try:
        with open(os.path.join(path, "config.json")) as f:
            return DiTConfig.from_dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:  # another model's config.json (a VAE's) included
        raise checkpoint_io.ConversionError(f"{path}/config.json: not a converted DiT's config ({e})") from e


def check_init_from(config, fresh_cfg: DiTConfig) -> None:
    """Refuses `config.init_from` before the workdir is written: weights that are missing, unreadable or
    of another architecture than the experiment's DiT."""
    from convert.checkpoint_io import ConversionError

    try:
        loaded_cfg = converted_dit_config(config.init_from)
    except ConversionError as e:
        raise ConversionError(f"config.init_from: {e}") from e
    check_architecture(loaded_cfg, fresh_cfg, f"converted DiT {config.init_from} (config.init_from)")


def check_loop_fields(config) -> None:
    """Raises InputError (one line) for a seed, interval, batch, checkpoint count, optimizer or EMA decay
    the loop cannot use, before anything is built or written."""
    from genmask_jax.infer.cli import InputError

    if not 0 <= config.seed < 2**32:  # JAX keeps a seed's low 32 bits: 2**32 + 7 would train as seed 7
        raise InputError(f"config.seed must be in [0, 2**32), got {config.seed}")
    counts = {
        "log_every": (config.log_every, ""),
        "checkpoint.every_steps": (config.checkpoint.every_steps,
                                   "; the last step is saved anyway, so total_steps saves only at the end"),
        "microbatches": (config.microbatches, ""),
    }
    for name, (value, hint) in counts.items():
        if value < 1:
            raise InputError(f"config.{name} must be >= 1, got {value}{hint}")
    batch = dict(config.batch)
    if any(n < 0 for n in batch.values()) or sum(batch.values()) < 1:
        raise InputError(f"config.batch must count >= 0 examples per task and >= 1 in all, got {batch}")
    keep = config.checkpoint.keep
    if keep is not None and keep < 1:  # orbax's max_to_keep=0 deletes every checkpoint as it is saved
        raise InputError(f"config.checkpoint.keep must be >= 1 (or None: keep all), got {keep}")
    if not 0 <= config.ema_decay < 1:  # 1 keeps the initial weights, > 1 diverges, < 0 turned it off
        raise InputError(f"config.ema_decay must be in [0, 1) (0: no EMA), got {config.ema_decay}")
    try:
        make_optimizer(optimizer_config(config))  # an unknown name or schedule, a negative warmup
    except ValueError as e:
        raise InputError(f"config.optimizer: {e}") from None


def check_batch_split(config, mesh: jax.sharding.Mesh, rules) -> None:
    """Raises InputError (one line) unless each task's global batch splits into `config.microbatches`
    microbatches that each split over the mesh's batch shards; else the first step fails to shard it."""
    from genmask_jax.infer.cli import InputError

    shards = batch_shard_count(mesh, rules)
    try:
        check_microbatch_split(dict(config.batch), config.microbatches, shards)
    except ValueError as e:
        multiple = config.microbatches * shards
        raise InputError(
            f"config.batch on mesh {dict(mesh.shape)}: {e}; make config.batch.seg and config.batch.gen "
            f"multiples of {multiple} (microbatches x batch shards), or change config.microbatches or "
            "config.mesh.shape"
        ) from None


def check_heads_split(dit: DiTConfig, mesh: jax.sharding.Mesh, rules) -> None:
    """Raises InputError (one line) for splash attention when the DiT's heads do not split over the
    mesh's head shards: its shard_map fails the first step, after everything is built. Other attention
    implementations compute the same numbers, XLA gathering every head to every device in each layer
    (slow, and memory at 14B): a warning."""
    from genmask_jax.infer.cli import InputError

    problem = heads_split_problem(dit.num_heads, mesh, rules)
    if problem and dit.attention == "splash":
        raise InputError(f"{problem} (splash attention shards the heads)")
    if problem:
        log.warning("%s: attention gathers every head to every device in each layer", problem)


def check_quick_eval_cached(config) -> None:
    """Raises CacheMiss, as `make_train_iterator` does for the training split, when the quick evaluation
    (`config.eval_every`) would read its split from an embedding cache that lacks it; else each quick
    evaluation would fail, logged, and training go on without it. Data of that split missing on this
    machine is only warned about: training does not need it."""
    if not config.get("eval_every") or not config.data.encoder.cache_dir or not config.data.seg_sources:
        return
    from genmask_jax.data.pipeline import CACHE_SPOT_CHECKS, make_eval_iterator
    from genmask_jax.encoders.cache import CacheMiss

    split = dict(config.get("quick_eval") or {}).get("split", "val")
    try:
        batches = make_eval_iterator(config.data, split, 1, process_index=0, process_count=1)
    except Exception as e:  # noqa: BLE001  (the quick evaluation is optional; its own reads say why again)
        log.warning(
            "the quick evaluation's split %r cannot be opened (%s: %s): each quick evaluation will fail and "
            "training goes on (--config.eval_every=0 turns it off)", split, type(e).__name__, e,
        )
        return
    try:
        batches.contexts.check_covers(batches.source, "seg", split, CACHE_SPOT_CHECKS)
    except CacheMiss as e:
        raise CacheMiss(
            f"the quick evaluation (config.eval_every, quick_eval.split={split!r}): {e}; or turn it off with "
            "--config.eval_every=0"
        ) from None


def _has_checkpoint(workdir: epath.Path) -> bool:
    """Whether `workdir` holds a finalized checkpoint to resume (then `config.init_from` is not read)."""
    try:
        resolve_checkpoint(workdir / "checkpoints")
    except CheckpointError:
        return False
    return True


def _slash_path(key_path) -> str:
    return "/".join(str(k.key) for k in key_path)


def converted_target(path, fresh, shardings, mesh: jax.sharding.Mesh):
    """Abstract arrays that restore the converted checkpoint at `path` straight into the parameters'
    shardings (each host reads only its shards, in the parameters' dtype), or None when `path` holds
    PyTorch files (converted on the fly, on the host). Saved in the other scan layout, a block's leaf
    takes its sharding without (or with an unsplit) layer axis. A leaf the model lacks, or whose saved
    shape differs (a text embedder of another width), is read replicated: `merge_converted_params`
    decides."""
    from convert import checkpoint_io, wan_dit

    if not checkpoint_io.is_flax_checkpoint(path):
        return None
    fresh_leaves = {_slash_path(k): (x, s.spec) for (k, x), s in zip(
        jax.tree_util.tree_leaves_with_path(fresh), jax.tree.leaves(shardings))}

    def fresh_in_saved_layout(name: str, saved_shape: tuple[int, ...]):
        """(shape, dtype, spec) of the model's leaf `name` laid out as saved, or None."""
        stacked, layer = wan_dit.stacked_path(name)
        if name in fresh_leaves:
            x, spec = fresh_leaves[name]
            return tuple(x.shape), x.dtype, spec
        if layer is not None and stacked in fresh_leaves:  # saved unscanned, the model scans
            x, spec = fresh_leaves[stacked]
            return tuple(x.shape[1:]), x.dtype, PartitionSpec(*spec[1:])
        first = name.replace("blocks/", "blocks_0/", 1)
        if name.startswith("blocks/") and first in fresh_leaves:  # saved scanned, the model does not
            x, spec = fresh_leaves[first]
            return (saved_shape[0], *x.shape), x.dtype, PartitionSpec(None, *spec)
        return None

    def leaf(key_path, saved):
        found = fresh_in_saved_layout(_slash_path(key_path), tuple(saved.shape))
        if found is None or found[0] != tuple(saved.shape):
            replicated = NamedSharding(mesh, PartitionSpec())
            return jax.ShapeDtypeStruct(tuple(saved.shape), saved.dtype, sharding=replicated)
        shape, dtype, spec = found
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(leaf, checkpoint_io.saved_params_metadata(path))


def restore_latest(checkpointer: checkpointing.Checkpointer, abstract, data_iterator) -> dict:
    """`checkpointer.restore` of its latest step. A step it cannot read (array files missing or cut
    short: a half-synced copy, a deleted object) raises one CheckpointError line naming the step's folder.
    The step is not skipped for an earlier one: training on from there is for the user to decide."""
    step = checkpointer.latest_step()
    earlier = [s for s in checkpointer.all_steps() if s < step]
    then = f"resume from step {max(earlier)}" if earlier else "start without it (there is no earlier one)"
    # A CheckpointError (a changed model or optimizer) is already one line; a permission or network
    # error, or a config the saved data cannot resume, is not damage and passes as it is.
    with reporting_damage(f"checkpoint {checkpointer.directory}/{step}", f"remove that folder to {then}",
                          CheckpointError):
        return checkpointer.restore(step, abstract, data_iterator)


def restore_or_init(
    config,
    state: TrainState,
    shardings: TrainState,
    checkpointer,
    data_iterator,
    model: GenMask,
    initialize: Callable[[], TrainState] | None = None,
) -> tuple[TrainState, str]:
    """Applies the resume order; returns the state and a word saying where it came from.

    `state` is the initial state, or with `initialize` its abstract form (`train_state_shapes`); then
    `initialize()` makes the initial state only when no checkpoint is restored: a resume neither compiles
    nor runs the random initialisation, nor holds its state beside the restored one (twice the state's
    memory while restoring). The frozen parameters are the caller's to attach.
    """
    abstract = (state if initialize is not None else abstract_train_state(shardings, state)).trainable()
    if checkpointer.latest_step() is not None:
        restored = restore_latest(checkpointer, abstract, data_iterator)
        return state.replace(**restored), f"workdir step {int(restored['step'])}"
    if config.get("resume"):
        directory, step = resolve_checkpoint(config.resume)
        explicit = checkpointing.Checkpointer(directory, keep=None, async_save=False, read_only=True)
        with reporting_damage(f"checkpoint {directory}/{step}", ANOTHER_STEP, CheckpointError):
            restored = explicit.restore(step, abstract, data_iterator)
        explicit.close()
        return state.replace(**restored), f"checkpoint {config.resume}"
    if initialize is not None:
        state = initialize()
    if config.get("init_from"):
        from convert import wan_dit

        target = converted_target(config.init_from, state.params, shardings.params, shardings.step.mesh)
        # PyTorch files are converted on the fly straight into the experiment's layout and dtype.
        loaded_cfg, loaded = wan_dit.load(
            config.init_from, target=target, scan_layers=model.dit.scan_layers,
            param_dtype=model.dit.param_dtype,
        )
        params = merge_converted_params(state.params, loaded, model.dit, loaded_cfg)
        params = jax.tree.map(put_sharded, params, shardings.params)
        ema = initial_ema(params) if state.ema_params is not None else None
        return state.replace(params=params, ema_params=ema), f"converted weights {config.init_from}"
    return state, "scratch"


def host_frozen(config, model: GenMask) -> dict | None:
    """{"vae": host variables}: the converted weights of `config.vae_from`, else random (with a
    warning); None without a VAE."""
    from convert.checkpoint_io import ConversionError

    if model.vae is None:
        return None
    try:
        return {"vae": frozen_vae(config, model)[0]}
    except ConversionError as e:
        raise ConversionError(f"config.vae_from: {e}") from e


class MetricsWriter:
    """JSON lines on process 0: one {"step": s, name: value, ...} per logged step, and one
    {"step": s, "quick_eval/giou": ..., "quick_eval/ciou": ...} per quick evaluation.

    A local file is appended to. An object store (a `gs://` workdir) has no append: gcsfs opens "a" as
    "w", which would leave the last line alone; there the writer keeps the object's text (the lines of
    earlier runs included) and uploads all of it at every write.

    `start_step` (the step a run starts or resumes at) first drops the lines after it: a run killed
    between checkpoints logged steps that it now runs again, and the file must read as one run. The lines
    dropped are appended to `metrics.jsonl.prev`, oldest first (a fresh run in a reused workdir drops
    every line; when it restarts in turn, the older run's lines stay there).
    """

    def __init__(self, workdir: epath.Path, start_step: int | None = None):
        self.path, self.previous = workdir / "metrics.jsonl", workdir / "metrics.jsonl.prev"
        self.enabled = jax.process_index() == 0
        self._text = None  # the whole object, kept for a remote path
        if self.enabled and "://" in str(self.path):
            self._text = self.path.read_text() if self.path.exists() else ""
        if self.enabled and start_step is not None:
            self._drop_after(start_step)

    def _drop_after(self, step: int) -> None:
        text = self._text if self._text is not None else self.path.read_text() if self.path.exists() else ""
        kept, dropped = lines_up_to(text, step)
        if not dropped:
            return
        before = self.previous.read_text() if self.previous.exists() else ""
        self.previous.write_text(before + dropped)  # an object store has no append: rewritten whole
        log.warning("%s: dropping %d line(s) after step %d, where this run starts (kept in %s)",
                    self.path, dropped.count("\n"), step, self.previous)
        if self._text is not None:
            self._text = kept
            self.path.write_text(kept)  # an object is replaced whole
        else:
            partial = self.path.with_name(self.path.name + ".tmp")
            partial.write_text(kept)
            partial.replace(self.path)  # a kill now leaves the old file or the new one, never half of it

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self._text is None:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self._text += line
            self.path.write_text(self._text)


def lines_up_to(text: str, step: int) -> tuple[str, str]:
    """(the lines of metrics.jsonl `text` up to `step`, the others: after it or cut short by a kill
    mid-write), each line ending in a newline."""
    kept, dropped = [], []
    for line in text.splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
                continue
        except (ValueError, KeyError, TypeError):
            pass
        dropped.append(line + "\n")
    return "".join(kept), "".join(dropped)


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    path = epath.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def group_data_iterator(config: ml_collections.ConfigDict, group_index: int, group_count: int):
    """The training iterator of data-loading group `group_index` of `group_count` (`data_group`): its
    share of the global `config.batch` counts, read by every process of the group alike."""
    from genmask_jax.data.pipeline import make_train_iterator, split_global_batch

    seg, gen = split_global_batch(config.batch.seg, config.batch.gen, group_count)
    return make_train_iterator(
        config.data, seg, gen, config.seed, process_index=group_index, process_count=group_count
    )


def train(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    data_iterator: Iterator | None = None,
    stop_at_step: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[TrainState, list[dict]]:
    """Trains until `config.total_steps` (or `stop_at_step`); returns the final state and the metrics
    logged by this call (every step when `config.log_every` is 1).

    data_iterator: per-process batches (interfaces.md) of this process's data-loading group (the same on
        every process of a group: `parallel.data_groups`); default `group_data_iterator`.
        To be checkpointed it needs grain's `get_state()` / `set_state()`.
    """
    check_loop_fields(config)
    multihost.maybe_initialize(config.get("distributed"))
    mesh = mesh or config_mesh(config)
    rules = rules_from_config(config.sharding.logical_axis_rules)
    group_index, group_count = data_group(mesh, rules)  # raises for a mesh that host data cannot feed
    check_batch_split(config, mesh, rules)
    if data_iterator is None:  # first: a data or embedding-cache error stops before anything is built
        data_iterator = group_data_iterator(config, group_index, group_count)
    check_quick_eval_cached(config)
    workdir = epath.Path(workdir)
    model = build_model(config)
    check_heads_split(model.dit, mesh, rules)
    # Before the workdir is made: a moved or mismatched init_from or vae_from leaves nothing there.
    if config.get("init_from") and not config.get("resume") and not _has_checkpoint(workdir):
        check_init_from(config, model.dit)
    frozen = host_frozen(config, model)
    workdir.mkdir(parents=True, exist_ok=True)
    tx = make_optimizer(optimizer_config(config))
    base_rng = jax.random.key(config.seed)
    use_ema, boxed_frozen = config.ema_decay > 0, abstract_frozen(model)
    abstract, shardings = train_state_shapes(abstract_dit(model), tx, mesh, rules, use_ema, boxed_frozen)
    initialize = lambda: initial_state(  # only when nothing is restored
        dit_initializer(model), tx, jax.random.fold_in(base_rng, 0), mesh, rules, shardings
    )
    checkpointer = checkpointing.Checkpointer(
        workdir / "checkpoints", keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    state, origin = restore_or_init(
        config, abstract, shardings, checkpointer, data_iterator, model, initialize=initialize
    )
    if frozen is not None:
        state = attach_frozen(state, shardings, frozen)
    start = int(state.step)
    log.info("starting at step %d from %s", start, origin)

    step_fn = make_configured_train_step(config, model, tx, shardings, mesh, rules)
    step_rng = jax.random.fold_in(base_rng, 1)
    writer = MetricsWriter(workdir, start_step=start)
    hooks = TrainHooks(config, model, workdir, mesh, rules, start_step=start)
    history, last_saved, checked = [], checkpointer.latest_step(), start
    end = config.total_steps if stop_at_step is None else min(stop_at_step, config.total_steps)
    # On an exception too, the issued (async) save is finished: a crash must not lose the last
    # checkpoint. Nothing new is saved then: the state may be the bad one that raised.
    try:
        for step in range(start, end):
            batch = global_batch(next(data_iterator), mesh, rules, group_count)
            hooks.before_step(step, batch)  # FLOPs for the MFU; starts the profiler trace when due
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = step_fn(state, batch, step_rng)
            done = step + 1
            save = done % config.checkpoint.every_steps == 0 or done == end
            if save or done % config.log_every == 0 or done == start + 1:
                values = finite_metrics(metrics, done, last_saved, checkpointer.directory, checked)
                checked = done
                # steps/s, examples/s and ETA over the steps since the previous log (none at the first).
                values = hooks.log(done, values)
                writer.write(done, values)
                history.append({"step": done, **values})
            if save:
                checkpointer.save(done, state.trainable(), data_iterator, config)
                last_saved = done
            if hooks.after_step(done, state):  # True on SIGTERM; else quick eval / samples when due
                if last_saved != done:
                    finite_metrics(metrics, done, last_saved, checkpointer.directory, checked)  # not fetched
                    checkpointer.save(done, state.trainable(), data_iterator, config)
                log.warning("stop requested (SIGTERM): saved step %d in %s", done, checkpointer.directory)
                break
            if hooks.evaluated:  # the quick evaluation's gIoU / cIoU: a line of their own
                writer.write(done, hooks.evaluated)
    except BaseException:
        _finish_quietly(checkpointer, hooks)  # the failure that stopped training is the one reported
        raise
    hooks.close()
    checkpointer.wait()
    checkpointer.close()
    return state, history


def finite_metrics(
    metrics: Mapping[str, jax.Array], step: int, last_saved: int | None, directory, checked: int | None = None
) -> dict:
    """The step's scalar metrics as floats; FloatingPointError if any is not finite.

    Every metric counts, not the loss alone: the loss is computed before the update, so a finite loss can
    come with a non-finite gradient and non-finite new parameters (param_norm is of the new ones). Every
    save is preceded by this check, so `last_saved` is a good checkpoint. `checked`: the last step whose
    metrics were checked (or the start step): the error names the steps since, where it can have happened.
    """
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = ", ".join(f"{k} {values[k]}" for k in sorted(values, key=lambda k: k != "loss")
                    if not math.isfinite(values[k]))
    if bad:
        good = (f"The last good checkpoint is step {last_saved} in {directory}." if last_saved is not None
                else f"There is no checkpoint in {directory} yet.")
        since = ("" if checked is None or checked >= step - 1 else
                 f"; metrics are fetched only at logs and saves, so it became non-finite in steps "
                 f"{checked + 1} to {step}")
        raise FloatingPointError(
            f"non-finite {bad} at step {step} (metrics {values}){since}; stopping. {good}"
        )
    return values


def _finish_quietly(checkpointer: checkpointing.Checkpointer, hooks: TrainHooks) -> None:
    """Finishes the issued save and closes the hooks after a failure; their own errors are logged."""
    for name, finish in (("save", checkpointer.wait), ("checkpointer", checkpointer.close),
                         ("hooks", hooks.close)):
        try:
            finish()
        except Exception:  # noqa: BLE001
            log.exception("while stopping after an error: closing the %s failed too", name)
