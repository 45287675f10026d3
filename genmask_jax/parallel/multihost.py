"""Multi-host start-up: `jax.distributed.initialize` driven by the config and the environment.

Config (`config.distributed`): mode "auto" | "on" | "off", coordinator_address ("host:port"),
num_processes, process_id. Empty/zero/-1 fields fall back to the environment variables
GENMASK_COORDINATOR_ADDRESS, GENMASK_NUM_PROCESSES, GENMASK_PROCESS_ID, and then to JAX's own cluster
auto-detection (TPU pod slices, SLURM, Open MPI, ...), which needs no arguments at all.

"auto" initialises when an address or a process count > 1 is known, or when JAX detects a cluster of
more than one process; "on" always initialises (GENMASK_DISTRIBUTED=1, set by the launchers, turns
"auto" into "on"); "off" never does (single process).

With address, count and id all known, JAX's cluster detection is switched off: it would still run to
fill `local_device_ids` and, under SLURM or Open MPI, leave each process only the GPU of its local rank
(GPU 0 of every node with one task per node), where launch/gpu.sh runs one process per node owning all
its GPUs. Left to detection (no address given), JAX's choices stand: one GPU per SLURM/Open MPI task.
"""

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

ENV_PREFIX = "GENMASK_"
# The fields of `config.distributed` that say where one job's processes meet and which one this is; a
# saved run's (its process 0's) describe that job only, and `unset_job_fields` clears them.
JOB_FIELDS = {"coordinator_address": "", "num_processes": 0, "process_id": -1}


def unset_job_fields(distributed: Mapping) -> dict:
    """`distributed` (a config section, as a dict) with `JOB_FIELDS` at their "from the environment"
    values; `mode` and anything else kept."""
    return {**dict(distributed), **JOB_FIELDS}


def gather_ints(value: int) -> np.ndarray:
    """`(process_count,)` int32: `value` of every process, in process order. With several processes a
    collective that every process must enter."""
    if jax.process_count() == 1:
        return np.asarray([value], np.int32)
    from jax.experimental import multihost_utils

    return np.ravel(multihost_utils.process_allgather(np.int32(value)))


def on_process_0(
    fn: Callable[[], Any],
    others_error: Callable[[], Exception],
    is_process_0: bool | None = None,
) -> Any:
    """`fn()` on process 0 (`is_process_0`, by default `jax.process_index() == 0`), None elsewhere. When
    it raises there (any Exception), every process raises: process 0 its error, the others
    `others_error()`. With several processes a collective that every process must enter: one process
    leaving alone would leave the others waiting in the next collective."""
    if is_process_0 is None:
        is_process_0 = jax.process_index() == 0
    result, error = None, None
    if is_process_0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001  (re-raised below, once the others know)
            error = e
    failed = gather_ints(error is not None).any()
    if error is not None:
        raise error
    if failed:
        raise others_error()
    return result


def distributed_args(config: Mapping | None, environ: Mapping[str, str] = os.environ) -> dict:
    """The keyword arguments for `jax.distributed.initialize` from config, then environment."""
    config = dict(config or {})
    address = config.get("coordinator_address") or environ.get(f"{ENV_PREFIX}COORDINATOR_ADDRESS", "")
    num = int(config.get("num_processes") or environ.get(f"{ENV_PREFIX}NUM_PROCESSES", 0) or 0)
    pid = config.get("process_id", -1)
    if pid is None or int(pid) < 0:
        pid = int(environ.get(f"{ENV_PREFIX}PROCESS_ID", -1))
    args = {}
    if address:
        args["coordinator_address"] = address
    if num > 0:
        args["num_processes"] = num
    if int(pid) >= 0:
        args["process_id"] = int(pid)
    return args


def _detected_process_count() -> int:
    """The process count of the cluster `jax.distributed.initialize()` would detect, 0 if none.

    Opt-in-only cluster types are skipped, as JAX's own detection skips them: mpi4py's reports itself
    present whenever the package imports, on any HPC image, in or out of an MPI job.
    """
    from jax._src import clusters

    for env in clusters.ClusterEnv._cluster_types:
        if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
            return int(env.get_process_count())
    return 0


def maybe_initialize(config: Mapping | None, environ: Mapping[str, str] = os.environ) -> bool:
    """Calls `jax.distributed.initialize` if the config/environment asks for it; returns whether it did.

    Must run before anything touches a JAX device. Safe to call twice.
    """
    config = dict(config or {})
    mode = config.get("mode", "auto")
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed.mode must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "auto" and environ.get(f"{ENV_PREFIX}DISTRIBUTED") == "1":
        mode = "on"  # set by launch/tpu.sh and launch/gpu.sh on multi-process runs
    if mode == "off":
        return False
    if jax.distributed.is_initialized():
        return True
    args = distributed_args(config, environ)
    wanted = mode == "on" or "coordinator_address" in args or args.get("num_processes", 1) > 1
    if mode == "auto" and not wanted:
        try:
            wanted = _detected_process_count() > 1
        except Exception:  # a private JAX module: if its layout changes, stay single-process
            wanted = False
    if not wanted:
        return False
    if {"coordinator_address", "num_processes", "process_id"} <= args.keys():
        args["cluster_detection_method"] = "deactivate"  # all local devices stay visible (docstring)
    log.info("jax.distributed.initialize(%s)", args)
    jax.distributed.initialize(**args)
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
