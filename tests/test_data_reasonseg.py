"""ReasonSeg (LISA layout) on a fake folder made here: ignore and flag shapes, largest-first painting,
EXIF-rotated JPEGs read as LISA reads them."""

import json
import logging

import cv2
import numpy as np
import pytest
from PIL import Image

from genmask_jax.data.pipeline import default_data_config, make_eval_iterator, make_train_iterator
from genmask_jax.data.reasonseg import LONG_TEMPLATE, SHORT_TEMPLATE, ReasonSeg, rasterise_shapes


def _write(folder, stem, shapes, texts, is_sentence, size=(40, 30), suffix=".jpg"):
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8))
    image.save(folder / f"{stem}{suffix}", format="PNG" if suffix == ".png" else "JPEG")
    (folder / f"{stem}.json").write_text(
        json.dumps({"text": texts, "is_sentence": is_sentence, "shapes": shapes})
    )


def _rect(label, x0, y0, x1, y1):
    return {"label": label, "points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], "shape_type": "polygon"}


@pytest.fixture
def reasonseg_root(tmp_path):
    shapes = [
        _rect("target", 2, 2, 20, 20),
        _rect("ignore", 5, 5, 10, 10),  # smaller: painted after the target, wins inside it
        _rect("flag", 0, 0, 39, 29),  # skipped
    ]
    _write(tmp_path / "train", "a", shapes, ["the cup", "a mug"], False)
    _write(tmp_path / "train", "b", [_rect("target", 25, 5, 35, 25)], ["what holds coffee?"], True)
    _write(tmp_path / "train", "c", [_rect("target", 100, 100, 120, 120)], ["off the image"], False)
    _write(tmp_path / "val", "a", shapes, ["first text", "second text"], False)
    (tmp_path / "val" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "val" / "broken.json").write_text("{")
    return tmp_path


def test_rasterise_largest_first_with_ignore_and_flag():
    mask, ignore = rasterise_shapes(
        [_rect("target", 2, 2, 20, 20), _rect("ignore", 5, 5, 10, 10), _rect("flag", 0, 0, 39, 29)], 30, 40
    )
    assert mask.dtype == np.uint8 and ignore.dtype == np.bool_
    assert ignore[5:11, 5:11].all() and ignore.sum() == 36  # outline painted too: 6 x 6 pixels
    assert mask[2:21, 2:21].sum() == 19 * 19 - 36 and mask[0, 0] == 0 and mask[25, 30] == 0
    # painting order is by area, not file order: the small target inside a large ignore stays target
    mask, ignore = rasterise_shapes([_rect("target", 5, 5, 10, 10), _rect("ignore", 2, 2, 20, 20)], 30, 40)
    assert mask.sum() == 36 and not ignore[5:11, 5:11].any()
    # equal areas: LISA's argsort(areas)[::-1] paints the later shape first, so the earlier one wins
    mask, ignore = rasterise_shapes([_rect("target", 2, 2, 12, 12), _rect("ignore", 7, 7, 17, 17)], 30, 40)
    assert mask[7:13, 7:13].all() and not ignore[7:13, 7:13].any() and ignore[14, 14]


def test_rasterise_truncates_float_points_like_lisa():
    # x 2.9 -> 2 and 12.99 -> 12 (int32 truncation, not rounding); the outline pixels are included.
    tri = {"label": "target", "points": [[2.9, 1.2], [12.99, 1.7], [2.5, 9.9]]}
    mask, _ = rasterise_shapes([tri], 12, 16)
    assert mask[1, 2] == 1 and mask[1, 12] == 1 and mask[9, 2] == 1
    assert mask[1, 13] == 0 and mask[10, 2] == 0 and mask[0].sum() == 0 and mask[:, :2].sum() == 0


def test_rasterise_paints_what_falls_inside_the_image_like_lisa(caplog):
    # Pixel counts from LISA's get_mask_from_json on the same shapes (h 20, w 30), which never refuses
    # a shape: it paints what falls inside the image.
    enclosing = [{"label": "target", "points": [[-5, -5], [40, -5], [40, 30], [-5, 30]]}]
    mask, ignore = rasterise_shapes(enclosing, 20, 30)
    assert mask.all() and not ignore.any()
    stray_ignore = [
        _rect("target", 2, 2, 10, 10),
        {"label": "ignore", "points": [[50, 50], [60, 50], [60, 60]]},
    ]
    mask, ignore = rasterise_shapes(stray_ignore, 20, 30)
    assert mask.sum() == 81 and not ignore.any()
    # labelme puts points on the border x == width, y == height: no vertex inside, real pixels painted
    corner = [{"label": "target", "points": [[30.0, 12.0], [30.0, 20.0], [22.0, 20.0]]}]
    assert rasterise_shapes(corner, 20, 30)[0].sum() == 28
    with caplog.at_level(logging.WARNING):
        mask, ignore = rasterise_shapes([_rect("target", 31, 21, 40, 29)], 20, 30, name="x/a.json")
    assert not mask.any() and not ignore.any()
    assert "x/a.json: shape 'target' (x 31..40, y 21..29) paints no pixel of the 30x20 image" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # an ignore shape off the canvas is not worth a warning
        rasterise_shapes(stray_ignore, 20, 30)
    assert not caplog.text


def test_source_texts_templates_and_skips(reasonseg_root, caplog):
    train = ReasonSeg(str(reasonseg_root), "train")
    assert len(train) == 4  # a: 2 texts, b: 1, c: 1
    first = train[0]
    assert first["text"] == SHORT_TEMPLATE.format(query="the cup") and first["id"] == "reasonseg-train-a-0"
    assert train[2]["text"] == LONG_TEMPLATE.format(query="what holds coffee?")
    assert first["image"].shape == (30, 40, 3) and first["ignore"].any()
    with caplog.at_level(logging.WARNING):
        val = ReasonSeg(str(reasonseg_root), "val", all_texts=False)
    assert len(val) == 1 and val[0]["query"] == "first text"
    assert "reasonseg-val-broken" in caplog.text and val.skips.total == 1
    assert len(ReasonSeg(str(reasonseg_root), "val", all_texts=True)) == 2


def test_split_is_what_lisas_glob_jpg_finds(tmp_path, caplog):
    """LISA's ValDataset lists `glob('<split>/*.jpg')`: case-sensitive, no hidden files."""
    target = [_rect("target", 2, 2, 20, 20)]
    for stem, suffix in [("a", ".jpg"), ("b", ".JPG"), ("c", ".png"), ("d", ".jpeg"), (".e", ".jpg")]:
        _write(tmp_path / "val", stem, target, ["the thing"], False, suffix=suffix)
    with caplog.at_level(logging.WARNING):
        val = ReasonSeg(str(tmp_path), "val")
    assert [val.example_id(i) for i in range(len(val))] == ["reasonseg-val-a-0"]
    assert caplog.text.count("left out") == 1
    assert "ReasonSeg val: 4 image files left out as LISA's glob('*.jpg') leaves them out" in caplog.text


def test_a_text_that_is_not_a_list_is_a_bad_example(tmp_path, caplog):
    """A string would be iterated letter by letter: one-letter queries from corrupt data."""
    target = [_rect("target", 2, 2, 20, 20)]
    _write(tmp_path / "val", "a", target, ["the thing"], False)
    _write(tmp_path / "val", "b", target, "what keeps the rain off", True)
    with caplog.at_level(logging.WARNING):
        val = ReasonSeg(str(tmp_path), "val")
    assert [val.example_id(i) for i in range(len(val))] == ["reasonseg-val-a-0"]
    assert val.skips.counts == {"bad_text": 1}
    assert "skipped reasonseg-val-b (bad_text: 'text' is a str, not a list of queries)" in caplog.text


def test_through_the_pipelines(reasonseg_root, caplog):
    c = default_data_config()
    c.resolution, c.num_threads, c.shuffle = (16, 16), 1, False
    c.seg_sources, c.gen_sources = "reasonseg", ""
    c.reasonseg.root = str(reasonseg_root)
    with caplog.at_level(logging.WARNING):
        batch = next(make_train_iterator(c, 4, 0, seed=0, process_index=0, process_count=1))
    assert batch["seg"]["mask"].shape == (4, 16, 16)
    # c's target lies off the image: it paints nothing (as in LISA), and training skips the empty mask
    assert "c.json: shape 'target' (x 100..120, y 100..120) paints no pixel" in caplog.text
    assert "reasonseg-train-c-0 (empty_mask" in caplog.text
    ev = make_eval_iterator(c, "val", 2, process_index=0, process_count=1)
    ((out, metas),) = list(ev.iter_with_meta())
    assert out["valid"].tolist() == [True, False]
    assert metas[0]["mask"].shape == (30, 40) and metas[0]["ignore"].sum() == 36
    assert out["ignore"][0].any()  # ignore region and the padding rows


def test_exif_rotated_jpeg_is_read_as_displayed_like_lisa(tmp_path):
    # Stored 40 wide x 30 high, tagged Orientation 6: displayed (and read by LISA's cv2.imread, and
    # annotated in labelme) 30 wide x 40 high. The target lies below row 30, inside the displayed image
    # only, so read in the stored layout it would paint nothing.
    stored = np.full((30, 40, 3), 40, np.uint8)
    stored[:, :10] = 210
    exif = Image.Exif()
    exif[0x0112] = 6
    folder = tmp_path / "val"
    folder.mkdir()
    Image.fromarray(stored).save(folder / "phone.jpg", quality=95, exif=exif.tobytes())
    shapes = [_rect("target", 2, 31, 12, 38), _rect("ignore", 20, 2, 25, 6)]
    (folder / "phone.json").write_text(
        json.dumps({"text": ["the thing"], "is_sentence": False, "shapes": shapes})
    )
    example = ReasonSeg(str(tmp_path), "val")[0]
    assert example["image"].shape == (40, 30, 3) and example["mask"].shape == (40, 30)
    lisa = cv2.cvtColor(cv2.imread(str(folder / "phone.jpg")), cv2.COLOR_BGR2RGB)
    assert np.abs(example["image"].astype(int) - lisa).max() <= 8
    expected_mask, expected_ignore = rasterise_shapes(shapes, 40, 30)
    np.testing.assert_array_equal(example["mask"], expected_mask)
    np.testing.assert_array_equal(example["ignore"], expected_ignore)
    assert example["mask"][31:39, 2:13].all() and example["ignore"][2:7, 20:26].all()


def test_evaluation_picks_text0_before_dropping_blanks_like_lisa(tmp_path, caplog):
    """LISA's ValDataset evaluates `sampled_sents[0]`: a blank text[0] skips the image (no_text) rather
    than letting text[1] stand in. Training keeps every non-blank text."""
    target = [_rect("target", 2, 2, 20, 20)]
    for stem, texts in [("a", ["", "the dog on the left"]), ("b", ["  "]), ("c", ["the cup", " "])]:
        _write(tmp_path / "val", stem, target, texts, False)
    with caplog.at_level(logging.WARNING):
        val = ReasonSeg(str(tmp_path), "val", all_texts=False)
    queries = [(val.example_id(i), val[i]["query"]) for i in range(len(val))]
    assert queries == [("reasonseg-val-c-0", "the cup")]
    assert val.skips.counts == {"no_text": 2}
    assert "skipped reasonseg-val-a (no_text: text[0] is blank)" in caplog.text
    every = ReasonSeg(str(tmp_path), "val", all_texts=True)
    assert [every[i]["query"] for i in range(len(every))] == ["the dog on the left", "the cup"]


def test_the_configured_training_split_reads_every_text(reasonseg_root):
    """Only a split named literally "train" read every text: with `data.train_split="trainval"` training
    got text[0] of each image, a third of ReasonSeg's training queries."""
    import shutil

    from genmask_jax.data.sources import make_source

    shutil.copytree(reasonseg_root / "train", reasonseg_root / "trainval")
    c = default_data_config()
    c.reasonseg.root, c.train_split = str(reasonseg_root), "trainval"
    texts = sorted(item[3] for item in make_source("reasonseg", "trainval", c, "seg").items)  # (.., text, ..)
    assert texts == ["a mug", "off the image", "the cup", "what holds coffee?"]
    assert len(make_source("reasonseg", "val", c, "seg")) == 1  # evaluation: text[0]


def test_an_unset_root_is_named_not_looked_up_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "val").mkdir()
    monkeypatch.chdir(tmp_path)  # a `val` folder here was read as the split (0 examples, no error)
    with pytest.raises(ValueError, match="data.reasonseg.root is empty"):
        ReasonSeg("", "val")
