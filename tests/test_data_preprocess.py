"""Fitting to the model resolution and the exact inverse mapping back to the original image."""

import numpy as np
import pytest

from genmask_jax.data import preprocess as P


def test_geometry_values():
    g = P.compute_geometry((100, 200), (64, 64), "pad")
    assert (g.resized_h, g.resized_w, g.top, g.left) == (32, 64, 16, 0)
    g = P.compute_geometry((100, 200), (64, 64), "crop")
    assert (g.resized_h, g.resized_w, g.top, g.left) == (64, 128, 0, -32)
    with pytest.raises(ValueError):
        P.compute_geometry((10, 10), (8, 8), "stretch")


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_integer_upscale_round_trips_exactly(mode, np_rng):
    mask = np_rng.random((12, 20)) > 0.5
    output = (24, 40)  # exactly 2x: nearest up then back must be the identity
    g = P.compute_geometry(mask.shape, output, mode)
    fitted = P.fit_mask(mask, g)
    assert fitted.shape == output and fitted.dtype == np.bool_
    np.testing.assert_array_equal(P.unfit_mask(fitted, g), mask)
    np.testing.assert_array_equal(P.unfit_mask(fitted, g.to_dict()), mask)


def test_pad_maps_content_and_drops_padding():
    image = np.full((30, 50, 3), 255, np.uint8)
    fitted, g = P.fit_image(image, (32, 32), "pad")
    pad = P.padding_mask(g)
    assert fitted.shape == (32, 32, 3) and fitted.dtype == np.float32
    assert np.all(fitted[pad] == 0.0) and np.allclose(fitted[~pad], 1.0)
    assert pad.sum() == 32 * 32 - g.resized_h * g.resized_w
    np.testing.assert_array_equal(P.unfit_mask(~pad, g), np.ones((30, 50), bool))
    np.testing.assert_array_equal(P.unfit_mask(pad, g), np.zeros((30, 50), bool))


def test_crop_marks_cut_region_as_background():
    g = P.compute_geometry((20, 40), (16, 16), "crop")
    back = P.unfit_mask(np.ones((16, 16), bool), g)
    assert back.shape == (20, 40)
    assert back[:, 10:30].all() and not back[:, :9].any() and not back[:, 31:].any()


def test_mask_nearest_keeps_binary_and_float_prediction_interpolates(np_rng):
    mask = (np_rng.random((37, 53)) > 0.5).astype(np.uint8)
    g = P.compute_geometry(mask.shape, (32, 32), "pad")
    assert set(np.unique(P.fit_mask(mask, g))) <= {0, 1}
    ignore = P.fit_mask(np.zeros((37, 53), bool), g, fill=True)
    np.testing.assert_array_equal(ignore, P.padding_mask(g))
    prob = P.unfit_mask(np.full((32, 32), 0.75, np.float32), g)
    assert prob.dtype == np.float32 and prob.shape == (37, 53)
    np.testing.assert_allclose(prob[5:-5, 5:-5], 0.75, atol=1e-6)  # bilinear of a constant is the constant
