"""The batch evaluation job without a model: split names, shards, resumption, PNG / RLE writing and
the mapping of predictions back to each image's original size (a fake `predict` stands in for the
model, so nothing is compiled)."""

import errno
import json
import re

import numpy as np
import pytest
from PIL import Image

from genmask_jax.data import preprocess
from genmask_jax.data.pipeline import default_data_config
from genmask_jax.eval import job

NUM_EXAMPLES = 10
BATCH = 4


def data_config(render=(48, 40)):
    """Synthetic shapes rendered at `render` (non-square, not the model's 32x32), toy contexts."""
    c = default_data_config()
    c.resolution = (32, 32)
    c.shapes.test_size = NUM_EXAMPLES
    c.shapes.render_resolution = render
    c.encoder.context_length = 8
    c.encoder.dim = 16
    c.num_threads = 1
    c.prefetch_buffer_size = 2
    return c


SPEC = job.SplitSpec("synthetic", "test")


class Predict:
    """Scores of the ground truth at the model resolution (+1 inside, -1 outside; or -1 everywhere),
    counting the examples it sees."""

    def __init__(self, empty: bool = False):
        self.empty, self.calls, self.rows = empty, 0, 0

    def __call__(self, batch):
        self.calls += 1
        self.rows += int(np.sum(batch["valid"]))
        masks = (np.asarray(batch["mask"]) > 0.5) & (not self.empty)
        return np.where(masks, 1.0, -1.0).astype(np.float32)


def run(out, predict, fmt="png", settings=None, **kwargs):
    return job.evaluate_split(
        predict, data_config(), SPEC, out, BATCH, fmt, settings, progress=False, **kwargs
    )


def test_parse_splits():
    specs = job.parse_splits("refcoco_unc:testA, reasonseg:val,synthetic:test")
    assert [s.name for s in specs] == ["refcoco_unc:testA", "reasonseg:val", "synthetic:test"]
    assert job.parse_splits(["refcocog_umd:test"])[0].dirname == "refcocog_umd-test"
    # A repeated --split (DEFINE_multi_string) gives a list whose items may be comma lists; each split once.
    specs = job.parse_splits(["refcoco_unc:val,refcoco_unc:testA", "refcoco_unc:testB", "refcoco_unc:val"])
    assert [s.name for s in specs] == ["refcoco_unc:val", "refcoco_unc:testA", "refcoco_unc:testB"]
    for bad in ("refcoco:val", "refcoco_unc:test", "refcocog_umd:testA", "synthetic", ""):
        with pytest.raises(job.SplitError):
            job.parse_splits(bad)


def test_split_data_config_selects_the_source():
    c = job.split_data_config(data_config(), job.SplitSpec("refcocoplus_unc", "testB"))
    assert c.seg_sources == "refcoco" and c.refcoco.name == "refcocoplus_unc"
    assert job.split_data_config(data_config(), SPEC).seg_sources == "shapes"


@pytest.mark.parametrize(
    "configured,dataset,expected",
    [
        # big_vision's builder (README, Data) stays big_vision's for every RefCOCO split
        ("ref_coco_bv/refcoco_unc", "refcoco_unc", "ref_coco_bv/refcoco_unc"),
        ("ref_coco_bv/refcoco_unc", "refcocoplus_unc", "ref_coco_bv/refcocoplus_unc"),
        ("ref_coco_bv/refcoco_unc:1.0.0", "refcoco_unc", "ref_coco_bv/refcoco_unc:1.0.0"),
        # a training union: the entry of the evaluated set, as written
        ("refcoco_unc,refcocoplus_unc,refcocog_umd", "refcocog_umd", "refcocog_umd"),
        ("ref_coco_bv/refcoco_unc,ref_coco_bv/refcocog_umd", "refcocog_umd", "ref_coco_bv/refcocog_umd"),
        ("refcoco_unc", "refcocoplus_unc", "refcocoplus_unc"),
    ],
)
def test_split_data_config_keeps_big_vision_names(configured, dataset, expected):
    c = data_config()
    c.refcoco.name = configured
    split = job.DATASETS[dataset][2][0]
    assert job.split_data_config(c, job.SplitSpec(dataset, split)).refcoco.name == expected


def test_rle_round_trip(np_rng):
    mask = np_rng.random((13, 7)) > 0.5
    rle = job.encode_rle(mask)
    assert rle["size"] == [13, 7] and isinstance(rle["counts"], str)
    json.dumps(rle)
    np.testing.assert_array_equal(job.decode_rle(rle), mask)


def test_predictions_at_original_size_png(tmp_path):
    metrics = run(tmp_path, Predict(), "png")
    split_dir = tmp_path / SPEC.dirname
    records = job.ShardStore(split_dir).records()
    assert [r["index"] for r in records] == list(range(NUM_EXAMPLES))
    for r in records:
        mask = np.asarray(Image.open(split_dir / r["file"]))
        assert mask.shape == (48, 40) and set(np.unique(mask)) <= {0, 255}
    # The ground truth sent through fit (nearest, 48x40 -> 27x32 + padding) and back is close but
    # not pixel-exact; a shape's boundary pixels are what resampling can flip.
    assert metrics["num_samples"] == NUM_EXAMPLES and metrics["giou"] > 0.8
    saved = json.loads((split_dir / "metrics.json").read_text())
    assert saved["metrics"] == metrics and saved["split"] == "synthetic:test"


def test_unfit_is_exact_without_resampling(tmp_path):
    """When the image is already at the model resolution the mapping back is the identity."""
    c = data_config(render=(32, 32))
    metrics = job.evaluate_split(Predict(), c, SPEC, tmp_path, BATCH, "png", progress=False)
    assert metrics["giou"] == pytest.approx(1.0, abs=1e-6) and metrics["precision@0.9"] == 1.0


def test_empty_predictions(tmp_path):
    metrics = run(tmp_path, Predict(empty=True))
    assert metrics["giou"] == 0.0 and metrics["ciou"] == 0.0 and metrics["precision@0.5"] == 0.0


def test_rle_predictions(tmp_path):
    run(tmp_path, Predict(), "rle")
    split_dir = tmp_path / SPEC.dirname
    predictions = json.loads((split_dir / "predictions.json").read_text())
    assert len(predictions) == NUM_EXAMPLES and not (split_dir / "masks").exists()
    for r in predictions:
        mask = job.decode_rle(r["segmentation"])
        assert mask.shape == (48, 40) and mask.dtype == bool
        assert 0 < r["intersection"] <= min(r["union"], int(mask.sum()))


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_scores_are_resized_bilinearly_then_thresholded(mode, np_rng):
    """LISA's protocol: the score, not a thresholded mask, goes to the original size
    (bilinearly, as LISA's F.interpolate(align_corners=False) upsamples its logits), then > 0."""
    import jax

    from genmask_jax.infer.segmenter import original_size_mask

    g = preprocess.compute_geometry((61, 83), (32, 32), mode)
    score = np_rng.uniform(-1, 1, (32, 32)).astype(np.float32)
    # The reference, written independently of preprocess: the image's part of the score (crop: the
    # whole canvas, which the cut-away borders extend with 0) resized by jax.image.resize.
    y0, x0, y1, x1 = g.content_box
    canvas = np.zeros((g.resized_h, g.resized_w), np.float32)
    canvas[y0 - g.top : y1 - g.top, x0 - g.left : x1 - g.left] = score[y0:y1, x0:x1]
    upsampled = np.asarray(jax.image.resize(canvas, (61, 83), "linear", antialias=False))
    mask = original_size_mask(score, g)
    assert mask.shape == (61, 83) and mask.dtype == bool
    decided = np.abs(upsampled) > 1e-4  # float rounding may flip a pixel whose score is 0 to 1e-6
    np.testing.assert_array_equal(mask[decided], upsampled[decided] > 0)
    # ...which is not what thresholding first and resizing the mask (nearest) gives.
    nearest = preprocess.unfit_mask(score > 0, g)
    assert np.sum(nearest != mask) > 0.02 * mask.size


def test_unfit_mask_maps_back_to_the_original_grid():
    g = preprocess.compute_geometry((48, 40), (32, 32), "pad")
    original = np.zeros((48, 40), bool)
    original[12:36, 8:32] = True
    fitted = preprocess.fit_mask(original, g)
    back = preprocess.unfit_mask(fitted, g)
    assert back.shape == (48, 40) and back.dtype == bool
    # 48 -> 32 -> 48 with nearest resampling moves an edge by at most one source pixel.
    assert np.sum(back != original) <= 2 * (24 + 24)


def test_resume_skips_finished_shards(tmp_path):
    first = Predict()
    metrics = run(tmp_path, first)
    assert first.calls == 3 and first.rows == NUM_EXAMPLES  # batches of 4: 4 + 4 + 2 (+2 padding)

    again = Predict()
    assert run(tmp_path, again) == metrics
    assert again.calls == 0

    shards = job.ShardStore(tmp_path / SPEC.dirname).shard_files()
    shards[1].unlink()  # an interrupted run: the middle shard never committed
    resumed = Predict()
    assert run(tmp_path, resumed) == metrics
    assert resumed.calls == 1 and resumed.rows == BATCH


def test_resume_with_another_batch_size(tmp_path):
    metrics = run(tmp_path, Predict())
    job.ShardStore(tmp_path / SPEC.dirname).shard_files()[-1].unlink()  # examples 8, 9
    resumed = Predict()
    out = job.evaluate_split(resumed, data_config(), SPEC, tmp_path, 2, "png", progress=False)
    assert out == metrics and resumed.rows == 2


def test_processes_split_the_examples(tmp_path):
    """Two processes (run one after the other here) each predict their half; process 0 merges."""
    p1 = Predict()
    assert run(tmp_path, p1, process_index=1, process_count=2) is None
    p0 = Predict()
    metrics = run(tmp_path, p0, process_index=0, process_count=2)
    assert p0.rows + p1.rows == NUM_EXAMPLES and p0.rows > 0 and p1.rows > 0
    assert metrics == run(tmp_path / "single", Predict())


def test_incomplete_split_is_an_error(tmp_path):
    """Process 0 alone (process 1's shards missing) cannot merge."""
    with pytest.raises(job.EvaluationError, match="examples have predictions"):
        run(tmp_path, Predict(), process_index=0, process_count=2)


def test_examples_another_process_lost_ask_for_a_rerun(tmp_path, monkeypatch):
    """Every example of process 1 (its one batch, 4..7) lost to memory in a shared --out: process 0 told the
    user to move --out to a shared folder (it took the missing examples for a per-host --out, which
    `check_shared_out` proves at the start of `run`); a rerun completes the split."""
    for lost in range(4, 8):
        failing_example(monkeypatch, lost, MemoryError("out of host memory"))
    assert run(tmp_path, Predict(), process_index=1, process_count=2) is None
    monkeypatch.undo()
    with pytest.raises(job.EvaluationError, match="^synthetic:test: 6 of 10 examples .*; rerun to complete"):
        run(tmp_path, Predict(), process_index=0, process_count=2)


def test_temporary_files_are_unique_per_process(tmp_path):
    """Hosts share --out: two processes must not write a shard through the same temporary file."""
    import os

    tmp = job._tmp_path(tmp_path / "shard-000000004.json")
    assert tmp.parent == tmp_path and tmp.name == f".shard-000000004.json.tmp-0-{os.getpid()}"


def test_refuses_to_mix_runs(tmp_path):
    run(tmp_path, Predict(), settings={"step": 3})
    with pytest.raises(job.EvaluationError, match="different evaluation"):
        run(tmp_path, Predict(), settings={"step": 4})


def write_reasonseg(root, texts: dict[str, list[str]]) -> None:
    """ReasonSeg's val split under `root`: one 40x40 image per name, a square target of its own size;
    an image with no text is left out of the split's listing."""
    folder = root / "val"
    folder.mkdir(parents=True, exist_ok=True)
    for size, (name, text) in enumerate(texts.items(), start=1):
        Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(folder / f"{name}.jpg")
        side = 10 * size
        shape = {"label": "target", "points": [[0, 0], [side, 0], [side, side], [0, side]]}
        annotation = {"text": text, "is_sentence": False, "shapes": [shape]}
        (folder / f"{name}.json").write_text(json.dumps(annotation))


def test_a_rerun_on_changed_data_is_refused_and_moved_data_keeps_its_results(tmp_path):
    """Finished work is found by index: after an example joined the split's listing, a rerun reused the
    records of other examples under shifted indices (one counted twice, one never evaluated). It is
    refused whether the count changed or not, also for a run.json written before counts were recorded;
    the same data under another root keeps its results."""
    import shutil

    spec = job.SplitSpec("reasonseg", "val")
    config = data_config()
    config.reasonseg.root = str(tmp_path / "v1")
    write_reasonseg(tmp_path / "v1", {"a": ["the a"], "b": [], "c": ["the c"]})  # b: no text yet
    first = job.evaluate_split(Predict(), config, spec, tmp_path / "out", 2, progress=False)
    split_dir = tmp_path / "out" / spec.dirname
    assert json.loads((split_dir / "run.json").read_text())["num_examples"] == 2

    shutil.copytree(tmp_path / "v1", tmp_path / "moved")
    config.reasonseg.root = str(tmp_path / "moved")
    again = Predict()
    assert job.evaluate_split(again, config, spec, tmp_path / "out", 2, progress=False) == first
    assert again.calls == 0

    write_reasonseg(tmp_path / "moved", {"a": ["the a"], "b": ["the b"], "c": ["the c"]})  # b fixed
    changed = r"^reasonseg:val: the data behind the split changed since .*\(2 examples then, 3 now\); use"
    with pytest.raises(job.EvaluationError, match=changed + " a new --out"):
        job.evaluate_split(Predict(), config, spec, tmp_path / "out", 2, progress=False)

    write_reasonseg(tmp_path / "moved", {"a": ["the a"], "b": ["the b"], "c": []})  # and c broken: 2 again
    with pytest.raises(job.EvaluationError, match="example 1 was reasonseg-val-c-0, now reasonseg-val-b-0"):
        job.evaluate_split(Predict(), config, spec, tmp_path / "out", 2, progress=False)
    settings = json.loads((split_dir / "run.json").read_text())
    del settings["num_examples"]  # a folder written before run.json recorded the count
    (split_dir / "run.json").write_text(json.dumps(settings))
    write_reasonseg(tmp_path / "moved", {"a": ["the a"], "b": ["the b"], "c": ["the c"]})
    with pytest.raises(job.EvaluationError, match="example 1 was reasonseg-val-c-0, now reasonseg-val-b-0"):
        job.evaluate_split(Predict(), config, spec, tmp_path / "out", 2, progress=False)
    fresh = job.evaluate_split(Predict(), config, spec, tmp_path / "fresh", 2, progress=False)
    assert fresh["num_samples"] == 3


def test_a_run_json_written_before_counts_were_recorded_keeps_its_results(tmp_path):
    metrics = run(tmp_path, Predict(), settings={"step": 3})
    path = tmp_path / SPEC.dirname / "run.json"
    settings = json.loads(path.read_text())
    assert settings.pop("num_examples") == NUM_EXAMPLES
    path.write_text(json.dumps(settings))
    again = Predict()
    assert run(tmp_path, again, settings={"step": 3}) == metrics and again.calls == 0


def with_field(config, field: str, value):
    """`config` with the dotted `field` set to `value`."""
    *parents, name = field.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[name] = value
    return config


def test_prediction_config_digest():
    """Fields that change predictions change the digest; where the data lives does not."""
    from configs.genmask import get_config

    base = job.prediction_config_digest(get_config(), SPEC)
    assert job.prediction_config_digest(get_config(), SPEC) == base
    changes = {
        "vae_from": "/ckpt/wan_vae",
        "seed": 3,  # the random VAE's seed
        "data.fit": "crop",
        "data.reasonseg.use_templates": False,
        "data.reasonseg.eval_all_texts": True,
        "data.encoder.context_length": 16,
        "data.shapes.test_size": 7,
        "model.dit.num_layers": 3,
    }
    same = {
        "data.refcoco.data_dir": "/elsewhere/tfds",
        "data.reasonseg.root": "/elsewhere/ReasonSeg",
        "data.encoder.cache_dir": "/elsewhere/cache",
        "data.encoder.device": "cpu",  # where the VLM runs: rounding only
        "data.num_threads": 1,
        "data.captions.path": "/x.jsonl",
        "data.seg_sources": "refcoco",  # each split sets its own
    }
    for fields, changed in ((changes, True), (same, False)):
        for field, value in fields.items():
            config = with_field(get_config(), field, value)
            assert (job.prediction_config_digest(config, SPEC) != base) == changed, field


def test_moving_the_weights_keeps_the_prediction_config_digest():
    """README: paths are left out of the digest. A converted VAE moved to another machine
    (`--config.vae_from`) or the Qwen weights at another path kept the finished shards of neither
    ("differs in config"); another folder name, a random VAE or another model's weights do change it."""
    from configs.genmask import get_config

    def digest(field=None, value=None):
        config = get_config()
        config.vae_from = "/ckpt/wan_vae"
        config.data.encoder.name = "qwen2_5_vl"
        config.data.encoder.model_path = "/models/Qwen2.5-VL-7B-Instruct"
        return job.prediction_config_digest(with_field(config, field, value) if field else config, SPEC)

    base = digest()
    moved = {
        "vae_from": "gs://bucket/weights/wan_vae/",
        "data.encoder.model_path": "Qwen/Qwen2.5-VL-7B-Instruct",
        "seed": 5,  # the random VAE's seed: no random VAE here
    }
    changed = {
        "vae_from": "",  # the run's random VAE instead of the converted one
        "data.encoder.model_path": "/models/Qwen2.5-VL-3B-Instruct",
        "data.encoder.max_pixels": 224 * 224,
        "data.encoder.rewrite_reasoning": True,
        "data.fit": "crop",
    }
    for field, value in moved.items():
        assert digest(field, value) == base, field
    for field, value in changed.items():
        assert digest(field, value) != base, field
    assert digest("vae_from", "/ckpt/wan2.2_vae") != base  # another folder: other converted weights


class FakeSegmenter:
    """Stands in for `infer.segmenter.Segmenter` in `job.run`: its `predict` is `Predict` (no model)."""

    batch_multiple = 1

    def __init__(self, loaded, num_steps=1, seed=0):
        self.predict = Predict()
        self.loaded, self._encoder = loaded, None

    @property
    def encoder(self):  # as Segmenter's
        from genmask_jax.encoders import make_encoder

        if self._encoder is None:
            self._encoder = make_encoder(self.loaded.config.data.encoder)
        return self._encoder


def fake_checkpoint(directory, params_key="ema_params", step=8, **data):
    """What `job.run` reads of a loaded checkpoint (`infer.checkpoint.load`) in `directory`."""
    import types

    from configs.genmask import get_config

    config = get_config()
    config.data = data_config()
    config.data.update(data)
    return types.SimpleNamespace(
        config=config, directory=directory, step=step, params_key=params_key, resolution=(32, 32)
    )


@pytest.fixture
def fake_loaded(tmp_path, monkeypatch):
    """`loaded(params_key, step, checkpoint, **data fields)`: `fake_checkpoint` under tmp_path, with
    `FakeSegmenter` as the Segmenter."""
    from genmask_jax.infer import segmenter

    monkeypatch.setattr(segmenter, "Segmenter", FakeSegmenter)

    def loaded(params_key="ema_params", step=8, checkpoint="ckpt", **data):
        return fake_checkpoint(tmp_path / checkpoint, params_key, step, **data)

    return loaded


def test_the_splits_of_a_run_share_one_encoder(tmp_path, fake_loaded, monkeypatch):
    """Without a cache, each split's pipeline asked `make_encoder`, which keeps an encoder only while a
    consumer holds it: every split loaded the VLM again."""
    import genmask_jax.encoders as encoders

    built, build = [], encoders._build
    monkeypatch.setattr(encoders, "_build", lambda name, args: built.append(name) or build(name, args))
    splits = [SPEC, job.SplitSpec("synthetic", "val")]
    job.run(fake_loaded(), splits, tmp_path / "eval", batch_size=BATCH, progress=False)
    assert built == ["toy"]


def test_run_refuses_other_parameters_or_config(tmp_path, fake_loaded):
    """A rerun into the same --out with the raw instead of the EMA parameters, or a config that
    changes predictions, must not re-report the first run's metrics."""
    loaded = fake_loaded
    out = tmp_path / "eval"
    first = job.run(loaded(), [SPEC], out, batch_size=BATCH, progress=False)
    assert job.run(loaded(), [SPEC], out, batch_size=BATCH, progress=False) == first
    with pytest.raises(job.EvaluationError, match="differs in params"):
        job.run(loaded("params"), [SPEC], out, batch_size=BATCH, progress=False)
    with pytest.raises(job.EvaluationError, match="differs in config"):
        job.run(loaded(fit="crop"), [SPEC], out, batch_size=BATCH, progress=False)
    moved = job.run(loaded(num_threads=2), [SPEC], out, batch_size=BATCH, progress=False)
    assert moved == first


def test_one_out_holds_the_splits_of_one_evaluation(tmp_path, fake_loaded):
    """README: another evaluation into an --out is refused. Only each split's folder was guarded, so
    another checkpoint (or step, parameters, seed, shared config) evaluating another split into the
    same --out was merged into its metrics.json with nothing saying which produced which."""
    val = job.SplitSpec("synthetic", "val")
    out = tmp_path / "eval"
    small = {"shapes": {**data_config().shapes.to_dict(), "val_size": 6}}
    test = job.run(fake_loaded(**small), [SPEC], out, batch_size=BATCH, progress=False)
    for loaded, field in (
        (fake_loaded(checkpoint="other", **small), "checkpoint"),
        (fake_loaded(step=9, **small), "step"),
        (fake_loaded(params_key="params", **small), "params"),
        (fake_loaded(fit="crop", **small), "config"),
    ):
        with pytest.raises(job.EvaluationError, match=f"^{out} holds .*differs in {field}\\)"):
            job.run(loaded, [val], out, batch_size=BATCH, progress=False)
        assert not (out / val.dirname).exists()
    with pytest.raises(job.EvaluationError, match="differs in seed"):
        job.run(fake_loaded(**small), [val], out, batch_size=BATCH, seed=1, progress=False)
    # Another split of the same evaluation joins it; its source's settings are the split's own.
    job.run(fake_loaded(**small), [val], out, batch_size=BATCH, progress=False)
    merged = json.loads((out / "metrics.json").read_text())
    source = {"checkpoint": str(tmp_path / "ckpt"), "step": 8, "params": "ema_params"}
    assert merged[SPEC.name] == {**source, **test[SPEC.name]}
    assert merged[val.name]["num_samples"] == 6 and merged[val.name]["step"] == 8


def test_an_out_written_before_its_run_json_records_one_only_when_its_splits_agree(tmp_path, fake_loaded):
    """In an --out written before <out>/run.json existed (each split's run.json only), a rerun with another
    seed recorded its settings there before the split's run.json refused it; from then on the settings
    that made the split were refused by the --out's run.json, whose message said to delete the results."""
    out = tmp_path / "eval"
    first = job.run(fake_loaded(), [SPEC], out, batch_size=BATCH, progress=False)
    (out / "run.json").unlink()
    split_run = out / SPEC.dirname / "run.json"
    settings = json.loads(split_run.read_text())
    del settings["num_examples"]
    split_run.write_text(json.dumps(settings))
    val = job.SplitSpec("synthetic", "val")
    reruns = (
        (fake_loaded(), SPEC, 1, "seed"),
        (fake_loaded(step=9), val, 0, "step"),
        (fake_loaded(fit="crop"), SPEC, 0, "config"),  # found by the split's own check only
    )
    for loaded, spec, seed, field in reruns:
        refused = f"{out / SPEC.dirname} holds results of a different evaluation (differs in {field}); use"
        with pytest.raises(job.EvaluationError, match="^" + re.escape(refused)):
            job.run(loaded, [spec], out, batch_size=BATCH, seed=seed, progress=False)
        assert not (out / "run.json").exists() and not (out / val.dirname).exists()
    again = job.run(fake_loaded(), [SPEC], out, batch_size=BATCH, progress=False)
    assert again == first
    assert json.loads((out / "run.json").read_text())["seed"] == 0
    assert len(list((out / SPEC.dirname / "shards").iterdir())) == -(-NUM_EXAMPLES // BATCH)  # none redone


def test_an_id_that_could_not_be_read_is_not_taken_for_changed_data(tmp_path, monkeypatch):
    """An example whose data and id could not be read for a moment is recorded unreadable as `<index 5>`;
    a rerun compared that placeholder with the id read now and refused the whole split as changed data.
    So did a rerun during which a finished example's id could not be read (each process of a launch
    reads them: one refusing alone would leave the others waiting). A real change is still refused."""
    from genmask_jax.data.shapes import SyntheticShapes

    original = SyntheticShapes.example_id

    def failing_id(lost):
        def example_id(self, index):
            if index == lost:
                raise OSError("connection reset")
            return original(self, index)

        monkeypatch.setattr(SyntheticShapes, "example_id", example_id)

    recover = failing_example(monkeypatch, 5, OSError("connection reset"))
    failing_id(5)
    metrics = run(tmp_path, Predict())
    saved = json.loads((tmp_path / SPEC.dirname / "metrics.json").read_text())
    assert saved["unreadable"] == ["<index 5>"]
    recover()
    for lost in (None, 2):
        failing_id(lost)
        again = Predict()
        assert run(tmp_path, again) == metrics and again.calls == 0
    monkeypatch.setattr(SyntheticShapes, "example_id", lambda self, index: f"other-{index}")
    with pytest.raises(job.EvaluationError, match="example 0 was shapes-0-test-0, now other-0"):
        run(tmp_path, Predict())


def failing_example(monkeypatch, lost: int, error: Exception):
    """Reading synthetic example `lost` raises `error` until the returned function is called."""
    from genmask_jax.data.shapes import SyntheticShapes

    original = SyntheticShapes.__getitem__

    def getitem(self, index):
        if index == lost:
            raise error
        return original(self, index)

    monkeypatch.setattr(SyntheticShapes, "__getitem__", getitem)
    return lambda: monkeypatch.setattr(SyntheticShapes, "__getitem__", original)


def test_unreadable_examples_are_reported_not_retried(tmp_path, monkeypatch):
    failing_example(monkeypatch, 5, OSError("corrupt file"))
    metrics = run(tmp_path, Predict())
    assert metrics["num_samples"] == NUM_EXAMPLES - 1
    saved = json.loads((tmp_path / SPEC.dirname / "metrics.json").read_text())
    assert len(saved["unreadable"]) == 1
    again = Predict()
    assert run(tmp_path, again) == metrics and again.calls == 0


@pytest.mark.parametrize(
    "error",
    [
        MemoryError("out of host memory"),
        OSError(errno.EIO, "Input/output error"),  # a network file system's: it may pass
        RuntimeError("pread() failed: Input/output error; reading /data/ref_coco-val.array_record"),
    ],
    ids=["memory", "EIO", "riegeli EIO"],
)
def test_examples_that_fail_for_other_reasons_are_retried(tmp_path, monkeypatch, error):
    """An example lost to memory or to an I/O error that may pass (not to its data) gets no record: the
    split is reported incomplete in one line, and a rerun predicts only that example's batch. (An I/O
    error was recorded "unreadable" for good, left out of every rerun's metrics.)"""
    recover = failing_example(monkeypatch, 5, error)
    with pytest.raises(job.EvaluationError, match="9 of 10 examples have predictions"):
        run(tmp_path, Predict())
    recover()
    again = Predict()
    metrics = run(tmp_path, again)
    assert again.calls == 1 and metrics["num_samples"] == NUM_EXAMPLES
    assert metrics == run(tmp_path / "fresh", Predict())


def test_a_failure_past_the_skip_logs_id_cap_is_still_retried(tmp_path, monkeypatch):
    """The skip log keeps the ids of only its first 10,000 skips; a passing failure after those must
    not be taken for a data error (and recorded "unreadable" for good)."""
    from genmask_jax.data.skips import SkipLog

    add = SkipLog.add

    def add_past_the_cap(self, example_id, reason):
        add(self, example_id, reason)
        self.examples.clear()

    monkeypatch.setattr(SkipLog, "add", add_past_the_cap)
    failing_example(monkeypatch, 5, MemoryError("out of host memory"))
    with pytest.raises(job.EvaluationError, match="9 of 10 examples have predictions"):
        run(tmp_path, Predict())


def test_a_rerun_with_a_smaller_batch_keeps_the_shards_it_does_not_redo(tmp_path, monkeypatch):
    """Example 1 lost to memory in batches of 4 leaves shard [0, 2, 3]; the rerun in batches of 2 redoes
    [0, 1], whose shard starts at index 0 too. It must not replace [0, 2, 3] (before, shards were named
    by their first index: examples 2 and 3 were lost and a third run was needed)."""
    recover = failing_example(monkeypatch, 1, MemoryError("out of host memory"))
    with pytest.raises(job.EvaluationError, match="9 of 10 examples have predictions"):
        run(tmp_path, Predict())
    store = job.ShardStore(tmp_path / SPEC.dirname)
    first = {p.name: p.read_text() for p in store.shard_files()}
    recover()
    again = Predict()
    metrics = job.evaluate_split(again, data_config(), SPEC, tmp_path, 2, "png", progress=False)
    assert again.calls == 1 and again.rows == 2
    assert metrics["num_samples"] == NUM_EXAMPLES and metrics == run(tmp_path / "fresh", Predict())
    assert {p.name: p.read_text() for p in store.shard_files() if p.name in first} == first
    assert len(store.shard_files()) == len(first) + 1


def test_old_shard_names_are_read_and_the_newest_record_of_an_example_wins(tmp_path):
    """Shards named `shard-<first index>.json` (before names were unique) still count; an example in
    several shards takes the record of the newest write, whatever order the directory lists them in."""
    metrics = run(tmp_path, Predict())
    store = job.ShardStore(tmp_path / SPEC.dirname)
    for path in store.shard_files():
        records = json.loads(path.read_text())
        path.rename(path.parent / f"shard-{records[0]['index']:09d}.json")
    assert [r["index"] for r in store.records()] == list(range(NUM_EXAMPLES))
    again = Predict()
    assert run(tmp_path, again) == metrics and again.calls == 0

    def record(index, iou):
        return {"index": index, "id": f"x{index}", "text": "t", "intersection": 1, "union": 2, "iou": iou}

    # Name order (first, then last index) is not write order here: the newest write (stamp 3) wins over
    # an older stamped shard that sorts after it by name, and over the old names.
    for stamp, indices in ((3, [0]), (1, [0, 5])):
        records = [record(i, stamp / 10) for i in indices]
        (store.shards / job.shard_name(indices, stamp, 0)).write_text(json.dumps(records))
    names = [p.name for p in store.shard_files()]
    assert names.index(job.shard_name([0], 3, 0)) < names.index(job.shard_name([0, 5], 1, 0))
    assert store.records()[0]["iou"] == 0.3 and store.records()[5]["iou"] == 0.1
    # A read that failed since (a rerun's mixed batch, a mount gone for a moment) does not undo example 0's
    # prediction; a later prediction still replaces the one before.
    unreadable = {"index": 0, "id": "x0", "unreadable": True, "reason": "FileNotFoundError: gone"}
    (store.shards / job.shard_name([0], 4, 0)).write_text(json.dumps([unreadable]))
    assert store.records()[0]["iou"] == 0.3
    (store.shards / job.shard_name([5], 5, 0)).write_text(json.dumps([{**unreadable, "index": 5}]))
    (store.shards / job.shard_name([5], 6, 0)).write_text(json.dumps([record(5, 0.6)]))
    assert store.records()[5]["iou"] == 0.6
    assert job.shard_name([7, 4, 5], 12, 1) == "shard-000000004-000000007-0000000000000000012-1.json"


def test_an_unreadable_split_is_one_line(tmp_path, monkeypatch):
    from genmask_jax.data.shapes import SyntheticShapes

    def getitem(self, index):
        raise OSError("corrupt file")

    monkeypatch.setattr(SyntheticShapes, "__getitem__", getitem)
    with pytest.raises(job.EvaluationError, match="none of its 10 examples could be read") as error:
        run(tmp_path, Predict())
    assert "OSError" in str(error.value) and "\n" not in str(error.value)


def test_check_sources_refuses_a_cache_without_the_split(tmp_path):
    """An embedding cache precomputed for other splits: refused up front, naming the split and count
    (before, every example became an "unreadable" record, kept after the cache was fixed)."""
    from genmask_jax.encoders.precompute import precompute

    c = data_config()
    c.shapes.train_size, c.shapes.test_size, c.gen_sources = 4, 3, ""
    cache = str(tmp_path / "cache")
    precompute(c, cache, ["train"], dtype="float32")
    c.encoder.cache_dir = cache
    with pytest.raises(job.EvaluationError, match="synthetic:test: 3 of its 3 examples are not in the"):
        job.check_sources(c, [SPEC])
    precompute(c, cache, ["train", "test"], dtype="float32")
    job.check_sources(c, [SPEC])
    metrics = job.evaluate_split(Predict(), c, SPEC, tmp_path / "out", BATCH, progress=False)
    assert metrics["num_samples"] == 3


def test_a_cache_miss_while_evaluating_stops_the_split_and_records_nothing(tmp_path):
    """A context error (here a cache without the split, `check_sources` skipped) is raised by the data
    pipeline, never recorded: no example is marked unreadable, so nothing needs retrying."""
    from genmask_jax.encoders.cache import CacheMiss
    from genmask_jax.encoders.precompute import precompute

    c = data_config()
    c.shapes.train_size, c.gen_sources = 4, ""
    precompute(c, str(tmp_path / "cache"), ["train"], dtype="float32")
    c.encoder.cache_dir = str(tmp_path / "cache")
    with pytest.raises(CacheMiss, match="--eval=synthetic:test"):
        job.evaluate_split(Predict(), c, SPEC, tmp_path / "out", BATCH, progress=False)
    assert job.ShardStore(tmp_path / "out" / SPEC.dirname).shard_files() == []


def test_the_cache_miss_advice_covers_a_split_the_run_did_not_train_on(tmp_path):
    """A run trained on shapes, evaluated on reasonseg:val: the advice is `precompute --eval=reasonseg:val`,
    and that fills the cache (the old advice, `--splits=val`, cached only the configured sources' val)."""
    from genmask_jax.encoders.precompute import plan_jobs, precompute

    root = tmp_path / "ReasonSeg" / "val"
    root.mkdir(parents=True)
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(root / "a.jpg")
    polygon = [[2, 2], [20, 2], [20, 20], [2, 20]]
    shapes = [{"label": "target", "points": polygon, "shape_type": "polygon"}]
    (root / "a.json").write_text(json.dumps({"text": ["the cup"], "is_sentence": False, "shapes": shapes}))
    c = data_config()
    c.shapes.train_size, c.gen_sources, c.reasonseg.root = 4, "", str(tmp_path / "ReasonSeg")
    cache = str(tmp_path / "cache")
    precompute(c, cache, ["train"], dtype="float32")
    c.encoder.cache_dir = cache
    spec = job.SplitSpec("reasonseg", "val")
    advice = r"reasonseg:val: 1 of its 1 examples .*--eval=reasonseg:val`$"
    with pytest.raises(job.EvaluationError, match=advice):
        job.check_sources(c, [spec])
    assert [j.label for j in plan_jobs(c, ["val"])] == ["synthetic/val"]  # the old advice
    precompute(c, cache, [], dtype="float32", evals="reasonseg:val")
    job.check_sources(c, [spec])


_WORKER = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax
jax.distributed.initialize({address!r}, num_processes=2, process_id={pid})
from test_eval_job import Predict, data_config, SPEC, BATCH
from genmask_jax.eval import job
job.check_shared_out({out!r})
predict = Predict()
metrics = job.evaluate_split(predict, data_config(), SPEC, {out!r}, BATCH, "png", progress=False)
with open({out!r} + f"/result.{{jax.process_index()}}.json", "w") as f:
    json.dump({{"metrics": metrics, "rows": predict.rows}}, f)
"""

# job.run over synthetic:test and synthetic:val (10 examples each) with FakeSegmenter; on process 1 example
# `lost` (of both splits) fails with a MemoryError, on process 0 writing <out>/`broken` fails as a remote
# store's write may.
_RUN = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax
jax.distributed.initialize({address!r}, num_processes=2, process_id={pid})
import pytest
import test_eval_job as t
from genmask_jax.eval import job
from genmask_jax.infer import segmenter
segmenter.Segmenter = t.FakeSegmenter
lost, broken, write = {lost}, {broken!r}, job._write_atomic
if jax.process_index() == 1 and lost is not None:
    t.failing_example(pytest.MonkeyPatch(), lost, MemoryError("out of host memory"))
def flaky_write(path, text):
    if jax.process_index() == 0 and broken and str(path) == {out!r} + "/" + broken:
        raise OSError("503 Service Unavailable")
    write(path, text)
job._write_atomic = flaky_write
splits = [t.SPEC, job.SplitSpec("synthetic", "val")]
loaded = t.fake_checkpoint({out!r} + "-ckpt", shapes={{**t.data_config().shapes.to_dict(), "val_size": 10}})
try:
    print("results:", job.run(loaded, splits, {out!r}, batch_size=t.BATCH, progress=False))
except (job.EvaluationError, OSError) as e:
    print("refused:", e)
"""


def start_processes(script: str, tmp_path, outs, lost=None, broken="") -> list:
    """Two `jax.distributed` processes on this machine running `script` (formatted with root, tests,
    address, pid, out: `outs[pid]`, lost and broken)."""
    import os
    import subprocess
    import sys

    from train_helpers import free_port, xla_flags

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
    fields = {"root": root, "tests": os.path.join(root, "tests"), "address": address}
    fields.update(lost=lost, broken=broken)
    return [
        subprocess.Popen(
            [sys.executable, "-c", script.format(**fields, pid=pid, out=str(out))],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid, out in enumerate(outs)
    ]


@pytest.mark.multidevice
def test_two_processes_share_a_split(tmp_path):
    """Real `jax.distributed` processes: each predicts its own examples, process 0 merges after the
    barrier."""
    from train_helpers import wait_all

    wait_all(start_processes(_WORKER, tmp_path, [tmp_path, tmp_path]), timeout=300)
    results = [json.loads((tmp_path / f"result.{pid}.json").read_text()) for pid in range(2)]
    assert results[1]["metrics"] is None and results[0]["metrics"]["num_samples"] == NUM_EXAMPLES
    assert results[0]["rows"] + results[1]["rows"] == NUM_EXAMPLES and min(r["rows"] for r in results) > 0
    assert results[0]["metrics"] == run(tmp_path / "single", Predict())
    assert not list(tmp_path.glob(".shared-check-*"))  # check_shared_out leaves nothing behind


@pytest.mark.multidevice
def test_processes_that_do_not_share_out_all_stop_before_evaluating(tmp_path):
    """Each process with its own --out (a path on each host's own disk): `run` stops every process with one
    line saying so (`check_shared_out`) for any caller, not only the command (before, process 0 found the
    others' examples missing on every rerun)."""
    from train_helpers import wait_all

    outs = [tmp_path / "host0", tmp_path / "host1"]
    logs = wait_all(start_processes(_RUN, tmp_path, outs), timeout=120)
    for pid, log in enumerate(logs):
        assert "refused: --out {} is not one folder".format(tmp_path / f"host{pid}") in log, log
        assert "process 1 cannot see what process 0 writes there): under a multi-process launch" in log, log
    assert not list((tmp_path / "host0").iterdir()) and not (tmp_path / "host1").exists()


@pytest.mark.multidevice
def test_a_split_process_0_cannot_merge_stops_every_process(tmp_path):
    """Two splits, an example of process 1 lost to memory in the first: process 0 stopped at the merge
    ("rerun to complete the missing ones") while process 1 went on to the second split, and both waited
    for each other until killed. Every process now stops there with one line."""
    from train_helpers import wait_all

    logs = wait_all(start_processes(_RUN, tmp_path, [tmp_path, tmp_path], lost=5), timeout=120)
    incomplete = f"refused: synthetic:test: 9 of 10 examples have predictions in {tmp_path / SPEC.dirname}"
    assert incomplete + "/shards; rerun to complete the missing ones" in logs[0], logs[0]
    assert "refused: process 0 could not merge synthetic:test (its error says why)" in logs[1], logs[1]
    assert not (tmp_path / "synthetic-val").exists()


@pytest.mark.multidevice
@pytest.mark.parametrize("broken", ["synthetic-val/run.json", "metrics.json"])
def test_a_file_process_0_cannot_write_stops_every_process(tmp_path, broken):
    """Process 0 alone writes each split's run.json and the <out>/metrics.json summary: a write that failed
    there (a remote store's passing error) stopped process 0 while process 1 went on (to wait at the
    second split's barrier, or to report success). Every process stops."""
    from train_helpers import wait_all

    logs = wait_all(start_processes(_RUN, tmp_path, [tmp_path, tmp_path], broken=broken), timeout=120)
    path = tmp_path / broken
    assert "refused: 503 Service Unavailable" in logs[0], logs[0]
    assert f"refused: process 0 could not write {path} (its error says why)" in logs[1], logs[1]
