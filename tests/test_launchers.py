"""The launchers: syntax, shellcheck when installed, and the commands their dry runs print."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["launch/tpu.sh", "launch/gpu.sh", "launch/local.sh", ".ci/run"]


def _run(args, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GENMASK_"))}
    full_env.update(env or {})
    return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, env=full_env)


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax(script):
    assert _run(["-n", script]).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    out = subprocess.run(["shellcheck", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_tpu_dry_run_prints_every_step():
    out = _run(["launch/tpu.sh", "--dry-run", "--name", "gm", "--zone", "us-west4-a", "--accelerator",
                "v5litepod-16", "--create", "--delete", "--", "python", "-m", "genmask_jax.train",
                "--workdir=gs://b/r"])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("+ gcloud compute tpus tpu-vm create gm --zone us-west4-a "
                               "--accelerator-type v5litepod-16 --version v2-alpha-tpuv5-lite")
    assert any("tpu-vm scp" in line and "--worker=all" in line for line in lines)
    ssh = next(line for line in lines if "tpu-vm ssh" in line)
    assert "--worker=all" in ssh and "GENMASK_DISTRIBUTED=1" in ssh and "jax\\[tpu\\]" in ssh
    assert "genmask_jax.train" in ssh
    assert lines[-1] == "+ gcloud compute tpus tpu-vm delete gm --zone us-west4-a --quiet"


def test_tpu_requires_name_and_zone():
    out = _run(["launch/tpu.sh", "--dry-run", "--", "python", "-c", "1"])
    assert out.returncode == 2 and "--name and --zone" in out.stderr


def test_gpu_dry_run_multi_node_flags():
    out = _run(["launch/gpu.sh", "--dry-run", "--cuda", "13", "--coordinator", "n0:1234",
                "--num-processes", "2", "--process-id", "1", "--", "python", "-m", "genmask_jax.train"])
    assert out.returncode == 0, out.stderr
    assert "jax\\[cuda13\\]" in out.stdout
    for line in ("GENMASK_COORDINATOR_ADDRESS=n0:1234", "GENMASK_NUM_PROCESSES=2", "GENMASK_PROCESS_ID=1"):
        assert f"+ export {line}" in out.stdout
    assert out.stdout.splitlines()[-1] == "+ .venv-cuda/bin/python -m genmask_jax.train"


def test_gpu_single_node_sets_no_distributed_env():
    out = _run(["launch/gpu.sh", "--dry-run", "--no-install", "--", "python", "-c", "1"])
    assert out.returncode == 0 and "GENMASK_" not in out.stdout


def test_gpu_partial_multi_node_flags_fail():
    out = _run(["launch/gpu.sh", "--dry-run", "--coordinator", "n0:1", "--", "python", "-c", "1"])
    assert out.returncode == 2 and "together" in out.stderr
