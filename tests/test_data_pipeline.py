"""Grain pipelines: exact task counts, exact resumption in a new process, disjoint processes, skips,
deterministic evaluation covering every example once."""

import hashlib
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from genmask_jax.data import pipeline
from genmask_jax.data.pipeline import default_data_config, make_eval_iterator, make_train_iterator


def small_config(train_size=1000, val_size=10):
    c = default_data_config()
    c.resolution = (16, 16)
    c.num_threads = 2
    c.prefetch_buffer_size = 4
    c.shapes.train_size, c.shapes.val_size = train_size, val_size
    c.encoder.context_length, c.encoder.dim = 8, 8
    return c


def digest(array):
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.mark.parametrize("batch_seg,batch_gen", [(2, 2), (3, 1), (2, 0), (0, 2)])
def test_every_batch_has_exact_task_counts(batch_seg, batch_gen):
    it = make_train_iterator(small_config(), batch_seg, batch_gen, seed=0, process_index=0, process_count=1)
    for _ in range(3):
        batch = next(it)
        assert batch["seg"]["image"].shape == (batch_seg, 16, 16, 3)
        assert batch["seg"]["mask"].shape == (batch_seg, 16, 16)
        assert batch["seg"]["context"].shape == (batch_seg, 8, 8)
        assert batch["seg"]["context_mask"].shape == (batch_seg, 8)
        assert batch["gen"]["image"].shape == (batch_gen, 16, 16, 3)
        assert batch["gen"]["context"].shape == (batch_gen, 8, 8)
        assert "mask" not in batch["gen"]
        for sub in batch.values():
            assert sub["image"].dtype == np.float32 and sub["context_mask"].dtype == np.bool_
            assert np.all(np.abs(sub["image"]) <= 1)
        if batch_seg:
            assert set(np.unique(batch["seg"]["mask"])) <= {0.0, 1.0}
            assert batch["seg"]["mask"].sum(axis=(1, 2)).min() > 0


_RESUME_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
from tests.test_data_pipeline import small_config
from genmask_jax.data.pipeline import make_train_iterator
it = make_train_iterator(small_config(), 3, 2, seed=7, process_index=0, process_count=1)
it.set_state(json.loads({state!r}))
batches = [next(it) for _ in range(3)]
flat = {{f"{{i}}/{{t}}/{{k}}": v for i, b in enumerate(batches) for t, s in b.items() for k, v in s.items()}}
np.savez({out!r}, **flat)
"""


def test_state_restores_exactly_in_a_new_process(tmp_path):
    it = make_train_iterator(small_config(), 3, 2, seed=7, process_index=0, process_count=1)
    for _ in range(4):
        next(it)
    state = json.dumps(it.get_state())
    expected = [next(it) for _ in range(3)]
    out = tmp_path / "resumed.npz"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = _RESUME_SCRIPT.format(root=root, state=state, out=str(out))
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root, timeout=300)
    resumed = np.load(out)
    for i, batch in enumerate(expected):
        for task, sub in batch.items():
            for key, value in sub.items():
                np.testing.assert_array_equal(resumed[f"{i}/{task}/{key}"], value)


def test_grain_checkpoint_handler_round_trip(tmp_path):
    import grain

    it = make_train_iterator(small_config(), 2, 1, seed=1, process_index=0, process_count=1)
    next(it)
    grain.checkpoint.CheckpointHandler().save(tmp_path, item=it)
    expected = next(it)
    fresh = make_train_iterator(small_config(), 2, 1, seed=1, process_index=0, process_count=1)
    grain.checkpoint.CheckpointHandler().restore(tmp_path, item=fresh)
    np.testing.assert_array_equal(next(fresh)["seg"]["image"], expected["seg"]["image"])


def _seg_digests(process_index, process_count, steps, batch_seg=4):
    it = make_train_iterator(
        small_config(train_size=24),
        batch_seg,
        1,
        seed=3,
        process_index=process_index,
        process_count=process_count,
    )
    return [[digest(x) for x in next(it)["seg"]["image"]] for _ in range(steps)]


@pytest.mark.multidevice
def test_processes_see_disjoint_examples_and_epochs_reshuffle():
    # 24 examples, 2 processes x 4 per step: one epoch is 3 steps.
    p0, p1 = _seg_digests(0, 2, 6), _seg_digests(1, 2, 6)
    epoch0 = [d for step in p0[:3] + p1[:3] for d in step]
    epoch1 = [d for step in p0[3:] + p1[3:] for d in step]
    assert len(set(epoch0)) == 24 and set(epoch0) == set(epoch1)
    assert not {d for s in p0[:3] for d in s} & {d for s in p1[:3] for d in s}
    assert epoch0 != epoch1  # a new permutation each epoch


def _global_batches(process_count, steps, skip=0, state_from=None):
    """Per global step, the sorted digests of its seg and gen images over all processes; with
    `state_from=(state, count)` every process resumes from a state saved by `count` processes."""
    per = {}
    for p in range(process_count):
        it = make_train_iterator(small_config(train_size=24), 4 // process_count, 4 // process_count,
                                 seed=5, process_index=p, process_count=process_count)
        if state_from is not None:
            it.set_state(pipeline.state_for_process_count(*state_from, it))
        for _ in range(skip):
            next(it)
        per[p] = [next(it) for _ in range(steps)]
    return [
        {task: sorted(digest(x) for p in per for x in per[p][s][task]["image"]) for task in ("seg", "gen")}
        for s in range(steps)
    ], it.get_state()


@pytest.mark.parametrize("saved,resumed", [(2, 1), (1, 4), (4, 2)])
def test_resume_with_another_process_count_keeps_global_batches(saved, resumed):
    # Global batch 4 seg + 4 gen; 24 examples per task, so step 7 is in the third epoch.
    reference, _ = _global_batches(1, 10)
    before, state = _global_batches(saved, 7)
    assert before == reference[:7]
    after, _ = _global_batches(resumed, 3, state_from=(state, saved))
    assert after == reference[7:]
    with pytest.raises(ValueError, match="step boundary"):
        pipeline.state_for_process_count({"next_index": 3}, 1, make_train_iterator(
            small_config(), 2, 2, seed=0, process_index=0, process_count=1))


class _FlakySource:
    """Examples 1 (unreadable) and 2 (empty mask) are bad."""

    def __init__(self, task):
        self.task = task

    def __len__(self):
        return 6

    def example_id(self, i):
        return f"flaky-{self.task}-{i}"

    def __getitem__(self, i):
        if i == 1:
            raise OSError("cannot identify image file")
        mask = np.zeros((10, 12), np.uint8)
        if i != 2:
            mask[2:5, 3:7] = 1
        return {
            "id": self.example_id(i),
            "image": np.full((10, 12, 3), 20 * i, np.uint8),
            "mask": mask,
            "text": f"thing {i}",
        }


def test_bad_examples_are_logged_counted_and_replaced(monkeypatch, caplog):
    monkeypatch.setattr(pipeline, "make_task_source", lambda names, split, cfg, task: _FlakySource(task))
    c = small_config()
    c.shuffle = False
    it = make_train_iterator(c, 6, 0, seed=0, process_index=0, process_count=1)
    with caplog.at_level(logging.INFO):
        first = next(it)
        next(it)
    assert first["seg"]["image"].shape[0] == 6
    # 1 and 2 are replaced by 3 (the next readable example), deterministically.
    np.testing.assert_array_equal(first["seg"]["image"][1], first["seg"]["image"][3])
    np.testing.assert_array_equal(first["seg"]["image"][2], first["seg"]["image"][3])
    skips = pipeline.iterator_skips(it)["seg"]
    assert skips.counts["OSError"] >= 2 and skips.counts["empty_mask"] >= 2
    assert "flaky-seg-1" in caplog.text and "flaky-seg-2" in caplog.text
    assert "end of seg epoch 0" in caplog.text


class _FirstUnreadable(_FlakySource):
    """Three examples, the first unreadable; records what is read."""

    def __init__(self, task):
        super().__init__(task)
        self.reads = []

    def __len__(self):
        return 3

    def __getitem__(self, i):
        self.reads.append(i)
        return super().__getitem__(1 if i == 0 else 3)  # 1: unreadable


def test_eval_padding_reads_nothing(monkeypatch):
    """Padding rows read example 0: each one counted (and logged) its failure again, and without a cache
    ran the encoder on it again."""
    source = _FirstUnreadable("seg")
    monkeypatch.setattr(pipeline, "make_task_source", lambda names, split, cfg, task: source)
    ev = make_eval_iterator(small_config(), "val", 8, process_index=0, process_count=1)
    (batch, metas), = list(ev.iter_with_meta())
    assert batch["valid"].tolist() == [False, True, True] + [False] * 5
    assert batch["index"].tolist() == [0, 1, 2] + [-1] * 5
    assert sorted(source.reads) == [0, 1, 2] and dict(ev.skips.counts) == {"OSError": 1}
    assert list(ev.failures) == [0] and metas[3:] == [None] * 5
    assert not batch["image"][3:].any() and batch["ignore"][3:].all()


class _BadLastSource:
    """`n` examples of grey level `level + i`; the last one is unreadable."""

    def __init__(self, level, n=3):
        self.level, self.n = level, n

    def __len__(self):
        return self.n

    def example_id(self, i):
        return f"level{self.level}-{i}"

    def __getitem__(self, i):
        if i == self.n - 1:
            raise OSError("cannot identify image file")
        mask = np.zeros((8, 8), np.uint8)
        mask[2:6, 2:6] = 1
        image = np.full((8, 8, 3), self.level + i, np.uint8)
        return {"id": self.example_id(i), "image": image, "mask": mask, "text": f"thing {i}"}


def test_a_bad_example_is_replaced_within_its_own_source(monkeypatch):
    """Sources a, then the RefCOCO-like union of b and c: the bad last example of a (of b) is replaced
    by a's (b's) first, not by the next source's, which would change the sources' shares."""
    from genmask_jax.data.sources import ConcatSource

    a, b, c = _BadLastSource(0), _BadLastSource(100), _BadLastSource(200)
    joined = ConcatSource([a, ConcatSource([b, c])])
    monkeypatch.setattr(pipeline, "make_task_source", lambda *args: joined)
    config = small_config()
    config.shuffle = False
    it = make_train_iterator(config, 9, 0, seed=0, process_index=0, process_count=1)
    levels = next(it)["seg"]["image"][:, 0, 0, 0]
    # pixels map [0, 255] to [-1, 1]: compare with the first examples' own
    first = {name: levels[3 * k] for k, name in enumerate("abc")}
    np.testing.assert_array_equal(levels[[2, 5, 8]], [first["a"], first["b"], first["c"]])
    assert len(set(first.values())) == 3


@pytest.mark.parametrize("max_skips", [0, -1])
def test_max_consecutive_skips_below_one_is_refused(max_skips):
    from genmask_jax.data.sources import DataConfigError

    c = small_config()
    c.max_consecutive_skips = max_skips
    with pytest.raises(DataConfigError, match=r"data.max_consecutive_skips must be >= 1"):
        make_train_iterator(c, 2, 0, seed=0, process_index=0, process_count=1)


def test_max_consecutive_skips_of_one_stops_at_the_first_bad_example(monkeypatch):
    monkeypatch.setattr(pipeline, "make_task_source", lambda *args: _BadLastSource(0))
    c = small_config()
    c.shuffle, c.max_consecutive_skips = False, 1
    it = make_train_iterator(c, 3, 0, seed=0, process_index=0, process_count=1)
    with pytest.raises(RuntimeError, match="1 consecutive unreadable examples from index 2"):
        next(it)


class _VanishingTargetSource:
    """480x640 images at 16x16; the target of example 0 is a band at the left edge, which a centre crop
    to a square cuts away, of example 1 a 4-pixel-wide pole (0.1 output pixels when padded: NEAREST
    keeps none), of examples 2 and 3 a large block."""

    TARGETS = (np.s_[100:400, 0:60], np.s_[50:470, 301:305], np.s_[100:400, 200:500], np.s_[100:400, 200:500])

    def __len__(self):
        return 4

    def example_id(self, i):
        return f"vanishing-{i}"

    def __getitem__(self, i):
        mask = np.zeros((480, 640), np.uint8)
        mask[self.TARGETS[i]] = 1
        image = np.full((480, 640, 3), 30 * i, np.uint8)
        return {"id": self.example_id(i), "image": image, "mask": mask, "text": f"thing {i}"}


@pytest.mark.parametrize("fit, vanishing", [("crop", 0), ("pad", 1)])
def test_a_target_that_vanishes_when_fitted_is_skipped_in_training_not_in_evaluation(
    monkeypatch, fit, vanishing
):
    monkeypatch.setattr(pipeline, "make_task_source", lambda *args: _VanishingTargetSource())
    c = small_config()
    c.shuffle, c.fit = False, fit
    it = make_train_iterator(c, 4, 0, seed=0, process_index=0, process_count=1)
    seg = next(it)["seg"]
    assert seg["mask"].sum(axis=(1, 2)).min() > 0
    np.testing.assert_array_equal(seg["image"][vanishing], seg["image"][2])  # the next usable example
    assert pipeline.iterator_skips(it)["seg"].counts["empty_after_fit"] >= 1
    # Evaluation scores every example against its original-size target: nothing is skipped.
    batch, metas = next(make_eval_iterator(c, "val", 4, process_index=0, process_count=1).iter_with_meta())
    assert batch["valid"].all() and batch["mask"][vanishing].sum() == 0 and metas[vanishing]["mask"].any()


@pytest.mark.multidevice
def test_eval_covers_every_example_once_across_processes():
    c = small_config(val_size=11)
    seen, lengths = [], set()
    for p in range(3):
        ev = make_eval_iterator(c, "val", 2, process_index=p, process_count=3)
        lengths.add(len(ev))
        for batch, metas in ev.iter_with_meta():
            assert batch["image"].shape == (2, 16, 16, 3) and batch["ignore"].dtype == np.bool_
            assert batch["valid"].dtype == np.bool_ and batch["index"].dtype == np.int64
            for row in range(2):
                if batch["valid"][row]:
                    seen.append(int(batch["index"][row]))
                    assert metas[row]["id"] == f"shapes-0-val-{batch['index'][row]}"
                    assert metas[row]["mask"].shape == (16, 16)
                else:
                    assert batch["index"][row] == -1 and metas[row] is None
    assert lengths == {2}  # ceil(11 / (2 * 3)) batches on every process
    assert sorted(seen) == list(range(11))
    again = [b["index"].tolist() for b in make_eval_iterator(c, "val", 2, process_index=1, process_count=3)]
    assert again == [[2, 3], [8, 9]]


def test_split_global_batch():
    assert pipeline.split_global_batch(512, 512, 4) == (128, 128)
    assert pipeline.split_global_batch(8, 0, 2) == (4, 0)
    with pytest.raises(ValueError, match="divisible"):
        pipeline.split_global_batch(6, 6, 4)


def test_several_sources_are_concatenated():
    from genmask_jax.data.sources import ConcatSource, make_task_source

    c = small_config(val_size=4)
    c.shapes.test_size = 3
    joined = ConcatSource(
        [make_task_source("shapes", "val", c, "seg"), make_task_source("shapes", "test", c, "seg")]
    )
    assert len(joined) == 7
    assert joined.example_id(3) == "shapes-0-val-3" and joined[4]["id"] == "shapes-0-test-0"
    with pytest.raises(IndexError):
        joined[7]


def _two_sources(monkeypatch):
    """Seg sources "a" (4 scenes) and "b" (20 other scenes), as `data.seg_sources="a,b"` names them."""
    from genmask_jax.data.sources import ConcatSource, make_source

    def make(names, split, data_config, task):
        parts = []
        for name in names:
            c = small_config(train_size={"a": 4, "b": 20}[name])
            c.shapes.seed = {"a": 0, "b": 1}[name]
            parts.append(make_source("shapes", split, c, task))
        return parts[0] if len(parts) == 1 else ConcatSource(parts)

    monkeypatch.setattr(pipeline, "make_task_source", make)


def _epoch_digests(seg_sources, seg_repeats, steps):
    c = small_config()
    c.seg_sources, c.seg_repeats = seg_sources, seg_repeats
    it = make_train_iterator(c, 4, 0, seed=2, process_index=0, process_count=1)
    return [digest(x) for _ in range(steps) for x in next(it)["seg"]["image"]]


def test_seg_repeats_give_a_small_source_its_share_of_every_epoch(monkeypatch, caplog):
    """ReasonSeg (about 1,000 texts) beside the RefCOCO union (about 360,000) was 0.3% of the segmentation
    examples, with no way to weight it. `data.seg_repeats="a:3"` reads source a 3 times per epoch."""
    _two_sources(monkeypatch)
    a = set(_epoch_digests("a", "", 1))
    plain = _epoch_digests("a,b", "", 6)  # one epoch of 24
    assert len(set(plain)) == 24 and sum(d in a for d in plain) == 4
    with caplog.at_level(logging.INFO, logger="genmask_jax.data.pipeline"):
        repeated = _epoch_digests("a,b", "a:3", 16)  # two epochs of 4 * 3 + 20 = 32
    assert "source shares per epoch with data.seg_repeats: a 37.5%, b 62.5%" in caplog.text
    for epoch in (repeated[:32], repeated[32:]):
        counts = {d: epoch.count(d) for d in set(epoch)}
        assert {d: n for d, n in counts.items() if d in a} == dict.fromkeys(a, 3)
        assert set(counts) - a == set(plain) - a and all(counts[d] == 1 for d in set(counts) - a)
    assert repeated[:32] != repeated[32:]  # reshuffled


@pytest.mark.parametrize("repeats", ["c:2", "a:0", "a:1.5", "a", "a:2,a:3", "a:-1"])
def test_seg_repeats_that_name_no_source_or_no_count_are_refused(monkeypatch, repeats):
    _two_sources(monkeypatch)
    with pytest.raises(ValueError, match=r"data.seg_repeats=.*expected 'name:k,...'.*\(a, b\)"):
        _epoch_digests("a,b", repeats, 1)
