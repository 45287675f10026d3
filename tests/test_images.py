"""Reading user images as displayed (EXIF orientation applied, as cv2.imread does) and numbering outputs."""

import cv2
import numpy as np
import pytest
from PIL import Image

from genmask_jax.infer import images


def write_rotated_jpeg(path, height: int, width: int) -> np.ndarray:
    """Stores a `(height, width)` JPEG tagged Orientation 6 (shown rotated 90 degrees clockwise); returns
    the stored pixels: a bright left third, the rest dark."""
    stored = np.full((height, width, 3), 30, np.uint8)
    stored[:, : width // 3] = 220
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return stored


def test_read_image_applies_exif_orientation(tmp_path):
    path = tmp_path / "phone.jpg"
    stored = write_rotated_jpeg(path, 20, 42)
    image = images.read_image(path)
    assert image.shape == (42, 20, 3)  # as displayed, and as LISA's cv2.imread reads it
    reference = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert np.abs(image.astype(int) - reference).max() <= 8
    # the stored left third is the displayed top third
    np.testing.assert_allclose(image[:13].mean(), 220, atol=8)
    np.testing.assert_allclose(image[15:].mean(), 30, atol=8)
    np.testing.assert_allclose(np.rot90(stored, k=-1).mean(axis=(1, 2)), image.mean(axis=(1, 2)), atol=12)


def test_read_image_without_orientation_and_errors(tmp_path):
    path = tmp_path / "plain.png"
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    Image.fromarray(pixels).save(path)
    np.testing.assert_array_equal(images.read_image(path), pixels)
    with pytest.raises(images.InputError, match="does not exist"):
        images.read_image(tmp_path / "missing.jpg")


@pytest.mark.parametrize(
    "path, i, n, expected",
    [
        ("m.png", 0, 1, "m.png"),
        ("m.png", 2, 3, "m_2.png"),
        ("masks/m", 1, 2, "masks/m_1.png"),
        ("out/{i}.png", 1, 3, "out/1.png"),
        ("out/{i}.png", 0, 1, "out/0.png"),  # one output: the pattern is still filled in
        ("run{i}/m{i}.png", 4, 5, "run4/m4.png"),
        ("{date}/m_{i}.png", 2, 3, "{date}/m_2.png"),  # other braces are kept, not a KeyError
        ("{date}/m.png", 1, 2, "{date}/m_1.png"),
        ("{date}/m.png", 0, 1, "{date}/m.png"),
        ("m_{0}.png", 1, 2, "m_{0}_1.png"),
    ],
)
def test_numbered(path, i, n, expected):
    assert images.numbered(path, i, n) == expected


def test_read_image_scales_16_bit_greyscale_to_8_bits(tmp_path):
    """PIL opens a 16-bit PNG as "I;16", whose convert("RGB") clips every value above 255 to white;
    cv2.imread keeps the high byte."""
    path = tmp_path / "depth.png"
    grey = (np.arange(4 * 6, dtype=np.uint16) * 2800).reshape(4, 6)
    Image.fromarray(grey).save(path)
    image = images.read_image(path)
    assert image.shape == (4, 6, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=-1))
    np.testing.assert_array_equal(image, cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
