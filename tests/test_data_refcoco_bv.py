"""Reading big_vision's prepared `ref_coco_bv` (the `<split>_flat` splits) without TensorFlow.

The fake is written here by a builder with big_vision's feature structure (`objects` sequence with a
PNG `mask` Image and nested `refs`; one object with one ref per flat record), prepared to
array_record without TensorFlow, then read in a fresh process that has no such builder class, as a
user with only the prepared files would. Its `refcocox_combined` merges REFER sets, whose sentence
ids repeat across sets, as big_vision's does.
"""

import io
import json
import logging
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core.features import feature as feature_lib

IMAGES = {7: (24, 32), 8: (20, 20), 9: (16, 24), 10: (12, 12)}  # image id -> (height, width)
# (image id, ann id, sentence id, sentence, box rows, box cols): one flat record each.
FLAT = {
    "validation": [(7, 70, 700, "left block", (2, 10), (1, 9)), (8, 80, 800, "the bar", (5, 8), (0, 20))],
    "train": [(7, 71, 710, "right block", (4, 20), (20, 30)), (9, 90, 900, "small thing", (2, 8), (3, 20))],
}
# refcocox_combined: sentence 5 of one REFER set and sentence 5 of another are different sentences.
FLAT_COMBINED = {
    "validation": [(8, 80, 5, "the bar", (5, 8), (0, 20))],
    "train": [
        (7, 71, 5, "right block", (4, 20), (20, 30)),
        (9, 91, 5, "the small thing", (2, 8), (3, 20)),
        (10, 100, 6, "a dot", (1, 4), (1, 4)),
    ],
}


def _mask(image_id, rows, cols):
    h, w = IMAGES[image_id]
    m = np.zeros((h, w), bool)
    m[slice(*rows), slice(*cols)] = True
    return m


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class RefCocoBv(tfds.core.GeneratorBasedBuilder):
    """A fake with big_vision's `ref_coco_bv` structure; registered as `ref_coco_bv` in this process."""

    VERSION = tfds.core.Version("1.4.0")
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="refcoco_unc"),
        tfds.core.BuilderConfig(name="refcocox_combined"),
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls):
        return None

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Scalar(np.int32),
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "height": tfds.features.Scalar(np.int32),
                    "width": tfds.features.Scalar(np.int32),
                    "file_name": tfds.features.Text(),
                    "objects": tfds.features.Sequence(
                        {
                            "id": tfds.features.Scalar(np.int64),
                            "area": tfds.features.Scalar(np.float32),
                            "bbox": tfds.features.BBoxFeature(),
                            "mask": tfds.features.Image(encoding_format="png"),
                            "category": tfds.features.ClassLabel(names=["thing", "other"]),
                            "iscrowd": tfds.features.Scalar(np.bool_),
                            "refs": tfds.features.Sequence(
                                {"id": tfds.features.Scalar(np.int32), "sentence": tfds.features.Text()}
                            ),
                        }
                    ),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        flat = FLAT_COMBINED if self.builder_config.name == "refcocox_combined" else FLAT
        return {f"{split}_flat": self._generate_examples(rows) for split, rows in flat.items()}

    def _generate_examples(self, rows):
        for k, (image_id, ann_id, sent_id, sentence, box_rows, box_cols) in enumerate(rows):
            h, w = IMAGES[image_id]
            rng = np.random.default_rng(image_id)
            jpeg = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
            mask = _mask(image_id, box_rows, box_cols)
            bbox = tfds.features.BBox(box_rows[0] / h, box_cols[0] / w, box_rows[1] / h, box_cols[1] / w)
            yield (
                f"{image_id}_{ann_id}_{k}",
                {
                    "id": image_id,
                    "image": jpeg.getvalue(),
                    "height": h,
                    "width": w,
                    "file_name": f"{image_id:012d}.jpg",
                    "objects": [
                        {
                            "id": ann_id,
                            "area": float(mask.sum()),
                            "bbox": bbox,
                            "mask": _png(mask),
                            "category": "thing",
                            "iscrowd": False,
                            "refs": [{"id": sent_id, "sentence": sentence}],
                        }
                    ],
                },
            )


@pytest.fixture(scope="module")
def bv_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bv")
    # TFDS's writer reads the deprecated `TensorInfo.dtype` (a TensorFlow dtype) for nested sequences
    # (`objects/refs`); big_vision prepares with TensorFlow installed. Here, only to write the fake,
    # it gets the NumPy dtype, which is what the written proto holds either way.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(feature_lib.TensorInfo, "dtype", property(lambda self: self.np_dtype))
        for config in ("refcoco_unc", "refcocox_combined"):
            builder = RefCocoBv(config=config, data_dir=str(out), file_format="array_record")
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(beam_runner=None))
    assert "tensorflow" not in sys.modules
    return out


def test_reads_big_vision_flat_splits_in_a_fresh_process(bv_dir):
    # A new interpreter: no `RefCocoBv` class is registered there, only the prepared files exist.
    code = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        from genmask_jax.data.refcoco import RefCocoSource
        out = {{}}
        for split in ("val", "train"):
            source = RefCocoSource("ref_coco_bv/refcoco_unc", split, data_dir={str(bv_dir)!r})
            rows = []
            for i in range(len(source)):
                e = source[i]
                assert e["id"] == source.example_id(i)
                rows.append([e["id"], e["text"], list(e["image"].shape), np.argwhere(e["mask"]).tolist(),
                             str(e["mask"].dtype)])
            out[split] = sorted(rows)
        out["tensorflow"] = "tensorflow" in sys.modules
        print(json.dumps(out))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["tensorflow"] is False
    for split, tfds_split in (("val", "validation"), ("train", "train")):
        expected = sorted(
            [
                f"ref_coco_bv/refcoco_unc-{split}-{sent_id}",
                sentence,
                [*IMAGES[image_id], 3],
                np.argwhere(_mask(image_id, rows, cols)).tolist(),
                "uint8",
            ]
            for image_id, _, sent_id, sentence, rows, cols in FLAT[tfds_split]
        )
        assert got[split] == expected


def test_big_vision_missing_split_names_the_prepared_splits(bv_dir):
    from genmask_jax.data.refcoco import RefCocoSource

    with pytest.raises(ValueError, match="no split 'testA_flat'; its prepared splits are train_flat, valid"):
        RefCocoSource("ref_coco_bv/refcoco_unc", "testA", data_dir=str(bv_dir))


def _source(data_dir, names, exclude=False, split="train"):
    from genmask_jax.data.pipeline import default_data_config
    from genmask_jax.data.sources import make_source

    c = default_data_config()
    c.refcoco.name, c.refcoco.data_dir, c.refcoco.exclude_eval_images = names, str(data_dir), exclude
    return make_source("refcoco", split, c, "seg")


def test_ids_stay_unique_where_a_config_merges_refer_sets(bv_dir):
    # The ids key the embedding cache: a repeated one would give a sentence another sentence's context.
    for split, tfds_split in (("train", "train"), ("val", "validation")):
        source = _source(bv_dir, "ref_coco_bv/refcocox_combined", split=split)
        examples = [source[i] for i in range(len(source))]
        assert [e["id"] for e in examples] == [source.example_id(i) for i in range(len(source))]
        assert len({e["id"] for e in examples}) == len(FLAT_COMBINED[tfds_split])
        assert {(e["id"].split("-")[2], e["text"]) for e in examples} == {
            (str(sent_id), sentence) for _, _, sent_id, sentence, _, _ in FLAT_COMBINED[tfds_split]
        }


UNION = "ref_coco_bv/refcoco_unc,ref_coco_bv/refcocox_combined"


def _kept(source):
    return sorted((e["text"], e["image"].shape[:2]) for e in (source[i] for i in range(len(source))))


def test_exclude_eval_images_reads_no_image(bv_dir, tmp_path, monkeypatch, caplog):
    from genmask_jax.data import prepare, refcoco

    data_dir = tmp_path / "bv"
    shutil.copytree(bv_dir, data_dir)
    assert len(_source(data_dir, UNION)) == 2 + 3
    # validation images: 7 and 8; train keeps images 9 (both sets) and 10
    expected = [("a dot", (12, 12)), ("small thing", (16, 24)), ("the small thing", (16, 24))]
    assert _kept(_source(data_dir, UNION, exclude=True)) == expected

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image or mask was decoded")

    for method in ("decode_example_np", "decode_batch_example_np"):
        monkeypatch.setattr(tfds.features.Image, method, no_decoding)
    with caplog.at_level(logging.WARNING):
        _source(data_dir, UNION, exclude=True)
    assert "read the image ids of 2 records of train_flat" in caplog.text  # no index yet: records read
    # with the index written by `prepare refcoco-index`, not even that
    assert prepare.main(["refcoco-index", "--data-dir", str(data_dir), "--names", UNION]) == 0
    monkeypatch.setattr(refcoco, "scan_image_ids", no_decoding)
    indexed = _source(data_dir, UNION, exclude=True)
    monkeypatch.undo()
    assert _kept(indexed) == expected


def test_example_id_is_the_example_s_id_read_without_decoding(bv_dir, monkeypatch):
    # An evaluation resume asks the id of every finished example: it must not decode ~10k images.
    from genmask_jax.data.refcoco import RefCocoSource, eval_image_ids

    excluded = eval_image_ids(UNION.split(","), "train", str(bv_dir))
    sources = [
        RefCocoSource(name, split, data_dir=str(bv_dir), exclude_image_ids=exclude)
        for name in UNION.split(",")
        for split in ("train", "val")
        for exclude in (frozenset(), excluded)
    ]
    assert sum(s.num_excluded for s in sources if s.split == "train") == 1 + 1  # image 7 in both sets
    ids = [[s[i]["id"] for i in range(len(s))] for s in sources]
    # the merged config's ids carry the record's position (sentence ids repeat across its REFER sets)
    assert {(s.name, "-at" in i) for s, split_ids in zip(sources, ids) for i in split_ids} == {
        ("ref_coco_bv/refcoco_unc", False),
        ("ref_coco_bv/refcocox_combined", True),
    }

    def decoded(*args, **kwargs):
        raise AssertionError("a record was deserialized or decoded")

    monkeypatch.setattr(tfds.features.FeaturesDict, "deserialize_example_np", decoded)
    for method in ("decode_example_np", "decode_batch_example_np"):
        monkeypatch.setattr(tfds.features.Image, method, decoded)
    assert [[s.example_id(i) for i in range(len(s))] for s in sources] == ids
