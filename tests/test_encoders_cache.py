"""The embedding cache with the `toy` encoder: cached contexts equal direct encoding, resume, and the
pipelines read the cache instead of running the encoder."""

import json
import os

import numpy as np
import pytest

from genmask_jax.data.pipeline import default_data_config, make_eval_iterator, make_train_iterator
from genmask_jax.data.sources import make_task_source
from genmask_jax.encoders import make_encoder
from genmask_jax.encoders.cache import EmbeddingCache, completed_shards
from genmask_jax.encoders.precompute import load_data_config, main, precompute


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
    cache, encoder = EmbeddingCache(cache_dir), make_encoder(c.encoder)
    assert len(cache) == 29 and len(completed_shards(cache_dir)) == 5  # 7 + 5 | 5 | 7 + 5 per job
    for task, split in (("seg", "train"), ("seg", "val"), ("gen", "train")):
        source = make_task_source("shapes", split, c, task)
        for i in range(len(source)):
            raw = source[i]
            want_context, want_mask = encoder.encode(None, [raw["text"]])
            context, mask = cache.lookup(raw["id"])
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
    with pytest.raises(ValueError, match="written with"):
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


def test_bfloat16_cache_and_cli(tmp_path):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from ml_collections import ConfigDict\n"
        "from genmask_jax.data.pipeline import default_data_config\n"
        "def get_config(arg=None):\n"
        "    c = ConfigDict({'data': default_data_config()})\n"
        "    c.data.shapes.val_size = 3\n"
        "    c.data.gen_sources = ''\n"
        "    return c\n"
    )
    assert "seg_sources" in load_data_config(str(config_file))
    out = str(tmp_path / "bf16")
    assert main(["--config", str(config_file), "--out", out, "--splits", "val", "--batch-size", "2"]) == 0
    cache = EmbeddingCache(out)
    assert len(cache) == 3 and json.load(open(os.path.join(out, "meta.json")))["dtype"] == "bfloat16"
    c = load_data_config(str(config_file))
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
