"""Bad input met after the flags parse ends a command with one `<prog>: error: ...` line, exit status 1
(`cli.USER_ERRORS`), before anything is written: converted weights that moved or do not fit the
experiment, a Qwen model folder that is not there, an embedding cache without the quick evaluation's
split, a checkpoint count or interval the training loop cannot use, a batch its mesh cannot split."""

import importlib.util
import logging

import jax
import numpy as np
import pytest
from train_helpers import mesh_of, tiny_config

from genmask_jax.infer import cli


def one_line_error(capsys, main) -> str:
    """The error line `main` ends with, run as `cli.run` runs a command's main."""
    with pytest.raises(SystemExit) as info:
        cli.report_user_errors(main)
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("field", ["init_from", "vae_from"])
def test_training_from_weights_that_moved_writes_nothing(tmp_path, capsys, field):
    from genmask_jax.train import loop

    config = tiny_config(**{field: str(tmp_path / "moved")})
    # One device: the tiny batch of 4 does not split over the 8 test devices, which is refused first.
    err = one_line_error(capsys, lambda: loop.train(config, tmp_path / "w", mesh=mesh_of((1, 1, 1))))
    assert f"config.{field}: {tmp_path}/moved: no such file or folder" in err
    assert not (tmp_path / "w").exists()


def test_converted_weights_of_another_depth_are_refused_before_the_workdir(tmp_path, capsys):
    from convert import wan_dit
    from genmask_jax.models.build import build_model
    from genmask_jax.models.dit import init_params
    from genmask_jax.train import loop

    dit = build_model(tiny_config()).dit
    shapes = jax.eval_shape(lambda: init_params(dit, jax.random.key(0)))
    wan_dit.save(tmp_path / "dit", dit, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes))
    config = tiny_config(init_from=str(tmp_path / "dit"), **{"model.dit.num_layers": 3})
    err = one_line_error(capsys, lambda: loop.train(config, tmp_path / "w", mesh=mesh_of((1, 1, 1))))
    assert f"converted DiT {tmp_path}/dit (config.init_from) has num_layers=2, the experiment 3" in err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("field,value,message", [
    ("checkpoint.keep", 0, "config.checkpoint.keep must be >= 1 (or None: keep all), got 0"),
    ("checkpoint.keep", -1, "config.checkpoint.keep must be >= 1 (or None: keep all), got -1"),
    ("checkpoint.every_steps", 0, "config.checkpoint.every_steps must be >= 1, got 0; the last step is"),
    ("checkpoint.every_steps", -5, "config.checkpoint.every_steps must be >= 1, got -5"),
    ("log_every", 0, "config.log_every must be >= 1, got 0"),
    ("microbatches", 0, "config.microbatches must be >= 1, got 0"),
    ("batch.seg", -8, "config.batch must count >= 0 examples per task and >= 1 in all, got {'gen': 4, 'seg"),
], ids=["keep=0", "keep=-1", "every_steps=0", "every_steps=-5", "log_every=0", "microbatches=0", "seg=-8"])
def test_a_count_the_loop_cannot_use_is_refused_before_the_workdir(tmp_path, capsys, field, value, message):
    """keep=0 trained to the end with every checkpoint deleted; the others divided by zero after init."""
    from genmask_jax.train import loop

    config = tiny_config(total_steps=1, eval_every=0, sample_every=0, **{field: value})
    err = one_line_error(capsys, lambda: loop.train(config, tmp_path / "w", mesh=mesh_of((1, 1, 1))))
    assert message in err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("field,value,message", [
    ("data.seg_sources", "shape", "data.seg_sources: unknown seg source 'shape'; expected one of"),
    ("data.seg_repeats", "reasonseg:30", "data.seg_repeats='reasonseg:30': expected 'name:k,...'"),
], ids=["unknown source", "repeats of a source not read"])
def test_a_data_source_the_pipeline_cannot_read_is_refused_before_the_workdir(
    tmp_path, capsys, field, value, message
):
    """Both ended in a ValueError traceback."""
    from genmask_jax.train import loop

    config = tiny_config(total_steps=1, eval_every=0, sample_every=0, **{field: value})
    err = one_line_error(capsys, lambda: loop.train(config, tmp_path / "w", mesh=mesh_of((1, 1, 1))))
    assert message in err
    assert not (tmp_path / "w").exists()


@pytest.mark.multidevice
def test_heads_that_splash_cannot_split_over_the_mesh_are_refused_before_the_workdir(
    tmp_path, capsys, caplog
):
    """12 heads (1.3B) on tensor=8: splash's shard_map failed the first step, after the model, the state
    and the checkpoint restore were built. XLA attention computes the same numbers gathering every head to
    every device in each layer: a warning."""
    from genmask_jax.train import loop

    # The tiny DiT's 2 heads over tensor=4; batch 4 splits over data 1 x fsdp 1.
    config = tiny_config(total_steps=1, eval_every=0, sample_every=0, **{"model.dit.attention": "splash"})
    err = one_line_error(capsys, lambda: loop.train(config, tmp_path / "w", mesh=mesh_of((1, 1, 4))))
    assert "model.dit.num_heads 2 does not split over the 4 shards of the mesh axes that activation_" in err
    assert "use a tensor size in [1, 2] (splash attention shards the heads)" in err
    assert not (tmp_path / "w").exists()

    from genmask_jax.models.build import build_model
    from genmask_jax.parallel.sharding import rules_from_config

    rules = rules_from_config(config.sharding.logical_axis_rules)
    with caplog.at_level(logging.WARNING, logger="genmask_jax.train.loop"):
        loop.check_heads_split(build_model(tiny_config()).dit, mesh_of((1, 1, 4)), rules)  # xla
        loop.check_heads_split(build_model(config).dit, mesh_of((1, 2, 2)), rules)  # splits: silent
    assert caplog.text.count("attention gathers every head to every device") == 1


@pytest.mark.multidevice
@pytest.mark.parametrize("shape,batch,microbatches,multiple", [
    ((2, 1, 1), 3, 1, 2),  # failed at the first step's sharding (IndivisibleError), after init
    ((2, 2, 1), 4, 2, 8),  # failed when the first step was traced
], ids=["3 on 2 shards", "4 in 2 microbatches on 4 shards"])
def test_a_batch_the_mesh_cannot_split_is_refused_before_the_workdir(tmp_path, capsys, shape, batch,
                                                                    microbatches, multiple):
    from genmask_jax.train import loop

    config = tiny_config(total_steps=1, eval_every=0, sample_every=0, microbatches=microbatches,
                         **{"batch.seg": batch, "batch.gen": batch})
    err = one_line_error(capsys, lambda: loop.train(config, tmp_path / "w", mesh=mesh_of(shape)))
    assert f"config.batch on mesh {{'data': {shape[0]}, 'fsdp': {shape[1]}, 'tensor': 1}}" in err
    assert f"make config.batch.seg and config.batch.gen multiples of {multiple}" in err
    assert not (tmp_path / "w").exists()


def test_inference_with_a_vae_that_moved_stops_before_the_dit_loads(tmp_path, capsys):
    """The checkpoint's parameters are placeholders: reading them first would end in another error."""
    from genmask_jax.infer import checkpoint
    from genmask_jax.train import checkpointing

    ckpt = checkpointing.Checkpointer(tmp_path / "run", async_save=False)
    placeholder = {"step": np.asarray(5, np.int32), "params": {"w": np.ones(2, np.float32)}}
    ckpt.save(5, placeholder, config=tiny_config(vae_from=str(tmp_path / "moved")))
    ckpt.close()
    err = one_line_error(capsys, lambda: checkpoint.load(tmp_path / "run"))
    assert f"config.vae_from: {tmp_path}/moved: no such file or folder (pass --config.vae_from=" in err


@pytest.mark.skipif(not all(importlib.util.find_spec(p) for p in ("torch", "transformers")),
                    reason="the model folder is checked after the packages")
@pytest.mark.parametrize("made", [False, True], ids=["missing", "empty"])
@pytest.mark.parametrize("call", ["check_available", "make_encoder"])
def test_a_qwen_model_path_that_is_no_model_folder_is_refused_before_transformers(tmp_path, capsys, made,
                                                                                  call):
    """transformers took such a path for a hub id: a 90-line traceback about repo ids."""
    from genmask_jax import encoders
    from genmask_jax.data.pipeline import default_data_config

    config = default_data_config().encoder
    config.name, config.model_path = "qwen2_5_vl", str(tmp_path / "Qwen2.5-VL-7B-Instruct")
    if made:
        (tmp_path / "Qwen2.5-VL-7B-Instruct").mkdir()
    err = one_line_error(capsys, lambda: getattr(encoders, call)(config))
    what = "holds no config.json" if made else "is not a folder on this machine"
    assert f"data.encoder.model_path {config.model_path} {what}: give the local Qwen2.5-VL" in err


def test_a_cache_without_the_quick_evaluation_split_is_refused_before_the_workdir(tmp_path, capsys):
    from genmask_jax.encoders.precompute import precompute
    from genmask_jax.train import loop

    cache = str(tmp_path / "cache")
    config = tiny_config(eval_every=1, total_steps=1, **{
        "batch.seg": 8, "batch.gen": 8, "data.shapes.train_size": 16, "data.shapes.val_size": 4,
        "data.encoder.cache_dir": cache})
    precompute(config.data, cache, ["train"])
    capsys.readouterr()
    err = one_line_error(capsys, lambda: loop.train(config, tmp_path / "w"))
    assert "examples of split 'val'" in err and "precompute split 'val'" in err and f"--out={cache}" in err
    assert "quick_eval.split='val'" in err and "--config.eval_every=0" in err
    assert not (tmp_path / "w").exists()


def test_quick_evaluation_data_missing_on_this_machine_is_only_warned_about(tmp_path, caplog):
    """Training needs only its own split: a quick-evaluation split whose data is not here (ReasonSeg
    with train/ only) is warned about, not refused, with a cache as without one."""
    import json

    from PIL import Image

    from genmask_jax.encoders.precompute import precompute
    from genmask_jax.train import loop

    split_dir = tmp_path / "ReasonSeg" / "train"
    split_dir.mkdir(parents=True)
    square = [[2, 2], [20, 2], [20, 20], [2, 20]]
    for i in range(3):
        Image.fromarray(np.full((30, 40, 3), 60 * i, np.uint8)).save(split_dir / f"im{i}.jpg")
        shapes = [{"label": "target", "points": square}]
        annotation = {"text": [f"thing {i}"], "is_sentence": False, "shapes": shapes}
        (split_dir / f"im{i}.json").write_text(json.dumps(annotation))
    config = tiny_config(eval_every=500, **{
        "data.seg_sources": "reasonseg", "data.gen_sources": "",
        "data.reasonseg.root": str(tmp_path / "ReasonSeg")})
    precompute(config.data, str(tmp_path / "cache"), ["train"])
    config.data.encoder.cache_dir = str(tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        loop.check_quick_eval_cached(config)
    assert "quick evaluation's split 'val' cannot be opened" in caplog.text
    assert "--config.eval_every=0" in caplog.text
