"""`genmask_jax.evaluate` run as a user runs it (subprocesses): an --out it cannot use stops it with one
line before the checkpoint loads. The checkpoint's parameters are placeholders: loading them would end in
another error."""

import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    from configs.genmask import get_config
    from genmask_jax.train import checkpointing

    run = tmp_path_factory.mktemp("saved") / "run"
    ckpt = checkpointing.Checkpointer(run / "checkpoints", async_save=False)
    params = {"w": np.ones(2, np.float32)}
    ckpt.save(5, {"step": np.asarray(5, np.int32), "params": params}, config=get_config("variant=tiny"))
    ckpt.close()
    return run


def evaluate(saved_run, out, env=None) -> subprocess.Popen:
    args = [f"--checkpoint={saved_run}", "--split=synthetic:test", f"--out={out}"]
    return subprocess.Popen(
        [sys.executable, "-m", "genmask_jax.evaluate", *args],
        cwd=REPO,
        env={**ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def last_lines(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """The last output line of each process, every one of which must end with status 1 and no traceback;
    all are killed when one does not finish within `timeout` seconds (a process left waiting)."""
    from train_helpers import wait_all

    return [[line for line in log.splitlines() if line.strip()][-1] for log in wait_all(procs, timeout, 1)]


def test_an_out_it_cannot_write_is_refused_before_the_checkpoint_loads(saved_run, tmp_path):
    """segment and generate check their outputs first; evaluate found a file as --out at its first mkdir,
    after the model had loaded."""
    taken = tmp_path / "taken"
    taken.write_text("")
    (line,) = last_lines([evaluate(saved_run, taken / "eval")])
    message = f"cannot write {taken}/eval/run.json: {taken} is a file, not a folder"
    assert line == f"genmask_jax.evaluate: error: {message}"


@pytest.mark.multidevice
def test_processes_with_their_own_out_stop_before_the_checkpoint_loads(saved_run, tmp_path):
    """A multi-process launch whose --out is a path on each host's own disk (here one folder per process):
    every process stops with one line (before, process 0 found the others' examples missing after the
    whole evaluation, and again on every rerun)."""
    from train_helpers import free_port, xla_flags

    address = f"127.0.0.1:{free_port()}"
    launch = {
        "XLA_FLAGS": xla_flags(1),
        "GENMASK_DISTRIBUTED": "1",
        "GENMASK_COORDINATOR_ADDRESS": address,
        "GENMASK_NUM_PROCESSES": "2",
    }
    procs = [
        evaluate(saved_run, tmp_path / f"host{pid}", {**launch, "GENMASK_PROCESS_ID": str(pid)})
        for pid in range(2)
    ]
    for pid, line in enumerate(last_lines(procs)):
        assert line == (
            f"genmask_jax.evaluate: error: --out {tmp_path / f'host{pid}'} is not one folder that every "
            "process shares (process 1 cannot see what process 0 writes there): under a multi-process launch "
            "--out must be a folder every process shares, e.g. gs://... or a shared file system"
        )
