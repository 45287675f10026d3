"""The batch evaluation job without a model: split names, shards, resumption, PNG / RLE writing and
the mapping of predictions back to each image's original size (a fake `predict` stands in for the
model, so nothing is compiled)."""

import json

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
    """The ground truth at the model resolution (or nothing), counting the examples it sees."""

    def __init__(self, empty: bool = False):
        self.empty, self.calls, self.rows = empty, 0, 0

    def __call__(self, batch):
        self.calls += 1
        self.rows += int(np.sum(batch["valid"]))
        masks = np.asarray(batch["mask"]) > 0.5
        return np.zeros_like(masks) if self.empty else masks


def run(out, predict, fmt="png", settings=None, **kwargs):
    return job.evaluate_split(
        predict, data_config(), SPEC, out, BATCH, fmt, settings, progress=False, **kwargs
    )


def test_parse_splits():
    specs = job.parse_splits("refcoco_unc:testA, reasonseg:val,synthetic:test")
    assert [s.name for s in specs] == ["refcoco_unc:testA", "reasonseg:val", "synthetic:test"]
    assert job.parse_splits(["refcocog_umd:test"])[0].dirname == "refcocog_umd-test"
    for bad in ("refcoco:val", "refcoco_unc:test", "refcocog_umd:testA", "synthetic", ""):
        with pytest.raises(job.EvaluationError):
            job.parse_splits(bad)


def test_split_data_config_selects_the_source():
    c = job.split_data_config(data_config(), job.SplitSpec("refcocoplus_unc", "testB"))
    assert c.seg_sources == "refcoco" and c.refcoco.name == "refcocoplus_unc"
    assert job.split_data_config(data_config(), SPEC).seg_sources == "shapes"


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
    with pytest.raises(RuntimeError, match="examples have predictions"):
        run(tmp_path, Predict(), process_index=0, process_count=2)


def test_refuses_to_mix_runs(tmp_path):
    run(tmp_path, Predict(), settings={"step": 3})
    with pytest.raises(job.EvaluationError, match="different evaluation"):
        run(tmp_path, Predict(), settings={"step": 4})


def test_unreadable_examples_are_reported_not_retried(tmp_path, monkeypatch):
    from genmask_jax.data.shapes import SyntheticShapes

    original = SyntheticShapes.__getitem__

    def getitem(self, index):
        if index == 5:
            raise OSError("corrupt file")
        return original(self, index)

    monkeypatch.setattr(SyntheticShapes, "__getitem__", getitem)
    metrics = run(tmp_path, Predict())
    assert metrics["num_samples"] == NUM_EXAMPLES - 1
    saved = json.loads((tmp_path / SPEC.dirname / "metrics.json").read_text())
    assert len(saved["unreadable"]) == 1
    again = Predict()
    assert run(tmp_path, again) == metrics and again.calls == 0


_WORKER = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax
jax.distributed.initialize({address!r}, num_processes=2, process_id={pid})
from test_eval_job import Predict, data_config, SPEC, BATCH
from genmask_jax.eval import job
predict = Predict()
metrics = job.evaluate_split(predict, data_config(), SPEC, {out!r}, BATCH, "png", progress=False)
with open({out!r} + f"/result.{{jax.process_index()}}.json", "w") as f:
    json.dump({{"metrics": metrics, "rows": predict.rows}}, f)
"""


@pytest.mark.multidevice
def test_two_processes_share_a_split(tmp_path):
    """Real `jax.distributed` processes: each predicts its own examples, process 0 merges after the
    barrier."""
    import os
    import socket
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WORKER.format(
                    root=root, tests=os.path.join(root, "tests"), address=address, pid=pid, out=str(tmp_path)
                ),
            ],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    logs = []
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads((tmp_path / f"result.{pid}.json").read_text()) for pid in range(2)]
    assert results[1]["metrics"] is None and results[0]["metrics"]["num_samples"] == NUM_EXAMPLES
    assert results[0]["rows"] + results[1]["rows"] == NUM_EXAMPLES and min(r["rows"] for r in results) > 0
    assert results[0]["metrics"] == run(tmp_path / "single", Predict())
