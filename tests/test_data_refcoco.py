"""Our RefCOCO TFDS builder on fake REFER files made here: prepared and read without TensorFlow,
one record per sentence, masks equal to pycocotools' rasterisation, counts check, skips, and training on
a union with the val/test images of every listed set left out (`exclude_eval_images`)."""

import errno
import io
import json
import logging
import os
import pickle
import shutil
import sys
import types

import numpy as np
import pytest
from array_record.python.array_record_data_source import ArrayRecordDataSource as ArrayDataSource
from PIL import Image
from pycocotools import mask as mask_utils

from genmask_jax.data import prepare, refcoco
from genmask_jax.data.pipeline import default_data_config, make_eval_iterator
from genmask_jax.data.sources import make_source

# image id -> (height, width); image 3 is missing on disk
SIZES = {1: (30, 40), 2: (32, 32), 3: (20, 20), 4: (24, 24), 5: (16, 16)}


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
    {
        "id": 15,
        "image_id": 4,
        "category_id": 1,
        "bbox": [2, 2, 10, 10],
        "iscrowd": 0,
        "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]],
    },
    {
        "id": 16,
        "image_id": 5,
        "category_id": 2,
        "bbox": [1, 1, 8, 8],
        "iscrowd": 0,
        "segmentation": [[1, 1, 9, 1, 9, 9, 1, 9]],
    },
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
    _ref(105, 15, 4, "train", ["square"]),
]
# The UMD partition, drawn independently over the same COCO images: image 1 is refcoco_unc train and
# refcocog_umd test, image 2 refcoco_unc val and refcocog_umd train, and image 5 is in refcocog_umd's own
# val and train (so one set alone can overlap itself too). Image 4 is train in both.
REFCOCOG_REFS = [
    _ref(200, 12, 2, "train", ["the wide box"]),
    _ref(201, 15, 4, "train", ["small square", "a square"]),
    _ref(202, 16, 5, "val", ["tiny"]),
    _ref(203, 11, 1, "test", ["the bar on top"]),
    _ref(204, 16, 5, "train", ["the tiny one"]),
]


@pytest.fixture(scope="module")
def refer(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    (root / "train2014").mkdir()
    images = []
    for image_id, (h, w) in SIZES.items():
        name = f"COCO_train2014_{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        if image_id != 3:
            rng = np.random.default_rng(image_id)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "train2014" / name)
    instances = {"images": images, "annotations": ANNOTATIONS, "categories": [{"id": i} for i in (1, 2, 3)]}
    for folder, partition, refs in (("refcoco", "unc", REFS), ("refcocog", "umd", REFCOCOG_REFS)):
        (root / "refer" / folder).mkdir(parents=True)
        (root / "refer" / folder / "instances.json").write_text(json.dumps(instances))
        with open(root / "refer" / folder / f"refs({partition}).p", "wb") as f:
            pickle.dump(refs, f)
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
    assert result["counts"] == {"train": 6, "val": 2}
    assert "missing_image: 1" in result["skips"] and "empty_mask: 1" in result["skips"]
    assert not result["ok"] and any(
        line.startswith("MISMATCH refcoco_unc val: 2") for line in result["report"]
    )
    records = tfds.data_source("ref_coco_seg/refcoco_unc", split="train", data_dir=str(out), download=False)
    by_sent = {int(r["sent_id"]): r for r in (records[i] for i in range(len(records)))}
    assert sorted(by_sent) == [1000, 1001, 1010, 1011, 1012, 1050]
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


def test_coco_images_keep_their_stored_layout():
    # REFER masks are rasterised at instances.json's (height, width), the stored layout, so an EXIF
    # Orientation tag must not rotate the image (unlike ReasonSeg and user photos).
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((20, 42, 3), np.uint8)).save(buffer, format="JPEG", exif=exif.tobytes())
    assert refcoco.decode_image(buffer.getvalue()).shape == (20, 42, 3)


def test_stock_ref_coco_and_missing_data_messages(tmp_path):
    with pytest.raises(ValueError, match="no masks"):
        refcoco.RefCocoSource("ref_coco", "val")
    with pytest.raises(FileNotFoundError, match="genmask_jax.data.prepare refcoco"):
        refcoco.RefCocoSource("refcocog_umd", "val", data_dir=str(tmp_path))


def test_a_set_that_is_not_prepared_names_the_prepare_command(tmp_path):
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError) as info:
        refcoco.RefCocoSource("refcoco_unc", "train", data_dir=data_dir)
    message = str(info.value)
    assert message.startswith(f"no prepared ref_coco_seg/refcoco_unc in {data_dir}"), message
    assert "genmask_jax.data.prepare refcoco --refer-dir" in message and "--configs refcoco_unc" in message
    with pytest.raises(FileNotFoundError) as info:  # TFDS would list every data set it knows
        refcoco.RefCocoSource("ref_coco_bv/refcoco_unc", "val", data_dir=data_dir)
    assert str(info.value).startswith(f"no prepared ref_coco_bv/refcoco_unc in {data_dir}")
    assert len(str(info.value).replace(data_dir, "")) < 400  # the temporary path's length is pytest's
    version = tmp_path / "tfds" / "ref_coco_seg" / "refcoco_unc" / "1.0.0"
    version.mkdir(parents=True)  # prepared in TFDS's default format, which tfds.data_source cannot read
    (version / "dataset_info.json").write_text(json.dumps({"name": "ref_coco_seg", "version": "1.0.0"}))
    with pytest.raises(FileNotFoundError, match="prepared as tfrecord; random access needs array_record"):
        refcoco.RefCocoSource("refcoco_unc", "train", data_dir=data_dir)


def test_a_set_converted_by_tfds_convert_format_counts_as_prepared(tmp_path):
    """`tfds convert_format --out_file_format=array_record` keeps tfrecord as the main format and lists
    the copy under alternativeFileFormats, which tfds.data_source reads: not refused."""
    from genmask_jax.data.tfds_prepared import check_prepared

    version = tmp_path / "ref_coco_bv" / "refcoco_unc" / "1.4.0"
    version.mkdir(parents=True)
    info = {"name": "ref_coco_bv", "version": "1.4.0", "alternativeFileFormats": ["array_record"]}
    (version / "dataset_info.json").write_text(json.dumps(info))
    check_prepared("ref_coco_bv/refcoco_unc", str(tmp_path), "prepare it")
    check_prepared("ref_coco_bv/refcoco_unc:1.4.0", str(tmp_path), "prepare it")


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


@pytest.fixture(scope="module")
def union_dir(prepared, refer):
    out, _ = prepared
    result = prepare.prepare_refcoco(str(refer / "refer"), str(refer / "train2014"), str(out), "refcocog_umd")
    assert result["counts"] == {"train": 4, "val": 1, "test": 1}
    return out


def _train_source(data_dir, names, exclude, split="train"):
    c = default_data_config()
    c.refcoco.name, c.refcoco.data_dir, c.refcoco.exclude_eval_images = names, str(data_dir), exclude
    return make_source("refcoco", split, c, "seg")


def _ids(source):
    return {source.example_id(i) for i in range(len(source))}


UNION = "refcoco_unc,refcocog_umd"
# Val/test images: refcoco_unc val {2}, refcocog_umd val {5} and test {1}.
UNION_KEPT = {"refcoco_unc-train-1050", "refcocog_umd-train-2010", "refcocog_umd-train-2011"}


def test_prepare_writes_the_image_index(union_dir):
    import tensorflow_datasets as tfds

    path = union_dir / "ref_coco_seg" / "refcocog_umd" / "1.0.0" / refcoco.IMAGE_INDEX_FILE
    index = json.loads(path.read_text())["splits"]
    assert sorted(index) == ["test", "train", "val"]
    for split, ids in index.items():
        records = tfds.data_source("ref_coco_seg/refcocog_umd", split=split, data_dir=str(union_dir))
        assert ids == [int(records[i]["image_id"]) for i in range(len(records))]


def test_a_set_without_train_refs_is_prepared_with_its_image_index(refer, tmp_path):
    """A REFER val/test subset: the index is written from the splits there are, not from "train"."""
    root = _refer_copy(refer, tmp_path)
    refs = [_ref(102, 12, 2, "val", ["wide box", "middle thing"]), _ref(105, 15, 4, "testA", ["square"])]
    with open(root / "refer" / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    out = tmp_path / "tfds"
    result = prepare.prepare_refcoco(str(root / "refer"), str(root / "train2014"), str(out), "refcoco_unc")
    assert result["counts"] == {"val": 2, "testA": 1}
    index = json.loads(
        (out / "ref_coco_seg" / "refcoco_unc" / "1.0.0" / refcoco.IMAGE_INDEX_FILE).read_text()
    )
    assert index["splits"] == {"testA": [4], "val": [2, 2]}


def test_exclude_eval_images_on_a_union_and_on_one_set(union_dir, monkeypatch, caplog):
    assert len(_train_source(union_dir, UNION, False)) == 6 + 4  # LISA's plain union
    with caplog.at_level(logging.INFO):
        union = _train_source(union_dir, UNION, True)
    assert _ids(union) == UNION_KEPT
    assert "7 train expressions of refcoco_unc,refcocog_umd left out, 3 kept (3 val/test COCO images)" in (
        caplog.text
    )
    # the prepared index is used: no record is read for its image id, and no image or mask is decoded
    for reader in ("scan_image_ids", "decode_image", "decode_mask"):
        monkeypatch.setattr(refcoco, reader, lambda *a, **k: pytest.fail("records were read"))
    assert _ids(_train_source(union_dir, UNION, True)) == UNION_KEPT
    # one set alone: refcocog_umd's image 5 is both val and train there
    assert _ids(_train_source(union_dir, "refcocog_umd", True)) == {
        "refcocog_umd-train-2000",
        "refcocog_umd-train-2010",
        "refcocog_umd-train-2011",
    }
    # the evaluation splits are read whole
    assert len(_train_source(union_dir, UNION, True, split="val")) == 2 + 1
    monkeypatch.undo()
    examples = [union[i] for i in range(len(union))]
    assert {e["id"] for e in examples} == UNION_KEPT and all(e["mask"].any() for e in examples)


def test_exclude_eval_images_without_or_with_a_stale_index(union_dir, tmp_path, caplog):
    data_dir = tmp_path / "tfds"
    shutil.copytree(union_dir, data_dir)
    for path in data_dir.glob(f"ref_coco_seg/*/1.0.0/{refcoco.IMAGE_INDEX_FILE}"):
        path.unlink()
    with caplog.at_level(logging.WARNING):
        assert _ids(_train_source(data_dir, UNION, True)) == UNION_KEPT
    assert "read the image ids of 6 records of train" in caplog.text
    # an index that no longer matches the records (e.g. the set was prepared again) is not trusted
    index = data_dir / "ref_coco_seg" / "refcoco_unc" / "1.0.0" / refcoco.IMAGE_INDEX_FILE
    index.write_text(json.dumps({"splits": {"train": [4] * 6, "val": [7, 7]}}))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _ids(_train_source(data_dir, UNION, True)) == UNION_KEPT
    assert "disagrees with the records of train" in caplog.text


def _no_decoding(monkeypatch):
    """Makes reading a decoded record (or decoding an image or mask) fail the test."""
    import tensorflow_datasets as tfds

    def decoded(*args, **kwargs):
        pytest.fail("a record was deserialized or decoded")

    monkeypatch.setattr(tfds.features.FeaturesDict, "deserialize_example_np", decoded)
    for decoder in ("decode_image", "decode_mask"):
        monkeypatch.setattr(refcoco, decoder, decoded)


def test_example_id_is_the_example_s_id_read_without_decoding(union_dir, monkeypatch):
    # An evaluation resume asks the id of every finished example: it must not decode ~10k images.
    excluded = refcoco.eval_image_ids(UNION.split(","), "train", str(union_dir))
    sources = [
        refcoco.RefCocoSource(name, split, data_dir=str(union_dir), exclude_image_ids=exclude)
        for name in UNION.split(",")
        for split in ("train", "val")
        for exclude in (frozenset(), excluded)
    ]
    assert sum(s.num_excluded for s in sources if s.split == "train") == 7
    ids = [[s[i]["id"] for i in range(len(s))] for s in sources]
    _no_decoding(monkeypatch)
    assert [[s.example_id(i) for i in range(len(s))] for s in sources] == ids
    copy = pickle.loads(pickle.dumps(sources[1]))  # its serialized records already open
    assert [copy.example_id(i) for i in range(len(copy))] == ids[1]


def test_example_id_of_a_record_serialized_otherwise_is_read_decoded(union_dir, monkeypatch):
    """A layout without the expected int64 feature costs a decode, not the id."""
    source = refcoco.RefCocoSource("refcoco_unc", "val", data_dir=str(union_dir))
    monkeypatch.setattr(refcoco, "sent_id_key", lambda name: "no/such/feature")
    assert [source.example_id(i) for i in range(len(source))] == [source[i]["id"] for i in range(len(source))]


@pytest.mark.parametrize(
    "args,message",
    [
        (["refcoco", "--refer-dir", "{tmp}/none", "--coco-images", "{tmp}/none", "--out", "{tmp}/out",
          "--configs", "refcoco_unc"], "refs(unc).p"),
        (["refcoco-index", "--data-dir", "{tmp}/none", "--names", "refcoco_unc"], "no prepared ref_coco"),
    ],
)
def test_prepare_bad_input_is_one_line(tmp_path, capsys, args, message):
    from genmask_jax.data import prepare

    with pytest.raises(SystemExit) as exit_info:
        prepare.main([a.format(tmp=tmp_path) for a in args])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m genmask_jax.data.prepare: error: ")
    assert message in err[0]
    assert not list(tmp_path.iterdir())  # the inputs are checked before TFDS makes its folders


def _write_image_3(root):
    """Writes the image the fixture lacks."""
    pixels = np.random.default_rng(3).integers(0, 255, (*SIZES[3], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "train2014" / "COCO_train2014_000000000003.jpg")


def _refer_copy(refer, tmp_path):
    """A copy of the REFER fixture to change."""
    root = tmp_path / "refer_copy"
    shutil.copytree(refer, root)
    return root


def _prepare_cli(root, out, *extra):
    argv = ["refcoco", "--refer-dir", str(root / "refer"), "--coco-images", str(root / "train2014")]
    return prepare.main([*argv, "--out", str(out), "--configs", "refcoco_unc", "--no-count-check", *extra])


def test_rerun_reuses_the_preparation_and_reports_its_skips_and_overwrite_prepares_again(
    refer, tmp_path, caplog
):
    root, out = _refer_copy(refer, tmp_path), tmp_path / "tfds"
    first = prepare.prepare_refcoco(str(root / "refer"), str(root / "train2014"), str(out), "refcoco_unc")
    assert first["counts"] == {"train": 6, "val": 2} and "missing_image: 1" in first["skips"]
    _write_image_3(root)  # the user restores the missing image and prepares again
    with caplog.at_level(logging.WARNING):
        again = prepare.prepare_refcoco(str(root / "refer"), str(root / "train2014"), str(out), "refcoco_unc")
    assert again["reused"] and again["counts"] == first["counts"]
    assert again["skips"].startswith(first["skips"] + " when prepared; reused ")  # not "no examples skipped"
    assert "--overwrite" in again["skips"] and "refcoco_unc is already prepared in" in caplog.text
    assert _prepare_cli(root, out, "--overwrite") == 0
    assert len(refcoco.RefCocoSource("refcoco_unc", "val", data_dir=str(out))) == 3
    stored = out / "ref_coco_seg" / "refcoco_unc" / "1.0.0" / prepare.PREPARE_REPORT_FILE
    assert json.loads(stored.read_text())["skip_counts"] == {"empty_mask": 1}


def test_a_reused_preparation_keeps_its_image_index_unless_it_disagrees(refer, tmp_path, monkeypatch):
    """Reusing a prepared config read every record (each holds its JPEG: about 75 GB for all four) to write
    the index it already had."""
    root, out = _refer_copy(refer, tmp_path), tmp_path / "tfds"
    first = prepare.prepare_refcoco(str(root / "refer"), str(root / "train2014"), str(out), "refcoco_unc")
    index = json.loads(open(first["index"]).read())
    scan, scanned = refcoco.scan_image_ids, []

    def counted_scan(records, key):
        scanned.append(key)
        return scan(records, key)

    monkeypatch.setattr(refcoco, "scan_image_ids", counted_scan)
    again = prepare.prepare_refcoco(str(root / "refer"), str(root / "train2014"), str(out), "refcoco_unc")
    assert again["reused"] and again["index"] == first["index"] and not scanned
    with open(first["index"], "w") as f:  # an index of another preparation is written again
        json.dump({"splits": {"train": [4] * 6, "val": [7, 7]}}, f)
    prepare.prepare_refcoco(str(root / "refer"), str(root / "train2014"), str(out), "refcoco_unc")
    assert scanned and json.loads(open(first["index"]).read()) == index


def test_prepare_refuses_an_out_without_room_for_the_prepared_sets(refer, tmp_path, monkeypatch, capsys):
    """Each expression's record holds its image's JPEG (all four configs: about 75 GB against 13 GB of
    train2014/): an --out without room filled up hours in. The estimate is checked before anything is
    written, and is close to what a preparation takes."""
    root, out = _refer_copy(refer, tmp_path), tmp_path / "tfds"
    _write_image_3(root)
    refs, images = refcoco.check_refer_inputs(str(root / "refer"), str(root / "train2014"), "refcoco_unc")
    estimate = refcoco.prepared_bytes(refs, images, str(root / "train2014"))
    usage = shutil.disk_usage(tmp_path)

    def free(space):  # as prepare sees it (TFDS checks with the real figure)
        disk = types.SimpleNamespace(disk_usage=lambda path: usage._replace(free=space))
        monkeypatch.setattr(prepare, "shutil", disk)

    free(estimate - 1)
    with pytest.raises(SystemExit) as exit_info:
        _prepare_cli(root, out)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and "GB free" in err[0] and "--configs" in err[0]
    assert not out.exists()

    free(estimate)
    assert _prepare_cli(root, out) == 0
    records = ArrayDataSource([str(f) for f in sorted(out.rglob("*.array_record-*"))])
    written = sum(len(records[i]) for i in range(len(records)))  # files are padded to 64 KiB blocks
    # The JPEGs are most of it (masks and text the rest); one expression (ref 103) has an empty mask.
    assert 0.8 * written < estimate < 1.2 * written
    free(0)
    assert _prepare_cli(root, out) == 0  # already prepared: reused, nothing more to write
    # --overwrite: TFDS deletes the earlier preparation first, so its space counts as free
    assert _prepare_cli(root, out, "--overwrite") == 0


def test_truncated_or_resized_images_are_refused_at_preparation(refer, tmp_path):
    root = _refer_copy(refer, tmp_path)
    _write_image_3(root)
    # Image 2 (val ref 102, and ref 104) made 320x320, large enough that Image.verify() passes it truncated.
    instances_path = root / "refer" / "refcoco" / "instances.json"
    instances = json.loads(instances_path.read_text())
    next(im for im in instances["images"] if im["id"] == 2).update(height=320, width=320)
    instances_path.write_text(json.dumps(instances))
    truncated = root / "train2014" / "COCO_train2014_000000000002.jpg"
    pixels = np.random.default_rng(2).integers(0, 255, (320, 320, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    resized = root / "train2014" / "COCO_train2014_000000000004.jpg"  # train ref 105: 24x24 in instances.json
    Image.open(resized).resize((12, 12)).save(resized)
    out = tmp_path / "tfds"
    result = prepare.prepare_refcoco(str(root / "refer"), str(root / "train2014"), str(out), "refcoco_unc")
    assert result["counts"] == {"train": 5, "val": 1}
    assert "bad_image: 3" in result["skips"] and "size_mismatch: 1" in result["skips"]  # expressions
    source = refcoco.RefCocoSource("refcoco_unc", "val", data_dir=str(out))
    assert source[0]["image"].shape == (20, 20, 3)  # every prepared image reads back whole


def _open_failing_once(monkeypatch, name, error):
    """Makes the first `open` of COCO image `name` in refcoco raise `error`."""
    failed = []

    def flaky_open(path, *args, **kwargs):
        if str(path).endswith(name) and not failed:
            failed.append(path)
            raise error
        return open(path, *args, **kwargs)

    monkeypatch.setattr(refcoco, "open", flaky_open, raising=False)
    return failed


def test_an_image_unreadable_on_its_first_ref_skips_every_ref_of_it_counted_in_expressions(
    refer, tmp_path, monkeypatch
):
    """Image 1 shows refs 100 (2 sentences) and 101 (3): a permission error on its first read was one
    skip, and ref 101's 3 records were written with an empty image. It is the image's error: all 5
    expressions are skipped, and published - prepared = skipped."""
    root, out = _refer_copy(refer, tmp_path), tmp_path / "tfds"
    denied = PermissionError(errno.EACCES, "Permission denied")
    failed = _open_failing_once(monkeypatch, "000000000001.jpg", denied)
    result = prepare.prepare_refcoco(str(root / "refer"), str(root / "train2014"), str(out), "refcoco_unc")
    assert failed and result["counts"] == {"train": 1, "val": 2}
    assert result["skips"] == (
        "prepare/refcoco_unc: 7 expressions skipped (PermissionError: 5, empty_mask: 1, missing_image: 1)"
    )
    assert sum(result["counts"].values()) + 7 == sum(len(ref["sentences"]) for ref in REFS)
    for split in ("train", "val"):
        source = refcoco.RefCocoSource("refcoco_unc", split, data_dir=str(out))
        assert all(record["image"] for record in source.records)  # no record without its image


def _stat_failing_once(monkeypatch, name, error):
    """Makes the first `os.stat` of COCO image `name` raise `error` (the lookup: a soft NFS mount's EIO)."""
    failed, real = [], os.stat

    def flaky_stat(path, *args, **kwargs):
        if str(path).endswith(name) and not failed:
            failed.append(path)
            raise error
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", flaky_stat)
    return failed


@pytest.mark.parametrize("failing", ["open", "stat"])
def test_a_transient_read_error_stops_the_preparation_instead_of_skipping(
    refer, tmp_path, monkeypatch, capsys, failing
):
    """An EIO (an NFS hiccup) would make a lasting hole in the prepared set: it stops the preparation,
    in one line, and nothing is kept, so running it again prepares everything. The lookup's EIO
    (`os.path.isfile` said "no such file") too."""
    root, out = _refer_copy(refer, tmp_path), tmp_path / "tfds"
    eio = OSError(errno.EIO, "Input/output error")
    {"open": _open_failing_once, "stat": _stat_failing_once}[failing](monkeypatch, "000000000001.jpg", eio)
    with pytest.raises(SystemExit) as exit_info:
        _prepare_cli(root, out)
    err = capsys.readouterr().err  # TFDS's progress bars, then the error
    assert exit_info.value.code == 1 and "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("python -m genmask_jax.data.prepare: error: [Errno 5] Input/output error")
    assert last.endswith("run the command again)")
    assert not prepare._prepared_path(str(out), "refcoco_unc").exists()
    again = prepare.prepare_refcoco(str(root / "refer"), str(root / "train2014"), str(out), "refcoco_unc")
    assert not again["reused"] and again["counts"] == {"train": 6, "val": 2}


def test_a_coco_train2017_folder_is_read_under_its_names(refer, tmp_path):
    root = _refer_copy(refer, tmp_path)
    for path in (root / "train2014").iterdir():  # COCO_train2014_000000000001.jpg -> 000000000001.jpg
        path.rename(path.with_name(path.name.rsplit("_", 1)[-1]))
    out = tmp_path / "tfds"
    result = prepare.prepare_refcoco(str(root / "refer"), str(root / "train2014"), str(out), "refcoco_unc")
    assert result["counts"] == {"train": 6, "val": 2} and "missing_image: 1" in result["skips"]


def test_a_coco_folder_without_the_referenced_images_or_a_split_left_empty_is_one_line(
    refer, tmp_path, capsys
):
    root = _refer_copy(refer, tmp_path)
    for path in (root / "train2014").iterdir():
        path.unlink()
    (root / "train2014" / "unrelated.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        _prepare_cli(root, tmp_path / "tfds")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1, err
    assert "holds none of 4 images of refcoco_unc" in err[0]
    assert "train2014/ (COCO_train2014_<12-digit id>.jpg) or train2017/ (<12-digit id>.jpg)" in err[0]
    assert not (tmp_path / "tfds").exists()
    # only train images: every val ref is skipped, and TFDS's "No examples were yielded" gets the skips
    root = _refer_copy(refer, tmp_path / "train_only")
    (root / "train2014" / "COCO_train2014_000000000002.jpg").unlink()
    with pytest.raises(SystemExit) as exit_info:
        _prepare_cli(root, tmp_path / "tfds2")
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after TFDS's progress bars: no traceback
    assert exit_info.value.code == 1 and err.startswith("python -m genmask_jax.data.prepare: error: ")
    assert 'split "val": No examples were yielded' in err
    assert "4 expressions skipped (missing_image: 4)" in err  # refs 102 (2 sentences), 103 and 104


def test_a_prepared_set_asked_for_a_split_it_lacks_names_its_splits(prepared):
    from genmask_jax.data.sources import DataConfigError
    from genmask_jax.infer.cli import USER_ERRORS

    out, _ = prepared
    assert issubclass(DataConfigError, USER_ERRORS)  # evaluate and precompute end in one line, no traceback
    for split in ("test", "validation", "testA[:10%]"):
        with pytest.raises(DataConfigError) as info:
            refcoco.RefCocoSource("refcoco_unc", split, data_dir=str(out))
        message = str(info.value)
        assert message.endswith("its prepared splits are train, val") and "prepare refcoco" not in message
    assert len(refcoco.RefCocoSource("refcoco_unc", "val[:1]", data_dir=str(out))) == 1


def test_refcocog_google_val_is_an_evaluation_split():
    from genmask_jax.data import splits

    (spec,) = splits.parse_splits("refcocog_google:val")
    c = splits.split_data_config(default_data_config(), spec)
    assert c.seg_sources == "refcoco" and c.refcoco.name == "refcocog_google"
    with pytest.raises(splits.SplitError, match="refcocog_google has splits val"):
        splits.parse_splits("refcocog_google:test")  # Google's split has train and val only
