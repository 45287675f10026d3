"""Image files in and out: reading inputs, writing masks, overlays and side-by-side panels."""

import os

import numpy as np
from etils import epath
from PIL import Image, ImageOps, UnidentifiedImageError

from genmask_jax.data.preprocess import pil_to_rgb
from genmask_jax.infer.cli import InputError

OVERLAY_COLOUR = np.array([255, 40, 40], np.float32)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 `(H, W, 3)` as displayed (EXIF orientation applied, as phone photos need); a missing or
    undecodable file is an InputError naming it."""
    path = epath.Path(path)
    if not path.exists():
        raise InputError(f"image {path} does not exist")
    try:
        with path.open("rb") as f, Image.open(f) as image:
            return pil_to_rgb(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"cannot read image {path}: {e}") from e


def _save(array: np.ndarray, path: str | os.PathLike) -> None:
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        Image.fromarray(array).save(f, format="PNG")


def write_mask(mask: np.ndarray, path: str | os.PathLike) -> None:
    """bool `(H, W)` -> 8-bit PNG, foreground 255."""
    _save(np.asarray(mask, bool).astype(np.uint8) * 255, path)


def write_image(image: np.ndarray, path: str | os.PathLike) -> None:
    """uint8 `(H, W, 3)` -> PNG."""
    _save(np.asarray(image, np.uint8), path)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 `(H, W, 3)` with the mask's pixels tinted red."""
    out = image.astype(np.float32)
    m = np.asarray(mask, bool)
    out[m] = (1 - alpha) * out[m] + alpha * OVERLAY_COLOUR
    return np.clip(out, 0, 255).astype(np.uint8)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """RGB in [-1, 1] -> uint8 [0, 255]."""
    return np.clip(np.round((np.asarray(rgb, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def panel(rows: list[list[np.ndarray]], gap: int = 2) -> np.ndarray:
    """A grid of equally sized uint8 `(H, W, 3)` tiles (bool masks become white on black)."""

    def tile(x):
        x = np.asarray(x)
        if x.dtype == bool or x.ndim == 2:
            x = np.repeat((np.asarray(x, bool).astype(np.uint8) * 255)[..., None], 3, axis=-1)
        return x

    rows = [[tile(x) for x in row] for row in rows]
    h, w = rows[0][0].shape[:2]
    ncols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + gap) - gap, ncols * (w + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, x in enumerate(row):
            out[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = x
    return out


def numbered(path: str, i: int, n: int) -> str:
    """The path of output `i` of `n`: every `{i}` in `path` replaced by `i` (other braces kept as they
    are), else `path` itself when `n` is 1, else `_<i>` before the extension."""
    if "{i}" in path:
        return path.replace("{i}", str(i))
    if n == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}_{i}{ext or '.png'}"
