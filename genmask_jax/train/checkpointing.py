"""Checkpoints: one orbax CheckpointManager for the train state, the data iterator and the config.

Layout: `<directory>/<step>/{state, data, data_layout, config}`; `state` holds step, params, opt_state and
(if any) ema_params; `data` the grain iterator's state, one JSON per process; `data_layout` how many
data-loading groups (`parallel.data_groups`) and processes read it (a run with another layout resumes the
data by step; a checkpoint without it had one group per process) and the global per-task batch counts (a
run with others is refused: the saved position counts both tasks' elements interleaved); `config` the
experiment config.
Saves are asynchronous (the device->host copy happens in `save`, the writing in the background) with a
keep-N policy. Restores take an abstract target carrying shardings, so a checkpoint written on one mesh
restores onto any other.

Resume order (`restore_or_init` in loop.py): the workdir's latest checkpoint, then `config.resume`
(an explicit checkpoint), then converted WAN weights (`config.init_from`), then scratch.
"""

import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from genmask_jax.data.pipeline import state_for_process_count
from genmask_jax.infer.checkpoint import CheckpointError, check_saved_params, leaf_shapes, state_metadata
from genmask_jax.train.state import initial_ema

log = logging.getLogger(__name__)

STATE, DATA, DATA_LAYOUT, CONFIG = "state", "data", "data_layout", "config"
BATCH_COUNTS = ("batch_seg", "batch_gen")  # data_layout's global per-task counts of a step


def _checkpointable(iterator) -> bool:
    """grain iterators (and anything with get_state / set_state) are saved with the state."""
    return hasattr(iterator, "get_state") and hasattr(iterator, "set_state")


def data_layout(iterator) -> dict[str, int]:
    """How a run reads its data: `group_count` distinct streams (the iterator's data shard count, see
    `make_train_iterator`; an iterator without one has a stream per process) over `process_count`, and the
    global per-task counts of a step (`BATCH_COUNTS`) where the iterator tells its share of them."""
    count = jax.process_count()
    groups = int(getattr(iterator, "process_count", count))
    layout = {"group_count": groups, "process_count": count}
    if all(hasattr(iterator, name) for name in BATCH_COUNTS):
        layout.update({name: groups * int(getattr(iterator, name)) for name in BATCH_COUNTS})
    return layout


def _streams(layout: Mapping[str, int]) -> tuple[int, int]:
    return layout["group_count"], layout["process_count"]


def check_saved_batch(saved: Mapping[str, int], current: Mapping[str, int], where: str) -> None:
    """Raises one CheckpointError line when the data position in `where` was saved under other global
    per-task counts than this run's (`data_layout`s): it counts both tasks' elements interleaved, so read
    under other counts it skips and repeats examples, or puts generation examples in the segmentation
    batch. Counts that only this run knows (a checkpoint that records none) are trusted, with a warning."""
    if not all(name in current for name in BATCH_COUNTS):
        return
    this = "seg={batch_seg} gen={batch_gen}".format(**current)
    if not all(name in saved for name in BATCH_COUNTS):
        log.warning("%s does not record the batch its data position was saved with: resuming it as "
                    "this run's (%s)", where, this)
        return
    before = "seg={batch_seg} gen={batch_gen}".format(**saved)
    if before != this:
        raise CheckpointError(
            f"{where}: its data position was saved with config.batch {before}, this run has {this}: resume "
            "with the saved batch (config.microbatches splits it to fit memory); or carry its weights over "
            "(the optimizer state and the data position start afresh): `python -m convert.export "
            "CHECKPOINT DST`, then start a new run from DST/transformer with --config.init_from."
        )


def _drop_none(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tree.items() if v is not None}


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the three items above; `keep` newest steps stay
    (None: all)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if keep is not None and keep < 1:  # orbax's max_to_keep=0 deletes every checkpoint as it is saved
            raise ValueError(f"keep must be >= 1 (or None: keep all), got {keep}")
        # orbax needs absolute paths; a relative workdir (the demo's `runs/demo`) is taken from the cwd.
        directory = os.fspath(directory)
        self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only, read_only=read_only
        )
        handlers = {
            STATE: ocp.StandardCheckpointHandler(),
            DATA: grain.checkpoint.CheckpointHandler(),
            DATA_LAYOUT: ocp.JsonCheckpointHandler(),
            CONFIG: ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        trainable: Mapping[str, Any],
        data_iterator=None,
        config: ml_collections.ConfigDict | Mapping | None = None,
        force: bool = True,
    ) -> bool:
        """Saves `trainable` (TrainState.trainable()), the iterator state and the config at `step`.

        Arrays are stored in chunks of at most 64 MiB, as converted weights are: a reader then holds one
        chunk-sized buffer per array in flight, not a whole stacked (scanned) array (BENCHMARKS.md).
        """
        from convert.checkpoint_io import chunked_save_args

        state = _drop_none(trainable)
        items = {STATE: ocp.args.StandardSave(state, save_args=chunked_save_args(state))}
        if _checkpointable(data_iterator):
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
            items[DATA_LAYOUT] = ocp.args.JsonSave(data_layout(data_iterator))
        if config is not None:
            as_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
            items[CONFIG] = ocp.args.JsonSave(_jsonable(as_dict))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(
        self, step: int | None, abstract_trainable: Mapping[str, Any], data_iterator=None
    ) -> dict[str, Any]:
        """Restores the state (onto the shardings carried by `abstract_trainable`) and, if given and
        saved, the data iterator in place. Returns the restored trainable dict (None entries kept).

        EMA parameters this run wants but the checkpoint lacks start from the restored params; saved ones
        it does not want are not read (both with a warning). An optimizer state of another structure
        (another optimizer config) raises one CheckpointError line."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        saved_tree = state_metadata(self.manager, step)
        where = f"checkpoint {self.directory}/{step}"
        for key in ("params", "ema_params"):  # plain dicts; a changed model shows here first
            if abstract_trainable.get(key) is not None and saved_tree.get(key) is not None:
                check_saved_params(saved_tree[key], abstract_trainable[key], f"{where} ({key})")
        wanted = _drop_none(abstract_trainable)
        if "opt_state" in wanted and "opt_state" in saved_tree:
            check_saved_opt_state(saved_tree["opt_state"], wanted["opt_state"], where)
        start_ema = "ema_params" in wanted and saved_tree.get("ema_params") is None
        if start_ema:
            log.warning("%s has no EMA parameters (saved with ema_decay 0): the EMA starts from the "
                        "restored params", where)
            del wanted["ema_params"]
        unwanted = sorted(set(_drop_none(saved_tree)) - set(wanted))
        if unwanted:
            log.warning("%s: not restoring its %s (this run has none)", where, ", ".join(unwanted))
        items = {} if unwanted else {STATE: ocp.args.StandardRestore(wanted)}
        saved = set(self.item_names(step))
        data_dir, saved_layout = self.directory / str(step) / DATA, None
        if _checkpointable(data_iterator) and DATA in saved:
            saved_layout, layout = self._saved_data_layout(step, data_dir, saved), data_layout(data_iterator)
            check_saved_batch(saved_layout, layout, where)
            if _streams(saved_layout) == _streams(layout):
                items[DATA], saved_layout = grain.checkpoint.CheckpointRestore(data_iterator), None
        elif data_iterator is not None and DATA in saved:
            log.warning(
                "checkpoint %s/%d holds a data position, but this run's data iterator (%s) cannot take one "
                "(no get_state/set_state); its data restarts",
                self.directory, step, type(data_iterator).__name__,
            )
        elif data_iterator is not None:
            log.warning(
                "checkpoint %s/%d has no data iterator state; the data restarts", self.directory, step
            )
        restored = self.manager.restore(step, args=ocp.args.Composite(**items)) if items else {}
        if saved_layout is not None:
            # Every process saved the same position (each group reads as many elements per step).
            saved_state = json.loads(
                (data_dir / f"process_0-of-{saved_layout['process_count']}.json").read_text()
            )
            log.warning(
                "checkpoint %s/%d read its data as %s, this run as %s: resuming the data by step",
                self.directory, step, saved_layout, layout,
            )
            data_iterator.set_state(
                state_for_process_count(saved_state, saved_layout["group_count"], data_iterator)
            )
        if unwanted:  # orbax's StandardRestore reads the saved tree whole; a subset needs partial_restore
            state = dict(_restore_subset(self.directory / str(step) / STATE, wanted))
        else:
            state = dict(restored[STATE])
        if start_ema:
            state["ema_params"] = initial_ema(state["params"])
        return {k: state.get(k) for k in abstract_trainable}

    def _saved_data_layout(self, step: int, data_dir: epath.Path, items: set[str]) -> dict[str, int]:
        """The `data_layout` of the run that saved `step` (whose items are `items`); a checkpoint from
        before it was recorded had a data stream per process, one from before the batch counts were has
        them in its config (`config.batch`, what the loop's iterator reads)."""
        if DATA_LAYOUT in items:
            args = ocp.args.Composite(**{DATA_LAYOUT: ocp.args.JsonRestore()})
            layout = {k: int(v) for k, v in self.manager.restore(step, args=args)[DATA_LAYOUT].items()}
        else:
            count = _saved_process_count(data_dir)
            layout = {"group_count": count, "process_count": count}
        if not all(name in layout for name in BATCH_COUNTS) and CONFIG in items:
            batch = self.restore_config(step).get("batch") or {}
            if "seg" in batch and "gen" in batch:
                layout.update(batch_seg=int(batch["seg"]), batch_gen=int(batch["gen"]))
        return layout

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def item_names(self, step: int) -> list[str]:
        path = self.directory / str(step)
        return [p.name for p in path.iterdir()] if path.exists() else []

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _restore_subset(directory: epath.Path, wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `wanted` (abstract arrays with shardings) from the state saved in `directory`."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(wanted)
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(
            directory, args=ocp.args.PyTreeRestore(wanted, restore_args=restore_args, partial_restore=True)
        )


def check_saved_opt_state(saved: Any, abstract: Any, where: str) -> None:
    """Raises one CheckpointError line when the saved optimizer state is not this run's (orbax's own
    message is a page of tree dump)."""
    found, expected = leaf_shapes(saved), leaf_shapes(abstract)
    if found == expected:
        return
    differs = sorted(found.keys() ^ expected.keys()) or sorted(k for k in found if found[k] != expected[k])
    raise CheckpointError(
        f"{where}: its optimizer state ({len(found)} arrays) is not this run's ({len(expected)}; first "
        f"difference at {differs[0]}). Either the optimizer config changed since it was saved "
        "(optimizer.name, optimizer.grad_clip 0 <-> > 0, optimizer.muon_conv_kernels): resume with the "
        "saved config; or it is a Muon run with model.dit.scan_layers saved before Muon took each scanned "
        "layer's kernel as a matrix (its state splits the parameters between Muon and AdamW as this code "
        "never does), which no config resumes. Either way its weights carry over (the optimizer state and "
        "the data position start afresh): `python -m convert.export CHECKPOINT DST`, then start a new run "
        "from DST/transformer with --config.init_from."
    )


def _saved_process_count(data_dir: epath.Path) -> int:
    """The process count of the run that saved the data state in `data_dir` (grain's file names)."""
    counts = {int(m.group(1)) for p in data_dir.iterdir() if (m := re.search(r"-of-(\d+)\.json$", p.name))}
    if len(counts) != 1:
        raise FileNotFoundError(f"no data iterator state of one process count in {data_dir}")
    return counts.pop()


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def tree_equal_report(a, b) -> list[str]:
    """Paths where two pytrees differ (structure, shape or value); used by tests and debugging."""
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    if tree_a != tree_b:
        return [f"structure differs: {tree_a} vs {tree_b}"]
    out = []
    for (path, x), (_, y) in zip(flat_a, flat_b):
        x, y = np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y))
        if x.shape != y.shape or not np.array_equal(x, y):
            out.append(jax.tree_util.keystr(path))
    return out
