"""Two processes with jax.distributed on 127.0.0.1 run the sharded train step and save and restore a
checkpoint (2 CPU devices each, a (2, 2, 1) mesh over the 4 global devices)."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax
import numpy as np
from train_helpers import tiny_config
from genmask_jax.train import loop

config = tiny_config(total_steps=2, **{{
    "checkpoint.every_steps": 2, "mesh.shape": (2, 2, 1), "batch.seg": 4, "batch.gen": 4,
    "distributed.mode": "on", "distributed.coordinator_address": {address!r},
    "distributed.num_processes": 2, "distributed.process_id": {pid}}})

def checksum(state):
    return float(jax.jit(lambda p: sum(jax.numpy.sum(x) for x in jax.tree.leaves(p)),
                         out_shardings=jax.sharding.NamedSharding(
                             jax.sharding.Mesh(jax.devices(), ("d",)), jax.sharding.PartitionSpec()))(
                         state.params))

trained, history = loop.train(config, {workdir!r})
restored, none = loop.train(config, {workdir!r})   # workdir has step 2: restores, runs no step
out = {{"process": jax.process_index(), "count": jax.process_count(), "devices": jax.device_count(),
        "losses": [h["loss"] for h in history], "restored_step": int(restored.step), "none": none,
        "trained": checksum(trained), "restored": checksum(restored)}}
with open({out!r} + f".{{jax.process_index()}}", "w") as f:
    json.dump(out, f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_train_save_and_restore(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    out = str(tmp_path / "result")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = []
    for pid in range(2):
        script = _WORKER.format(root=ROOT, tests=os.path.join(ROOT, "tests"), address=address, pid=pid,
                                workdir=str(tmp_path / "work"), out=out)
        procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=900)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    results = [json.load(open(f"{out}.{pid}")) for pid in range(2)]
    for r in results:
        assert r["count"] == 2 and r["devices"] == 4 and len(r["losses"]) == 2
        assert r["restored_step"] == 2 and r["none"] == []
        assert r["restored"] == r["trained"]  # the restored parameters are the saved ones
    assert results[0]["losses"] == results[1]["losses"]  # one global computation
    saved = tmp_path / "work" / "checkpoints" / "2"
    assert {"config", "data", "state"} <= set(os.listdir(saved))
    # grain's handler writes one iterator state per process.
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(saved / "data"))


def test_distributed_args_from_config_then_environment():
    from genmask_jax.parallel.multihost import distributed_args, maybe_initialize

    env = {"GENMASK_COORDINATOR_ADDRESS": "10.0.0.1:1234", "GENMASK_NUM_PROCESSES": "4",
           "GENMASK_PROCESS_ID": "3"}
    assert distributed_args({}, env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                         "process_id": 3}
    config = {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}
    assert distributed_args(config, env) == {"coordinator_address": "h:1", "num_processes": 2,
                                             "process_id": 0}
    assert distributed_args({}, {}) == {}
    assert maybe_initialize({"mode": "off"}, env) is False
    assert maybe_initialize({"mode": "off"}, {"GENMASK_DISTRIBUTED": "1"}) is False  # the config wins
    assert maybe_initialize({"mode": "auto"}, {}) is False  # nothing asks for it: single process
    with pytest.raises(ValueError, match="mode"):
        maybe_initialize({"mode": "maybe"}, {})
