"""The demo's latent pool sees the pixels the grain pipelines would give the model (no VAE here: the
encode is replaced by one that returns its input, so the pool holds exactly what the VAE was sent)."""

import numpy as np
import pytest

from genmask_jax.data.pipeline import default_data_config, make_eval_iterator
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
