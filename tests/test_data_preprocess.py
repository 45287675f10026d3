"""Fitting to the model resolution and the exact inverse mapping back to the original image."""

import numpy as np
import pytest

from genmask_jax.data import preprocess as P
from genmask_jax.data.skips import BadExample


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


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.int64])
def test_label_maps_keep_their_values(dtype, np_rng):
    """Integer maps went through uint8: 300 came back as 44, -1 as 255."""
    labels = np.array([-1, 7, 300]) if dtype != np.uint16 else np.array([3, 256, 65535])
    codes = np_rng.integers(0, 3, (37, 53)).astype(np.uint8)
    g = P.compute_geometry(codes.shape, (32, 32), "pad")
    inside = ~P.padding_mask(g)
    fitted = P.fit_mask(labels[codes].astype(dtype), g)
    assert fitted.dtype == dtype
    # the same pixels as the uint8 codes take, with the labels' values
    np.testing.assert_array_equal(fitted[inside], labels[P.fit_mask(codes, g)][inside])
    back = P.unfit_mask(fitted, g)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, labels[P.unfit_mask(P.fit_mask(codes, g), g)])
    with pytest.raises(ValueError, match="cannot be resized exactly"):
        P.fit_mask(np.full((4, 4), 2**25, np.int64), g)


def test_fit_image_scales_exactly_as_x_over_127_5_minus_1():
    # The demo's latent pool was built from `x / 127.5 - 1`; the same bits keep old pools valid.
    image = np.arange(256 * 3, dtype=np.uint16).reshape(16, 16, 3).astype(np.uint8)
    fitted, _ = P.fit_image(image, (16, 16), "pad")
    assert fitted.tobytes() == (image.astype(np.float32) / 127.5 - 1.0).tobytes()


def test_grey_grey_alpha_and_rgba_images_become_rgb(np_rng):
    grey = np_rng.integers(0, 256, (20, 30), dtype=np.uint8)
    alpha = np.full_like(grey, 7)
    expected, _ = P.fit_image(grey, (16, 16), "pad")
    for image in (grey[..., None], np.stack([grey, alpha], -1), np.stack([grey, grey, grey, alpha], -1)):
        fitted, g = P.fit_image(image, (16, 16), "pad")
        np.testing.assert_array_equal(fitted, expected)
        assert (g.original_h, g.original_w) == (20, 30)


@pytest.mark.parametrize(
    "image",
    [
        np.full((8, 8, 3), 60000, np.uint16),  # would wrap to 96 as uint8
        np.full((8, 8, 3), 0.8, np.float32),  # would truncate to 0
        np.ones((8, 8, 3), bool),
        np.zeros((8, 8, 5), np.uint8),
    ],
    ids=["uint16", "float32", "bool", "5 channels"],
)
def test_images_that_are_not_uint8_grey_or_rgb_are_bad_examples(image):
    with pytest.raises(BadExample) as info:
        P.fit_image(image, (16, 16), "pad")
    assert info.value.kind == "bad_image"


@pytest.mark.parametrize("values, want", [([0, 100, 200, 255], [0, 100, 200, 255]),  # 8-bit data in "I"
                                          ([0, 256, 40000, 65535], [0, 1, 156, 255])])  # 16-bit data
def test_pil_to_rgb_of_32_bit_int_images(values, want):
    from PIL import Image

    image = Image.fromarray(np.array([values], np.int32), mode="I")
    np.testing.assert_array_equal(P.pil_to_rgb(image)[0, :, 0], want)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.full((2, 3), 0.8, np.float32), r"floating-point pixels \(mode F\)"),  # was all black
        (np.array([[-5, 0, 100, 200]], np.int32), r"32-bit pixels from -5 to 200 \(mode I\)"),
        (np.array([[0, 70000]], np.int32), r"32-bit pixels from 0 to 70000 \(mode I\)"),  # was clipped white
    ],
    ids=["float", "signed", "wider than 16 bits"],
)
def test_pil_to_rgb_refuses_pixels_that_are_not_8_or_16_bit_unsigned(image, message):
    from PIL import Image

    with pytest.raises(BadExample, match=message) as info:
        P.pil_to_rgb(Image.fromarray(image))
    assert info.value.kind == "bad_image"
    sixteen = Image.fromarray(np.array([[0, 256, 65535]], np.uint16))  # "I;16": still its high byte
    np.testing.assert_array_equal(P.pil_to_rgb(sixteen)[0, :, 0], [0, 1, 255])
