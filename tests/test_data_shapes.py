"""Synthetic referring shapes: determinism, any resolution, disjoint splits, unambiguous expressions."""

import hashlib
import re

import numpy as np
import pytest

from genmask_jax.data import shapes as S


def _digest(example):
    return hashlib.sha1(example["image"].tobytes() + example["text"].encode()).hexdigest()


def test_deterministic_and_any_resolution():
    a, b = S.SyntheticShapes("train", 32, seed=3), S.SyntheticShapes("train", 32, seed=3)
    for i in range(5):
        ea, eb = a[i], b[i]
        np.testing.assert_array_equal(ea["image"], eb["image"])
        np.testing.assert_array_equal(ea["mask"], eb["mask"])
        assert ea["text"] == eb["text"] and ea["id"] == eb["id"]
    big = S.SyntheticShapes("train", 512, seed=3)[0]
    assert big["image"].shape == (512, 512, 3) and big["mask"].shape == (512, 512)
    assert big["text"] == a[0]["text"]  # the scene depends on the aspect ratio, not the resolution
    wide, wider = S.SyntheticShapes("train", (24, 40), seed=3), S.SyntheticShapes("train", (48, 80), seed=3)
    assert wider[0]["image"].shape == (48, 80, 3) and wider[0]["mask"].shape == (48, 80)
    assert [wide.scene(i) for i in range(20)] == [wider.scene(i) for i in range(20)]


def test_examples_are_well_formed():
    ds = S.SyntheticShapes("val", 32, num_examples=60)
    kinds = set()
    for i in range(len(ds)):
        e = ds[i]
        scene = ds.scene(i)
        assert 2 <= len(scene.shapes) <= 5
        assert e["image"].dtype == np.uint8 and e["mask"].dtype == np.uint8
        assert set(np.unique(e["mask"])) <= {0, 1}
        assert e["mask"].sum() >= 20  # a small shape at 32x32 covers well over 20 pixels
        assert e["text"].startswith("the ") and e["caption"].endswith("background")
        kinds.add(e["expression_kind"])
    assert kinds == {"attribute", "position", "relation"}
    gen = S.SyntheticShapes("val", 32, num_examples=60, task="gen")
    assert gen[0]["text"] == ds[0]["caption"] and gen.example_id(0) != ds.example_id(0)


def test_splits_are_disjoint():
    digests = {
        split: {_digest(S.SyntheticShapes(split, 16)[i]) for i in range(150)}
        for split in ("train", "val", "test")
    }
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def _referents(scene, expression, extent=(1.0, 1.0)):
    """Independent check: which shapes does an expression describe, by brute force over its words, in
    a picture of `extent` (`S.picture_extent`)."""
    shapes = scene.shapes
    words = expression.split()[1:]

    def parse(ws):
        size = ws[0] if ws and ws[0] in S.SIZES else None
        ws = ws[1:] if size else ws
        colour = ws[0] if ws and ws[0] in S.COLOURS else None
        ws = ws[1:] if colour else ws
        kind = None if ws[0] == "shape" else ws[0]
        return size, colour, kind, ws[1:]

    position = words[0] if words[0] in S._POSITION_WORDS else None
    if position:
        words = words[1:]
    size, colour, kind, rest = parse(words)
    group = [i for i, s in enumerate(shapes) if S._matches(s, kind, colour, size)]
    if position:
        axis, sign = S._POSITION_WORDS[position]
        return [max(group, key=lambda i: sign * (shapes[i].cx, shapes[i].cy)[axis])]
    if not rest:
        return group
    rel = " ".join(rest[:2]) if rest[0] in ("left", "right") else rest[0]
    rest = rest[2:] if rest[0] in ("left", "right") else rest[1:]
    _, a_colour, a_kind, _ = parse(rest[1:])
    anchors = [i for i, s in enumerate(shapes) if S._matches(s, a_kind, a_colour, None)]
    assert len(anchors) == 1
    axis, sign = S._RELATIONS[rel]
    return [
        i
        for i in group
        if i != anchors[0]
        and S._relation_strength(shapes[i], shapes[anchors[0]], axis, sign, extent) >= S.RELATION_MARGIN / 3
    ]


@pytest.mark.parametrize(
    "split, resolution", [("train", (32, 32)), ("test", (32, 32)), ("train", (480, 832))]
)
def test_expressions_pick_exactly_the_target(split, resolution):
    ds = S.SyntheticShapes(split, resolution, seed=1)
    extent = S.picture_extent(*resolution)
    for i in range(200):
        scene = ds.scene(i)
        assert _referents(scene, scene.expression, extent) == [scene.target], (i, scene.expression)


@pytest.mark.parametrize("resolution", [(480, 832), (832, 480)])
def test_relations_name_the_dominant_direction_of_the_pixel_offset(resolution):
    """Shapes sit at (cx * W, cy * H): at WAN's 480x832 a relation judged on the normalised offset could
    name a direction that is not the dominant one in the picture."""
    height, width = resolution
    ds = S.SyntheticShapes("train", resolution, seed=0)
    directions = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}
    checked = 0
    for i in range(300):
        scene = ds.scene(i)
        if scene.expression_kind != "relation":
            continue
        rel, anchor_words = re.fullmatch(
            r"the .+? (left of|right of|above|below) the (.+)", scene.expression
        ).groups()
        (anchor,) = [
            s for s in scene.shapes if all(w in ("shape", s.kind, s.colour) for w in anchor_words.split())
        ]
        target = scene.shapes[scene.target]
        dx, dy = (target.cx - anchor.cx) * width, (target.cy - anchor.cy) * height
        ux, uy = directions[rel]
        along, across = ux * dx + uy * dy, abs(uy * dx + ux * dy)
        assert along > across, (i, scene.expression, f"offset dx={dx:+.0f} dy={dy:+.0f} px")
        checked += 1
    assert checked > 50


def test_expression_kinds_subset():
    ds = S.SyntheticShapes("train", 16, expression_kinds="attribute")
    assert {ds[i]["expression_kind"] for i in range(30)} == {"attribute"}
    with pytest.raises(ValueError):
        S.SyntheticShapes("train", 16, expression_kinds="colourful")


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(min_shapes=1, max_shapes=1, expression_kinds="position"), "need two shapes or more"),
        (dict(min_shapes=1, max_shapes=1, expression_kinds="relation,position"), "need two shapes or more"),
        (dict(min_shapes=9, max_shapes=9), "no scene of 9 to 9 shapes"),
    ],
)
def test_settings_that_give_no_scene_are_refused(settings, message, monkeypatch):
    """The scene loop had no end: a data loader with these settings hung at its first batch. The source
    tries its first scene at construction (a draw of 9 shapes fits about never); scenes are then drawn
    until they fit, as before (7 shapes fit 1 draw in 100)."""
    monkeypatch.setattr(S, "MAX_SCENE_DRAWS", 300)  # 10,000 draws of 9 shapes take about 20 s
    with pytest.raises(ValueError, match=message):
        S.SyntheticShapes("train", 16, **settings)
    with pytest.raises(ValueError, match="in 50 draws"):
        S.sample_scene(np.random.default_rng(0), 1, 1, ("position",), max_draws=50)


def test_the_tiny_runs_context_holds_every_text_whole():
    """The toy encoder cuts a text longer than the context (with a warning per cut): the tiny config's
    context holds the longest caption (max_shapes shapes) and expression, so nothing is cut."""
    from configs.genmask import get_config
    from genmask_jax.encoders.toy import tokenize

    data = get_config().data
    most = data.shapes.max_shapes
    source = S.SyntheticShapes("train", resolution=8, min_shapes=most, max_shapes=most)
    scenes = [source.scene(i) for i in range(50)]
    longest = max(len(tokenize(text)) for s in scenes for text in (s.caption(), s.expression))
    assert longest <= data.encoder.context_length
