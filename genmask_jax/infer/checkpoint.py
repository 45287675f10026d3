"""Loading a trained GenMask checkpoint for inference.

A checkpoint is named by a training workdir (`<workdir>/checkpoints/<step>`, latest finalized step), a
checkpoint manager directory (latest finalized step) or one step folder; a step still being saved is
never read. Only the DiT parameters (EMA if the run kept them) are read (orbax partial restore: no
optimizer state), directly into their shardings on a mesh of this process's devices, or as host numpy
arrays (`restore_dit_params(mesh=None)`, for `convert.export`); saved with the other
`model.dit.scan_layers`, their blocks are stacked or unstacked into the config's layout. The frozen VAE
comes from `config.vae_from`, else it is the run's random VAE (drawn from `config.seed` exactly as
training drew it). The experiment config is the one saved with the checkpoint unless one is given; a
given config whose model or VAE differs from the saved one gets a warning, and one that would decode with
another VAE than the run trained with (a random VAE for a run on converted weights, or a random VAE of
another seed) is refused: its masks and images would be noise.
"""

import dataclasses
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from convert import checkpoint_io as io
from convert.checkpoint_io import ConversionError
from genmask_jax.models import build
from genmask_jax.models.genmask import GenMask
from genmask_jax.parallel import multihost
from genmask_jax.parallel.mesh import config_mesh, make_mesh
from genmask_jax.parallel.sharding import LogicalRules, logical_sharding, rules_from_config

log = logging.getLogger(__name__)

STATE, CONFIG = "state", "config"
# What reading a step whose array files are missing or cut short advises.
ANOTHER_STEP = "pass another step's folder as the checkpoint, or copy this one again whole"


class CheckpointError(FileNotFoundError):
    """A checkpoint path that names no usable checkpoint (the message says why, in one line)."""


@dataclasses.dataclass
class LoadedModel:
    """Everything inference needs: the task model, its parameters on `mesh`, and where they came from."""

    config: ml_collections.ConfigDict
    model: GenMask
    dit_params: Any
    vae_params: Any
    mesh: jax.sharding.Mesh
    rules: LogicalRules
    step: int
    directory: epath.Path  # the checkpoint manager directory
    params_key: str = "params"  # which parameters were restored: "ema_params" | "params"

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(int(x) for x in self.config.data.resolution)


def resolve(path: str | os.PathLike) -> tuple[epath.Path, int]:
    """(manager directory, step) for a workdir, a manager directory (its latest finalized step) or a step
    folder; a local path is made absolute (orbax restores only absolute paths; the demo's
    `runs/demo/train` is relative). A training run may be saving meanwhile: see `is_finalized`."""
    path = epath.Path(path if "://" in str(path) else os.path.abspath(path))
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if re.fullmatch(r"\d+", path.name) and (path / STATE).exists():
        if not is_finalized(path):
            raise CheckpointError(f"checkpoint {path} is not finalized (still being saved, or its save was "
                                  "interrupted): pass another step or its parent folder")
        return path.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    steps = sorted(
        (int(p.name) for p in path.iterdir() if re.fullmatch(r"\d+", p.name) and (p / STATE).exists()),
        reverse=True,
    )
    # Newest first: on GCS each test is a request.
    step = next((s for s in steps if is_finalized(path / str(s))), None)
    if step is None:
        unfinished = f" ({len(steps)} not finalized: still being saved?)" if steps else ""
        raise CheckpointError(f"no checkpoint steps (folders <step>/{STATE}) in {path}{unfinished}")
    return path, step


def is_finalized(step_dir: epath.Path) -> bool:
    """orbax's own test of a finished save: a local step is written under a temporary name and renamed
    when done, while on GCS it is written in place and finalized last by its commit_success.txt."""
    return ocp.step.is_path_finalized(step_dir)


def _manager(directory: epath.Path, item: str, handler) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    return ocp.CheckpointManager(directory, options=options, item_handlers={item: handler})


def saved_config(directory: epath.Path, step: int) -> ml_collections.ConfigDict:
    """The experiment config saved with checkpoint `step`, its `data` section laid over today's
    `default_data_config()` and every field added since filled in (`with_current_fields`) and its tuples
    tuples again (`with_tuples`).

    Read by the JSON handler alone: a CheckpointManager would start JAX's backends, and the config
    is needed before `jax.distributed.initialize`, which must come first (its `distributed` section).
    That section describes the training job: its coordinator address, process count and process id
    (process 0's, when given as flags) are cleared (`multihost.unset_job_fields`) and its mode is
    "auto", so that this job's own launch decides (the environment, launch/gpu.sh's
    GENMASK_DISTRIBUTED=1, or `--config.distributed.*`): the demo's "off" made every process of a
    multi-process evaluation evaluate the whole split, and a run trained with "on" failed on one machine
    for want of a coordinator.
    """
    saved = with_tuples(stored_config(directory, step))
    if isinstance(saved.get("distributed"), dict):
        saved["distributed"] = {**multihost.unset_job_fields(saved["distributed"]), "mode": "auto"}
    return with_current_fields(saved)


# The only fields the experiment configs hold as lists; JSON saved every tuple as a list too.
LIST_FIELDS = frozenset({"sharding.logical_axis_rules"})


def with_tuples(saved: Any, path: str = "") -> Any:
    """A config read back from JSON with its lists as tuples (resolution, mesh.shape, patch_size), the
    type the experiment configs give them, except `LIST_FIELDS`: `--config.data.resolution='(64, 64)'`
    overrides a tuple, while config_flags refuses to override a list."""
    if isinstance(saved, dict):
        return {key: with_tuples(value, f"{path}.{key}" if path else key) for key, value in saved.items()}
    if isinstance(saved, list) and path not in LIST_FIELDS:
        return tuple(with_tuples(value, path) for value in saved)
    return saved


def stored_config(directory: epath.Path, step: int) -> dict:
    """The experiment config saved with checkpoint `step` as stored (JSON: lists for tuples, only the
    fields that existed then)."""
    path = epath.Path(directory) / str(step) / CONFIG
    if not path.exists():
        raise CheckpointError(f"checkpoint {directory}/{step} has no saved config; pass --config")
    return dict(ocp.JsonCheckpointHandler().restore(path))


def with_current_fields(saved: dict) -> ml_collections.ConfigDict:
    """A saved experiment config (plain dict) as a ConfigDict with every field added since it was saved:
    `data` laid over today's `default_data_config()`, `model.dit` over `DiTConfig`'s defaults (e.g.
    `residual_dtype`), `ema_warmup` False (the EMA of a run saved before it had no warmup); the saved
    values win. Without them a config saved before a field existed cannot be overridden
    (`--config.data.x=...`: a locked ConfigDict adds no field) and code reading it needs a second copy of
    each default."""
    from genmask_jax.data.pipeline import default_data_config
    from genmask_jax.models.dit import DiTConfig

    if isinstance(saved.get("data"), dict):
        saved = {**saved, "data": _merged(default_data_config().to_dict(), saved["data"])}
    model = saved.get("model")
    if isinstance(model, dict) and isinstance(model.get("dit"), dict):
        fields = dataclasses.fields(DiTConfig)
        defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
        saved = {**saved, "model": {**model, "dit": {**defaults, **model["dit"]}}}
    return ml_collections.ConfigDict({"ema_warmup": False, **saved})


def _merged(defaults: dict, saved: dict) -> dict:
    out = dict(defaults)
    for key, value in saved.items():
        both_dicts = isinstance(value, dict) and isinstance(defaults.get(key), dict)
        out[key] = _merged(defaults[key], value) if both_dicts else value
    return out


def as_json(value: Any) -> Any:
    """`value` as the saved config holds it (tuples as lists), so a config compares with a saved one."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return json.loads(json.dumps(value, default=lambda x: x.item() if hasattr(x, "item") else str(x)))


def vae_source(config) -> tuple[str, Any] | None:
    """Where the frozen VAE of `config` comes from: ("converted", vae_from), ("random", seed), or None
    (no VAE)."""
    if not config.get("model") or not config.model.get("vae"):
        return None
    return ("converted", config.vae_from) if config.get("vae_from") else ("random", int(config.seed))


def check_against_saved(config, saved, where: str) -> None:
    """Warns when a given config's model or VAE source differs from the one saved with the checkpoint;
    raises CheckpointError when its VAE cannot be the run's (a random one instead of the converted
    weights, or a random one of another seed)."""
    for name in ("dit", "vae"):
        if saved.get("model") and as_json(config.model.get(name)) != as_json(saved.model.get(name)):
            log.warning("%s: config.model.%s differs from the one saved with the checkpoint", where, name)
    used, given = vae_source(saved), vae_source(config)
    if used == given or used is None or given is None:
        return
    if given[0] == "random":
        fix = (f"pass --config.seed={used[1]}" if used[0] == "random"
               else "pass --config.vae_from=<the converted VAE>")
        raise CheckpointError(
            f"{where} was trained with {describe_vae(used)}; this config would decode with "
            f"{describe_vae(given)}, and its outputs would be noise: {fix}, or leave out --config to use the "
            "saved one"
        )
    log.warning("%s: this config decodes with %s, the run was trained with %s", where, describe_vae(given),
                describe_vae(used))


def describe_vae(source: tuple[str, Any]) -> str:
    """A `vae_source` in words: 'the converted VAE <path>' or 'a random VAE of seed <seed>'."""
    kind, value = source
    return f"the converted VAE {value}" if kind == "converted" else f"a random VAE of seed {value}"


def inference_mesh(config: ml_collections.ConfigDict, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """A mesh over this process's devices (or `devices`, one host's): the experiment's mesh shape if it
    fits them, else all of them on the fsdp axis (each process runs inference on its own examples)."""
    devices = jax.local_devices() if devices is None else devices
    try:
        return config_mesh(config, devices)
    except ValueError:
        return make_mesh((1, -1, 1), devices=devices)


def state_metadata(manager: ocp.CheckpointManager, step: int) -> dict:
    """The train state of checkpoint `step` as a tree of array metadata (shapes; no array is read).
    Raises FileNotFoundError when its metadata file is missing (a damaged copy)."""
    tree = manager.item_metadata(step)[STATE]
    if tree is None:  # what orbax makes of a missing state/_METADATA
        raise FileNotFoundError(f"no metadata file {manager.directory}/{step}/{STATE}/_METADATA")
    tree = getattr(tree, "tree", tree)
    return tree if isinstance(tree, dict) else {}


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'blocks/attn/kernel' (or '1/0/mu/w') -> shape of every leaf. orbax's metadata keeps tuple
    positions and names NamedTuple fields by dict keys, so indices, keys and attribute names all print
    alike and a saved tree compares with the live one."""

    def name(key) -> str:
        return str(next((getattr(key, a) for a in ("key", "idx", "name") if hasattr(key, a)), key))

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path): tuple(x.shape) for path, x in flat}


def check_saved_params(saved: Any, abstract: Any, where: str) -> None:
    """Raises one CheckpointError line naming missing and unexpected parameters and shape mismatches
    between `saved` (a checkpoint's metadata tree) and `abstract` (anything with shapes). orbax's partial
    restore would hand back a parameter it did not find as its abstract target, and its full restore
    reports a shape mismatch without the parameter's name."""
    found, expected = leaf_shapes(saved), leaf_shapes(abstract)
    listed = lambda names: ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")  # noqa: E731
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    mismatched = [f"{k} {found[k]} vs {expected[k]}" for k in sorted(found.keys() & expected.keys())
                  if found[k] != expected[k]]
    problems = [f"{len(names)} {what} ({listed(names)})" for what, names in
                (("missing", missing), ("unexpected", unexpected), ("saved vs expected shapes", mismatched))
                if names]
    if problems:
        raise CheckpointError(f"{where} does not match the config's model: {'; '.join(problems)}")


def abstract_dit_params(model: GenMask, mesh: jax.sharding.Mesh | None, rules: LogicalRules | None) -> Any:
    """The DiT's parameters as ShapeDtypeStructs, sharded by their logical axes under `rules` on `mesh`
    (with `mesh=None`, without shardings)."""
    boxed = build.abstract_dit(model)
    if mesh is None:
        return nn.meta.unbox(boxed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        shardings = logical_sharding(boxed, mesh, rules)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed), shardings
    )


def saved_scan_layers(saved_params: Any) -> bool | None:
    """Whether saved DiT parameters (or their metadata) are in the nn.scan layout (`blocks`, a leading
    layer axis) or not (`blocks_0` ... `blocks_{L-1}`); None when they hold no blocks."""
    if not isinstance(saved_params, dict):
        return None
    if "blocks" in saved_params:
        return True
    return False if any(re.fullmatch(r"blocks_\d+", name) for name in saved_params) else None


def with_scan_layers(params: Any, model: GenMask, target: Any) -> Any:
    """DiT parameters in the other scan layout -> `model.dit.scan_layers`'s, as `target` (abstract
    parameters with shardings, or without for host numpy arrays) lays them out: the same weights."""
    from convert import wan_dit  # lazily, as train.loop: the converter pulls in the file readers

    scan_layers = model.dit.scan_layers
    if jax.tree.leaves(target)[0].sharding is None:
        return wan_dit.with_scan_layers(params, scan_layers)
    shardings = jax.tree.map(lambda x: x.sharding, target)
    relayout = jax.jit(lambda p: wan_dit.with_scan_layers(p, scan_layers), out_shardings=shardings)
    return relayout(params)


def restore_dit_params(
    directory: epath.Path,
    step: int,
    model: GenMask,
    mesh: jax.sharding.Mesh | None,
    rules: LogicalRules | None,
    use_ema: bool = True,
    saved_dtypes: bool = False,
) -> tuple[Any, str]:
    """DiT parameters of checkpoint `step` and their key ("ema_params" | "params").

    On `mesh`, sharded by their logical axes under `rules`; with `mesh=None`, as host numpy arrays
    (exporting needs no device: a run's weights need not fit one), in the model's param_dtype or, with
    `saved_dtypes`, as saved (the EMA is kept in float32 whatever the param_dtype: an export writes it
    so). Parameters saved with the other `scan_layers` (a config override at inference) are restored as
    saved, then stacked or unstacked. Array files missing or cut short raise one CheckpointError line.
    """
    where = f"checkpoint {directory}/{step}"
    with (io.reporting_damage(where, ANOTHER_STEP, CheckpointError),
          _manager(directory, STATE, ocp.PyTreeCheckpointHandler()) as manager):
        saved = state_metadata(manager, step)
    key = "ema_params" if use_ema and saved.get("ema_params") is not None else "params"
    saved_params = saved.get(key) or {}
    scanned = saved_scan_layers(saved_params)
    as_saved = model
    if scanned is not None and scanned != model.dit.scan_layers:
        as_saved = dataclasses.replace(model, dit=dataclasses.replace(model.dit, scan_layers=scanned))
        log.info("%s/%d: saved with scan_layers=%s, converted to the config's", directory, step, scanned)
    abstract = abstract_dit_params(as_saved, mesh, rules)
    check_saved_params(saved_params, abstract, f"{where} ({key})")
    if mesh is None:
        host = lambda x: ocp.RestoreArgs(  # noqa: E731  (dtype None: as saved)
            restore_type=np.ndarray, dtype=None if saved_dtypes else x.dtype)
        restore_args = jax.tree.map(host, abstract)
    else:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    args = ocp.args.PyTreeRestore({key: abstract}, restore_args={key: restore_args}, partial_restore=True)
    try:
        with (io.reporting_damage(where, ANOTHER_STEP, CheckpointError),
              _manager(directory, STATE, ocp.PyTreeCheckpointHandler()) as manager):
            restored = manager.restore(step, args=ocp.args.Composite(**{STATE: args}))
    except (ValueError, KeyError) as e:
        raise CheckpointError(
            f"{where} does not match the config's model ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]})"
        ) from e
    params = restored[STATE][key]
    if as_saved is not model:
        params = with_scan_layers(params, model, abstract_dit_params(model, mesh, rules))
    return params, key


def load_vae(config, model: GenMask, mesh, rules: LogicalRules) -> Any:
    """The frozen VAE variables on `mesh`: converted weights (`config.vae_from`) or the run's random VAE."""
    if model.vae is None:
        return None
    try:
        variables, abstract = build.frozen_vae(config, model)
    except build.VAEConfigMismatch as e:
        raise CheckpointError(str(e)) from e  # one line from the inference commands, not a traceback
    except ConversionError as e:  # the saved config names the VAE where training found it
        raise CheckpointError(
            f"config.vae_from: {e} (pass --config.vae_from=<the converted VAE on this machine>)"
        ) from e
    return jax.device_put(variables, logical_sharding(abstract, mesh, rules))


def load(
    path: str | os.PathLike,
    config: ml_collections.ConfigDict | None = None,
    use_ema: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> LoadedModel:
    """Loads checkpoint `path` (workdir, manager directory or step folder) for inference.

    Args:
      config: the experiment config; None uses the one saved with the checkpoint (see the module
        docstring for a given one that differs from it).
      use_ema: take the EMA parameters when the checkpoint has them.
      mesh: defaults to `inference_mesh(config)` (this process's devices).
    """
    directory, step = resolve(path)
    if config is None:
        config = saved_config(directory, step)
    elif (directory / str(step) / CONFIG).exists():
        check_against_saved(config, saved_config(directory, step), f"checkpoint {directory}/{step}")
    model = build.build_model(config)
    if model.vae is None:  # pixels in and out need one
        raise CheckpointError(
            f"checkpoint {directory}/{step}: its config has no VAE (model.vae) (trained on precomputed "
            "latents?); pass --config=<the experiment's config> with config.vae_from"
        )
    mesh = mesh or inference_mesh(config)
    rules = rules_from_config(config.sharding.logical_axis_rules)
    vae_params = load_vae(config, model, mesh, rules)  # first: a moved vae_from fails before the DiT loads
    dit_params, key = restore_dit_params(directory, step, model, mesh, rules, use_ema)
    log.info("loaded %s of %s/%d", key, directory, step)
    return LoadedModel(config, model, dit_params, vae_params, mesh, rules, step, directory, key)
