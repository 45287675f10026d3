"""Fitting images and masks to the model resolution, and mapping predictions back exactly.

Two modes: `"pad"` resizes so the whole image fits (aspect kept) and pads the rest; `"crop"` resizes so
the image covers the output (aspect kept) and crops the centre. Both are described by a `Geometry`:
`output[y, x] = resized[y - top, x - left]` where `resized` is the original image scaled to
`(resized_h, resized_w)`; `top, left >= 0` for padding and `<= 0` for cropping. `unfit_mask` inverts
it: a prediction at the model resolution goes back onto the original image's pixel grid.
No flips here: referring expressions use "left" and "right".
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from genmask_jax.data.skips import BadExample

FIT_MODES = ("pad", "crop")


@dataclasses.dataclass(frozen=True)
class Geometry:
    original_h: int
    original_w: int
    output_h: int
    output_w: int
    resized_h: int
    resized_w: int
    top: int
    left: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def content_box(self) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) of the output pixels that show the image (the rest is padding)."""
        y0, x0 = max(self.top, 0), max(self.left, 0)
        y1 = min(self.top + self.resized_h, self.output_h)
        x1 = min(self.left + self.resized_w, self.output_w)
        return y0, x0, y1, x1


def compute_geometry(original_hw: tuple[int, int], output_hw: tuple[int, int], mode: str = "pad") -> Geometry:
    if mode not in FIT_MODES:
        raise ValueError(f"fit mode must be one of {FIT_MODES}, got {mode!r}")
    (h, w), (oh, ow) = original_hw, output_hw
    if min(h, w, oh, ow) <= 0:
        raise ValueError(f"empty image or output size: {original_hw} -> {output_hw}")
    pick = min if mode == "pad" else max
    scale = pick(oh / h, ow / w)
    rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
    if mode == "pad":
        rh, rw = min(rh, oh), min(rw, ow)
    else:
        rh, rw = max(rh, oh), max(rw, ow)
    return Geometry(h, w, oh, ow, rh, rw, top=(oh - rh) // 2, left=(ow - rw) // 2)


def _resize(array: np.ndarray, hw: tuple[int, int], resample: int) -> np.ndarray:
    if array.shape[:2] == tuple(hw):
        return array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.ndim == 2 and array.dtype not in (np.uint8, np.float32):
        array = array.astype(np.float32)
    out = np.asarray(Image.fromarray(array).resize((hw[1], hw[0]), resample=resample))
    return out


def _place(resized: np.ndarray, geometry: Geometry, fill) -> np.ndarray:
    """Puts `resized` onto the output canvas (pads or crops) following `geometry`."""
    g = geometry
    out = np.full((g.output_h, g.output_w) + resized.shape[2:], fill, dtype=resized.dtype)
    y0, x0, y1, x1 = g.content_box
    out[y0:y1, x0:x1] = resized[y0 - g.top : y1 - g.top, x0 - g.left : x1 - g.left]
    return out


# PIL's modes of 16-bit greyscale (PNG opens as "I;16"); convert("RGB") clips their values to 255.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 `(H, W, 3)` of a PIL image; 16-bit greyscale keeps its high byte (>> 8, as cv2.imread does).

    Mode "I" (32-bit ints) is 16-bit data when a value passes 255 (older Pillows open 16-bit PNGs so),
    8-bit data otherwise, as convert("RGB") takes it. Raises `BadExample("bad_image")` (a ValueError) for
    floating-point pixels (mode "F") and for "I" pixels outside [0, 65535] (signed or 32-bit data):
    convert("RGB") would clip them to a black image, and where their black and white lie cannot be told.
    """
    if image.mode == "F":
        raise BadExample("bad_image", "an image of floating-point pixels (mode F): save it as 8- or 16-bit")
    if image.mode == "I":
        pixels = np.asarray(image)
        low, high = (int(pixels.min()), int(pixels.max())) if pixels.size else (0, 0)
        if low < 0 or high > 65535:
            raise BadExample("bad_image", f"an image of 32-bit pixels from {low} to {high} (mode I): save it "
                             "as 8- or 16-bit")
        if high > 255:
            return _high_byte_rgb(pixels)
    if image.mode in SIXTEEN_BIT_MODES:
        return _high_byte_rgb(np.asarray(image))
    return np.asarray(image.convert("RGB"))


def _high_byte_rgb(grey: np.ndarray) -> np.ndarray:
    """16-bit greyscale `(H, W)` -> uint8 `(H, W, 3)` of its high bytes."""
    return np.repeat((grey.astype(np.int64) >> 8).astype(np.uint8)[..., None], 3, axis=-1)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 `(H, W)`, `(H, W, C)` with C in 1..4 (grey, grey + alpha, RGB, RGBA) -> `(H, W, 3)`, alpha
    dropped as PIL's convert("RGB") drops it.

    Raises `BadExample("bad_image")` (a ValueError) for other shapes and for any other dtype: casting
    uint16 or float pixels to uint8 would wrap or truncate them silently (a float image became black).
    """
    if image.dtype != np.uint8:
        raise BadExample("bad_image", f"an image of dtype {image.dtype}: pass uint8 RGB (0-255)")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or not 1 <= image.shape[-1] <= 4:
        raise BadExample("bad_image", f"an image of shape {image.shape}: pass (H, W, 3) RGB, (H, W, 4) "
                         "RGBA or (H, W) grey")
    if image.shape[-1] <= 2:
        return np.repeat(image[..., :1], 3, axis=-1)
    return image[..., :3]


def fit_image(
    image: np.ndarray, output_hw: tuple[int, int], mode: str = "pad"
) -> tuple[np.ndarray, Geometry]:
    """uint8 image (see `as_rgb`) -> float32 `(oh, ow, 3)` in [-1, 1] (padding 0), and its `Geometry`."""
    image = as_rgb(image)
    geometry = compute_geometry(image.shape[:2], output_hw, mode)
    size = (geometry.resized_h, geometry.resized_w)
    resized = _resize(np.ascontiguousarray(image), size, Image.BILINEAR)
    out = np.zeros((geometry.output_h, geometry.output_w, 3), np.float32)
    y0, x0, y1, x1 = geometry.content_box
    window = resized[y0 - geometry.top : y1 - geometry.top, x0 - geometry.left : x1 - geometry.left]
    # Divide, not multiply by 1 / 127.5: correctly rounded, so it matches `x / 127.5 - 1` bit for bit
    # (the demo's latent pool and the VAE pretraining scale that way).
    np.divide(window, np.float32(127.5), out=out[y0:y1, x0:x1], dtype=np.float32)
    out[y0:y1, x0:x1] -= 1.0
    return out, geometry


def _labels(x: np.ndarray) -> np.ndarray:
    """A bool or integer map in a dtype that PIL resizes without changing its values: uint8 when they fit,
    else (one channel) float32, exact up to 2**24."""
    if x.dtype in (np.bool_, np.uint8) or x.size == 0 or 0 <= x.min() <= x.max() <= 255:
        return np.ascontiguousarray(x).astype(np.uint8)
    if x.ndim != 2 or np.abs(x).max() > 2**24:
        raise ValueError(f"a {x.dtype} map of shape {x.shape} with values {x.min()} ... {x.max()} cannot be "
                         "resized exactly: give one channel of values within +-2**24")
    return np.ascontiguousarray(x).astype(np.float32)


def fit_mask(mask: np.ndarray, geometry: Geometry, fill: int | bool = 0) -> np.ndarray:
    """`(H, W)` bool or integer mask -> `(oh, ow)` with nearest interpolation, same dtype and values;
    padding gets `fill`."""
    resized = _resize(_labels(mask), (geometry.resized_h, geometry.resized_w), Image.NEAREST)
    return _place(resized, geometry, int(fill)).astype(mask.dtype)


def padding_mask(geometry: Geometry) -> np.ndarray:
    """bool `(oh, ow)`, True on output pixels that are padding (not part of the image)."""
    return ~_place(np.ones((geometry.resized_h, geometry.resized_w), bool), geometry, False)


def unfit_mask(
    prediction: np.ndarray, geometry: Geometry | dict, interpolation: str | None = None
) -> np.ndarray:
    """Maps a prediction `(oh, ow)` at the model resolution back to the original `(H, W)`.

    Bool/integer predictions use nearest interpolation, float ones (probabilities, logits) bilinear,
    unless `interpolation` ("nearest" | "bilinear") says otherwise. Parts of the original image that a
    centre crop cut away get 0 (False).
    """
    g = Geometry(**geometry) if isinstance(geometry, dict) else geometry
    if prediction.shape[:2] != (g.output_h, g.output_w):
        raise ValueError(
            f"prediction {prediction.shape} does not match the output size {(g.output_h, g.output_w)}"
        )
    is_float = np.issubdtype(prediction.dtype, np.floating)
    interpolation = interpolation or ("bilinear" if is_float else "nearest")
    resample = Image.BILINEAR if interpolation == "bilinear" else Image.NEAREST
    work = prediction.astype(np.float32) if is_float else _labels(prediction)
    canvas = np.zeros((g.resized_h, g.resized_w) + work.shape[2:], work.dtype)
    y0, x0, y1, x1 = g.content_box
    canvas[y0 - g.top : y1 - g.top, x0 - g.left : x1 - g.left] = work[y0:y1, x0:x1]
    out = _resize(canvas, (g.original_h, g.original_w), resample)
    return out.astype(prediction.dtype)
