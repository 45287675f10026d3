"""The embedding cache with the `toy` encoder: cached contexts equal direct encoding, resume, the
pipelines read the cache instead of running the encoder, and every way a cache can serve the wrong
context (a repeated id, other encoder settings, changed data, a missing split, two writers) stops with a
clear error instead."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from genmask_jax.data.pipeline import (
    default_data_config,
    iterator_skips,
    make_eval_iterator,
    make_train_iterator,
)
from genmask_jax.data.skips import BadExample
from genmask_jax.data.sources import make_task_source
from genmask_jax.encoders import fingerprint, make_encoder, model_digest
from genmask_jax.encoders.base import ContextError, EncoderUnavailable
from genmask_jax.encoders.cache import (
    CacheLocked,
    CacheMismatch,
    CacheMiss,
    CacheUnreadable,
    CacheWriter,
    EmbeddingCache,
    SkippedExample,
    completed_shards,
    missing_from_sample,
)
from genmask_jax.encoders.precompute import PrecomputeError, plan_jobs, precompute
from genmask_jax.encoders.toy import ToyEncoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config():
    c = default_data_config()
    c.resolution, c.num_threads = (16, 16), 1
    c.shapes.train_size, c.shapes.val_size = 12, 5
    c.encoder.context_length, c.encoder.dim = 12, 8
    return c


@pytest.fixture
def cache_dir(tmp_path):
    out = str(tmp_path / "cache")
    result = precompute(small_config(), out, ["train", "val"], batch_size=4, shard_size=7, dtype="float32")
    assert result["written"] == 12 + 5 + 12  # seg train + seg val + gen train
    return out


def test_cached_contexts_equal_direct_encoding(cache_dir):
    c = small_config()
    cache, encoder = EmbeddingCache(cache_dir, fingerprint(c.encoder)), make_encoder(c.encoder)
    assert len(cache) == 29 and len(completed_shards(cache_dir)) == 5  # 7 + 5 | 7 + 5 | 5 per job
    for task, split in (("seg", "train"), ("seg", "val"), ("gen", "train")):
        source = make_task_source("shapes", split, c, task)
        for i in range(len(source)):
            raw = source[i]
            want_context, want_mask = encoder.encode(None, [raw["text"]])
            context, mask = cache.lookup(raw["id"], raw["text"])
            np.testing.assert_array_equal(context, want_context[0])
            np.testing.assert_array_equal(mask, want_mask[0])
            assert cache.record(raw["id"])[0]["text"] == raw["text"]


def test_resume_skips_done_and_rewrites_incomplete_shards(cache_dir):
    ids_files = sorted(f for f in os.listdir(cache_dir) if f.endswith(".ids.json"))
    os.remove(os.path.join(cache_dir, ids_files[-1]))  # the last shard now looks interrupted
    result = precompute(
        small_config(), cache_dir, ["train", "val"], batch_size=4, shard_size=7, dtype="float32"
    )
    assert result["written"] == 5 and result["already"] == 24
    assert len(EmbeddingCache(cache_dir)) == 29
    with pytest.raises(CacheMismatch, match="dtype: cache 'float32', config 'bfloat16'"):
        precompute(small_config(), cache_dir, ["train"], dtype="bfloat16")


def test_pipelines_read_the_cache(cache_dir):
    direct, cached = small_config(), small_config()
    cached.encoder.cache_dir = cache_dir
    a = next(make_train_iterator(direct, 2, 2, seed=0, process_index=0, process_count=1))
    b = next(make_train_iterator(cached, 2, 2, seed=0, process_index=0, process_count=1))
    for task in ("seg", "gen"):
        for key in a[task]:
            np.testing.assert_array_equal(a[task][key], b[task][key])
    eval_batch = next(iter(make_eval_iterator(cached, "val", 5, process_index=0, process_count=1)))
    assert eval_batch["valid"].all() and eval_batch["context"].shape == (5, 12, 8)


def test_bfloat16_cache(tmp_path):
    c = small_config()
    c.gen_sources, c.shapes.val_size = "", 3
    precompute(c, str(tmp_path), ["val"], batch_size=2)
    cache = EmbeddingCache(str(tmp_path), fingerprint(c.encoder))
    assert len(cache) == 3 and cache.meta["dtype"] == "bfloat16"
    raw = make_task_source("shapes", "val", c, "seg")[0]
    want, _ = make_encoder(c.encoder).encode(None, [raw["text"]])
    # bfloat16 keeps 8 bits of mantissa: relative error <= 2^-8 per element
    np.testing.assert_allclose(cache.lookup(raw["id"])[0], want[0], rtol=2**-8, atol=1e-6)


def test_context_shape_without_building_the_encoder(cache_dir):
    from genmask_jax.data.pipeline import context_shape

    c = small_config()
    assert context_shape(c) == (12, 8)
    c.encoder.cache_dir = cache_dir
    assert context_shape(c) == (12, 8)


# A repeated id used to shift every later lookup onto the next record (offsets counted unique ids).


def _states(value, dim=2):
    return np.full((1, dim), value, np.float32)


def test_the_writer_refuses_a_repeated_id(tmp_path):
    with CacheWriter(str(tmp_path), dim=2, context_length=4, dtype="float32", shard_size=2) as writer:
        writer.add("a", _states(0))
        with pytest.raises(ValueError, match="'a' is already in cache"):
            writer.add("a", _states(1))
        for i, example_id in enumerate("bcd"):
            writer.add(example_id, _states(i + 1))
    cache = EmbeddingCache(str(tmp_path))
    for i, example_id in enumerate("abcd"):
        header, states = cache.record(example_id)
        assert header["id"] == example_id and states[0, 0] == i


def test_the_reader_counts_records_and_checks_each_header(tmp_path):
    with CacheWriter(str(tmp_path), dim=2, context_length=4, dtype="float32", shard_size=2) as writer:
        for i, example_id in enumerate("abcde"):
            writer.add(example_id, _states(i))
    first = os.path.join(str(tmp_path), "shard-00000.ids.json")
    json.dump(["a", "a"], open(first, "w"))  # what the old writer produced for a repeated id
    with pytest.raises(CacheMismatch, match="holds 'a' twice"):
        EmbeddingCache(str(tmp_path))
    json.dump(["b", "a"], open(first, "w"))  # an index that no longer matches its shard
    cache = EmbeddingCache(str(tmp_path))
    with pytest.raises(CacheMismatch, match="indexed as 'b' holds 'a'"):
        cache.lookup("b")
    header, states = cache.record("c")  # later shards are still read at their own positions
    assert header["id"] == "c" and states[0, 0] == 2


def test_the_writer_refuses_non_finite_states(tmp_path):
    """A float16 encoder overflows in Qwen2.5; its NaNs were cached and served like any context."""
    big = _states(1e5)  # finite in float32 and bfloat16, inf in float16
    with CacheWriter(str(tmp_path / "f32"), dim=2, context_length=4, dtype="float32") as writer:
        with pytest.raises(ContextError, match="'nan' is not finite in float32.*bfloat16 or float32"):
            writer.add("nan", np.array([[0.0, np.nan]], np.float32))
        writer.add("big", big)
    assert EmbeddingCache(str(tmp_path / "f32")).missing(["nan", "big"]) == ["nan"]
    with CacheWriter(str(tmp_path / "f16"), dim=2, context_length=4, dtype="float16") as writer:
        with pytest.raises(ContextError, match="'big' is not finite in float16"):
            writer.add("big", big)
    assert len(EmbeddingCache(str(tmp_path / "f16"))) == 0


def test_an_interrupt_between_a_write_and_its_id_leaves_a_readable_resumable_cache(tmp_path, monkeypatch):
    """The shard open at the interrupt held one record more than its ids: it was published, every reader
    refused the whole cache and a resume (which trusts the ids) did not notice."""
    from array_record.python import array_record_module

    real, writes = array_record_module.ArrayRecordWriter, iter(range(100))

    class InterruptedAfterTheSixthWrite:
        def __init__(self, *args):
            self.inner = real(*args)

        def write(self, record):
            self.inner.write(record)
            if next(writes) == 5:
                raise KeyboardInterrupt

        def close(self):
            self.inner.close()

    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", InterruptedAfterTheSixthWrite)
    folder = str(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with CacheWriter(folder, dim=2, context_length=4, dtype="float32", shard_size=4) as writer:
            for i in range(8):
                writer.add(f"id{i}", _states(i))
    monkeypatch.undo()
    assert sorted(EmbeddingCache(folder).index) == ["id0", "id1", "id2", "id3"]  # the first shard only
    with CacheWriter(folder, dim=2, context_length=4, dtype="float32", shard_size=4) as writer:
        assert writer.done == {"id0", "id1", "id2", "id3"}
        for i in range(4, 8):
            writer.add(f"id{i}", _states(i))
    cache = EmbeddingCache(folder)
    assert len(cache) == 8
    for i in range(8):
        assert cache.record(f"id{i}")[1][0, 0] == i


def test_a_resume_after_a_shard_was_deleted_from_the_middle_keeps_the_later_shards(tmp_path):
    """The next shard was numbered by the count of complete shards: with shard 1 of 3 deleted (to have
    it recomputed), the resume wrote its records over shard 2, and the ids shard 2 held were lost."""
    folder = str(tmp_path)
    with CacheWriter(folder, dim=2, context_length=4, dtype="float32", shard_size=2) as writer:
        for i in range(6):
            writer.add(f"id{i}", _states(i))
    os.remove(os.path.join(folder, "shard-00001.array_record"))
    os.remove(os.path.join(folder, "shard-00001.ids.json"))
    with CacheWriter(folder, dim=2, context_length=4, dtype="float32", shard_size=2) as writer:
        assert writer.done == {"id0", "id1", "id4", "id5"}
        for i in (2, 3):
            writer.add(f"id{i}", _states(i))
    cache = EmbeddingCache(folder)
    assert sorted(cache.index) == [f"id{i}" for i in range(6)]
    for i in range(6):
        assert cache.record(f"id{i}")[1][0, 0] == i


class _RepeatingSource:
    """Example 2 repeats example 1's id (a source bug: both would be stored under one key)."""

    def __len__(self):
        return 4

    def example_id(self, i):
        return f"rep-{min(i, 1) if i < 3 else i}"

    def __getitem__(self, i):
        image = np.zeros((8, 8, 3), np.uint8)
        return {"id": self.example_id(i), "image": image, "mask": image[..., 0], "text": f"thing {i}"}


def test_precompute_refuses_a_source_whose_ids_repeat_within_a_batch(tmp_path, monkeypatch):
    from genmask_jax.encoders import precompute as module

    monkeypatch.setattr(module, "make_task_source", lambda *args: _RepeatingSource())
    c = small_config()
    c.gen_sources = ""
    with pytest.raises(PrecomputeError, match="'rep-1' occurs twice"):
        precompute(c, str(tmp_path), ["train"], batch_size=4)


class _FailingToyEncoder(ToyEncoder):
    """The toy encoder, failing on some texts as Qwen's image processor fails on some images (a
    ValueError for an aspect ratio over 200): a bad example, not a setting to fix."""

    def __init__(self, config, bad_texts, error=ValueError):
        super().__init__(config.context_length, config.dim, config.seed)
        self.bad_texts, self.error = set(bad_texts), error

    def encode(self, images, texts):
        for text in texts:
            if text in self.bad_texts:
                raise self.error(f"cannot encode {text!r}")
        return super().encode(images, texts)


def test_an_example_the_encoder_fails_on_is_skipped_by_precompute_and_by_the_pipelines(tmp_path, monkeypatch):
    """One example the encoder raised on stopped the whole precompute with a traceback (and a resume at
    the same example), where the pipelines running the encoder skip it. Precompute now skips it too and
    records it, so the pipelines reading the cache skip it as they do running the encoder (a cache miss
    would stop them)."""
    import genmask_jax.encoders

    c = small_config()
    train, val = make_task_source("shapes", "train", c, "seg"), make_task_source("shapes", "val", c, "seg")
    bad_texts = {train[3]["text"], val[1]["text"]}
    bad_ids = {s[i]["id"] for s in (train, val) for i in range(len(s)) if s[i]["text"] in bad_texts}
    encoder = _FailingToyEncoder(c.encoder, bad_texts)
    out = str(tmp_path / "cache")
    result = precompute(
        c, out, ["train", "val"], batch_size=4, shard_size=7, dtype="float32", encoder=encoder
    )
    assert result["written"] == 29 - len(bad_ids)
    assert result["skips"] == f"precompute: {len(bad_ids)} examples skipped (ValueError: {len(bad_ids)})"
    cache = EmbeddingCache(out, fingerprint(c.encoder))
    assert cache.missing(sorted(bad_ids)) == []  # recorded, not a gap of the cache
    for example_id in bad_ids:
        with pytest.raises(SkippedExample, match="cannot encode") as skipped:
            cache.lookup(example_id)
        assert isinstance(skipped.value, BadExample) and not isinstance(skipped.value, ContextError)
    again = precompute(c, out, ["train", "val"], batch_size=4, shard_size=7, dtype="float32", encoder=encoder)
    assert (again["written"], again["already"]) == (0, 29)  # a resume goes past them

    def read(config):  # a training batch of every training example, its skips, an evaluation batch
        it = make_train_iterator(config, 12, 0, seed=0, process_index=0, process_count=1)
        batch = next(it)["seg"]
        evaluated = next(iter(make_eval_iterator(config, "val", 5, process_index=0, process_count=1)))
        return batch, dict(iterator_skips(it)["seg"].counts), evaluated

    monkeypatch.setattr(genmask_jax.encoders, "make_encoder", lambda config: encoder)
    live, live_skips, live_eval = read(c)  # the pipelines run the failing encoder
    cached = small_config()
    cached.encoder.cache_dir = out
    batch, skips, evaluated = read(cached)
    # the counts depend on how far grain's threads read ahead; the kinds do not
    assert set(skips) == set(live_skips) == {"ValueError"}
    for key in live:
        np.testing.assert_array_equal(batch[key], live[key])
    valid = [val[i]["text"] not in bad_texts for i in range(5)]
    assert not all(valid)
    np.testing.assert_array_equal(live_eval["valid"], valid)
    np.testing.assert_array_equal(evaluated["valid"], valid)
    np.testing.assert_array_equal(evaluated["context"], live_eval["context"])


def test_an_encoder_failure_that_is_not_a_refusal_stops_the_precompute_and_records_nothing(tmp_path):
    """Out of memory (or a CUDA error) on one example does not blame the example: the precompute stops
    without a skip record for it, and a rerun encodes it."""
    c = small_config()
    train = make_task_source("shapes", "train", c, "seg")
    bad_id, bad_text = train[3]["id"], train[3]["text"]
    out = str(tmp_path / "cache")
    failing = _FailingToyEncoder(c.encoder, {bad_text}, error=MemoryError)
    with pytest.raises(MemoryError):
        precompute(c, out, ["train"], batch_size=4, shard_size=7, dtype="float32", encoder=failing)
    again = precompute(c, out, ["train"], batch_size=4, shard_size=7, dtype="float32")
    everything = precompute(c, str(tmp_path / "fresh"), ["train"], batch_size=4, dtype="float32")["written"]
    assert (again["written"], again["skips"]) == (everything, "precompute: no examples skipped")
    context, mask = EmbeddingCache(out, fingerprint(c.encoder)).lookup(bad_id, bad_text)
    toy = ToyEncoder(c.encoder.context_length, c.encoder.dim, c.encoder.seed)
    expected, expected_mask = toy.encode(None, [bad_text])
    np.testing.assert_array_equal(mask, expected_mask[0])
    np.testing.assert_array_equal(context, expected[0])


def test_an_encoder_that_refuses_every_example_of_a_batch_alone_stops_the_precompute(tmp_path):
    """A refusal of every example (a setting or a broken encoder, not the data) is not recorded as
    skips, which a rerun would never retry."""
    c = small_config()
    train = make_task_source("shapes", "train", c, "seg")
    failing = _FailingToyEncoder(c.encoder, {train[i]["text"] for i in range(len(train))})
    out = str(tmp_path / "cache")
    with pytest.raises(PrecomputeError, match="refused each of the 4 examples of a batch alone"):
        precompute(c, out, ["train"], batch_size=4, shard_size=7, dtype="float32", encoder=failing)
    again = precompute(c, out, ["train"], batch_size=4, shard_size=7, dtype="float32")
    assert again["written"] == 2 * len(train)  # nothing of the refused run was recorded: seg + gen now


def test_coco_style_captions_each_get_their_own_context(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(tmp_path / f"im{i}.jpg")
    lines = [
        ("im0.jpg", "a red circle"),
        ("im0.jpg", "a blue star"),
        ("im1.jpg", "a green square"),
        ("im2.jpg", "a yellow triangle"),
    ]
    jsonl = "".join(json.dumps({"image": image, "caption": text}) + "\n" for image, text in lines)
    (tmp_path / "caps.jsonl").write_text(jsonl)
    c = small_config()
    c.seg_sources, c.gen_sources, c.captions.path = "", "captions", str(tmp_path / "caps.jsonl")
    precompute(c, str(tmp_path / "cache"), ["train"], batch_size=4, shard_size=2, dtype="float32")
    cache = EmbeddingCache(str(tmp_path / "cache"), fingerprint(c.encoder))
    source, encoder = make_task_source("captions", "train", c, "gen"), make_encoder(c.encoder)
    assert len(cache) == 4
    for i, (_, caption) in enumerate(lines):
        raw = source[i]
        assert raw["text"] == caption
        want, _ = encoder.encode(None, [caption])
        np.testing.assert_array_equal(cache.lookup(raw["id"], caption)[0], want[0])


# Settings and data that changed since the precompute.


def test_a_cache_of_other_encoder_settings_is_refused(cache_dir):
    c = small_config()
    c.encoder.seed = 1
    with pytest.raises(CacheMismatch, match="seed: cache 0, config 1"):
        EmbeddingCache(cache_dir, fingerprint(c.encoder))
    c.encoder.cache_dir = cache_dir
    with pytest.raises(CacheMismatch, match="seed: cache 0, config 1"):
        make_train_iterator(c, 2, 2, seed=0, process_index=0, process_count=1)
    with pytest.raises(CacheMismatch, match="seed: cache 0, config 1"):
        precompute(c, cache_dir, ["train"], dtype="float32")


QWEN_FINGERPRINT = {  # a qwen2_5_vl fingerprint as written before `prompt_version`: it has a `dtype` too
    "encoder": "qwen2_5_vl",
    "model": "Qwen2.5-VL-7B-Instruct",
    "context_length": 4,
    "dtype": "bfloat16",
    "max_pixels": 448 * 448,
    "rewrite_reasoning": False,
    "rewrite_prompt": None,
    "rewrite_max_new_tokens": None,
}


def test_resuming_with_another_storage_dtype_is_refused_with_a_qwen_fingerprint(tmp_path):
    """The stored contexts' dtype and the encoder's torch dtype are two fields: merged into one dict, the
    fingerprint's hid the storage one, a resume with another --dtype was accepted and its records failed
    to decode ("cannot reshape") on lookup."""
    folder = str(tmp_path)
    with CacheWriter(folder, dim=2, context_length=4, dtype="bfloat16", fingerprint=QWEN_FINGERPRINT) as w:
        w.add("a", _states(1))
    with pytest.raises(CacheMismatch, match=r"\(dtype: cache 'bfloat16', config 'float32'\)"):
        CacheWriter(folder, dim=2, context_length=4, dtype="float32", fingerprint=QWEN_FINGERPRINT)
    torch_float32 = dict(QWEN_FINGERPRINT, dtype="float32")
    with pytest.raises(CacheMismatch, match=r"\(encoder.dtype: cache 'bfloat16', config 'float32'\)"):
        CacheWriter(folder, dim=2, context_length=4, dtype="bfloat16", fingerprint=torch_float32)
    with CacheWriter(folder, dim=2, context_length=4, dtype="bfloat16", fingerprint=QWEN_FINGERPRINT) as w:
        w.add("b", _states(3))  # the same settings resume
    cache = EmbeddingCache(folder, QWEN_FINGERPRINT)
    np.testing.assert_array_equal(cache.record("b")[1], _states(3))


def test_the_fingerprint_tells_apart_models_in_folders_of_the_same_name(tmp_path):
    """The fingerprint named the weights by their folder's name alone: two runs' `checkpoint-1000` were
    one model to the cache. A local folder now adds a digest of its config, weight index and samples of
    its weight files; a hub id, or a folder this machine lacks (a host that only reads the cache), has
    the name alone."""

    def qwen(path):
        c = default_data_config().encoder
        c.name, c.model_path, c.context_length = "qwen2_5_vl", str(path), 4
        return fingerprint(c)

    def model_folder(path, config, weights=(("model.safetensors", 10),), index=None):
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(config))
        for name, size in weights:
            save_file({"w": np.full(size, ord("w"), np.uint8)}, path / name)
        if index is not None:
            (path / "model.safetensors.index.json").write_text(json.dumps(index))
        return path

    from safetensors.numpy import save_file

    layers = lambda n: {"num_hidden_layers": n}
    a = model_folder(tmp_path / "exp_a" / "checkpoint-1000", layers(28))
    b = model_folder(tmp_path / "exp_b" / "checkpoint-1000", layers(36))
    assert qwen(a)["model"] == qwen(b)["model"] == "checkpoint-1000" and qwen(a) != qwen(b)
    assert qwen(a) == qwen(a) == qwen(shutil.copytree(a, tmp_path / "copy" / "checkpoint-1000"))
    shards = (("model-00001-of-00002.safetensors", 10), ("model-00002-of-00002.safetensors", 10))
    assert qwen(model_folder(tmp_path / "c" / "checkpoint-1000", layers(28), shards)) != qwen(a)
    index = lambda shard: {"weight_map": {"w": f"model-0000{shard}-of-00002.safetensors"}}
    d = model_folder(tmp_path / "d" / "checkpoint-1000", layers(28), shards, index(1))
    e = model_folder(tmp_path / "e" / "checkpoint-1000", layers(28), shards, index(2))
    assert qwen(d) != qwen(e)
    # Two fine-tunes of one base: same config and file sizes, other weights.
    tuned = model_folder(tmp_path / "f" / "checkpoint-1000", layers(28), (("model.safetensors", 100_000),))
    retuned = model_folder(tmp_path / "g" / "checkpoint-1000", layers(28), ())
    save_file({"w": np.full(100_000, ord("v"), np.uint8)}, retuned / "model.safetensors")
    assert qwen(tuned) != qwen(retuned)
    # A host that only reads the cache may hold the config alone, or a copied snapshot's dangling links:
    # unknown, not different.
    config_only = tmp_path / "h" / "checkpoint-1000"
    config_only.mkdir(parents=True)
    shutil.copy(tuned / "config.json", config_only / "config.json")
    dangling = shutil.copytree(config_only, tmp_path / "i" / "checkpoint-1000")
    (dangling / "model.safetensors").symlink_to(tmp_path / "blobs" / "missing")
    assert qwen(config_only)["model_digest"] is None and qwen(dangling)["model_digest"] is None
    not_safetensors = shutil.copytree(config_only, tmp_path / "j" / "checkpoint-1000")
    (not_safetensors / "model.safetensors").write_bytes(b"w" * 10)
    assert qwen(not_safetensors)["model_digest"] is None
    absent = tmp_path / "absent" / "checkpoint-1000"
    assert qwen(absent)["model_digest"] is None and qwen("Qwen/Qwen2.5-VL-7B")["model_digest"] is None

    folder = str(tmp_path / "cache")
    with CacheWriter(folder, dim=2, context_length=4, dtype="bfloat16", fingerprint=qwen(a)) as writer:
        writer.add("x", _states(1))
    digests = r"cache '[0-9a-f]{16}', config '[0-9a-f]{16}'\)"
    with pytest.raises(CacheMismatch, match=r"\(encoder.model_digest: " + digests):
        CacheWriter(folder, dim=2, context_length=4, dtype="bfloat16", fingerprint=qwen(b))
    with pytest.raises(CacheMismatch, match=r"\(model_digest: " + digests):
        EmbeddingCache(folder, qwen(b))
    assert len(EmbeddingCache(folder, qwen(absent))) == 1
    # A cache written before the digest is read by the name, and a refusal still names what differs.
    old = str(tmp_path / "old")
    with CacheWriter(old, dim=2, context_length=4, dtype="bfloat16", fingerprint=QWEN_FINGERPRINT) as w:
        w.add("x", _states(1))
    assert len(EmbeddingCache(old, dict(QWEN_FINGERPRINT, model_digest=qwen(a)["model_digest"]))) == 1
    other = dict(QWEN_FINGERPRINT, model="checkpoint-1000", model_digest=qwen(a)["model_digest"])
    with pytest.raises(CacheMismatch) as refused:
        EmbeddingCache(old, other)
    assert "settings (model: cache 'Qwen2.5-VL-7B-Instruct', config 'checkpoint-1000'):" in str(refused.value)


def test_the_model_digest_sees_a_change_to_any_one_tensor(tmp_path):
    """The digest read 8 x 4 KiB of each weight file: a merged LoRA that changes some tensors (Qwen's q/v
    projections) kept its base's digest whenever no read fell in them. It now reads a sample of every
    tensor, found through the safetensors header: 256 bytes of each here, of a 64 KiB file."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    base = {f"layers.{i}.weight": rng.standard_normal((16, 16)).astype(np.float32) for i in range(64)}
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    save_file(base, weights)
    digest = model_digest(str(tmp_path))
    assert digest is not None
    for name in base:
        save_file(dict(base, **{name: base[name] + 0.01}), weights)
        assert model_digest(str(tmp_path)) != digest, name
    save_file(base, weights)
    assert model_digest(str(tmp_path)) == digest


def test_the_fingerprint_holds_every_setting_that_changes_a_qwen_context():
    base = default_data_config().encoder
    base.name, base.model_path, base.context_length = "qwen2_5_vl", "/models/Qwen2.5-VL-7B-Instruct", 512
    same_model = dict(base.to_dict(), model_path="Qwen/Qwen2.5-VL-7B-Instruct", cache_dir="/x")
    assert fingerprint(type(base)(same_model)) == fingerprint(base)  # another copy of the same weights
    assert fingerprint(type(base)(dict(base.to_dict(), rewrite_max_new_tokens=8))) == fingerprint(base)
    changes = {
        "model_path": "/models/Qwen2.5-VL-3B-Instruct",
        "context_length": 256,
        "dtype": "float32",
        "max_pixels": 224 * 224,
        "rewrite_reasoning": True,
    }
    for field, value in changes.items():
        assert fingerprint(type(base)(dict(base.to_dict(), **{field: value}))) != fingerprint(base), field
    rewriting = type(base)(dict(base.to_dict(), rewrite_reasoning=True))
    longer = type(base)(dict(rewriting.to_dict(), rewrite_max_new_tokens=64))
    assert fingerprint(longer) != fingerprint(rewriting)
    assert "Answer with a short referring expression" in fingerprint(rewriting)["rewrite_prompt"]


def test_a_qwen_cache_written_before_the_prompt_fields_is_refused_clearly(tmp_path):
    """The fingerprint now records how prompts are built (`PROMPT_VERSION`), the tokenizer, chat template
    and processor files and the processor's pixel bounds: a cache written before cannot vouch for them
    and is refused with the fields that differ, where it was accepted. The toy fingerprint is unchanged,
    so toy caches stay valid."""
    c = default_data_config().encoder
    c.name, c.model_path, c.context_length = "qwen2_5_vl", "/models/Qwen2.5-VL-7B-Instruct", 4
    folder = str(tmp_path)
    with CacheWriter(folder, dim=2, context_length=4, dtype="bfloat16", fingerprint=QWEN_FINGERPRINT) as w:
        w.add("a", _states(1))
    code = r"another version of this code wrote it \(its prompt_version\), and no config setting gives"
    with pytest.raises(
        CacheMismatch, match=r"other encoder settings \(prompt_version: cache None, config 1\): " + code
    ) as refused:
        EmbeddingCache(folder, fingerprint(c))
    assert "set these fields" not in str(refused.value) and "--out=NEW_FOLDER" in str(refused.value)
    with pytest.raises(CacheMismatch, match=r"\(encoder.prompt_version: cache None, config 1\): " + code):
        CacheWriter(folder, dim=2, context_length=4, dtype="bfloat16", fingerprint=fingerprint(c))
    toy = default_data_config().encoder
    assert fingerprint(toy) == {
        "encoder": "toy",
        "context_length": toy.context_length,
        "dim": toy.dim,
        "seed": 0,
    }


def test_a_rewrite_cache_older_than_rewrite_decoding_is_refused_with_advice_one_can_follow(tmp_path):
    """A cache of rewritten queries written before the rewrite decoding entered the fingerprint was told to
    "set these fields as the cache has them", but no config field sets `rewrite_decoding`. Where the
    rewrite fields differ because `rewrite_reasoning` does, setting that one is still the advice."""
    c = default_data_config().encoder
    c.name, c.model_path, c.context_length = "qwen2_5_vl", "/models/Qwen2.5-VL-7B-Instruct", 4
    c.rewrite_reasoning = True
    new = fingerprint(c)
    old = {k: v for k, v in new.items() if k != "rewrite_decoding"}
    folder = str(tmp_path / "old")
    with CacheWriter(folder, dim=2, context_length=4, dtype="bfloat16", fingerprint=old) as w:
        w.add("a", _states(1))
    older = r"an older version of this code wrote it, whose rewrites followed the model folder's generation"
    with pytest.raises(CacheMismatch, match=r"\(rewrite_decoding: cache None, config \{.*\}\): " + older):
        EmbeddingCache(folder, new)
    with pytest.raises(CacheMismatch, match=older + r".*no config setting gives its contexts: write a new"):
        EmbeddingCache(folder, new)
    with pytest.raises(CacheMismatch, match=r"\(encoder.rewrite_decoding: .*" + older + ".*another --out"):
        CacheWriter(folder, dim=2, context_length=4, dtype="bfloat16", fingerprint=new)

    c.rewrite_reasoning = False  # a config setting: the rewrite fields follow it
    folder = str(tmp_path / "plain")
    with CacheWriter(folder, dim=2, context_length=4, dtype="bfloat16", fingerprint=fingerprint(c)) as w:
        w.add("a", _states(1))
    setting = r"rewrite_reasoning: cache False, config True"
    with pytest.raises(CacheMismatch, match=setting + r".*\): set these fields as the cache has them"):
        EmbeddingCache(folder, new)
    with pytest.raises(CacheMismatch, match=setting + r".*\): use another --out"):
        CacheWriter(folder, dim=2, context_length=4, dtype="bfloat16", fingerprint=new)
    toy = default_data_config().encoder  # another encoder: a config setting too
    with pytest.raises(CacheMismatch, match=r"encoder: cache 'qwen2_5_vl', config 'toy'.*: set these fields"):
        EmbeddingCache(folder, fingerprint(toy))


def test_changed_data_is_caught_on_lookup(tmp_path):
    c = small_config()
    c.gen_sources, c.shapes.train_size = "", 6
    precompute(c, str(tmp_path), ["train"])
    c.shapes.expression_kinds = "position"  # every instruction changes, the ids do not
    c.encoder.cache_dir = str(tmp_path)
    it = make_train_iterator(c, 2, 0, seed=0, process_index=0, process_count=1)
    with pytest.raises(CacheMismatch, match="the data changed since the precompute") as stale:
        next(it)
    # the advice used to be "write a new cache with `precompute`", and a rerun into the folder kept them
    assert "--out=NEW_FOLDER" in str(stale.value) and "a rerun into this folder keeps" in str(stale.value)
    c.encoder.cache_dir = ""
    stale_resume = r"seg/train: .*'shapes-0-train-0' was encoded from .*NEW_FOLDER"
    with pytest.raises(PrecomputeError, match=stale_resume):
        precompute(c, str(tmp_path), ["train"])  # it reported every example "already" cached


def test_a_cache_miss_stops_the_pipeline_and_names_the_split(tmp_path):
    c = small_config()
    precompute(c, str(tmp_path), ["train"])  # the evaluation split is not precomputed
    c.encoder.cache_dir = str(tmp_path)
    it = make_eval_iterator(c, "val", 4, process_index=0, process_count=1)
    miss = r"'shapes-0-val-\d' is not in the embedding cache .*--eval=synthetic:val\)"
    with pytest.raises(CacheMiss, match=miss):
        next(iter(it))
    assert it.skips.total == 0  # not counted as an unreadable example
    c.train_split = "val"
    with pytest.raises(CacheMiss, match="precompute split 'val' of the seg sources shapes"):
        next(make_train_iterator(c, 2, 0, seed=0, process_index=0, process_count=1))
    cache = EmbeddingCache(str(tmp_path), fingerprint(c.encoder))
    val_ids = [f"shapes-0-val-{i}" for i in range(5)]
    assert cache.missing(val_ids + ["shapes-0-train-3"]) == val_ids


def test_an_old_format_cache_is_refused_clearly(cache_dir):
    meta_path = os.path.join(cache_dir, "meta.json")
    meta = json.load(open(meta_path))
    del meta["format"]
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(CacheMismatch, match="format 1, this code reads format 2"):
        EmbeddingCache(cache_dir)


def test_one_writer_per_folder(tmp_path):
    first = CacheWriter(str(tmp_path), dim=2, context_length=4, dtype="float32")
    first.add("a", _states(0))
    with pytest.raises(CacheLocked, match="another precompute"):
        CacheWriter(str(tmp_path), dim=2, context_length=4, dtype="float32")
    first.close()
    assert not os.path.exists(tmp_path / "writer.lock")
    with pytest.raises(CacheMismatch):
        CacheWriter(str(tmp_path), dim=2, context_length=5, dtype="float32")
    with CacheWriter(str(tmp_path), dim=2, context_length=4, dtype="float32") as again:  # lock released
        assert again.done == {"a"}


def test_a_lock_left_by_a_dead_process_of_this_host_is_taken_over(tmp_path, caplog):
    """A hard-killed precompute (OOM killer, preemption) left writer.lock: every rerun was refused. A pid
    is checked only within the lock's boot and pid namespace: a container sharing the host name cannot
    see the holder's pid, and must not take a live lock."""
    from genmask_jax.encoders.cache import _lock_line

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process
    host, _, boot, pidns = _lock_line().split(" ")
    lock, dead = tmp_path / "writer.lock", f"{host} {child.pid} {boot} {pidns}"
    lock.write_text(dead + "\n")
    with caplog.at_level(logging.WARNING, logger="genmask_jax.encoders.cache"):
        with CacheWriter(str(tmp_path), dim=2, context_length=4, dtype="float32") as writer:
            assert lock.read_text() == f"{host} {os.getpid()} {boot} {pidns}\n"
            writer.add("a", _states(0))
    assert f"took over the lock of {dead}" in caplog.text
    assert not lock.exists() and len(EmbeddingCache(str(tmp_path))) == 1
    refused = (
        f"{host} {os.getpid()} {boot} {pidns}",  # alive
        f"another-host {child.pid} {boot} {pidns}",
        f"{host} {child.pid} {boot} pidns=1",  # another container's namespace: its pid is not ours
        f"{host} {child.pid} boot=another {pidns}",
        f"{host} {child.pid}",  # written before locks named boot and namespace
        "unknown",
    )
    for holder in refused:
        lock.write_text(f"{holder}\n")
        with pytest.raises(CacheLocked, match=f"host and pid: {holder}"):
            CacheWriter(str(tmp_path), dim=2, context_length=4, dtype="float32")
        assert lock.read_text() == f"{holder}\n"


def test_a_writer_whose_lock_was_taken_leaves_the_new_lock_alone(tmp_path):
    writer = CacheWriter(str(tmp_path), dim=2, context_length=4, dtype="float32")
    lock = tmp_path / "writer.lock"
    lock.write_text("other-host 7 boot=x pidns=y\n")  # what a wrongful takeover would leave
    writer.close()
    assert lock.read_text() == "other-host 7 boot=x pidns=y\n"


# The command line.


def test_jobs_follow_each_source_and_its_consumer():
    from genmask_jax.data.splits import SplitSpec, split_data_config

    c = default_data_config()
    c.seg_sources, c.gen_sources = "shapes,reasonseg,refcoco", "captions"
    c.refcoco.name = "refcoco_unc,ref_coco_bv/refcocog_umd"
    labels = [j.label for j in plan_jobs(c, ["testA", "test"])]
    assert labels == ["synthetic/test", "refcoco_unc/testA", "refcocog_umd/test", "reasonseg/test"]
    jobs = plan_jobs(c, ["all"])
    assert [j.label for j in jobs][:2] == ["seg/train", "gen/train"] and len(jobs) == 2 + 2 + 3 + 2 + 2
    assert jobs[0].names == "shapes,reasonseg,refcoco"  # the training pipeline's view: one source
    refcocog = next(j for j in jobs if j.label == "refcocog_umd/val")
    evaluated = split_data_config(c, SplitSpec("refcocog_umd", "val"))  # what the evaluation job reads
    assert refcocog.names == evaluated.seg_sources == "refcoco"
    assert refcocog.data_config.refcoco.name == evaluated.refcoco.name
    c.refcoco.name = "refcocog_umd"
    with pytest.raises(PrecomputeError, match="no source has split.* testB.*--eval=DATASET:SPLIT"):
        plan_jobs(c, ["val", "testB"])


def test_evaluation_splits_of_data_sets_the_run_does_not_train_on():
    """`evaluate` reads any named split (a run trained on big_vision's refcocox_combined is evaluated on
    refcoco_unc:val, refcocog_umd:val, reasonseg:val): `--eval` plans exactly those, with the evaluation
    job's data config. Before, the eval job advised `--splits=val`, which no configured source has."""
    from genmask_jax.data.splits import SplitSpec, split_data_config

    c = default_data_config()
    c.seg_sources, c.gen_sources, c.refcoco.name = "refcoco", "", "ref_coco_bv/refcocox_combined"
    with pytest.raises(PrecomputeError, match="no source has split"):
        plan_jobs(c, ["val"])
    jobs = plan_jobs(c, [], "refcoco_unc:val,refcocog_umd:val,reasonseg:val")
    assert [j.label for j in jobs] == ["refcoco_unc/val", "refcocog_umd/val", "reasonseg/val"]
    for j, dataset in zip(jobs, ("refcoco_unc", "refcocog_umd", "reasonseg")):
        evaluated = split_data_config(c, SplitSpec(dataset, "val"))
        assert (j.task, j.split, j.names) == ("seg", "val", evaluated.seg_sources)
        assert j.data_config.to_dict() == evaluated.to_dict()
    assert jobs[0].data_config.refcoco.name == "ref_coco_bv/refcoco_unc"
    both = plan_jobs(c, ["train"], ["refcoco_unc:val", "refcoco_unc:val"])
    assert [j.label for j in both] == ["seg/train", "refcoco_unc/val"]
    c.seg_sources = "shapes"  # an --eval split the configured sources also give is planned once
    assert [j.label for j in plan_jobs(c, ["val"], ["synthetic:val"])] == ["synthetic/val"]
    with pytest.raises(ValueError, match="refcoco_unc has splits val, testA, testB"):
        plan_jobs(c, [], ["refcoco_unc:test"])
    with pytest.raises(PrecomputeError, match="nothing to precompute"):
        plan_jobs(c, [], [])


def test_command_line_with_config_overrides(tmp_path):
    def run(*args):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "genmask_jax.encoders.precompute",
                "--config=configs/genmask.py",
                "--config.data.shapes.val_size=3",
                "--config.data.shapes.test_size=2",
                f"--out={tmp_path}",
                *args,
            ],
            cwd=REPO,
            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO},
            capture_output=True,
            text=True,
            timeout=300,
        )

    done = run("--splits=val", "--eval=synthetic:test", "--batch_size=2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(EmbeddingCache(str(tmp_path))) == 5 and "encoding synthetic/val, synthetic/test" in done.stdout
    again = run("--eval=synthetic:test")  # --eval alone: no training split, nothing new
    assert again.returncode == 0, again.stderr[-2000:]
    assert "encoding synthetic/test into" in again.stdout and "'already': 2" in again.stdout
    refused = run("--splits=testA", "--config.data.encoder.seed=3")
    assert refused.returncode == 1 and "no source has split(s) testA" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_missing_data_set_fails_before_the_cache_folder_is_made(tmp_path):
    c = small_config()
    c.seg_sources = "shapes,refcoco"
    c.refcoco.data_dir = str(tmp_path / "no_tfds")
    out = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="no prepared ref_coco_seg/refcoco_unc in .*no_tfds"):
        precompute(c, str(out), ["train"])
    assert not out.exists()


def test_training_sample_prompts_come_from_the_cache(tmp_path):
    """The training hooks' generation samples read their contexts from the cache, with its checks; the
    cache holds the generation sources' training split only, so the samples fall back to it."""
    import ml_collections

    from genmask_jax.parallel.mesh import make_mesh
    from genmask_jax.train.hooks import MetricsLogger, QuickEval

    c = small_config()
    out = str(tmp_path / "cache")
    precompute(c, out, ["train"], batch_size=4, dtype="float32")
    c.encoder.cache_dir = out
    config = ml_collections.ConfigDict({"data": c})
    logger = MetricsLogger(tmp_path, total_steps=1, examples_per_step=1, enabled=False)
    quick = QuickEval(config, None, make_mesh((1, -1, 1)), (), tmp_path, logger, num_examples=3)
    texts, context, mask = quick._load_generation_inputs()
    source = make_task_source("shapes", "train", c, "gen")
    assert texts == [source[i]["text"] for i in range(quick.num_examples)]  # 3, rounded up to the devices
    want_context, want_mask = make_encoder(c.encoder).encode(None, texts)
    np.testing.assert_array_equal(context, want_context)
    np.testing.assert_array_equal(mask, want_mask)


def test_training_sample_prompts_pass_over_a_caption_the_precompute_could_not_encode(tmp_path):
    """A skip record among the first captions turned the run's generation samples off; the samples now
    pass over it, as training does."""
    import ml_collections

    from genmask_jax.parallel.mesh import make_mesh
    from genmask_jax.train.hooks import MetricsLogger, QuickEval

    c = small_config()
    source = make_task_source("shapes", "train", c, "gen")
    out = str(tmp_path / "cache")
    failing = _FailingToyEncoder(c.encoder, {source[1]["text"]})
    precompute(c, out, ["train"], batch_size=4, dtype="float32", encoder=failing)
    c.encoder.cache_dir = out
    config = ml_collections.ConfigDict({"data": c})
    logger = MetricsLogger(tmp_path, total_steps=1, examples_per_step=1, enabled=False)
    quick = QuickEval(config, None, make_mesh((1, -1, 1)), (), tmp_path, logger, num_examples=3)
    texts, context, mask = quick._load_generation_inputs()
    kept = [i for i in range(len(source)) if source[i]["text"] != source[1]["text"]][: quick.num_examples]
    assert len(kept) == quick.num_examples and 1 not in kept
    assert texts == [source[i]["text"] for i in kept]
    want_context, want_mask = make_encoder(c.encoder).encode(None, texts)
    np.testing.assert_array_equal(context, want_context)
    np.testing.assert_array_equal(mask, want_mask)


def test_a_sample_of_a_split_finds_what_the_cache_lacks(tmp_path):
    c = small_config()
    c.shapes.val_size = 40
    precompute(c, str(tmp_path), ["val"])
    cache = EmbeddingCache(str(tmp_path), fingerprint(c.encoder))
    assert missing_from_sample(cache, make_task_source("shapes", "val", c, "seg"), 8) == ([], 8)
    train = make_task_source("shapes", "train", c, "seg")
    missing, checked = missing_from_sample(cache, train, 100)
    assert checked == 12 and missing == [f"shapes-0-train-{i}" for i in range(12)]

    class Unreadable:  # precompute leaves out what it cannot read: not a gap of the cache
        def __len__(self):
            return 3

        def example_id(self, index):
            return f"bad-{index}"

        def __getitem__(self, index):
            raise OSError("truncated file")

    assert missing_from_sample(cache, Unreadable(), 8) == ([], 3)


def _report(main, capsys) -> str:
    from genmask_jax.infer import cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.report_user_errors(main)
    assert exit_info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and ": error: " in err[0], err
    return err[0]


def test_a_cache_error_from_the_data_pipeline_is_one_line(tmp_path, capsys, monkeypatch):
    """A cache without the training split is refused when the iterator is made (a sample of its ids);
    a gap the sample missed stops the first batch that meets it: Grain's reader threads re-raise the
    error as it was raised, so it is one line too."""
    from genmask_jax.data import pipeline

    c = small_config()
    precompute(c, str(tmp_path), ["val"])  # not the training split
    c.encoder.cache_dir = str(tmp_path)
    make = lambda: make_train_iterator(c, 2, 0, seed=0, process_index=0, process_count=1)
    line = _report(make, capsys)
    assert "lacks 12 of 12 sampled seg examples of split 'train'" in line  # the split holds 12
    assert "--splits=train" in line

    monkeypatch.setattr(pipeline, "CACHE_SPOT_CHECKS", 0)
    it = make()
    line = _report(lambda: next(it), capsys)
    assert "is not in the embedding cache" in line and "--splits=train" in line


def test_other_errors_keep_their_traceback():
    """Only a user error itself is one line: a bug raised from or while handling one keeps its traceback."""
    from genmask_jax.infer import cli

    def bug():
        raise RuntimeError("a bug") from KeyError("not a context error")

    def bug_while_handling():
        try:
            raise CacheMiss("example 'x' is not in the embedding cache C")
        except CacheMiss:
            raise IndexError("a bug in the handler")  # noqa: B904

    with pytest.raises(RuntimeError, match="a bug"):
        cli.report_user_errors(bug)
    with pytest.raises(IndexError, match="a bug in the handler"):
        cli.report_user_errors(bug_while_handling)


@pytest.mark.parametrize(
    "error",
    [
        CacheMiss("example 'x' is not cached"),
        CacheMismatch("other settings"),
        EncoderUnavailable("torch"),
        CacheUnreadable("shard-00001.array_record does not read"),  # an OSError too
    ],
)
def test_context_errors_cross_process_boundaries_as_themselves(error):
    # A Grain worker process sends its exception pickled; the parent re-raises that object.
    import pickle

    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
