"""experiments.ablation: `--trained_run` evaluates a demo run's checkpoint and leaves its folder as it was;
the base-model flags."""

import hashlib
import json
import shutil

import jax
import numpy as np
import pytest

from configs import demo as demo_config
from genmask_jax.eval.inprocess import evaluate_segmentation
from genmask_jax.experiments import ablation, pipeline
from genmask_jax.train import vae_pretrain


def folder_state(root) -> dict[str, tuple[int, int, str]]:
    """relative path -> (size, mtime_ns, sha256) of every file and folder under `root`."""
    state = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        state[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns, digest)
    return state


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A demo workdir as `pipeline.run_demo` lays it out (the smoke config, 4 steps), and its DiT params."""
    config = demo_config.get_config("variant=smoke")
    run = tmp_path_factory.mktemp("demo_run")
    vae_dir = pipeline.toy_vae_dir(config, str(run), progress=False)
    vae_config, vae_params = vae_pretrain.load(vae_dir)
    pool = pipeline.latent_pool(config, config.demo.num_train_scenes, vae_config, vae_params, progress=False)
    params, _ = pipeline.train_dit(config, str(run / "train"), pool, progress=False, vae_dir=vae_dir)
    return run, params


@pytest.mark.slow
def test_trained_run_is_read_only_and_evaluates_the_checkpoints_params(demo_run, tmp_path, monkeypatch):
    run, params = demo_run
    before = folder_state(run)
    evaluated = []

    def evaluate(model, dit_params, *args, **kwargs):
        evaluated.append(jax.device_get(dit_params))
        return evaluate_segmentation(model, dit_params, *args, **kwargs)

    monkeypatch.setattr(ablation, "evaluate_segmentation", evaluate)
    monkeypatch.setitem(ablation.STUDIES, "steps", {"1 step": {"num_steps": 1}, "2 steps": {"num_steps": 2}})
    summaries = ablation.run_studies(["steps"], 800, [0], 6000, 8, str(tmp_path / "out"), str(run), log=print)
    assert folder_state(run) == before
    assert len(evaluated) == 2
    for restored in evaluated:
        jax.tree.map(np.testing.assert_array_equal, restored, params)
    summary = summaries["steps"]
    assert list(summary["results"]) == ["1 step", "2 steps"]
    assert summary["steps"] == demo_config.get_config("variant=smoke").total_steps  # the run's, not --steps
    assert summary["test_size"] == 8


@pytest.mark.slow
def test_trained_run_refuses_a_run_that_is_not_the_demos_in_one_line(demo_run, tmp_path, capsys):
    run, _ = demo_run
    other = tmp_path / "other"
    shutil.copytree(run, other)
    [saved] = other.glob("train/checkpoints/*/config/metadata")
    config = json.loads(saved.read_text())
    del config["demo"]
    saved.write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        ablation.main(["--study", "steps", "--trained_run", str(other), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "is not a demo run" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--study", "all"], "only applies to --study steps"),
        (["--study", "steps", "--optimizer", "adamw"], "drop --optimizer"),
        (["--study", "steps", "--out", "{run}/eval"], "is inside --trained_run"),
    ],
)
def test_trained_run_refusals(flags, message, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    flags = [f.format(run=run) for f in flags]
    argv = ["--trained_run", str(run), "--out", str(tmp_path / "out"), *flags]
    with pytest.raises(SystemExit) as exit_info:
        ablation.main(argv)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err
    assert not any(run.iterdir())


def test_base_config_flags_restore_the_recorded_ablation_setting():
    """docs/REPRODUCTION.md's tables 2-5 (2026-11-25): the coarse DiT, AdamW lr 3e-3, 32 + 32 per step,
    text padding not masked, scanned layers."""
    base = ablation.base_config("coarse", "adamw", lr=3e-3, batch=32, context_mask=False, scan_layers=True)
    assert (base.optimizer.name, base.optimizer.lr, base.batch.seg, base.batch.gen) == ("adamw", 3e-3, 32, 32)
    assert base.model.dit.patch_size == (1, 2, 2) and base.model.dit.dim == 128
    assert not base.model.dit.use_context_mask and base.model.dit.scan_layers
    assert ablation.base_config().to_dict() == demo_config.get_config().to_dict()
