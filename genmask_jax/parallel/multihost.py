"""Multi-host start-up: `jax.distributed.initialize` driven by the config and the environment.

Config (`config.distributed`): mode "auto" | "on" | "off", coordinator_address ("host:port"),
num_processes, process_id. Empty/zero/-1 fields fall back to the environment variables
GENMASK_COORDINATOR_ADDRESS, GENMASK_NUM_PROCESSES, GENMASK_PROCESS_ID, and then to JAX's own cluster
auto-detection (TPU pod slices, SLURM, Open MPI, ...), which needs no arguments at all.

"auto" initialises when an address or a process count > 1 is known, or when JAX detects a cluster;
"on" always initialises (GENMASK_DISTRIBUTED=1, set by the launchers, turns "auto" into "on");
"off" never does (single process).
"""

import logging
import os
from collections.abc import Mapping

import jax

log = logging.getLogger(__name__)

ENV_PREFIX = "GENMASK_"


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


def _cluster_detected() -> bool:
    from jax._src import clusters

    return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types)


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
            wanted = _cluster_detected()
        except Exception:  # a private JAX module: if its layout changes, stay single-process
            wanted = False
    if not wanted:
        return False
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
