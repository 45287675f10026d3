"""Test setup: 8 simulated CPU devices and LLVM -O0 (set before jax is imported anywhere), fixed seeds."""

import atexit
import os
import shutil
import tempfile

# LLVM -O0 for the machine code XLA:CPU emits: the HLO passes (fusion, sharding, layouts) are the ones users
# get; only LLVM's optimisation of the emitted code is skipped, which is most of compiling the tiny models
# (tests/test_genmask.py: 72 -> 50 s). Programs that differ may round differently at -O0 than at -O3, as
# at any level; tolerances say how much. Set XLA_FLAGS (with the device count) to test at another level.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# libtpu (installed for the AOT tests) guards itself with a lockfile; tests load it in several processes.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One persistent XLA compilation cache per test session, which the processes the tests start (the CLIs, the
# multi-process runs, a resume in a new process) inherit: the tiny models' steps, built afresh by each test,
# compile once instead of in every test (compiling dominates on CPU). A cache hit is the executable the
# same program compiled to, so no result changes. Set JAX_COMPILATION_CACHE_DIR to keep one across sessions.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="genmask-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def np_rng():
    return np.random.default_rng(0)
