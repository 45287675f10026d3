"""The `toy` instruction encoder and the common encoder interface."""

import logging

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
