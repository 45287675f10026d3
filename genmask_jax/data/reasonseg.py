"""ReasonSeg in LISA's layout: `root/{train,val,test}/NAME.jpg` with `NAME.json` beside it.

A split is the images LISA's `glob('<split>/*.jpg')` finds: `.JPG`, `.jpeg`, `.png` and hidden files
are left out (with a warning), so the examples are LISA's.

The JSON holds `text` (a list of queries), `is_sentence` (long reasoning sentence vs short phrase) and
`shapes` (labelme polygons: `label`, `points` [[x, y], ...]). As in LISA's `get_mask_from_json`: shapes
labelled `flag` are skipped; the others are painted largest first (so smaller shapes win where they
overlap), label containing `ignore` paints the ignore region (excluded from I and U), any other label
paints the target. Points are truncated to int32 and each polygon is drawn with cv2's `polylines`
(one-pixel outline) then `fillPoly`, and ties in area keep LISA's `argsort(areas)[::-1]` order, so
masks equal LISA's pixel for pixel. A shape paints what falls inside the image, so one off the canvas
paints nothing; an example whose target is then empty is skipped in training by the pipeline.

Images are read with their EXIF orientation applied, as LISA's `cv2.imread` does: labelme draws the
polygons on the image as displayed, so a JPEG with Orientation 6 has its mask on the rotated canvas.

Training uses every non-blank text of an image (one example each); evaluation uses `text[0]` (LISA's
protocol) unless `all_texts`, and skips the image when that text is blank. A `text` that is not a list
(LISA would iterate a string letter by letter) skips the image as a bad example. With `use_templates`,
queries are wrapped in LISA's first question template.
"""

from __future__ import annotations

import json
import logging
import os

import cv2
import numpy as np
from PIL import Image, ImageOps

from genmask_jax.data import preprocess
from genmask_jax.data.skips import BadExample, SkipLog, skip_reason

log = logging.getLogger(__name__)

SHORT_TEMPLATE = "What is {query} in this image? Please output segmentation mask."
LONG_TEMPLATE = "{query} Please output segmentation mask."
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # only to warn about those left out


def query_text(text: str, is_sentence: bool, use_templates: bool = True) -> str:
    text = text.strip()
    if not use_templates:
        return text
    return (LONG_TEMPLATE if is_sentence else SHORT_TEMPLATE).format(query=text)


def lisa_images(names: list[str]) -> tuple[list[str], list[str]]:
    """A split folder's file names -> (those LISA's `glob('<split>/*.jpg')` finds: case-sensitive, no
    hidden names; the other image files, which it leaves out), both sorted."""
    taken, left_out = [], []
    for name in sorted(names):
        if name.endswith(".jpg") and not name.startswith("."):
            taken.append(name)
        elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
            left_out.append(name)
    return taken, left_out


def read_annotation(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError:  # some LISA files are cp1252, LISA reads them the same way
        with open(path, encoding="cp1252") as f:
            return json.load(f)


def _paint(canvas: np.ndarray, points: np.ndarray, value: int) -> None:
    polygon = np.asarray([points], np.int32)  # float -> int32 truncates, as LISA's np.array(..., int32)
    cv2.polylines(canvas, polygon, True, value, 1)
    cv2.fillPoly(canvas, polygon, value)


def rasterise_shapes(
    shapes: list[dict], height: int, width: int, name: str = "annotation"
) -> tuple[np.ndarray, np.ndarray]:
    """LISA's mask from labelme shapes: target uint8 `(H, W)` in {0, 1} and ignore bool `(H, W)`.

    As in LISA, a shape paints what falls inside the image and nothing else (labelme puts points on
    x == width; a polygon may enclose the image). A target shape that paints no pixel is logged, naming
    `name`: the usual cause is an image read in another orientation than it was annotated in."""
    kept, areas = [], []
    for shape in shapes:
        label = str(shape.get("label", ""))
        if label.lower() == "flag":
            continue
        points = np.asarray(shape.get("points", []), np.float64).reshape(-1, 2)
        if len(points) == 0:  # LISA's cv2.fillPoly fails on it: malformed, not geometry
            raise BadExample("bad_polygon", f"shape {label!r} has no points")
        region = np.zeros((height, width), np.uint8)
        _paint(region, points, 1)
        kept.append((label, points))
        areas.append(int(region.sum()))
        if areas[-1] == 0 and "ignore" not in label.lower():
            log.warning(
                "%s: shape %r (x %.0f..%.0f, y %.0f..%.0f) paints no pixel of the %dx%d image; "
                "was it annotated on the image turned by its EXIF orientation?",
                name,
                label,
                points[:, 0].min(),
                points[:, 0].max(),
                points[:, 1].min(),
                points[:, 1].max(),
                width,
                height,
            )
    label_map = np.zeros((height, width), np.uint8)
    for i in np.argsort(areas)[::-1]:  # largest first, smaller shapes painted over larger ones
        label, points = kept[i]
        _paint(label_map, points, 255 if "ignore" in label.lower() else 1)
    return (label_map == 1).astype(np.uint8), label_map == 255


def usable_texts(texts: list, all_texts: bool) -> list:
    """The queries of an image: its non-blank texts, or (not `all_texts`) `text[0]` alone, chosen before
    blanks are dropped as LISA's ValDataset does (`sampled_sents[0]`), so a later text never stands in.
    Raises BadExample("no_text") when none is left."""
    if not texts:
        raise BadExample("no_text", "empty text list")
    chosen = [t for t in (texts if all_texts else texts[:1]) if str(t).strip()]
    if not chosen:
        raise BadExample("no_text", "every text is blank" if all_texts else "text[0] is blank")
    return chosen


class ReasonSeg:
    """Random-access ReasonSeg source (`task` seg)."""

    def __init__(self, root: str, split: str, all_texts: bool = True, use_templates: bool = True):
        if not root:  # the split folder would be looked up in the working directory
            from genmask_jax.data.sources import DataConfigError

            raise DataConfigError(
                "data.reasonseg.root is empty: set it to the ReasonSeg folder (LISA's train/, val/, test/)"
            )
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"ReasonSeg split folder {folder!r} not found (expected LISA's layout)")
        self.root, self.split, self.use_templates = root, split, use_templates
        self.skips = SkipLog(f"reasonseg/{split}")
        self.items: list[
            tuple[str, str, int, str, bool]
        ] = []  # (image path, json path, text index, text, long)
        names, left_out = lisa_images(os.listdir(folder))
        if left_out:
            log.warning(
                "ReasonSeg %s: %d image files left out as LISA's glob('*.jpg') leaves them out, e.g. %r",
                split,
                len(left_out),
                left_out[0],
            )
        for name in names:
            stem = os.path.splitext(name)[0]
            image_path, json_path = os.path.join(folder, name), os.path.join(folder, stem + ".json")
            try:
                annotation = read_annotation(json_path)
                texts = annotation["text"]
                if not isinstance(texts, list):
                    raise BadExample("bad_text", f"'text' is a {type(texts).__name__}, not a list of queries")
                texts = usable_texts(texts, all_texts)
            except Exception as e:  # noqa: BLE001  (a bad annotation file is a logged skip)
                self.skips.add(f"reasonseg-{split}-{stem}", skip_reason(e))
                continue
            is_sentence = bool(annotation.get("is_sentence", False))
            for k, text in enumerate(texts):
                self.items.append((image_path, json_path, k, str(text), is_sentence))
        log.info("ReasonSeg %s: %d examples; %s", split, len(self.items), self.skips.summary())

    def __len__(self) -> int:
        return len(self.items)

    def example_id(self, index: int) -> str:
        image_path, _, k, _, _ = self.items[index]
        return f"reasonseg-{self.split}-{os.path.splitext(os.path.basename(image_path))[0]}-{k}"

    def __getitem__(self, index: int) -> dict:
        image_path, json_path, _, text, is_sentence = self.items[index]
        with Image.open(image_path) as im:
            image = preprocess.pil_to_rgb(ImageOps.exif_transpose(im))
        annotation = read_annotation(json_path)
        mask, ignore = rasterise_shapes(annotation.get("shapes", []), *image.shape[:2], name=json_path)
        return {
            "id": self.example_id(index),
            "image": image,
            "mask": mask,
            "ignore": ignore,
            "text": query_text(text, is_sentence, self.use_templates),
            "query": text,
            "is_sentence": is_sentence,
        }
