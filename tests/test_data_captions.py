"""Caption pairs for generation: folder, JSONL and a locally prepared TFDS set, all made here."""

import io
import json
import logging
import sys

import numpy as np
import pytest
from PIL import Image

from genmask_jax.data.captions import CaptionFiles, TfdsCaptions
from genmask_jax.data.pipeline import default_data_config, make_train_iterator
from genmask_jax.data.skips import BadExample


def _jpeg(path, value, size=(20, 12)):
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "pairs"
    (root / "sub").mkdir(parents=True)
    _jpeg(root / "a.jpg", 10)
    (root / "a.txt").write_text("a dark picture\n")
    _jpeg(root / "sub" / "b.png", 200)
    (root / "sub" / "b.txt").write_text("a bright picture")
    _jpeg(root / "lonely.jpg", 50)  # no caption
    return root


def test_folder_pairs(folder, caplog):
    with caplog.at_level(logging.WARNING):
        pairs = CaptionFiles(str(folder))
    assert len(pairs) == 2 and "lonely.jpg" in caplog.text
    first = pairs[0]
    assert first["text"] == "a dark picture" and first["image"].shape == (12, 20, 3)
    assert first["id"] == "caption-pairs/a.jpg"


def test_jsonl_pairs(folder, caplog):
    jsonl = folder / "pairs.jsonl"
    lines = [
        json.dumps({"image": "a.jpg", "caption": "first"}),
        "{not json",
        json.dumps({"file_name": "sub/b.png", "text": ["second", "other"]}),
    ]
    jsonl.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        pairs = CaptionFiles(str(jsonl))
    assert [pairs[i]["text"] for i in range(len(pairs))] == ["first", "second"]
    assert "pairs.jsonl:2" in caplog.text


def test_jsonl_with_several_captions_per_image_gives_every_pair_its_own_id(folder):
    # COCO captions: five lines per image. The ids key the embedding cache, so they must differ.
    jsonl = folder / "coco.jsonl"
    lines = [("a.jpg", "one"), ("sub/b.png", "two"), ("a.jpg", "three"), ("./a.jpg", "four")]
    jsonl.write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in lines))
    pairs = CaptionFiles(str(jsonl))
    ids = [pairs.example_id(i) for i in range(len(pairs))]
    assert ids == ["caption-a.jpg#0", "caption-sub/b.png#0", "caption-a.jpg#1", "caption-a.jpg#2"]
    assert [pairs[i]["id"] for i in range(len(pairs))] == ids


def test_tfds_captions_without_tensorflow(tmp_path):
    import tensorflow_datasets as tfds

    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        url_infos = None

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                        "captions": {"text": tfds.features.Sequence(tfds.features.Text())},
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(3):
                buffer = io.BytesIO()
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(buffer, "PNG")
                yield i, {"image": buffer.getvalue(), "captions": {"text": [f"caption {i}", "alt"]}}

    TinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = TfdsCaptions("tiny_captions", data_dir=str(tmp_path), caption_key="captions/text")
    texts = sorted(source[i]["text"] for i in range(len(source)))
    assert texts == ["caption 0", "caption 1", "caption 2"]
    assert source[0]["image"].shape == (8, 8, 3)
    assert "tensorflow" not in sys.modules
    with pytest.raises(ValueError, match="has no split 'validation'; its prepared splits are train"):
        TfdsCaptions("tiny_captions", split="validation", data_dir=str(tmp_path))


def test_a_tfds_set_that_is_not_prepared_says_so(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        TfdsCaptions("tiny_captions", data_dir=str(tmp_path))
    assert str(info.value).startswith(f"no prepared tiny_captions in {tmp_path}")
    # Short: TFDS's own message lists every data set it knows. The temporary path's length is pytest's.
    message = str(info.value).replace(str(tmp_path), "")
    assert "file_format='array_record'" in message and len(message) < 400


def test_mixed_with_shapes(folder):
    c = default_data_config()
    c.resolution, c.num_threads = (16, 16), 1
    c.gen_sources, c.captions.path = "captions", str(folder)
    batch = next(make_train_iterator(c, 1, 3, seed=0, process_index=0, process_count=1))
    assert batch["seg"]["image"].shape[0] == 1 and batch["gen"]["image"].shape == (3, 16, 16, 3)


def test_folder_images_are_turned_as_displayed(tmp_path):
    # A phone photo stored landscape with EXIF "rotate 90 deg" is shown (and must be learned) portrait.
    image = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "a.jpg", exif=exif)
    (tmp_path / "a.txt").write_text("a photo")
    assert CaptionFiles(str(tmp_path))[0]["image"].shape == (40, 20, 3)


def test_a_caption_file_gone_after_the_scan_is_a_bad_example_not_its_path(folder):
    pairs = CaptionFiles(str(folder))
    (folder / "a.txt").unlink()
    with pytest.raises(BadExample) as info:
        pairs[0]
    assert info.value.kind == "no_caption"
    assert pairs[1]["text"] == "a bright picture"


def test_tfds_image_arrays_that_are_not_uint8_are_bad_examples_not_cast():
    source = TfdsCaptions.__new__(TfdsCaptions)  # the reading only; preparing a set is tested above
    source.name, source.split, source.image_key, source.caption_key = "tiny", "train", "image", "caption"
    source.records = [
        {"image": np.full((4, 4, 3), 60000, np.uint16), "caption": "wrapped"},
        {"image": np.full((4, 4, 3), 9, np.uint8), "caption": "fine"},
    ]
    with pytest.raises(BadExample) as info:
        source[0]
    assert info.value.kind == "bad_image"
    assert source[1]["image"].dtype == np.uint8 and source[1]["text"] == "fine"


def test_jsonl_lines_without_a_caption_or_with_a_non_path_image_are_logged_skips(folder, caplog):
    jsonl = folder / "coco.jsonl"
    records = [
        {"image": "a.jpg"},  # no caption key: was trained on as the caption "None"
        {"image": "a.jpg", "caption": None},
        {"image": 139, "caption": "a dog"},  # a COCO id, not a path: was a TypeError for the whole file
        {"image": "a.jpg", "caption": "  "},
        {"image": "a.jpg", "caption": "kept"},
    ]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level(logging.WARNING):
        pairs = CaptionFiles(str(jsonl))
    assert len(pairs) == 1 and pairs[0]["text"] == "kept"
    assert dict(pairs.skips.counts) == {"no_caption": 3, "bad_record": 1}
    assert "coco.jsonl:3 (bad_record: image 139 is not a path)" in caplog.text


def test_tfds_captions_refuse_empty_captions_as_caption_files_do():
    source = TfdsCaptions.__new__(TfdsCaptions)  # the reading only; preparing a set is tested above
    source.name, source.split, source.image_key, source.caption_key = "tiny", "train", "image", "caption"
    image = np.full((4, 4, 3), 9, np.uint8)
    source.records = [{"image": image, "caption": c} for c in (b"", b"  ", [], b"fine")]
    for index in range(3):
        with pytest.raises(BadExample) as info:
            source[index]
        assert info.value.kind == "no_caption"
    assert source[3]["text"] == "fine"
