"""Image-caption pairs for the generation task.

`CaptionFiles(path)`: either a folder of images each with a same-stem `.txt` caption (searched
recursively, sorted; id `caption-<folder name>/<image path>`), or a JSONL file with one
`{"image": path relative to the file, "caption": text}` per line (`file_name` / `text` are accepted as
key aliases; an image may have several lines, COCO-style, and the k-th caption of an image in file
order has id `caption-<image path>#<k>`, so every pair has its own id). `TfdsCaptions(name)`: a
locally prepared TFDS data set read with `tfds.data_source` (array_record); the image feature may be
encoded bytes or a decoded uint8 array, the caption a string or a list of strings (the first is used);
nested features are addressed with "/" (`captions/text`). A pair whose caption is missing, null or blank
is a bad example (`no_caption`) in every source, never an empty or "None" caption.
"""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
from PIL import Image, ImageOps

from genmask_jax.data import preprocess
from genmask_jax.data.skips import BadExample, SkipLog, skip_reason

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_image(path_or_bytes) -> np.ndarray:
    """uint8 `(H, W, 3)` as displayed (EXIF orientation applied, as phone photos need)."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as im:
        return preprocess.pil_to_rgb(ImageOps.exif_transpose(im))


def _text(value) -> str:
    if value is None:  # a JSON null or a missing key, never the caption "None"
        raise BadExample("no_caption", "no caption")
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        value = value.reshape(-1).tolist()
    if isinstance(value, list | tuple):
        if not value:
            raise BadExample("no_caption", "empty caption list")
        return _text(value[0])
    return str(value)


def caption_text(value) -> str:
    """The caption of a stored value (str, bytes, or a list of them: the first); BadExample
    `no_caption` when it is missing or blank."""
    text = _text(value)
    if not text.strip():
        raise BadExample("no_caption", "empty caption")
    return text


def _read_caption_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except FileNotFoundError as e:
        raise BadExample("no_caption", f"{path} is gone") from e


class CaptionFiles:
    """Random-access caption pairs from a folder or a JSONL file (task `gen`)."""

    def __init__(self, path: str, split: str = "train"):
        if not path:
            raise ValueError("data.captions.path is empty: set it to a caption folder or JSONL file")
        self.path, self.split = path, split
        self.skips = SkipLog(f"captions/{os.path.basename(path.rstrip('/'))}")
        # (image path, caption text or caption-file path, whether it is a file path): folders read their
        # .txt lazily, so a text that merely ends in ".txt" is never mistaken for a file.
        self.items: list[tuple[str, str, bool]] = []
        self.ids: list[str] = []
        if os.path.isdir(path):
            self._scan_folder(path)
        elif os.path.isfile(path):
            self._read_jsonl(path)
        else:
            raise FileNotFoundError(f"caption source {path!r} is neither a folder nor a JSONL file")
        log.info("captions %s: %d pairs; %s", path, len(self.items), self.skips.summary())

    def _scan_folder(self, root: str) -> None:
        for folder, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                caption = os.path.join(folder, stem + ".txt")
                if os.path.exists(caption):
                    self.items.append((os.path.join(folder, name), caption, True))
                    self.ids.append(f"caption-{self._relative(self.items[-1][0])}")
                else:
                    self.skips.add(
                        os.path.relpath(os.path.join(folder, name), root), "no_caption: no .txt beside it"
                    )

    def _read_jsonl(self, path: str) -> None:
        base = os.path.dirname(os.path.abspath(path))
        captions_of: dict[str, int] = {}  # image path -> captions seen so far
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    image = record.get("image", record.get("file_name"))
                    if not isinstance(image, str) or not image:
                        raise BadExample("bad_record", f"image {image!r} is not a path")
                    caption = caption_text(record.get("caption", record.get("text")))
                    image_path = os.path.normpath(os.path.join(base, image))
                except Exception as e:  # noqa: BLE001  (a bad line is a logged skip)
                    self.skips.add(f"{path}:{line_number}", skip_reason(e))
                    continue
                k = captions_of.get(image_path, 0)
                captions_of[image_path] = k + 1
                self.items.append((image_path, caption, False))
                self.ids.append(f"caption-{self._relative(image_path)}#{k}")

    def _relative(self, image_path: str) -> str:
        return os.path.relpath(image_path, os.path.dirname(os.path.abspath(self.path.rstrip("/"))))

    def __len__(self) -> int:
        return len(self.items)

    def example_id(self, index: int) -> str:
        return self.ids[index]

    def __getitem__(self, index: int) -> dict:
        image_path, caption, is_file = self.items[index]
        if is_file:
            caption = _read_caption_file(caption)
        if not caption:
            raise BadExample("no_caption", "empty caption")
        return {"id": self.example_id(index), "image": load_image(image_path), "text": caption}


def _feature(record: dict, key: str):
    value = record
    for part in key.split("/"):
        value = value[part]
    return value


class TfdsCaptions:
    """A locally prepared TFDS image-caption set, read with `tfds.data_source` (no TensorFlow)."""

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        image_key: str = "image",
        caption_key: str = "caption",
    ):
        import tensorflow_datasets as tfds

        from genmask_jax.data.tfds_prepared import check_prepared

        if not name:
            raise ValueError("data.captions.tfds_name is empty")
        self.name, self.split, self.image_key, self.caption_key = name, split, image_key, caption_key
        check_prepared(
            name,
            data_dir,
            f"prepare it with its TFDS builder (`tfds.builder({name!r}, data_dir=...).download_and_prepare("
            "file_format='array_record')`), or set data.captions.tfds_data_dir to where it is",
            split=split,
        )
        try:
            self.records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:
            raise FileNotFoundError(
                f"cannot open TFDS {name!r} split {split!r} in {data_dir!r} ({type(e).__name__}: {e}); "
                "it must be prepared locally in array_record format"
            ) from e

    def __len__(self) -> int:
        return len(self.records)

    def example_id(self, index: int) -> str:
        return f"{self.name}-{self.split}-{index}"

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        text = caption_text(_feature(record, self.caption_key))
        image = _feature(record, self.image_key)
        image = load_image(image) if isinstance(image, bytes) else preprocess.as_rgb(np.asarray(image))
        return {"id": self.example_id(index), "image": image, "text": text}
