"""What `Segmenter(...)(images, prompts)` and `Generator(...)(prompts, ...)` accept, without a model:
the segmenter's device call is replaced by a stand-in that records its batches.

- images: PIL images (as displayed: EXIF orientation applied) and uint8 grey (+ alpha), RGB or RGBA
  arrays, all given to the encoder and the model as uint8 RGB; other dtypes refused (a float image in
  [0, 1] became black);
- one image or one prompt where a list is due, lists of different lengths, no images at all;
- `batch_size`: every device call the same shape, noise indices those of the whole call;
- the generator's image size: a multiple of the pixels under one DiT token, not floored to one;
- the generator's prompts: a list (a string is not one prompt per character), an empty one no images.
"""

import io
import types

import jax
import numpy as np
import pytest
from PIL import Image

from configs.genmask import get_config
from genmask_jax.infer.generator import Generator
from genmask_jax.infer.segmenter import Segmenter
from genmask_jax.models.build import build_model
from genmask_jax.parallel.mesh import make_mesh
from genmask_jax.parallel.sharding import rules_from_config


class RecordingEncoder:
    """The toy encoder's interface; records the images of each `encode` call."""

    name, context_length, dim = "toy", 4, 8

    def __init__(self):
        self.images = []

    def encode(self, images, texts):
        self.images.append(images)
        shape = (len(texts), self.context_length)
        return np.zeros((*shape, self.dim), np.float32), np.ones(shape, bool)


def segmenter_without_model(batch_size: int = 8) -> tuple[Segmenter, list[dict]]:
    """A Segmenter whose `predict` records its batches and scores each pixel by its brightness."""
    config = get_config()
    loaded = types.SimpleNamespace(
        config=config, model=None, resolution=(32, 32), mesh=make_mesh((1, -1, 1), devices=jax.devices()[:1]),
        rules=rules_from_config(config.sharding.logical_axis_rules),
    )
    segmenter = Segmenter(loaded, encoder=RecordingEncoder(), batch_size=batch_size)
    batches = []

    def predict(batch):
        batches.append(batch)
        return np.asarray(batch["image"]).mean(axis=-1)

    segmenter.predict = predict
    return segmenter, batches


RGB = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
GREY = RGB[..., 0]


@pytest.mark.parametrize(
    "image,as_rgb",
    [
        (Image.fromarray(RGB), RGB),
        (Image.fromarray(GREY), np.repeat(GREY[..., None], 3, axis=-1)),
        (GREY, np.repeat(GREY[..., None], 3, axis=-1)),
        (GREY[..., None], np.repeat(GREY[..., None], 3, axis=-1)),
        (np.stack([GREY, np.full_like(GREY, 7)], axis=-1), np.repeat(GREY[..., None], 3, axis=-1)),
        (np.concatenate([RGB, np.full((20, 24, 1), 7, np.uint8)], axis=-1), RGB),
        (Image.fromarray(RGB).convert("RGBA"), RGB),
    ],
    ids=["pil", "pil_grey", "grey", "one_channel", "grey_alpha", "rgba", "pil_rgba"],
)
def test_segmenter_gives_encoder_and_model_rgb_uint8(image, as_rgb):
    """A PIL image was an AttributeError (`ndim`); grey and RGBA arrays reached the encoder as they were."""
    segmenter, batches = segmenter_without_model()
    masks = segmenter([image, as_rgb], ["the red circle", "the red circle"])
    given = segmenter.encoder.images[-1]
    assert all(x.dtype == np.uint8 and x.shape == (20, 24, 3) for x in given)
    np.testing.assert_array_equal(given[0], as_rgb)
    np.testing.assert_array_equal(batches[-1]["image"][0], batches[-1]["image"][1])
    assert masks[0].shape == (20, 24) and np.array_equal(masks[0], masks[1])


@pytest.mark.parametrize(
    "image,message",
    [
        (RGB.astype(np.float32) / 255, "dtype float32: pass uint8 RGB"),  # was fitted as a black image
        (RGB.astype(np.int64), "dtype int64: pass uint8 RGB"),
        (np.zeros((20, 24, 5), np.uint8), r"shape \(20, 24, 5\)"),
        (RGB[None], r"shape \(1, 20, 24, 3\)"),
    ],
)
def test_segmenter_refuses_images_it_cannot_read_as_rgb(image, message):
    segmenter, batches = segmenter_without_model()
    with pytest.raises(ValueError, match=message):
        segmenter([RGB, image], ["a", "b"])
    assert not segmenter.encoder.images and not batches


def test_segmenter_takes_a_pil_image_as_displayed():
    """A PIL image tagged EXIF orientation 6 (stored 20 x 24, shown 24 x 20) was segmented as stored,
    while the CLI's `read_image` rotates it: its mask came back in the other orientation."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = io.BytesIO()
    Image.fromarray(RGB).save(stored, format="JPEG", quality=95, exif=exif.tobytes())
    photo = Image.open(stored)
    displayed = np.rot90(np.asarray(photo.convert("RGB")), k=-1)  # orientation 6: 90 degrees clockwise
    segmenter, batches = segmenter_without_model()
    masks = segmenter([photo, displayed], ["a", "a"])
    np.testing.assert_array_equal(segmenter.encoder.images[-1][0], displayed)
    assert masks[0].shape == (24, 20) and np.array_equal(masks[0], masks[1])


def test_segmenter_call_shapes():
    """No images: no masks (was an error from stacking nothing). One image or one prompt instead of a
    list: a TypeError (an image of 20 rows read as 20 images). Different lengths: a ValueError."""
    segmenter, batches = segmenter_without_model()
    assert segmenter([], []) == [] and not segmenter.encoder.images and not batches
    for image in (RGB, Image.fromarray(RGB)):
        with pytest.raises(TypeError, match="a list of images, one per prompt"):
            segmenter(image, ["the red circle"])
    with pytest.raises(TypeError, match="a list of strings, one per image"):
        segmenter([RGB], "the red circle")
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        segmenter([RGB, RGB], ["the red circle"])


def test_segmenter_batches_have_one_shape_and_one_noise_index():
    """3 images, batch_size 2: two encoder and device calls of 2 rows (the last padded with its first
    row), every row with noise index 0 (an image's noise does not depend on its place in the call)."""
    segmenter, batches = segmenter_without_model(batch_size=2)
    images = [RGB, RGB[:10], RGB[:, :12]]
    masks = segmenter(images, ["a", "b", "c"])
    assert [m.shape for m in masks] == [(20, 24), (10, 24), (20, 12)]
    assert [len(x) for x in segmenter.encoder.images] == [2, 1]
    assert [b["image"].shape for b in batches] == [(2, 32, 32, 3)] * 2
    assert [b["context"].shape[0] for b in batches] == [2, 2]
    assert [list(b["index"]) for b in batches] == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Segmenter(segmenter.loaded, batch_size=0)


def test_generator_refuses_a_size_its_model_cannot_make():
    """The sampler floored the size to whole latent pixels: (44, 52) gave (40, 48) images, or (with a
    2x2 patch) a DiT error about latent sizes."""
    from genmask_jax.infer.generator import check_image_hw, pixels_per_token

    config = get_config()  # the tiny variant: 8x VAE, patch (1, 2, 2)
    loaded = types.SimpleNamespace(config=config, model=build_model(config), resolution=(32, 32))
    assert pixels_per_token(loaded.model) == (16, 16)
    # No encoder: the size is checked before the prompts are encoded.
    for size, shown in [((44, 52), r"\(44, 52\)"), ((40, 48), r"\(40, 48\)"), ((0, 32), r"\(0, 32\)")]:
        with pytest.raises(ValueError, match=rf"positive multiples of 16 for this model .*got {shown}"):
            Generator(loaded)(["a cat"], num_steps=1, image_hw=size)
    assert check_image_hw(loaded.model, (48, 64)) == (48, 64)
    config.model.dit.patch_size = (1, 1, 2)
    model = build_model(config)
    assert check_image_hw(model, (40, 48)) == (40, 48)
    with pytest.raises(ValueError, match=r"multiples of 8 \(H\) and 16 \(W\)"):
        check_image_hw(model, (48, 40))


def test_generator_call_shapes():
    """A string was one image per character, and no prompts a ZeroDivisionError: now a TypeError, and no
    images (as the segmenter gives no masks for no images), without encoding anything."""
    config = get_config()
    loaded = types.SimpleNamespace(config=config, model=build_model(config), resolution=(32, 32))
    encoder = RecordingEncoder()
    generator = Generator(loaded, encoder=encoder)
    for prompts in ("a cat", None):
        with pytest.raises(TypeError, match="prompts: a list of strings, one per image"):
            generator(prompts, num_steps=1)
    images = generator([], num_steps=1)
    assert images.shape == (0, 32, 32, 3) and images.dtype == np.uint8
    assert generator((), num_steps=1, image_hw=(48, 64)).shape == (0, 48, 64, 3)
    assert not encoder.images
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Generator(loaded, batch_size=0)
