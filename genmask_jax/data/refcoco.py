"""RefCOCO, RefCOCO+, RefCOCOg for referring segmentation: our TFDS builder (no TensorFlow) and reader.

The stock TFDS `ref_coco` has boxes but no masks and needs TensorFlow to prepare, so `RefCocoSeg`
prepares straight from the REFER folders (`refcoco/refs(unc).p`, `refcoco+/refs(unc).p`,
`refcocog/refs(umd).p`, `refcocog/refs(google).p`, each beside its `instances.json`) and COCO's
`train2014/` images: one record per expression (each sentence of each ref) holding the image's JPEG
bytes as read from disk, the referred annotation's mask as PNG bytes (all its polygons, or its RLE,
rasterised with pycocotools as REFER's `getMask` does), the sentence, the ids, box and category.

Every encoded field is a `Tensor(shape=(), dtype=np.object_)` (TFDS's `Image` feature would call
TensorFlow), files are array_record, and reading uses `tfds.data_source` (random access); TensorFlow
is never imported. Records come back in TFDS's shuffled key order, so each keeps its ids.

`RefCocoSource(name, split, data_dir)` reads them as a segmentation source; `name` may also be
`ref_coco_bv/<config>` for big_vision's prepared builder (array_record, `<split>_flat` splits).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from genmask_jax.data.skips import BadExample, SkipLog, skip_reason

log = logging.getLogger(__name__)

BUILDER_NAME = "ref_coco_seg"
CONFIGS = {
    "refcoco_unc": ("refcoco", "unc"),
    "refcocoplus_unc": ("refcoco+", "unc"),
    "refcocog_umd": ("refcocog", "umd"),
    "refcocog_google": ("refcocog", "google"),
}
# One example per sentence; DESIGN.md section 7. refcocog_google has no published count we rely on.
PUBLISHED_COUNTS = {
    "refcoco_unc": {"train": 120_624, "val": 10_834, "testA": 5_657, "testB": 5_095},
    "refcocoplus_unc": {"train": 120_191, "val": 10_758, "testA": 5_726, "testB": 4_889},
    "refcocog_umd": {"train": 80_512, "val": 4_896, "test": 9_602},
}
STOCK_REF_COCO_MESSAGE = (
    "the stock TFDS `ref_coco` has boxes but no masks, so it cannot train or evaluate segmentation; "
    "prepare ours with `python -m genmask_jax.data.prepare refcoco --refer-dir REFER --coco-images "
    "COCO/train2014 --out DATA_DIR` and set data.refcoco.name to refcoco_unc | refcocoplus_unc | "
    "refcocog_umd | refcocog_google (or use big_vision's `ref_coco_bv/<config>`)"
)


def encode_png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, bool)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def decode_mask(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return (np.asarray(im.convert("L")) > 0).astype(np.uint8)


def annotation_mask(annotation: dict, height: int, width: int) -> np.ndarray:
    """uint8 `(H, W)` union of the annotation's polygons (or its RLE), as REFER's `getMask`."""
    from pycocotools import mask as mask_utils

    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            raise BadExample("bad_polygon", f"annotation {annotation.get('id')} has no polygon with 3 points")
        rle = mask_utils.frPyObjects(polygons, height, width)
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    decoded = mask_utils.decode(rle)
    if decoded.ndim == 3:
        decoded = decoded.sum(axis=2)
    return (decoded > 0).astype(np.uint8)


class RefCocoSeg(tfds.core.GeneratorBasedBuilder):
    """RefCOCO / RefCOCO+ / RefCOCOg, one example per expression, with masks; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One record per expression with the referred object's mask (PNG bytes)."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in CONFIGS]

    def __init__(self, *, refer_dir: str | None = None, coco_images: str | None = None, **kwargs):
        self.refer_dir, self.coco_images = refer_dir, coco_images
        super().__init__(**kwargs)
        self.skips = SkipLog(f"prepare/{self.builder_config.name}")

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls):
        # Nothing is downloaded; TFDS's default looks for a checksums file beside the module via
        # `importlib_resources`, which is not installed here.
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        encoded = tfds.features.Tensor(shape=(), dtype=np.object_)
        integer = tfds.features.Scalar(dtype=np.int64)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": encoded,  # JPEG bytes of the COCO image, as on disk
                    "mask": encoded,  # PNG bytes, 1-bit, the referred object's mask
                    "sentence": tfds.features.Text(),  # REFER's processed `sent`
                    "raw_sentence": tfds.features.Text(),
                    "image_id": integer,
                    "ann_id": integer,
                    "ref_id": integer,
                    "sent_id": integer,
                    "category_id": integer,
                    "height": integer,
                    "width": integer,
                    "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),  # COCO [x, y, w, h], pixels
                    "file_name": tfds.features.Text(),
                }
            ),
        )

    def _read_refer(self):
        if not self.refer_dir or not self.coco_images:
            raise ValueError(
                f"{BUILDER_NAME}/{self.builder_config.name} must be prepared from local files: "
                "python -m genmask_jax.data.prepare refcoco --refer-dir ... --coco-images ... --out ..."
            )
        dataset, partition = CONFIGS[self.builder_config.name]
        folder = os.path.join(self.refer_dir, dataset)
        with open(os.path.join(folder, f"refs({partition}).p"), "rb") as f:
            refs = pickle.load(f)
        with open(os.path.join(folder, "instances.json")) as f:
            instances = json.load(f)
        images = {im["id"]: im for im in instances["images"]}
        annotations = {a["id"]: a for a in instances["annotations"]}
        return refs, images, annotations

    def _split_generators(self, dl_manager):
        del dl_manager
        refs, images, annotations = self._read_refer()
        by_split: dict[str, list] = {}
        for ref in refs:
            by_split.setdefault(ref["split"], []).append(ref)
        return {
            split: self._generate_examples(rs, images, annotations) for split, rs in sorted(by_split.items())
        }

    def _generate_examples(self, refs, images, annotations):
        cached_image: tuple[int | None, bytes] = (None, b"")
        for ref in sorted(refs, key=lambda r: (r["image_id"], r["ref_id"])):
            example_id = f"{self.builder_config.name}/ref{ref['ref_id']}"
            try:
                image_info = images[ref["image_id"]]
                if cached_image[0] != ref["image_id"]:
                    path = os.path.join(self.coco_images, image_info["file_name"])
                    if not os.path.exists(path):
                        raise BadExample("missing_image", path)
                    with open(path, "rb") as f:
                        data = f.read()
                    with Image.open(io.BytesIO(data)) as im:
                        im.verify()
                    cached_image = (ref["image_id"], data)
                annotation = annotations[ref["ann_id"]]
                mask = annotation_mask(annotation, image_info["height"], image_info["width"])
                if not mask.any():
                    raise BadExample("empty_mask", f"ann {ref['ann_id']} rasterises to nothing")
                mask_png = encode_png(mask)
            except Exception as e:  # noqa: BLE001  (one bad ref is a logged skip, never a failed preparation)
                self.skips.add(example_id, skip_reason(e))
                continue
            for sentence in ref["sentences"]:
                yield (
                    int(sentence["sent_id"]),
                    {
                        "image": cached_image[1],
                        "mask": mask_png,
                        "sentence": sentence.get("sent", sentence.get("raw", "")),
                        "raw_sentence": sentence.get("raw", sentence.get("sent", "")),
                        "image_id": int(ref["image_id"]),
                        "ann_id": int(ref["ann_id"]),
                        "ref_id": int(ref["ref_id"]),
                        "sent_id": int(sentence["sent_id"]),
                        "category_id": int(ref.get("category_id", annotation.get("category_id", -1))),
                        "height": int(image_info["height"]),
                        "width": int(image_info["width"]),
                        "box": np.asarray(annotation["bbox"], np.float32),
                        "file_name": image_info["file_name"],
                    },
                )


def check_published_counts(name: str, counts: dict[str, int]) -> list[str]:
    """Lines comparing prepared split sizes with the published ones; mismatches start with 'MISMATCH'."""
    published = PUBLISHED_COUNTS.get(name)
    if published is None:
        return [f"{name}: no published counts to check against ({counts})"]
    lines = []
    for split in sorted(set(published) | set(counts)):
        got, want = counts.get(split), published.get(split)
        status = "OK" if got == want else "MISMATCH"
        lines.append(f"{status} {name} {split}: {got} expressions prepared, {want} published")
    return lines


class RefCocoSource:
    """A prepared RefCOCO-family split as a segmentation source (see `sources.py` for the protocol)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        base = name.split("/")[0].split(":")[0]
        if base == "ref_coco":
            raise ValueError(STOCK_REF_COCO_MESSAGE)
        self.name, self.split = name, split
        self.big_vision = base == "ref_coco_bv"
        if self.big_vision:
            tfds_split = {"val": "validation"}.get(split, split) + "_flat"
            tfds_name = name
        else:
            if name not in CONFIGS:
                raise ValueError(f"unknown RefCOCO config {name!r}; expected one of {sorted(CONFIGS)}")
            tfds_split, tfds_name = split, f"{BUILDER_NAME}/{name}"
        try:
            self.records = tfds.data_source(
                tfds_name, split=tfds_split, data_dir=data_dir or None, download=False
            )
        except Exception as e:
            raise FileNotFoundError(
                f"cannot open {tfds_name!r} split {tfds_split!r} in {data_dir!r} ({type(e).__name__}: {e}); "
                "prepare it with `python -m genmask_jax.data.prepare refcoco --refer-dir ... "
                "--coco-images ... --out DATA_DIR` (array_record files, no TensorFlow)"
            ) from e
        if "mask" not in self._feature_keys():
            raise ValueError(f"{tfds_name!r} has no masks: {STOCK_REF_COCO_MESSAGE}")

    def _feature_keys(self) -> set[str]:
        features = self.records.dataset_info.features
        keys = set(features.keys())
        if "objects" in keys:
            keys |= set(features["objects"].feature.keys() if hasattr(features["objects"], "feature") else [])
            keys |= {"mask"} if "mask" in str(features["objects"]) else set()
        return keys

    def __len__(self) -> int:
        return len(self.records)

    def _ids(self, record: dict) -> str:
        if self.big_vision:
            ref_id = int(np.asarray(record["objects"]["refs"]["id"]).reshape(-1)[0])
            return f"{self.name}-{self.split}-{ref_id}"
        return f"{self.name}-{self.split}-{int(record['sent_id'])}"

    def example_id(self, index: int) -> str:
        return self._ids(self.records[index])

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        if self.big_vision:
            objects = record["objects"]
            image = np.asarray(record["image"])
            mask = (np.asarray(objects["mask"])[0][..., 0] > 0).astype(np.uint8)
            sentence = np.asarray(objects["refs"]["sentence"]).reshape(-1)[0]
        else:
            image, mask, sentence = (
                decode_image(record["image"]),
                decode_mask(record["mask"]),
                record["sentence"],
            )
        text = sentence.decode() if isinstance(sentence, bytes) else str(sentence)
        return {"id": self._ids(record), "image": image, "mask": mask, "text": text}
