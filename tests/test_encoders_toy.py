"""The `toy` instruction encoder and the common encoder interface."""

import logging
import weakref

import numpy as np
from ml_collections import ConfigDict

from genmask_jax.encoders import InstructionEncoder, make_encoder, pad_or_truncate
from genmask_jax.encoders.toy import ToyEncoder


def test_shapes_mask_and_determinism():
    enc = ToyEncoder(context_length=8, dim=16, seed=0)
    assert isinstance(enc, InstructionEncoder)
    ctx, mask = enc.encode(None, ["the red circle", "", "The  RED, circle!"])
    assert ctx.shape == (3, 8, 16) and ctx.dtype == np.float32 and mask.dtype == np.bool_
    np.testing.assert_array_equal(mask.sum(1), [4, 1, 4])  # <s> + words; empty text keeps <s>
    np.testing.assert_array_equal(ctx[0], ctx[2])  # case and punctuation do not matter
    assert np.all(ctx[~mask] == 0)
    again, _ = ToyEncoder(context_length=8, dim=16, seed=0).encode(None, ["the red circle"])
    np.testing.assert_array_equal(again[0], ctx[0])
    other, _ = ToyEncoder(context_length=8, dim=16, seed=1).encode(None, ["the red circle"])
    assert not np.allclose(other[0, 1:4], ctx[0, 1:4])


def test_word_order_matters():
    enc = ToyEncoder(context_length=12, dim=32)
    a, _ = enc.encode(None, ["the circle above the square"])
    b, _ = enc.encode(None, ["the square above the circle"])
    assert not np.allclose(a, b)


def test_truncation_warns(caplog):
    enc = ToyEncoder(context_length=4, dim=8)
    with caplog.at_level(logging.WARNING):
        ctx, mask = enc.encode(None, ["one two three four five six"])
    assert mask.all() and ctx.shape == (1, 4, 8)
    assert "truncated" in caplog.text


def test_make_encoder_and_pad_or_truncate():
    enc = make_encoder(ConfigDict(dict(name="toy", context_length=5, dim=6, seed=0)))
    assert (enc.context_length, enc.dim) == (5, 6)
    out, mask = pad_or_truncate(np.ones((3, 2)), 5)
    np.testing.assert_array_equal(mask, [1, 1, 1, 0, 0])
    assert out.shape == (5, 2) and out[3:].sum() == 0


def test_an_encoder_whose_package_is_missing_is_refused_before_it_is_built(monkeypatch):
    import sys

    import pytest

    from genmask_jax.data.pipeline import default_data_config
    from genmask_jax.encoders import EncoderUnavailable, check_available

    config = default_data_config().encoder
    config.name, config.model_path = "qwen2_5_vl", "/models/Qwen2.5-VL-7B-Instruct"
    monkeypatch.setitem(sys.modules, "torch", None)  # as in an environment from requirements.txt
    for call in (check_available, make_encoder):
        with pytest.raises(EncoderUnavailable, match=r"needs torch, .*pip install torch==2\.13\.0"):
            call(config)
    check_available(default_data_config().encoder)  # the toy encoder needs nothing more


def test_make_encoder_builds_one_encoder_per_process_for_the_same_settings(monkeypatch):
    """Each consumer called `make_encoder`: a training run without a cache loaded the VLM three times (two
    copies alive at once) and an evaluation once per split. Threads asking at once get one encoder too."""
    import threading
    import time

    import genmask_jax.encoders
    from genmask_jax.data.pipeline import default_data_config, make_eval_iterator, make_train_iterator
    from genmask_jax.encoders import toy

    built = []

    class CountingToyEncoder(ToyEncoder):
        def __init__(self, **kwargs):
            built.append(kwargs)
            time.sleep(0.05)  # a slow load: the other threads ask meanwhile
            super().__init__(**kwargs)

    monkeypatch.setattr(toy, "ToyEncoder", CountingToyEncoder)
    monkeypatch.setattr(genmask_jax.encoders, "_BUILT", type(genmask_jax.encoders._BUILT)())
    config = ConfigDict(dict(name="toy", context_length=5, dim=6, seed=3))
    start, got = threading.Barrier(4), []

    def build():
        start.wait()
        got.append(make_encoder(ConfigDict(config.to_dict())))

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1 and all(encoder is got[0] for encoder in got)
    other = make_encoder(ConfigDict(dict(config.to_dict(), seed=4)))
    assert other is not got[0] and len(built) == 2

    c = default_data_config()
    c.resolution, c.num_threads, c.shapes.train_size, c.shapes.val_size = (16, 16), 1, 4, 2
    train = make_train_iterator(c, 2, 2, seed=0, process_index=0, process_count=1)
    for split in ("val", "val"):  # quick evaluation builds an iterator each time, beside the training one
        make_eval_iterator(c, split, 2, process_index=0, process_count=1)
    assert len(built) == 3  # one for the default settings
    assert make_encoder(c.encoder) is make_encoder(ConfigDict(c.encoder.to_dict()))
    del train


def test_an_encoder_lives_only_while_a_consumer_holds_it(monkeypatch):
    """`make_encoder` kept the last encoder for the life of the process: in a notebook, `del segmenter`
    no longer freed the 16.6 GB VLM."""
    import gc

    import genmask_jax.encoders
    from genmask_jax.encoders import toy

    built = []

    class CountingToyEncoder(ToyEncoder):
        def __init__(self, **kwargs):
            built.append(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(toy, "ToyEncoder", CountingToyEncoder)
    monkeypatch.setattr(genmask_jax.encoders, "_BUILT", type(genmask_jax.encoders._BUILT)())
    config = ConfigDict(dict(name="toy", context_length=5, dim=6, seed=3))
    encoder = make_encoder(config)
    freed = weakref.ref(encoder)
    assert make_encoder(config) is encoder and len(built) == 1
    encoder.encode(None, ["the red circle"])  # its word vectors' cache must not hold it
    del encoder
    gc.collect()
    assert freed() is None
    assert make_encoder(config) is not None and len(built) == 2  # built again
