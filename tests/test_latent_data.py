"""The demo's latent pool sees the pixels the grain pipelines would give the model (no VAE here: the
encode is replaced by one that returns its input, so the pool holds exactly what the VAE was sent)."""

import logging

import numpy as np
import pytest

from genmask_jax.data import pipeline
from genmask_jax.data.pipeline import default_data_config, make_eval_iterator, make_train_iterator
from genmask_jax.models import mask_codec
from genmask_jax.train import latent_data


@pytest.mark.parametrize("fit", ["pad", "crop"])
def test_pool_fits_scenes_rendered_at_another_resolution_like_the_eval_iterator(fit, monkeypatch):
    monkeypatch.setattr(latent_data, "make_encode_fn", lambda vae_config: lambda params, rgb: rgb[:, None])
    c = default_data_config()
    c.resolution, c.fit, c.num_threads = (32, 32), fit, 1
    c.shapes.render_resolution, c.shapes.train_size = (48, 40), 3
    pool = latent_data.build_latent_pool(c, 3, None, None, batch_size=2, progress=False, chunk=2)
    batch = next(iter(make_eval_iterator(c, c.train_split, 3, process_index=0, process_count=1)))
    assert pool.image_latent.shape == (3, 1, 32, 32, 3)
    np.testing.assert_array_equal(pool.image_latent[:, 0], batch["image"])
    np.testing.assert_array_equal(pool.mask_latent[:, 0], np.asarray(mask_codec.mask_to_rgb(batch["mask"])))


def test_pool_replaces_a_scene_whose_target_the_fit_cuts_away_as_the_train_iterator_does(monkeypatch, caplog):
    """Rendered at 64x160 and centre-cropped to 32x32, scene 3's target is cut away (a third of all are):
    the pool, like the grain training iterator, takes the next scene instead, so both see the same."""
    monkeypatch.setattr(latent_data, "make_encode_fn", lambda vae_config: lambda params, rgb: rgb[:, None])
    c = default_data_config()
    c.resolution, c.fit, c.num_threads, c.shuffle = (32, 32), "crop", 1, False
    c.shapes.render_resolution, c.shapes.train_size = (64, 160), 8
    with caplog.at_level(logging.WARNING):
        pool = latent_data.build_latent_pool(c, 8, None, None, batch_size=4, progress=False, chunk=4)
    np.testing.assert_array_equal(pool.image_latent[3], pool.image_latent[4])
    assert "1 of 8 scenes replaced" in caplog.text
    it = make_train_iterator(c, 8, 0, seed=0, process_index=0, process_count=1)
    batch = next(it)["seg"]
    assert pipeline.iterator_skips(it)["seg"].counts["empty_after_fit"] == 1
    assert batch["mask"].sum(axis=(1, 2)).min() > 0
    np.testing.assert_array_equal(pool.image_latent[:, 0], batch["image"])
    np.testing.assert_array_equal(pool.mask_latent[:, 0], np.asarray(mask_codec.mask_to_rgb(batch["mask"])))
    np.testing.assert_array_equal(pool.seg_context, batch["context"])


def test_pool_gives_a_vlm_the_scene_image_with_the_expression_as_the_pipelines_do(monkeypatch):
    """The pool encoded the expressions without their images, where every other path (`encoder_input`:
    the pipelines, the precompute) gives a VLM the image: a demo with the Qwen encoder trained on other
    contexts than it was evaluated on. The toy encoder reads no image, so its pool is unchanged."""
    from genmask_jax.encoders import encoder_input

    calls = []

    class RecordingVLM:  # stands for qwen2_5_vl
        name, context_length, dim = "qwen2_5_vl", 4, 2

        def encode(self, images, texts):
            calls.append((images, texts))
            return np.zeros((len(texts), 4, 2), np.float32), np.ones((len(texts), 4), bool)

    monkeypatch.setattr(latent_data, "make_encode_fn", lambda vae_config: lambda params, rgb: rgb[:, None])
    monkeypatch.setattr(latent_data, "make_encoder", lambda config: RecordingVLM())
    c = default_data_config()
    c.resolution, c.encoder.name, c.shapes.train_size = (32, 32), "qwen2_5_vl", 3
    monkeypatch.setattr(latent_data, "ENCODE_CHUNK", 2)  # a VLM's one forward pass per call: in chunks
    pool = latent_data.build_latent_pool(c, 3, None, None, batch_size=2, progress=False, chunk=2)
    assert [len(texts) for _, texts in calls] == [2, 1, 2, 1]
    assert pool.seg_context.shape == pool.gen_context.shape == (3, 4, 2)
    seg_images, seg_texts = calls[0][0] + calls[1][0], calls[0][1] + calls[1][1]
    gen_images, gen_texts = calls[2][0] + calls[3][0], calls[2][1] + calls[3][1]
    source = latent_data.shapes_source(c, c.train_split, 3)
    for i in range(3):
        image, text, _ = encoder_input(source[i], "seg", c.encoder)
        np.testing.assert_array_equal(seg_images[i], image)
        assert seg_texts[i] == text == source[i]["expression"]
    assert gen_images == [None] * 3 and gen_texts == [source[i]["caption"] for i in range(3)]
