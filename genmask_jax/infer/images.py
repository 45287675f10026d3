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
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path}: {e}") from e


# The formats an output may take (PIL's names; its extension chooses) and one extension of each for
# messages. Masks take only the lossless ones: a JPEG or WebP mask is no longer two-valued. A name whose
# suffix is no image extension PIL knows (none, `frame.0001`, `mask_thr0.5`) is written as PNG.
OUTPUT_FORMATS = {"PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "JPEG": ".jpg", "WEBP": ".webp"}
LOSSY_FORMATS = ("JPEG", "WEBP")


def output_format(path: str | os.PathLike, lossless: bool = False) -> str:
    """The PIL format of `path` by its extension, PNG when PIL knows no format of that extension;
    InputError for a format not in OUTPUT_FORMATS (`.gif`, `.pdf`), or a lossy one when `lossless`."""
    ext = os.path.splitext(str(path))[1].lower()
    image_format = Image.registered_extensions().get(ext, "PNG")
    allowed = [f for f in OUTPUT_FORMATS if not (lossless and f in LOSSY_FORMATS)]
    if image_format in allowed:
        return image_format
    what = "a mask" if lossless else "an image"
    why = "a lossy format (a mask must keep two values)" if image_format in LOSSY_FORMATS else "not offered"
    use = ", ".join(OUTPUT_FORMATS[f] for f in allowed)
    raise InputError(f"cannot write {what} to {path}: {ext!r} is {why}; use {use}")


def check_writable(path: str | os.PathLike) -> None:
    """Raises InputError unless a file can be written at `path`, creating nothing: an existing file must
    be writable, and otherwise it must not be a folder and the nearest existing folder above it must be
    a folder this process may write in (gs:// paths: only that it is not under a file)."""
    path = epath.Path(path)
    remote = "://" in str(path)
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a folder")
    if path.exists():
        if not remote and not os.access(path, os.W_OK):
            raise InputError(f"cannot write {path}: no permission to write it")
        return
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: {folder} is a file, not a folder")
    if not remote and not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: no permission to write in {folder}")


def _save(array: np.ndarray, path: str | os.PathLike, lossless: bool = False) -> None:
    """Writes `path` whole or not at all: an earlier file there (a rerun's) stays until the new one is
    complete, so a kill mid-write never leaves an empty or cut image behind."""
    image_format = output_format(path, lossless)
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with tmp.open("wb") as f:
        Image.fromarray(array).save(f, format=image_format)
    tmp.replace(path)


def write_mask(mask: np.ndarray, path: str | os.PathLike) -> None:
    """bool `(H, W)` -> 8-bit greyscale, foreground 255, in the lossless format of `path`'s extension
    (`output_format`)."""
    _save(np.asarray(mask, bool).astype(np.uint8) * 255, path, lossless=True)


def write_image(image: np.ndarray, path: str | os.PathLike) -> None:
    """uint8 `(H, W, 3)` in the format of `path`'s extension (`output_format`)."""
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


def output_paths(pattern: str, n: int, lossless: bool = False) -> list[str]:
    """The paths of `n` outputs named by `pattern` (`numbered`), each of a format that takes a mask
    (`lossless`) or an image (`output_format`), so that a bad name stops a command before its model runs.
    Whether they can be written is `check_writable`'s (on the process that writes them)."""
    paths = [numbered(pattern, i, n) for i in range(n)]
    for path in paths:
        output_format(path, lossless)
    return paths
