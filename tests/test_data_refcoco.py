"""Our RefCOCO TFDS builder on fake REFER files made here: prepared and read without TensorFlow,
one record per sentence, masks equal to pycocotools' rasterisation, counts check, skips."""

import json
import logging
import pickle
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from genmask_jax.data import prepare, refcoco
from genmask_jax.data.pipeline import default_data_config, make_eval_iterator
from genmask_jax.data.sources import make_source

SIZES = {1: (30, 40), 2: (32, 32), 3: (20, 20)}  # image id -> (height, width); image 3 is missing on disk


def _rle_annotation():
    m = np.zeros((30, 40), np.uint8, order="F")
    m[3:9, 25:38] = 1
    rle = mask_utils.encode(m)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


ANNOTATIONS = [
    {
        "id": 10,
        "image_id": 1,
        "category_id": 1,
        "bbox": [2, 2, 20, 20],
        "iscrowd": 0,
        "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12], [15.5, 15, 22, 15, 18, 22.5]],
    },  # two polygons
    {
        "id": 11,
        "image_id": 1,
        "category_id": 2,
        "bbox": [25, 3, 13, 6],
        "iscrowd": 0,
        "segmentation": _rle_annotation(),
    },
    {
        "id": 12,
        "image_id": 2,
        "category_id": 3,
        "bbox": [4, 4, 20, 10],
        "iscrowd": 0,
        "segmentation": [[4, 4, 24, 4, 24, 14, 4, 14]],
    },
    {
        "id": 13,
        "image_id": 3,
        "category_id": 1,
        "bbox": [1, 1, 5, 5],
        "iscrowd": 0,
        "segmentation": [[1, 1, 6, 1, 6, 6]],
    },
    {
        "id": 14,
        "image_id": 2,
        "category_id": 1,
        "bbox": [100, 100, 5, 5],
        "iscrowd": 0,
        "segmentation": [[100, 100, 110, 100, 110, 110]],
    },  # outside the image: empty mask
]


def _ref(ref_id, ann_id, image_id, split, sentences):
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "split": split,
        "category_id": 1,
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        "sentences": [
            {"sent_id": ref_id * 10 + k, "sent": s, "raw": s.upper(), "tokens": s.split()}
            for k, s in enumerate(sentences)
        ],
    }


REFS = [
    _ref(100, 10, 1, "train", ["left squares", "the two pieces"]),
    _ref(101, 11, 1, "train", ["top right box", "the bar", "upper right"]),
    _ref(102, 12, 2, "val", ["wide box", "middle thing"]),
    _ref(103, 13, 3, "val", ["missing image"]),
    _ref(104, 14, 2, "train", ["nothing there"]),
]


@pytest.fixture(scope="module")
def refer(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    (root / "refer" / "refcoco").mkdir(parents=True)
    (root / "train2014").mkdir()
    images = []
    for image_id, (h, w) in SIZES.items():
        name = f"COCO_train2014_{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        if image_id != 3:
            rng = np.random.default_rng(image_id)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "train2014" / name)
    instances = {"images": images, "annotations": ANNOTATIONS, "categories": [{"id": i} for i in (1, 2, 3)]}
    (root / "refer" / "refcoco" / "instances.json").write_text(json.dumps(instances))
    with open(root / "refer" / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(REFS, f)
    return root


@pytest.fixture(scope="module")
def prepared(refer, tmp_path_factory):
    out = tmp_path_factory.mktemp("tfds")
    result = prepare.prepare_refcoco(str(refer / "refer"), str(refer / "train2014"), str(out), "refcoco_unc")
    return out, result


def _pycocotools_mask(annotation, h, w):
    seg = annotation["segmentation"]
    rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg, list) else seg
    m = mask_utils.decode(rle)
    return (m.sum(axis=2) if m.ndim == 3 else m) > 0


def test_prepared_without_tensorflow_one_record_per_sentence(prepared, refer):
    import tensorflow_datasets as tfds

    out, result = prepared
    assert result["counts"] == {"train": 5, "val": 2}
    assert "missing_image: 1" in result["skips"] and "empty_mask: 1" in result["skips"]
    assert not result["ok"] and any(
        line.startswith("MISMATCH refcoco_unc val: 2") for line in result["report"]
    )
    records = tfds.data_source("ref_coco_seg/refcoco_unc", split="train", data_dir=str(out), download=False)
    by_sent = {int(r["sent_id"]): r for r in (records[i] for i in range(len(records)))}
    assert sorted(by_sent) == [1000, 1001, 1010, 1011, 1012]
    annotations = {a["id"]: a for a in ANNOTATIONS}
    for sent_id, r in by_sent.items():
        ref = next(x for x in REFS if x["ref_id"] == r["ref_id"])
        assert r["sentence"].decode() == ref["sentences"][sent_id % 10]["sent"]
        h, w = SIZES[int(r["image_id"])]
        expected = _pycocotools_mask(annotations[int(r["ann_id"])], h, w)
        np.testing.assert_array_equal(refcoco.decode_mask(r["mask"]) > 0, expected)
        image = refcoco.decode_image(r["image"])
        assert image.shape == (h, w, 3)
        assert r["image"] == (refer / "train2014" / r["file_name"].decode()).read_bytes()  # bytes as on disk
    assert "tensorflow" not in sys.modules


def test_source_and_eval_pipeline(prepared):
    out, _ = prepared
    source = refcoco.RefCocoSource("refcoco_unc", "val", data_dir=str(out))
    assert len(source) == 2
    example = source[0]
    assert example["image"].shape == (32, 32, 3) and example["mask"].sum() > 0
    assert example["id"].startswith("refcoco_unc-val-102")
    c = default_data_config()
    c.resolution, c.num_threads = (16, 16), 1
    c.seg_sources, c.refcoco.data_dir = "refcoco", str(out)
    ev = make_eval_iterator(c, "val", 4, process_index=0, process_count=1)
    ((batch, metas),) = list(ev.iter_with_meta())
    assert batch["valid"].tolist() == [True, True, False, False]
    assert {m["text"] for m in metas if m} == {"wide box", "middle thing"}
    assert "tensorflow" not in sys.modules


def test_stock_ref_coco_and_missing_data_messages(tmp_path):
    with pytest.raises(ValueError, match="no masks"):
        refcoco.RefCocoSource("ref_coco", "val")
    with pytest.raises(FileNotFoundError, match="genmask_jax.data.prepare refcoco"):
        refcoco.RefCocoSource("refcocog_umd", "val", data_dir=str(tmp_path))


def test_cli_reports_count_mismatch(refer, tmp_path, caplog):
    argv = [
        "refcoco",
        "--refer-dir",
        str(refer / "refer"),
        "--coco-images",
        str(refer / "train2014"),
        "--out",
        str(tmp_path),
        "--configs",
        "refcoco_unc",
    ]
    with caplog.at_level(logging.ERROR):
        assert prepare.main(argv) == 1
    assert "differ from the published" in caplog.text
    assert prepare.main(argv + ["--no-count-check"]) == 0


def test_published_counts_check_passes_on_equal_counts():
    lines = refcoco.check_published_counts("refcocog_umd", {"train": 80_512, "val": 4_896, "test": 9_602})
    assert all(line.startswith("OK") for line in lines)


def test_several_prepared_configs_train_as_one_source(prepared):
    out, _ = prepared
    c = default_data_config()
    c.refcoco.name, c.refcoco.data_dir = "refcoco_unc, refcoco_unc", str(out)
    union = make_source("refcoco", "val", c, "seg")
    assert len(union) == 2 * len(refcoco.RefCocoSource("refcoco_unc", "val", data_dir=str(out)))
