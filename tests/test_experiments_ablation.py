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


@pytest.mark.slow
def test_a_rerun_resumes_its_models_and_refuses_other_settings_before_training(tmp_path, monkeypatch):
    """Each model trains in a folder named by study, variant and seed alone: a rerun into the same --out
    with other settings would resume the old checkpoint (and evaluate it, with 0 steps left), so it is
    refused before anything is built; the same settings resume (re-evaluate) and say so."""
    monkeypatch.setitem(
        ablation.STUDIES, "mini", {"a=0.05": {"segmentation": {"law": "heavy_tailed", "a": 0.05}}}
    )
    base = demo_config.get_config("variant=smoke")
    out = str(tmp_path / "out")
    run = lambda steps, num_scenes, base: ablation.run_studies(
        ["mini"], steps, [0], num_scenes, 8, out, log=lambda *a: None, base=base
    )
    [first] = run(2, 16, base)["mini"]["results"]["a=0.05"]
    [again] = run(2, 16, base)["mini"]["results"]["a=0.05"]
    assert "resumed_from_step" not in first and again["resumed_from_step"] == 2
    assert (again["giou"], again["ciou"]) == (first["giou"], first["ciou"])

    def not_before_the_check(*args, **kwargs):
        raise AssertionError("built the latent pool before checking the models' folders")

    monkeypatch.setattr(pipeline, "latent_pool", not_before_the_check)
    other_lr = base.copy_and_resolve_references()
    other_lr.optimizer.lr = 1.0
    # A VAE trained again (other latent statistics): the models trained on the old one's latents.
    retrained = tmp_path / "retrained_vae"
    shutil.copytree(base.vae_from, retrained)
    vae_json = json.loads((retrained / "config.json").read_text())
    vae_json["latents_mean"][0] += 1.0
    (retrained / "config.json").write_text(json.dumps(vae_json))
    other_vae = base.copy_and_resolve_references()
    other_vae.vae_from = str(retrained)
    for steps, num_scenes, config, changed in [
        (1, 16, base, "total_steps: 2 saved, 1 now"),
        (2, 12, base, "demo.num_train_scenes: 16 saved, 12 now"),
        (2, 16, other_lr, "optimizer.lr: 0.005 saved, 1.0 now"),
        (2, 16, other_vae, "model.vae.latents_mean"),
    ]:
        with pytest.raises(pipeline.WorkdirConfigMismatch, match=f"a=0.05-seed0 holds step 2 .*{changed}"):
            run(steps, num_scenes, config)


def test_main_reports_a_mismatched_run_folder_in_one_line(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise pipeline.WorkdirConfigMismatch(
            "out/runs/mixing/x-seed0 holds step 800 of a run with another config"
        )

    monkeypatch.setattr(ablation, "run_studies", refuse)
    with pytest.raises(SystemExit) as exit_info:
        ablation.main(["--study", "mixing", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith("pass another --out, or delete that folder")


@pytest.mark.parametrize(
    "seeds, name", [([0], "mixing"), ([1, 2], "mixing_seeds_1_2"), ([0, 1], "mixing_seeds_0_1")]
)
def test_results_of_other_seeds_keep_the_seed_0_files(seeds, name, tmp_path, monkeypatch):
    """docs/REPRODUCTION.md reruns `--study mixing --seeds 1,2` into the `--out` of the seed-0 run."""
    summary = {
        "study": "mixing",
        "steps": 1,
        "seeds": seeds,
        "results": {"seg:gen 1:1": [{"giou": 0.5, "ciou": 0.5}]},
    }
    monkeypatch.setattr(ablation, "run_studies", lambda *args, **kwargs: {"mixing": summary})
    out = tmp_path / "out"
    ablation.main(["--study", "mixing", "--seeds", ",".join(map(str, seeds)), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == [f"{name}.json", f"{name}.png"]
    assert json.loads((out / f"{name}.json").read_text()) == summary
