"""The built-in demo: its config, the latent-pool iterator, the baselines, and one drastically reduced
end-to-end run that writes the report (the shipped toy VAE, a 2-layer width-64 DiT, 4 steps)."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta as nn_meta

from configs import demo as demo_config
from genmask_jax.eval.inprocess import all_shapes_mask
from genmask_jax.experiments import pipeline
from genmask_jax.models import mask_codec
from genmask_jax.models.build import random_frozen
from genmask_jax.models.vae import VAEConfig, abstract_params
from genmask_jax.models.vae import init_params as init_vae_params
from genmask_jax.parallel.mesh import cpu_device_flags
from genmask_jax.train.latent_data import (
    LatentBatches,
    LatentPool,
    build_latent_pool,
    make_encode_fn,
    shapes_source,
    trim_to_longest,
)


def test_demo_config_is_consistent():
    for arg in ("variant=demo", "variant=demo,dit=coarse", "variant=smoke", "variant=smoke,dit=coarse"):
        config = demo_config.get_config(arg)
        assert config.data.encoder.dim == config.model.dit["text_dim"]
        assert config.model.timesteps.segmentation.to_dict() == {"law": "heavy_tailed", "a": 0.05}
        assert config.batch.seg == config.batch.gen  # the 1:1 task mix
        _, patch_h, patch_w = config.model.dit["patch_size"]
        height, width = config.data.resolution
        assert height % (8 * patch_h) == 0 and width % (8 * patch_w) == 0  # VAE x8, then the patches
    assert demo_config.get_config().model.dit["patch_size"] == (1, 1, 1)
    assert demo_config.get_config("dit=coarse").model.dit["patch_size"] == (1, 2, 2)
    with pytest.raises(ValueError, match="unknown dit"):
        demo_config.get_config("dit=medium")


def _pool(n=6, L=4, D=8):
    rng = np.random.default_rng(0)
    lat = lambda: rng.standard_normal((n, 1, 2, 2, 16)).astype(np.float32)
    ctx = lambda: rng.standard_normal((n, L, D)).astype(np.float32)
    return LatentPool(lat(), lat(), ctx(), np.ones((n, L), bool), ctx(), np.ones((n, L), bool))


def test_latent_batches_layout_and_resume():
    calls = []
    it = LatentBatches(_pool(), batch_seg=2, batch_gen=3, seed=1, on_batch=lambda: calls.append(1))
    first = next(it)
    assert set(first) == {"seg", "gen"}
    assert first["seg"]["mask_latent"].shape == (2, 1, 2, 2, 16)
    assert first["gen"]["context"].shape == (3, 4, 8) and "mask_latent" not in first["gen"]
    state = it.get_state()
    expected = next(it)
    resumed = LatentBatches(_pool(), 2, 3, seed=0)
    resumed.set_state(state)
    again = next(resumed)
    np.testing.assert_array_equal(again["seg"]["image_latent"], expected["seg"]["image_latent"])
    assert len(calls) == 2
    assert "gen" not in next(LatentBatches(_pool(), 2, 0))


def test_latent_pool_is_the_same_in_chunks_and_over_devices():
    """Rendering on a worker thread in chunks and encoding batches dealt over the devices (8 simulated
    in the test run) must give each scene's own encode: one scene at a time on one device."""
    data = demo_config.get_config("variant=smoke").data
    vae_config = VAEConfig.from_variant("tiny")
    params = init_vae_params(vae_config, jax.random.key(0))
    pool = build_latent_pool(data, 7, vae_config, params, batch_size=2, progress=False, chunk=3)
    encode = make_encode_fn(vae_config)
    source = shapes_source(data, data.train_split, 7)
    for i in (0, 4, 6):
        example = source[i]
        image = example["image"][None].astype(np.float32) / 127.5 - 1.0
        mask = np.asarray(mask_codec.mask_to_rgb(example["mask"][None].astype(np.float32)))
        # Batches of 2 vs 1: XLA may block the convolutions differently, so not bit-equal.
        np.testing.assert_allclose(pool.image_latent[i], encode(params, image)[0], atol=1e-5)
        np.testing.assert_allclose(pool.mask_latent[i], encode(params, mask)[0], atol=1e-5)
    assert pool.seg_context.shape[0] == pool.gen_context_mask.shape[0] == len(pool) == 7


def test_trim_to_longest_keeps_every_real_token():
    mask = np.zeros((3, 8), bool)
    mask[0, :2], mask[1, :5], mask[2, :3] = True, True, True
    context = np.random.default_rng(0).standard_normal((3, 8, 4)).astype(np.float32)
    trimmed, trimmed_mask = trim_to_longest(context, mask)
    assert trimmed.shape == (3, 5, 4) and trimmed_mask.sum() == mask.sum()
    np.testing.assert_array_equal(trimmed, context[:, :5])
    assert trim_to_longest(context, np.zeros_like(mask))[0].shape == (3, 1, 4)


def test_cpu_device_flags_divide_both_batches():
    count = lambda *args: int(cpu_device_flags(*args).split()[0].split("=")[1])
    assert [count(16, 16, 2), count(16, 16, 12), count(16, 0, 3), count(16, 16, 1)] == [2, 8, 2, 1]
    assert "--xla_cpu_multi_thread_eigen=false" in cpu_device_flags(16, 16, 2)


def test_all_shapes_mask_covers_the_target():
    source = shapes_source(demo_config.get_config("variant=smoke").data, "test", 4)
    for i in range(4):
        example = source[i]
        union = all_shapes_mask(source.scene(i), *example["mask"].shape)
        target = example["mask"] > 0
        # Both masks are PIL renders of the same polygons, so the target lies inside the union exactly.
        assert np.all(union[target]) and union.sum() > target.sum()


def test_demo_smoke_end_to_end(tmp_path):
    config = demo_config.get_config("variant=smoke")
    # The loop's quick evaluation at the last step: it needs the frozen VAE that training on latents
    # does not, so this checks that the demo's train state carries it.
    config.eval_every = config.sample_every = config.total_steps
    report = pipeline.run_demo(config, str(tmp_path), progress=False)
    for name in ("metrics.json", "report.md", "segmentation_grid.png", "generated.png"):
        assert (tmp_path / name).is_file(), name
    step = f"step_{config.total_steps:07d}"
    for name in (f"{step}_segmentation.png", f"{step}_generation.png"):
        assert (tmp_path / "train" / "samples" / name).is_file(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["segmentation"]["num_samples"] == config.data.shapes.test_size
    assert 0.0 <= saved["segmentation"]["giou"] <= 1.0
    # Every test target is non-empty, so the empty mask scores exactly 0.
    assert saved["baselines"]["empty_mask"]["giou"] == 0.0
    assert saved["baselines"]["all_shapes_mask"]["giou"] > 0.0
    assert len(report["train"]["history"]) >= 1


@pytest.mark.slow
def test_a_demo_rerun_resumes_its_run_and_refuses_another_config_in_one_line(tmp_path):
    """The same config resumes `<workdir>/train` (finished: evaluated again, the report saying it trained
    nothing now); one that changes the trained model would resume a run that is not the one asked for."""
    config = demo_config.get_config("variant=smoke")
    config.demo.num_generated = 0
    first = pipeline.run_demo(config, str(tmp_path), progress=False)
    assert first["train"]["resumed_from_step"] == 0 and first["train"]["history"]
    config.demo.num_grid = 0  # what is done with the trained model may change
    # A run saved before fields existed (dropped from its stored config here) still resumes: it trained
    # as the code of its day did without them.
    stored = next((tmp_path / "train" / "checkpoints").glob("*/config/metadata"))
    saved = json.loads(stored.read_text())
    del saved["ema_warmup"], saved["optimizer"]["muon_conv_kernels"], saved["data"]["seg_repeats"]
    stored.write_text(json.dumps(saved))
    again = pipeline.run_demo(config, str(tmp_path), progress=False)
    steps = config.total_steps
    assert again["train"] == {"steps": steps, "resumed_from_step": steps, "history": []}
    assert again["segmentation"] == first["segmentation"]
    metrics = (tmp_path / "train" / "metrics.jsonl").read_text()
    flags = ["--config=configs/demo.py:variant=smoke", "--config.demo.num_generated=0", "--noprogress"]
    flags += ["--config.total_steps=2", f"--workdir={tmp_path}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "genmask_jax.demo", *flags]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("genmask_jax.demo: error: ") and last.endswith(
        f"holds step {steps} of a run with another config (total_steps: {steps} saved, 2 now), which this "
        f"run would resume: pass another --workdir, or delete {tmp_path}/train"
    )
    assert (tmp_path / "train" / "metrics.jsonl").read_text() == metrics


def test_a_workdir_vae_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """`vae_from` is saved with the model; relative to the run's working directory, `evaluate` or an
    ablation `--trained_run` started elsewhere did not find it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo" / "toy_vae").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "toy_vae" / "config.json").write_text("{}")
    config = demo_config.get_config("variant=smoke")
    config.vae_from = ""
    assert pipeline.toy_vae_dir(config, "runs/demo") == str(tmp_path / "runs" / "demo" / "toy_vae")


def test_a_rerun_compares_the_fields_both_configs_have():
    """Refused every rerun of a workdir saved before a field was added (`'absent' saved`); the demo sets
    `ema_warmup` True where the default filled into old saves was False."""
    config = demo_config.get_config("variant=smoke")
    saved = json.loads(json.dumps(config.to_dict(), default=list))
    del saved["ema_warmup"], saved["optimizer"]["muon_conv_kernels"]
    saved["a_field_removed_since"] = 1
    assert pipeline.config_differences(saved, config) == []
    saved["optimizer"]["lr"] = 1.0
    saved["checkpoint"]["keep"] = 7  # may change
    saved["data"]["encoder"]["device"] = "cuda:1"  # may change
    saved["data"]["shapes"]["train_size"] = 7  # may change: the pool has its own size
    saved["demo"]["vae_pretrain_steps"] = 3  # may change: the VAE's own config is compared
    lr = f"optimizer.lr: 1.0 saved, {config.optimizer.lr!r} now"
    assert pipeline.config_differences(saved, config) == [lr]


def test_the_demo_refuses_to_train_in_several_processes(monkeypatch, tmp_path):
    # Every process would draw the same global batch from its own copy of the pool.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="train in one process"):
        pipeline.train_dit(demo_config.get_config("variant=smoke"), str(tmp_path), pool=None)


def test_a_batch_larger_than_the_pool_is_refused_before_any_work(tmp_path):
    """A batch draws distinct scenes: the run made the VAE and the pool, then failed in numpy's words."""
    flags = ["--config=configs/demo.py:variant=smoke", "--config.demo.num_train_scenes=4", "--noprogress",
             f"--workdir={tmp_path}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "genmask_jax.demo", *flags], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "is larger than the latent pool's 4 scenes (config.demo.num_train_scenes)" in done.stderr
    assert os.listdir(tmp_path) == []
    pool = LatentPool(*[np.zeros((3, 1))] * 6)
    with pytest.raises(ValueError, match=r"config.batch \(seg 4, gen 2\) is larger than the latent pool's 3"):
        LatentBatches(pool, 4, 2)


def test_more_generated_images_than_captions_are_refused_before_any_work():
    """The demo trained and evaluated, then failed with a bare IndexError, writing no report."""
    config = demo_config.get_config("variant=smoke")
    config.data.shapes.test_size, config.demo.eval_split = 2, "test"
    config.demo.num_generated = 3
    message = r"num_generated=3: the test split has 2 captions \(data.shapes.test_size\)"
    with pytest.raises(ValueError, match=message):
        pipeline.check_demo_sizes(config)
    config.demo.num_generated = 2
    pipeline.check_demo_sizes(config)


def test_a_stopped_training_is_not_evaluated_as_a_finished_one(tmp_path, monkeypatch):
    """On SIGTERM the loop saves and returns: the demo went on to evaluate the model of that step and
    reported it as trained for total_steps; the ablation did so and trained its next variants."""
    import types

    config = demo_config.get_config("variant=smoke")
    stopped = types.SimpleNamespace(step=np.int32(3))
    monkeypatch.setattr(pipeline.loop, "train", lambda *args, **kwargs: (stopped, []))
    pool = LatentPool(*[np.zeros((64, 1))] * 6)
    with pytest.raises(pipeline.TrainingStopped, match=f"stopped at step 3 of {config.total_steps} .* rerun"):
        pipeline.train_dit(config, str(tmp_path), pool, progress=False)


@pytest.mark.slow
def test_in_process_evaluation_equals_the_batch_job_at_any_batch_size(tmp_path):
    """The demo's evaluator draws each example's noise from its index and thresholds after the
    bilinear resize to the original size, as the batch job does: the same numbers at every batch size,
    and the job's, on a split rendered at another size than the model's."""
    from genmask_jax.eval import job
    from genmask_jax.eval.inprocess import evaluate_segmentation
    from genmask_jax.infer.segmenter import predict_scores
    from genmask_jax.models.build import dit_initializer

    config = demo_config.get_config("variant=smoke")
    config.data.shapes.test_size = 6
    config.data.shapes.render_resolution = (48, 40)
    config.data.num_threads = 1
    vae_config, vae_params = pipeline.load_toy_vae(config, str(tmp_path))
    model = pipeline.genmask_model(config, vae_config)
    params = nn_meta.unbox(dit_initializer(model)(jax.random.key(1)))
    # The DiT's head starts at zero; a perturbation makes the prediction depend on the noise.
    params = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), params)

    def in_process(batch_size):
        result = evaluate_segmentation(
            model, params, vae_params, config.data, "test", batch_size, seed=0, keep=6, progress=False
        )
        return result.metrics, [e["pred"] for e in result.examples]

    predict = jax.jit(
        lambda image, context, mask, index: predict_scores(
            model, params, vae_params, image, context, mask, index, jax.random.key(0)
        )
    )
    offline = job.evaluate_split(
        lambda b: predict(b["image"], b["context"], b["context_mask"], b["index"]),
        config.data,
        job.SplitSpec("synthetic", "test"),
        str(tmp_path / "job"),
        4,
        progress=False,
    )
    first, preds = in_process(4)
    assert first["num_samples"] == offline["num_samples"] == 6
    assert first["giou"] > 0  # the predictions overlap some targets: the comparison is not of zeros
    for name in ("giou", "ciou"):
        assert first[name] == pytest.approx(offline[name], abs=1e-12)
    again, preds_again = in_process(3)
    assert again == first
    np.testing.assert_array_equal(np.stack(preds_again), np.stack(preds))


@pytest.mark.slow
def test_vae_pretrain_runs(tmp_path):
    from genmask_jax.train import vae_pretrain

    cfg = vae_pretrain.PretrainConfig(resolution=32, crop=16, pool_size=8, batch_size=4, steps=2)
    config, params, history, iou = vae_pretrain.pretrain(cfg, progress=False)
    vae_pretrain.save(str(tmp_path / "vae"), config, params)
    loaded_config, loaded = vae_pretrain.load(str(tmp_path / "vae"))
    assert loaded_config == config and 0.0 <= iou <= 1.0


def test_ablation_trains_the_shared_base_model_once():
    from configs import demo
    from genmask_jax.experiments import ablation

    base = demo.get_config()
    keys = {
        (study, name): ablation.variant_key(base, variant)
        for study, variants in ablation.STUDIES.items()
        for name, variant in variants.items()
    }
    shared = {
        keys["timestep_law", "a=0.05"],
        keys["mixing", "seg:gen 1:1"],
        keys["shortcut", "with image frame"],
    }
    assert len(shared) == 1 and {keys["steps", n] for n in ("1 step", "4 steps", "16 steps")} == shared
    assert len(set(keys.values())) == 6  # the base, a = 0.1, a = 0.5, logit-normal, 1:0, no image frame


def test_vae_pretrain_loss_decodes_the_mean_without_sampling():
    from genmask_jax.train import vae_pretrain

    cfg = vae_pretrain.PretrainConfig(resolution=16)
    config = vae_pretrain.vae_config(cfg)
    params = init_vae_params(config, jax.random.key(0))
    rgb = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    weights = jnp.ones((2,))

    def losses(sample):
        fn = jax.jit(lambda key: vae_pretrain.vae_loss(params, rgb, weights, key, config, 1e-4, sample)[0])
        return float(fn(jax.random.key(0))), float(fn(jax.random.key(1)))

    mean_a, mean_b = losses(False)
    assert mean_a == mean_b  # the posterior mean: no noise drawn
    sample_a, sample_b = losses(True)
    assert sample_a != sample_b


@pytest.mark.parametrize("clamped", [True, False])
def test_vae_pretrain_loss_clamped_or_raw(clamped):
    """Clamped (the default, as the shipped VAE was trained): a pixel past its target's bound costs nothing
    and one past the wrong bound gets no gradient. Raw (`clamped_loss=False`): both are pulled back."""
    from genmask_jax.train import vae_pretrain

    config = vae_pretrain.vae_config(vae_pretrain.PretrainConfig())
    rgb, weights = jnp.ones((1, 8, 8, 3)), jnp.ones((1,))

    def bias_grad(bias):
        params = random_frozen(abstract_params(config), seed=0)  # host init: no init to compile
        params["params"]["decoder"]["conv_out"]["bias"] = jnp.full((3,), bias)
        key = jax.random.key(1)
        loss = lambda p: vae_pretrain.vae_loss(p, rgb, weights, key, config, 0.0, False, clamped)[0]
        return float(jnp.abs(jax.jit(jax.grad(loss))(params)["params"]["decoder"]["conv_out"]["bias"]).min())

    for bias in (-5.0, 5.0):  # every pixel past the wrong bound, then past the right one
        assert (bias_grad(bias) == 0.0) if clamped else (bias_grad(bias) > 1.0)


def _saved_parent(tmp_path, base_dim=8):
    from genmask_jax.train import vae_pretrain

    config = vae_pretrain.vae_config(vae_pretrain.PretrainConfig(base_dim=base_dim))
    record = {"pretrain": {"steps": 3, "init_from": ""}, "val_mask_iou": 0.5}
    params = random_frozen(abstract_params(config), 0)
    vae_pretrain.save(str(tmp_path / "parent"), config, params, extra=record)
    return str(tmp_path / "parent"), record


def test_vae_pretrain_init_from_another_structure_fails_clearly(tmp_path):
    from genmask_jax.train import vae_pretrain

    parent, _ = _saved_parent(tmp_path)
    cfg = vae_pretrain.PretrainConfig(base_dim=16, init_from=parent)
    with pytest.raises(ValueError, match="base_dim: parent 8, this run 16"):
        vae_pretrain.pretrain(cfg, progress=False)


def test_vae_pretrain_refuses_an_out_that_is_not_a_checkpoint_before_training(tmp_path, monkeypatch, capsys):
    from genmask_jax.train import vae_pretrain

    runs = tmp_path / "runs"
    (runs / "demo" / "train").mkdir(parents=True)
    (runs / "notes.txt").write_text("precious")

    def pretrain(cfg):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(vae_pretrain, "pretrain", pretrain)
    with pytest.raises(SystemExit):
        vae_pretrain.main(["--out", str(runs), "--steps", "1"])
    assert "is not a checkpoint folder" in capsys.readouterr().err
    assert sorted(p.name for p in runs.rglob("*")) == ["demo", "notes.txt", "train"]


def test_vae_pretrain_save_replaces_only_an_earlier_checkpoint(tmp_path):
    """README rebuilds genmask_jax/assets/toy_vae in place; any other existing folder is left alone."""
    from convert.checkpoint_io import ConversionError
    from genmask_jax.train import vae_pretrain

    parent, _ = _saved_parent(tmp_path)
    config, params = vae_pretrain.load(parent)
    vae_pretrain.save(parent, config, params, extra={"val_mask_iou": 0.75})
    with open(f"{parent}/pretrain.json") as f:
        assert json.load(f) == {"val_mask_iou": 0.75}
    (tmp_path / "parent" / "notes.txt").write_text("precious")
    with pytest.raises(ConversionError, match="is not a checkpoint folder"):
        vae_pretrain.save(parent, config, params)
    assert sorted(p.name for p in (tmp_path / "parent").iterdir()) == [
        "config.json",
        "notes.txt",
        "params",
        "pretrain.json",
    ]


@pytest.mark.parametrize("seed", [2**32 - 1, 2**32 + 7, -1])
def test_vae_pretrain_refuses_a_seed_jax_would_cut_to_32_bits(seed):
    from genmask_jax.train import vae_pretrain

    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32 - 1\)"):
        vae_pretrain.pretrain(vae_pretrain.PretrainConfig(seed=seed), progress=False)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--store_dtype=bf16"], "invalid choice: 'bf16'"),
        (["--resolution=36"], "resolution must be a positive multiple of 8, got 36"),
        (["--resolution=32", "--crop=40"], "crop must be a multiple of 8 from 8 to the resolution 32: 40"),
        (["--crop=12"], "crop must be a multiple of 8"),
    ],
)
def test_vae_pretrain_refuses_settings_that_fail_after_training(tmp_path, flags, message, capsys):
    """They trained every step and then failed (saving nothing), or failed inside with numpy's words."""
    from genmask_jax.train import vae_pretrain

    with pytest.raises(SystemExit) as exit_info:
        vae_pretrain.main([f"--out={tmp_path / 'vae'}", "--steps=1", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "vae").exists()


def test_vae_pretrain_records_its_parent(tmp_path, monkeypatch):
    from genmask_jax.train import vae_pretrain

    parent, record = _saved_parent(tmp_path)
    loaded = vae_pretrain.load(parent)
    monkeypatch.setattr(vae_pretrain, "pretrain", lambda cfg: (*loaded, [], 0.25))  # only main's record
    vae_pretrain.main(["--out", str(tmp_path / "child"), "--init_from", parent, "--steps", "1"])
    with open(tmp_path / "child" / "pretrain.json") as f:
        child = json.load(f)
    assert child["parent"] == record and child["pretrain"]["init_from"] == parent



def test_vae_pretrain_help_describes_every_flag(capsys):
    from genmask_jax.train import vae_pretrain

    with pytest.raises(SystemExit):
        vae_pretrain.main(["--help"])
    options = capsys.readouterr().out.split("\noptions:\n")[1].strip("\n")
    entry = re.compile(r"\s*(-\S+(?: [A-Z_]+)?(?:, -\S+(?: [A-Z_]+)?)*)(.*)", re.S)  # names, metavar, help
    described = {}
    for names, text in (entry.fullmatch(e).groups() for e in re.split(r"\n  (?=-)", options)):
        described[names.split(",")[0].split()[0]] = re.sub(r"\(default:[^)]*\)", "", text).strip()
    fields = [f"--{f.name}" for f in dataclasses.fields(vae_pretrain.PretrainConfig)]
    undescribed = [flag for flag in ["--out", "--store_dtype", *fields] if not described.get(flag)]
    assert not undescribed
