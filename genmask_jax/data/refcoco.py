"""RefCOCO, RefCOCO+, RefCOCOg for referring segmentation: our TFDS builder (no TensorFlow) and reader.

The stock TFDS `ref_coco` has boxes but no masks and needs TensorFlow to prepare, so `RefCocoSeg`
prepares straight from the REFER folders (`refcoco/refs(unc).p`, `refcoco+/refs(unc).p`,
`refcocog/refs(umd).p`, `refcocog/refs(google).p`, each beside its `instances.json`) and COCO's
`train2014/` images (or `train2017/`, the same images without the `COCO_train2014_` prefix), each decoded
once to check it and its size against instances.json: one record per expression (each sentence of each
ref) holding the image's JPEG bytes as read from disk, the referred annotation's mask as PNG bytes (all
its polygons, or its RLE, rasterised with pycocotools as REFER's `getMask` does), the sentence, the ids,
box and category. The mask is the union of the polygons (as pycocotools' `annToMask` and big_vision);
LISA's refer_seg evaluation sums them instead (`np.sum(decode(rle), axis=2)`), so the rare pixels two
polygons of one annotation both cover are 2 there and fall out of its target, and are target here.

Every encoded field is a `Tensor(shape=(), dtype=np.object_)` (TFDS's `Image` feature would call
TensorFlow), files are array_record, and reading uses `tfds.data_source` (random access); TensorFlow
is never imported. Records come back in TFDS's shuffled key order, so each keeps its ids.

`RefCocoSource(name, split, data_dir)` reads them as a segmentation source; `name` may also be
`ref_coco_bv/<config>` for big_vision's prepared builder (array_record, `<split>_flat` splits).

The UNC and UMD partitions were drawn independently over overlapping COCO train2014 images, so one set's
train split holds images of another's val/test splits. `eval_image_ids` collects the images of the
val/test splits and `RefCocoSource(..., exclude_image_ids=...)` drops train records showing them
(`data.refcoco.exclude_eval_images`, as big_vision's `refcocox_combined` and MAttNet do). Both need the
COCO image id of every record: `prepare` writes them to `IMAGE_INDEX_FILE` beside the prepared files
(`prepare refcoco-index` does it for big_vision's or older preparations); without it every record is
read once, its image never decoded.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import pickle
import stat
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from genmask_jax.data import preprocess
from genmask_jax.data.skips import BadExample, SkipLog, skip_reason, transient
from genmask_jax.data.tfds_prepared import check_prepared

log = logging.getLogger(__name__)

BUILDER_NAME = "ref_coco_seg"
CONFIGS = {
    "refcoco_unc": ("refcoco", "unc"),
    "refcocoplus_unc": ("refcoco+", "unc"),
    "refcocog_umd": ("refcocog", "umd"),
    "refcocog_google": ("refcocog", "google"),
}
# big_vision configs merging several REFER sets: REFER numbers sentences per set, so sent_ids repeat there.
MERGED_BV_CONFIGS = ("refcocox_combined",)
# Beside a prepared set's dataset_info.json: {"splits": {tfds split: [COCO image id of each record]}}.
IMAGE_INDEX_FILE = "genmask_image_ids.json"
INDEX_SPOT_CHECKS = 8  # records compared with the index before trusting it (a re-prepared set reorders)
# One example per sentence, as the published RefCOCO/+/g splits count them. refcocog_google has no
# published count we rely on.
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
    # No EXIF transpose: REFER rasterises masks at instances.json's (height, width), COCO's stored pixel
    # layout, so the image must stay in that layout too for the mask to line up.
    with Image.open(io.BytesIO(data)) as im:
        return preprocess.pil_to_rgb(im)


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


def refer_files(refer_dir: str, config: str) -> tuple[str, str]:
    """(refs pickle, instances.json) of `config` in a REFER folder."""
    if config not in CONFIGS:
        raise ValueError(f"unknown RefCOCO config {config!r}; expected one of {sorted(CONFIGS)}")
    dataset, partition = CONFIGS[config]
    folder = os.path.join(refer_dir, dataset)
    return os.path.join(folder, f"refs({partition}).p"), os.path.join(folder, "instances.json")


def load_refer(refer_dir: str, config: str) -> tuple[list[dict], dict[int, dict], dict[int, dict]]:
    """(refs, image id -> instances.json image, annotation id -> annotation) of `config`."""
    refs_path, instances_path = refer_files(refer_dir, config)
    with open(refs_path, "rb") as f:
        refs = pickle.load(f)
    with open(instances_path) as f:
        instances = json.load(f)
    images = {im["id"]: im for im in instances["images"]}
    annotations = {a["id"]: a for a in instances["annotations"]}
    return refs, images, annotations


def coco_image_path(coco_images: str, file_name: str) -> str | None:
    """The file of a COCO image named as in instances.json (train2014's `COCO_train2014_<id>.jpg`), else
    under its train2017 name (`<id>.jpg`: the same pixels); None when neither exists. Another error of the
    lookup (EIO of a soft NFS mount) is raised, not taken for a missing file (`os.path.isfile` would)."""
    for name in (file_name, file_name.rsplit("_", 1)[-1]):
        path = os.path.join(coco_images, name)
        try:
            if stat.S_ISREG(os.stat(path).st_mode):
                return path
        except (FileNotFoundError, NotADirectoryError):
            pass
    return None


def read_coco_image(coco_images: str, image_info: dict) -> bytes:
    """The image's file bytes, after decoding it once: BadExample `missing_image`, `bad_image` (e.g. a
    truncated download) or `size_mismatch` (not instances.json's height x width, so no mask fits it)."""
    path = coco_image_path(coco_images, image_info["file_name"])
    if path is None:
        raise BadExample(
            "missing_image", f"{image_info['file_name']} (or its train2017 name) in {coco_images}"
        )
    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # every pixel: Image.verify() passes a truncated JPEG
            width, height = im.size
    except (OSError, SyntaxError, ValueError) as e:
        raise BadExample("bad_image", f"{path}: {e}") from e
    if (height, width) != (image_info["height"], image_info["width"]):
        raise BadExample(
            "size_mismatch",
            f"{path} is {width}x{height}, instances.json says {image_info['width']}x{image_info['height']}",
        )
    return data


def check_refer_inputs(
    refer_dir: str, coco_images: str, config: str, sample: int = 8
) -> tuple[list[dict], dict[int, dict]]:
    """Raises FileNotFoundError naming a missing input of `config`, before anything is written: a REFER
    file, or a COCO folder holding none of `sample` referenced images under either naming. Returns the
    refs and images it loaded (`load_refer`)."""
    for path in refer_files(refer_dir, config):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist: --refer-dir must hold REFER's {config} files")
    if not os.path.isdir(coco_images):
        raise FileNotFoundError(
            f"{coco_images} is not a folder: --coco-images must be COCO's train2014/ (or train2017/)"
        )
    refs, images, _ = load_refer(refer_dir, config)
    image_ids = sorted({ref["image_id"] for ref in refs} & set(images))
    checked = [images[i]["file_name"] for i in image_ids[:: max(1, len(image_ids) // sample)][:sample]]
    if checked and not any(coco_image_path(coco_images, name) for name in checked):
        raise FileNotFoundError(
            f"{coco_images} holds none of {len(checked)} images of {config} (e.g. {checked[0]} or "
            f"{checked[0].rsplit('_', 1)[-1]}): --coco-images must be COCO's train2014/ "
            "(COCO_train2014_<12-digit id>.jpg) or train2017/ (<12-digit id>.jpg)"
        )
    return refs, images


def prepared_bytes(refs: list[dict], images: dict[int, dict], coco_images: str) -> int:
    """About how many bytes a config of `refs` takes prepared: each expression's record holds its image's
    JPEG (images missing from `coco_images` count 0)."""
    image_ids = {ref["image_id"] for ref in refs} & set(images)
    paths = {i: coco_image_path(coco_images, images[i]["file_name"]) for i in image_ids}
    sizes = {i: os.path.getsize(path) for i, path in paths.items() if path is not None}
    return sum(len(ref["sentences"]) * sizes.get(ref["image_id"], 0) for ref in refs)


class RefCocoSeg(tfds.core.GeneratorBasedBuilder):
    """RefCOCO / RefCOCO+ / RefCOCOg, one example per expression, with masks; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One record per expression with the referred object's mask (PNG bytes)."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in CONFIGS]

    def __init__(self, *, refer_dir: str | None = None, coco_images: str | None = None, **kwargs):
        self.refer_dir, self.coco_images = refer_dir, coco_images
        super().__init__(**kwargs)
        # Counted in expressions (a skipped ref skips all its sentences), as the published counts are.
        self.skips = SkipLog(f"prepare/{self.builder_config.name}", unit="expressions")

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
        return load_refer(self.refer_dir, self.builder_config.name)

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
        # Refs sorted by image: each image is read and decoded once, and a bad one refused once per ref.
        cached_id, image_data, image_error = None, b"", None
        for ref in sorted(refs, key=lambda r: (r["image_id"], r["ref_id"])):
            example_id = f"{self.builder_config.name}/ref{ref['ref_id']}"
            try:
                image_info = images[ref["image_id"]]
                if cached_id != ref["image_id"]:
                    cached_id, image_data, image_error = ref["image_id"], b"", None
                    try:
                        image_data = read_coco_image(self.coco_images, image_info)
                    except BadExample as e:
                        image_error = e
                    except Exception as e:  # noqa: BLE001
                        if transient(e):  # an NFS hiccup must not become a permanent hole: rerun prepare
                            raise
                        image_error = BadExample(type(e).__name__, str(e))  # every ref of the image
                if image_error is not None:
                    raise BadExample(image_error.kind, str(image_error))
                annotation = annotations[ref["ann_id"]]
                mask = annotation_mask(annotation, image_info["height"], image_info["width"])
                if not mask.any():
                    raise BadExample("empty_mask", f"ann {ref['ann_id']} rasterises to nothing")
                mask_png = encode_png(mask)
            except Exception as e:  # noqa: BLE001  (one bad ref is a logged skip, never a failed preparation)
                if transient(e):
                    raise
                self.skips.add(example_id, skip_reason(e), count=len(ref.get("sentences") or ()))
                continue
            if not image_data:
                raise RuntimeError(f"{example_id}: image {ref['image_id']} read as empty bytes")
            for sentence in ref["sentences"]:
                yield (
                    int(sentence["sent_id"]),
                    {
                        "image": image_data,
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


def is_big_vision(name: str) -> bool:
    return name.split("/")[0].split(":")[0] == "ref_coco_bv"


def tfds_name_and_split(name: str, split: str) -> tuple[str, str]:
    """`name` (ours or `ref_coco_bv/<config>`) and our split (`val`, `testA[:10%]`) -> TFDS's name, split."""
    if is_big_vision(name):
        base, bracket, rest = split.partition("[")
        return name, {"val": "validation"}.get(base, base) + "_flat" + bracket + rest
    if name not in CONFIGS:
        raise ValueError(f"unknown RefCOCO config {name!r}; expected one of {sorted(CONFIGS)}")
    return f"{BUILDER_NAME}/{name}", split


def image_id_key(name: str) -> str:
    """The top-level int64 feature holding the COCO image id."""
    return "id" if is_big_vision(name) else "image_id"


def sent_id_key(name: str) -> str:
    """The int64 feature of a serialized record whose first value is the sentence id. TFDS stores
    big_vision's `objects/refs/id` (a sequence in a sequence) as a ragged tensor: its values flattened
    under `/ragged_flat_values`, the first the only ref of the only object of a `_flat` record."""
    return "objects/refs/id/ragged_flat_values" if is_big_vision(name) else "sent_id"


def prepare_command(tfds_name: str, data_dir: str | None) -> str:
    """What prepares `tfds_name` (ours: `ref_coco_seg/<config>`; big_vision's: `ref_coco_bv/<config>`)."""
    config = tfds_name.split("/")[-1].split(":")[0]
    if is_big_vision(tfds_name):
        return (
            "prepare it with big_vision's TFDS builder (big_vision/datasets/refcoco/refcoco.py) with "
            f"file_format=array_record, or use ours: data.refcoco.name={config} after `python -m "
            f"genmask_jax.data.prepare refcoco --refer-dir REFER --coco-images COCO/train2014 --out "
            f"{data_dir or 'DATA_DIR'} --configs {config}`"
        )
    return (
        f"run `python -m genmask_jax.data.prepare refcoco --refer-dir REFER --coco-images COCO/train2014 "
        f"--out {data_dir or 'DATA_DIR'} --configs {config}` (or set data.refcoco.data_dir to where it is)"
    )


def open_records(tfds_name: str, tfds_split: str | None, data_dir: str | None, raw: bool = False):
    """The split's TFDS data source, or with `tfds_split` None a dict of every prepared split's; `raw`
    gives each record's serialized bytes (nothing decoded)."""
    check_prepared(tfds_name, data_dir, prepare_command(tfds_name, data_dir), split=tfds_split)
    method = tfds.decode.DeserializeMethod
    try:
        return tfds.data_source(
            tfds_name,
            split=tfds_split,
            data_dir=data_dir or None,
            download=False,
            deserialize_method=method.RAW_BYTES if raw else method.DESERIALIZE_AND_DECODE,
        )
    except Exception as e:
        raise FileNotFoundError(
            f"cannot read the prepared {tfds_name!r} split {tfds_split!r} in {data_dir!r} "
            f"({type(e).__name__}: {e})"
        ) from e


def record_int(raw_record: bytes, key: str) -> int:
    """The first value of the int64 feature `key` of a serialized record; nothing else is decoded."""
    features = tf_example_pb2.Example.FromString(raw_record).features.feature
    if key not in features or not features[key].int64_list.value:
        raise KeyError(f"the record has no int64 feature {key!r}; its features: {sorted(features)}")
    return int(features[key].int64_list.value[0])


def scan_image_ids(raw_records, key: str, threads: int = 16, chunk: int = 2048) -> np.ndarray:
    """int64 `(N,)`: the image id of every record, in order; each record is read once (I/O bound)."""
    n = len(raw_records)

    def read(start: int) -> list[int]:
        return [record_int(raw_records[i], key) for i in range(start, min(start + chunk, n))]

    with ThreadPoolExecutor(threads) as pool:
        return np.fromiter(itertools.chain.from_iterable(pool.map(read, range(0, n, chunk))), np.int64, n)


def _indexed_splits(name: str, tfds_splits) -> list[str]:
    """The TFDS splits our reader can read: big_vision's per-image splits are left out."""
    return sorted(s for s in tfds_splits if not is_big_vision(name) or s.endswith("_flat"))


def write_image_index(name: str, data_dir: str | None, keep_current: bool = False) -> str:
    """Writes `IMAGE_INDEX_FILE` beside `name`'s prepared files (one pass over them); returns its path.
    Any splits will do: a REFER subset may have no train refs. `keep_current`: an index that every split's
    records agree with (`_indexed_image_ids`) is kept, nothing read but its spot checks."""
    tfds_name, _ = tfds_name_and_split(name, "train")
    records = open_records(tfds_name, None, data_dir, raw=True)
    if not records:
        raise FileNotFoundError(f"{tfds_name} in {data_dir!r} has no prepared split")
    path = epath.Path(next(iter(records.values())).dataset_info.data_dir) / IMAGE_INDEX_FILE
    key, indexed = image_id_key(name), _indexed_splits(name, records)
    if keep_current and all(_indexed_image_ids(records[s], str(s), key) is not None for s in indexed):
        log.info("%s: kept the image ids in %s", name, path)
        return os.fspath(path)
    splits = {str(split): scan_image_ids(records[split], key).tolist() for split in indexed}
    path.write_text(json.dumps({"splits": splits}))
    log.info("%s: wrote the image ids of %s to %s", name, {s: len(v) for s, v in splits.items()}, path)
    return os.fspath(path)


def _indexed_image_ids(raw_records, tfds_split: str, key: str) -> np.ndarray | None:
    """The split's ids from `IMAGE_INDEX_FILE`, or None when it is absent or disagrees with the records."""
    path = epath.Path(raw_records.dataset_info.data_dir) / IMAGE_INDEX_FILE
    if "[" in tfds_split or not path.exists():
        return None
    try:
        ids = np.asarray(json.loads(path.read_text())["splits"][tfds_split], np.int64)
    except (KeyError, ValueError) as e:
        log.warning("%s has no usable ids for %s (%s: %s)", path, tfds_split, type(e).__name__, e)
        return None
    checked = np.unique(np.linspace(0, len(ids) - 1, INDEX_SPOT_CHECKS).astype(int)) if len(ids) else []
    if len(ids) != len(raw_records) or any(record_int(raw_records[i], key) != ids[i] for i in checked):
        log.warning("%s disagrees with the records of %s (prepared again?); ignoring it", path, tfds_split)
        return None
    return ids


def split_image_ids(raw_records, tfds_split: str, key: str) -> np.ndarray:
    """int64 `(N,)` COCO image id of each record of the split: from the index, else by reading them."""
    ids = _indexed_image_ids(raw_records, tfds_split, key)
    if ids is None:
        start = time.perf_counter()
        ids = scan_image_ids(raw_records, key)
        log.warning(
            "read the image ids of %d records of %s in %.1f s; `python -m genmask_jax.data.prepare "
            "refcoco-index --data-dir DATA_DIR --names ...` stores them so that later runs do not",
            len(ids),
            tfds_split,
            time.perf_counter() - start,
        )
    return ids


def eval_image_ids(names: Sequence[str], train_split: str, data_dir: str | None) -> frozenset[int]:
    """COCO image ids of every split other than `train_split` of every set in `names`."""
    excluded: set[int] = set()
    for name in dict.fromkeys(names):
        tfds_name, train_tfds_split = tfds_name_and_split(name, train_split)
        info = open_records(tfds_name, train_tfds_split, data_dir, raw=True).dataset_info
        splits = [s for s in _indexed_splits(name, info.splits) if s != train_tfds_split.split("[")[0]]
        images: set[int] = set()
        for tfds_split in splits:
            raw = open_records(tfds_name, tfds_split, data_dir, raw=True)
            images.update(split_image_ids(raw, tfds_split, image_id_key(name)).tolist())
        log.info("%s: %d COCO images in its %s splits", name, len(images), ", ".join(splits))
        excluded |= images
    return frozenset(excluded)


class RefCocoSource:
    """A prepared RefCOCO-family split as a segmentation source (see `sources.py` for the protocol).

    With `exclude_image_ids`, records whose COCO image id is in it are left out (`eval_image_ids`).
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None = None,
        exclude_image_ids: frozenset[int] = frozenset(),
    ):
        base = name.split("/")[0].split(":")[0]
        if base == "ref_coco":
            raise ValueError(STOCK_REF_COCO_MESSAGE)
        self.name, self.split = name, split
        self.big_vision = is_big_vision(name)
        tfds_name, tfds_split = tfds_name_and_split(name, split)
        self.records = open_records(tfds_name, tfds_split, data_dir)
        if "mask" not in self._feature_keys():
            raise ValueError(f"{tfds_name!r} has no masks: {STOCK_REF_COCO_MESSAGE}")
        # The serialized records, opened on first use: `example_id` reads its ids there, decoding nothing.
        self._raw_location, self._raw = (tfds_name, tfds_split, data_dir), None
        config = name.split("/")[-1].split(":")[0]
        self.position_in_id = self.big_vision and config in MERGED_BV_CONFIGS
        # Positions in the TFDS split of the records read; ids use these, so excluding leaves them unchanged.
        self.positions = np.arange(len(self.records))
        self.num_excluded = 0
        if exclude_image_ids:
            image_ids = split_image_ids(self._raw_records(), tfds_split, image_id_key(name))
            excluded = np.isin(image_ids, np.fromiter(exclude_image_ids, np.int64, len(exclude_image_ids)))
            self.positions = np.flatnonzero(~excluded)
            self.num_excluded = int(excluded.sum())
            log.info(
                "%s %s: excluded %d of %d expressions whose COCO image is in a val/test split",
                name,
                split,
                self.num_excluded,
                len(image_ids),
            )

    def _feature_keys(self) -> set[str]:
        features = self.records.dataset_info.features
        keys = set(features.keys())
        if "objects" in keys:
            keys |= set(features["objects"].feature.keys() if hasattr(features["objects"], "feature") else [])
            keys |= {"mask"} if "mask" in str(features["objects"]) else set()
        return keys

    def __len__(self) -> int:
        return len(self.positions)

    def _raw_records(self):
        if self._raw is None:
            self._raw = open_records(*self._raw_location, raw=True)
        return self._raw

    def _id(self, sent_id: int, position: int) -> str:
        if self.position_in_id:  # the id keys the embedding cache, so it must be unique
            return f"{self.name}-{self.split}-{sent_id}-at{position}"
        return f"{self.name}-{self.split}-{sent_id}"

    def example_id(self, index: int) -> str:
        position = int(self.positions[index])
        try:
            sent_id = record_int(self._raw_records()[position], sent_id_key(self.name))
        except KeyError:  # serialized in a layout other than this TFDS's: read the decoded record
            return self[index]["id"]
        return self._id(sent_id, position)

    def __getitem__(self, index: int) -> dict:
        position = int(self.positions[index])
        record = self.records[position]
        if self.big_vision:
            objects = record["objects"]
            image = np.asarray(record["image"])
            mask = (np.asarray(objects["mask"])[0][..., 0] > 0).astype(np.uint8)
            sentence = np.asarray(objects["refs"]["sentence"]).reshape(-1)[0]
            sent_id = np.asarray(objects["refs"]["id"]).reshape(-1)[0]
        else:
            image, mask, sentence = (
                decode_image(record["image"]),
                decode_mask(record["mask"]),
                record["sentence"],
            )
            sent_id = record["sent_id"]
        text = sentence.decode() if isinstance(sentence, bytes) else str(sentence)
        return {"id": self._id(int(sent_id), position), "image": image, "mask": mask, "text": text}
