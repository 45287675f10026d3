"""Two processes with jax.distributed on 127.0.0.1 run the sharded train step and save and restore a
checkpoint (2 CPU devices each, a (2, 2, 1) mesh over the 4 global devices), then go on with the tensor
axis across the two processes, where both hold every batch shard and so must load the same data."""

import json
import os
import subprocess
import sys

import pytest
from train_helpers import free_port, wait_all, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from train_helpers import tiny_config
from genmask_jax.data.pipeline import make_train_iterator
from genmask_jax.parallel.data_groups import data_group
from genmask_jax.parallel.mesh import make_mesh
from genmask_jax.parallel.sharding import rules_from_config
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

def seg_images(mesh):  # the first global batch's seg images as train() feeds them, gathered
    rules = rules_from_config(config.sharding.logical_axis_rules)
    group, groups = data_group(mesh, rules)
    local = next(loop.group_data_iterator(config, group, groups))
    images = loop.global_batch(local, mesh, rules, groups)["seg"]["image"]
    gathered = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, PartitionSpec()))(images)
    return np.asarray(gathered.addressable_data(0))

trained, history = loop.train(config, {workdir!r})
restored, none = loop.train(config, {workdir!r})   # workdir has step 2: restores, runs no step
# Each (fsdp, tensor) row pairs a device of each process, as jax.make_mesh lays (1, 4, 4) on v5e:4x4.
d = jax.devices()
across = Mesh(np.array([[[d[0], d[2]], [d[1], d[3]]]]), ("data", "fsdp", "tensor"),
              axis_types=(AxisType.Auto,) * 3)
config.total_steps = 3
_, resumed = loop.train(config, {workdir!r}, mesh=across)  # restores step 2 onto it, runs step 3
whole = next(make_train_iterator(config.data, 4, 4, config.seed, process_index=0, process_count=1))
whole = whole["seg"]["image"]
aligned, interleaved = seg_images(make_mesh((2, 2, 1))), seg_images(across)
out = {{"process": jax.process_index(), "count": jax.process_count(), "devices": jax.device_count(),
        "losses": [h["loss"] for h in history], "restored_step": int(restored.step), "none": none,
        "trained": checksum(trained), "restored": checksum(restored),
        "resumed_losses": [h["loss"] for h in resumed],
        "batch_across": np.array_equal(interleaved, whole),
        "batch_aligned": sorted(x.tobytes() for x in aligned) == sorted(x.tobytes() for x in whole)}}
with open({out!r} + f".{{jax.process_index()}}", "w") as f:
    json.dump(out, f)
"""


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_train_save_and_restore(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    out = str(tmp_path / "result")
    env = {**os.environ, "XLA_FLAGS": xla_flags(2), "JAX_PLATFORMS": "cpu"}
    procs = []
    for pid in range(2):
        script = _WORKER.format(root=ROOT, tests=os.path.join(ROOT, "tests"), address=address, pid=pid,
                                workdir=str(tmp_path / "work"), out=out)
        procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    wait_all(procs, timeout=900)
    results = [json.load(open(f"{out}.{pid}")) for pid in range(2)]
    for r in results:
        assert r["count"] == 2 and r["devices"] == 4 and len(r["losses"]) == 2
        assert r["restored_step"] == 2 and r["none"] == []
        assert r["restored"] == r["trained"]  # the restored parameters are the saved ones
    assert results[0]["losses"] == results[1]["losses"]  # one global computation
    saved = tmp_path / "work" / "checkpoints" / "2"
    assert {"config", "data", "data_layout", "state"} <= set(os.listdir(saved))
    # grain's handler writes one iterator state per process.
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(saved / "data"))
    recorded = {"group_count": 2, "process_count": 2, "batch_seg": 4, "batch_gen": 4}
    assert json.load(open(saved / "data_layout" / "metadata")) == recorded
    # With the tensor axis across the processes both read the whole batch: one global computation still.
    assert len(results[0]["resumed_losses"]) == 1
    assert results[0]["resumed_losses"] == results[1]["resumed_losses"]
    assert all(r["batch_across"] and r["batch_aligned"] for r in results)
    layout = tmp_path / "work" / "checkpoints" / "3" / "data_layout" / "metadata"
    assert json.load(open(layout)) == {**recorded, "group_count": 1}


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


_AGREE_WORKER = """
import json, sys
sys.path[:0] = [{root!r}]
import jax
jax.distributed.initialize({address!r}, num_processes=2, process_id={pid})
from genmask_jax.train import hooks
flags = hooks._gather_flags({pid} == 0)  # process 1's input read "failed"
with open({out!r} + ".{pid}", "w") as f:
    json.dump(flags.tolist(), f)
"""


@pytest.mark.multidevice
def test_two_processes_agree_on_the_quick_evaluation_inputs(tmp_path):
    """The quick evaluation's agreement is a real collective: both processes see process 1's failure."""
    address, out = f"127.0.0.1:{free_port()}", str(tmp_path / "flags")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", _AGREE_WORKER.format(root=ROOT, address=address, pid=pid,
                                                                           out=out)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in range(2)]
    wait_all(procs, timeout=300)
    assert [json.load(open(f"{out}.{pid}")) for pid in range(2)] == [[True, False], [True, False]]


_FROZEN_WORKER = """
import json, sys
sys.path[:0] = [{root!r}]
import jax, numpy as np
jax.distributed.initialize({address!r}, num_processes=2, process_id={pid})
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
gathered = []
check = multihost_utils.assert_equal
multihost_utils.assert_equal = lambda x, *a, **k: (gathered.append(list(np.shape(x))), check(x, *a, **k))[1]
from genmask_jax.parallel.mesh import make_mesh
from genmask_jax.train.state import TrainState, attach_frozen
mesh = make_mesh((-1, 1, 1))
frozen = {{"vae": {{"kernel": np.arange(64.0).reshape(8, 8), "bias": np.ones(8)}}}}
replicated = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), frozen)
shardings = TrainState(step=None, params={{}}, opt_state={{}}, frozen=replicated)
state = attach_frozen(TrainState(step=None, params={{}}, opt_state={{}}), shardings, frozen)
kernel = state.frozen["vae"]["kernel"]
ok = all(np.array_equal(np.asarray(s.data), frozen["vae"]["kernel"]) for s in kernel.addressable_shards)
with open({out!r} + ".{pid}", "w") as f:
    json.dump({{"gathered": gathered, "ok": ok}}, f)
"""


@pytest.mark.multidevice
def test_frozen_weights_go_to_the_devices_without_an_all_gather(tmp_path):
    """`jax.device_put` of a host array in several processes first checks that they agree by all-gathering
    the whole array: every frozen VAE leaf from every process at start-up (about 4 GB per host for the WAN
    VAE on 8 hosts). Each device now takes its own shards."""
    address, out = f"127.0.0.1:{free_port()}", str(tmp_path / "frozen")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(2)}
    worker = lambda pid: _FROZEN_WORKER.format(root=ROOT, address=address, pid=pid, out=out)
    procs = [subprocess.Popen([sys.executable, "-c", worker(pid)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for pid in range(2)]
    wait_all(procs, timeout=300)
    assert [json.load(open(f"{out}.{pid}")) for pid in range(2)] == [{"gathered": [], "ok": True}] * 2
