"""The command-line entry points, run as a user runs them (subprocesses).

- bad input through every entry point: one `<prog>: error: ...` line, non-zero exit, no traceback,
  nothing written;
- end to end on the built-in synthetic data with the tiny config (slow): train 3 steps, evaluate,
  segment an image, generate an image; the training hooks (TensorBoard, samples, SIGTERM).
"""

import ast
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image
from train_helpers import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two simulated devices: the batch is really sharded, and compiling stays cheap on a 2-core machine.
ENV = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": xla_flags(2),
    "PYTHONPATH": REPO,
}
TINY = ["--config=configs/genmask.py"]


def cli(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "image.png")
    (root / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "empty_dir").mkdir()
    _write_val_cache(root / "val_cache")
    return root


def _write_val_cache(folder):
    """An embedding cache with the tiny run's encoder settings that holds no training example."""
    from configs.genmask import get_config
    from genmask_jax.encoders import fingerprint
    from genmask_jax.encoders.cache import CacheWriter

    encoder = get_config().data.encoder
    settings = dict(dim=encoder.dim, context_length=encoder.context_length, fingerprint=fingerprint(encoder))
    with CacheWriter(str(folder), **settings) as cache:
        cache.add("shapes-0-val-0", np.zeros((3, encoder.dim), np.float32), text="the red circle")


BAD_INPUT = [
    ("genmask_jax.train", [*TINY, "--config.sedd=1", "--workdir={root}/w"], "unknown config field 'sedd'"),
    ("genmask_jax.train", ["--config=configs/missing.py", "--workdir={root}/w"], "configs/missing.py"),
    # refused before the model is built or the workdir made
    (
        "genmask_jax.train",
        [*TINY, "--config.data.encoder.cache_dir={root}/val_cache", "--workdir={root}/w"],
        "lacks 16 of 16 sampled seg examples of split 'train' (e.g. shapes-0-train-0): precompute split "
        "'train' of the seg sources shapes into it (python -m genmask_jax.encoders.precompute",
    ),
    (
        "genmask_jax.train",
        [*TINY, "--config.data.encoder.cache_dir={root}/val_cache", "--config.data.encoder.seed=1",
         "--workdir={root}/w"],
        "was written with other encoder settings (seed: cache 0, config 1)",
    ),
    (
        "genmask_jax.train",
        [*TINY, "--config.model.dit.patch_size=(1, 2)", "--workdir={root}/w"],
        "config.model: patch_size must be 3 positive ints (frames, height, width): (1, 2)",
    ),
    (
        "genmask_jax.train",
        [*TINY, "--config.init_from={root}/moved/wan_dit", "--workdir={root}/w"],
        "config.init_from: {root}/moved/wan_dit: no such file or folder",
    ),
    ("genmask_jax.evaluate", ["--checkpoint={root}/nothing", "--split=synthetic:test"], "does not exist"),
    (
        "genmask_jax.evaluate",
        [*TINY, "--config.data.shapes.tset_size=3", "--checkpoint={root}", "--split=synthetic:test"],
        "tset_size",
    ),
    ("genmask_jax.evaluate", ["--checkpoint={root}", "--split=refcoco_unc:test"], "has splits"),
    ("genmask_jax.segment", ["--checkpoint={root}/nothing", "--image={root}/image.png"], "does not exist"),
    ("genmask_jax.segment", ["--checkpoint={root}", "--image={root}/broken.jpg"], "cannot read image"),
    (
        "genmask_jax.segment",
        ["--checkpoint={root}", "--image={root}/image.png", "--prompt="],
        "prompt 1 is empty",
    ),
    ("genmask_jax.segment", [*TINY, "--config.modle.seed=1", "--checkpoint={root}"], "modle"),
    ("genmask_jax.segment", ["--checkpoint={root}", "--batch_size=0"], "--batch_size must be >= 1"),
    ("genmask_jax.generate", ["--checkpoint={root}/nothing", "--prompt=a"], "does not exist"),
    ("genmask_jax.generate", ["--checkpoint={root}/empty_dir", "--prompt=a"], "no checkpoint steps"),
    ("genmask_jax.generate", ["--checkpoint={root}", "--prompt=   "], "prompt 1 is empty"),
    ("genmask_jax.generate", ["--checkpoint={root}", "--prompt=a", "--shift=0"], "--shift must be > 0"),
    (
        "genmask_jax.generate",
        ["--checkpoint={root}", "--prompt=a", "--batch_size=0"],
        "--batch_size must be >= 1",
    ),
]


@pytest.mark.parametrize("module,args,message", BAD_INPUT, ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_is_one_line(files, module, args, message):
    args, message = [a.format(root=files) for a in args], message.format(root=files)
    out = files / "out.png"
    if module == "genmask_jax.segment":
        args += [f"--out={out}"] + ([] if any(a.startswith("--prompt") for a in args) else ["--prompt=x"])
        args += [] if any(a.startswith("--image") for a in args) else [f"--image={files}/image.png"]
    if module == "genmask_jax.generate":
        args += [f"--out={out}"]
    result = cli(module, *args, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith(f"{module}: error: ") and message in lines[-1], result.stderr
    assert sum("error" in line for line in lines) == 1
    assert not out.exists() and not (files / "w").exists()


QWEN = ["--config.data.encoder.name=qwen2_5_vl", "--config.data.encoder.model_path=/models/Qwen2.5-VL-7B"]
WITHOUT_TORCH = [
    ("genmask_jax.segment", ["--checkpoint={run}", "--image={root}/image.png", "--prompt=x", "--out={out}"]),
    ("genmask_jax.generate", ["--checkpoint={run}", "--prompt=x", "--out={out}"]),
    ("genmask_jax.encoders.precompute", [*TINY, "--out={out}"]),
    ("genmask_jax.train", [*TINY, "--workdir={out}"]),
]


@pytest.mark.parametrize("module,args", WITHOUT_TORCH, ids=lambda x: x if isinstance(x, str) else "")
def test_the_qwen_encoder_without_torch_is_one_line_before_anything_loads(files, saved_run, module, args):
    """The runtime requirements leave torch out: a run trained with Qwen2.5-VL, used from them."""
    out = files / "no_torch_out"
    args = [a.format(root=files, run=saved_run, out=out) for a in [*args, *QWEN]]
    code = (
        "import runpy, sys; sys.modules['torch'] = None; "
        f"sys.argv = ['{module}', *{args!r}]; "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith(f"{module}: error: the 'qwen2_5_vl' encoder"), result.stderr
    assert "needs torch" in lines[-1] and "pip install torch==2.13.0" in lines[-1], result.stderr
    assert "restor" not in result.stdout + result.stderr  # the checkpoint was not read
    assert not out.exists()


@pytest.mark.parametrize(
    "module",
    ["genmask_jax.train", "genmask_jax.evaluate", "genmask_jax.segment", "genmask_jax.generate",
     "genmask_jax.encoders.precompute"],
)
def test_help_lists_the_config_flag(module):
    result = cli(module, "--help", timeout=120)
    assert "--config: Experiment config file" in result.stdout, result.stdout


def _docstring(path: str, clean: bool = True) -> str:
    with open(os.path.join(REPO, path)) as f:
        return ast.get_docstring(ast.parse(f.read()), clean=clean) or ""


def _usage_modules() -> list[str]:
    paths = sorted(
        os.path.relpath(p, REPO)
        for folder in ("genmask_jax", "convert", "bench")
        for p in glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True)
    )
    return [p for p in paths if "python -m" in _docstring(p)]


@pytest.mark.parametrize("path", _usage_modules())
def test_usage_examples_print_as_written(path):
    """--help prints the module docstring: a backslash ending a line of a non-raw one joins two lines."""
    with open(os.path.join(REPO, path)) as f:
        assert _docstring(path, clean=False) in f.read()


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A checkpoint (placeholder parameters) whose saved config has training-time fields an inference
    command must keep (`vae_from`) and a data path it must let the user change; the ':' in its path
    stands for gs:// paths (ml_collections splits `--config=file:arg` at the first ':')."""
    from configs.genmask import get_config
    from genmask_jax.train import checkpointing

    config = get_config("variant=tiny")
    config.vae_from = "/training/machine/wan_vae"
    config.data.refcoco.data_dir = "/training/machine/tfds"
    run = tmp_path_factory.mktemp("saved") / "run:1"
    ckpt = checkpointing.Checkpointer(run / "checkpoints", async_save=False)
    ckpt.save(5, {"step": np.asarray(5, np.int32), "params": {"w": np.ones(2, np.float32)}}, config=config)
    ckpt.close()
    return run


def test_overrides_without_config_apply_to_the_saved_config(saved_run):
    """`--config.field=value` with no `--config` changes the checkpoint's own config (vae_from kept),
    and pins --checkpoint to the step whose config was read."""
    from absl import flags
    from ml_collections import config_flags

    from genmask_jax.infer import cli as cli_lib

    argv = ["prog", f"--checkpoint={saved_run}", "--config.data.refcoco.data_dir=/data/tfds", "--split=x"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv, lock_config=True)
    flags.DEFINE_string("checkpoint", None, "", flag_values=flag_values)
    flags.DEFINE_string("split", None, "", flag_values=flag_values)
    flag_values(cli_lib.with_checkpoint_config(argv, flag_values))
    config = flag_values.config
    assert config.data.refcoco.data_dir == "/data/tfds"
    assert config.vae_from == "/training/machine/wan_vae" and config.data.encoder.name == "toy"
    assert flag_values.checkpoint == f"{saved_run}/checkpoints/5"
    # With --config given, or no override, argv is left alone.
    explicit = argv[:2] + ["--config=configs/genmask.py", "--config.seed=1"]
    for unchanged in (explicit, argv[:2] + ["--split=x"]):
        assert cli_lib.with_checkpoint_config(unchanged, flag_values) == unchanged


def test_a_config_saved_before_new_fields_gets_them_and_takes_overrides(tmp_path):
    """A checkpoint whose saved config predates `data.encoder.max_pixels`, `data.refcoco.exclude_eval_images`,
    `model.dit.residual_dtype` and `ema_warmup`: the inference commands read it laid over today's defaults
    (saved values win; `ema_warmup` False, as such a run trained), so the new fields exist, hold their
    defaults and take `--config...` overrides (a locked ConfigDict adds no field: the override was an
    unknown-field error)."""
    from absl import flags
    from ml_collections import config_flags

    from configs.genmask import get_config
    from genmask_jax.encoders import DEFAULT_MAX_PIXELS
    from genmask_jax.infer import checkpoint
    from genmask_jax.infer import cli as cli_lib
    from genmask_jax.train import checkpointing

    config = get_config("variant=tiny").to_dict()
    del config["data"]["encoder"]["max_pixels"], config["data"]["refcoco"]["exclude_eval_images"]
    del config["model"]["dit"]["residual_dtype"], config["ema_warmup"]
    config["data"]["encoder"]["context_length"] = 24  # a saved value, not today's default
    ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(3, {"step": np.asarray(3, np.int32), "params": {"w": np.ones(2, np.float32)}}, config=config)
    ckpt.close()
    saved = checkpoint.saved_config(tmp_path / "checkpoints", 3)
    assert saved.data.encoder.max_pixels == DEFAULT_MAX_PIXELS
    assert saved.data.refcoco.exclude_eval_images is False
    assert saved.data.encoder.context_length == 24 and saved.data.encoder.name == "toy"
    assert (saved.model.dit.residual_dtype, saved.ema_warmup) == ("float32", False)
    assert saved.model.dit.dim == config["model"]["dit"]["dim"]

    argv = [
        "prog",
        f"--checkpoint={tmp_path}",
        "--config.data.encoder.max_pixels=50176",
        "--config.model.dit.residual_dtype=bfloat16",
        "--config.ema_warmup=true",
    ]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv, lock_config=True)
    flags.DEFINE_string("checkpoint", None, "", flag_values=flag_values)
    flag_values(cli_lib.with_checkpoint_config(argv, flag_values))
    assert flag_values.config.data.encoder.max_pixels == 50176
    assert flag_values.config.data.encoder.context_length == 24
    assert flag_values.config.model.dit.residual_dtype == "bfloat16" and flag_values.config.ema_warmup is True


def test_a_saved_config_leaves_the_training_jobs_coordinator_and_process_id_behind(tmp_path):
    """A run launched with `--config.distributed.coordinator_address/num_processes/process_id` saved its
    process 0's values; evaluate/segment/generate read that config before `jax.distributed.initialize`,
    so a one-machine evaluation waited for the training job's peers, and every process of a new job
    called itself process 0. The environment (launch/gpu.sh's GENMASK_*) decides again."""
    from configs.genmask import get_config
    from genmask_jax.infer import checkpoint
    from genmask_jax.parallel import multihost
    from genmask_jax.train import checkpointing

    config = get_config("variant=tiny").to_dict()
    config["distributed"].update(mode="on", coordinator_address="node0:1234", num_processes=2, process_id=0)
    ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(3, {"step": np.asarray(3, np.int32), "params": {"w": np.ones(2, np.float32)}}, config=config)
    ckpt.close()
    saved = checkpoint.saved_config(tmp_path / "checkpoints", 3)
    assert saved.distributed.to_dict() == {
        "mode": "auto", "coordinator_address": "", "num_processes": 0, "process_id": -1}
    assert multihost.distributed_args(saved.distributed, {}) == {}
    environ = {"GENMASK_COORDINATOR_ADDRESS": "gpuA:5555", "GENMASK_NUM_PROCESSES": "4",
               "GENMASK_PROCESS_ID": "1"}
    assert multihost.distributed_args(saved.distributed, environ) == {
        "coordinator_address": "gpuA:5555", "num_processes": 4, "process_id": 1}


@pytest.mark.parametrize("mode", ["off", "on"])
def test_the_inference_launch_decides_whether_a_saved_run_is_distributed(tmp_path, monkeypatch, mode):
    """The saved `distributed.mode` is the training job's: the demo's "off" made each process of a
    two-process evaluation (launch/gpu.sh) evaluate every example, and "on" stopped a one-machine
    evaluation with a traceback (no coordinator). A saved run's config reads back with mode "auto"."""
    import jax

    from configs.genmask import get_config
    from genmask_jax.infer import checkpoint
    from genmask_jax.parallel import multihost
    from genmask_jax.train import checkpointing

    config = get_config("variant=tiny").to_dict()
    config["distributed"]["mode"] = mode
    ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(3, {"step": np.asarray(3, np.int32), "params": {"w": np.ones(2, np.float32)}}, config=config)
    ckpt.close()
    saved = checkpoint.saved_config(tmp_path / "checkpoints", 3)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    assert not multihost.maybe_initialize(saved.distributed, {}) and calls == []  # one machine
    launch = {"GENMASK_DISTRIBUTED": "1", "GENMASK_COORDINATOR_ADDRESS": "node0:1234",
              "GENMASK_NUM_PROCESSES": "2", "GENMASK_PROCESS_ID": "1"}
    assert multihost.maybe_initialize(saved.distributed, launch)
    assert calls == [{"coordinator_address": "node0:1234", "num_processes": 2, "process_id": 1,
                      "cluster_detection_method": "deactivate"}]


def test_tuple_fields_of_a_saved_config_take_overrides(saved_run):
    """The saved config is JSON, which holds tuples as lists, and config_flags refuses to override a
    list field: `--config.data.resolution=(64, 64)` on evaluate/segment/generate failed."""
    from absl import flags
    from ml_collections import config_flags

    from genmask_jax.infer import cli as cli_lib

    overrides = ["--config.data.resolution=(64, 64)", "--config.mesh.shape=(1, -1, 1)",
                 "--config.model.dit.patch_size=(1, 1, 1)"]
    argv = ["prog", f"--checkpoint={saved_run}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv, lock_config=True)
    flags.DEFINE_string("checkpoint", None, "", flag_values=flag_values)
    flag_values(cli_lib.with_checkpoint_config(argv, flag_values))
    config = flag_values.config
    assert config.data.resolution == (64, 64) and config.mesh.shape == (1, -1, 1)
    assert config.model.dit.patch_size == (1, 1, 1) and config.vae_from == "/training/machine/wan_vae"


@pytest.mark.parametrize("arg", ["variant=tiny", "variant=paper"])
def test_a_saved_config_reads_back_with_the_types_of_the_experiment_config(arg):
    """Tuples come back as tuples, the logical axis rules (a list in the configs) as lists."""
    from configs import demo, genmask
    from genmask_jax.infer import checkpoint

    for config in (genmask.get_config(arg), demo.get_config()):
        assert checkpoint.with_tuples(checkpoint.as_json(config)) == config.to_dict()  # [1] != (1,)


def test_processes_that_resolved_different_steps_stop(saved_run, monkeypatch):
    """Under a multi-process launch each process resolves `--checkpoint=WORKDIR` to its latest step on
    its own, before the distributed runtime starts: a run that saved meanwhile would have them evaluate
    different steps. Once the runtime is up, their steps are compared (the collective is faked here)."""
    import jax
    from jax.experimental import multihost_utils

    from genmask_jax.infer import cli as cli_lib
    from genmask_jax.parallel import multihost

    monkeypatch.setattr(multihost, "maybe_initialize", lambda config: True)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    gathered = []

    def other_process_found(step):
        def allgather(x):
            gathered.append(int(x))
            return np.array([int(x), step])

        monkeypatch.setattr(multihost_utils, "process_allgather", allgather)

    other_process_found(6)
    checkpoint = re.escape(str(saved_run))
    message = rf"to different steps \(\[5, 6\] by process.*--checkpoint={checkpoint}/checkpoints/6$"
    with pytest.raises(cli_lib.InputError, match=message):
        cli_lib.checkpoint_and_config(str(saved_run), None)
    other_process_found(5)
    directory, step, config = cli_lib.checkpoint_and_config(str(saved_run), None)
    assert step == 5 and gathered == [5, 5] and config.vae_from == "/training/machine/wan_vae"


def test_a_given_config_is_checked_against_the_saved_one(caplog):
    """A replacing --config: a warning when the model or the converted VAE's path differs, an error when
    the VAE would be a random one the run was not trained with."""
    from configs.genmask import get_config
    from genmask_jax.infer import checkpoint

    run = get_config()
    run.vae_from = "/ckpt/wan_vae"
    saved = ml_collections.ConfigDict(checkpoint.as_json(run))  # as read back: tuples are lists
    checkpoint.check_against_saved(run, saved, "ckpt")  # the same config: silent
    assert not caplog.records
    given = get_config()
    with pytest.raises(checkpoint.CheckpointError, match="converted VAE /ckpt/wan_vae.*random VAE of seed 0"):
        checkpoint.check_against_saved(given, saved, "ckpt")
    given.vae_from = "/elsewhere/wan_vae"
    given.model.dit["num_layers"] += 1
    checkpoint.check_against_saved(given, saved, "ckpt")
    warnings = [r.getMessage() for r in caplog.records]
    assert any("config.model.dit differs" in w for w in warnings)
    assert "ckpt: this config decodes with the converted VAE /elsewhere/wan_vae, the run was trained with " \
        "the converted VAE /ckpt/wan_vae" in warnings
    random_run = ml_collections.ConfigDict(checkpoint.as_json(get_config()))
    checkpoint.check_against_saved(given, random_run, "ckpt")  # was "..., the run was trained with 0"
    assert "ckpt: this config decodes with the converted VAE /elsewhere/wan_vae, the run was trained with " \
        "a random VAE of seed 0" in [r.getMessage() for r in caplog.records]
    other_seed = get_config()
    other_seed.seed = 4
    with pytest.raises(checkpoint.CheckpointError, match="random VAE of seed 0.*--config.seed=0"):
        checkpoint.check_against_saved(other_seed, random_run, "ckpt")


README_SHAPES = [
    # README: evaluate a run with its data moved; --config.* without --config used to be an unknown flag.
    (
        "genmask_jax.evaluate",
        [
            "--checkpoint={run}",
            "--config.data.refcoco.data_dir={root}/tfds",
            "--split=refcoco_unc:val,refcoco_unc:testA,refcoco_unc:testB",
            "--format=rle",
        ],
        "no prepared ref_coco_seg/refcoco_unc in {root}/tfds",  # the override reached the data source
    ),
    ("genmask_jax.evaluate", ["--checkpoint={run}", "--config.data.shapes.tset_size=3"], "tset_size"),
    # a replacing --config without the run's converted VAE would decode with a random one
    (
        "genmask_jax.evaluate",
        [*TINY, "--checkpoint={run}", "--split=synthetic:test"],
        "trained with the converted VAE /training/machine/wan_vae",
    ),
    (
        "genmask_jax.segment",
        ["--checkpoint={run}", "--config.data.fit=crop", "--image={root}/broken.jpg", "--prompt=x"],
        "cannot read image",  # the override parsed: the next problem is the image
    ),
    ("genmask_jax.generate", ["--checkpoint={run}", "--config.seed=1", "--prompt=a", "--shift=0"], "--shift"),
    # two-stage reasoning needs the VLM: refused before the checkpoint loads
    (
        "genmask_jax.segment",
        ["--checkpoint={run}", "--rewrite", "--image={root}/image.png", "--prompt=x"],
        "the toy encoder cannot rewrite",
    ),
]


@pytest.mark.parametrize("module,args,message", README_SHAPES, ids=lambda x: x if isinstance(x, str) else "")
def test_override_shapes_of_the_readme(files, saved_run, module, args, message):
    args = [a.format(root=files, run=saved_run) for a in args]
    if module == "genmask_jax.evaluate" and not any(a.startswith("--split") for a in args):
        args.append("--split=synthetic:test")
    if module != "genmask_jax.evaluate":
        args.append(f"--out={files}/out.png")
    result = cli(module, *args, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith(f"{module}: error: "), result.stderr
    assert message.format(root=files) in lines[-1], result.stderr
    assert "Unknown command line flag" not in result.stderr


def tiny_loaded(config=None):
    """A LoadedModel of the tiny config with random parameters, on this process's first device."""
    import flax.linen as nn
    import jax

    from configs.genmask import get_config
    from genmask_jax.infer import checkpoint
    from genmask_jax.models import build
    from genmask_jax.parallel.mesh import make_mesh
    from genmask_jax.parallel.sharding import rules_from_config

    config = config or get_config()
    model = build.build_model(config)
    params = jax.jit(lambda key: nn.meta.unbox(build.dit_initializer(model)(key)))(jax.random.key(0))
    vae, _ = build.frozen_vae(config, model)
    mesh = make_mesh((1, -1, 1), devices=jax.devices()[:1])
    rules = rules_from_config(config.sharding.logical_axis_rules)
    return checkpoint.LoadedModel(config, model, params, vae, mesh, rules, 0, None, "params")


def test_generated_image_of_a_prompt_does_not_depend_on_the_others():
    """Prompt i starts from fold_in(key(seed), i) whatever the batch: with non-partitionable threefry a
    single normal draw for the whole batch gave other noise to every prompt when one was added."""
    import jax

    from genmask_jax.infer.generator import Generator
    from genmask_jax.infer.images import to_uint8

    generator = Generator(tiny_loaded())
    with jax.threefry_partitionable(False):
        two = generator(["a red circle", "a blue star"], num_steps=2, guidance_scale=2.0, seed=3)
        three = generator(["a red circle", "a blue star", "a green square"], num_steps=2, guidance_scale=2.0,
                          seed=3)
    assert two.shape == (2, 32, 32, 3) and two.dtype == np.uint8
    # Same noise and inputs; only XLA's batched float arithmetic may differ by a rounding step.
    assert np.abs(two.astype(int) - three[:2].astype(int)).max() <= 1
    assert np.abs(three[0].astype(int) - three[2].astype(int)).mean() > 1  # the noise and prompt matter

    # The generator's sampler is GenMask.generate's, given the same noise (one prompt, index 0).
    loaded = generator.loaded
    context, context_mask = generator.encoder.encode(None, ["a red circle"])
    with jax.set_mesh(loaded.mesh):
        rgb = jax.jit(loaded.model.generate, static_argnames=("image_hw", "num_steps", "guidance_scale"))(
            loaded.dit_params, loaded.vae_params, context, context_mask,
            jax.random.fold_in(jax.random.key(3), 0), image_hw=(32, 32), num_steps=2, guidance_scale=2.0,
        )
    alone = generator(["a red circle"], num_steps=2, guidance_scale=2.0, seed=3)
    assert np.abs(alone.astype(int) - to_uint8(np.asarray(rgb)).astype(int)).max() <= 1


def test_generated_images_do_not_depend_on_the_batch_size():
    """All prompts went to one device call (two DiT rows each with guidance), compiled again for each
    number of prompts. Now `batch_size` at a time, the last call padded to it: one compile."""
    from genmask_jax.infer.generator import Generator

    loaded = tiny_loaded()
    prompts = ["a red circle", "a blue star", "a green square", "a grey triangle"]
    settings = dict(num_steps=2, guidance_scale=2.0, seed=3)
    images = {}
    for batch_size in (1, 3):
        generator = Generator(loaded, batch_size=batch_size)
        images[batch_size] = generator(prompts, **settings)
        generator(prompts[:2], **settings)
        assert [fn._cache_size() for fn in generator._compiled.values()] == [1]
    assert images[1].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(images[1], images[3])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_steps": 0}, "num_steps must be >= 1"),
        ({"shift": 0.0}, "shift must be > 0"),
        ({"shift": float("nan")}, "shift must be > 0"),
        ({"sampler": "heun"}, "unknown sampler 'heun'"),
        ({"seed": 2**32 + 7}, r"seed must be in \[0, 2\*\*32\), got 4294967303"),  # was seed 7's noise
        ({"seed": -1}, r"seed must be in \[0, 2\*\*32\), got -1"),
    ],
)
def test_generator_refuses_bad_settings_before_it_touches_the_model(kwargs, message):
    from genmask_jax.infer.generator import Generator

    # No model and no encoder: a check that came after encoding or compiling would fail differently.
    with pytest.raises(ValueError, match=message):
        Generator(loaded=None, encoder=None)(["a cat"], **kwargs)


def test_segmented_mask_of_an_image_does_not_depend_on_the_batch_size():
    """Every image of a call gets the seed's noise (index 0), whichever chunk of `batch_size` it falls in,
    and the chunks are padded to one shape: one compile for calls of any length (each new length compiled
    again)."""
    from genmask_jax.infer.segmenter import Segmenter

    loaded = tiny_loaded()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(20, 24), (32, 32), (40, 28)]]
    prompts = ["the red circle", "the blue square", "the green triangle"]
    masks = {}
    for batch_size in (1, 2, 3):
        segmenter = Segmenter(loaded, batch_size=batch_size)
        masks[batch_size] = segmenter(images, prompts)
        segmenter(images[:1], prompts[:1])
        assert segmenter._fn._cache_size() == 1
    assert [m.shape for m in masks[1]] == [(20, 24), (32, 32), (40, 28)]
    for one, two, three in zip(masks[1], masks[2], masks[3]):
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(one, three)


def test_segmented_mask_of_an_image_does_not_depend_on_its_place_in_the_call():
    """Image i of a call got the noise of index i: the same image gave another mask second in a call than
    alone. Every image now gets the seed's noise (index 0). Scores agree to 1e-5 (float reassociation
    across batch sizes, measured at <= 1.2e-6), masks exactly."""
    from genmask_jax.infer.segmenter import Segmenter

    loaded = tiny_loaded()
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 256, (40, 28, 3), dtype=np.uint8) for _ in range(2))
    scores, results = {}, {}
    for name, batch_size, images, prompts in (
        ("alone", 1, [a], ["the red circle"]),
        ("second", 2, [b, a], ["the blue square", "the red circle"]),
        ("third", 2, [b, b, a], ["the blue square", "the green triangle", "the red circle"]),
    ):
        segmenter = Segmenter(loaded, batch_size=batch_size)
        predict, seen = segmenter.predict, []
        segmenter.predict = lambda batch, predict=predict, seen=seen: seen.append(predict(batch)) or seen[-1]
        results[name] = segmenter(images, prompts)[-1]
        scores[name] = np.asarray(seen[-1])[(len(images) - 1) % batch_size]
    for name in ("second", "third"):
        np.testing.assert_allclose(scores[name], scores["alone"], rtol=0, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(results[name], results["alone"], err_msg=name)
    assert 0 < results["alone"].sum() < results["alone"].size  # a mask with both classes: not vacuous


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_steps": 0}, "num_steps must be >= 1"),
        ({"shift": -1.0}, "shift must be > 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"seed": 2**32}, r"seed must be in \[0, 2\*\*32\), got 4294967296"),  # was seed 0's noise
    ],
)
def test_segmenter_refuses_bad_settings(kwargs, message):
    from genmask_jax.infer.segmenter import Segmenter

    with pytest.raises(ValueError, match=message):
        Segmenter(loaded=None, **kwargs)


class RecordingEncoder:
    """An instruction encoder that records the `rewrite` argument of each `encode` call."""

    name, context_length, dim = "qwen2_5_vl", 4, 8

    def __init__(self):
        self.rewrites = []

    def encode(self, images, texts, rewrite=None):
        self.rewrites.append(rewrite)
        shape = (len(texts), self.context_length)
        return np.zeros((*shape, self.dim), np.float32), np.ones(shape, bool)


def test_segmenter_rewrites_prompts_as_the_config_says():
    """`data.encoder.rewrite_reasoning` made `segment` rewrite every prompt; `Segmenter(rewrite=...)`
    overrides it, and the toy encoder, which cannot rewrite, is refused."""
    import types

    import jax

    from configs.genmask import get_config
    from genmask_jax.infer.segmenter import Segmenter
    from genmask_jax.parallel.mesh import make_mesh
    from genmask_jax.parallel.sharding import rules_from_config

    config = get_config()
    config.data.encoder.name, config.data.encoder.rewrite_reasoning = "qwen2_5_vl", True
    loaded = types.SimpleNamespace(
        config=config, model=None, resolution=(32, 32), mesh=make_mesh((1, -1, 1), devices=jax.devices()[:1]),
        rules=rules_from_config(config.sharding.logical_axis_rules),
    )
    image = np.zeros((20, 24, 3), np.uint8)

    def prompts_rewritten(rewrite, encoder=None):
        encoder = encoder or RecordingEncoder()
        segmenter = Segmenter(loaded, encoder=encoder, rewrite=rewrite)
        segmenter.predict = lambda batch: -np.ones((len(batch["index"]), 32, 32), np.float32)  # no model
        masks = segmenter([image, image], ["what can hold water?", "the cup"])
        assert [m.shape for m in masks] == [(20, 24)] * 2
        return encoder.rewrites[-1]

    assert prompts_rewritten(None) == [True, True]  # the config's rewrite_reasoning
    assert prompts_rewritten(False) is None
    config.data.encoder.rewrite_reasoning = False
    assert prompts_rewritten(None) is None
    assert prompts_rewritten(True) == [True, True]
    toy = RecordingEncoder()
    toy.name = "toy"
    with pytest.raises(ValueError, match="the toy encoder cannot rewrite"):
        prompts_rewritten(True, toy)
    config.data.encoder.name = "toy"
    with pytest.raises(ValueError, match="the toy encoder cannot rewrite"):
        Segmenter(loaded, rewrite=True)


def test_checkpoint_of_a_run_on_precomputed_latents_needs_a_vae(tmp_path):
    from configs.genmask import get_config
    from genmask_jax.infer import checkpoint
    from genmask_jax.train import checkpointing

    config = get_config("variant=tiny")
    config.model.vae = None  # as a run on precomputed latents without the VAE in its state
    ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, {"step": np.asarray(1, np.int32), "params": {"w": np.ones(2, np.float32)}}, config=config)
    ckpt.close()
    with pytest.raises(checkpoint.CheckpointError, match="has no VAE"):
        checkpoint.load(tmp_path)


def test_export_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    import flax.linen as nn
    import jax

    from configs.genmask import get_config
    from convert import export
    from genmask_jax.models import build
    from genmask_jax.train import checkpointing

    config = get_config("variant=tiny")
    ckpt = checkpointing.Checkpointer(tmp_path / "run", async_save=False)
    ckpt.save(1, {"step": np.asarray(1, np.int32), "params": {"w": np.ones(2, np.float32)}}, config=config)
    ckpt.close()
    model = build.build_model(config)
    params = nn.meta.unbox(jax.eval_shape(build.dit_initializer(model), jax.random.key(0)))
    config.model.dit["ffn_dim"] *= 2  # the saved feed-forward kernels are half as wide as this config's
    ckpt = checkpointing.Checkpointer(tmp_path / "wider", async_save=False)
    ckpt.save(1, {"params": jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params)}, config=config)
    ckpt.close()
    (tmp_path / "taken").mkdir()
    wider = "6 saved vs expected shapes (blocks_0/ffn/proj_in/bias (128,) vs (256,)"
    cases = [
        ([str(tmp_path / "nothing"), str(tmp_path / "out")], "does not exist"),
        ([str(tmp_path / "run"), str(tmp_path / "out")], "does not match the config's model: 69 missing"),
        ([str(tmp_path / "wider"), str(tmp_path / "out")], wider),
        ([str(tmp_path / "run"), str(tmp_path / "taken")], "already exists"),
    ]
    for args, message in cases:
        assert export.main(args) == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists() and not any((tmp_path / "taken").iterdir())


@pytest.fixture
def logging_state():
    """Restores what `cli.setup_logging` changes in this process."""
    import logging

    loggers = [logging.getLogger(name) for name in ("", "absl", "genmask_jax")]
    saved = [(logger, logger.level, list(logger.handlers)) for logger in loggers]
    yield
    for logger, level, handlers in saved:
        logger.setLevel(level)
        logger.handlers = handlers


def test_setup_logging_follows_stdout_and_keeps_one_handler(logging_state, monkeypatch):
    """Entry points run in one process (tests, notebooks) each call setup_logging: one handler stays, and
    it writes to stdout as it is now, not to a replaced stream that may since have been closed."""
    import io
    import logging
    import sys

    from genmask_jax.infer import cli

    cli.setup_logging()
    cli.setup_logging()
    assert sum(isinstance(h, cli._StdoutHandler) for h in logging.getLogger().handlers) == 1
    log = logging.getLogger("genmask_jax.test_setup_logging")
    for text in ("first", "second"):
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stdout", stream)
        log.info(text)
        assert stream.getvalue().endswith(f"genmask_jax.test_setup_logging] {text}\n")
        stream.close()  # as a test's capture is when it ends


def test_export_prints_only_what_it_wrote(tmp_path, capfd, caplog, logging_state):
    """orbax's notices on the checkpoint items export does not read stay quiet, as in the other commands."""
    import flax.linen as nn
    import jax

    from configs.genmask import get_config
    from convert import export
    from genmask_jax.models import build
    from genmask_jax.train import checkpointing

    config = get_config("variant=tiny")
    model = build.build_model(config)
    params = nn.meta.unbox(jax.eval_shape(build.dit_initializer(model), jax.random.key(0)))
    ckpt = checkpointing.Checkpointer(tmp_path / "run", async_save=False)
    ckpt.save(1, {"params": jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params)}, config=config)
    ckpt.close()
    capfd.readouterr()
    with caplog.at_level("WARNING"):
        assert export.main([str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    out, err = capfd.readouterr()
    assert out.strip() == f"wrote {tmp_path / 'out'}: transformer" and not err.strip(), (out, err)
    assert not caplog.records, caplog.text


def test_relative_checkpoint_paths_are_made_absolute(tmp_path, monkeypatch):
    from genmask_jax.infer import checkpoint

    (tmp_path / "run" / "checkpoints" / "7" / checkpoint.STATE).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # orbax restores only absolute paths; `runs/demo/train` is relative
    directory, step = checkpoint.resolve("run")
    assert step == 7 and str(directory) == str(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("gcs", [False, True], ids=["local", "gcs"])
def test_a_step_still_being_saved_is_never_read(tmp_path, monkeypatch, gcs):
    """orbax saves a local step under `<step>.orbax-checkpoint-tmp-<time>` and renames it when done; on
    GCS it writes `<step>` in place and finalizes it last with commit_success.txt. Any `<step>/state`
    was taken as a checkpoint: inference beside a run saving to GCS read a half-written step."""
    from orbax.checkpoint._src.path import gcs_utils

    from genmask_jax.infer import checkpoint

    run = tmp_path / "run" / "checkpoints"
    (run / "5" / checkpoint.STATE).mkdir(parents=True)
    (run / "5" / "commit_success.txt").write_text("done")
    saving = run / ("10" if gcs else "10.orbax-checkpoint-tmp-1700000000")
    (saving / checkpoint.STATE).mkdir(parents=True)
    if gcs:  # orbax tests a step by the commit file when its path starts with gs://
        monkeypatch.setattr(gcs_utils, "is_gcs_path", lambda path: True)
    directory, step = checkpoint.resolve(tmp_path / "run")
    assert (str(directory), step) == (str(run), 5)
    if gcs:
        with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/10 is not finalized"):
            checkpoint.resolve(saving)
        (saving / "commit_success.txt").write_text("done")
        assert checkpoint.resolve(tmp_path / "run")[1] == 10 and checkpoint.resolve(saving)[1] == 10
    else:
        for name in ("5/state", "5/commit_success.txt", "5"):
            (run / name).rmdir() if (run / name).is_dir() else (run / name).unlink()
        with pytest.raises(checkpoint.CheckpointError, match="no checkpoint steps"):
            checkpoint.resolve(tmp_path / "run")


BEFORE_LOADING = [  # (module, args, exit status, message); each ran the model (or loaded it) first
    ("genmask_jax.segment", ["--out={root}/image.png/mask.png"], 1, "image.png is a file, not a folder"),
    ("genmask_jax.segment", ["--out={root}/mask.jpg"], 1, "'.jpg' is a lossy format"),  # was PNG bytes
    ("genmask_jax.segment", ["--overlay={root}/overlay.gif"], 1, "'.gif' is not offered"),
    ("genmask_jax.segment", ["--config.data.resolution=(40, 40)"], 1,
     "config.data.resolution: image size must be H, W in positive multiples of 16"),  # was an error in jit
    ("genmask_jax.generate", ["--config.data.resolution=(40, 40)"], 1,
     "config.data.resolution: image size must be H, W in positive multiples of 16"),
    ("genmask_jax.generate", ["--out={root}/image.png/{{i}}.png", "--prompt=b"], 1, "not a folder"),
    ("genmask_jax.segment", ["--seed=4294967296"], 2, "4294967296 is not an integer in the range [0, 4294"),
    ("genmask_jax.generate", ["--seed=-1"], 2, "-1 is not an integer in the range [0, 4294967295]"),
]


def test_evaluate_refuses_a_seed_jax_would_cut_to_32_bits(tmp_path):
    """--seed=4294967303 drew the noise of --seed=7 (JAX keeps a seed's low 32 bits without x64)."""
    args = [f"--checkpoint={tmp_path}", "--split=synthetic:test", "--seed=4294967303"]
    result = cli("genmask_jax.evaluate", *args, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "4294967303 is not an integer in the range [0, 4294967295]" in result.stderr


@pytest.mark.parametrize("module,args,status,message", BEFORE_LOADING,
                         ids=lambda x: x if isinstance(x, str) else "")
def test_outputs_resolution_and_seed_are_checked_before_the_checkpoint_loads(
    files, saved_run, module, args, status, message
):
    """The checkpoint's parameters are placeholders: loading them would end in another error."""
    args = [a.format(root=files) for a in args]
    given = {a.split("=")[0] for a in args}
    default_out = [] if "--out" in given else [f"--out={files}/checked.png"]
    image = [f"--image={files}/image.png"] if module == "genmask_jax.segment" else []
    result = cli(module, f"--checkpoint={saved_run}", "--prompt=a", *image, *default_out, *args, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == status and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith(f"{module}: error: ") and message in lines[-1], result.stderr
    assert not glob.glob(f"{files}/checked*") and not glob.glob(f"{files}/mask*")


def test_evaluate_checks_the_resolution_before_the_checkpoint_loads(saved_run, tmp_path):
    """As segment and generate do: a resolution the model cannot take was a traceback after the model
    loaded (the checkpoint's parameters are placeholders here: loading them ends in another error)."""
    args = [f"--checkpoint={saved_run}", "--split=synthetic:test", f"--out={tmp_path / 'eval'}",
            "--config.data.resolution=(40, 40)"]
    result = cli("genmask_jax.evaluate", *args, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("genmask_jax.evaluate: error: config.data.resolution: image size must be "
                                "H, W in positive multiples of 16"), result.stderr
    assert lines[-1].endswith("got (40, 40)"), result.stderr
    assert not (tmp_path / "eval").exists()


def test_evaluate_refuses_another_evaluations_out_before_the_checkpoint_loads(saved_run, tmp_path):
    """A refused --out cost a model load first (the checkpoint's parameters are placeholders here: loading
    them ends in another error). An --out written before <out>/run.json existed is checked against its
    split folders' run.json, and is left without one."""
    from genmask_jax.eval import job
    from genmask_jax.infer import checkpoint

    config = checkpoint.saved_config(saved_run / "checkpoints", 5)
    checkpoint_dir, resolution = str(saved_run / "checkpoints"), list(config.data.resolution)
    made = {"checkpoint": checkpoint_dir, "step": 5, "params": "params", "num_steps": 1, "seed": 0,
            "resolution": resolution}
    split_dir = tmp_path / "old" / "synthetic-test"
    split_dir.mkdir(parents=True)
    (split_dir / "run.json").write_text(json.dumps({**made, "split": "synthetic:test", "seed": 1}))
    (tmp_path / "new").mkdir()
    shared = {**made, "config": job.prediction_config_digest(config), "step": 4}
    (tmp_path / "new" / "run.json").write_text(json.dumps(shared))  # this version's, for step 4
    new = tmp_path / "new"
    for out, refused, field in ((tmp_path / "old", split_dir, "seed"), (new, new, "step")):
        args = [f"--checkpoint={saved_run}", "--split=synthetic:test", f"--out={out}"]
        result = cli("genmask_jax.evaluate", *args, timeout=120)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        message = f"{refused} holds results of a different evaluation (differs in {field}); use another --out"
        assert lines[-1] == f"genmask_jax.evaluate: error: {message} or delete it", result.stderr
    assert not (tmp_path / "old" / "run.json").exists()


@pytest.mark.parametrize("under", ["taken", "taken/deeper"])
def test_an_output_under_a_file_made_after_the_check_is_one_line(tmp_path, capsys, under):
    """mkdir under a file raises FileExistsError or NotADirectoryError: a traceback after the model ran."""
    from genmask_jax.infer import cli as cli_lib
    from genmask_jax.infer import images

    (tmp_path / "taken").write_text("")
    write = lambda: images.write_mask(np.zeros((2, 2), bool), tmp_path / under / "m.png")  # noqa: E731
    with pytest.raises(SystemExit) as info:
        cli_lib.report_user_errors(write)
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1 and "error: " in err and "taken" in err, err


def test_generate_refuses_a_size_the_model_cannot_make_before_it_loads(files, saved_run):
    """--size is checked against the run's model (8x VAE, patch 2: multiples of 16; a patch-1 model
    takes multiples of 8), before its weights (placeholders here) are read."""
    out = files / "size.png"
    args = [f"--checkpoint={saved_run}", "--prompt=a", "--size=24,32", f"--out={out}"]
    result = cli("genmask_jax.generate", *args, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("genmask_jax.generate: error: --size: image size must be H, W in positive "
                                "multiples of 16 for this model"), result.stderr
    assert "got (24, 32)" in lines[-1] and not out.exists()


def test_segment_pairs_images_and_prompts():
    from genmask_jax.infer import cli as cli_lib
    from genmask_jax.segment import pair_inputs

    assert pair_inputs(["a"], ["x", "y"]) == [("a", "x"), ("a", "y")]
    assert pair_inputs(["a", "b"], ["x"]) == [("a", "x"), ("b", "x")]
    assert pair_inputs(["a", "b"], ["x", "y"]) == [("a", "x"), ("b", "y")]
    with pytest.raises(cli_lib.InputError):
        pair_inputs(["a", "b"], ["x", "y", "z"])


def test_segment_wraps_prompts_as_the_reasonseg_data_does():
    from genmask_jax.data.reasonseg import query_text
    from genmask_jax.infer import cli as cli_lib
    from genmask_jax.segment import templated

    assert templated([" the dog "], "none") == [" the dog "]
    short = "What is the dog in this image? Please output segmentation mask."
    assert templated(["the dog"], "short") == [short]
    assert templated(["Which one barks?"], "long") == ["Which one barks? Please output segmentation mask."]
    assert templated(["x"], "long") == [query_text("x", is_sentence=True)]
    # With two-stage rewriting the data hands a long query to the VLM as it is, never rewrites a short one.
    assert templated(["Which one barks?"], "long", rewrite=True) == ["Which one barks?"]
    with pytest.raises(cli_lib.InputError, match="--template=short with two-stage rewriting"):
        templated(["the dog"], "short", rewrite=True)


def test_numbered_outputs():
    from genmask_jax.infer.images import numbered

    assert numbered("m.png", 0, 1) == "m.png"
    assert numbered("m.png", 2, 3) == "m_2.png"
    assert numbered("out/{i}.png", 1, 3) == "out/1.png"


def test_preemption_flag_on_sigterm():
    from genmask_jax.train.hooks import Preemption

    preemption = Preemption()
    try:
        assert not preemption.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert preemption.should_stop(2)
    finally:
        preemption.close()
    assert signal.getsignal(signal.SIGTERM) is not preemption._handle


def test_step_profiler_window_and_resume(monkeypatch, tmp_path):
    import jax

    from genmask_jax.train.hooks import StepProfiler

    calls = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda log_dir: calls.append(("start", log_dir)))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))

    def run(start, end, **kw):
        calls.clear()
        profiler = StepProfiler(tmp_path, **kw)
        for step in range(start, end):
            profiler.before_step(step)
            calls.append(step)
            profiler.after_step(step + 1, None)
        profiler.stop()  # what close() does: a no-op unless a trace still runs
        return calls

    start = ("start", str(tmp_path))
    assert run(0, 8, first_step=3, num_steps=2, enabled=True) == [0, 1, 2, start, 3, 4, ("stop",), 5, 6, 7]
    # resumed inside the window: the trace covers what is left of it
    assert run(4, 8, first_step=3, num_steps=2, enabled=True) == [start, 4, ("stop",), 5, 6, 7]
    # training ends inside the window: close() stops the trace
    assert run(0, 4, first_step=3, num_steps=5, enabled=True) == [0, 1, 2, start, 3, ("stop",)]
    assert run(0, 8, first_step=3, num_steps=2, enabled=False) == list(range(8))  # not process 0
    assert run(0, 8, first_step=3, num_steps=0, enabled=True) == list(range(8))


def test_metrics_logger_rates_mfu_and_tensorboard(tmp_path):
    import jax

    from genmask_jax.train.hooks import MetricsLogger

    logger = MetricsLogger(tmp_path, total_steps=10, examples_per_step=8, enabled=True)
    assert "steps_per_s" not in logger(1, {"loss": 1.0, "lr": 0.1})
    values = logger(3, {"loss": 0.5, "loss_seg": 0.4, "loss_gen": 0.6})
    assert values["examples_per_s"] == pytest.approx(8 * values["steps_per_s"])
    assert values["eta_s"] == pytest.approx(7 / values["steps_per_s"])
    assert "model_tflops_per_device" not in values  # no FLOP count given yet
    logger.set_model_flops(8e12, jax.devices()[:2])  # CPU devices: no peak, so no MFU
    values = logger(5, {"loss": 0.5})
    assert values["model_tflops_per_device"] == pytest.approx(4 * values["steps_per_s"])
    assert "mfu" not in values
    chip = types.SimpleNamespace(device_kind="TPU v5p", core_on_chip=0)
    logger.set_model_flops(8e12, [chip] * 4)
    values = logger(7, {"loss": 0.5})
    assert values["mfu"] == pytest.approx(2e12 * values["steps_per_s"] / 459e12)
    logger.image(3, "samples/x", np.zeros((4, 6, 3), np.uint8))
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def _events(path):
    """The Event protos of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    data, i, events = path.read_bytes(), 0, []
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
        i += 12 + n + 4
    return events


def test_a_resumed_logger_purges_the_steps_it_runs_again(tmp_path):
    """TensorBoard kept a killed run's steps after its checkpoint beside the restart's: two values per step.
    A writer started with purge_step writes SessionLog.START at that step, from which TensorBoard drops the
    older events."""
    from tensorboardX.proto import event_pb2

    from genmask_jax.train.hooks import MetricsLogger

    for start, steps in [(0, range(1, 6)), (0, range(1, 6)), (2, range(3, 6))]:  # killed twice
        logger = MetricsLogger(tmp_path, total_steps=10, examples_per_step=1, start_step=start, enabled=True)
        for step in steps:
            logger(step, {"loss": float(start)})
        logger.close()
        time.sleep(1.1)  # the event file's name has seconds
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    starts = lambda f: [e.step for e in _events(f) if e.session_log.status == event_pb2.SessionLog.START]  # noqa: E731
    assert [starts(f) for f in files] == [[1], [1], [3]]  # a run killed before its first checkpoint too


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 3 steps through the CLI, the second one profiled."""
    workdir = tmp_path_factory.mktemp("run")
    result = cli(
        "genmask_jax.train",
        *TINY,
        f"--workdir={workdir}",
        "--config.total_steps=3",
        "--config.checkpoint.every_steps=3",
        "--config.log_every=1",
        "--config.data.shapes.test_size=6",
        "--config.profile.first_step=1",
        "--config.profile.num_steps=1",
    )
    assert_ok(result)
    assert "Traceback" not in result.stderr
    return workdir


@pytest.mark.slow
def test_end_to_end(trained, files, tmp_path):
    assert (trained / "checkpoints" / "3" / "state").exists()
    logged = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in logged)
    assert all(m["model_tflops_per_device"] > 0 for m in logged[1:])
    traces = list((trained / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0  # the step profiled (config.profile)

    result = cli(
        "genmask_jax.evaluate", f"--checkpoint={trained}", "--split=synthetic:test", "--batch_size=4"
    )
    assert_ok(result)
    out = trained / "eval" / "step_3"
    metrics = json.loads((out / "metrics.json").read_text())["synthetic:test"]
    assert metrics["num_samples"] == 6 and 0.0 <= metrics["giou"] <= 1.0
    assert "synthetic:test: gIoU" in result.stdout
    assert len(list((out / "synthetic-test" / "masks").glob("*.png"))) == 6

    result = cli("genmask_jax.evaluate", f"--checkpoint={trained}", "--split=synthetic:test,reasonseg:val")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("genmask_jax.evaluate: error: data.reasonseg.root is empty")

    rle = tmp_path / "rle"
    result = cli(  # README's shape: an override of the saved config, no --config
        "genmask_jax.evaluate",
        f"--checkpoint={trained}/checkpoints/3",
        "--config.data.num_threads=2",
        "--split=synthetic:test",
        f"--out={rle}",
        "--format=rle",
    )
    assert_ok(result)
    again = json.loads((rle / "metrics.json").read_text())["synthetic:test"]
    assert again == metrics  # the noise of an example depends on its index only, not on the batching
    assert len(json.loads((rle / "synthetic-test" / "predictions.json").read_text())) == 6

    mask_out, overlay_out = tmp_path / "mask.png", tmp_path / "overlay.png"
    result = cli(
        "genmask_jax.segment",
        f"--checkpoint={trained}",
        f"--image={files}/image.png",
        "--prompt=the red circle",
        "--prompt=the small blue star",
        f"--out={mask_out}",
        f"--overlay={overlay_out}",
        "--template=short",
    )
    assert_ok(result)
    for i in range(2):
        assert np.asarray(Image.open(tmp_path / f"mask_{i}.png")).shape == (40, 56)
        assert np.asarray(Image.open(tmp_path / f"overlay_{i}.png")).shape == (40, 56, 3)

    image_out = tmp_path / "generated.png"
    result = cli(
        "genmask_jax.generate",
        f"--checkpoint={trained}",
        "--prompt=a red circle on a gray background",
        f"--out={image_out}",
        "--steps=2",
        "--cfg=3",
        "--seed=1",
        "--sampler=unipc",
    )
    assert_ok(result)
    assert "2 unipc steps" in result.stdout
    assert np.asarray(Image.open(image_out)).shape == (32, 32, 3)

    import jax

    from convert import wan_dit
    from genmask_jax.infer import checkpoint

    result = cli("convert.export", str(trained), str(tmp_path / "exported"))
    assert_ok(result)
    config, params = wan_dit.load(tmp_path / "exported" / "transformer")
    loaded = checkpoint.load(trained)
    assert config == loaded.model.dit
    np.testing.assert_array_equal(  # the export is exact: compare every tensor bit for bit
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)]),
        np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(loaded.dit_params)]))


@pytest.mark.slow
@pytest.mark.multidevice
def test_evaluate_under_a_multi_process_launch(trained, tmp_path):
    """launch/gpu.sh's environment for two nodes: the two processes join one distributed runtime and
    share the split (before, each was process 0 of 1 and evaluated all of it into the same --out)."""
    from train_helpers import free_port, wait_all

    address = f"127.0.0.1:{free_port()}"
    out = tmp_path / "eval"
    procs = []
    for pid in range(2):
        env = {
            **ENV,
            "XLA_FLAGS": xla_flags(1),
            "GENMASK_DISTRIBUTED": "1",
            "GENMASK_COORDINATOR_ADDRESS": address,
            "GENMASK_NUM_PROCESSES": "2",
            "GENMASK_PROCESS_ID": str(pid),
        }
        args = [f"--checkpoint={trained}", "--split=synthetic:test", "--batch_size=2", f"--out={out}"]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "genmask_jax.evaluate", *args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    logs = wait_all(procs, timeout=500)
    for log in logs:
        assert "(1-step, 2 devices, 2 processes)" in log, log[-3000:]
    assert "synthetic:test: gIoU" in logs[0] and "gIoU" not in logs[1]
    metrics = json.loads((out / "metrics.json").read_text())["synthetic:test"]
    assert metrics["num_samples"] == 6
    assert len(list((out / "synthetic-test" / "masks").glob("*.png"))) == 6


def _flat(tree) -> np.ndarray:
    import jax

    return np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(tree)])


def test_export_of_a_run_reads_host_arrays_and_writes_its_converted_vae(tmp_path):
    """convert.export restores the chosen DiT params (EMA or raw) as host numpy, writes them exactly, and
    writes the run's converted VAE (config.vae_from) exactly; a run with no VAE exports its DiT alone."""
    import flax.linen as nn
    import jax

    from configs.genmask import get_config
    from convert import export, wan_dit, wan_vae
    from genmask_jax.infer import checkpoint
    from genmask_jax.models import build
    from genmask_jax.train.checkpointing import Checkpointer

    config = get_config()
    model = build.build_model(config)
    vae = build.random_frozen(build.abstract_frozen(model)["vae"], seed=3)
    wan_vae.save(tmp_path / "vae", model.vae, vae)
    config.vae_from = str(tmp_path / "vae")
    params = jax.jit(lambda key: nn.meta.unbox(build.dit_initializer(model)(key)))(jax.random.key(0))
    ema = jax.tree.map(lambda x: 0.5 * x + 1.0, params)
    checkpointer = Checkpointer(tmp_path / "run", async_save=False)
    checkpointer.save(7, {"params": params, "ema_params": ema}, config=config)
    checkpointer.close()

    restored, key = checkpoint.restore_dit_params(tmp_path / "run", 7, model, None, None)
    assert key == "ema_params" and all(type(x) is np.ndarray for x in jax.tree.leaves(restored))

    for use_ema, expected in ((True, ema), (False, params)):
        out = export.export_checkpoint(tmp_path / "run", tmp_path / "out", use_ema=use_ema, overwrite=True)
        assert sorted(p.name for p in out.iterdir()) == ["transformer", "vae"]
        dit_config, exported = wan_dit.load(out / "transformer")
        assert dit_config == model.dit
        np.testing.assert_array_equal(_flat(exported), _flat(expected))
        vae_config, exported_vae = wan_vae.load(out / "vae")
        assert vae_config == model.vae
        np.testing.assert_array_equal(_flat(exported_vae), _flat(vae))

    config.model.vae = None
    config.vae_from = ""
    checkpointer = Checkpointer(tmp_path / "latent_run", async_save=False)
    checkpointer.save(1, {"params": params}, config=config)
    checkpointer.close()
    out = export.export_checkpoint(tmp_path / "latent_run", tmp_path / "latent_out")
    assert [p.name for p in out.iterdir()] == ["transformer"]
    np.testing.assert_array_equal(_flat(wan_dit.load(out / "transformer")[1]), _flat(params))


def test_segmentation_sampler_internals():
    """One Euler step is the paper's single step; an example's noise depends on its index only."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from configs.genmask import get_config
    from genmask_jax.infer.segmenter import euler_mask_latents, example_noise
    from genmask_jax.models import build

    model = build.build_model(get_config())
    params = jax.jit(lambda key: nn.meta.unbox(build.dit_initializer(model)(key)))(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 3)
    image_latent = jax.random.normal(keys[0], (2, 1, 4, 4, model.z_dim))
    context = jax.random.normal(keys[1], (2, 8, model.dit.text_dim))
    context_mask = jnp.ones((2, 8), bool)
    noise = example_noise(keys[2], jnp.array([7, 3]), image_latent.shape[1:])
    np.testing.assert_array_equal(noise[1:], example_noise(keys[2], jnp.array([3]), image_latent.shape[1:]))

    args = (params, image_latent, context, context_mask, noise)
    single = jax.jit(model.predict_mask_latents)(*args)
    euler = jax.jit(lambda *a: euler_mask_latents(model, *a, num_steps=1))(*args)
    # Both compute noise - v(noise, t=1) with the same float32 ops; only op order may differ.
    np.testing.assert_allclose(euler, single, atol=1e-5)


@pytest.mark.slow
def test_quick_eval_hooks_write_samples(tmp_path):
    """The periodic quick evaluation on a live tiny state: metrics, TensorBoard and PNG panels."""
    import jax

    from configs.genmask import get_config
    from genmask_jax.models import build
    from genmask_jax.parallel.mesh import make_mesh
    from genmask_jax.parallel.sharding import rules_from_config
    from genmask_jax.train import loop
    from genmask_jax.train.hooks import TrainHooks
    from genmask_jax.train.state import attach_frozen, create_train_state, make_optimizer

    config = get_config()
    config.eval_every, config.sample_every = 2, 4
    config.quick_eval = {"num_examples": 3, "gen_steps": 2}
    model = build.build_model(config)
    mesh = make_mesh((-1, 1, 1), devices=jax.devices()[:2])
    rules = rules_from_config(config.sharding.logical_axis_rules)
    tx = make_optimizer({**config.optimizer.to_dict(), "total_steps": config.total_steps})
    state, shardings = create_train_state(
        build.dit_initializer(model),
        tx,
        jax.random.key(0),
        mesh,
        rules,
        abstract_frozen=build.abstract_frozen(model),
    )
    state = attach_frozen(state, shardings, loop.host_frozen(config, model))
    hooks = TrainHooks(config, model, tmp_path, mesh, rules)
    try:
        assert hooks.quick_eval.num_examples == 4  # rounded up to the 2 batch shards
        assert not hooks.after_step(2, state)
        assert sorted(hooks.evaluated) == ["quick_eval/ciou", "quick_eval/giou"]  # for metrics.jsonl
        assert not hooks.after_step(3, state) and hooks.evaluated == {}
        assert not hooks.after_step(4, state)
    finally:
        hooks.close()
    samples = tmp_path / "samples"
    assert (samples / "step_0000002_segmentation.png").exists()
    assert not (samples / "step_0000002_generation.png").exists()
    grid = np.asarray(Image.open(samples / "step_0000004_segmentation.png"))
    assert grid.shape == (4 * 32 + 3 * 2, 3 * 32 + 2 * 2, 3)  # image | prediction | truth, one row each
    assert np.asarray(Image.open(samples / "step_0000004_generation.png")).shape == (32, 4 * 32 + 3 * 2, 3)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_sigterm_saves_and_the_restart_continues(tmp_path):
    workdir = tmp_path / "run"
    args = [*TINY, f"--workdir={workdir}", "--config.log_every=1", "--config.checkpoint.every_steps=1000"]
    args += ["--config.eval_every=2", "--config.sample_every=0", "--config.quick_eval.num_examples=2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "genmask_jax.train", *args, "--config.total_steps=1000"],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 400
    logged = lambda: [line for line in metrics.read_text().splitlines() if '"loss"' in line]  # noqa: E731
    while not (metrics.exists() and len(logged()) >= 3) and proc.poll() is None:
        assert time.time() < deadline, "training did not log 3 steps in time"
        time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "stopped early" in output and "Traceback" not in output
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 3 <= steps[0] < 1000
    assert (workdir / "samples" / "step_0000002_segmentation.png").exists()
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))

    result = cli("genmask_jax.train", *args, f"--config.total_steps={steps[0] + 1}")
    assert_ok(result)
    assert f"starting at step {steps[0]} from workdir" in result.stdout
    assert f"training finished at step {steps[0] + 1}" in result.stdout
