"""Shared builders for the GenMask model/training tests: a tiny config, a tiny model and batches in the
interfaces.md format (random images, rectangle masks, random contexts); and for the processes tests start,
their XLA flags, a free coordinator port and the wait for the processes."""

import os
import re
import socket
import subprocess

import jax
import numpy as np

from configs.genmask import get_config
from genmask_jax.models import build
from genmask_jax.models.genmask import GenMask
from genmask_jax.parallel.mesh import make_mesh

RESOLUTION = 32
TEXT_LEN = 8


def tiny_config(**overrides):
    """The tiny CPU config (DiT dim 64 x 2 layers, VAE base_dim 8, 32x32) with log_every 1."""
    config = get_config("variant=tiny")
    config.log_every = 1
    config.optimizer.warmup_steps = 1
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def tiny_model(config=None) -> GenMask:
    return build.build_model(config or tiny_config())


def random_vae(model: GenMask, seed: int = 0):
    return build.random_frozen(build.abstract_frozen(model), seed)["vae"]


def rectangle_masks(rng: np.random.Generator, n: int, size: int = RESOLUTION) -> np.ndarray:
    masks = np.zeros((n, size, size), np.float32)
    for i in range(n):
        y0, x0 = rng.integers(0, size // 2, 2)
        h, w = rng.integers(size // 4, size // 2, 2)
        masks[i, y0:y0 + h, x0:x0 + w] = 1.0
    return masks


def make_batch(seed: int, n_seg: int, n_gen: int, text_dim: int = 32, size: int = RESOLUTION) -> dict:
    """A per-process batch in the interfaces.md format."""
    rng = np.random.default_rng(seed)

    def sub(n, with_mask):
        out = {"image": rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32),
               "context": rng.standard_normal((n, TEXT_LEN, text_dim)).astype(np.float32),
               "context_mask": np.arange(TEXT_LEN)[None].repeat(n, 0) < rng.integers(1, TEXT_LEN + 1, (n, 1))}
        if with_mask:
            out["mask"] = rectangle_masks(rng, n, size)
        return out

    return {"seg": sub(n_seg, True), "gen": sub(n_gen, False)}


def xla_flags(device_count: int) -> str:
    """This session's XLA_FLAGS (conftest.py's, or the caller's own) with another number of simulated CPU
    devices: for the processes a test starts, which then compile as the test process does."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    return " ".join([*flags.split(), f"--xla_force_host_platform_device_count={device_count}"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], timeout: float, status: int = 0) -> list[str]:
    """Each process's output (text, stderr merged); every one must exit with `status` (and, when that is
    not 0, without a traceback). All are killed when one does not finish within `timeout` seconds, so a
    hung collective fails the test instead of hanging it."""
    try:
        logs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, log in zip(procs, logs):
        assert proc.returncode == status and (status == 0 or "Traceback" not in log), log[-3000:]
    return logs


def mesh_of(shape, devices=None):
    devices = devices if devices is not None else jax.devices()[:int(np.prod(shape))]
    return make_mesh(shape, devices=devices)
